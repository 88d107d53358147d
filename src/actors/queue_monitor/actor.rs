//! The queue monitor actor: [`QueueCore`] run by the generic [`Driver`], supervised (a restart
//! listens and reads the whole queue again). This file only performs commands; the I/O is in
//! [`super::perform`].

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::core::{Cmd, In, QueueCore, Routes};
use super::perform;
use crate::actors::build::actor::{BuildActor, BuildActorDone};
use crate::actors::build::expander::Expander;
use crate::actors::dispatcher::actor::{DispatcherActor, JobsetUsage};
use crate::actors::driver::{Done, Driver, Machine};
use crate::actors::env::{Env, Stats};
use crate::actors::introspect::{ActorCell, ActorId, ActorKind};
use crate::actors::messages::{BumpBuild, CancelBuild};
use crate::db::QueueEvent;

/// A change of the queue, from the listener.
#[derive(Message)]
#[rtype(result = "()")]
struct Queue(QueueEvent);

/// Stops the monitor; its supervisor restarts it (it then re-reads the whole queue). Sent when its
/// listener gives up, and by operators.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Restart(pub String);

/// Number of build actors alive.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ActiveBuilds;

/// The build actors' addresses.
pub struct Actix;

impl Routes for Actix {
    type Build = Addr<BuildActor>;
    fn alive(b: &Addr<BuildActor>) -> bool {
        b.connected()
    }
}

/// The queue monitor actor.
pub type QueueMonitor = Driver<QueueCore<Actix>>;

/// What performing needs.
pub struct QueueIo {
    env: Arc<Env>,
    dispatcher: Addr<DispatcherActor>,
    expander: Addr<Expander>,
    /// The task forwarding queue changes (filled by the listen I/O; aborted at a restart).
    listener: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    cell: Arc<ActorCell>,
}

impl QueueMonitor {
    pub fn new(env: Arc<Env>, dispatcher: Addr<DispatcherActor>, expander: Addr<Expander>) -> Self {
        let cell = env
            .actors
            .register("queue-monitor", ActorKind::QueueMonitor, env.now());
        cell.set_state("reading");
        let io = QueueIo {
            env,
            dispatcher,
            expander,
            listener: Default::default(),
            cell,
        };
        Driver::with(QueueCore::default(), io)
    }
}

impl Machine for QueueCore<Actix> {
    type In = In<Actix>;
    type Cmd = Cmd<Actix>;
    type Io = QueueIo;

    fn take(&mut self, ev: In<Actix>) {
        self.on(ev);
    }

    fn next(&mut self) -> Option<Cmd<Actix>> {
        self.poll()
    }

    fn received(io: &mut QueueIo) {
        io.cell.handled();
    }

    fn start_event() -> Option<In<Actix>> {
        Some(In::Start)
    }

    fn perform(
        io: &mut QueueIo,
        cmd: Cmd<Actix>,
        ctx: &mut Context<QueueMonitor>,
    ) -> Done<In<Actix>> {
        let env = io.env.clone();
        match cmd {
            Cmd::Listen => {
                // LISTEN first (on PostgreSQL it is in place when `listen` returns), then read the
                // queue: a build queued in between is seen by the read or notified, never lost.
                let (me, slot) = (ctx.address(), io.listener.clone());
                return Done::Later(Box::pin(async move {
                    match env.db.listen().await {
                        Ok(listener) => {
                            let task = listen(listener, me);
                            if let Some(old) =
                                slot.lock().unwrap_or_else(|p| p.into_inner()).replace(task)
                            {
                                old.abort();
                            }
                            In::Listening(Ok(()))
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot listen for queue changes");
                            In::Listening(Err(e.to_string()))
                        }
                    }
                }));
            }
            Cmd::RestartSoon(reason) => {
                ctx.run_later(Duration::from_secs(1), |act, ctx| {
                    act.feed(In::Restart(reason), ctx)
                });
            }
            Cmd::Read { after } => return Done::Later(Box::pin(perform::read(env, after))),
            Cmd::ReadSoon => {
                ctx.run_later(Duration::from_secs(1), |act, ctx| {
                    act.feed(In::Queue(QueueEvent::Rescan), ctx)
                });
            }
            Cmd::Shares(shares) => {
                for (jobset, shares) in shares {
                    io.dispatcher.do_send(JobsetUsage {
                        jobset,
                        shares: Some(shares),
                        seconds: 0.0,
                    });
                }
            }
            Cmd::Spawn(rows) => {
                let done = ctx.address().recipient::<BuildActorDone>();
                let started = rows
                    .into_iter()
                    .map(|row| {
                        tracing::info!(build = row.id.0, drv = %row.drv_path, job = %row.job, "build queued");
                        let id = row.id.0;
                        crate::metrics::global().queue.builds_loaded.inc();
                        let actor =
                            BuildActor::new(env.clone(), row, io.expander.clone(), Some(done.clone()))
                                .start();
                        (id, actor)
                    })
                    .collect();
                return Done::Now(In::Spawned(started));
            }
            Cmd::FailAggregate {
                row,
                constituent,
                status,
            } => {
                // Not awaited: the monitor goes on meanwhile.
                let me = ctx.address();
                actix::spawn(async move {
                    let ev = perform::fail_aggregate(env, row, constituent, status).await;
                    me.do_send(Fed(ev));
                });
            }
            Cmd::Regate(a) => {
                let me = ctx.address();
                actix::spawn(async move { me.do_send(Fed(perform::regate(env, a).await)) });
            }
            Cmd::Cancel(b) => b.do_send(CancelBuild),
            Cmd::Bump(targets) => {
                actix::spawn(async move {
                    let ids = targets.iter().map(|(id, _)| *id).collect();
                    let prio = perform::priorities(env, ids).await;
                    for (id, b) in targets {
                        if let Some(p) = prio.get(&id) {
                            b.do_send(BumpBuild(*p));
                        }
                    }
                });
            }
            Cmd::Describe(ids) => io.cell.describe(|d| {
                d.state = "watching".into();
                d.children = ids.into_iter().map(ActorId::Build).collect();
            }),
            Cmd::Held { build, job, on } => {
                tracing::info!(build, job = %job, waiting_on = on, "aggregate held back until its constituents finish");
            }
            Cmd::Stop => {
                tracing::warn!("queue monitor stopping to be restarted");
                ctx.stop();
            }
        }
        Done::Nothing
    }

    fn restarting(&mut self, io: &mut QueueIo) {
        Stats::inc(&io.env.stats.actor_restarts);
        io.cell.restarted();
        io.cell.set_state("restarting");
        tracing::warn!("queue monitor restarting");
        if let Some(l) = io.listener.lock().unwrap_or_else(|p| p.into_inner()).take() {
            l.abort();
        }
    }
}

/// Forwards the listener's queue changes to the monitor until it is gone.
fn listen(
    mut listener: crate::db::QueueListener,
    me: Addr<QueueMonitor>,
) -> tokio::task::JoinHandle<()> {
    actix::spawn(async move {
        loop {
            match listener.next().await {
                Ok(ev) => {
                    if me.try_send(Queue(ev)).is_err() && !me.connected() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "queue listener error");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })
}

/// An answer of I/O done without blocking the mailbox, fed as its event.
#[derive(Message)]
#[rtype(result = "()")]
struct Fed(In<Actix>);

impl From<Fed> for In<Actix> {
    fn from(f: Fed) -> Self {
        f.0
    }
}

impl From<Queue> for In<Actix> {
    fn from(q: Queue) -> Self {
        // Made once per queue event the monitor handles.
        crate::metrics::global().queue.wakeups.inc();
        In::Queue(q.0)
    }
}

impl From<Restart> for In<Actix> {
    fn from(r: Restart) -> Self {
        tracing::warn!(reason = %r.0, "queue monitor asked to restart");
        In::Restart(r.0)
    }
}

impl From<BuildActorDone> for In<Actix> {
    fn from(d: BuildActorDone) -> Self {
        In::BuildDone(d.0)
    }
}

impl Handler<ActiveBuilds> for QueueMonitor {
    type Result = usize;
    fn handle(&mut self, _: ActiveBuilds, _: &mut Context<Self>) -> usize {
        self.machine.active()
    }
}
