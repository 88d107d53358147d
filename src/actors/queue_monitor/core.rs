//! The queue monitor as a complete machine: which reads to make, which builds get an actor, which
//! aggregates are held back or ended as DepFailed, and what cancels and bumps reach. Generic over
//! the build actors' addresses ([`Routes`]) so its tests need no actix.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::actors::aggregate::Gate;
use crate::db::QueueEvent;
use crate::db::types::{Build, BuildId, BuildStatus, Jobset};

/// The address of a build actor.
pub trait Routes: 'static {
    type Build: Clone;
    /// Whether the actor behind the address still runs (one that died without saying so is
    /// replaced at the next read).
    fn alive(b: &Self::Build) -> bool;
}

/// The rows a read found: unfinished builds and the gates of the aggregates among them.
pub type Rows = (Vec<Build>, BTreeMap<i64, Gate>);

/// What the monitor takes.
pub enum In<R: Routes> {
    /// The actor (re)started.
    Start,
    /// Listening for queue changes began, or could not.
    Listening(Result<(), String>),
    /// The database said the queue changed.
    Queue(QueueEvent),
    /// A read of the queue answered.
    Read {
        shares: Vec<Jobset>,
        rows: Result<Rows, String>,
    },
    /// Build actors were started, by build id.
    Spawned(Vec<(i64, R::Build)>),
    /// An aggregate held back was looked at again after a constituent finished.
    Regated {
        aggregate: i64,
        result: Result<(Build, Gate), String>,
    },
    /// Ending an aggregate as DepFailed is over (done or failed: the next read decides again).
    AggregateEnded(i64),
    /// A build actor is done.
    BuildDone(i64),
    /// Stop, to be restarted by the supervisor (which reads the whole queue again).
    Restart(String),
}

/// What the monitor does.
pub enum Cmd<R: Routes> {
    /// Listen for queue changes (before the first read, so nothing queued in between is lost).
    Listen,
    /// Send [`In::Restart`] in a second.
    RestartSoon(String),
    /// Read the unfinished builds: all, or those after an id.
    Read {
        after: Option<BuildId>,
    },
    /// Read the whole queue again in a second.
    ReadSoon,
    /// Jobset shares for the dispatcher.
    Shares(Vec<(String, u32)>),
    /// Start a build actor for each row (answered with [`In::Spawned`]).
    Spawn(Vec<Build>),
    /// End an aggregate as DepFailed (answered with [`In::AggregateEnded`]).
    FailAggregate {
        row: Build,
        constituent: BuildId,
        status: BuildStatus,
    },
    /// Look at a held aggregate again (answered with [`In::Regated`]).
    Regate(i64),
    Cancel(R::Build),
    /// Read each build's priority and tell its actor.
    Bump(Vec<(i64, R::Build)>),
    /// Introspection: the build actors alive.
    Describe(Vec<i64>),
    /// A log line of a decision.
    Held {
        build: i64,
        job: String,
        on: usize,
    },
    Stop,
}

/// The monitor's whole state.
pub struct QueueCore<R: Routes> {
    builds: HashMap<i64, R::Build>,
    last_id: i64,
    /// Aggregate builds held back until these constituents finish (`actors::aggregate`).
    held: HashMap<i64, BTreeSet<i64>>,
    /// Aggregates being ended as DepFailed (not ended twice when a read sees them meanwhile).
    failing: BTreeSet<i64>,
    ready: VecDeque<Cmd<R>>,
}

impl<R: Routes> Default for QueueCore<R> {
    fn default() -> Self {
        QueueCore {
            builds: HashMap::new(),
            last_id: 0,
            held: HashMap::new(),
            failing: BTreeSet::new(),
            ready: VecDeque::new(),
        }
    }
}

impl<R: Routes> QueueCore<R> {
    pub fn poll(&mut self) -> Option<Cmd<R>> {
        self.ready.pop_front()
    }

    /// Build actors alive.
    pub fn active(&self) -> usize {
        self.builds.values().filter(|b| R::alive(b)).count()
    }

    /// Aggregates held back.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn push(&mut self, c: Cmd<R>) {
        self.ready.push_back(c);
    }

    fn running(&self, id: i64) -> bool {
        self.builds.get(&id).is_some_and(|b| R::alive(b))
    }

    pub fn on(&mut self, ev: In<R>) {
        match ev {
            In::Start => self.push(Cmd::Listen),
            In::Listening(res) => {
                if let Err(e) = res {
                    self.push(Cmd::RestartSoon(format!("cannot listen: {e}")));
                }
                self.push(Cmd::Read { after: None });
            }
            In::Queue(q) => self.queue_changed(q),
            In::Read { shares, rows } => {
                let shares = shares
                    .into_iter()
                    .map(|j| (j.name, j.scheduling_shares.max(1) as u32))
                    .collect();
                self.push(Cmd::Shares(shares));
                match rows {
                    Ok((rows, gates)) => self.start_builds(rows, &gates),
                    Err(_) => self.push(Cmd::ReadSoon),
                }
            }
            In::Spawned(started) => {
                self.builds.extend(started);
                self.describe();
            }
            In::Regated { aggregate, result } => match result {
                Ok((row, _)) if row.finished => {
                    self.held.remove(&aggregate);
                }
                Ok((_, _)) if self.running(aggregate) => {}
                Ok((row, gate)) => {
                    self.start_builds(vec![row], &BTreeMap::from([(aggregate, gate)]))
                }
                // The next read gates it again.
                Err(_) => {}
            },
            In::AggregateEnded(id) => {
                self.failing.remove(&id);
            }
            In::BuildDone(id) => {
                self.builds.remove(&id);
                self.describe();
                let due: Vec<i64> = self
                    .held
                    .iter()
                    .filter(|(_, on)| on.contains(&id))
                    .map(|(a, _)| *a)
                    .collect();
                for a in due {
                    self.push(Cmd::Regate(a));
                }
            }
            In::Restart(_) => self.push(Cmd::Stop),
        }
    }

    fn queue_changed(&mut self, q: QueueEvent) {
        match q {
            QueueEvent::BuildsAdded(_) => self.push(Cmd::Read {
                after: Some(BuildId(self.last_id)),
            }),
            QueueEvent::BuildsRestarted(_)
            | QueueEvent::Rescan
            | QueueEvent::BuildsCancelled(None) => self.push(Cmd::Read { after: None }),
            QueueEvent::BuildsCancelled(Some(id)) => {
                if let Some(b) = self.builds.get(&id.0) {
                    self.push(Cmd::Cancel(b.clone()));
                }
            }
            QueueEvent::BuildsBumped(id) => {
                let mut targets: Vec<(i64, R::Build)> = match id {
                    Some(id) => self
                        .builds
                        .get(&id.0)
                        .map(|b| vec![(id.0, b.clone())])
                        .unwrap_or_default(),
                    None => self.builds.iter().map(|(k, v)| (*k, v.clone())).collect(),
                };
                targets.sort_by_key(|(id, _)| *id);
                if !targets.is_empty() {
                    self.push(Cmd::Bump(targets));
                }
            }
        }
    }

    /// A build actor for each unfinished row that has none, unless it is an aggregate held back
    /// or ended.
    fn start_builds(&mut self, rows: Vec<Build>, gates: &BTreeMap<i64, Gate>) {
        let mut start = Vec::new();
        let mut seen = BTreeSet::new();
        for row in rows {
            let id = row.id.0;
            self.last_id = self.last_id.max(id);
            if row.finished || self.running(id) || !seen.insert(id) {
                continue;
            }
            if self.gate(&row, gates.get(&id)) {
                start.push(row);
            }
        }
        if start.is_empty() {
            self.describe();
        } else {
            self.push(Cmd::Spawn(start));
        }
    }

    /// Whether `row` may start now: an aggregate (it has a gate) waiting on constituents is held
    /// back, one whose constituent failed is ended as DepFailed; other builds start.
    fn gate(&mut self, row: &Build, gate: Option<&Gate>) -> bool {
        let id = row.id.0;
        match gate {
            None | Some(Gate::Ready) => {
                self.held.remove(&id);
                true
            }
            Some(Gate::Waiting(on)) => {
                if self.held.insert(id, on.clone()).as_ref() != Some(on) {
                    self.push(Cmd::Held {
                        build: id,
                        job: row.job.clone(),
                        on: on.len(),
                    });
                }
                false
            }
            Some(Gate::Failed {
                constituent,
                status,
            }) => {
                self.held.remove(&id);
                if self.failing.insert(id) {
                    self.push(Cmd::FailAggregate {
                        row: row.clone(),
                        constituent: *constituent,
                        status: *status,
                    });
                }
                false
            }
        }
    }

    fn describe(&mut self) {
        let mut ids: Vec<i64> = self.builds.keys().copied().collect();
        ids.sort_unstable();
        self.push(Cmd::Describe(ids));
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
