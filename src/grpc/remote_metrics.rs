//! A builder session's metrics: what the machine's [`Note`]s mean for its counters (Hydra's
//! `machine_*`) and for the per-job phase timers, kept by job id.

use std::collections::HashMap;
use std::sync::Arc;

use super::remote_core::Note;
use crate::metrics::{JobTimer, MachineCounters, Phase};

/// One session's counters and the timers of its jobs in flight.
pub struct RemoteMetrics {
    counters: Arc<MachineCounters>,
    timers: HashMap<String, JobTimer>,
}

impl RemoteMetrics {
    pub fn new(machine: &str) -> Self {
        let counters = crate::metrics::global().machine(machine);
        RemoteMetrics {
            counters,
            timers: HashMap::new(),
        }
    }

    /// Feeds the machine's metrics.
    pub fn note(&mut self, note: Note) {
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
