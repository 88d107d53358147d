//! The dispatcher's logic: runnable steps per system, ordered by global priority, jobset share use,
//! local priority, then lowest build id; machines picked by system, supported and mandatory
//! features, speed factor and free slots. Plain state machine, no runtime; time is injected.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// A builder as the dispatcher sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineInfo {
    pub id: String,
    pub systems: BTreeSet<String>,
    pub supported_features: BTreeSet<String>,
    pub mandatory_features: BTreeSet<String>,
    pub max_jobs: u32,
    pub speed_factor: f64,
}

impl MachineInfo {
    /// Can this machine build a step for `system` needing `features`?
    pub fn supports(&self, system: &str, features: &BTreeSet<String>) -> bool {
        (self.systems.contains(system) || system == "builtin")
            && features
                .iter()
                .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.iter().all(|f| features.contains(f))
    }
}

/// Where a runnable step stands in the queue (from the best build that needs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priority {
    pub global_priority: i32,
    pub jobset: String,
    pub local_priority: i32,
    pub build_id: i64,
}

/// A step ready for a machine.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnableStep {
    pub drv: String,
    pub system: String,
    pub features: BTreeSet<String>,
    pub priority: Priority,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    MachineJoined(MachineInfo),
    MachineLeft(String),
    /// A machine finished a job (or its job was aborted): one slot is free again.
    SlotFreed(String),
    Runnable(RunnableStep),
    /// The step left the queue (cancelled, abandoned).
    Removed(String),
    /// A jobset used builder time: share use is seconds per share.
    JobsetUsed {
        jobset: String,
        seconds: f64,
    },
    JobsetShares {
        jobset: String,
        shares: u32,
    },
    /// Time passes (milliseconds since an arbitrary start): unsupported steps time out.
    Tick(u64),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Assign {
        drv: String,
        machine: String,
    },
    /// No machine has supported this step for the configured wait.
    Unsupported {
        drv: String,
    },
}

/// How good a jobset's head step is: higher global priority, lower share use, higher local
/// priority, lower build id.
type Rank = (Reverse<i32>, f64, Reverse<i32>, i64);

/// Per-jobset queue key: higher global, higher local, then lower build id first.
type QueueKey = (Reverse<i32>, Reverse<i32>, i64, String);

#[derive(Debug, Default)]
struct Queue {
    /// jobset → ordered steps
    by_jobset: BTreeMap<String, BTreeSet<QueueKey>>,
}

#[derive(Debug)]
struct MachineState {
    info: MachineInfo,
    running: u32,
}

/// The dispatcher state machine.
#[derive(Debug)]
pub struct Dispatcher {
    /// (system, features) → queue.
    queues: BTreeMap<(String, BTreeSet<String>), Queue>,
    steps: HashMap<String, RunnableStep>,
    machines: BTreeMap<String, MachineState>,
    share_used: HashMap<String, f64>,
    shares: HashMap<String, u32>,
    /// Steps no machine supports, with when they started waiting (ms).
    unsupported_since: BTreeMap<String, u64>,
    unsupported_wait: Duration,
    now_ms: u64,
}

impl Dispatcher {
    pub fn new(unsupported_wait: Duration) -> Self {
        Dispatcher {
            queues: BTreeMap::new(),
            steps: HashMap::new(),
            machines: BTreeMap::new(),
            share_used: HashMap::new(),
            shares: HashMap::new(),
            unsupported_since: BTreeMap::new(),
            unsupported_wait,
            now_ms: 0,
        }
    }

    /// Number of runnable steps waiting for a machine.
    pub fn runnable(&self) -> usize {
        self.steps.len()
    }

    /// Runnable steps per system.
    pub fn runnable_per_system(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for ((system, _), q) in &self.queues {
            *m.entry(system.clone()).or_insert(0) +=
                q.by_jobset.values().map(BTreeSet::len).sum::<usize>();
        }
        m
    }

    /// Jobs running on a machine.
    pub fn running_on(&self, machine: &str) -> Option<u32> {
        self.machines.get(machine).map(|m| m.running)
    }

    pub fn on(&mut self, ev: Event) -> Vec<Effect> {
        match ev {
            Event::MachineJoined(info) => {
                let id = info.id.clone();
                let running = self.machines.remove(&id).map(|m| m.running).unwrap_or(0);
                self.machines.insert(id, MachineState { info, running });
                self.recheck_unsupported();
                self.dispatch()
            }
            Event::MachineLeft(id) => {
                self.machines.remove(&id);
                self.recheck_unsupported();
                vec![]
            }
            Event::SlotFreed(id) => {
                if let Some(m) = self.machines.get_mut(&id) {
                    m.running = m.running.saturating_sub(1);
                }
                self.dispatch()
            }
            Event::Runnable(step) => {
                self.remove(&step.drv);
                let key = queue_key(&step);
                self.queues
                    .entry((step.system.clone(), step.features.clone()))
                    .or_default()
                    .by_jobset
                    .entry(step.priority.jobset.clone())
                    .or_default()
                    .insert(key);
                if !self
                    .machines
                    .values()
                    .any(|m| m.info.supports(&step.system, &step.features))
                {
                    self.unsupported_since.insert(step.drv.clone(), self.now_ms);
                }
                self.steps.insert(step.drv.clone(), step);
                self.dispatch()
            }
            Event::Removed(drv) => {
                self.remove(&drv);
                vec![]
            }
            Event::JobsetUsed { jobset, seconds } => {
                *self.share_used.entry(jobset).or_insert(0.0) += seconds;
                vec![]
            }
            Event::JobsetShares { jobset, shares } => {
                self.shares.insert(jobset, shares);
                vec![]
            }
            Event::Tick(now_ms) => {
                self.now_ms = self.now_ms.max(now_ms);
                let wait = self.unsupported_wait.as_millis() as u64;
                let expired: Vec<String> = self
                    .unsupported_since
                    .iter()
                    .filter(|(_, since)| self.now_ms.saturating_sub(**since) >= wait)
                    .map(|(d, _)| d.clone())
                    .collect();
                expired
                    .into_iter()
                    .map(|drv| {
                        self.remove(&drv);
                        Effect::Unsupported { drv }
                    })
                    .collect()
            }
        }
    }

    fn remove(&mut self, drv: &str) {
        let Some(step) = self.steps.remove(drv) else {
            return;
        };
        self.unsupported_since.remove(drv);
        let qk = (step.system.clone(), step.features.clone());
        if let Some(q) = self.queues.get_mut(&qk) {
            if let Some(set) = q.by_jobset.get_mut(&step.priority.jobset) {
                set.remove(&queue_key(&step));
                if set.is_empty() {
                    q.by_jobset.remove(&step.priority.jobset);
                }
            }
            if q.by_jobset.is_empty() {
                self.queues.remove(&qk);
            }
        }
    }

    fn recheck_unsupported(&mut self) {
        let now = self.now_ms;
        for step in self.steps.values() {
            let supported = self
                .machines
                .values()
                .any(|m| m.info.supports(&step.system, &step.features));
            if supported {
                self.unsupported_since.remove(&step.drv);
            } else {
                self.unsupported_since
                    .entry(step.drv.clone())
                    .or_insert(now);
            }
        }
    }

    fn share_use(&self, jobset: &str) -> f64 {
        let used = self.share_used.get(jobset).copied().unwrap_or(0.0);
        used / f64::from(self.shares.get(jobset).copied().unwrap_or(1).max(1))
    }

    /// Assigns runnable steps to free slots until no free machine can take any.
    fn dispatch(&mut self) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.steps.is_empty() {
            return effects;
        }
        // Faster machines first, then those with more free slots.
        let mut order: Vec<(String, f64, u32)> = self
            .machines
            .values()
            .filter(|m| m.running < m.info.max_jobs)
            .map(|m| {
                (
                    m.info.id.clone(),
                    m.info.speed_factor,
                    m.info.max_jobs - m.running,
                )
            })
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
        for (id, _, _) in order {
            while let Some(m) = self
                .machines
                .get(&id)
                .filter(|m| m.running < m.info.max_jobs)
            {
                let Some(drv) = self.best_for(&m.info) else {
                    break;
                };
                self.remove(&drv);
                if let Some(m) = self.machines.get_mut(&id) {
                    m.running += 1;
                }
                effects.push(Effect::Assign {
                    drv,
                    machine: id.clone(),
                });
            }
        }
        effects
    }

    /// The best queued step this machine supports.
    fn best_for(&self, machine: &MachineInfo) -> Option<String> {
        let mut best: Option<(Rank, &String)> = None;
        for ((system, features), q) in &self.queues {
            if !machine.supports(system, features) {
                continue;
            }
            for (jobset, set) in &q.by_jobset {
                let Some((g, l, build, drv)) = set.first() else {
                    continue;
                };
                let rank = (*g, self.share_use(jobset), *l, *build);
                let better = match &best {
                    None => true,
                    Some((b, _)) => rank
                        .0
                        .cmp(&b.0)
                        .then(rank.1.total_cmp(&b.1))
                        .then(rank.2.cmp(&b.2))
                        .then(rank.3.cmp(&b.3))
                        .is_lt(),
                };
                if better {
                    best = Some((rank, drv));
                }
            }
        }
        best.map(|(_, d)| d.clone())
    }
}

fn queue_key(s: &RunnableStep) -> QueueKey {
    (
        Reverse(s.priority.global_priority),
        Reverse(s.priority.local_priority),
        s.priority.build_id,
        s.drv.clone(),
    )
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
