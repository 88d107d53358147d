//! The dispatcher's messages (what steps, machines, operators and status pages send it) and the
//! events they become.

use std::time::Duration;

use actix::prelude::*;

use super::core::{In, Routes};
use super::machine::{MachineInfo, RunnableStep};
use crate::actors::messages::{AbortJob, RunJob, StepHandle};

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

/// Steps' remaining critical paths changed (ms), from the graph.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CriticalPaths(pub Vec<(String, u64)>);

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

impl From<StepLeft> for In<Actix> {
    fn from(m: StepLeft) -> Self {
        In::StepLeft(m.0)
    }
}

impl From<CriticalPaths> for In<Actix> {
    fn from(m: CriticalPaths) -> Self {
        In::CriticalPaths(m.0)
    }
}

impl From<MachineJoined> for In<Actix> {
    fn from(m: MachineJoined) -> Self {
        In::MachineJoined {
            info: m.info,
            runner: (m.runner, m.abort),
        }
    }
}

impl From<MachineLeft> for In<Actix> {
    fn from(m: MachineLeft) -> Self {
        In::MachineLeft(m.0)
    }
}

impl From<MachineHolds> for In<Actix> {
    fn from(m: MachineHolds) -> Self {
        In::Holds {
            machine: m.machine,
            drvs: m.drvs,
        }
    }
}

impl From<Reserve> for In<Actix> {
    fn from(m: Reserve) -> Self {
        In::Reserve {
            drv: m.drv,
            machine: m.machine,
            wait_ms: m.wait.as_millis() as u64,
        }
    }
}

impl From<JobsetUsage> for In<Actix> {
    fn from(m: JobsetUsage) -> Self {
        In::JobsetUsage {
            jobset: m.jobset,
            shares: m.shares,
            seconds: m.seconds,
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

/// The machines as the dispatcher sees them.
#[derive(Message)]
#[rtype(result = "Vec<super::machine::MachineView>")]
pub struct GetMachines;

/// The actor's addresses: a step's weak handles, a machine's job and abort recipients.
pub struct Actix;

impl Routes for Actix {
    type Step = StepHandle;
    type Runner = (Recipient<RunJob>, Option<Recipient<AbortJob>>);
}
