//! The in-process builder as a complete machine: which jobs run, and which end frees a slot.
//! A job ends once: it finishes (its outcome goes to its step, then the slot is given back) or it
//! is aborted (killed, the slot given back, its outcome never reported), whichever comes first.
//! Generic over the runtime's handles ([`Routes`]) so its tests need no actix.

use std::collections::{HashMap, VecDeque};

use crate::actors::step::BuildOutcome;

/// The runtime's handles.
pub trait Routes: 'static {
    /// A job as the step sent it.
    type Job;
    /// Where a job's outcome goes.
    type Step;
    /// A running job (dropping or cancelling it kills its builder).
    type Running;
}

/// What the machine takes.
pub enum In<R: Routes> {
    Start,
    /// A step's job for this machine.
    Run(R::Job),
    /// The job began running.
    Running {
        drv: String,
        handle: R::Running,
    },
    /// The job ended with this outcome, for this step.
    Finished {
        drv: String,
        outcome: BuildOutcome,
        to: R::Step,
    },
    /// The step no longer wants its build.
    Abort(String),
}

/// What the machine does.
pub enum Cmd<R: Routes> {
    /// Tell the dispatcher the machine is here (and its slots).
    Join,
    /// Run the job (answered with [`In::Running`], then [`In::Finished`]).
    Execute(R::Job),
    /// Kill a running job.
    Kill { drv: String, handle: R::Running },
    /// The outcome to the step.
    Report { to: R::Step, outcome: BuildOutcome },
    /// One slot is free again.
    FreeSlot,
}

pub struct LocalCore<R: Routes> {
    running: HashMap<String, R::Running>,
    ready: VecDeque<Cmd<R>>,
}

impl<R: Routes> Default for LocalCore<R> {
    fn default() -> Self {
        LocalCore {
            running: HashMap::new(),
            ready: VecDeque::new(),
        }
    }
}

impl<R: Routes> LocalCore<R> {
    pub fn poll(&mut self) -> Option<Cmd<R>> {
        self.ready.pop_front()
    }

    /// Jobs running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn on(&mut self, ev: In<R>) {
        match ev {
            In::Start => self.ready.push_back(Cmd::Join),
            In::Run(job) => self.ready.push_back(Cmd::Execute(job)),
            In::Running { drv, handle } => {
                self.running.insert(drv, handle);
            }
            In::Finished { drv, outcome, to } => {
                // An aborted job's end is not reported: its slot was given back at the abort.
                if self.running.remove(&drv).is_some() {
                    self.ready.push_back(Cmd::Report { to, outcome });
                    self.ready.push_back(Cmd::FreeSlot);
                }
            }
            In::Abort(drv) => {
                if let Some(handle) = self.running.remove(&drv) {
                    self.ready.push_back(Cmd::Kill { drv, handle });
                    self.ready.push_back(Cmd::FreeSlot);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::types::Outputs;

    struct Names;
    impl Routes for Names {
        type Job = &'static str;
        type Step = &'static str;
        type Running = u32;
    }

    fn drain(c: &mut LocalCore<Names>) -> Vec<String> {
        std::iter::from_fn(|| c.poll())
            .map(|c| match c {
                Cmd::Join => "join".to_string(),
                Cmd::Execute(j) => format!("execute {j}"),
                Cmd::Kill { drv, handle } => format!("kill {drv} {handle}"),
                Cmd::Report { to, .. } => format!("report to {to}"),
                Cmd::FreeSlot => "free".to_string(),
            })
            .collect()
    }

    fn finished(drv: &str) -> In<Names> {
        In::Finished {
            drv: drv.into(),
            outcome: BuildOutcome::Built(Outputs::new()),
            to: "step",
        }
    }

    #[test]
    fn a_finished_job_is_reported_before_its_slot_is_freed() {
        let mut c = LocalCore::<Names>::default();
        c.on(In::Start);
        c.on(In::Run("job a"));
        c.on(In::Running {
            drv: "a".into(),
            handle: 1,
        });
        assert_eq!(drain(&mut c), ["join", "execute job a"]);
        assert_eq!(c.running(), 1);
        c.on(finished("a"));
        assert_eq!(drain(&mut c), ["report to step", "free"]);
        assert_eq!(c.running(), 0);
    }

    #[test]
    fn an_aborted_job_frees_its_slot_once_and_its_late_end_is_not_reported() {
        let mut c = LocalCore::<Names>::default();
        c.on(In::Running {
            drv: "a".into(),
            handle: 7,
        });
        c.on(In::Abort("a".into()));
        assert_eq!(drain(&mut c), ["kill a 7", "free"]);
        c.on(finished("a"));
        c.on(In::Abort("a".into()));
        assert!(drain(&mut c).is_empty());
    }

    #[test]
    fn aborting_a_job_that_ended_does_nothing() {
        let mut c = LocalCore::<Names>::default();
        c.on(In::Running {
            drv: "a".into(),
            handle: 1,
        });
        c.on(finished("a"));
        drain(&mut c);
        c.on(In::Abort("a".into()));
        assert!(drain(&mut c).is_empty());
    }
}
