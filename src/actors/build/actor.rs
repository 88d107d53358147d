//! The build actor: [`BuildCore`] run by the generic [`Driver`]. This file only performs commands
//! (the expander, the top step, the database, the store); every decision is the core's.

use std::sync::Arc;

use actix::prelude::*;

use super::core::{BuildCore, BuildWiring, Cmd, Expansion, In};
use super::expander::{Expand, Expanded, Expander};
use super::machine::Phase;
use super::perform::{finish, record_rows};
use crate::actors::driver::{Done, Driver, Machine};
use crate::actors::env::{Env, SchedEvent};
use crate::actors::graph::attach::Top;
use crate::actors::introspect::{ActorCell, ActorId, ActorKind};
use crate::actors::limits::BuildLimits;
use crate::actors::messages::{
    AddBuilds, BuildPrio, BumpBuild, CancelBuild, OutputsLanded, RemoveWaiter, StepFailed,
};
use crate::actors::step::actor::{AddWaiter, StepRef, WaiterAddr};
use crate::actors::types::Waiter;
use crate::db::types::Build;

/// Told to whoever watches builds (the queue monitor) when a build actor is done.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct BuildActorDone(pub i64);

/// The build actor.
pub type BuildActor = Driver<BuildCore<ActixBuild>>;

/// What the actor's build holds: the top step's address.
#[derive(Debug, Clone, Copy)]
pub struct ActixBuild;

impl BuildWiring for ActixBuild {
    type Step = StepRef;
}

/// What performing needs.
pub struct BuildIo {
    env: Arc<Env>,
    row: Build,
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
        let cell = env
            .actors
            .register(ActorId::Build(row.id.0), ActorKind::Build, env.now());
        cell.describe(|d| {
            d.state = "expanding".into();
            d.parents = vec![ActorId::Named("queue-monitor".into())];
            d.detail = format!("{} {}", row.job, row.drv_path);
        });
        let prio = BuildPrio {
            global_priority: row.global_priority,
            local_priority: row.priority,
            jobset: row.jobset.as_str().into(),
            job: row.job.as_str().into(),
            top: row.drv_path.as_str().into(),
            limits: BuildLimits::from_row(row.max_silent, row.timeout),
        };
        let core = BuildCore::new(row.id.0, row.drv_path.clone(), prio);
        Driver::with(
            core,
            BuildIo {
                env,
                row,
                expander,
                done,
                cell,
            },
        )
    }
}

impl Machine for BuildCore<ActixBuild> {
    type In = In<ActixBuild>;
    type Cmd = Cmd<ActixBuild>;
    type Io = BuildIo;

    fn take(&mut self, ev: In<ActixBuild>) {
        self.on(ev);
    }

    fn next(&mut self) -> Option<Cmd<ActixBuild>> {
        self.poll()
    }

    fn received(io: &mut BuildIo) {
        io.cell.handled();
    }

    fn start_event() -> Option<In<ActixBuild>> {
        Some(In::Start)
    }

    fn observe(&self, io: &mut BuildIo) {
        let (state, top): (std::borrow::Cow<'static, str>, _) = match self.phase() {
            Phase::Expanding => ("expanding".into(), None),
            Phase::Waiting { top } => ("waiting".into(), Some(ActorId::Step(top.as_str().into()))),
            Phase::Finished { status } => (format!("finished({})", status.code()).into(), None),
        };
        io.cell.describe(|d| {
            if d.state != state {
                d.state = state;
            }
            if let Some(t) = top {
                d.children = vec![t.clone()];
                d.waiting_on = vec![t];
            } else {
                d.waiting_on.clear();
            }
        });
    }

    fn perform(
        io: &mut BuildIo,
        cmd: Cmd<ActixBuild>,
        ctx: &mut Context<BuildActor>,
    ) -> Done<In<ActixBuild>> {
        let id = io.row.id.0;
        match cmd {
            Cmd::Expand { prio, first } => {
                if first {
                    io.env.emit(SchedEvent::BuildStarted { build: id });
                }
                let req = Expand {
                    build: id,
                    top: io.row.drv_path.clone(),
                    prio,
                };
                let sent = io.expander.send(req);
                Done::Later(Box::pin(async move {
                    match sent.await {
                        Err(e) => In::Expanded {
                            top: Err(format!("expander: {e}")),
                            cached: vec![],
                        },
                        Ok(Expanded { top, cached }) => In::Expanded {
                            top: top.map(|t| match t {
                                Top::Replan => Expansion::Replan,
                                Top::Built(o) => Expansion::Built(o),
                                Top::Failed(f) => Expansion::Failed(f),
                                Top::Step(s) => Expansion::Step(s),
                            }),
                            cached,
                        },
                    }
                }))
            }
            Cmd::RecordRows(rows) => {
                let fut = io.env.offload(record_rows(
                    io.env.clone(),
                    io.row.id,
                    io.row.system.clone(),
                    rows,
                ));
                Done::Later(Box::pin(async move { In::Written(fut.await) }))
            }
            Cmd::Wait(step) => {
                step.send(AddWaiter(WaiterAddr::build(id, ctx.address().downgrade())));
                Done::Nothing
            }
            Cmd::Release(step) => {
                step.send(RemoveWaiter(Waiter::Build(id)));
                Done::Nothing
            }
            Cmd::Reprioritise(step, prio) => {
                io.env.stats.membership();
                step.send(AddBuilds(vec![(id, prio)]));
                Done::Nothing
            }
            Cmd::CheckMarker { outputs, cached } => {
                // As in Hydra: an output holding `nix-support/failed` finishes the build as
                // FailedWithOutput.
                let store = io.env.store.clone();
                let fut = io.env.offload(async move {
                    let failed_marker = outputs.values().any(|p| {
                        store
                            .physical_path(p)
                            .is_some_and(|phys| phys.join("nix-support/failed").exists())
                    });
                    In::MarkerChecked {
                        outputs,
                        failed_marker,
                        cached,
                    }
                });
                Done::Later(Box::pin(fut))
            }
            Cmd::Finish(f) => {
                let fut = io
                    .env
                    .offload(finish(io.env.clone(), io.row.id, io.row.timestamp, f));
                Done::Later(Box::pin(async move { In::Finished(fut.await) }))
            }
            Cmd::Done => {
                io.env.actors.unregister(&io.cell);
                if let Some(d) = &io.done {
                    d.do_send(BuildActorDone(id));
                }
                ctx.stop();
                Done::Nothing
            }
        }
    }

    fn stopped(&mut self, io: &mut BuildIo, _ctx: &mut Context<BuildActor>) {
        io.env.actors.unregister(&io.cell);
    }
}

impl From<OutputsLanded> for In<ActixBuild> {
    fn from(m: OutputsLanded) -> Self {
        In::Landed(m.outputs)
    }
}

impl From<StepFailed> for In<ActixBuild> {
    fn from(m: StepFailed) -> Self {
        In::Failed(m.failure)
    }
}

impl From<CancelBuild> for In<ActixBuild> {
    fn from(_: CancelBuild) -> Self {
        In::Cancel
    }
}

impl From<BumpBuild> for In<ActixBuild> {
    fn from(m: BumpBuild) -> Self {
        In::Bump(m.0)
    }
}
