//! One actor per connected builder: a machine to the dispatcher (it handles `RunJob` and
//! `AbortJob` like the local machine), the runner's end of the builder's session.
//! [`RemoteCore`] decides (see [`super::remote_core`]); this file only performs its commands: the
//! I/O in [`super::remote_io`], the metrics in [`super::remote_metrics`], the session's messages
//! and their events in [`super::remote_messages`]. Nothing a builder sends enters the store
//! unchecked (see [`super::verify`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::hub::{BuilderHub, Outbound, Quarantine, RemoteSettings, SessionEnded};
use super::remote_core::{Cmd, In, RemoteCore};
use super::remote_io;
pub use super::remote_messages::{
    CheckUpload, Disconnected, FromBuilder, JobAttempt, Refuse, StepAddr, Superseded, UploadDone,
    UploadPermit,
};
use super::remote_metrics::RemoteMetrics;
use super::runner_v1::RunnerMessage;
use crate::actors::dispatcher::MachineInfo;
use crate::actors::dispatcher::actor::{DispatcherActor, MachineHolds, SlotFreed};
use crate::actors::driver::{Done, Driver, Machine};
use crate::actors::env::Env;
use crate::actors::messages::JobDone;
use crate::store::LocalStore;

/// The session actor.
pub type RemoteMachine = Driver<RemoteCore<StepAddr>>;

/// What performing needs.
pub struct RemoteIo {
    env: Arc<Env>,
    store: Arc<LocalStore>,
    dispatcher: Addr<DispatcherActor>,
    hub: Addr<BuilderHub>,
    settings: Arc<RemoteSettings>,
    info: MachineInfo,
    session: String,
    tx: Option<Outbound>,
    metrics: RemoteMetrics,
}

impl RemoteMachine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        env: Arc<Env>,
        store: Arc<LocalStore>,
        dispatcher: Addr<DispatcherActor>,
        hub: Addr<BuilderHub>,
        settings: Arc<RemoteSettings>,
        info: MachineInfo,
        session: String,
        tx: Outbound,
        held: BTreeMap<String, String>,
    ) -> Self {
        let core = RemoteCore::new(
            info.id.clone(),
            settings.store_dir.clone(),
            session.clone(),
            held,
            settings.heartbeat,
            settings.silent_timeout,
            Instant::now(),
        );
        let metrics = RemoteMetrics::new(&info.id);
        let io = RemoteIo {
            env,
            store,
            dispatcher,
            hub,
            settings,
            info,
            session,
            tx: Some(tx),
            metrics,
        };
        Driver::with(core, io)
    }
}

impl Machine for RemoteCore<StepAddr> {
    type In = In<StepAddr>;
    type Cmd = Cmd<StepAddr>;
    type Io = RemoteIo;

    fn take(&mut self, ev: In<StepAddr>) {
        self.on(ev);
    }

    fn next(&mut self) -> Option<Cmd<StepAddr>> {
        self.poll()
    }

    fn start_event() -> Option<In<StepAddr>> {
        Some(In::Start)
    }

    fn perform(
        io: &mut RemoteIo,
        cmd: Cmd<StepAddr>,
        ctx: &mut Context<RemoteMachine>,
    ) -> Done<In<StepAddr>> {
        match cmd {
            Cmd::StartTimers {
                check_every,
                heartbeat,
                adopt_grace,
            } => {
                ctx.run_interval(check_every, |act, ctx| {
                    act.feed(
                        In::Check {
                            now: Instant::now(),
                        },
                        ctx,
                    )
                });
                // The runner's own sign of life, so the builder notices a silent connection too.
                ctx.run_interval(heartbeat, |act, ctx| act.feed(In::HeartbeatDue, ctx));
                if adopt_grace {
                    ctx.run_later(io.settings.adopt_grace, |act, ctx| {
                        act.feed(In::AdoptGraceOver, ctx)
                    });
                }
            }
            Cmd::Alive(load) => io.env.heartbeat(&io.info.id, load, false),
            Cmd::Send(msg) => {
                let sent = io
                    .tx
                    .as_ref()
                    .is_some_and(|tx| tx.try_send(Ok(RunnerMessage { msg: Some(msg) })).is_ok());
                if !sent {
                    return Done::Now(In::StreamClosed);
                }
            }
            Cmd::CloseStream(status) => {
                if let (Some(tx), Some(s)) = (io.tx.take(), status) {
                    // The stream may be gone already: then there is nobody to tell.
                    if tx.try_send(Err(s)).is_err() {
                        tracing::debug!(machine = %io.info.id, "the session stream was gone before its end status");
                    }
                }
            }
            Cmd::Report { to, outcome } => {
                if let Some(step) = to.upgrade() {
                    step.do_send(JobDone(outcome));
                }
            }
            Cmd::FreeSlot => io.dispatcher.do_send(SlotFreed(io.info.id.clone())),
            Cmd::HoldsNothing => io.dispatcher.do_send(MachineHolds {
                machine: io.info.id.clone(),
                drvs: BTreeSet::new(),
            }),
            Cmd::ReadDrv(order) => {
                return Done::Later(Box::pin(remote_io::read_drv(io.store.clone(), order)));
            }
            Cmd::ListInputs { job_id, order, drv } => {
                let me = ctx.address();
                let store = io.store.clone();
                actix::spawn(async move {
                    me.do_send(Fed(remote_io::list_inputs(store, job_id, order, drv).await))
                });
            }
            Cmd::Verify {
                job_id,
                drv_path,
                ran,
                outputs,
                checks,
            } => {
                let me = ctx.address();
                let store = io.store.clone();
                actix::spawn(async move {
                    let ev = remote_io::verify(store, job_id, drv_path, ran, outputs, checks).await;
                    me.do_send(Fed(ev))
                });
            }
            Cmd::RecordRun(drv) => io.env.record_run(&drv),
            Cmd::Quarantine(reason) => io.hub.do_send(Quarantine {
                machine: io.info.id.clone(),
                reason,
            }),
            Cmd::SessionEnded => io.hub.do_send(SessionEnded {
                machine: io.info.id.clone(),
                session: io.session.clone(),
            }),
            Cmd::Note(note) => io.metrics.note(note),
            Cmd::StopLater => {
                ctx.run_later(Duration::from_secs(30), |_, ctx| ctx.stop());
            }
        }
        Done::Nothing
    }
}

/// An answer of I/O done without blocking the mailbox, fed as its event.
#[derive(Message)]
#[rtype(result = "()")]
struct Fed(In<StepAddr>);

impl From<Fed> for In<StepAddr> {
    fn from(f: Fed) -> Self {
        f.0
    }
}

impl Handler<CheckUpload> for RemoteMachine {
    type Result = Result<UploadPermit, String>;
    fn handle(&mut self, msg: CheckUpload, ctx: &mut Context<Self>) -> Self::Result {
        self.decide(ctx, |core| {
            core.check_upload(&msg.job_id, &msg.output, &msg.info)
        })
    }
}

impl Handler<JobAttempt> for RemoteMachine {
    type Result = Option<crate::builder::logs::Attempt>;
    fn handle(&mut self, msg: JobAttempt, _: &mut Context<Self>) -> Self::Result {
        self.machine.attempt(&msg.0)
    }
}
