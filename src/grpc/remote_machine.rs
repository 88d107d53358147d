//! One actor per connected builder: a machine to the dispatcher (it handles `RunJob` and
//! `AbortJob` like the local machine), the runner's end of the builder's session.
//! [`RemoteCore`] decides (see [`super::remote_core`]); this file holds the session's messages
//! and only performs, the I/O in [`super::remote_io`]. Nothing a builder sends enters the store
//! unchecked (see [`super::verify`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::hub::{BuilderHub, Outbound, Quarantine, RemoteSettings, SessionEnded};
pub use super::remote_core::UploadPermit;
use super::remote_core::{Cmd, In, Note, Order, RemoteCore};
use super::remote_io;
use super::runner_v1::{self, RunnerMessage};
use crate::actors::dispatcher::MachineInfo;
use crate::actors::dispatcher::actor::{DispatcherActor, MachineHolds, SlotFreed};
use crate::actors::driver::{Done, Driver, Machine};
use crate::actors::env::Env;
use crate::actors::messages::{AbortJob, JobDone, RunJob};
use crate::metrics::{JobTimer, MachineCounters, Phase};
use crate::store::{LocalStore, PathInfo};

/// A message the builder sent on its session stream.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromBuilder(pub runner_v1::BuilderMessage);

/// The session stream ended (or broke).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected(pub String);

/// The builder opened a new session: this one ends (its jobs may be adopted by the new one).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Superseded;

/// May this session upload `info` as `output` of `job_id`?
#[derive(Message)]
#[rtype(result = "Result<UploadPermit, String>")]
pub struct CheckUpload {
    pub job_id: String,
    pub output: String,
    pub info: PathInfo,
}

/// An upload was checked and registered (or the path was valid already).
#[derive(Message)]
#[rtype(result = "()")]
pub struct UploadDone {
    pub job_id: String,
    pub output: String,
    pub info: PathInfo,
}

/// Something the builder sent broke the protocol (seen by the service): refuse the builder.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Refuse(pub String);

/// The step attempt job `0` of this session is for (names the log the builder streams up).
#[derive(Message)]
#[rtype(result = "Option<crate::builder::logs::Attempt>")]
pub struct JobAttempt(pub String);

/// Where a job's outcome goes.
pub type StepAddr = actix::WeakRecipient<JobDone>;

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
    /// This machine's metrics, and the jobs in flight timed by phase (by job id).
    counters: Arc<MachineCounters>,
    timers: HashMap<String, JobTimer>,
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
        let counters = crate::metrics::global().machine(&info.id);
        let io = RemoteIo {
            env,
            store,
            dispatcher,
            hub,
            settings,
            info,
            session,
            tx: Some(tx),
            counters,
            timers: HashMap::new(),
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
            Cmd::Note(note) => io.note(note),
            Cmd::StopLater => {
                ctx.run_later(Duration::from_secs(30), |_, ctx| ctx.stop());
            }
        }
        Done::Nothing
    }
}

impl RemoteIo {
    /// Feeds the machine's metrics.
    fn note(&mut self, note: Note) {
        match note {
            Note::Opened => self.counters.sessions.inc(),
            Note::Refused => self.counters.refusals.inc(),
            Note::Taken(job) => {
                self.timers.insert(job, self.counters.job());
            }
            Note::Sending {
                job_id,
                drv,
                closure_bytes,
            } => {
                if let Some(t) = self.timers.get_mut(&job_id) {
                    t.phase(Phase::Building);
                }
                let machine_type = crate::metrics::steps::machine_type_of(&drv);
                crate::metrics::global()
                    .steps
                    .input_closure_bytes
                    .with(&[("machine_type", &machine_type)])
                    .observe(closure_bytes as f64);
            }
            Note::Receiving(job) => {
                if let Some(t) = self.timers.get_mut(&job) {
                    t.phase(Phase::ReceivingOutputs);
                }
            }
            Note::Ended { job_id, built } => {
                if let Some(t) = self.timers.remove(&job_id) {
                    t.finish(built);
                }
            }
            // Dropped unfinished: counted as aborted.
            Note::Dropped(job) => drop(self.timers.remove(&job)),
            // Jobs lost with the session count as the machine's failures.
            Note::SessionLost => self.timers.drain().for_each(|(_, t)| t.finish(false)),
        }
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

impl From<RunJob> for In<StepAddr> {
    fn from(m: RunJob) -> Self {
        In::Run(Order {
            drv_path: m.drv_path,
            drv: m.drv,
            step: m.step,
            max_silent: m.max_silent,
            timeout: m.timeout,
            attempt: m.attempt,
        })
    }
}

impl From<AbortJob> for In<StepAddr> {
    fn from(m: AbortJob) -> Self {
        In::Abort(m.drv_path)
    }
}

impl From<FromBuilder> for In<StepAddr> {
    fn from(m: FromBuilder) -> Self {
        In::FromBuilder {
            msg: m.0,
            at: Instant::now(),
        }
    }
}

impl From<Disconnected> for In<StepAddr> {
    fn from(m: Disconnected) -> Self {
        In::Disconnected(m.0)
    }
}

impl From<Superseded> for In<StepAddr> {
    fn from(_: Superseded) -> Self {
        In::Superseded
    }
}

impl From<UploadDone> for In<StepAddr> {
    fn from(m: UploadDone) -> Self {
        In::UploadDone {
            job_id: m.job_id,
            output: m.output,
            info: m.info,
        }
    }
}

impl From<Refuse> for In<StepAddr> {
    fn from(m: Refuse) -> Self {
        In::Refuse(m.0)
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
