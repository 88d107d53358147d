//! Messages between actors.

use std::sync::Arc;

use actix::{Message, Recipient, WeakRecipient};

use crate::actors::limits::{BuildLimits, Needing};
use crate::actors::step::machine::BuildOutcome;
use crate::actors::types::{Drv, Failure, Outputs, Waiter};
use crate::store::Derivation;

/// A step's outputs landed: output name → store path (its realisations).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct OutputsLanded {
    pub from: Drv,
    pub outputs: Outputs,
}

/// A step failed (or a dependency of it did).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct StepFailed {
    pub from: Drv,
    pub failure: Failure,
}

/// Where a build stands in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPrio {
    pub global_priority: i32,
    pub local_priority: i32,
    /// Shared by every step the build needs (one allocation per build, not per step).
    pub jobset: Arc<str>,
    /// The build's job in its jobset (shared likewise): the steps' expected durations fall back
    /// on the job's history (`graph::durations`).
    pub job: Arc<str>,
    /// The build's top-level drv (shared likewise) and its own limits: see
    /// [`limits::choose`](crate::actors::limits::choose).
    pub top: Arc<str>,
    pub limits: BuildLimits,
}

impl BuildPrio {
    /// The key the build's job's step durations are kept under (jobs are named within their
    /// jobset): `jobset/job`.
    pub fn job_key(&self) -> String {
        job_key(&self.jobset, &self.job)
    }
}

/// The key a job's step durations are kept under: `jobset/job`.
pub fn job_key(jobset: &str, job: &str) -> String {
    format!("{jobset}/{job}")
}

impl Needing for (i64, BuildPrio) {
    fn top(&self) -> &str {
        &self.1.top
    }
    fn limits(&self) -> BuildLimits {
        self.1.limits
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveWaiter(pub Waiter);

/// These builds need the step (and so everything below it).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct AddBuilds(pub Vec<(i64, BuildPrio)>);

/// A step row created for this step elsewhere (the resolved row of a resolution), still pending.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct AdoptRow {
    pub build: i64,
    pub stepnr: i32,
}

/// A job for a machine.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct RunJob {
    pub drv_path: String,
    /// `None`: the machine reads the derivation from the store.
    pub drv: Option<Arc<Derivation>>,
    /// Where the outcome goes (the step, weakly).
    pub step: WeakRecipient<JobDone>,
    pub max_silent: std::time::Duration,
    pub timeout: std::time::Duration,
    /// The step row (build, step number) this run is recorded in: its log is named for it.
    pub attempt: Option<crate::builder::logs::Attempt>,
}

/// Stop a machine's job (the build is no longer wanted): its builder is killed, its slot freed.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct AbortJob {
    pub drv_path: String,
}

/// The dispatcher gave the step a machine slot.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Assigned {
    pub machine: String,
    /// The machine holds a build of the drv already (from before a restart or a reconnection):
    /// the step adopts it.
    pub held: bool,
    pub runner: Recipient<RunJob>,
    pub abort: Option<Recipient<AbortJob>>,
}

/// A machine finished (or lost) the step's job.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct JobDone(pub BuildOutcome);

/// Cancel a build.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct CancelBuild;

/// Change a build's global priority.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct BumpBuild(pub i32);

/// No machine supports the step (after the configured wait).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct NoMachine(pub String);

/// How the dispatcher answers a runnable step (weakly: the step may be gone).
#[derive(Clone, Debug)]
pub struct StepHandle {
    pub assigned: WeakRecipient<Assigned>,
    pub no_machine: WeakRecipient<NoMachine>,
}
