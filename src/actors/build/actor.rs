//! The build actor: the thin adapter around [`BuildMachine`]. It expands its drv closure (I/O, then
//! one synchronous graph change), waits on its top-level step and finishes its row once.

use std::future::Future;
use std::sync::Arc;

use actix::prelude::*;

use super::expander::{Expand, Expanded, Expander};
use super::machine::{BuildMachine, Effect, Event};
use crate::actors::env::{Env, SchedEvent, Stats, persist};
use crate::actors::graph::attach::Top;
use crate::actors::introspect::{ActorCell, ActorId, ActorKind};
use crate::actors::messages::*;
use crate::actors::step::actor::{AddWaiter, StepActor, WaiterAddr};
use crate::actors::types::{Outputs, Status, Waiter};
use crate::db::DbError;
use crate::db::types::{Build, FinishBuild, NewStep};

/// Told to whoever watches builds (the queue monitor) when a build actor is done.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct BuildActorDone(pub i64);

pub struct BuildActor {
    env: Arc<Env>,
    row: Build,
    machine: BuildMachine,
    top: Option<Addr<StepActor>>,
    expander: Addr<Expander>,
    done: Option<Recipient<BuildActorDone>>,
    cell: Arc<ActorCell>,
}

impl BuildActor {
    pub fn new(
        env: Arc<Env>,
        row: Build,
        expander: Addr<Expander>,
        done: Option<Recipient<BuildActorDone>>,
    ) -> Self {
        let machine = BuildMachine::new(row.id.0);
        let cell = env
            .actors
            .register(ActorId::Build(row.id.0), ActorKind::Build, env.now());
        cell.describe(|d| {
            d.state = "expanding".into();
            d.parents = vec![ActorId::Named("queue-monitor".into())];
            d.detail = format!("{} {}", row.job, row.drv_path);
        });
        BuildActor {
            env,
            row,
            machine,
            top: None,
            expander,
            done,
            cell,
        }
    }

    fn describe(&self) {
        use super::machine::Phase;
        let (state, top): (std::borrow::Cow<'static, str>, _) = match self.machine.phase() {
            Phase::Expanding => ("expanding".into(), None),
            Phase::Waiting { top } => ("waiting".into(), Some(ActorId::Step(top.as_str().into()))),
            Phase::Finished { status } => (format!("finished({})", status.code()).into(), None),
        };
        self.cell.describe(|d| {
            d.state = state;
            if let Some(t) = top {
                d.children = vec![t.clone()];
                d.waiting_on = vec![t];
            } else {
                d.waiting_on.clear();
            }
        });
    }

    fn prio(&self) -> BuildPrio {
        BuildPrio {
            global_priority: self.row.global_priority,
            local_priority: self.row.priority,
            jobset: self.row.jobset.as_str().into(),
        }
    }

    fn expand(&mut self, ctx: &mut Context<Self>) {
        let req = Expand {
            build: self.row.id.0,
            top: self.row.drv_path.clone(),
            prio: self.prio(),
        };
        ctx.wait(
            self.expander
                .send(req)
                .into_actor(self)
                .map(|res, act, ctx| match res {
                    Err(e) => act.feed(Event::ExpansionFailed(format!("expander: {e}")), ctx),
                    Ok(Expanded { top: Err(msg), .. }) => {
                        act.feed(Event::ExpansionFailed(msg), ctx)
                    }
                    Ok(Expanded {
                        top: Ok(top),
                        cached,
                    }) => match top {
                        Top::Replan => act.expand(ctx),
                        Top::Built(outputs) => act.feed(Event::AlreadyBuilt(outputs), ctx),
                        Top::Failed(f) => {
                            // The rows first, then the build finishes.
                            let rows = act.record_cached_failures(cached);
                            ctx.wait(rows.into_actor(act).map(move |res, act, ctx| {
                                act.written(res, ctx);
                                act.feed(Event::TopFailed(f), ctx)
                            }));
                        }
                        Top::Step(step) => {
                            let rows = act.record_cached_failures(cached);
                            ctx.wait(
                                rows.into_actor(act)
                                    .map(|res, act, ctx| act.written(res, ctx)),
                            );
                            step.do_send(AddWaiter(WaiterAddr::build(
                                act.row.id.0,
                                ctx.address().downgrade(),
                            )));
                            let top = act.row.drv_path.clone();
                            act.top = Some(step);
                            act.feed(Event::WaitingOn(top), ctx);
                        }
                    },
                }),
        );
    }

    /// As in Hydra: a step row with status CachedFailure for each cached failure met. Every row
    /// is tried; the first permanent error is returned (logged with the build's fields).
    fn record_cached_failures(
        &self,
        drvs: Vec<String>,
    ) -> impl Future<Output = Result<(), String>> + 'static {
        let env = self.env.clone();
        let build = self.row.id;
        let system = self.row.system.clone();
        async move {
            let now = env.now();
            let mut first = Ok(());
            for d in drvs {
                let mut s = NewStep::build(&d, &system);
                s.status = Some(Status::CachedFailure);
                s.start_time = Some(now);
                s.stop_time = Some(now);
                s.error_msg = Some("cached failure".into());
                if let Err(e) =
                    persist("record cached failure", || env.db.create_step(build, &s)).await
                {
                    let m = write_failed(&env, build.0, "record a cached failure", &d, &e);
                    if first.is_ok() {
                        first = Err(m);
                    }
                }
            }
            first
        }
    }

    /// The outcome of a write the machine must hear about when it failed for good.
    fn written(&mut self, res: Result<(), String>, ctx: &mut Context<Self>) {
        if let Err(message) = res {
            self.feed(Event::RecordFailed(message), ctx);
        }
    }

    fn feed(&mut self, ev: Event, ctx: &mut Context<Self>) {
        let effects = self.machine.on(ev);
        self.describe();
        for effect in effects {
            match effect {
                Effect::Finish {
                    status,
                    outputs,
                    cached,
                    message,
                } => self.finish(status, outputs, cached, message, ctx),
                Effect::Release { .. } => {
                    if let Some(top) = self.top.take() {
                        top.do_send(RemoveWaiter(Waiter::Build(self.row.id.0)));
                    }
                }
                Effect::Reprioritise { global_priority } => {
                    self.row.global_priority = global_priority;
                    if let Some(top) = &self.top {
                        self.env.stats.membership();
                        top.do_send(AddBuilds(vec![(self.row.id.0, self.prio())]));
                    }
                }
            }
        }
    }

    fn finish(
        &mut self,
        status: Status,
        outputs: Outputs,
        cached: bool,
        message: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        let env = self.env.clone();
        let id = self.row.id;
        let queued = self.row.timestamp;
        if let Some(m) = &message {
            tracing::info!(build = id.0, status = status.code(), message = %m, "build finished");
        } else {
            tracing::info!(build = id.0, status = status.code(), "build finished");
        }
        let f = FinishBuild {
            build: id,
            status,
            start_time: None,
            stop_time: env.now(),
            is_cached: cached,
            outputs: outputs.into_iter().map(|(o, p)| (o, Some(p))).collect(),
        };
        ctx.wait(
            async move {
                if let Err(e) = persist("finish build", || env.db.finish_build(&f)).await {
                    return Err(write_failed(&env, id.0, "finish the build", "", &e));
                }
                Stats::inc(&env.stats.builds_finished);
                env.stats
                    .build_seconds
                    .observe(std::time::Duration::from_secs(
                        (f.stop_time - queued).max(0) as u64,
                    ));
                env.emit(SchedEvent::BuildFinished {
                    build: id.0,
                    status: status.code(),
                });
                Ok(())
            }
            .into_actor(self)
            .map(|res, act, ctx| {
                if let Err(message) = res {
                    // The machine tries once more as Aborted; past that the row stays
                    // unfinished (logged), and the actor stops.
                    let retried = act.machine.on(Event::FinishFailed(message));
                    if !retried.is_empty() {
                        act.describe();
                        for effect in retried {
                            if let Effect::Finish {
                                status,
                                outputs,
                                cached,
                                message,
                            } = effect
                            {
                                act.finish(status, outputs, cached, message, ctx);
                            }
                        }
                        return;
                    }
                    tracing::error!(build = act.row.id.0, "the build's row stays unfinished");
                }
                act.top = None;
                act.env.actors.unregister(&act.cell);
                if let Some(d) = &act.done {
                    d.do_send(BuildActorDone(act.row.id.0));
                }
                ctx.stop();
            }),
        );
    }
}

/// Logs a write of build `build` that failed for good (with the drv it concerned, if any),
/// counts it, and returns the message the build finishes with.
fn write_failed(env: &Env, build: i64, what: &str, drv: &str, e: &DbError) -> String {
    Stats::inc(&env.stats.db_write_failures);
    tracing::error!(build, drv, what, error = %e, "a database write failed for good");
    format!("cannot {what} in the database: {e}")
}

impl Actor for BuildActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.env.emit(SchedEvent::BuildStarted {
            build: self.row.id.0,
        });
        self.expand(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.env.actors.unregister(&self.cell);
    }
}

impl Handler<OutputsLanded> for BuildActor {
    type Result = ();
    fn handle(&mut self, msg: OutputsLanded, ctx: &mut Context<Self>) {
        self.cell.handled();
        // As in Hydra: an output holding `nix-support/failed` finishes the build as FailedWithOutput.
        let failed_marker = msg.outputs.values().any(|p| {
            self.env
                .store
                .physical_path(p)
                .is_some_and(|phys| phys.join("nix-support/failed").exists())
        });
        self.feed(
            Event::TopLanded {
                outputs: msg.outputs,
                failed_marker,
            },
            ctx,
        );
    }
}

impl Handler<StepFailed> for BuildActor {
    type Result = ();
    fn handle(&mut self, msg: StepFailed, ctx: &mut Context<Self>) {
        self.cell.handled();
        // As in Hydra: a build that needs a step another build recorded as failed gets a row
        // saying where the failure was recorded — written before the build finishes.
        let origin = msg
            .failure
            .origin
            .clone()
            .filter(|o| o.build != self.row.id.0 && !self.machine.is_finished());
        match origin {
            None => self.feed(Event::TopFailed(msg.failure), ctx),
            Some(o) => {
                let env = self.env.clone();
                let build = self.row.id;
                let row = async move {
                    let now = env.now();
                    let mut s = NewStep::build(&o.drv, &o.system);
                    s.status = Some(o.status);
                    s.error_msg = Some(o.message.clone());
                    s.start_time = Some(now);
                    s.stop_time = Some(now);
                    s.propagated_from = Some(crate::db::types::BuildId(o.build));
                    persist("create propagated step", || env.db.create_step(build, &s))
                        .await
                        .map(|_| ())
                        .map_err(|e| {
                            write_failed(&env, build.0, "record a propagated failure", &o.drv, &e)
                        })
                };
                let failure = msg.failure;
                ctx.wait(row.into_actor(self).map(move |res, act, ctx| {
                    act.written(res, ctx);
                    act.feed(Event::TopFailed(failure), ctx)
                }));
            }
        }
    }
}

impl Handler<CancelBuild> for BuildActor {
    type Result = ();
    fn handle(&mut self, _: CancelBuild, ctx: &mut Context<Self>) {
        self.cell.handled();
        self.feed(Event::Cancel, ctx);
    }
}

impl Handler<BumpBuild> for BuildActor {
    type Result = ();
    fn handle(&mut self, msg: BumpBuild, ctx: &mut Context<Self>) {
        self.cell.handled();
        self.feed(
            Event::Bump {
                global_priority: msg.0,
            },
            ctx,
        );
    }
}
