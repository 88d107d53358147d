//! Each live step's remaining critical path: its expected duration plus the longest remaining
//! critical path among the steps that need it (its dependents, up towards the builds). A step with
//! no dependent (a build's top step) has its own expected duration.
//!
//! Kept up to date incrementally: adding a step (with its edges to the inputs it waits on) or
//! removing one propagates down the inputs only as far as values change, so an event costs the
//! size of what changed, not of the graph. A rise needs only the raised dependent's value (O(1)
//! per visited step); a fall (a dependent left) recomputes the visited step from its remaining
//! dependents. Pure: no runtime, deterministic.

use std::collections::{HashMap, HashSet};

use crate::actors::types::Drv;

#[derive(Debug, Clone)]
struct Node {
    /// Expected duration of the step itself (ms).
    own_ms: u64,
    /// Its remaining critical path (ms).
    value_ms: u64,
    /// The steps that wait on it.
    dependents: Vec<Drv>,
    /// The steps it waits on (tracked ones only).
    inputs: Vec<Drv>,
}

/// Why a step is looked at again.
#[derive(Debug, Clone, Copy)]
enum Visit {
    /// A dependent's value rose to this: the step's value is at least own + it.
    Raised(u64),
    /// A dependent fell or left: recompute from every dependent.
    Recompute,
}

/// The critical-path values of the live steps.
#[derive(Debug, Default)]
pub struct CriticalPath {
    nodes: HashMap<Drv, Node>,
    /// Steps visited by propagation since the start (for the benchmark and tests: shows the
    /// bound on the work an event does).
    visits: u64,
}

/// The steps whose value changed by one event, with their new value (ms), in visiting order.
pub type Changes = Vec<(Drv, u64)>;

impl CriticalPath {
    pub fn new() -> Self {
        Self::default()
    }

    /// The step's remaining critical path (ms), if it is tracked.
    pub fn value(&self, drv: &str) -> Option<u64> {
        self.nodes.get(drv).map(|n| n.value_ms)
    }

    /// The step's own expected duration (ms), if it is tracked.
    pub fn own(&self, drv: &str) -> Option<u64> {
        self.nodes.get(drv).map(|n| n.own_ms)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Steps visited by propagation so far.
    pub fn visits(&self) -> u64 {
        self.visits
    }

    /// Adds a step expected to take `own_ms` that waits on `inputs` (see [`Self::insert_all`]).
    pub fn insert(&mut self, drv: &Drv, own_ms: u64, inputs: &[Drv]) -> Changes {
        self.insert_all(&[(drv.clone(), own_ms, inputs.to_vec())])
    }

    /// Adds steps (drv, expected ms, the drvs it waits on), inputs before the steps that need
    /// them (a plan's order). Inputs not tracked (built, cached failures) are skipped; a step
    /// already tracked gains the new edges (its expected duration stays). The new steps' values
    /// are computed once each, dependents first; tracked steps they wait on rise as far as their
    /// values change. Returns every value set or changed, new steps included.
    pub fn insert_all(&mut self, steps: &[(Drv, u64, Vec<Drv>)]) -> Changes {
        let mut changes = Changes::new();
        // In insertion order, and as a set: a batch may hold every step of a big build, and
        // looking each input up in a list made attaching quadratic in the batch.
        let mut fresh = Vec::new();
        let mut is_fresh: HashSet<Drv> = HashSet::new();
        for (drv, own_ms, _) in steps {
            if !self.nodes.contains_key(drv) {
                self.nodes.insert(
                    drv.clone(),
                    Node {
                        own_ms: *own_ms,
                        value_ms: *own_ms,
                        dependents: Vec::new(),
                        inputs: Vec::new(),
                    },
                );
                fresh.push(drv.clone());
                is_fresh.insert(drv.clone());
            }
        }
        // Tracked steps that were there before and gained a dependent.
        let mut raised: Vec<Drv> = Vec::new();
        let mut linked: HashSet<&Drv> = HashSet::new();
        for (drv, _, inputs) in steps {
            // (The first time a step of the batch is linked: a repeat of it is linked as an old
            // one is, looking for each edge first.)
            let new_step = is_fresh.contains(drv) && linked.insert(drv);
            // A new step is no input's dependent yet: only its own inputs' repeats are skipped
            // (scanning a popular input's dependents for it was quadratic in their number).
            let mut seen: HashSet<&Drv> = HashSet::new();
            for input in inputs {
                if input == drv || (new_step && !seen.insert(input)) {
                    continue;
                }
                let Some(i) = self.nodes.get_mut(input) else {
                    continue;
                };
                if !new_step && i.dependents.contains(drv) {
                    continue;
                }
                i.dependents.push(drv.clone());
                if !is_fresh.contains(input) {
                    raised.push(input.clone());
                }
                if let Some(n) = self.nodes.get_mut(drv) {
                    n.inputs.push(input.clone());
                }
            }
        }
        // Dependents come after their inputs: from the end, every dependent of a new step is
        // final when the step is computed.
        for drv in fresh.iter().rev() {
            self.visits += 1;
            let Some(n) = self.nodes.get(drv) else {
                continue;
            };
            let best = self.best_dependent(n);
            let v = n.own_ms.saturating_add(best);
            if let Some(n) = self.nodes.get_mut(drv) {
                n.value_ms = v;
            }
            changes.push((drv.clone(), v));
        }
        raised.sort();
        raised.dedup();
        let work = raised.into_iter().map(|i| (i, Visit::Recompute)).collect();
        self.propagate(work, &mut changes);
        last_per_step(changes)
    }

    fn best_dependent(&self, n: &Node) -> u64 {
        n.dependents
            .iter()
            .filter_map(|d| self.nodes.get(d).map(|x| x.value_ms))
            .max()
            .unwrap_or(0)
    }

    /// A dependent edge added to steps both tracked (e.g. a resolved child waited on by its
    /// parent). Same as inserting `dependent` again with `input` among its inputs.
    pub fn link(&mut self, input: &Drv, dependent: &Drv) -> Changes {
        if !self.nodes.contains_key(dependent) {
            return Changes::new();
        }
        self.insert(dependent, 0, std::slice::from_ref(input))
    }

    /// The step left the graph (built, failed or no longer needed): its inputs no longer count
    /// its path.
    pub fn remove(&mut self, drv: &str) -> Changes {
        let mut changes = Changes::new();
        let Some(node) = self.nodes.remove(drv) else {
            return changes;
        };
        for d in &node.dependents {
            if let Some(n) = self.nodes.get_mut(d) {
                n.inputs.retain(|i| &**i != drv);
            }
        }
        let mut work = Vec::new();
        for i in node.inputs {
            if let Some(n) = self.nodes.get_mut(&i) {
                n.dependents.retain(|d| &**d != drv);
                work.push((i, Visit::Recompute));
            }
        }
        self.propagate(work, &mut changes);
        last_per_step(changes)
    }

    /// Visits steps down the inputs while their values change.
    fn propagate(&mut self, mut work: Vec<(Drv, Visit)>, changes: &mut Changes) {
        while let Some((drv, visit)) = work.pop() {
            self.visits += 1;
            let new = match visit {
                Visit::Raised(dep) => {
                    let Some(n) = self.nodes.get(&drv) else {
                        continue;
                    };
                    let candidate = n.own_ms.saturating_add(dep);
                    if candidate <= n.value_ms {
                        continue;
                    }
                    candidate
                }
                Visit::Recompute => {
                    let Some(n) = self.nodes.get(&drv) else {
                        continue;
                    };
                    let best = self.best_dependent(n);
                    let v = n.own_ms.saturating_add(best);
                    if v == n.value_ms {
                        continue;
                    }
                    v
                }
            };
            let Some(n) = self.nodes.get_mut(&drv) else {
                continue;
            };
            let fell = new < n.value_ms;
            n.value_ms = new;
            changes.push((drv.clone(), new));
            for i in &n.inputs {
                let v = if fell {
                    Visit::Recompute
                } else {
                    Visit::Raised(new)
                };
                work.push((i.clone(), v));
            }
        }
    }
}

/// Each step once, with its last value, in the order of first change.
fn last_per_step(changes: Changes) -> Changes {
    let mut at: HashMap<Drv, usize> = HashMap::new();
    let mut out: Changes = Vec::with_capacity(changes.len());
    for (d, v) in changes {
        match at.get(&d) {
            Some(&i) => out[i].1 = v,
            None => {
                at.insert(d.clone(), out.len());
                out.push((d, v));
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "critical_path_tests.rs"]
mod tests;
