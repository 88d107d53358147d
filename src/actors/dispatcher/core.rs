//! The dispatcher as a complete machine: [`Dispatcher`]'s queue and slot decisions, plus the
//! addresses it answers through (a runnable step's, a machine's) and what becomes of an assignment
//! whose step is gone. Generic over the addresses ([`Routes`]) so its tests need no actix; the
//! actor ([`super::actor`]) only performs the commands.

use std::collections::{BTreeSet, HashMap, VecDeque};

use super::machine::{Dispatcher, Effect, Event, MachineInfo, RunnableStep};

/// The addresses the dispatcher answers through.
pub trait Routes: 'static {
    /// A runnable step's.
    type Step;
    /// A machine's (where its jobs go).
    type Runner: Clone;
}

/// What the dispatcher takes.
pub enum In<R: Routes> {
    /// The actor started: time begins to pass.
    Start,
    Runnable {
        step: RunnableStep,
        addr: R::Step,
    },
    /// The step left the queue (abandoned or cancelled).
    StepLeft(String),
    /// Steps' remaining critical paths changed (ms).
    CriticalPaths(Vec<(String, u64)>),
    MachineJoined {
        info: MachineInfo,
        runner: R::Runner,
    },
    MachineLeft(String),
    SlotFreed(String),
    /// The builds a machine still holds (see [`Event::Holds`]).
    Holds {
        machine: String,
        drvs: BTreeSet<String>,
    },
    /// After a restart: keep the step for `machine` (see [`Event::Reserve`]).
    Reserve {
        drv: String,
        machine: String,
        wait_ms: u64,
    },
    /// Jobset shares changed, or time was used.
    JobsetUsage {
        jobset: String,
        shares: Option<u32>,
        seconds: f64,
    },
    /// An operator enables or disables (drains) a machine; ignored for an unknown one.
    SetEnabled {
        machine: String,
        enabled: bool,
    },
    /// Milliseconds since the start.
    Tick(u64),
    /// An assignment reached no step (it was gone): the slot it took is free again.
    StepGone {
        machine: String,
    },
}

/// What the dispatcher has done.
#[derive(Debug, PartialEq)]
pub enum Cmd<R: Routes> {
    /// Start the clock: [`In::Tick`] every second.
    StartClock,
    /// A step entered the queue (for the benchmark's probe).
    Queued(String),
    /// The step goes to the machine; an unreachable step is answered with [`In::StepGone`].
    Assign {
        to: R::Step,
        runner: R::Runner,
        drv: String,
        machine: String,
        held: bool,
    },
    /// No machine supports the step.
    NoMachine {
        to: R::Step,
        drv: String,
    },
    /// For the watchers (and the log).
    Joined(MachineInfo),
    Left(String),
}

/// The dispatcher's whole state.
pub struct DispatchCore<R: Routes> {
    logic: Dispatcher,
    steps: HashMap<String, R::Step>,
    runners: HashMap<String, R::Runner>,
    ready: VecDeque<Cmd<R>>,
}

impl<R: Routes> DispatchCore<R> {
    pub fn new(logic: Dispatcher) -> Self {
        DispatchCore {
            logic,
            steps: HashMap::new(),
            runners: HashMap::new(),
            ready: VecDeque::new(),
        }
    }

    /// The queue and machines, for status pages.
    pub fn logic(&self) -> &Dispatcher {
        &self.logic
    }

    /// Whether `machine` is connected.
    pub fn knows(&self, machine: &str) -> bool {
        self.runners.contains_key(machine)
    }

    /// The next command, in the order the events led to them.
    pub fn poll(&mut self) -> Option<Cmd<R>> {
        self.ready.pop_front()
    }

    pub fn on(&mut self, ev: In<R>) {
        match ev {
            In::Start => self.ready.push_back(Cmd::StartClock),
            In::Runnable { step, addr } => {
                self.ready.push_back(Cmd::Queued(step.drv.clone()));
                self.steps.insert(step.drv.clone(), addr);
                self.decide(Event::Runnable(step));
            }
            In::StepLeft(drv) => {
                self.steps.remove(&drv);
                self.decide(Event::Removed(drv));
            }
            In::CriticalPaths(changes) => self.decide(Event::CriticalPaths(changes)),
            In::MachineJoined { info, runner } => {
                self.runners.insert(info.id.clone(), runner);
                self.ready.push_back(Cmd::Joined(info.clone()));
                self.decide(Event::MachineJoined(info));
            }
            In::MachineLeft(id) => {
                self.runners.remove(&id);
                self.ready.push_back(Cmd::Left(id.clone()));
                self.decide(Event::MachineLeft(id));
            }
            In::SlotFreed(id) | In::StepGone { machine: id } => self.decide(Event::SlotFreed(id)),
            In::Holds { machine, drvs } => self.decide(Event::Holds { machine, drvs }),
            In::Reserve {
                drv,
                machine,
                wait_ms,
            } => self.decide(Event::Reserve {
                drv,
                machine,
                wait_ms,
            }),
            In::JobsetUsage {
                jobset,
                shares,
                seconds,
            } => {
                if let Some(shares) = shares {
                    self.decide(Event::JobsetShares {
                        jobset: jobset.clone(),
                        shares,
                    });
                }
                if seconds > 0.0 {
                    self.decide(Event::JobsetUsed { jobset, seconds });
                }
            }
            In::SetEnabled { machine, enabled } => {
                if self.knows(&machine) {
                    self.decide(Event::SetEnabled { machine, enabled });
                }
            }
            In::Tick(ms) => self.decide(Event::Tick(ms)),
        }
    }

    /// The queue decides; its effects become commands to the addresses they name. An
    /// assignment to a step or machine no longer here gives its slot back at once.
    fn decide(&mut self, ev: Event) {
        let mut events = VecDeque::from([ev]);
        while let Some(ev) = events.pop_front() {
            for effect in self.logic.on(ev) {
                match effect {
                    Effect::Assign { drv, machine, held } => {
                        match (self.steps.remove(&drv), self.runners.get(&machine)) {
                            (Some(to), Some(runner)) => self.ready.push_back(Cmd::Assign {
                                to,
                                runner: runner.clone(),
                                drv,
                                machine,
                                held,
                            }),
                            _ => events.push_back(Event::SlotFreed(machine)),
                        }
                    }
                    Effect::Unsupported { drv } => {
                        if let Some(to) = self.steps.remove(&drv) {
                            self.ready.push_back(Cmd::NoMachine { to, drv });
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
