//! Per-machine counters (Hydra's `machine_*`): jobs, failures, busy time by phase, NAR bytes both
//! ways. A job is timed by a [`JobTimer`] from the moment its machine takes it to its end; a timer
//! dropped before [`JobTimer::finish`] (the job was aborted, or its future cancelled) counts its
//! time and an abort.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use super::{Counter, global};

/// Where a job is, as the runner sees it (Hydra's busy phases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the derivation and listing (for a remote builder, sending) what it needs.
    Preparing = 0,
    /// Running on the machine (on a remote builder this includes its fetching the inputs it
    /// lacks, which the runner does not see apart from the build).
    Building = 1,
    /// Receiving and checking the outputs (remote builders).
    ReceivingOutputs = 2,
}

pub const PHASES: [Phase; 3] = [Phase::Preparing, Phase::Building, Phase::ReceivingOutputs];

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Building => "building",
            Phase::ReceivingOutputs => "receiving_outputs",
        }
    }
}

/// One machine's counters.
#[derive(Debug, Default)]
pub struct MachineCounters {
    pub jobs_started: Counter,
    /// Jobs that ended with an outcome (success or failure; not aborted ones).
    pub jobs_done: Counter,
    pub jobs_failed: Counter,
    /// Jobs the runner aborted (the step was no longer wanted) or lost with the session.
    pub jobs_aborted: Counter,
    /// Microseconds with a job, per job (two jobs at once count twice).
    pub busy_micros: Counter,
    /// Microseconds per [`Phase`].
    pub phase_micros: [Counter; 3],
    /// Failures since the last success.
    pub consecutive_failures: AtomicI64,
    /// Jobs running now.
    pub running: AtomicI64,
    /// Unix milliseconds when the last job ended (0: none yet).
    pub last_job_end_ms: AtomicI64,
    /// NARs (and their bytes) received from the builder: its outputs.
    pub nars_in: Counter,
    pub bytes_in: Counter,
    /// NARs (and their bytes) sent to the builder: the inputs it fetched.
    pub nars_out: Counter,
    pub bytes_out: Counter,
    /// Sessions started (joins and rejoins).
    pub sessions: Counter,
    /// Times the runner refused what it sent (a protocol violation: quarantined).
    pub refusals: Counter,
}

impl MachineCounters {
    /// Starts timing a job, in [`Phase::Preparing`].
    pub fn job(self: &Arc<Self>) -> JobTimer {
        self.jobs_started.inc();
        self.running.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        JobTimer {
            machine: self.clone(),
            started: now,
            phase: Phase::Preparing,
            phase_started: now,
            spent: [Duration::ZERO; 3],
            done: false,
        }
    }
}

/// A job on a machine, timed phase by phase.
#[derive(Debug)]
pub struct JobTimer {
    machine: Arc<MachineCounters>,
    started: Instant,
    phase: Phase,
    phase_started: Instant,
    spent: [Duration; 3],
    done: bool,
}

impl JobTimer {
    /// The job entered `phase` (a phase entered again, or an earlier one, is ignored).
    pub fn phase(&mut self, phase: Phase) {
        if (phase as usize) <= (self.phase as usize) {
            return;
        }
        let now = Instant::now();
        self.spent[self.phase as usize] += now - self.phase_started;
        self.phase = phase;
        self.phase_started = now;
    }

    pub fn phase_is(&self) -> Phase {
        self.phase
    }

    /// The job ended with an outcome: `ok` for a success.
    pub fn finish(mut self, ok: bool) {
        self.end(Some(ok));
    }

    fn end(&mut self, ok: Option<bool>) {
        if self.done {
            return;
        }
        self.done = true;
        let now = Instant::now();
        self.spent[self.phase as usize] += now - self.phase_started;
        let m = &self.machine;
        let total = now - self.started;
        m.busy_micros.add_duration(total);
        let steps = &global().steps;
        for p in PHASES {
            let d = self.spent[p as usize];
            m.phase_micros[p as usize].add_duration(d);
            if !d.is_zero() || p == Phase::Building {
                steps.phase(p.as_str()).observe_duration(d);
            }
        }
        steps.phase("total").observe_duration(total);
        match ok {
            Some(true) => {
                m.jobs_done.inc();
                m.consecutive_failures.store(0, Ordering::Relaxed);
            }
            Some(false) => {
                m.jobs_done.inc();
                m.jobs_failed.inc();
                m.consecutive_failures.fetch_add(1, Ordering::Relaxed);
            }
            None => m.jobs_aborted.inc(),
        }
        m.running.fetch_sub(1, Ordering::Relaxed);
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        m.last_job_end_ms.store(unix_ms, Ordering::Relaxed);
    }
}

impl Drop for JobTimer {
    fn drop(&mut self) {
        self.end(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_counts_its_phases_and_its_end() {
        let m = Arc::new(MachineCounters::default());
        let mut j = m.job();
        assert_eq!(m.running.load(Ordering::Relaxed), 1);
        std::thread::sleep(Duration::from_millis(2));
        j.phase(Phase::Building);
        std::thread::sleep(Duration::from_millis(2));
        j.phase(Phase::Preparing); // ignored: earlier
        assert_eq!(j.phase_is(), Phase::Building);
        j.finish(false);
        assert_eq!(m.running.load(Ordering::Relaxed), 0);
        assert_eq!((m.jobs_done.get(), m.jobs_failed.get()), (1, 1));
        assert_eq!(m.consecutive_failures.load(Ordering::Relaxed), 1);
        assert!(m.phase_micros[Phase::Preparing as usize].get() >= 2000);
        assert!(m.phase_micros[Phase::Building as usize].get() >= 2000);
        assert_eq!(m.phase_micros[Phase::ReceivingOutputs as usize].get(), 0);
        assert!(m.busy_micros.get() >= 4000);
        assert!(m.last_job_end_ms.load(Ordering::Relaxed) > 0);
        // A success resets the failure streak; a dropped timer is an abort.
        m.job().finish(true);
        assert_eq!(m.consecutive_failures.load(Ordering::Relaxed), 0);
        drop(m.job());
        assert_eq!(
            (
                m.jobs_started.get(),
                m.jobs_done.get(),
                m.jobs_aborted.get()
            ),
            (3, 2, 1)
        );
        assert_eq!(m.running.load(Ordering::Relaxed), 0);
    }
}
