//! The port between a machine actor and whatever really builds: the native executor, a Nix
//! executor, or the simulated zero-time builder of the benchmarks.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::actors::types::{Outputs, Status};
use crate::store::Derivation;

/// One build to run: a resolved (or input-addressed) derivation with no input drvs left to build.
#[derive(Clone, Debug)]
pub struct Job {
    pub drv_path: String,
    pub drv: Arc<Derivation>,
    pub max_silent: Duration,
    pub timeout: Duration,
    /// The step row this run is for (names its log).
    pub attempt: Option<crate::builder::logs::Attempt>,
}

/// Why a job produced no outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecFailure {
    pub status: Status,
    pub message: String,
    /// Worth retrying (the machine or the I/O failed), as opposed to the builder's own failure.
    pub transient: bool,
}

/// A successful job.
#[derive(Clone, Debug, PartialEq)]
pub struct Built {
    /// Output name → store path, registered in the store.
    pub outputs: Outputs,
    /// False when every output was already valid, so nothing was executed.
    pub ran: bool,
}

#[async_trait]
pub trait Executor: Send + Sync + 'static {
    async fn execute(&self, job: Job) -> Result<Built, ExecFailure>;
}
