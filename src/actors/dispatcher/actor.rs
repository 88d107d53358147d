//! The dispatcher actor: the thin adapter around [`Dispatcher`]. Steps announce themselves runnable,
//! machines join and free slots; assignments go to the step, which hands its job to the machine.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::machine::{Dispatcher, Effect, Event, MachineInfo, RunnableStep};
use crate::actors::env::{Env, SchedEvent};
use crate::actors::introspect::{ActorCell, ActorKind};
use crate::actors::messages::{AbortJob, Assigned, NoMachine, RunJob, StepHandle};

#[derive(Message)]
#[rtype(result = "()")]
pub struct Runnable {
    pub step: RunnableStep,
    pub addr: StepHandle,
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

/// The builds a machine still holds (drv paths), sent before its `MachineJoined`: their steps are
/// assigned to it when runnable (adopted, not built again).
#[derive(Message)]
#[rtype(result = "()")]
pub struct MachineHolds {
    pub machine: String,
    pub drvs: std::collections::BTreeSet<String>,
}

/// After a restart: keep this step for `machine` (it was building it) until the machine rejoins
/// or `wait` passes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reserve {
    pub drv: String,
    pub machine: String,
    pub wait: Duration,
}

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
    steps: HashMap<String, StepHandle>,
    runners: HashMap<String, (Recipient<RunJob>, Option<Recipient<AbortJob>>)>,
    start: Instant,
    decision_ns: Vec<u64>,
    cell: Arc<ActorCell>,
}

impl DispatcherActor {
    pub fn new(env: Arc<Env>, unsupported_wait: Duration) -> Self {
        let cell = env
            .actors
            .register("dispatcher", ActorKind::Dispatcher, env.now());
        cell.set_state("dispatching");
        DispatcherActor {
            env,
            cell,
            logic: Dispatcher::new(unsupported_wait),
            steps: HashMap::new(),
            runners: HashMap::new(),
            start: Instant::now(),
            decision_ns: Vec::new(),
        }
    }

    fn feed(&mut self, ev: Event) {
        self.cell.handled();
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
                Effect::Assign { drv, machine, held } => {
                    let step = self.steps.remove(&drv).and_then(|h| h.assigned.upgrade());
                    match (step, self.runners.get(&machine)) {
                        (Some(step), Some((runner, abort))) => {
                            tracing::debug!(drv = %drv, machine = %machine, held, "assigned");
                            step.do_send(Assigned {
                                machine,
                                held,
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
                    if let Some(step) = self.steps.remove(&drv).and_then(|h| h.no_machine.upgrade())
                    {
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

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.env.actors.unregister(&self.cell);
    }

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
        self.env.emit(SchedEvent::MachineJoined {
            machine: msg.info.id.clone(),
        });
        self.feed(Event::MachineJoined(msg.info));
    }
}

impl Handler<MachineLeft> for DispatcherActor {
    type Result = ();
    fn handle(&mut self, msg: MachineLeft, _: &mut Context<Self>) {
        self.runners.remove(&msg.0);
        self.env.emit(SchedEvent::MachineLeft {
            machine: msg.0.clone(),
        });
        self.feed(Event::MachineLeft(msg.0));
    }
}

impl Handler<MachineHolds> for DispatcherActor {
    type Result = ();
    fn handle(&mut self, msg: MachineHolds, _: &mut Context<Self>) {
        self.feed(Event::Holds {
            machine: msg.machine,
            drvs: msg.drvs,
        });
    }
}

impl Handler<Reserve> for DispatcherActor {
    type Result = ();
    fn handle(&mut self, msg: Reserve, _: &mut Context<Self>) {
        self.feed(Event::Reserve {
            drv: msg.drv,
            machine: msg.machine,
            wait_ms: msg.wait.as_millis() as u64,
        });
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

/// An operator enables or disables (drains) a machine. Answers whether the machine is known.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct SetMachineEnabled {
    pub machine: String,
    pub enabled: bool,
}

impl Handler<SetMachineEnabled> for DispatcherActor {
    type Result = bool;
    fn handle(&mut self, msg: SetMachineEnabled, _: &mut Context<Self>) -> bool {
        let known = self.runners.contains_key(&msg.machine);
        if known {
            tracing::info!(machine = %msg.machine, enabled = msg.enabled, "machine enabled changed by an operator");
            self.feed(Event::SetEnabled {
                machine: msg.machine,
                enabled: msg.enabled,
            });
        }
        known
    }
}

/// The machines as the dispatcher sees them.
#[derive(Message)]
#[rtype(result = "Vec<super::machine::MachineView>")]
pub struct GetMachines;

impl Handler<GetMachines> for DispatcherActor {
    type Result = MessageResult<GetMachines>;
    fn handle(&mut self, _: GetMachines, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.logic.machines())
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
