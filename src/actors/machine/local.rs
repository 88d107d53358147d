//! The in-process local builder: a machine actor running jobs on an [`Executor`] with a fixed number
//! of slots (the dispatcher counts them).

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use super::executor::{Executor, Job};
use crate::actors::dispatcher::MachineInfo;
use crate::actors::dispatcher::actor::{DispatcherActor, MachineJoined, SlotFreed};
use crate::actors::env::Env;
use crate::actors::messages::{AbortJob, JobDone, RunJob};
use crate::actors::step::BuildOutcome;

pub struct LocalMachine {
    env: Arc<Env>,
    info: MachineInfo,
    executor: Arc<dyn Executor>,
    dispatcher: Addr<DispatcherActor>,
    /// Running jobs by drv path (dropping a job's future kills its builder).
    running: HashMap<String, SpawnHandle>,
}

impl LocalMachine {
    pub fn new(
        env: Arc<Env>,
        info: MachineInfo,
        executor: Arc<dyn Executor>,
        dispatcher: Addr<DispatcherActor>,
    ) -> Self {
        LocalMachine {
            env,
            info,
            executor,
            dispatcher,
            running: HashMap::new(),
        }
    }
}

impl Actor for LocalMachine {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.env.heartbeat(&self.info.id, None, true);
        self.dispatcher.do_send(MachineJoined {
            info: self.info.clone(),
            runner: ctx.address().recipient(),
            abort: Some(ctx.address().recipient()),
        });
    }
}

impl Handler<RunJob> for LocalMachine {
    type Result = ();
    fn handle(&mut self, msg: RunJob, ctx: &mut Context<Self>) {
        let env = self.env.clone();
        let executor = self.executor.clone();
        let dispatcher = self.dispatcher.clone();
        let machine = self.info.id.clone();
        let (drv, max_silent, timeout, attempt) =
            (msg.drv, msg.max_silent, msg.timeout, msg.attempt);
        let step = msg.step;
        let drv_path = msg.drv_path;
        let key = drv_path.clone();
        let io = self.env.clone();
        let mut timer = crate::metrics::global().machine(&machine).job();
        let handle = ctx.spawn(
            io.offload(async move {
                let drv = match drv {
                    Some(d) => Ok(d),
                    None => env.store.read_derivation(&drv_path).await.map(Arc::new).map_err(|e| {
                        crate::actors::machine::ExecFailure {
                            status: crate::actors::types::Status::Aborted,
                            message: format!("cannot read {drv_path}: {e}"),
                            transient: true,
                        }
                    }),
                };
                timer.phase(crate::metrics::Phase::Building);
                let run = match drv {
                    Ok(drv) => executor.execute(Job { drv_path: drv_path.clone(), drv, max_silent, timeout, attempt }).await,
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
                        BuildOutcome::Failed { status: f.status, message: f.message, transient: f.transient }
                    }
                };
                if let Some(step) = step.upgrade() {
                    step.do_send(JobDone(outcome));
                }
                dispatcher.do_send(SlotFreed(machine));
                drv_path
            })
            .into_actor(self)
            .map(|drv_path, act, _| {
                act.running.remove(&drv_path);
            }),
        );
        self.running.insert(key, handle);
    }
}

impl Handler<AbortJob> for LocalMachine {
    type Result = ();
    fn handle(&mut self, msg: AbortJob, ctx: &mut Context<Self>) {
        if let Some(h) = self.running.remove(&msg.drv_path) {
            tracing::info!(drv = %msg.drv_path, "aborting the build: no longer wanted");
            ctx.cancel_future(h);
            self.dispatcher.do_send(SlotFreed(self.info.id.clone()));
        }
    }
}
