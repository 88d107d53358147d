//! Actor introspection: a registry of live actors (builds, steps, the dispatcher, the queue monitor)
//! that the admin API and the dashboard read without sending the actors a message.
//!
//! Each actor owns an [`ActorCell`] (shared through an `Arc`): counters are atomics bumped by its
//! handlers, and the descriptive part (state name, parents, children, what it waits on) sits behind
//! a small mutex the actor touches only when that part changes (phase transitions, waiters added or
//! removed), so the per-message cost is one relaxed atomic add.
//!
//! Mailbox length: actix 0.13 exposes no mailbox length, and counting sends would mean wrapping
//! every `do_send` to every actor. Instead each cell reports what can be known honestly from the
//! inside: `blocked` (the actor's mailbox is paused while it waits on database/store I/O, so
//! messages are queuing) and `queued_effects` (effects decided but not yet performed).

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;

use crate::actors::types::Drv;

/// What kind of actor a cell describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    QueueMonitor,
    Dispatcher,
    Build,
    Step,
    Machine,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::QueueMonitor => "queue_monitor",
            ActorKind::Dispatcher => "dispatcher",
            ActorKind::Build => "build",
            ActorKind::Step => "step",
            ActorKind::Machine => "machine",
        }
    }
}

/// An actor's id, kept compact: a step's is its shared drv path, a build's its number. Printed as
/// `build:<id>`, `step:<drv path>`, or the name itself (`dispatcher`, `queue-monitor`,
/// `machine:<name>`) only when someone reads a snapshot, so a cell that names its parents and
/// children holds pointers, not a formatted copy of every drv path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ActorId {
    Build(i64),
    Step(Drv),
    Named(Arc<str>),
}

impl ActorId {
    /// The id of an actor printed as [`Display`](std::fmt::Display) shows it.
    pub fn parse(s: &str) -> ActorId {
        if let Some(d) = s.strip_prefix("step:") {
            return ActorId::Step(d.into());
        }
        if let Some(n) = s.strip_prefix("build:").and_then(|n| n.parse::<i64>().ok())
            && build_id(n) == s
        {
            return ActorId::Build(n);
        }
        ActorId::Named(s.into())
    }
}

impl std::fmt::Display for ActorId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActorId::Build(id) => write!(f, "build:{id}"),
            ActorId::Step(drv) => write!(f, "step:{drv}"),
            ActorId::Named(name) => f.write_str(name),
        }
    }
}

impl From<&str> for ActorId {
    fn from(s: &str) -> Self {
        ActorId::parse(s)
    }
}

impl From<String> for ActorId {
    fn from(s: String) -> Self {
        ActorId::parse(&s)
    }
}

impl serde::Serialize for ActorId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The descriptive part of a cell, changed on transitions only.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Described {
    pub state: Cow<'static, str>,
    pub parents: Vec<ActorId>,
    pub children: Vec<ActorId>,
    pub waiting_on: Vec<ActorId>,
    /// Free-form detail: the machine building a step, the resolved drv, a failure message.
    pub detail: String,
}

/// One live actor.
#[derive(Debug)]
pub struct ActorCell {
    pub id: ActorId,
    pub kind: ActorKind,
    pub started_at: i64,
    handled: AtomicU64,
    restarts: AtomicU64,
    blocked: AtomicBool,
    queued: AtomicU64,
    described: Mutex<Described>,
    /// Metrics: a step's machine type (set once, after the cell is made).
    group: std::sync::OnceLock<Arc<str>>,
    /// Metrics: when the state name last changed (microseconds on [`since_start`]).
    state_since: AtomicU64,
}

/// Microseconds since the first call (a monotonic clock for state ages).
fn since_start() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let s = START.get_or_init(std::time::Instant::now);
    u64::try_from(s.elapsed().as_micros()).unwrap_or(u64::MAX)
}

impl ActorCell {
    /// Sets the group the metrics count this actor in (a step's machine type); once.
    pub fn set_group(&self, g: Arc<str>) {
        self.group.get_or_init(|| g);
    }

    /// Whether its mailbox waits on its I/O now.
    pub fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    pub fn group(&self) -> Option<&Arc<str>> {
        self.group.get()
    }

    /// The state name now, and how long it has been that.
    pub fn state_and_age(&self) -> (String, std::time::Duration) {
        let state = self
            .described
            .lock()
            .map(|d| d.state.to_string())
            .unwrap_or_default();
        let age = since_start().saturating_sub(self.state_since.load(Ordering::Relaxed));
        (state, std::time::Duration::from_micros(age))
    }

    /// One message handled (the hot path: one relaxed add).
    #[inline]
    pub fn handled(&self) {
        self.handled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn set_blocked(&self, b: bool) {
        self.blocked.store(b, Ordering::Relaxed);
    }

    #[inline]
    pub fn set_queued(&self, n: usize) {
        self.queued.store(n as u64, Ordering::Relaxed);
    }

    /// Changes the descriptive part.
    pub fn describe(&self, f: impl FnOnce(&mut Described)) {
        if let Ok(mut d) = self.described.lock() {
            let was = d.state.clone();
            f(&mut d);
            if d.state != was {
                self.state_since.store(since_start(), Ordering::Relaxed);
            }
        }
    }

    /// Sets the state name if it changed.
    pub fn set_state(&self, state: &'static str) {
        self.describe(|d| {
            if d.state != state {
                d.state = Cow::Borrowed(state);
            }
        });
    }

    pub fn snapshot(&self) -> ActorSnapshot {
        let d = self.described.lock().map(|d| d.clone()).unwrap_or_default();
        let strings = |v: Vec<ActorId>| v.iter().map(ToString::to_string).collect();
        ActorSnapshot {
            id: self.id.to_string(),
            kind: self.kind,
            started_at: self.started_at,
            handled: self.handled.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
            blocked: self.blocked.load(Ordering::Relaxed),
            queued_effects: self.queued.load(Ordering::Relaxed),
            state: d.state.into_owned(),
            parents: strings(d.parents),
            children: strings(d.children),
            waiting_on: strings(d.waiting_on),
            detail: d.detail,
        }
    }
}

/// A copy of a cell at one moment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActorSnapshot {
    pub id: String,
    pub kind: ActorKind,
    pub started_at: i64,
    pub handled: u64,
    pub restarts: u64,
    pub blocked: bool,
    pub queued_effects: u64,
    pub state: String,
    pub parents: Vec<String>,
    pub children: Vec<String>,
    pub waiting_on: Vec<String>,
    pub detail: String,
}

/// Actor ids: `build:<id>`, `step:<drv path>`, `dispatcher`, `queue-monitor`, `machine:<name>`.
pub fn build_id(id: i64) -> String {
    format!("build:{id}")
}

pub fn step_id(drv: &str) -> String {
    format!("step:{drv}")
}

/// The registry of live actors.
#[derive(Debug, Default)]
pub struct Actors {
    cells: DashMap<ActorId, Arc<ActorCell>>,
}

impl Actors {
    /// Registers an actor (replacing a stopped one with the same id) and returns its cell.
    pub fn register(&self, id: impl Into<ActorId>, kind: ActorKind, now: i64) -> Arc<ActorCell> {
        let id = id.into();
        let cell = Arc::new(ActorCell {
            id: id.clone(),
            kind,
            started_at: now,
            handled: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            blocked: AtomicBool::new(false),
            queued: AtomicU64::new(0),
            described: Mutex::new(Described::default()),
            group: std::sync::OnceLock::new(),
            state_since: AtomicU64::new(since_start()),
        });
        self.cells.insert(id, cell.clone());
        cell
    }

    /// Forgets the actor if `cell` is still the registered one.
    pub fn unregister(&self, cell: &Arc<ActorCell>) {
        self.cells.remove_if(&cell.id, |_, c| Arc::ptr_eq(c, cell));
    }

    /// The live cell of `id`.
    pub fn cell(&self, id: &ActorId) -> Option<Arc<ActorCell>> {
        self.cells.get(id).map(|c| c.clone())
    }

    /// Every live cell, unordered (for the metrics: no snapshot copies).
    pub fn cells(&self) -> Vec<Arc<ActorCell>> {
        self.cells.iter().map(|c| c.clone()).collect()
    }

    pub fn get(&self, id: &str) -> Option<ActorSnapshot> {
        self.cells.get(&ActorId::parse(id)).map(|c| c.snapshot())
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Every live actor, sorted by id.
    pub fn snapshot(&self) -> Vec<ActorSnapshot> {
        let mut v: Vec<ActorSnapshot> = self.cells.iter().map(|c| c.snapshot()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_register_count_and_unregister() {
        let a = Actors::default();
        let c = a.register(step_id("/s/x.drv"), ActorKind::Step, 5);
        c.handled();
        c.handled();
        c.set_state("runnable");
        c.describe(|d| d.parents.push(build_id(1).into()));
        let s = a.get("step:/s/x.drv").unwrap();
        assert_eq!((s.handled, s.state.as_str()), (2, "runnable"));
        assert_eq!(s.parents, ["build:1"]);
        // A newer actor with the same id is not removed by the old one's stop.
        let c2 = a.register(step_id("/s/x.drv"), ActorKind::Step, 6);
        a.unregister(&c);
        assert_eq!(a.len(), 1);
        a.unregister(&c2);
        assert!(a.is_empty());
    }

    #[test]
    fn ids_print_as_before_and_parse_back() {
        for (id, printed) in [
            (ActorId::Build(7), "build:7"),
            (ActorId::Step("/s/x.drv".into()), "step:/s/x.drv"),
            (ActorId::Named("dispatcher".into()), "dispatcher"),
            (ActorId::Named("machine:m1".into()), "machine:m1"),
            (ActorId::Named("build:07".into()), "build:07"),
        ] {
            assert_eq!(id.to_string(), printed);
            assert_eq!(ActorId::parse(printed), id);
        }
        assert_eq!(
            ActorId::from(step_id("/s/y.drv")).to_string(),
            "step:/s/y.drv"
        );
        assert_eq!(ActorId::from(build_id(3)), ActorId::Build(3));
        let a = Actors::default();
        a.register(ActorId::Step("/s/z.drv".into()), ActorKind::Step, 1);
        a.register("dispatcher", ActorKind::Dispatcher, 1);
        assert!(a.get("step:/s/z.drv").is_some());
        assert!(a.get("dispatcher").is_some());
        let ids: Vec<String> = a.snapshot().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["dispatcher", "step:/s/z.drv"]);
    }
}
