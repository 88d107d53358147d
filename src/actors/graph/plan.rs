//! What a build's expansion found (the I/O phase), handed to the graph to attach.

use std::collections::HashMap;
use std::sync::Arc;

use crate::actors::step::core::Row;
use crate::actors::types::Outputs;
use crate::store::Derivation;

/// What the I/O found for one drv of the closure.
pub enum Node {
    /// Every output is valid: no step.
    Built(Outputs),
    /// In `FailedPaths`.
    CachedFailure,
    /// A step actor already exists (attached at graph-change time).
    Live,
    /// A step to create; `recorded` is a resolution the database already holds (restart).
    New {
        drv: Arc<Derivation>,
        recorded: Option<Recorded>,
    },
}

/// A resolution recorded before a restart: the resolved drv, our Resolved row and its target row
/// (`child`, when that row is still pending and so to be adopted by the resolved step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub resolved: String,
    pub own: Row,
    pub child: Option<Row>,
}

/// Finds (and takes) the recorded resolution of a drv.
pub type RecordedLookup = Arc<dyn Fn(&str) -> Option<Recorded>>;

/// The result of the I/O phase.
pub struct Plan {
    pub top: String,
    pub nodes: HashMap<String, Node>,
    /// New and live drvs, inputs before the steps that need them.
    pub order: Vec<String>,
}
