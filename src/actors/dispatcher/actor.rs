//! The dispatcher actor: the thin adapter around [`Dispatcher`]. Steps announce themselves runnable,
//! machines join and free slots; assignments go to the step, which hands its job to the machine.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::WeakAddr;
use actix::prelude::*;

use super::machine::{Dispatcher, Effect, Event, MachineInfo, RunnableStep};
use crate::actors::env::Env;
use crate::actors::messages::{AbortJob, Assigned, NoMachine, RunJob};
use crate::actors::step::actor::StepActor;

#[derive(Message)]
#[rtype(result = "()")]
pub struct Runnable {
    pub step: RunnableStep,
    pub addr: WeakAddr<StepActor>,
}

/// The step left the queue (abandoned or cancelled).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StepLeft(pub String);

#[derive(Message)]
#[rtype(result = "()")]
pub struct MachineJoined {
    pub info: MachineInfo,
    pub runner: Recipient<RunJob>,
    pub abort: Option<Recipient<AbortJob>>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct MachineLeft(pub String);

#[derive(Message)]
#[rtype(result = "()")]
pub struct SlotFreed(pub String);

/// Jobset shares changed or time was used.
#[derive(Message)]
#[rtype(result = "()")]
pub struct JobsetUsage {
    pub jobset: String,
    pub shares: Option<u32>,
    pub seconds: f64,
}

/// Snapshot for status pages and benchmarks.
#[derive(Message)]
#[rtype(result = "DispatchStatus")]
pub struct GetStatus;

#[derive(Debug, Clone, Default, MessageResponse)]
pub struct DispatchStatus {
    pub runnable: usize,
    pub per_system: std::collections::BTreeMap<String, usize>,
    /// Time spent deciding, per `Runnable`/`SlotFreed` handled (nanoseconds), most recent last.
    pub decision_ns: Vec<u64>,
}

pub struct DispatcherActor {
    env: Arc<Env>,
    logic: Dispatcher,
    steps: HashMap<String, WeakAddr<StepActor>>,
    runners: HashMap<String, (Recipient<RunJob>, Option<Recipient<AbortJob>>)>,
    start: Instant,
    decision_ns: Vec<u64>,
}

impl DispatcherActor {
    pub fn new(env: Arc<Env>, unsupported_wait: Duration) -> Self {
        DispatcherActor {
            env,
            logic: Dispatcher::new(unsupported_wait),
            steps: HashMap::new(),
            runners: HashMap::new(),
            start: Instant::now(),
            decision_ns: Vec::new(),
        }
    }

    fn feed(&mut self, ev: Event) {
        let mut events = std::collections::VecDeque::from([ev]);
        while let Some(ev) = events.pop_front() {
            let timed = matches!(ev, Event::Runnable(_) | Event::SlotFreed(_));
            let t = Instant::now();
            let effects = self.logic.on(ev);
            if timed && self.decision_ns.len() < 1_000_000 {
                self.decision_ns.push(t.elapsed().as_nanos() as u64);
            }
            self.perform(effects, &mut events);
        }
    }

    fn perform(&mut self, effects: Vec<Effect>, events: &mut std::collections::VecDeque<Event>) {
        for e in effects {
            match e {
                Effect::Assign { drv, machine } => {
                    let step = self.steps.remove(&drv).and_then(|w| w.upgrade());
                    match (step, self.runners.get(&machine)) {
                        (Some(step), Some((runner, abort))) => {
                            tracing::debug!(drv = %drv, machine = %machine, "assigned");
                            step.do_send(Assigned {
                                machine,
                                runner: runner.clone(),
                                abort: abort.clone(),
                            });
                        }
                        _ => {
                            // The step is gone: the slot is free again.
                            events.push_back(Event::SlotFreed(machine));
                        }
                    }
                }
                Effect::Unsupported { drv } => {
                    if let Some(step) = self.steps.remove(&drv).and_then(|w| w.upgrade()) {
                        tracing::warn!(drv = %drv, "no machine supports this step");
                        step.do_send(NoMachine(
                            "no machine supports this step's system and required features".into(),
                        ));
                    }
                }
            }
        }
    }
}

impl Actor for DispatcherActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(Duration::from_secs(1), |act, _| {
            let now = act.start.elapsed().as_millis() as u64;
            act.feed(Event::Tick(now));
        });
    }
}

impl Handler<Runnable> for DispatcherActor {
    type Result = ();
    fn handle(&mut self, msg: Runnable, _: &mut Context<Self>) {
        self.env.probe.runnable(&msg.step.drv);
        self.steps.insert(msg.step.drv.clone(), msg.addr);
        self.feed(Event::Runnable(msg.step));
    }
}

impl Handler<StepLeft> for DispatcherActor {
    type Result = ();
    fn handle(&mut self, msg: StepLeft, _: &mut Context<Self>) {
        self.steps.remove(&msg.0);
        self.feed(Event::Removed(msg.0));
    }
}

impl Handler<MachineJoined> for DispatcherActor {
    type Result = ();
    fn handle(&mut self, msg: MachineJoined, _: &mut Context<Self>) {
        tracing::info!(machine = %msg.info.id, systems = ?msg.info.systems, jobs = msg.info.max_jobs, "machine joined");
        self.runners
            .insert(msg.info.id.clone(), (msg.runner, msg.abort));
        self.feed(Event::MachineJoined(msg.info));
    }
}

impl Handler<MachineLeft> for DispatcherActor {
    type Result = ();
    fn handle(&mut self, msg: MachineLeft, _: &mut Context<Self>) {
        self.runners.remove(&msg.0);
        self.feed(Event::MachineLeft(msg.0));
    }
}

impl Handler<SlotFreed> for DispatcherActor {
    type Result = ();
    fn handle(&mut self, msg: SlotFreed, _: &mut Context<Self>) {
        self.feed(Event::SlotFreed(msg.0));
    }
}

impl Handler<JobsetUsage> for DispatcherActor {
    type Result = ();
    fn handle(&mut self, msg: JobsetUsage, _: &mut Context<Self>) {
        if let Some(shares) = msg.shares {
            self.feed(Event::JobsetShares {
                jobset: msg.jobset.clone(),
                shares,
            });
        }
        if msg.seconds > 0.0 {
            self.feed(Event::JobsetUsed {
                jobset: msg.jobset,
                seconds: msg.seconds,
            });
        }
    }
}

impl Handler<GetStatus> for DispatcherActor {
    type Result = DispatchStatus;
    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> DispatchStatus {
        let _ = &self.env;
        DispatchStatus {
            runnable: self.logic.runnable(),
            per_system: self.logic.runnable_per_system(),
            decision_ns: self.decision_ns.clone(),
        }
    }
}
