//! Messages to a step, as the events its core takes.

use super::core::In;
use super::slot::Deliver;
use super::wiring::{Actix, AddWaiter, JobRoute};
use crate::actors::messages::{
    AddBuilds, AdoptRow, Assigned, JobDone, NoMachine, OutputsLanded, RemoveWaiter, StepFailed,
};

/// An event queued for the step while it was dormant, delivered after it woke.
impl From<Deliver<In<Actix>>> for In<Actix> {
    fn from(m: Deliver<In<Actix>>) -> Self {
        m.0
    }
}

impl From<OutputsLanded> for In<Actix> {
    fn from(m: OutputsLanded) -> Self {
        In::Landed {
            from: m.from,
            outputs: m.outputs,
        }
    }
}

impl From<StepFailed> for In<Actix> {
    fn from(m: StepFailed) -> Self {
        In::Failed {
            from: m.from,
            failure: m.failure,
        }
    }
}

impl From<AddWaiter> for In<Actix> {
    fn from(m: AddWaiter) -> Self {
        In::WaiterAdded(m.0)
    }
}

impl From<RemoveWaiter> for In<Actix> {
    fn from(m: RemoveWaiter) -> Self {
        In::WaiterRemoved(m.0)
    }
}

impl From<AddBuilds> for In<Actix> {
    fn from(m: AddBuilds) -> Self {
        In::BuildsAdded(m.0)
    }
}

impl From<AdoptRow> for In<Actix> {
    fn from(m: AdoptRow) -> Self {
        In::RowAdopted((m.build, m.stepnr))
    }
}

impl From<Assigned> for In<Actix> {
    fn from(m: Assigned) -> Self {
        In::Assigned {
            machine: m.machine,
            held: m.held,
            job: JobRoute {
                runner: m.runner,
                abort: m.abort,
            },
        }
    }
}

impl From<JobDone> for In<Actix> {
    fn from(m: JobDone) -> Self {
        In::JobDone(m.0)
    }
}

impl From<NoMachine> for In<Actix> {
    fn from(m: NoMachine) -> Self {
        In::NoMachine(m.0)
    }
}
