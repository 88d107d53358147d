//! The step actor: [`StepCore`] run by the generic [`Driver`]. This file only performs commands
//! (messages to other actors, timers, stats) and hands I/O to [`perform`](super::perform); every
//! decision is the core's.

use std::collections::BTreeSet;
use std::sync::Arc;

use actix::prelude::*;

pub use super::core::Row;
use super::core::{Cmd, Counter, Found, In, Note, Notice, StepCore, Wiring};
use super::describe::Described;
use super::machine::{Gauge, StepMachine};
use super::perform;
use crate::actors::carried::CarriedRow;
use crate::actors::dispatcher::actor::{DispatcherActor, Runnable, SlotFreed, StepLeft};
use crate::actors::driver::{Done, Driver, Machine};
use crate::actors::env::{Env, SchedEvent, Stats};
use crate::actors::introspect::{ActorCell, ActorId, ActorKind};
use crate::actors::messages::*;
use crate::actors::registry::StepRef;
use crate::actors::types::Drv;
use crate::store::Derivation;

/// The step actor.
pub type StepActor = Driver<StepCore<Actix>>;

/// What the actor's step holds: actix addresses.
#[derive(Debug, Clone, Copy)]
pub struct Actix;

impl Wiring for Actix {
    type Waiter = WaiterAddr;
    type Dep = StepRef;
    type Job = JobRoute;
    type Drv = Arc<Derivation>;
}

/// The machine a step was assigned: where its job goes, and how to stop it.
#[derive(Debug, Clone)]
pub struct JobRoute {
    pub runner: Recipient<RunJob>,
    pub abort: Option<Recipient<AbortJob>>,
}

/// What performing needs.
pub struct StepIo {
    env: Arc<Env>,
    /// Shared by every step actor (an `Addr` clone allocates twice).
    dispatcher: Arc<Addr<DispatcherActor>>,
    drv: Drv,
    cell: Arc<ActorCell>,
    described: Described,
    /// When it last became runnable (dispatch latency).
    runnable_since: Option<std::time::Instant>,
    #[cfg(feature = "test-hooks")]
    resolved_child: bool,
}

impl StepActor {
    /// A step for `drv` (`machine` holds its inputs), needed by `builds`. `recorded`: at
    /// restart, its own Resolved row and its child's. A row left busy on a builder by a restart
    /// is taken from the ledger here (the core decides whether it goes on or is closed).
    pub fn new(
        env: Arc<Env>,
        dispatcher: Arc<Addr<DispatcherActor>>,
        machine: StepMachine<WaiterAddr>,
        drv: &Derivation,
        deps: Vec<StepRef>,
        builds: Vec<(i64, BuildPrio)>,
        recorded: Option<(Row, Option<Row>)>,
    ) -> Self {
        Self::make(env, dispatcher, machine, drv, deps, builds, recorded, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn make(
        env: Arc<Env>,
        dispatcher: Arc<Addr<DispatcherActor>>,
        machine: StepMachine<WaiterAddr>,
        drv: &Derivation,
        deps: Vec<StepRef>,
        builds: Vec<(i64, BuildPrio)>,
        recorded: Option<(Row, Option<Row>)>,
        resolved_child: bool,
    ) -> Self {
        let drv_path = machine.drv().clone();
        let carried = env
            .carried
            .claim(&drv_path)
            .map(|c: CarriedRow| super::core::Carried {
                row: c.row,
                machine: c.machine,
            });
        let cell = env
            .actors
            .register(ActorId::Step(drv_path.clone()), ActorKind::Step, env.now());
        let core = StepCore::new(
            machine,
            drv.system.clone(),
            required_features(drv),
            deps,
            builds,
            recorded,
            carried,
            resolved_child,
        );
        let io = StepIo {
            env,
            dispatcher,
            drv: drv_path,
            cell,
            described: Described::default(),
            runnable_since: None,
            #[cfg(feature = "test-hooks")]
            resolved_child,
        };
        Driver::with(core, io)
    }
}

impl Machine for StepCore<Actix> {
    type In = In<Actix>;
    type Cmd = Cmd<Actix>;
    type Io = StepIo;

    fn take(&mut self, ev: In<Actix>) {
        self.on(ev);
    }

    fn next(&mut self) -> Option<Cmd<Actix>> {
        self.poll()
    }

    fn received(io: &mut StepIo) {
        io.cell.handled();
    }

    fn start_event() -> Option<In<Actix>> {
        Some(In::Start)
    }

    fn observe(&self, io: &mut StepIo) {
        io.described.refresh(self, &io.cell);
    }

    fn perform(io: &mut StepIo, cmd: Cmd<Actix>, ctx: &mut Context<StepActor>) -> Done<In<Actix>> {
        let env = io.env.clone();
        let drv = io.drv.clone();
        match cmd {
            Cmd::Resolve {
                inputs,
                owner,
                pending,
            } => {
                env.probe.resolving(&drv);
                let fut = env.offload(perform::resolve(env.clone(), drv, inputs, owner, pending));
                Done::Later(Box::pin(async move {
                    match fut.await {
                        Ok((resolution, rows)) => In::Resolved { resolution, rows },
                        Err(error) => write_failed(error, false, false),
                    }
                }))
            }
            Cmd::FindChild { resolved } => {
                env.probe.resolved(&drv, &resolved);
                if let Some((key, dep)) = env.registry.get_keyed(&resolved) {
                    return Done::Now(In::Child(Found::Live { key, dep }));
                }
                let fut = env.offload(perform::look_for_child(env.clone(), resolved));
                Done::Later(Box::pin(async move { In::Child(fut.await) }))
            }
            Cmd::SpawnChild {
                resolved,
                drv: d,
                builds,
            } => {
                // The registry changes only on this thread; it is looked at again after the
                // lookup's I/O all the same.
                if let Some((key, dep)) = env.registry.get_keyed(&resolved) {
                    return Done::Now(In::Child(Found::Spawned { key, dep }));
                }
                let key: Drv = resolved.as_str().into();
                let machine = StepMachine::new(
                    key.clone(),
                    false,
                    Default::default(),
                    Default::default(),
                    env.retry.clone(),
                );
                let a = StepActor::make(
                    env.clone(),
                    io.dispatcher.clone(),
                    machine,
                    &d,
                    vec![],
                    builds,
                    None,
                    true,
                );
                let dep = Arc::new(a.start());
                env.registry.insert(&key, &dep);
                Stats::inc(&env.stats.steps_created);
                Done::Now(In::Child(Found::Spawned { key, dep }))
            }
            Cmd::JoinChild { dep, adopt, builds } => {
                if let Some((build, stepnr)) = adopt {
                    dep.do_send(AdoptRow { build, stepnr });
                }
                if let Some(b) = builds {
                    env.stats.membership();
                    dep.do_send(AddBuilds(b));
                }
                dep.do_send(AddWaiter(WaiterAddr::Step(drv, ctx.address().downgrade())));
                Done::Nothing
            }
            Cmd::Enqueue(step) => {
                io.runnable_since
                    .get_or_insert_with(std::time::Instant::now);
                let addr = ctx.address().downgrade();
                io.dispatcher.do_send(Runnable { step, addr });
                Done::Nothing
            }
            Cmd::LeaveQueue => {
                io.dispatcher.do_send(StepLeft(drv.to_string()));
                Done::Nothing
            }
            Cmd::FreeSlot(machine) => {
                io.dispatcher.do_send(SlotFreed(machine));
                Done::Nothing
            }
            Cmd::StartRow {
                pending,
                owner,
                machine,
                system,
            } => {
                let fut = env.offload(perform::start_row(
                    env.clone(),
                    drv,
                    pending,
                    owner,
                    machine,
                    system,
                ));
                Done::Later(Box::pin(async move {
                    match fut.await {
                        Ok(row) => In::Started(row),
                        Err(error) => write_failed(error, true, false),
                    }
                }))
            }
            Cmd::SendJob(order) => {
                order.to.runner.do_send(RunJob {
                    drv_path: drv.to_string(),
                    drv: None,
                    step: ctx.address().downgrade(),
                    max_silent: env.max_silent,
                    timeout: env.timeout,
                    attempt: order
                        .attempt
                        .map(|(build, stepnr)| crate::builder::logs::Attempt { build, stepnr }),
                });
                #[cfg(feature = "test-hooks")]
                if io.resolved_child && env.crash_armed("building-resolved") {
                    // crash tests only: let the job start, then die while the resolved step builds
                    actix::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        env.crash_point("building-resolved");
                    });
                }
                Done::Nothing
            }
            Cmd::AbortJob(job) => {
                if let Some(abort) = job.abort {
                    abort.do_send(AbortJob {
                        drv_path: drv.to_string(),
                    });
                }
                Done::Nothing
            }
            Cmd::Db {
                writes,
                on_error,
                free_slot,
                detached,
            } => {
                let fut = env.offload(perform::write_all(env.clone(), drv, writes, on_error));
                Done::Later(Box::pin(async move {
                    match fut.await {
                        Ok(()) => In::Written,
                        Err(error) => write_failed(error, free_slot, detached),
                    }
                }))
            }
            Cmd::RegisterInStore(outputs) => {
                let fut = env.offload(perform::register_in_store(env.clone(), drv, outputs));
                Done::Later(Box::pin(async move {
                    fut.await;
                    In::Written
                }))
            }
            Cmd::Notify { to, notice } => {
                for w in to {
                    notify(&w, &drv, &notice);
                }
                Done::Nothing
            }
            Cmd::PassBuilds { to, builds } => {
                for d in to {
                    env.stats.membership();
                    d.do_send(AddBuilds(builds.clone()));
                }
                Done::Nothing
            }
            Cmd::Timer(after) => {
                ctx.run_later(after, |act, ctx| act.feed(In::RetryDue, ctx));
                Done::Nothing
            }
            Cmd::Gauge { left, entered } => {
                account(&env.stats, left, entered);
                Done::Nothing
            }
            Cmd::Count(c) => {
                let s = &env.stats;
                match c {
                    Counter::StepsBuilt => Stats::inc(&s.steps_built),
                    Counter::StepsFailed => Stats::inc(&s.steps_failed),
                    Counter::EarlyCutoffs => Stats::inc(&s.early_cutoffs),
                    Counter::DbWriteFailures => Stats::inc(&s.db_write_failures),
                    Counter::MembershipHandled => s.dec(&s.membership_in_flight),
                }
                Done::Nothing
            }
            Cmd::Note(n) => {
                let ev = match n {
                    Note::Dispatched => {
                        if let Some(t) = io.runnable_since.take() {
                            env.stats.dispatch.observe(t.elapsed());
                        }
                        return Done::Nothing;
                    }
                    Note::Started { machine } => SchedEvent::StepStarted {
                        drv: drv.to_string(),
                        machine,
                    },
                    Note::Finished { status, built } => SchedEvent::StepFinished {
                        drv: drv.to_string(),
                        status: status.code(),
                        built,
                    },
                    Note::EarlyCutoff { drv } => SchedEvent::EarlyCutoff {
                        drv: drv.to_string(),
                    },
                };
                env.emit(ev);
                Done::Nothing
            }
            Cmd::Stop => {
                ctx.stop();
                Done::Nothing
            }
        }
    }

    fn stopped(&mut self, io: &mut StepIo, _ctx: &mut Context<StepActor>) {
        let (gauge, carried) = self.on_stop();
        if let Cmd::Gauge { left, entered } = gauge {
            account(&io.env.stats, left, entered);
        }
        if let Some(row) = carried {
            tracing::warn!(drv = %io.drv, build = row.0, stepnr = row.1, "a step stopped holding a carried attempt: closing it");
            let env = io.env.clone();
            actix::spawn(env.offload(perform::close_carried_on_stop(
                env.clone(),
                io.drv.clone(),
                row,
            )));
        }
        io.env.registry.remove(&io.drv);
        io.env.actors.unregister(&io.cell);
    }
}

fn write_failed(error: super::core::WriteError, free_slot: bool, detached: bool) -> In<Actix> {
    In::WriteFailed {
        error,
        free_slot,
        detached,
    }
}

/// Tells one waiter (if it still lives).
fn notify(w: &WaiterAddr, from: &Drv, notice: &Notice) {
    match notice {
        Notice::Landed(outputs) => {
            let msg = OutputsLanded {
                from: from.clone(),
                outputs: outputs.clone(),
            };
            match w {
                WaiterAddr::Step(_, a) => a.upgrade().map(|a| a.do_send(msg)),
                WaiterAddr::Build(_, a) => a.upgrade().map(|a| a.do_send(msg)),
            };
        }
        Notice::Failed(failure) => {
            let msg = StepFailed {
                from: from.clone(),
                failure: failure.clone(),
            };
            match w {
                WaiterAddr::Step(_, a) => a.upgrade().map(|a| a.do_send(msg)),
                WaiterAddr::Build(_, a) => a.upgrade().map(|a| a.do_send(msg)),
            };
        }
    }
}

/// The one place gauges change: from the gauge of the phase left to that of the phase entered
/// (see [`Gauge`]).
fn account(stats: &Stats, left: Option<Gauge>, entered: Option<Gauge>) {
    let counter = |g: Gauge| match g {
        Gauge::Runnable => &stats.steps_runnable,
        Gauge::Running => &stats.steps_running,
    };
    if let Some(g) = left {
        stats.dec(counter(g));
    }
    if let Some(g) = entered {
        Stats::inc(counter(g));
    }
}

fn required_features(drv: &Derivation) -> BTreeSet<String> {
    drv.env
        .get("requiredSystemFeatures")
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

impl From<OutputsLanded> for In<Actix> {
    fn from(m: OutputsLanded) -> Self {
        In::Landed {
            from: m.from,
            outputs: m.outputs,
        }
    }
}

impl From<StepFailed> for In<Actix> {
    fn from(m: StepFailed) -> Self {
        In::Failed {
            from: m.from,
            failure: m.failure,
        }
    }
}

impl From<AddWaiter> for In<Actix> {
    fn from(m: AddWaiter) -> Self {
        In::WaiterAdded(m.0)
    }
}

impl From<RemoveWaiter> for In<Actix> {
    fn from(m: RemoveWaiter) -> Self {
        In::WaiterRemoved(m.0)
    }
}

impl From<AddBuilds> for In<Actix> {
    fn from(m: AddBuilds) -> Self {
        In::BuildsAdded(m.0)
    }
}

impl From<AdoptRow> for In<Actix> {
    fn from(m: AdoptRow) -> Self {
        In::RowAdopted((m.build, m.stepnr))
    }
}

impl From<Assigned> for In<Actix> {
    fn from(m: Assigned) -> Self {
        In::Assigned {
            machine: m.machine,
            held: m.held,
            job: JobRoute {
                runner: m.runner,
                abort: m.abort,
            },
        }
    }
}

impl From<JobDone> for In<Actix> {
    fn from(m: JobDone) -> Self {
        In::JobDone(m.0)
    }
}

impl From<NoMachine> for In<Actix> {
    fn from(m: NoMachine) -> Self {
        In::NoMachine(m.0)
    }
}
