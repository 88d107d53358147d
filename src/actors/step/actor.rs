//! The step actor: [`StepCore`] run by the generic [`Driver`]. This file only performs commands
//! (messages to other actors, timers, stats) and hands I/O to [`perform`](super::perform); every
//! decision is the core's.

use std::collections::BTreeSet;
use std::sync::Arc;

use actix::prelude::*;

pub use super::core::Row;
use super::core::{Cmd, Found, In, Note, Produced, StepCore};
use super::describe::Described;
use super::machine::StepMachine;
pub use super::wiring::{
    Actix, AddWaiter, ExpandProduced, JobRoute, StepActor, StepGraph, StepRef, StepSlot, WaiterAddr,
};
use super::{outbox, perform};
use crate::actors::carried::CarriedRow;
use crate::actors::dispatcher::actor::{DispatcherActor, Runnable, SlotFreed, StepLeft};
use crate::actors::driver::{Done, Driver, Machine};
use crate::actors::env::Env;
use crate::actors::introspect::{ActorCell, ActorId, ActorKind};
use crate::actors::messages::{BuildPrio, StepHandle};
use crate::actors::types::{Drv, Failure, Status};
use crate::store::Derivation;

/// What performing needs.
pub struct StepIo {
    env: Arc<Env>,
    /// Shared by every step actor (an `Addr` clone allocates twice).
    dispatcher: Arc<Addr<DispatcherActor>>,
    graph: Arc<dyn StepGraph>,
    pub(super) drv: Drv,
    cell: Arc<ActorCell>,
    described: Described,
    /// When it last became runnable (dispatch latency).
    runnable_since: Option<std::time::Instant>,
    /// When its current attempt started on a machine (its duration, learnt when it is built).
    started: Option<std::time::Instant>,
    /// The job key (`BuildPrio::job_key`) of the build that first needed it: whose history it adds to.
    job: Option<String>,
    /// Its identity, held while the actor runs (set when a dormant step wakes): what its
    /// waiters reach it by.
    pub(super) slot: Option<Arc<StepSlot>>,
    #[cfg(feature = "test-hooks")]
    resolved_child: bool,
}

impl StepActor {
    /// A step for `drv` (`machine` holds its inputs), needed by `builds`; made only by the
    /// [`Graph`](crate::actors::graph::Graph). `recorded`: at restart, its own Resolved row and
    /// its child's. A row left busy on a builder by a restart is taken from the ledger here (the
    /// core decides whether it goes on or is closed).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        env: Arc<Env>,
        dispatcher: Arc<Addr<DispatcherActor>>,
        graph: Arc<dyn StepGraph>,
        machine: StepMachine<WaiterAddr>,
        drv: &Derivation,
        (features, prefer_local): (BTreeSet<String>, bool),
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
        let job = builds.first().map(|(_, p)| p.job_key());
        let core = StepCore::new(
            machine,
            drv.system.clone(),
            features,
            deps,
            builds,
            recorded,
            carried,
            resolved_child,
        )
        .preferring_local(prefer_local);
        let io = StepIo {
            env,
            dispatcher,
            graph,
            drv: drv_path,
            cell,
            described: Described::default(),
            runnable_since: None,
            started: None,
            job,
            slot: None,
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

    // No start event: the graph feeds `Start` to the dormant step it makes, and the actor
    // starts with whatever that (and what followed) left to do.

    fn observe(&self, io: &mut StepIo) {
        io.described.refresh(self, &io.cell);
    }

    fn perform(io: &mut StepIo, cmd: Cmd<Actix>, ctx: &mut Context<StepActor>) -> Done<In<Actix>> {
        let Some(cmd) = perform_plain(io, cmd) else {
            return Done::Nothing;
        };
        let env = io.env.clone();
        let drv = io.drv.clone();
        match cmd {
            Cmd::Resolve {
                inputs,
                owner,
                pending,
            } => {
                env.probe.resolving(&drv);
                let producers = io.graph.producers_of(&drv);
                later(
                    &env,
                    perform::resolve(env.clone(), drv, inputs, owner, pending, producers),
                )
            }
            Cmd::FindChild { resolved } => {
                env.probe.resolved(&drv, &resolved);
                match io.graph.live(&resolved) {
                    Some((key, dep)) => {
                        io.graph.linked(&key, &drv);
                        Done::Now(In::Child(Found::Live { key, dep }))
                    }
                    None => later(&env, perform::look_for_child(env.clone(), resolved)),
                }
            }
            Cmd::SpawnChild {
                resolved,
                drv: d,
                builds,
            } => {
                let (key, dep) = io.graph.clone().spawn_resolved(&resolved, &d, builds);
                io.graph.linked(&key, &drv);
                Done::Now(In::Child(Found::Spawned { key, dep }))
            }
            Cmd::AttachProduced {
                drv: produced,
                by,
                build,
                prio,
            } => {
                // crash tests only: die once a producer has landed, before its drv is attached
                #[cfg(feature = "test-hooks")]
                env.crash_point("attach-produced");
                let key: Drv = produced.as_str().into();
                let (Some(expander), Some(build), Some(prio)) = (io.graph.expander(), build, prio)
                else {
                    let why = "no expander or no build to attach it for";
                    return Done::Now(In::Produced {
                        drv: key,
                        produced: Produced::Failed(Failure::new(
                            Status::Aborted,
                            format!("cannot attach produced derivation {produced}: {why}"),
                        )),
                    });
                };
                // Before the step can exist: every row it makes links to the producers' rows.
                io.graph.produced_by(&produced, &by, true);
                let graph = io.graph.clone();
                Done::Later(Box::pin(async move {
                    let msg = ExpandProduced {
                        drv: produced.clone(),
                        build,
                        prio,
                    };
                    let produced = match expander.send(msg).await {
                        Ok(p) => {
                            if matches!(p, Produced::Step { .. }) {
                                crate::metrics::global().steps.dynamic.inc();
                            } else {
                                graph.produced_by(&key, &[], false);
                            }
                            p
                        }
                        Err(e) => Produced::Failed(Failure::new(
                            Status::Aborted,
                            format!("cannot attach produced derivation {produced}: {e}"),
                        )),
                    };
                    In::Produced { drv: key, produced }
                }))
            }
            Cmd::JoinChild { dep, adopt, builds } => {
                let Some(slot) = &io.slot else {
                    tracing::error!(drv = %drv, "a step without its slot cannot wait on its resolved step");
                    return Done::Nothing;
                };
                let me = WaiterAddr::Step(drv, Arc::downgrade(slot));
                outbox::join_child(&env, &dep, me, adopt, builds);
                Done::Nothing
            }
            Cmd::Enqueue(mut step) => {
                // Read now, in the same turn as the message is sent: a later change of the path
                // reaches the dispatcher after it (one sender thread, one mailbox).
                step.priority.critical_path_ms = io.graph.critical_path_ms(&drv);
                crate::metrics::global()
                    .steps
                    .queued(io.cell.group(), step.priority.critical_path_ms);
                io.runnable_since
                    .get_or_insert_with(std::time::Instant::now);
                let me = ctx.address().downgrade();
                let addr = StepHandle {
                    assigned: me.clone().recipient(),
                    no_machine: me.recipient(),
                };
                io.dispatcher.do_send(Runnable { step, addr });
                Done::Nothing
            }
            Cmd::StartRow {
                pending,
                owner,
                machine,
                system,
                job,
                limits,
            } => {
                // The job goes as soon as its row is written (named for it), from the I/O.
                let send = job.map(|to| {
                    outbox::job_sender(&env, &drv, to, limits, ctx.address().downgrade())
                });
                #[cfg(feature = "test-hooks")]
                let crash = io.resolved_child && env.crash_armed("building-resolved");
                let e = env.clone();
                let producers = io.graph.producers_of(&drv);
                later(&env, async move {
                    let ev = perform::start_row(
                        e.clone(),
                        drv,
                        pending,
                        owner,
                        machine,
                        system,
                        producers,
                    )
                    .await;
                    if let (In::Started(row), Some(send)) = (&ev, send) {
                        send(*row);
                        #[cfg(feature = "test-hooks")]
                        if crash {
                            // crash tests only: let the job start, then die while the resolved
                            // step builds
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            e.crash_point("building-resolved");
                        }
                    }
                    ev
                })
            }
            Cmd::SendJob(order) => {
                let send = outbox::job_sender(
                    &env,
                    &drv,
                    order.to,
                    order.limits,
                    ctx.address().downgrade(),
                );
                send(order.attempt);
                Done::Nothing
            }
            Cmd::AbortJob(job) => {
                outbox::abort_job(&drv, job);
                Done::Nothing
            }
            Cmd::Db {
                register,
                writes,
                on_error,
                free_slot,
                detached,
            } => {
                let e = env.clone();
                let producers = io.graph.producers_of(&drv);
                later(&env, async move {
                    if let Some(outputs) = register {
                        perform::register_in_store(e.clone(), drv.clone(), outputs).await;
                    }
                    perform::write_all(e, drv, writes, on_error, free_slot, detached, producers)
                        .await
                })
            }
            Cmd::Timer(after) => {
                crate::metrics::global().steps.retries.inc();
                ctx.run_later(after, |act, ctx| act.feed(In::RetryDue, ctx));
                Done::Nothing
            }
            Cmd::Stop => {
                ctx.stop();
                Done::Nothing
            }
            plain => {
                tracing::error!(drv = %drv, cmd = ?plain, "a plain command was left to the actor");
                Done::Nothing
            }
        }
    }

    fn stopped(&mut self, io: &mut StepIo, _ctx: &mut Context<StepActor>) {
        if let Some(slot) = io.slot.take() {
            slot.stopped();
        }
        wind_up(self, io);
    }
}

/// Whether `cmd` needs no actor to be performed (see [`perform_plain`]).
pub(super) fn is_plain(cmd: &Cmd<Actix>) -> bool {
    matches!(
        cmd,
        Cmd::LeaveQueue
            | Cmd::FreeSlot(_)
            | Cmd::Notify { .. }
            | Cmd::PassBuilds { .. }
            | Cmd::Gauge { .. }
            | Cmd::Count(_)
            | Cmd::Note(_)
    )
}

/// Performs a command that needs no actor (no address of its own, no reply, no timer): a
/// dormant step performs these where it stands. Gives back any other.
pub(super) fn perform_plain(io: &mut StepIo, cmd: Cmd<Actix>) -> Option<Cmd<Actix>> {
    let env = &io.env;
    let drv = &io.drv;
    match cmd {
        Cmd::LeaveQueue => io.dispatcher.do_send(StepLeft(drv.to_string())),
        Cmd::FreeSlot(machine) => io.dispatcher.do_send(SlotFreed(machine)),
        Cmd::Notify { to, notice } => {
            for w in to {
                outbox::notify(&w, drv, &notice);
            }
        }
        Cmd::PassBuilds { to, builds } => outbox::pass_builds(env, to, builds),
        Cmd::Gauge { left, entered } => outbox::account(&env.stats, left, entered),
        Cmd::Count(c) => {
            if c == super::core::Counter::StepsBuilt {
                env.probe.built(drv);
            }
            outbox::count(&env.stats, c);
        }
        Cmd::Note(Note::Dispatched) => {
            if let Some(t) = io.runnable_since.take() {
                env.stats.dispatch.observe(t.elapsed());
                crate::metrics::global()
                    .steps
                    .waited(io.cell.group(), t.elapsed());
            }
        }
        Cmd::Note(n) => {
            match &n {
                Note::Started { .. } => io.started = Some(std::time::Instant::now()),
                Note::Finished { status, built } => {
                    let took = io.started.take().map(|t| t.elapsed());
                    let learnt = match took {
                        Some(t) if *built && *status == Status::Success => {
                            Some((io.job.as_deref(), t))
                        }
                        _ => None,
                    };
                    io.graph.finished(drv, learnt);
                }
                _ => {}
            }
            outbox::note(env, drv, n);
        }
        other => return Some(other),
    }
    None
}

/// What a step leaves behind when it stops, as an actor or dormant: what must outlive it is done
/// without it (nothing is fed back), and the graph forgets it.
pub(super) fn wind_up(core: &mut StepCore<Actix>, io: &mut StepIo) {
    let env = io.env.clone();
    let drv = io.drv.clone();
    for cmd in core.on_stop() {
        match cmd {
            Cmd::Gauge { left, entered } => outbox::account(&env.stats, left, entered),
            Cmd::LeaveQueue => io.dispatcher.do_send(StepLeft(drv.to_string())),
            Cmd::AbortJob(job) => outbox::abort_job(&drv, job),
            Cmd::Db {
                writes, on_error, ..
            } => {
                let producers = io.graph.producers_of(&drv);
                perform::write_detached(env.clone(), drv.clone(), writes, on_error, producers)
            }
            other => {
                tracing::error!(drv = %drv, cmd = ?other, "a stopping step gave a command it cannot perform")
            }
        }
    }
    io.graph.forget(&io.drv);
    io.env.actors.unregister(&io.cell);
}

/// I/O on the I/O runtime, its reply fed back when done.
fn later<F>(env: &Env, io: F) -> Done<In<Actix>>
where
    F: std::future::Future<Output = In<Actix>> + Send + 'static,
{
    Done::Later(Box::pin(env.offload(io)))
}
