//! Vocabulary shared by the actors: outputs, failures and who waits on whom.

use std::collections::BTreeMap;
use std::sync::Arc;

/// A drv path shared by everything that names one step: the registry's key, the step itself, its
/// waiters' and dependents' lists, the introspection cells. One allocation per step instead of a
/// copy per reference (a layered graph names each step from several places).
pub type Drv = Arc<str>;

/// Output name → store path, as carried by `OutputsLanded`.
pub type Outputs = BTreeMap<String, String>;

/// Hydra's build and step status codes (the database's own enum).
pub use crate::db::types::BuildStatus as Status;

/// Something that waits for a step's outputs: a dependent step (by drv path) or a build.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Waiter {
    Step(Drv),
    Build(i64),
}

/// How a waiter is held: by its key alone (unit tests of the machines) or with its address (the
/// actors). Lists of waiters are sorted by key.
pub trait WaiterRef: Clone + std::fmt::Debug {
    fn key(&self) -> Waiter;
    /// How this waiter's key orders against `w` (as `self.key().cmp(w)`, without the clone).
    fn cmp_key(&self, w: &Waiter) -> std::cmp::Ordering;
}

impl WaiterRef for Waiter {
    fn key(&self) -> Waiter {
        self.clone()
    }

    fn cmp_key(&self, w: &Waiter) -> std::cmp::Ordering {
        self.cmp(w)
    }
}

/// Why a step did not produce outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: Status,
    /// The drv whose own failure this is, when it is propagated from a dependency.
    pub propagated_from: Option<String>,
    pub message: String,
    /// Where the failing step recorded its own failure; every other build that receives the
    /// failure records a row pointing there (as Hydra does for a failed step's dependents).
    /// Boxed: rarely set, and it would more than double the size of every step's phase.
    pub origin: Option<Box<FailureOrigin>>,
}

/// The failing step's own row: its drv, system, status and message, and the build it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureOrigin {
    pub drv: String,
    pub system: String,
    pub status: Status,
    pub message: String,
    pub build: i64,
}

impl Failure {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Failure {
            status,
            propagated_from: None,
            message: message.into(),
            origin: None,
        }
    }

    /// The failure a dependent sees: DepFailed, pointing at the step that really failed.
    pub fn propagate(&self, failed_drv: &str) -> Failure {
        Failure {
            status: Status::DepFailed,
            propagated_from: Some(
                self.propagated_from
                    .clone()
                    .unwrap_or_else(|| failed_drv.to_string()),
            ),
            message: match &self.propagated_from {
                Some(_) => self.message.clone(),
                None => format!("dependency {failed_drv} failed: {}", self.message),
            },
            origin: self.origin.clone(),
        }
    }
}
