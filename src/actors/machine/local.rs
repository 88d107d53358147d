//! The in-process local builder: [`LocalCore`] on the generic driver, running jobs on an
//! [`Executor`] with a fixed number of slots (the dispatcher counts them). This file only
//! performs: it starts and kills jobs and sends their outcomes.

use std::sync::Arc;

use actix::WeakRecipient;
use actix::prelude::*;

use super::executor::{ExecFailure, Executor, Job};
use super::local_core::{Cmd, In, LocalCore, Routes};
use crate::actors::dispatcher::MachineInfo;
use crate::actors::dispatcher::actor::{DispatcherActor, MachineJoined, SlotFreed};
use crate::actors::driver::{Done, Driver, Machine};
use crate::actors::env::Env;
use crate::actors::messages::{AbortJob, JobDone, RunJob};
use crate::actors::step::BuildOutcome;
use crate::actors::types::Status;

/// The local machine's handles.
pub struct Actix;

impl Routes for Actix {
    type Job = RunJob;
    type Step = WeakRecipient<JobDone>;
    type Running = SpawnHandle;
}

pub type LocalMachine = Driver<LocalCore<Actix>>;

/// What performing needs.
pub struct LocalIo {
    env: Arc<Env>,
    info: MachineInfo,
    executor: Arc<dyn Executor>,
    dispatcher: Addr<DispatcherActor>,
}

impl LocalMachine {
    pub fn new(
        env: Arc<Env>,
        info: MachineInfo,
        executor: Arc<dyn Executor>,
        dispatcher: Addr<DispatcherActor>,
    ) -> Self {
        let io = LocalIo {
            env,
            info,
            executor,
            dispatcher,
        };
        Driver::with(LocalCore::default(), io)
    }
}

impl Machine for LocalCore<Actix> {
    type In = In<Actix>;
    type Cmd = Cmd<Actix>;
    type Io = LocalIo;

    fn take(&mut self, ev: In<Actix>) {
        self.on(ev);
    }

    fn next(&mut self) -> Option<Cmd<Actix>> {
        self.poll()
    }

    fn start_event() -> Option<In<Actix>> {
        Some(In::Start)
    }

    fn perform(
        io: &mut LocalIo,
        cmd: Cmd<Actix>,
        ctx: &mut Context<LocalMachine>,
    ) -> Done<In<Actix>> {
        match cmd {
            Cmd::Join => {
                io.env.heartbeat(&io.info.id, None, true);
                io.dispatcher.do_send(MachineJoined {
                    info: io.info.clone(),
                    runner: ctx.address().recipient(),
                    abort: Some(ctx.address().recipient()),
                });
            }
            Cmd::Execute(job) => {
                let drv = job.drv_path.clone();
                let run = execute(io.env.clone(), io.executor.clone(), job, io.info.id.clone());
                let fut = actix::fut::wrap_future::<_, LocalMachine>(io.env.offload(run));
                let handle = ctx.spawn(fut.map(|ev, act, ctx| act.feed(ev, ctx)));
                return Done::Now(In::Running { drv, handle });
            }
            Cmd::Kill { drv, handle } => {
                tracing::info!(drv = %drv, "aborting the build: no longer wanted");
                ctx.cancel_future(handle);
            }
            Cmd::Report { to, outcome } => {
                if let Some(step) = to.upgrade() {
                    step.do_send(JobDone(outcome));
                }
            }
            Cmd::FreeSlot => io.dispatcher.do_send(SlotFreed(io.info.id.clone())),
        }
        Done::Nothing
    }
}

/// Runs one job to its end.
async fn execute(
    env: Arc<Env>,
    executor: Arc<dyn Executor>,
    msg: RunJob,
    machine: String,
) -> In<Actix> {
    // Timed until it ends; dropped unfinished (the job killed) it counts as aborted.
    let mut timer = crate::metrics::global().machine(&machine).job();
    let drv_path = msg.drv_path;
    let drv = match msg.drv {
        Some(d) => Ok(d),
        None => env
            .store
            .read_derivation(&drv_path)
            .await
            .map(Arc::new)
            .map_err(|e| ExecFailure {
                status: Status::Aborted,
                message: format!("cannot read {drv_path}: {e}"),
                transient: true,
            }),
    };
    timer.phase(crate::metrics::Phase::Building);
    let run = match drv {
        Ok(drv) => {
            let job = Job {
                drv_path: drv_path.clone(),
                drv,
                max_silent: msg.max_silent,
                timeout: msg.timeout,
                attempt: msg.attempt,
            };
            executor.execute(job).await
        }
        Err(f) => Err(f),
    };
    timer.finish(run.is_ok());
    let outcome = match run {
        Ok(built) => {
            if built.ran {
                env.record_run(&drv_path);
            }
            BuildOutcome::Built(built.outputs)
        }
        Err(f) => {
            tracing::info!(drv = %drv_path, status = f.status.code(), message = %f.message, "build failed");
            BuildOutcome::Failed {
                status: f.status,
                message: f.message,
                transient: f.transient,
            }
        }
    };
    In::Finished {
        drv: drv_path,
        outcome,
        to: msg.step,
    }
}

impl From<RunJob> for In<Actix> {
    fn from(j: RunJob) -> Self {
        In::Run(j)
    }
}

impl From<AbortJob> for In<Actix> {
    fn from(a: AbortJob) -> Self {
        In::Abort(a.drv_path)
    }
}
