//! The dispatcher's logic: runnable steps per system, ordered by global priority, jobset share use,
//! local priority, remaining critical path (longest first; [`Order::CriticalPath`]), then lowest
//! build id; machines picked by system, supported and mandatory
//! features, speed factor and free slots. Plain state machine, no runtime; time is injected.
//!
//! `preferLocalBuild` is Hydra's: a step that has it (and that the runner's own builder could
//! build, [`can_build_locally`]) satisfies a machine's mandatory feature `local`, so a
//! machine with `local` mandatory takes only such steps; any other machine takes them too.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// The mandatory feature a `preferLocalBuild` step meets without requiring it (Hydra's).
pub const LOCAL_FEATURE: &str = "local";

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
    /// Does this machine take a step for `system` needing `features`? Hydra's
    /// `Machine::supportsStep`: it can build it ([`Self::can_build`]), and the step requires each
    /// of its mandatory features — `local` is met by a `prefer_local` step too.
    pub fn supports(&self, system: &str, features: &BTreeSet<String>, prefer_local: bool) -> bool {
        self.can_build(system, features)
            && self
                .mandatory_features
                .iter()
                .all(|f| features.contains(f) || (prefer_local && f == LOCAL_FEATURE))
    }

    /// Could this machine build a step for `system` needing `features` (its mandatory features
    /// aside)? The system is one of its own (or `builtin`), and it has every feature (supported
    /// or mandatory). On the runner's own builder this is Nix's `canBuildLocally`.
    pub fn can_build(&self, system: &str, features: &BTreeSet<String>) -> bool {
        (self.systems.contains(system) || system == "builtin")
            && features
                .iter()
                .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
    }
}

/// Nix's `canBuildLocally`, the runner's own builders (`local`) standing for the runner's Nix:
/// one of them has a slot (not needed for `builtin`), the system and every feature.
pub fn can_build_locally(local: &[MachineInfo], system: &str, features: &BTreeSet<String>) -> bool {
    local
        .iter()
        .any(|m| (m.max_jobs > 0 || system == "builtin") && m.can_build(system, features))
}

/// Where a runnable step stands in the queue (from the best build that needs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priority {
    pub global_priority: i32,
    pub jobset: String,
    pub local_priority: i32,
    /// The step's remaining critical path (ms): its expected duration plus the longest chain of
    /// expected durations from it up to a build that needs it (`graph::critical_path`).
    pub critical_path_ms: u64,
    pub build_id: i64,
}

/// How steps of equal global priority, share use and local priority are ordered
/// (`[scheduler] order`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// The longest remaining critical path first, then the lowest build id.
    #[default]
    CriticalPath,
    /// The lowest build id first (the critical path is ignored).
    BuildId,
}

impl Order {
    pub fn as_str(self) -> &'static str {
        match self {
            Order::CriticalPath => "critical-path",
            Order::BuildId => "build-id",
        }
    }
}

/// A step ready for a machine.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnableStep {
    pub drv: String,
    pub system: String,
    pub features: BTreeSet<String>,
    /// `preferLocalBuild`, kept only when the runner's own builder could build the step (as
    /// Hydra's `Step::preferLocalBuild`).
    pub prefer_local: bool,
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
    /// Steps' remaining critical paths changed (ms): queued ones move to their new place. Steps
    /// not queued are ignored (they carry their value when they become runnable).
    CriticalPaths(Vec<(String, u64)>),
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
    /// The builds a machine still holds (from before a runner restart or a reconnection), by drv
    /// path; replaces what it held before. A runnable step whose drv a connected machine holds is
    /// assigned to it (adopted), whatever its free slots, so it is not built twice.
    Holds {
        machine: String,
        drvs: BTreeSet<String>,
    },
    /// After a restart: the step was building on `machine`; keep it for that machine (it may still
    /// hold the build) until it rejoins or `wait_ms` pass.
    Reserve {
        drv: String,
        machine: String,
        wait_ms: u64,
    },
    /// An operator enables or disables (drains) a machine.
    SetEnabled {
        machine: String,
        enabled: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Assign {
        drv: String,
        machine: String,
        /// The machine holds a build of this drv (it said so when it joined): the step adopts
        /// it instead of starting one.
        held: bool,
    },
    /// No machine has supported this step for the configured wait.
    Unsupported { drv: String },
}

/// How good a jobset's head step is: higher global priority, lower share use, higher local
/// priority, longer critical path, lower build id.
type Rank = (Reverse<i32>, f64, Reverse<i32>, Reverse<u64>, i64);

/// Per-jobset queue key: higher global, higher local, longer critical path (0 for all with
/// [`Order::BuildId`]), then lower build id first.
type QueueKey = (Reverse<i32>, Reverse<i32>, Reverse<u64>, i64, String);

/// What a queue's steps need of a machine: (system, required features, prefer local).
type Needs = (String, BTreeSet<String>, bool);

fn needs(s: &RunnableStep) -> Needs {
    (s.system.clone(), s.features.clone(), s.prefer_local)
}

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

/// A machine as the dispatcher sees it (for status pages).
#[derive(Debug, Clone, PartialEq)]
pub struct MachineView {
    pub info: MachineInfo,
    pub running: u32,
    pub enabled: bool,
}

/// The dispatcher state machine.
#[derive(Debug)]
pub struct Dispatcher {
    /// What its steps need → queue.
    queues: BTreeMap<Needs, Queue>,
    steps: HashMap<String, RunnableStep>,
    machines: BTreeMap<String, MachineState>,
    share_used: HashMap<String, f64>,
    shares: HashMap<String, u32>,
    /// Steps no machine supports, with when they started waiting (ms).
    unsupported_since: BTreeMap<String, u64>,
    unsupported_wait: Duration,
    now_ms: u64,
    /// drv → the machine that holds a build of it.
    holds: HashMap<String, String>,
    /// drv → (machine, until ms): runnable steps kept for a machine that may rejoin holding them.
    reserved: HashMap<String, (String, u64)>,
    /// Runnable steps waiting for their reserved machine (not in `queues`).
    parked: HashMap<String, RunnableStep>,
    /// Machines an operator disabled (or is draining): no new jobs; running jobs finish. Kept
    /// across a machine leaving and rejoining.
    disabled: std::collections::BTreeSet<String>,
    order: Order,
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
            holds: HashMap::new(),
            reserved: HashMap::new(),
            parked: HashMap::new(),
            disabled: Default::default(),
            order: Order::default(),
        }
    }

    /// The same, ordering by `order`.
    pub fn with_order(unsupported_wait: Duration, order: Order) -> Self {
        Dispatcher {
            order,
            ..Dispatcher::new(unsupported_wait)
        }
    }

    pub fn order(&self) -> Order {
        self.order
    }

    /// Number of runnable steps waiting for a machine.
    pub fn runnable(&self) -> usize {
        self.steps.len() + self.parked.len()
    }

    /// Runnable steps per system.
    pub fn runnable_per_system(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for ((system, _, _), q) in &self.queues {
            *m.entry(system.clone()).or_insert(0) +=
                q.by_jobset.values().map(BTreeSet::len).sum::<usize>();
        }
        m
    }

    /// The machines, by id.
    pub fn machines(&self) -> Vec<MachineView> {
        self.machines
            .values()
            .map(|m| MachineView {
                info: m.info.clone(),
                running: m.running,
                enabled: !self.disabled.contains(&m.info.id),
            })
            .collect()
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
                self.machines
                    .insert(id.clone(), MachineState { info, running });
                self.recheck_unsupported();
                let mut fx = self.adopt(&id);
                fx.extend(self.dispatch());
                fx
            }
            Event::MachineLeft(id) => {
                self.machines.remove(&id);
                self.holds.retain(|_, m| *m != id);
                self.recheck_unsupported();
                vec![]
            }
            Event::Holds { machine, drvs } => {
                self.holds.retain(|_, m| *m != machine);
                for d in drvs {
                    self.holds.insert(d, machine.clone());
                }
                if self.machines.contains_key(&machine) {
                    self.adopt(&machine)
                } else {
                    vec![]
                }
            }
            Event::Reserve {
                drv,
                machine,
                wait_ms,
            } => {
                self.reserved
                    .insert(drv.clone(), (machine, self.now_ms.saturating_add(wait_ms)));
                match self.steps.get(&drv).cloned() {
                    // Already queued: take it back (or hand it to its holder).
                    Some(step) => {
                        self.remove(&drv);
                        self.on(Event::Runnable(step))
                    }
                    None => vec![],
                }
            }
            Event::SetEnabled { machine, enabled } => {
                if enabled {
                    self.disabled.remove(&machine);
                    self.dispatch()
                } else {
                    self.disabled.insert(machine);
                    vec![]
                }
            }
            Event::SlotFreed(id) => {
                if let Some(m) = self.machines.get_mut(&id) {
                    m.running = m.running.saturating_sub(1);
                }
                self.dispatch()
            }
            Event::Runnable(step) => {
                self.remove(&step.drv);
                if let Some(m) = self.holder(&step.drv) {
                    // Adopt: the machine already holds this build.
                    self.reserved.remove(&step.drv);
                    if let Some(ms) = self.machines.get_mut(&m) {
                        ms.running += 1;
                    }
                    return vec![Effect::Assign {
                        drv: step.drv,
                        machine: m,
                        held: true,
                    }];
                }
                match self.reserved.get(&step.drv) {
                    // Kept while its machine may still rejoin holding it; a machine that is
                    // connected said what it holds already (`Holds` comes before its join).
                    Some((m, until)) if *until > self.now_ms && !self.machines.contains_key(m) => {
                        self.parked.insert(step.drv.clone(), step);
                        return vec![];
                    }
                    Some(_) => {
                        self.reserved.remove(&step.drv);
                    }
                    None => {}
                }
                self.enqueue(step)
            }
            Event::Removed(drv) => {
                self.remove(&drv);
                self.reserved.remove(&drv);
                vec![]
            }
            Event::CriticalPaths(changes) => {
                for (drv, ms) in changes {
                    if let Some(p) = self.parked.get_mut(&drv) {
                        p.priority.critical_path_ms = ms;
                        continue;
                    }
                    let Some(step) = self.steps.get(&drv) else {
                        continue;
                    };
                    if step.priority.critical_path_ms == ms {
                        continue;
                    }
                    let mut step = step.clone();
                    step.priority.critical_path_ms = ms;
                    // Keeps how long it has waited unsupported.
                    let since = self.unsupported_since.get(&drv).copied();
                    self.remove(&drv);
                    self.enqueue_quiet(step);
                    if let Some(t) = since {
                        self.unsupported_since.insert(drv, t);
                    }
                }
                // Only the order changed: no slot is freer than before.
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
                let now = self.now_ms;
                self.reserved.retain(|_, (_, until)| *until > now);
                let released: Vec<String> = self
                    .parked
                    .keys()
                    .filter(|d| !self.reserved.contains_key(*d))
                    .cloned()
                    .collect();
                for d in released {
                    if let Some(step) = self.parked.remove(&d) {
                        self.enqueue_quiet(step);
                    }
                }
                let wait = self.unsupported_wait.as_millis() as u64;
                let expired: Vec<String> = self
                    .unsupported_since
                    .iter()
                    .filter(|(_, since)| self.now_ms.saturating_sub(**since) >= wait)
                    .map(|(d, _)| d.clone())
                    .collect();
                let mut fx: Vec<Effect> = expired
                    .into_iter()
                    .map(|drv| {
                        self.remove(&drv);
                        Effect::Unsupported { drv }
                    })
                    .collect();
                fx.extend(self.dispatch());
                fx
            }
        }
    }

    /// The connected machine holding a build of `drv`, if any.
    fn holder(&self, drv: &str) -> Option<String> {
        self.holds
            .get(drv)
            .filter(|m| self.machines.contains_key(*m))
            .cloned()
    }

    /// A machine (re)joined or said what it holds: its held runnable steps are assigned to it, and
    /// steps reserved for it that it does not hold are released to everyone.
    fn adopt(&mut self, machine: &str) -> Vec<Effect> {
        let mut fx = Vec::new();
        let held: Vec<String> = self
            .holds
            .iter()
            .filter(|(d, m)| {
                *m == machine && (self.steps.contains_key(*d) || self.parked.contains_key(*d))
            })
            .map(|(d, _)| d.clone())
            .collect();
        for drv in held {
            self.remove(&drv);
            self.reserved.remove(&drv);
            if let Some(ms) = self.machines.get_mut(machine) {
                ms.running += 1;
            }
            fx.push(Effect::Assign {
                drv,
                machine: machine.to_string(),
                held: true,
            });
        }
        let released: Vec<String> = self
            .parked
            .keys()
            .filter(|d| self.reserved.get(*d).is_some_and(|(m, _)| m == machine))
            .cloned()
            .collect();
        for d in released {
            self.reserved.remove(&d);
            if let Some(step) = self.parked.remove(&d) {
                self.enqueue_quiet(step);
            }
        }
        fx
    }

    /// Queues a runnable step and dispatches.
    fn enqueue(&mut self, step: RunnableStep) -> Vec<Effect> {
        self.enqueue_quiet(step);
        self.dispatch()
    }

    /// Queues a runnable step without dispatching.
    fn enqueue_quiet(&mut self, step: RunnableStep) {
        let key = queue_key(&step, self.order);
        self.queues
            .entry(needs(&step))
            .or_default()
            .by_jobset
            .entry(step.priority.jobset.clone())
            .or_default()
            .insert(key);
        if !self.machines.values().any(|m| {
            m.info
                .supports(&step.system, &step.features, step.prefer_local)
        }) {
            self.unsupported_since.insert(step.drv.clone(), self.now_ms);
        }
        self.steps.insert(step.drv.clone(), step);
    }

    fn remove(&mut self, drv: &str) {
        self.parked.remove(drv);
        let Some(step) = self.steps.remove(drv) else {
            return;
        };
        self.unsupported_since.remove(drv);
        let qk = needs(&step);
        if let Some(q) = self.queues.get_mut(&qk) {
            if let Some(set) = q.by_jobset.get_mut(&step.priority.jobset) {
                set.remove(&queue_key(&step, self.order));
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
            let supported = self.machines.values().any(|m| {
                m.info
                    .supports(&step.system, &step.features, step.prefer_local)
            });
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
            .filter(|m| !self.disabled.contains(&m.info.id) && m.running < m.info.max_jobs)
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
                    held: false,
                });
            }
        }
        effects
    }

    /// The best queued step this machine supports.
    fn best_for(&self, machine: &MachineInfo) -> Option<String> {
        let mut best: Option<(Rank, &String)> = None;
        for ((system, features, prefer_local), q) in &self.queues {
            if !machine.supports(system, features, *prefer_local) {
                continue;
            }
            for (jobset, set) in &q.by_jobset {
                let Some((g, l, cp, build, drv)) = set.first() else {
                    continue;
                };
                let rank = (*g, self.share_use(jobset), *l, *cp, *build);
                let better = match &best {
                    None => true,
                    Some((b, _)) => rank
                        .0
                        .cmp(&b.0)
                        .then(rank.1.total_cmp(&b.1))
                        .then(rank.2.cmp(&b.2))
                        .then(rank.3.cmp(&b.3))
                        .then(rank.4.cmp(&b.4))
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

fn queue_key(s: &RunnableStep, order: Order) -> QueueKey {
    let cp = match order {
        Order::CriticalPath => s.priority.critical_path_ms,
        Order::BuildId => 0,
    };
    (
        Reverse(s.priority.global_priority),
        Reverse(s.priority.local_priority),
        Reverse(cp),
        s.priority.build_id,
        s.drv.clone(),
    )
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
