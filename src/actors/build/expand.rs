//! Planning a build's drv closure: all I/O first (read the drvs, ask the store and the database
//! what is built or failed); the graph then attaches the plan in one synchronous step
//! ([`graph::attach`](crate::actors::graph::attach), as Hydra's `attach_step`). A drv whose outputs
//! are valid (or realised) needs no step; a drv in `FailedPaths` is a cached failure; a drv with a
//! live step shares it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::actors::built::built_outputs_many;
use crate::actors::env::{Env, persist};
use crate::actors::graph::Graph;
pub use crate::actors::graph::plan::{Node, Plan, Recorded, RecordedLookup};

/// The I/O phase for many builds at once: walks the closures of `tops` level by level (stopping at
/// built, failed and live drvs), each level read with a few batched queries, so builds that share
/// inputs read them once. A drv that cannot be read fails only the builds that need it.
pub async fn plan_many(
    env: &Env,
    graph: &Graph,
    tops: &[String],
    recorded: &dyn Fn(&str) -> Option<Recorded>,
) -> Result<Planned, String> {
    let mut nodes: HashMap<String, Planned1> = HashMap::new();
    let mut queued: HashSet<String> = tops.iter().cloned().collect();
    let mut frontier: Vec<String> = queued.iter().cloned().collect();
    while !frontier.is_empty() {
        let mut to_read = Vec::new();
        for d in frontier.drain(..) {
            if graph.is_live(&d) {
                nodes.insert(d, Planned1::Node(Node::Live));
            } else {
                to_read.push(d);
            }
        }
        let mut read = Vec::with_capacity(to_read.len());
        for (path, r) in to_read
            .iter()
            .zip(env.store.read_derivations(&to_read).await)
        {
            match r {
                Ok(drv) => read.push((path.clone(), drv)),
                Err(e) => {
                    nodes.insert(
                        path.clone(),
                        Planned1::Unreadable(format!("cannot read {path}: {e}")),
                    );
                }
            }
        }
        let mut built = built_outputs_many(env, &read).await;
        let not_built: Vec<String> = read
            .iter()
            .filter(|(p, _)| !built.contains_key(p))
            .map(|(p, _)| p.clone())
            .collect();
        // Retried while the database is away (`persist`): an error here would fail every
        // build of the batch for good.
        let failed: HashSet<String> = persist("read failed paths", || {
            env.db.failed_paths_among(&not_built)
        })
        .await
        .map_err(|e| format!("database: {e}"))?
        .into_iter()
        .collect();
        for (path, drv) in read {
            let node = if let Some(o) = built.remove(&path) {
                Node::Built(o)
            } else if failed.contains(&path) {
                Node::CachedFailure
            } else {
                let rec = recorded(&path);
                if rec.is_none() {
                    for input in drv.input_drvs.keys() {
                        if queued.insert(input.clone()) {
                            frontier.push(input.clone());
                        }
                    }
                }
                Node::New {
                    drv: Arc::new(drv),
                    recorded: rec,
                }
            };
            nodes.insert(path, Planned1::Node(node));
        }
    }
    Ok(Planned { nodes })
}

/// One drv as [`plan_many`] found it.
pub enum Planned1 {
    Node(Node),
    Unreadable(String),
}

/// What [`plan_many`] found for a set of builds.
pub struct Planned {
    pub nodes: HashMap<String, Planned1>,
}

/// One build's plan taken from [`Planned`].
pub enum PlanFor {
    Plan(Plan),
    /// A drv this build needs cannot be read.
    Failed(String),
    /// A step that was live while planning has gone since: plan again.
    Replan,
}

impl Planned {
    /// The plan of the build of `top`, as of now: the walk stops at live steps (including those
    /// attached for builds earlier in the same batch), so each step is created once.
    pub fn plan_for(&self, graph: &Graph, top: &str) -> PlanFor {
        let mut nodes = HashMap::new();
        let mut order = Vec::new();
        let mut stack: Vec<(String, bool)> = vec![(top.to_string(), false)];
        let mut seen: HashSet<String> = HashSet::new();
        while let Some((drv_path, expanded)) = stack.pop() {
            if expanded {
                order.push(drv_path);
                continue;
            }
            if !seen.insert(drv_path.clone()) {
                continue;
            }
            if graph.is_live(&drv_path) {
                nodes.insert(drv_path.clone(), Node::Live);
                order.push(drv_path);
                continue;
            }
            let node = match self.nodes.get(&drv_path) {
                None | Some(Planned1::Node(Node::Live)) => return PlanFor::Replan,
                Some(Planned1::Unreadable(m)) => return PlanFor::Failed(m.clone()),
                Some(Planned1::Node(Node::Built(o))) => Node::Built(o.clone()),
                Some(Planned1::Node(Node::CachedFailure)) => Node::CachedFailure,
                Some(Planned1::Node(Node::New { drv, recorded })) => {
                    stack.push((drv_path.clone(), true));
                    if recorded.is_none() {
                        for input in drv.input_drvs.keys() {
                            if !seen.contains(input) {
                                stack.push((input.clone(), false));
                            }
                        }
                    }
                    Node::New {
                        drv: drv.clone(),
                        recorded: recorded.clone(),
                    }
                }
            };
            nodes.insert(drv_path, node);
        }
        PlanFor::Plan(Plan {
            top: top.to_string(),
            nodes,
            order,
        })
    }
}
