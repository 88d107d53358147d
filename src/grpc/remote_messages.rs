//! The messages a builder's session actor ([`super::remote_machine::RemoteMachine`]) takes, and
//! the events of [`RemoteCore`](super::remote_core::RemoteCore) each one is. A message stamps the
//! time it arrived where the machine needs it (silence is timed by it).

use std::time::Instant;

use actix::prelude::*;

pub use super::remote_core::UploadPermit;
use super::remote_core::{In, Order};
use super::runner_v1;
use crate::actors::messages::{AbortJob, JobDone, RunJob};
use crate::store::PathInfo;

/// A message the builder sent on its session stream.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromBuilder(pub runner_v1::BuilderMessage);

/// The session stream ended (or broke).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected(pub String);

/// The builder opened a new session: this one ends (its jobs may be adopted by the new one).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Superseded;

/// May this session upload `info` as `output` of `job_id`?
#[derive(Message)]
#[rtype(result = "Result<UploadPermit, String>")]
pub struct CheckUpload {
    pub job_id: String,
    pub output: String,
    pub info: PathInfo,
}

/// An upload was checked and registered (or the path was valid already).
#[derive(Message)]
#[rtype(result = "()")]
pub struct UploadDone {
    pub job_id: String,
    pub output: String,
    pub info: PathInfo,
}

/// Something the builder sent broke the protocol (seen by the service): refuse the builder.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Refuse(pub String);

/// The step attempt job `0` of this session is for (names the log the builder streams up).
#[derive(Message)]
#[rtype(result = "Option<crate::builder::logs::Attempt>")]
pub struct JobAttempt(pub String);

/// Where a job's outcome goes.
pub type StepAddr = actix::WeakRecipient<JobDone>;

impl From<RunJob> for In<StepAddr> {
    fn from(m: RunJob) -> Self {
        In::Run(Order {
            drv_path: m.drv_path,
            drv: m.drv,
            step: m.step,
            max_silent: m.max_silent,
            timeout: m.timeout,
            attempt: m.attempt,
        })
    }
}

impl From<AbortJob> for In<StepAddr> {
    fn from(m: AbortJob) -> Self {
        In::Abort(m.drv_path)
    }
}

impl From<FromBuilder> for In<StepAddr> {
    fn from(m: FromBuilder) -> Self {
        In::FromBuilder {
            msg: m.0,
            at: Instant::now(),
        }
    }
}

impl From<Disconnected> for In<StepAddr> {
    fn from(m: Disconnected) -> Self {
        In::Disconnected(m.0)
    }
}

impl From<Superseded> for In<StepAddr> {
    fn from(_: Superseded) -> Self {
        In::Superseded
    }
}

impl From<UploadDone> for In<StepAddr> {
    fn from(m: UploadDone) -> Self {
        In::UploadDone {
            job_id: m.job_id,
            output: m.output,
            info: m.info,
        }
    }
}

impl From<Refuse> for In<StepAddr> {
    fn from(m: Refuse) -> Self {
        In::Refuse(m.0)
    }
}
