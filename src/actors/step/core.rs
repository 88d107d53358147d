//! The step's complete logic, without a runtime: [`StepMachine`]'s phases plus everything a step
//! decides around them — its rows (pending, running, carried, resolved, child), the builds that
//! need it and their priority, whether a machine holds its job, where its failure was recorded.
//!
//! Events come in through [`StepCore::on`]; commands come out of [`StepCore::poll`], one at a
//! time, each complete (the performer needs nothing but the command). A command that does I/O
//! ([`Cmd::replies`]) gets exactly one event back, and `poll` gives nothing more until it has come:
//! effects wait behind I/O as they did in the actor's mailbox. A machine effect is turned into
//! commands only when its turn comes, so it sees the state the I/O before it left.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::machine::{BuildOutcome, Effect, Event, Gauge, Phase, Resolution, StepMachine};
use crate::actors::dispatcher::{Priority, RunnableStep};
use crate::actors::limits::{self, BuildLimits};
use crate::actors::messages::BuildPrio;
use crate::actors::types::{Drv, Failure, FailureOrigin, Outputs, Status, Waiter, WaiterRef};

/// A step row: (build id, step number).
pub type Row = (i64, i32);

/// The addresses a step holds, as its runtime knows them: actix addresses in the actor, plain
/// values in unit tests.
pub trait Wiring {
    type Waiter: WaiterRef;
    /// A strong reference to another step (an input, or the resolved child).
    type Dep: Clone + std::fmt::Debug;
    /// Where the step's job goes (the assigned machine's runner and abort handle).
    type Job: Clone + std::fmt::Debug;
    /// A parsed derivation handed from the child lookup to the child's creation.
    type Drv: Clone + std::fmt::Debug;
}

/// What a row goes back to if the write that was to close it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The running attempt's row (the step's failure closes it).
    Running,
    /// A pending row (the step's failure closes it).
    Pending,
    /// Nothing: the step is finished, or the row is no longer its.
    Dropped,
}

/// One row to finish.
#[derive(Debug, Clone, PartialEq)]
pub struct RowEnd {
    pub row: Row,
    pub held: Held,
    pub status: Status,
    pub message: Option<String>,
    /// On success, the realisations of `drv` recorded with the row.
    pub drv: Drv,
    pub outputs: Outputs,
    pub times_built: i32,
    /// The machine that built it (only for a row that ran).
    pub machine: Option<String>,
}

/// A database write.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Finish(RowEnd),
    /// A resolved parent's realisations for its own drv outputs, attributed to `row`.
    Realise {
        outputs: Outputs,
        row: Option<Row>,
    },
    /// A new, already finished row in `build` for the step's own failure.
    FailedRow {
        build: i64,
        system: String,
        failure: Failure,
    },
    /// The drv into `FailedPaths` (a cached failure from now on).
    FailedPath,
}

/// What the performer does when one write of a [`Cmd::Db`] fails for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Stop there: the rows of the writes not done are reported as not closed.
    Stop,
    /// Try every write; report the first error.
    Continue,
}

/// A write that failed for good, as the performer reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteError {
    pub message: String,
    /// Rows the writes meant to close and did not, with what each goes back to.
    pub unclosed: Vec<(Row, Held)>,
}

/// How the step's job must be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOrder<J> {
    pub to: J,
    /// The row the run is recorded in (its log is named for it).
    pub attempt: Option<Row>,
    /// The job's time limits ([`StepCore::limits`]).
    pub limits: Option<BuildLimits>,
}

/// What a waiter is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    Landed(Outputs),
    Failed(Failure),
}

/// Counters of [`Stats`](crate::actors::env::Stats) the step moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    StepsBuilt,
    StepsFailed,
    EarlyCutoffs,
    DbWriteFailures,
    /// A membership message (`AddBuilds`) was handled: one fewer in flight.
    MembershipHandled,
}

/// What watchers are told (the adapter turns it into a `SchedEvent`).
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// A machine took the step from the queue (dispatch latency).
    Dispatched,
    Started {
        machine: String,
    },
    Finished {
        status: Status,
        built: bool,
    },
    EarlyCutoff {
        drv: Drv,
    },
}

/// How the child lookup ended.
#[derive(Debug, Clone)]
pub enum Found<D, X> {
    /// A live step for the resolved drv: join it, and tell it our builds.
    Live {
        key: Drv,
        dep: D,
    },
    /// A step made for it just now (with our builds): join it.
    Spawned {
        key: Drv,
        dep: D,
    },
    /// Its outputs are valid already: early cutoff.
    Built(Outputs),
    /// No step, not built: make one.
    Missing(X),
    Unreadable(String),
}

/// How the step of a derivation an input produced (dynamic derivations) stands.
#[derive(Debug, Clone)]
pub enum Produced<D> {
    /// Its step (live, or made now with its closure's): wait on it.
    Step { key: Drv, dep: D },
    /// Its outputs are valid already: it has landed.
    Built(Outputs),
    /// It cannot be built (unreadable, a cached failure): the step fails as DepFailed.
    Failed(Failure),
}

/// The events a step takes: messages from other actors and the replies to its commands.
#[derive(Debug)]
pub enum In<A: Wiring> {
    Start,
    /// A step's outputs landed: an input's, or the resolved child's.
    Landed {
        from: Drv,
        outputs: Outputs,
    },
    Failed {
        from: Drv,
        failure: Failure,
    },
    WaiterAdded(A::Waiter),
    WaiterRemoved(Waiter),
    BuildsAdded(Vec<(i64, BuildPrio)>),
    /// A pending row made for this step by a resolution elsewhere.
    RowAdopted(Row),
    Assigned {
        machine: String,
        held: bool,
        job: A::Job,
    },
    JobDone(BuildOutcome),
    NoMachine(String),
    RetryDue,
    // Replies.
    Resolved {
        resolution: Resolution,
        /// The rows the resolution's transaction wrote: (own Resolved row, resolved step's row).
        rows: Option<(Row, Row)>,
    },
    Child(Found<A::Dep, A::Drv>),
    /// The reply to `AttachProduced`.
    Produced {
        drv: Drv,
        produced: Produced<A::Dep>,
    },
    Started(Option<Row>),
    Written,
    WriteFailed {
        error: WriteError,
        /// The job was not sent: the machine's slot is to be given back.
        free_slot: bool,
        /// Nothing waits on the write (the step is finished or stopping): only counted.
        detached: bool,
    },
}

/// The commands a step gives.
#[derive(Debug)]
pub enum Cmd<A: Wiring> {
    /// Resolve the drv with these input realisations; if it resolves to another drv, write that
    /// drv and then, in one transaction, its row and ours as Resolved (`pending` is ours, or a
    /// new one is made in `owner`). Replies `Resolved` or `WriteFailed`.
    Resolve {
        inputs: BTreeMap<(String, String), String>,
        owner: Option<i64>,
        pending: Option<Row>,
    },
    /// Find the step of the resolved drv (or whether it is built). Replies `Child`.
    FindChild {
        resolved: String,
    },
    /// Make the step of the resolved drv, for these builds (or take one live since the lookup).
    /// Replies `Child(Spawned)`.
    SpawnChild {
        resolved: String,
        drv: A::Drv,
        builds: Vec<(i64, BuildPrio)>,
    },
    /// Get the step of a derivation an input produced, with its closure's, through the graph
    /// (shared when live, made for `build` when missing; nothing when it is built).
    /// Replies `Produced`.
    AttachProduced {
        drv: String,
        /// The (producer drv, output) pairs holding it: its rows link to their rows.
        by: Vec<(String, String)>,
        build: Option<i64>,
        prio: Option<BuildPrio>,
    },
    /// Join the resolved drv's step: hand it our pending row, tell it our builds, wait on it.
    JoinChild {
        dep: A::Dep,
        adopt: Option<Row>,
        builds: Option<Vec<(i64, BuildPrio)>>,
    },
    /// Into the dispatcher's queue (again, with a new priority).
    Enqueue(RunnableStep),
    LeaveQueue,
    FreeSlot(String),
    /// Start `pending`, or make a running row in `owner`. Replies `Started` or `WriteFailed`.
    StartRow {
        pending: Option<Row>,
        owner: Option<i64>,
        machine: String,
        system: String,
        /// Where the job goes once the row is written (named for it).
        job: Option<A::Job>,
        /// The job's time limits ([`StepCore::limits`]).
        limits: Option<BuildLimits>,
    },
    SendJob(JobOrder<A::Job>),
    AbortJob(A::Job),
    /// Database writes, in order, after the drv's realisations into the store's own table
    /// (`register`; a failure there is logged only). Replies `Written` or `WriteFailed`.
    Db {
        register: Option<Outputs>,
        writes: Vec<Write>,
        on_error: OnError,
        free_slot: bool,
        detached: bool,
    },
    Notify {
        to: Vec<A::Waiter>,
        notice: Notice,
    },
    /// Our builds changed: pass them down to the inputs and the child.
    PassBuilds {
        to: Vec<A::Dep>,
        builds: Vec<(i64, BuildPrio)>,
    },
    Timer(Duration),
    Gauge {
        left: Option<Gauge>,
        entered: Option<Gauge>,
    },
    Count(Counter),
    Note(Note),
    /// Nothing more to do: stop the actor.
    Stop,
}

impl<A: Wiring> Cmd<A> {
    /// Whether the command does I/O whose reply the step waits for.
    pub fn replies(&self) -> bool {
        matches!(
            self,
            Cmd::Resolve { .. }
                | Cmd::FindChild { .. }
                | Cmd::AttachProduced { .. }
                | Cmd::SpawnChild { .. }
                | Cmd::StartRow { .. }
                | Cmd::Db { .. }
        )
    }

    /// Bookkeeping that a failed write does not cancel.
    fn survives_failure(&self) -> bool {
        matches!(self, Cmd::Gauge { .. } | Cmd::Count(_) | Cmd::Note(_))
    }
}

/// The carried attempt: the row a runner restart left busy on a builder.
#[derive(Debug, Clone, PartialEq)]
pub struct Carried {
    pub row: Row,
    pub machine: String,
}

/// The step.
pub struct StepCore<A: Wiring> {
    machine: StepMachine<A::Waiter>,
    system: String,
    features: BTreeSet<String>,
    /// `preferLocalBuild`, where the runner's own builder could build it.
    prefer_local: bool,
    /// Strong references down the graph: the input steps and the resolved child.
    deps: Vec<A::Dep>,
    /// Builds needing this step, with their priorities; sorted by build id, without duplicates.
    builds: Vec<(i64, BuildPrio)>,
    /// Rows made for this step by resolutions, still pending (not started).
    pending_rows: Vec<Row>,
    running_row: Option<Row>,
    carried_row: Option<Box<Carried>>,
    /// This step's own Resolved row, and the row of the resolved step it points at.
    resolved_row: Option<Row>,
    child_row: Option<Row>,
    job: Option<A::Job>,
    machine_name: String,
    /// A machine has (or is being sent) this step's job.
    in_flight: bool,
    /// This step builds the resolved drv of another step.
    resolved_child: bool,
    /// The drv this step resolved to.
    resolved_to: Option<Drv>,
    /// Set when this step recorded its own failure: carried by the failure it passes on.
    failure_origin: Option<Box<FailureOrigin>>,
    /// Machine effects not turned into commands yet, and the commands of the one being done.
    effects: VecDeque<Effect<A::Waiter>>,
    ready: VecDeque<Cmd<A>>,
    /// A command's reply is awaited.
    awaiting: bool,
}

impl<A: Wiring> StepCore<A> {
    /// `recorded`: at restart, the step's own Resolved row and its child's. `carried`: the row
    /// left busy on a builder by a restart, taken from the ledger.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        machine: StepMachine<A::Waiter>,
        system: String,
        features: BTreeSet<String>,
        deps: Vec<A::Dep>,
        builds: Vec<(i64, BuildPrio)>,
        recorded: Option<(Row, Option<Row>)>,
        carried: Option<Carried>,
        resolved_child: bool,
    ) -> Self {
        let machine = match &carried {
            Some(c) => machine.with_carried_attempt(c.machine.clone()),
            None => machine,
        };
        let mut builds = builds;
        builds.sort_by_key(|b| b.0);
        builds.dedup_by_key(|b| b.0);
        let (resolved_row, child_row) = match recorded {
            Some((own, child)) => (Some(own), child),
            None => (None, None),
        };
        StepCore {
            machine,
            system,
            features,
            prefer_local: false,
            deps,
            builds,
            pending_rows: Vec::new(),
            running_row: None,
            carried_row: carried.map(Box::new),
            resolved_row,
            child_row,
            job: None,
            machine_name: String::new(),
            in_flight: false,
            resolved_child,
            resolved_to: None,
            failure_origin: None,
            effects: VecDeque::new(),
            ready: VecDeque::new(),
            awaiting: false,
        }
    }

    /// The same, its runnable step preferring a local build (`preferLocalBuild`, kept only where
    /// the runner's own builder could build it: see `actors::graph::Graph::needs`).
    pub fn preferring_local(mut self, prefer_local: bool) -> Self {
        self.prefer_local = prefer_local;
        self
    }

    pub fn machine(&self) -> &StepMachine<A::Waiter> {
        &self.machine
    }

    pub fn drv(&self) -> &Drv {
        self.machine.drv()
    }

    pub fn phase(&self) -> &Phase {
        self.machine.phase()
    }

    pub fn resolved_to(&self) -> Option<&Drv> {
        self.resolved_to.as_ref()
    }

    pub fn is_resolved_child(&self) -> bool {
        self.resolved_child
    }

    pub fn pending_rows(&self) -> &[Row] {
        &self.pending_rows
    }

    pub fn running_row(&self) -> Option<Row> {
        self.running_row
    }

    /// Commands not performed yet (for introspection).
    pub fn queued(&self) -> usize {
        self.effects.len() + self.ready.len()
    }

    pub fn is_awaiting(&self) -> bool {
        self.awaiting
    }

    /// The build that owns this step's rows: the oldest build that needs it.
    pub fn owner(&self) -> Option<i64> {
        self.builds.first().map(|b| b.0)
    }

    /// The time limits its job runs with: those of the oldest build of which it is the top-level
    /// drv, else of the oldest build needing it, as Hydra chooses ([`limits::choose`]); `None`
    /// without builds (the runner's defaults).
    pub fn limits(&self) -> Option<BuildLimits> {
        limits::choose(self.drv(), &self.builds)
    }

    /// The step's place in the queue: the best build's global priority and jobset, the highest
    /// local priority, the lowest build id among the best.
    pub fn priority(&self) -> Priority {
        let best = self.builds.iter().max_by(|a, b| {
            a.1.global_priority
                .cmp(&b.1.global_priority)
                .then(b.0.cmp(&a.0))
        });
        match best {
            Some((id, p)) => Priority {
                global_priority: p.global_priority,
                jobset: p.jobset.to_string(),
                local_priority: self
                    .builds
                    .iter()
                    .map(|b| b.1.local_priority)
                    .max()
                    .unwrap_or(0),
                // The graph's to know: filled in when the step is queued.
                critical_path_ms: 0,
                build_id: *id,
            },
            None => Priority {
                global_priority: 0,
                jobset: String::new(),
                local_priority: 0,
                critical_path_ms: 0,
                build_id: i64::MAX,
            },
        }
    }

    /// The next command, or `None` when there is none or a reply is awaited.
    pub fn poll(&mut self) -> Option<Cmd<A>> {
        if self.awaiting {
            return None;
        }
        loop {
            if let Some(cmd) = self.ready.pop_front() {
                self.awaiting = cmd.replies();
                return Some(cmd);
            }
            let Some(effect) = self.effects.pop_front() else {
                // Drained: the queues' memory goes until the next event (most steps spend most
                // of their life waiting, and a queue keeps room for four commands).
                self.ready = VecDeque::new();
                self.effects = VecDeque::new();
                return None;
            };
            self.translate(effect);
        }
    }

    /// Gives back a command `poll` handed out, unperformed: it is the next one `poll` hands out
    /// (given back last-first, commands keep their order). A dormant step gives back what it
    /// cannot perform where it stands, and wakes first.
    pub fn unpoll(&mut self, cmd: Cmd<A>) {
        self.awaiting = false;
        self.ready.push_front(cmd);
    }

    /// Whether the step may be held as plain state, without a runtime of its own: it only waits
    /// for inputs, has nothing left to do, and holds nothing that stopping would have to close
    /// (no row, no job).
    pub fn may_sleep(&self) -> bool {
        matches!(self.machine.phase(), Phase::WaitingForInputs)
            && !self.awaiting
            && self.effects.is_empty()
            && self.ready.is_empty()
            && self.pending_rows.is_empty()
            && self.running_row.is_none()
            && self.carried_row.is_none()
            && self.resolved_row.is_none()
            && self.child_row.is_none()
            && self.job.is_none()
            && !self.in_flight
    }

    /// What stopping leaves behind, done without waiting (the actor is gone): the phase's gauge;
    /// and, when the step stops unfinished because nothing references it any more (no build needs
    /// it), what abandoning does — out of the queue, its job aborted, its open rows closed as
    /// Cancelled. A carried row neither resumed nor closed is closed as Aborted (a failing write
    /// leaves it busy for the next start to decide).
    pub fn on_stop(&mut self) -> Vec<Cmd<A>> {
        let mut cmds = vec![Cmd::Gauge {
            left: self.machine.phase().gauge(),
            entered: None,
        }];
        let drv = self.drv().clone();
        if let Some(c) = self.carried_row.take() {
            tracing::warn!(drv = %drv, build = c.row.0, stepnr = c.row.1, "a step stopped holding a carried attempt: closing it");
            let close = Write::Finish(RowEnd {
                row: c.row,
                held: Held::Dropped,
                status: Status::Aborted,
                message: Some(
                    "aborted: the runner restarted while this step was busy, and the step stopped"
                        .into(),
                ),
                drv,
                outputs: Outputs::new(),
                times_built: 0,
                machine: None,
            });
            cmds.push(detached(vec![close], OnError::Stop));
        }
        if !self.machine.is_finished() {
            tracing::info!(drv = %self.drv(), "step stopped unfinished: no build needs it");
            cmds.extend(self.let_go());
        }
        cmds
    }

    /// Takes one event.
    pub fn on(&mut self, ev: In<A>) -> &mut Self {
        match ev {
            In::Start => self.feed(Event::Start),
            In::Landed { from, outputs } => {
                let ev = match self.machine.phase() {
                    Phase::AwaitingResolved { resolved } if resolved.as_str() == &*from => {
                        Event::ChildLanded(outputs)
                    }
                    _ => Event::InputLanded { drv: from, outputs },
                };
                self.feed(ev)
            }
            In::Failed { from, failure } => {
                let ev = match self.machine.phase() {
                    Phase::AwaitingResolved { resolved } if resolved.as_str() == &*from => {
                        Event::ChildFailed(failure)
                    }
                    _ => Event::InputFailed { drv: from, failure },
                };
                self.feed(ev)
            }
            In::WaiterAdded(w) => self.feed(Event::WaiterAdded(w)),
            In::WaiterRemoved(w) => {
                if let Waiter::Build(id) = &w
                    && let Ok(i) = self.builds.binary_search_by_key(id, |b| b.0)
                {
                    self.builds.remove(i);
                }
                self.feed(Event::WaiterRemoved(w))
            }
            In::BuildsAdded(builds) => self.builds_added(builds),
            In::RowAdopted(row) => self.row_adopted(row),
            In::Assigned { machine, held, job } => {
                if !matches!(self.machine.phase(), Phase::Runnable) {
                    // Assigned while no longer runnable: the slot goes back.
                    self.ready.push_back(Cmd::FreeSlot(machine));
                    return self;
                }
                self.job = Some(job);
                self.ready.push_back(Cmd::Note(Note::Dispatched));
                // The slot's machine, so a write failing before the job is sent gives it back.
                self.machine_name = machine.clone();
                self.feed(if held {
                    Event::Adopted { machine }
                } else {
                    Event::Dispatched { machine }
                })
            }
            In::JobDone(outcome) => {
                self.in_flight = false;
                self.feed(Event::BuildDone(outcome.storable()))
            }
            In::NoMachine(m) => self.feed(Event::NoMachine(m)),
            In::RetryDue => self.feed(Event::RetryDue),
            In::Resolved { resolution, rows } => {
                self.awaiting = false;
                if let Some((own, child)) = rows {
                    self.pending_rows.retain(|r| *r != own);
                    self.resolved_row = Some(own);
                    self.child_row = Some(child);
                }
                self.feed(Event::Resolved(resolution))
            }
            In::Child(found) => {
                self.awaiting = false;
                self.child_found(found)
            }
            In::Produced { drv, produced } => {
                self.awaiting = false;
                self.produced_found(drv, produced)
            }
            In::Started(row) => {
                self.awaiting = false;
                // The performer sent the job once the row was written.
                self.running_row = row;
                self
            }
            In::Written => {
                self.awaiting = false;
                self
            }
            In::WriteFailed {
                error,
                free_slot,
                detached,
            } => {
                self.awaiting = false;
                self.write_failed(error, free_slot, detached)
            }
        }
    }

    /// Feeds the phase machine; the gauges move with the phase, at once.
    fn feed(&mut self, ev: Event<A::Waiter>) -> &mut Self {
        let before = self.machine.phase().gauge();
        let effects = self.machine.on(ev);
        let after = self.machine.phase().gauge();
        if before != after {
            self.ready.push_front(Cmd::Gauge {
                left: before,
                entered: after,
            });
        }
        self.effects.extend(effects);
        self
    }

    fn builds_added(&mut self, builds: Vec<(i64, BuildPrio)>) -> &mut Self {
        self.ready.push_back(Cmd::Count(Counter::MembershipHandled));
        let before = (self.owner(), self.priority());
        if self.builds.capacity() == 0 {
            // Most steps belong to one build: room for exactly the builds added first.
            self.builds.reserve_exact(builds.len());
        }
        for (id, prio) in &builds {
            match self.builds.binary_search_by_key(id, |b| b.0) {
                Ok(i) => self.builds[i].1 = prio.clone(),
                Err(i) => self.builds.insert(i, (*id, prio.clone())),
            }
        }
        // Passed down only when it changes what the steps below need to know (the owner, the
        // priority): failures reach every dependent build through the waiters, so no step needs
        // the full list.
        if (self.owner(), self.priority()) != before {
            if !self.deps.is_empty() {
                self.ready.push_back(Cmd::PassBuilds {
                    to: self.deps.clone(),
                    builds,
                });
            }
            // Requeued only when its place in the queue changes (it stays Runnable).
            if matches!(self.machine.phase(), Phase::Runnable) && self.priority() != before.1 {
                self.effects.push_back(Effect::MakeRunnable);
            }
        }
        self
    }

    fn row_adopted(&mut self, row: Row) -> &mut Self {
        let drv = self.drv().clone();
        match self.machine.phase().clone() {
            // Finished: a row it cannot close is only counted (its outcome reached the resolving
            // step through the waiters already).
            Phase::Succeeded(outputs) => {
                // Early cutoff within the running graph: the resolved drv is built already.
                self.ready.push_back(Cmd::Count(Counter::EarlyCutoffs));
                self.ready
                    .push_back(Cmd::Note(Note::EarlyCutoff { drv: drv.clone() }));
                let close = Write::Finish(cached(row, drv, outputs, Held::Dropped));
                self.ready.push_back(detached(vec![close], OnError::Stop));
            }
            Phase::Failed(f) => {
                let close = Write::Finish(RowEnd {
                    row,
                    held: Held::Dropped,
                    status: f.status,
                    message: Some(f.message),
                    drv,
                    outputs: Outputs::new(),
                    times_built: 0,
                    machine: None,
                });
                self.ready.push_back(detached(vec![close], OnError::Stop));
            }
            _ => self.pending_rows.push(row),
        }
        self
    }

    fn child_found(&mut self, found: Found<A::Dep, A::Drv>) -> &mut Self {
        let resolved = match self.machine.phase() {
            Phase::AwaitingResolved { resolved } => resolved.clone(),
            // Not waiting on a child (cannot happen: the lookup blocks the step).
            _ => return self,
        };
        match found {
            Found::Live { key, dep } => {
                self.resolved_to = Some(key);
                self.ready.push_back(Cmd::JoinChild {
                    dep: dep.clone(),
                    adopt: self.child_row,
                    builds: Some(self.builds.clone()),
                });
                self.deps.push(dep);
                self
            }
            Found::Spawned { key, dep } => {
                self.resolved_to = Some(key);
                self.ready.push_back(Cmd::JoinChild {
                    dep: dep.clone(),
                    adopt: self.child_row,
                    builds: None,
                });
                self.deps.push(dep);
                self
            }
            Found::Missing(drv) => {
                self.ready.push_back(Cmd::SpawnChild {
                    resolved,
                    drv,
                    builds: self.builds.clone(),
                });
                self
            }
            Found::Built(outputs) => {
                // Early cutoff: the resolved drv is already built.
                tracing::info!(drv = %self.drv(), resolved = %resolved, "early cutoff: resolved drv already built");
                let key: Drv = resolved.as_str().into();
                self.ready.push_back(Cmd::Count(Counter::EarlyCutoffs));
                self.ready
                    .push_back(Cmd::Note(Note::EarlyCutoff { drv: key.clone() }));
                if let Some(row) = self.child_row {
                    // The success fed below is recorded after this write; if it fails for good,
                    // the step fails instead.
                    self.ready.push_back(Cmd::Db {
                        register: None,
                        writes: vec![Write::Finish(cached(
                            row,
                            key,
                            outputs.clone(),
                            Held::Dropped,
                        ))],
                        on_error: OnError::Stop,
                        free_slot: false,
                        detached: false,
                    });
                }
                self.feed(Event::ChildLanded(outputs))
            }
            Found::Unreadable(msg) => {
                let msg = format!("cannot read resolved derivation {resolved}: {msg}");
                self.feed(Event::ChildFailed(Failure::new(Status::Failed, msg)))
            }
        }
    }

    /// The step of a derivation an input produced: waited on like an input.
    fn produced_found(&mut self, drv: Drv, produced: Produced<A::Dep>) -> &mut Self {
        match produced {
            Produced::Step { key, dep } => {
                tracing::info!(drv = %self.drv(), produced = %key, "waiting on a produced derivation");
                self.ready.push_back(Cmd::JoinChild {
                    dep: dep.clone(),
                    adopt: None,
                    builds: Some(self.builds.clone()),
                });
                self.deps.push(dep);
                self
            }
            Produced::Built(outputs) => {
                tracing::info!(drv = %self.drv(), produced = %drv, "produced derivation already built");
                self.feed(Event::InputLanded { drv, outputs })
            }
            Produced::Failed(failure) => self.feed(Event::InputFailed { drv, failure }),
        }
    }

    /// A write failed for good: counted; unless detached, the commands queued behind it are
    /// dropped, the rows it did not close are the step's again, and the machine is told (it fails
    /// the step, see [`Event::WriteFailed`]).
    fn write_failed(&mut self, error: WriteError, free_slot: bool, detached: bool) -> &mut Self {
        self.ready.push_front(Cmd::Count(Counter::DbWriteFailures));
        if detached {
            return self;
        }
        self.effects.clear();
        self.ready.retain(Cmd::survives_failure);
        if free_slot {
            self.in_flight = false;
            self.ready
                .push_back(Cmd::FreeSlot(self.machine_name.clone()));
        }
        for (row, held) in error.unclosed {
            match held {
                Held::Running => self.running_row = Some(row),
                Held::Pending => self.pending_rows.push(row),
                Held::Dropped => {}
            }
        }
        self.feed(Event::WriteFailed(error.message))
    }

    /// Turns one machine effect into commands, with the state as it is now.
    fn translate(&mut self, effect: Effect<A::Waiter>) {
        let drv = self.drv().clone();
        match effect {
            Effect::Resolve { inputs } => {
                let owner = self.owner();
                let pending =
                    owner.and_then(|o| self.pending_rows.iter().find(|r| r.0 == o).copied());
                self.ready.push_back(Cmd::Resolve {
                    inputs,
                    owner,
                    pending,
                });
            }
            Effect::AttachChild { resolved } => {
                self.resolved_to = Some(resolved.as_str().into());
                self.ready.push_back(Cmd::FindChild { resolved });
            }
            Effect::AttachProduced { drv, by } => {
                let build = self.owner();
                let prio = self.builds.first().map(|b| b.1.clone());
                self.ready.push_back(Cmd::AttachProduced {
                    drv,
                    by,
                    build,
                    prio,
                });
            }
            Effect::MakeRunnable => self.ready.push_back(Cmd::Enqueue(RunnableStep {
                drv: drv.to_string(),
                system: self.system.clone(),
                features: self.features.clone(),
                prefer_local: self.prefer_local,
                priority: self.priority(),
            })),
            Effect::RecordStart { machine } => self.record_start(machine),
            Effect::ResumeCarried { machine } => match self.carried_row.take() {
                // The builder goes on with the attempt it ran before the restart: its row, busy
                // since then, is the running row (nothing to write), and the job is sent for the
                // builder to attach to its build.
                Some(c) => {
                    tracing::info!(drv = %drv, build = c.row.0, stepnr = c.row.1, machine = %machine, "the builder goes on with the attempt it ran before the restart, in the same row");
                    self.machine_name = machine.clone();
                    self.in_flight = true;
                    self.running_row = Some(c.row);
                    self.ready.push_back(Cmd::Note(Note::Started { machine }));
                    if let Some(to) = self.job.clone() {
                        self.ready.push_back(Cmd::SendJob(JobOrder {
                            to,
                            attempt: Some(c.row),
                            limits: self.limits(),
                        }));
                    }
                }
                // Resumed only with a row the step holds; without one, a new attempt.
                None => self.record_start(machine),
            },
            Effect::CloseCarried { status, message } => {
                if let Some(c) = self.carried_row.take() {
                    tracing::info!(drv = %drv, build = c.row.0, stepnr = c.row.1, machine = %c.machine, status = ?status, "closing the attempt carried over the restart");
                    // Closing before a new attempt starts: a failure leaves the job unsent.
                    let not_started = matches!(self.machine.phase(), Phase::Building { .. });
                    self.ready.push_back(Cmd::Db {
                        register: None,
                        writes: vec![Write::Finish(RowEnd {
                            row: c.row,
                            held: Held::Pending,
                            status,
                            message: Some(message),
                            drv,
                            outputs: Outputs::new(),
                            times_built: 0,
                            machine: None,
                        })],
                        on_error: OnError::Stop,
                        free_slot: not_started,
                        detached: false,
                    });
                }
            }
            Effect::RecordSuccess { outputs, built } => self.record_success(outputs, built),
            Effect::RecordRetry {
                status, message, ..
            } => {
                if let Some(row) = self.running_row.take() {
                    self.ready.push_back(Cmd::Db {
                        register: None,
                        writes: vec![Write::Finish(RowEnd {
                            row,
                            held: Held::Running,
                            status,
                            message: Some(message),
                            drv,
                            outputs: Outputs::new(),
                            times_built: 0,
                            machine: None,
                        })],
                        on_error: OnError::Stop,
                        free_slot: false,
                        detached: false,
                    });
                }
            }
            Effect::RecordFailure(failure) => self.record_failure(failure),
            Effect::ScheduleRetry { after } => self.ready.push_back(Cmd::Timer(after)),
            Effect::NotifyLanded { to, outputs } => {
                if !to.is_empty() {
                    self.ready.push_back(Cmd::Notify {
                        to,
                        notice: Notice::Landed(outputs),
                    });
                }
            }
            Effect::NotifyFailed { to, mut failure } => {
                if failure.origin.is_none() {
                    failure.origin = self.failure_origin.clone();
                }
                if !to.is_empty() {
                    self.ready.push_back(Cmd::Notify {
                        to,
                        notice: Notice::Failed(failure),
                    });
                }
            }
            Effect::Abandon => self.abandon(),
        }
    }

    fn record_start(&mut self, machine: String) {
        self.machine_name = machine.clone();
        self.in_flight = true;
        // The owner build's pending row first, else any.
        let i = self
            .owner()
            .and_then(|o| self.pending_rows.iter().position(|r| r.0 == o))
            .or(if self.pending_rows.is_empty() {
                None
            } else {
                Some(0)
            });
        let pending = i.map(|i| self.pending_rows.remove(i));
        self.ready.push_back(Cmd::Note(Note::Started {
            machine: machine.clone(),
        }));
        self.ready.push_back(Cmd::StartRow {
            pending,
            owner: self.owner(),
            machine,
            system: self.system.clone(),
            job: self.job.clone(),
            limits: self.limits(),
        });
    }

    fn record_success(&mut self, outputs: Outputs, built: bool) {
        let drv = self.drv().clone();
        self.ready.push_back(Cmd::Note(Note::Finished {
            status: Status::Success,
            built,
        }));
        if built {
            self.ready.push_back(Cmd::Count(Counter::StepsBuilt));
            let mut writes = Vec::new();
            if let Some(row) = self.running_row.take() {
                let machine = (!self.machine_name.is_empty()).then(|| self.machine_name.clone());
                writes.push(Write::Finish(RowEnd {
                    row,
                    held: Held::Running,
                    status: Status::Success,
                    message: None,
                    drv: drv.clone(),
                    outputs: outputs.clone(),
                    times_built: 1,
                    machine,
                }));
            }
            // Rows adopted from other steps' resolutions while this one built: each an early
            // cutoff (the resolved drv another step already built for them).
            for row in std::mem::take(&mut self.pending_rows) {
                self.ready.push_back(Cmd::Count(Counter::EarlyCutoffs));
                self.ready
                    .push_back(Cmd::Note(Note::EarlyCutoff { drv: drv.clone() }));
                writes.push(Write::Finish(cached(
                    row,
                    drv.clone(),
                    outputs.clone(),
                    Held::Pending,
                )));
            }
            // The store's own realisations first, then the rows: one I/O.
            self.ready.push_back(Cmd::Db {
                register: Some(outputs),
                writes,
                on_error: OnError::Stop,
                free_slot: false,
                detached: false,
            });
        } else {
            // A resolved parent aliases its child's outputs: realisations for its own drv.
            let row = self.resolved_row;
            let writes = if outputs.is_empty() {
                vec![]
            } else {
                vec![Write::Realise {
                    outputs: outputs.clone(),
                    row,
                }]
            };
            self.ready.push_back(Cmd::Db {
                register: Some(outputs),
                writes,
                on_error: OnError::Stop,
                free_slot: false,
                detached: false,
            });
        }
    }

    fn record_failure(&mut self, failure: Failure) {
        self.ready.push_back(Cmd::Count(Counter::StepsFailed));
        self.ready.push_back(Cmd::Note(Note::Finished {
            status: failure.status,
            built: false,
        }));
        if failure.status == Status::DepFailed {
            // Not this step's own failure: the failing step records it.
            return;
        }
        let drv = self.drv().clone();
        // A resolved step's own row is its Resolved one: it gets no second row.
        let owner = self.owner().filter(|_| self.resolved_row.is_none());
        let running = self.running_row.take();
        // The other builds that need this step learn where it failed from the failure itself
        // (each records its own row when the failure reaches it).
        self.failure_origin = running.map(|r| r.0).or(owner).map(|build| {
            Box::new(FailureOrigin {
                drv: drv.to_string(),
                system: self.system.clone(),
                status: failure.status,
                message: failure.message.clone(),
                build,
            })
        });
        let mut writes = Vec::new();
        match (running, owner) {
            (Some(row), _) => {
                let machine = (!self.machine_name.is_empty()).then(|| self.machine_name.clone());
                writes.push(Write::Finish(RowEnd {
                    row,
                    held: Held::Dropped,
                    status: failure.status,
                    message: Some(failure.message.clone()),
                    drv: drv.clone(),
                    outputs: Outputs::new(),
                    times_built: 1,
                    machine,
                }));
            }
            (None, Some(build)) => writes.push(Write::FailedRow {
                build,
                system: self.system.clone(),
                failure: failure.clone(),
            }),
            (None, None) => {}
        }
        for row in std::mem::take(&mut self.pending_rows) {
            writes.push(Write::Finish(RowEnd {
                row,
                held: Held::Dropped,
                status: failure.status,
                message: Some(failure.message.clone()),
                drv: drv.clone(),
                outputs: Outputs::new(),
                times_built: 0,
                machine: None,
            }));
        }
        if matches!(failure.status, Status::Failed | Status::FailedWithOutput) {
            writes.push(Write::FailedPath);
        }
        // Every write is tried; the first permanent error reaches the machine (which passes the
        // failure on again: the notification was queued behind these writes).
        if !writes.is_empty() {
            self.ready.push_back(Cmd::Db {
                register: None,
                writes,
                on_error: OnError::Continue,
                free_slot: false,
                detached: false,
            });
        }
    }

    /// Nobody needs the step any more: out of the queue, its running build killed, its rows
    /// closed as Cancelled, then the actor stops. Nothing is left to fail: a row that cannot be
    /// closed is counted.
    fn abandon(&mut self) {
        tracing::info!(drv = %self.drv(), "step abandoned: no build needs it");
        let cmds = self.let_go();
        self.ready.extend(cmds);
        self.ready.push_back(Cmd::Stop);
    }

    /// What a step nobody needs does, abandoned or stopped unfinished: out of the queue, its
    /// running job aborted, its open rows closed as Cancelled (every close tried, nothing waiting
    /// on them).
    fn let_go(&mut self) -> Vec<Cmd<A>> {
        let mut cmds = vec![Cmd::LeaveQueue];
        if self.in_flight
            && let Some(job) = self.job.clone()
        {
            cmds.push(Cmd::AbortJob(job));
        }
        let drv = self.drv().clone();
        let rows: Vec<Write> = self
            .running_row
            .take()
            .into_iter()
            .chain(std::mem::take(&mut self.pending_rows))
            .map(|row| {
                Write::Finish(RowEnd {
                    row,
                    held: Held::Dropped,
                    status: Status::Cancelled,
                    message: Some("cancelled: no build needs this step".into()),
                    drv: drv.clone(),
                    outputs: Outputs::new(),
                    times_built: 0,
                    machine: None,
                })
            })
            .collect();
        if !rows.is_empty() {
            cmds.push(detached(rows, OnError::Continue));
        }
        cmds
    }
}

/// Writes nothing waits on.
fn detached<A: Wiring>(writes: Vec<Write>, on_error: OnError) -> Cmd<A> {
    Cmd::Db {
        register: None,
        writes,
        on_error,
        free_slot: false,
        detached: true,
    }
}

/// A pending row of a step whose drv was built elsewhere: Success, not built here.
fn cached(row: Row, drv: Drv, outputs: Outputs, held: Held) -> RowEnd {
    RowEnd {
        row,
        held,
        status: Status::Success,
        message: None,
        drv,
        outputs,
        times_built: 0,
        machine: None,
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
