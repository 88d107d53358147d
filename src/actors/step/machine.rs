//! The step's logic as a plain state machine: `on(event) -> effects`, no runtime, no I/O.
//!
//! A step is one derivation still to build, shared by every build and step that needs it. It waits
//! for `OutputsLanded` from each input step; then an IA step is runnable as it is, while a CA floating
//! or deferred step resolves itself (I/O done by the adapter, which reports `Resolved`) and either runs
//! (the resolved drv is itself) or attaches to the child step of the resolved drv and aliases its
//! outputs. Outputs and failures are passed on to every waiter, including waiters that come late.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::actors::types::{Drv, Failure, Outputs, Status, Waiter, WaiterRef};

/// Retry policy for transient failures (from `[scheduler]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_tries: u32,
    pub interval: Duration,
    pub backoff: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_tries: 5,
            interval: Duration::from_secs(60),
            backoff: 3.0,
        }
    }
}

impl RetryPolicy {
    /// Delay before try number `next_try` (2 for the first retry).
    pub fn delay_before(&self, next_try: u32) -> Duration {
        let exp = next_try.saturating_sub(2) as i32;
        self.interval.mul_f64(self.backoff.max(1.0).powi(exp))
    }
}

/// Where the step is.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    WaitingForInputs,
    /// The adapter is resolving the drv (compute, write to the store, record in the database).
    Resolving,
    /// Waiting in the dispatcher's queue for a machine.
    Runnable,
    Building {
        machine: String,
    },
    RetryWait,
    /// Resolved to another drv: waiting for that child step's outputs.
    AwaitingResolved {
        resolved: String,
    },
    Succeeded(Outputs),
    Failed(Failure),
}

/// The gauge of [`Stats`](crate::actors::env::Stats) a phase is counted in. Gauges are derived
/// from phase transitions only: leaving a phase decrements its gauge, entering one increments it
/// (the adapter does it in one place, for every event, and when the actor stops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauge {
    /// `steps_runnable`: waiting in the dispatcher's queue.
    Runnable,
    /// `steps_running`: on a machine.
    Running,
}

impl Phase {
    /// The gauge this phase counts in, if any.
    pub fn gauge(&self) -> Option<Gauge> {
        match self {
            Phase::Runnable => Some(Gauge::Runnable),
            Phase::Building { .. } => Some(Gauge::Running),
            _ => None,
        }
    }
}

/// The gauge changes of a transition from `before` to `after`: (the gauge left, the gauge
/// entered); both `None` when the transition changes no gauge.
pub fn gauge_change(before: Option<Gauge>, after: Option<Gauge>) -> (Option<Gauge>, Option<Gauge>) {
    if before == after {
        (None, None)
    } else {
        (before, after)
    }
}

/// One level of a dynamic input (dynamic derivations): the derivation reached from input
/// `input` by following the `.drv` outputs of `chain`, and the outputs wanted of it. When every
/// link of the chain has landed, the derivation is known and the step waits on its step too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicNeed {
    pub input: Drv,
    pub chain: Vec<String>,
    pub wanted: Vec<String>,
}

/// What the adapter learned by resolving.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// The resolved drv is the step's own drv: run it as it is.
    Same,
    /// The resolved drv (already written and recorded in one transaction).
    Child(String),
    /// Resolution is impossible (e.g. a missing realisation): the step fails.
    Impossible(String),
}

/// How a build on a machine ended.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildOutcome {
    Built(Outputs),
    Failed {
        status: Status,
        message: String,
        transient: bool,
    },
}

/// The longest failure message kept (it is stored with the step).
pub const MAX_FAILURE_MESSAGE: usize = 16 << 10;

impl BuildOutcome {
    /// The outcome with a message the database can store: NUL bytes, which PostgreSQL text
    /// cannot hold (the write would fail however often it is retried, and the step would never
    /// finish), become U+FFFD, and at most [`MAX_FAILURE_MESSAGE`] bytes are kept. The message
    /// comes from outside: a remote builder's report, a build log's last lines.
    pub fn storable(self) -> Self {
        match self {
            BuildOutcome::Failed {
                status,
                message,
                transient,
            } => BuildOutcome::Failed {
                status,
                message: crate::store::clip_to(
                    &message.replace('\0', "\u{fffd}"),
                    MAX_FAILURE_MESSAGE,
                ),
                transient,
            },
            built => built,
        }
    }
}

/// `W` is how a waiter is held: its key ([`Waiter`], in unit tests) or its address (the actor's
/// [`WaiterAddr`](crate::actors::messages::WaiterAddr)), so the machine's list is the only one.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<W = Waiter> {
    /// Sent once after creation.
    Start,
    InputLanded {
        drv: Drv,
        outputs: Outputs,
    },
    InputFailed {
        drv: Drv,
        failure: Failure,
    },
    WaiterAdded(W),
    WaiterRemoved(Waiter),
    Resolved(Resolution),
    ChildLanded(Outputs),
    ChildFailed(Failure),
    Dispatched {
        machine: String,
    },
    /// A machine was given the step because it holds a build of the drv already (it said so when
    /// it joined): it goes on with that build instead of starting one.
    Adopted {
        machine: String,
    },
    /// No machine supports the step (after the configured wait): it fails as Unsupported.
    NoMachine(String),
    BuildDone(BuildOutcome),
    RetryDue,
    /// A database write of the step's (its start, a finished attempt, its success, its failure,
    /// its resolution) failed for good. The adapter drops the effects it had queued behind that
    /// write; the effects this event returns replace them.
    WriteFailed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect<W = Waiter> {
    /// Resolve the drv with these input realisations ((drv, output) → path); report `Resolved`.
    Resolve {
        inputs: BTreeMap<(String, String), String>,
    },
    /// Attach to the step for the resolved drv (through the registry), as a waiter of it.
    AttachChild {
        resolved: String,
    },
    /// A derivation an input produced (dynamic derivations) is needed: get its step and its
    /// closure's through the registry (made if missing, shared if live), and wait on it as on
    /// an input. Its landing (or failure) comes back as `InputLanded` / `InputFailed`. `by`:
    /// the (producer drv, output) pairs whose output holds it, for the rows that link them.
    AttachProduced {
        drv: String,
        by: Vec<(String, String)>,
    },
    /// Put the step in the dispatcher's queue.
    MakeRunnable,
    /// Record that a machine started building it.
    RecordStart {
        machine: String,
    },
    /// The attempt carried over a runner restart goes on: `machine` still runs it, and its row
    /// (still busy since before the restart) becomes the running row; nothing is written.
    ResumeCarried {
        machine: String,
    },
    /// The attempt carried over a runner restart really stopped: close its row with this status.
    CloseCarried {
        status: Status,
        message: String,
    },
    /// Record the step's outputs: realisations for its own drv; `built` when a builder ran it.
    RecordSuccess {
        outputs: Outputs,
        built: bool,
    },
    /// Record a failed attempt that will be retried.
    RecordRetry {
        try_number: u32,
        status: Status,
        message: String,
    },
    /// Record the step's own final failure.
    RecordFailure(Failure),
    ScheduleRetry {
        after: Duration,
    },
    NotifyLanded {
        to: Vec<W>,
        outputs: Outputs,
    },
    NotifyFailed {
        to: Vec<W>,
        failure: Failure,
    },
    /// Nobody waits any more: leave the queue, abort a running build, stop.
    Abandon,
}

/// The step state machine.
#[derive(Debug, Clone)]
pub struct StepMachine<W = Waiter> {
    drv_path: Drv,
    needs_resolution: bool,
    /// Input drvs still to land, with the outputs wanted from each.
    /// Sorted by drv path; small vectors, not trees: a waiting step's state is most of its memory.
    /// The drv paths are the input steps' own (shared) ones.
    waiting_for: Vec<(Drv, Vec<String>)>,
    /// Real paths of the inputs' outputs: (drv, output) → path.
    landed: BTreeMap<(String, String), String>,
    /// Sorted by key, without duplicates.
    waiters: Vec<W>,
    phase: Phase,
    /// Attempts that ended (failed) so far.
    tries: u32,
    retry: RetryPolicy,
    /// Set at restart when the database already records this step as Resolved.
    preresolved: Option<String>,
    /// Set at restart when the step's row was busy on this remote builder: the attempt may still
    /// be running there. Taken when the step resumes it or closes it.
    carried: Option<String>,
    /// Its dynamic inputs; `None` for every derivation without them (boxed: most steps have
    /// none, and a waiting step's state is most of its memory).
    dynamic: Option<Box<Dynamic>>,
}

/// The dynamic inputs of a step.
#[derive(Debug, Clone, Default)]
struct Dynamic {
    /// Their levels.
    needs: Vec<DynamicNeed>,
    /// Derivations produced by inputs that it attached to (each once).
    produced: Vec<Drv>,
}

impl<W: WaiterRef> StepMachine<W> {
    /// A step for `drv_path` waiting for `inputs` (drv → wanted outputs) that are still to build;
    /// `already_landed` holds the realisations of inputs that are already valid.
    pub fn new(
        drv_path: impl Into<Drv>,
        needs_resolution: bool,
        inputs: BTreeMap<String, BTreeSet<String>>,
        already_landed: BTreeMap<(String, String), String>,
        retry: RetryPolicy,
    ) -> Self {
        Self::with_inputs(
            drv_path,
            needs_resolution,
            inputs
                .into_iter()
                .map(|(d, outs)| (Drv::from(d), outs.into_iter().collect()))
                .collect(),
            already_landed,
            retry,
        )
    }

    /// [`new`](Self::new) with the inputs' drv paths shared (the input steps' own), as
    /// (drv, wanted outputs); any order, duplicates merged.
    pub fn with_inputs(
        drv_path: impl Into<Drv>,
        needs_resolution: bool,
        inputs: Vec<(Drv, Vec<String>)>,
        already_landed: BTreeMap<(String, String), String>,
        retry: RetryPolicy,
    ) -> Self {
        let mut waiting_for = inputs;
        waiting_for.sort_by(|a, b| a.0.cmp(&b.0));
        waiting_for.dedup_by(|a, b| {
            if a.0 == b.0 {
                b.1.append(&mut a.1);
                true
            } else {
                false
            }
        });
        for (_, outs) in &mut waiting_for {
            outs.sort();
            outs.dedup();
            outs.shrink_to_fit();
        }
        waiting_for.shrink_to_fit();
        StepMachine {
            drv_path: drv_path.into(),
            needs_resolution,
            waiting_for,
            landed: already_landed,
            waiters: Vec::new(),
            phase: Phase::WaitingForInputs,
            tries: 0,
            retry,
            preresolved: None,
            carried: None,
            dynamic: None,
        }
    }

    /// The levels of the drv's dynamic inputs ([`Derivation::dynamic_levels`](crate::store::Derivation::dynamic_levels)).
    pub fn with_dynamic(mut self, needs: Vec<DynamicNeed>) -> Self {
        self.dynamic = (!needs.is_empty()).then(|| {
            Box::new(Dynamic {
                needs,
                produced: Vec::new(),
            })
        });
        self
    }

    /// The derivations produced by inputs that the step attached to, in the order it did.
    pub fn produced(&self) -> &[Drv] {
        self.dynamic.as_ref().map_or(&[], |d| &d.produced)
    }

    /// At restart: the database says this step was resolved to `resolved`; attach straight to it.
    pub fn with_recorded_resolution(mut self, resolved: impl Into<String>) -> Self {
        self.preresolved = Some(resolved.into());
        self
    }

    /// At restart: the step's row was left busy on the remote builder `machine`, which may still
    /// be running the build and may rejoin holding it.
    pub fn with_carried_attempt(mut self, machine: impl Into<String>) -> Self {
        self.carried = Some(machine.into());
        self
    }

    /// The builder of an attempt carried over a restart, still undecided.
    pub fn carried(&self) -> Option<&str> {
        self.carried.as_deref()
    }

    pub fn drv_path(&self) -> &str {
        &self.drv_path
    }

    /// The drv path, shared.
    pub fn drv(&self) -> &Drv {
        &self.drv_path
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn waiters(&self) -> impl Iterator<Item = &W> {
        self.waiters.iter()
    }

    /// Input drvs not landed yet (what the step waits on).
    pub fn waiting_on(&self) -> impl Iterator<Item = &str> {
        self.waiting_for.iter().map(|(d, _)| &**d)
    }

    /// [`waiting_on`](Self::waiting_on), shared.
    pub fn waiting_on_drvs(&self) -> impl Iterator<Item = &Drv> {
        self.waiting_for.iter().map(|(d, _)| d)
    }

    pub fn tries(&self) -> u32 {
        self.tries
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Succeeded(_) | Phase::Failed(_))
    }

    /// Feeds one event; returns the effects to perform, in order.
    pub fn on(&mut self, ev: Event<W>) -> Vec<Effect<W>> {
        let mut effects = self.step(ev);
        // An attempt carried over a restart can be resumed only from a phase that has not
        // started anything yet. Past it, the attempt really stopped: its row is closed first.
        if let Some(machine) = &self.carried
            && !matches!(
                self.phase,
                Phase::WaitingForInputs | Phase::Resolving | Phase::Runnable
            )
        {
            let close = match &self.phase {
                Phase::Failed(f) if f.status == Status::Cancelled => Effect::CloseCarried {
                    status: Status::Cancelled,
                    message: "cancelled: no build needs this step".into(),
                },
                _ => Effect::CloseCarried {
                    status: Status::Aborted,
                    message: format!(
                        "aborted: the runner restarted while this step was building on \
                         {machine}, and {machine} did not go on with it"
                    ),
                },
            };
            self.carried = None;
            effects.insert(0, close);
        }
        effects
    }

    fn step(&mut self, ev: Event<W>) -> Vec<Effect<W>> {
        match ev {
            Event::Start => self.start(),
            Event::InputLanded { drv, outputs } => self.input_landed(drv, outputs),
            Event::InputFailed { drv, failure } => {
                if self.is_finished() || self.waiting_index(&drv).is_none() {
                    return vec![];
                }
                self.fail(failure.propagate(&drv), true)
            }
            Event::WaiterAdded(w) => self.waiter_added(w),
            Event::WaiterRemoved(w) => {
                if let Ok(i) = self.waiters.binary_search_by(|a| a.cmp_key(&w)) {
                    self.waiters.remove(i);
                }
                if self.waiters.is_empty() && !self.is_finished() {
                    self.phase = Phase::Failed(Failure::new(
                        Status::Cancelled,
                        "no build needs this step any more",
                    ));
                    vec![Effect::Abandon]
                } else {
                    vec![]
                }
            }
            Event::Resolved(r) => self.resolved(r),
            Event::ChildLanded(outputs) => match &self.phase {
                Phase::AwaitingResolved { .. } => self.succeed(outputs, false),
                _ => vec![],
            },
            Event::ChildFailed(failure) => match &self.phase {
                // The resolved drv is this step's build: its failure is ours, unchanged. Our own row
                // stays Resolved, so there is nothing of ours to record.
                Phase::AwaitingResolved { .. } => self.fail(failure, false),
                _ => vec![],
            },
            Event::Dispatched { machine } => match self.phase {
                Phase::Runnable => {
                    self.phase = Phase::Building {
                        machine: machine.clone(),
                    };
                    vec![Effect::RecordStart { machine }]
                }
                _ => vec![],
            },
            Event::Adopted { machine } => match self.phase {
                Phase::Runnable => {
                    self.phase = Phase::Building {
                        machine: machine.clone(),
                    };
                    if self.carried.as_deref() == Some(machine.as_str()) {
                        // The builder that ran the attempt before the restart goes on with it.
                        self.carried = None;
                        vec![Effect::ResumeCarried { machine }]
                    } else {
                        // Held, but not an attempt of ours that is still open (a reconnection,
                        // or another builder): a new attempt that the builder's build serves.
                        vec![Effect::RecordStart { machine }]
                    }
                }
                _ => vec![],
            },
            Event::NoMachine(message) => match self.phase {
                Phase::Runnable => self.fail(Failure::new(Status::Unsupported, message), true),
                _ => vec![],
            },
            Event::BuildDone(outcome) => self.build_done(outcome),
            Event::RetryDue => match self.phase {
                Phase::RetryWait => {
                    self.phase = Phase::Runnable;
                    vec![Effect::MakeRunnable]
                }
                _ => vec![],
            },
            Event::WriteFailed(message) => self.write_failed(message),
        }
    }

    /// A write failed for good. Unfinished or succeeded, the step fails as Aborted with the
    /// write's error (its waiters learn it instead of a success the database does not hold).
    /// Already failed, the write was recording that failure: the notification queued behind it
    /// was dropped, so it is sent again (nothing more is recorded: no loop of failing writes).
    fn write_failed(&mut self, message: String) -> Vec<Effect<W>> {
        match &self.phase {
            Phase::Failed(f) => vec![Effect::NotifyFailed {
                to: self.waiters.to_vec(),
                failure: f.clone(),
            }],
            _ => self.fail(Failure::new(Status::Aborted, message), true),
        }
    }

    fn waiting_index(&self, drv: &str) -> Option<usize> {
        self.waiting_for
            .binary_search_by(|(d, _)| (**d).cmp(drv))
            .ok()
    }

    fn start(&mut self) -> Vec<Effect<W>> {
        if self.phase != Phase::WaitingForInputs {
            return vec![];
        }
        if let Some(resolved) = self.preresolved.take() {
            self.phase = Phase::AwaitingResolved {
                resolved: resolved.clone(),
            };
            return vec![Effect::AttachChild { resolved }];
        }
        if self.waiting_for.is_empty() {
            self.inputs_complete()
        } else {
            vec![]
        }
    }

    fn input_landed(&mut self, drv: Drv, outputs: Outputs) -> Vec<Effect<W>> {
        if self.phase != Phase::WaitingForInputs {
            return vec![];
        }
        let Some(i) = self.waiting_index(&drv) else {
            return vec![];
        };
        let (_, wanted) = self.waiting_for.remove(i);
        for o in wanted {
            match outputs.get(&o) {
                Some(p) => {
                    self.landed.insert((drv.to_string(), o), p.clone());
                }
                None => {
                    let msg = format!("input {drv} landed without its output '{o}'");
                    return self.fail(Failure::new(Status::Failed, msg), true);
                }
            }
        }
        if self.waiting_for.is_empty() && self.preresolved.is_none() {
            self.inputs_complete()
        } else {
            vec![]
        }
    }

    /// The derivations produced by inputs that are known now (every link of their chain has
    /// landed) and not attached yet, with the outputs wanted of each: waited on from now on.
    fn attach_produced(&mut self) -> Vec<Effect<W>> {
        let Some(dynamic) = self.dynamic.as_mut() else {
            return vec![];
        };
        // produced drv → (outputs wanted of it, the (producer, output) pairs holding it)
        type Found = (BTreeSet<String>, BTreeSet<(String, String)>);
        let mut found: BTreeMap<String, Found> = BTreeMap::new();
        for need in &dynamic.needs {
            let mut at = need.input.to_string();
            let mut by = None;
            let mut known = true;
            for link in &need.chain {
                match self.landed.get(&(at.clone(), link.clone())) {
                    Some(p) => {
                        by = Some((std::mem::replace(&mut at, p.clone()), link.clone()));
                    }
                    None => {
                        known = false;
                        break;
                    }
                }
            }
            if known && !dynamic.produced.iter().any(|d| **d == *at) {
                let entry = found.entry(at).or_default();
                entry.0.extend(need.wanted.iter().cloned());
                entry.1.extend(by);
            }
        }
        let mut effects = Vec::new();
        for (drv, (wanted, by)) in found {
            let key: Drv = drv.as_str().into();
            dynamic.produced.push(key.clone());
            let wanted: Vec<String> = wanted
                .into_iter()
                .filter(|o| !self.landed.contains_key(&(drv.clone(), o.clone())))
                .collect();
            if wanted.is_empty() {
                continue;
            }
            match self.waiting_for.binary_search_by(|(d, _)| (**d).cmp(&*drv)) {
                Ok(i) => {
                    let outs = &mut self.waiting_for[i].1;
                    outs.extend(wanted);
                    outs.sort();
                    outs.dedup();
                }
                Err(i) => self.waiting_for.insert(i, (key, wanted)),
            }
            effects.push(Effect::AttachProduced {
                drv,
                by: by.into_iter().collect(),
            });
        }
        effects
    }

    fn inputs_complete(&mut self) -> Vec<Effect<W>> {
        if self.dynamic.is_some() {
            let attach = self.attach_produced();
            if !attach.is_empty() || !self.waiting_for.is_empty() {
                return attach;
            }
        }
        if self.needs_resolution {
            self.phase = Phase::Resolving;
            vec![Effect::Resolve {
                inputs: self.landed.clone(),
            }]
        } else {
            self.phase = Phase::Runnable;
            vec![Effect::MakeRunnable]
        }
    }

    fn waiter_added(&mut self, w: W) -> Vec<Effect<W>> {
        // A waiter added again replaces its old entry (a new address for the same key).
        let key = w.key();
        if self.waiters.capacity() == 0 {
            // Most steps have one waiter: room for exactly it (then the usual doubling).
            self.waiters.reserve_exact(1);
        }
        match self.waiters.binary_search_by(|a| a.cmp_key(&key)) {
            Ok(i) => self.waiters[i] = w.clone(),
            Err(i) => self.waiters.insert(i, w.clone()),
        }
        match &self.phase {
            Phase::Succeeded(outputs) => vec![Effect::NotifyLanded {
                to: vec![w],
                outputs: outputs.clone(),
            }],
            Phase::Failed(f) => vec![Effect::NotifyFailed {
                to: vec![w],
                failure: f.clone(),
            }],
            _ => vec![],
        }
    }

    fn resolved(&mut self, r: Resolution) -> Vec<Effect<W>> {
        if self.phase != Phase::Resolving {
            return vec![];
        }
        match r {
            Resolution::Same => {
                self.phase = Phase::Runnable;
                vec![Effect::MakeRunnable]
            }
            Resolution::Child(resolved) => {
                self.phase = Phase::AwaitingResolved {
                    resolved: resolved.clone(),
                };
                vec![Effect::AttachChild { resolved }]
            }
            Resolution::Impossible(msg) => {
                let msg = format!("cannot resolve {}: {msg}", self.drv_path);
                self.fail(Failure::new(Status::Failed, msg), true)
            }
        }
    }

    fn build_done(&mut self, outcome: BuildOutcome) -> Vec<Effect<W>> {
        if !matches!(self.phase, Phase::Building { .. }) {
            return vec![];
        }
        match outcome {
            BuildOutcome::Built(outputs) => self.succeed(outputs, true),
            BuildOutcome::Failed {
                status,
                message,
                transient,
            } => {
                self.tries += 1;
                if transient && self.tries < self.retry.max_tries {
                    self.phase = Phase::RetryWait;
                    vec![
                        Effect::RecordRetry {
                            try_number: self.tries,
                            status,
                            message,
                        },
                        Effect::ScheduleRetry {
                            after: self.retry.delay_before(self.tries + 1),
                        },
                    ]
                } else {
                    self.fail(Failure::new(status, message), true)
                }
            }
        }
    }

    fn succeed(&mut self, outputs: Outputs, built: bool) -> Vec<Effect<W>> {
        self.phase = Phase::Succeeded(outputs.clone());
        let to = self.waiters.to_vec();
        vec![
            Effect::RecordSuccess {
                outputs: outputs.clone(),
                built,
            },
            Effect::NotifyLanded { to, outputs },
        ]
    }

    fn fail(&mut self, failure: Failure, record: bool) -> Vec<Effect<W>> {
        self.phase = Phase::Failed(failure.clone());
        let to = self.waiters.to_vec();
        let mut effects = Vec::with_capacity(2);
        if record {
            effects.push(Effect::RecordFailure(failure.clone()));
        }
        effects.push(Effect::NotifyFailed { to, failure });
        effects
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
