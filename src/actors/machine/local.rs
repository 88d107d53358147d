//! The in-process local builder: a machine actor running jobs on an [`Executor`] with a fixed number
//! of slots (the dispatcher counts them).

use std::sync::Arc;

use actix::prelude::*;

use super::executor::{Executor, Job};
use crate::actors::dispatcher::MachineInfo;
use crate::actors::dispatcher::actor::{DispatcherActor, MachineJoined, SlotFreed};
use crate::actors::env::Env;
use crate::actors::messages::{JobDone, RunJob};
use crate::actors::step::BuildOutcome;

pub struct LocalMachine {
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
        LocalMachine {
            env,
            info,
            executor,
            dispatcher,
        }
    }
}

impl Actor for LocalMachine {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.dispatcher.do_send(MachineJoined {
            info: self.info.clone(),
            runner: ctx.address().recipient(),
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
        let job = Job {
            drv_path: msg.drv_path.clone(),
            drv: msg.drv,
            max_silent: msg.max_silent,
            timeout: msg.timeout,
        };
        let step = msg.step;
        let drv_path = msg.drv_path;
        ctx.spawn(
            async move {
                let outcome = match executor.execute(job).await {
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
            }
            .into_actor(self),
        );
    }
}
