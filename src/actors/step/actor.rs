//! The step actor: the thin actix adapter around [`StepMachine`]. It feeds messages to the machine
//! and performs the effects in order: database and store I/O first (blocking its own mailbox while it
//! runs), then the messages to other actors.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
#[cfg(feature = "test-hooks")]
use std::time::Duration;

use actix::prelude::*;

use super::machine::{Effect, Event, Gauge, Phase, Resolution, StepMachine, gauge_change};
use crate::actors::carried::CarriedRow;
use crate::actors::dispatcher::actor::{DispatcherActor, Runnable, StepLeft};
use crate::actors::dispatcher::{Priority, RunnableStep};
use crate::actors::env::{Env, SchedEvent, Stats, persist};
use crate::actors::introspect::{ActorCell, ActorId, ActorKind};
use crate::actors::messages::*;
use crate::actors::registry::StepRef;
use crate::actors::types::{Drv, Failure, Outputs, Status, Waiter};
use crate::db::DbError;
use crate::db::types::{BuildId, BusyPhase, FinishStep, NewStep, Realisation};
use crate::store::{Derivation, DrvOutput};

/// A step row: (build id, step number).
pub type Row = (i64, i32);

pub struct StepActor {
    env: Arc<Env>,
    /// Shared by every step actor (an `Addr` clone allocates twice).
    dispatcher: Arc<Addr<DispatcherActor>>,
    machine: StepMachine,
    /// The machine's drv path (the same allocation, shared with the registry and the waiters).
    drv_path: Drv,
    /// What the step keeps of its derivation: the rest is read back from the store when it
    /// resolves or builds, so a waiting step does not hold its parsed derivation (~4 KiB).
    system: String,
    features: std::collections::BTreeSet<String>,
    /// Strong references down the graph: the input steps and the resolved child (each shared
    /// by the steps that need it).
    deps: Vec<StepRef>,
    /// Weak references up the graph, sorted by [`WaiterAddr::key`], without duplicates.
    waiters: Vec<WaiterAddr>,
    /// Builds needing this step, with their priorities; sorted by build id, without duplicates
    /// (usually one or two: a vector, not a tree, whose smallest node is ~450 bytes).
    builds: Vec<(i64, BuildPrio)>,
    /// Rows made for this step by resolutions, still pending (not started).
    pending_rows: Vec<Row>,
    /// The row of the running attempt.
    running_row: Option<Row>,
    /// The row left busy on a remote builder by a runner restart (`carried.rs`), taken from the
    /// ledger when the step was made, until the machine resumes or closes it.
    carried_row: Option<CarriedRow>,
    /// This step's own Resolved row, and the row of the resolved step it points at.
    resolved_row: Option<Row>,
    child_row: Option<Row>,
    runner: Option<Recipient<RunJob>>,
    abort: Option<Recipient<AbortJob>>,
    machine_name: String,
    /// Effects waiting while an earlier one does I/O.
    queue: VecDeque<Effect>,
    busy: bool,
    /// This step builds the resolved drv of another step.
    pub resolved_child: bool,
    /// A machine has (or is being sent) this step's job.
    in_flight: bool,
    /// This actor's introspection cell.
    cell: Arc<ActorCell>,
    /// The drv this step resolved to (its child in the supervision tree).
    resolved_to: Option<Drv>,
    /// When it last became runnable (dispatch latency).
    runnable_since: Option<std::time::Instant>,
    /// Set when this step recorded its own failure: carried by the failure it passes on.
    /// Boxed: rarely set, and large.
    failure_origin: Option<Box<crate::actors::types::FailureOrigin>>,
}

impl StepActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        env: Arc<Env>,
        dispatcher: Arc<Addr<DispatcherActor>>,
        machine: StepMachine,
        drv: &Derivation,
        deps: Vec<StepRef>,
        builds: Vec<(i64, BuildPrio)>,
        recorded: Option<(Row, Option<Row>)>,
    ) -> Self {
        let drv_path = machine.drv().clone();
        // A row busy on a builder at the restart is this step's to resume or close: the machine
        // decides which.
        let carried_row = env.carried.claim(&drv_path);
        let machine = match &carried_row {
            Some(c) => machine.with_carried_attempt(c.machine.clone()),
            None => machine,
        };
        let cell = env
            .actors
            .register(ActorId::Step(drv_path.clone()), ActorKind::Step, env.now());
        let mut builds = builds;
        builds.sort_by_key(|b| b.0);
        builds.dedup_by_key(|b| b.0);
        let (resolved_row, child_row) = match recorded {
            Some((own, child)) => (Some(own), child),
            None => (None, None),
        };
        StepActor {
            env,
            dispatcher,
            machine,
            drv_path,
            system: drv.system.clone(),
            features: required_features(drv),
            deps,
            waiters: Vec::new(),
            builds,
            pending_rows: Vec::new(),
            running_row: None,
            carried_row,
            resolved_row,
            child_row,
            runner: None,
            abort: None,
            machine_name: String::new(),
            queue: VecDeque::new(),
            busy: false,
            resolved_child: false,
            in_flight: false,
            cell,
            resolved_to: None,
            runnable_since: None,
            failure_origin: None,
        }
    }

    /// Refreshes the introspection cell after a change (state, parents, children, waiting-on).
    fn describe(&self) {
        let phase = self.machine.phase();
        let state = phase_name(phase);
        let waiting: Vec<ActorId> = match phase {
            Phase::WaitingForInputs => self
                .machine
                .waiting_on_drvs()
                .map(|d| ActorId::Step(d.clone()))
                .collect(),
            Phase::AwaitingResolved { resolved } => vec![ActorId::Step(match &self.resolved_to {
                Some(r) if **r == **resolved => r.clone(),
                _ => resolved.as_str().into(),
            })],
            _ => vec![],
        };
        let detail = match phase {
            Phase::Building { machine } => format!("building on {machine}"),
            Phase::AwaitingResolved { resolved } => format!("resolved to {resolved}"),
            Phase::Succeeded(_) if self.resolved_to.is_some() => "resolved; child built".into(),
            _ if self.resolved_child => "resolved child".into(),
            Phase::Failed(f) => f.message.clone(),
            Phase::RetryWait => format!("retry {} pending", self.machine.tries()),
            _ => String::new(),
        };
        self.cell.describe(|d| {
            if d.state != state {
                d.state = state.into();
            }
            d.waiting_on = waiting;
            d.detail = detail;
            d.parents = self
                .waiters
                .iter()
                .map(|w| match w {
                    WaiterAddr::Build(b, _) => ActorId::Build(*b),
                    WaiterAddr::Step(s, _) => ActorId::Step(s.clone()),
                })
                .collect();
            // As the printed ids sort.
            d.parents.sort_by_cached_key(|p| p.to_string());
            d.children = self.deps_drvs();
        });
    }

    fn deps_drvs(&self) -> Vec<ActorId> {
        // The input steps still attached (the step no longer holds its parsed derivation).
        let mut v: Vec<ActorId> = self
            .machine
            .waiting_on_drvs()
            .map(|d| ActorId::Step(d.clone()))
            .collect();
        if let Some(r) = &self.resolved_to {
            v.push(ActorId::Step(r.clone()));
        }
        v
    }

    /// The build that owns this step's rows: the oldest build that needs it.
    fn owner(&self) -> Option<i64> {
        self.builds.first().map(|b| b.0)
    }

    /// The waiter `w`'s place in [`waiters`](Self::waiters).
    fn waiter_index(&self, w: &Waiter) -> Result<usize, usize> {
        self.waiters.binary_search_by(|a| a.cmp_key(w))
    }

    fn waiter(&self, w: &Waiter) -> Option<&WaiterAddr> {
        self.waiter_index(w).ok().map(|i| &self.waiters[i])
    }

    fn priority(&self) -> Priority {
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
                build_id: *id,
            },
            None => Priority {
                global_priority: 0,
                jobset: String::new(),
                local_priority: 0,
                build_id: i64::MAX,
            },
        }
    }

    fn feed(&mut self, ev: Event, ctx: &mut Context<Self>) {
        let before = std::mem::discriminant(self.machine.phase());
        let gauge_before = self.machine.phase().gauge();
        let landed = match &ev {
            Event::InputLanded { drv, .. } => Some(drv.clone()),
            _ => None,
        };
        let effects = self.machine.on(ev);
        self.account(gauge_before, self.machine.phase().gauge());
        if std::mem::discriminant(self.machine.phase()) != before {
            self.describe();
        } else if let Some(drv) = landed {
            // Still waiting: drop just the input that landed (no rebuild of the lists).
            let id = ActorId::Step(drv);
            self.cell.describe(|d| d.waiting_on.retain(|w| *w != id));
        }
        self.queue.extend(effects);
        self.drain(ctx);
    }

    /// The one place gauges change: from the gauge of the phase left to that of the phase
    /// entered (see [`Gauge`]).
    fn account(&self, before: Option<Gauge>, after: Option<Gauge>) {
        let stats = &self.env.stats;
        let counter = |g: Gauge| match g {
            Gauge::Runnable => &stats.steps_runnable,
            Gauge::Running => &stats.steps_running,
        };
        let (left, entered) = gauge_change(before, after);
        if let Some(g) = left {
            stats.dec(counter(g));
        }
        if let Some(g) = entered {
            Stats::inc(counter(g));
        }
    }

    /// A write of an effect failed for good: logged with the step's fields, counted, the effects
    /// queued behind it dropped, and the machine told (it fails the step, see
    /// [`Event::WriteFailed`]).
    fn write_failed(&mut self, f: WriteFailure, ctx: &mut Context<Self>) {
        Stats::inc(&self.env.stats.db_write_failures);
        if f.not_started {
            // The job was never sent: the machine's slot is given back here.
            self.in_flight = false;
            self.dispatcher
                .do_send(crate::actors::dispatcher::actor::SlotFreed(
                    self.machine_name.clone(),
                ));
        }
        if let Some(r) = f.reopen_running {
            self.running_row = Some(r);
        }
        self.pending_rows.extend(f.reopen_pending);
        self.queue.clear();
        self.feed(Event::WriteFailed(f.message), ctx);
    }

    /// Performs queued effects in order; an effect with I/O blocks the mailbox until it is done.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        while !self.busy {
            let Some(effect) = self.queue.pop_front() else {
                break;
            };
            self.perform(effect, ctx);
        }
        self.cell.set_blocked(self.busy);
        self.cell.set_queued(self.queue.len());
    }

    fn perform(&mut self, effect: Effect, ctx: &mut Context<Self>) {
        match effect {
            Effect::Resolve { inputs } => {
                self.env.probe.resolving(&self.drv_path);
                self.resolve(inputs, ctx)
            }
            Effect::AttachChild { resolved } => {
                self.env.probe.resolved(&self.drv_path, &resolved);
                self.attach_child(resolved, ctx)
            }
            Effect::MakeRunnable => {
                self.runnable_since
                    .get_or_insert_with(std::time::Instant::now);
                self.dispatcher.do_send(Runnable {
                    step: RunnableStep {
                        drv: self.drv_path.to_string(),
                        system: self.system.clone(),
                        features: self.features.clone(),
                        priority: self.priority(),
                    },
                    addr: ctx.address().downgrade(),
                });
            }
            Effect::RecordStart { machine } => self.record_start(machine, ctx),
            Effect::ResumeCarried { machine } => self.resume_carried(machine, ctx),
            Effect::CloseCarried { status, message } => {
                if let Some(c) = self.carried_row.take() {
                    let row = c.row;
                    // Closing before a new attempt starts: a failure leaves the job unsent.
                    let not_started = matches!(self.machine.phase(), Phase::Building { .. });
                    let f = self.finish_row(row, status, Some(message), Outputs::new(), Some(0));
                    let drv = self.drv_path.to_string();
                    tracing::info!(drv = %drv, build = row.0, stepnr = row.1, machine = %c.machine, status = ?status, "closing the attempt carried over the restart");
                    self.io(ctx, async move {
                        f.await.map_err(|e| {
                            let w =
                                WriteFailure::new("close a carried attempt", &drv, Some(row), &e)
                                    .reopen_pending(row);
                            if not_started { w.not_started() } else { w }
                        })
                    });
                }
            }
            Effect::RecordSuccess { outputs, built } => self.record_success(outputs, built, ctx),
            Effect::RecordRetry {
                status, message, ..
            } => {
                if let Some(row) = self.running_row.take() {
                    let f = self.finish_row(row, status, Some(message), Outputs::new(), Some(0));
                    let drv = self.drv_path.to_string();
                    self.io(ctx, async move {
                        f.await.map_err(|e| {
                            WriteFailure::new("record a failed attempt", &drv, Some(row), &e)
                                .reopen_running(row)
                        })
                    });
                }
            }
            Effect::RecordFailure(failure) => self.record_failure(failure, ctx),
            Effect::ScheduleRetry { after } => {
                ctx.run_later(after, |act, ctx| act.feed(Event::RetryDue, ctx));
            }
            Effect::NotifyLanded { to, outputs } => {
                for w in to {
                    match self.waiter(&w) {
                        Some(WaiterAddr::Step(_, a)) => {
                            if let Some(a) = a.upgrade() {
                                a.do_send(OutputsLanded {
                                    from: self.drv_path.clone(),
                                    outputs: outputs.clone(),
                                });
                            }
                        }
                        Some(WaiterAddr::Build(_, a)) => {
                            if let Some(a) = a.upgrade() {
                                a.do_send(OutputsLanded {
                                    from: self.drv_path.clone(),
                                    outputs: outputs.clone(),
                                });
                            }
                        }
                        None => {}
                    }
                }
            }
            Effect::NotifyFailed { to, mut failure } => {
                if failure.origin.is_none() {
                    failure.origin = self.failure_origin.clone();
                }
                for w in to {
                    let msg = StepFailed {
                        from: self.drv_path.clone(),
                        failure: failure.clone(),
                    };
                    match self.waiter(&w) {
                        Some(WaiterAddr::Step(_, a)) => {
                            if let Some(a) = a.upgrade() {
                                a.do_send(msg);
                            }
                        }
                        Some(WaiterAddr::Build(_, a)) => {
                            if let Some(a) = a.upgrade() {
                                a.do_send(msg);
                            }
                        }
                        None => {}
                    }
                }
            }
            Effect::Abandon => self.abandon(ctx),
        }
    }

    /// Runs `fut` with the mailbox blocked, then the effects queued behind it — or, when a write
    /// failed for good, tells the machine instead ([`write_failed`](Self::write_failed)).
    fn io<F>(&mut self, ctx: &mut Context<Self>, fut: F)
    where
        F: std::future::Future<Output = Result<(), WriteFailure>> + Send + 'static,
    {
        self.busy = true;
        let fut = self.env.offload(fut);
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
            act.busy = false;
            match res {
                Ok(()) => act.drain(ctx),
                Err(f) => act.write_failed(f, ctx),
            }
        }));
    }

    /// Like [`io`](Self::io), feeding the event the I/O produced back into the machine.
    fn io_then<F>(&mut self, ctx: &mut Context<Self>, fut: F)
    where
        F: std::future::Future<Output = Result<(Event, After), WriteFailure>> + Send + 'static,
    {
        self.busy = true;
        let fut = self.env.offload(fut);
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
            act.busy = false;
            match res {
                Ok((ev, after)) => {
                    after.apply(act);
                    act.feed(ev, ctx);
                }
                Err(f) => act.write_failed(f, ctx),
            }
        }));
    }

    /// Runs a write no machine decision waits on (the step is finished or stopping): a
    /// permanent failure is logged with the step's fields (by [`WriteFailure::new`]) and
    /// counted, as nothing is left to fail.
    fn io_detached<F>(&mut self, ctx: &mut Context<Self>, fut: F)
    where
        F: std::future::Future<Output = Result<(), WriteFailure>> + Send + 'static,
    {
        let env = self.env.clone();
        self.io(ctx, async move {
            if fut.await.is_err() {
                Stats::inc(&env.stats.db_write_failures);
            }
            Ok(())
        });
    }

    fn finish_row(
        &self,
        row: Row,
        status: Status,
        message: Option<String>,
        outputs: Outputs,
        times_built: Option<i32>,
    ) -> impl std::future::Future<Output = Result<(), DbError>> + 'static {
        let env = self.env.clone();
        let drv_path = self.drv_path.to_string();
        let machine = (!self.machine_name.is_empty() && times_built.unwrap_or(0) > 0)
            .then(|| self.machine_name.clone());
        async move {
            let realisations: Vec<Realisation> = if status == Status::Success {
                outputs
                    .iter()
                    .map(|(o, p)| Realisation {
                        drv_path: drv_path.clone(),
                        output_name: o.clone(),
                        out_path: p.clone(),
                        build: Some(BuildId(row.0)),
                        stepnr: Some(row.1),
                    })
                    .collect()
            } else {
                vec![]
            };
            let f = FinishStep {
                build: BuildId(row.0),
                stepnr: row.1,
                status,
                error_msg: message,
                stop_time: env.now(),
                times_built,
                outputs: outputs
                    .iter()
                    .map(|(o, p)| (o.clone(), Some(p.clone())))
                    .collect(),
                realisations,
                machine,
            };
            let conflicts = persist("finish step", || env.db.finish_step(&f)).await?;
            for c in conflicts {
                tracing::error!(drv = %drv_path, conflict = %c, "realisation disagrees with the recorded one");
            }
            Ok(())
        }
    }

    fn resolve(&mut self, inputs: BTreeMap<(String, String), String>, ctx: &mut Context<Self>) {
        let env = self.env.clone();
        let drv_path = self.drv_path.to_string();
        let owner = self.owner();
        let existing_row = self
            .owner()
            .and_then(|o| self.pending_rows.iter().find(|r| r.0 == o).copied());
        let fut = async move {
            let drv = match env.store.read_derivation(&drv_path).await {
                Ok(d) => d,
                Err(e) => {
                    return Ok((
                        Event::Resolved(Resolution::Impossible(format!(
                            "cannot read {drv_path}: {e}"
                        ))),
                        After::None,
                    ));
                }
            };
            let sd = env.store.store_dir().clone();
            let resolved = match crate::store::resolve::try_resolve(&drv, &sd, |d, o| {
                inputs.get(&(d.to_string(), o.to_string())).cloned()
            }) {
                Ok(r) => r,
                Err(e) => {
                    return Ok((
                        Event::Resolved(Resolution::Impossible(e.to_string())),
                        After::None,
                    ));
                }
            };
            let rpath = match resolved.drv_path(&sd) {
                Ok(p) => sd.print(&p),
                Err(e) => {
                    return Ok((
                        Event::Resolved(Resolution::Impossible(e.to_string())),
                        After::None,
                    ));
                }
            };
            if *rpath == *drv_path {
                return Ok((Event::Resolved(Resolution::Same), After::None));
            }
            // I/O first: the resolved drv into the store, kept alive by a GC root ...
            let written = match env
                .store
                .add_derivation_rooted(&resolved, "resolved-")
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    return Ok((
                        Event::Resolved(Resolution::Impossible(format!(
                            "cannot write {rpath}: {e}"
                        ))),
                        After::None,
                    ));
                }
            };
            let Some(owner) = owner else {
                return Ok((Event::Resolved(Resolution::Child(written)), After::None));
            };
            #[cfg(feature = "test-hooks")]
            env.crash_point("before-resolve-tx");
            // ... then the database, in one transaction: the resolved row, then ours marked Resolved.
            let own_step = NewStep::build(&drv_path, &drv.system);
            let resolved_step = NewStep::build(&written, &drv.system);
            let now = env.now();
            // A step without a row gets it in the same transaction (a row created on its own
            // first would be left pending by a crash before the resolution).
            let child = match existing_row {
                Some(r) => persist("resolve step", || {
                    env.db
                        .resolve_step(BuildId(owner), r.1, &resolved_step, now)
                })
                .await
                .map(|c| (r.1, c)),
                None => {
                    persist("resolve step", || {
                        env.db.create_and_resolve_step(
                            BuildId(owner),
                            &own_step,
                            &resolved_step,
                            now,
                        )
                    })
                    .await
                }
            };
            // A permanent error is the database's, not the drv's: the step fails as Aborted
            // (not Failed, which would make the drv a cached failure).
            let (own, child) = child.map_err(|e| match existing_row {
                Some(r) => WriteFailure::new("record the resolution", &drv_path, Some(r), &e),
                None => WriteFailure::in_build("record the resolution", &drv_path, owner, &e),
            })?;
            #[cfg(feature = "test-hooks")]
            env.crash_point("after-resolve-tx");
            Stats::inc(&env.stats.resolutions);
            env.emit(SchedEvent::StepResolved {
                drv: drv_path.clone(),
                resolved: written.clone(),
            });
            tracing::info!(drv = %drv_path, resolved = %written, build = owner, "resolved");
            Ok((
                Event::Resolved(Resolution::Child(written)),
                After::Resolved {
                    own: (owner, own),
                    child: (owner, child),
                },
            ))
        };
        self.io_then(ctx, fut);
    }

    /// Attaches to the step of the resolved drv: a live one through the registry, an already built
    /// one by early cutoff, or a new one.
    fn attach_child(&mut self, resolved: String, ctx: &mut Context<Self>) {
        let me = ctx.address().downgrade();
        let live = self.env.registry.get_keyed(&resolved);
        let shared: Drv = match &live {
            Some((d, _)) => d.clone(),
            None => resolved.as_str().into(),
        };
        self.resolved_to = Some(shared.clone());
        self.describe();
        if let Some((_, child)) = live {
            if let Some((b, n)) = self.child_row {
                child.do_send(AdoptRow {
                    build: b,
                    stepnr: n,
                });
            }
            self.env.stats.membership();
            child.do_send(AddBuilds(self.builds.clone()));
            child.do_send(AddWaiter(WaiterAddr::Step(self.drv_path.clone(), me)));
            self.deps.push(child);
            return;
        }
        let env = self.env.clone();
        let dispatcher = self.dispatcher.clone();
        let child_row = self.child_row;
        let builds = self.builds.clone();
        let parent = self.drv_path.to_string();
        self.busy = true;
        let r = resolved.clone();
        let fut = async move {
            let resolved = r;
            let drv = env.store.read_derivation(&resolved).await;
            let built = match &drv {
                Ok(d) => crate::actors::build::expand::built_outputs(&env, &resolved, d).await,
                Err(_) => None,
            };
            (drv, built)
        };
        let fut = self.env.offload(fut);
        ctx.wait(fut.into_actor(self).map(move |(drv, built), act, ctx| {
            act.busy = false;
            match (drv, built) {
                (Err(e), _) => {
                    let msg = format!("cannot read resolved derivation {resolved}: {e}");
                    act.feed(Event::ChildFailed(Failure::new(Status::Failed, msg)), ctx);
                }
                (Ok(_), Some(outputs)) => {
                    // Early cutoff: the resolved drv is already built.
                    Stats::inc(&act.env.stats.early_cutoffs);
                    act.env.emit(SchedEvent::EarlyCutoff { drv: resolved.clone() });
                    tracing::info!(drv = %parent, resolved = %resolved, "early cutoff: resolved drv already built");
                    if let Some(row) = child_row {
                        let env = act.env.clone();
                        let f = finish_cached(env, resolved.clone(), row, outputs.clone());
                        let drv = resolved.clone();
                        // The success fed below is recorded after this write; if it fails for
                        // good, the step fails instead.
                        act.io(ctx, async move {
                            f.await.map_err(|e| {
                                WriteFailure::new("finish a cached step", &drv, Some(row), &e)
                            })
                        });
                    }
                    act.feed(Event::ChildLanded(outputs), ctx);
                }
                (Ok(d), None) => {
                    // A race is impossible here: the registry is only changed on this thread, and it
                    // did not hold the child when we looked. Look again after the I/O all the same.
                    let child = match act.env.registry.get_keyed(&resolved) {
                        Some((_, c)) => c,
                        None => {
                            let machine = StepMachine::new(
                                shared.clone(),
                                false,
                                BTreeMap::new(),
                                BTreeMap::new(),
                                act.env.retry.clone(),
                            );
                            let mut a = StepActor::new(act.env.clone(), dispatcher, machine, &d, vec![], builds, None);
                            a.resolved_child = true;
                            let a = Arc::new(a.start());
                            act.env.registry.insert(&shared, &a);
                            Stats::inc(&act.env.stats.steps_created);
                            a
                        }
                    };
                    if let Some((b, n)) = child_row {
                        child.do_send(AdoptRow { build: b, stepnr: n });
                    }
                    child.do_send(AddWaiter(WaiterAddr::Step(act.drv_path.clone(), me)));
                    act.deps.push(child);
                }
            }
            act.drain(ctx);
        }));
    }

    /// The builder that ran the step before the restart goes on with it: its row, busy since
    /// then, is the running row (same step number and start time; nothing to write), and the job
    /// is sent for the builder to attach to its build.
    fn resume_carried(&mut self, machine: String, ctx: &mut Context<Self>) {
        let Some(c) = self.carried_row.take() else {
            // The machine resumes only an attempt whose row the step holds; without one, a new
            // attempt.
            return self.record_start(machine, ctx);
        };
        self.machine_name = machine.clone();
        self.in_flight = true;
        self.running_row = Some(c.row);
        tracing::info!(drv = %self.drv_path, build = c.row.0, stepnr = c.row.1, machine = %machine, "the builder goes on with the attempt it ran before the restart, in the same row");
        self.env.emit(SchedEvent::StepStarted {
            drv: self.drv_path.to_string(),
            machine,
        });
        if let Some(r) = &self.runner {
            r.do_send(RunJob {
                drv_path: self.drv_path.to_string(),
                drv: None,
                step: ctx.address().downgrade(),
                max_silent: self.env.max_silent,
                timeout: self.env.timeout,
                attempt: Some(crate::builder::logs::Attempt {
                    build: c.row.0,
                    stepnr: c.row.1,
                }),
            });
        }
    }

    fn record_start(&mut self, machine: String, ctx: &mut Context<Self>) {
        self.machine_name = machine.clone();
        self.in_flight = true;
        let env = self.env.clone();
        let drv_path = self.drv_path.to_string();
        let system = self.system.clone();
        let pending = self
            .owner()
            .and_then(|o| self.pending_rows.iter().position(|r| r.0 == o))
            .or(if self.pending_rows.is_empty() {
                None
            } else {
                Some(0)
            });
        let pending = pending.map(|i| self.pending_rows.remove(i));
        let owner = self.owner();
        env.emit(SchedEvent::StepStarted {
            drv: drv_path.clone(),
            machine: machine.clone(),
        });
        let mut job = RunJob {
            drv_path: drv_path.clone(),
            drv: None,
            step: ctx.address().downgrade(),
            max_silent: self.env.max_silent,
            timeout: self.env.timeout,
            attempt: None,
        };
        let runner = self.runner.clone();
        #[cfg(feature = "test-hooks")]
        let resolved_child = self.resolved_child;
        let fut = async move {
            let now = env.now();
            // A permanent error: the job is not sent, and the step fails (the pending row it
            // meant to start is closed with the failure).
            let row = match (pending, owner) {
                (Some(r), _) => persist("start step", || {
                    env.db
                        .start_step(BuildId(r.0), r.1, &machine, BusyPhase::Building, now)
                })
                .await
                .map(|_| Some(r))
                .map_err(|e| {
                    WriteFailure::new("record the step's start", &drv_path, Some(r), &e)
                        .not_started()
                        .reopen_pending(r)
                })?,
                (None, Some(o)) => {
                    let mut s = NewStep::build(&drv_path, &system);
                    s.busy = BusyPhase::Building;
                    s.start_time = Some(now);
                    s.machine = machine.clone();
                    persist("create step", || env.db.create_step(BuildId(o), &s))
                        .await
                        .map(|n| Some((o, n)))
                        .map_err(|e| {
                            WriteFailure::in_build("record the step's start", &drv_path, o, &e)
                                .not_started()
                        })?
                }
                (None, None) => None,
            };
            if let Some(r) = runner {
                job.attempt =
                    row.map(|(build, stepnr)| crate::builder::logs::Attempt { build, stepnr });
                r.do_send(job);
            }
            #[cfg(feature = "test-hooks")]
            if resolved_child && env.crash_armed("building-resolved") {
                // crash tests only: let the job start, then die while the resolved step builds
                tokio::time::sleep(Duration::from_millis(50)).await;
                env.crash_point("building-resolved");
            }
            Ok((Event::Start, After::Running(row)))
        };
        // `Event::Start` is a no-op past WaitingForInputs: the event only carries `After`.
        self.io_then(ctx, fut);
    }

    fn record_success(&mut self, outputs: Outputs, built: bool, ctx: &mut Context<Self>) {
        let env = self.env.clone();
        let drv = self.drv_path.to_string();
        if built {
            Stats::inc(&env.stats.steps_built);
            env.emit(SchedEvent::StepFinished {
                drv: drv.clone(),
                status: 0,
                built: true,
            });
            let running = self.running_row.take();
            let main = running
                .map(|row| self.finish_row(row, Status::Success, None, outputs.clone(), Some(1)));
            // Rows adopted from other steps' resolutions while this one built: the resolved
            // drv another step already built for them, each an early cutoff.
            let cached: Vec<_> = std::mem::take(&mut self.pending_rows)
                .into_iter()
                .map(|row| (row, self.early_cutoff(row, outputs.clone())))
                .collect();
            let store_side = register_in_store(env.clone(), drv.clone(), outputs.clone());
            self.io(ctx, async move {
                store_side.await;
                let mut failure = None;
                if let (Some(m), Some(row)) = (main, running)
                    && let Err(e) = m.await
                {
                    failure = Some(
                        WriteFailure::new("record the step's success", &drv, Some(row), &e)
                            .reopen_running(row),
                    );
                }
                for (row, c) in cached {
                    match &mut failure {
                        // Left pending: the failure closes them.
                        Some(f) => f.reopen_pending.push(row),
                        None => {
                            if let Err(e) = c.await {
                                failure = Some(
                                    WriteFailure::new("finish a cached step", &drv, Some(row), &e)
                                        .reopen_pending(row),
                                );
                            }
                        }
                    }
                }
                failure.map_or(Ok(()), Err)
            });
        } else {
            // A resolved parent aliases its child's outputs: realisations for its own drv outputs.
            env.emit(SchedEvent::StepFinished {
                drv: drv.clone(),
                status: 0,
                built: false,
            });
            let row = self.resolved_row;
            let store_side = register_in_store(env.clone(), drv.clone(), outputs.clone());
            self.io(ctx, async move {
                store_side.await;
                for (o, p) in &outputs {
                    let r = Realisation {
                        drv_path: drv.clone(),
                        output_name: o.clone(),
                        out_path: p.clone(),
                        build: row.map(|r| BuildId(r.0)),
                        stepnr: row.map(|r| r.1),
                    };
                    persist("record realisation", || env.db.insert_realisation(&r))
                        .await
                        .map_err(|e| WriteFailure::new("record a realisation", &drv, row, &e))?;
                }
                Ok(())
            });
        }
    }

    /// Counts an early cutoff (a pending row of a resolution whose drv is built already) and
    /// finishes the row as cached.
    fn early_cutoff(
        &self,
        row: Row,
        outputs: Outputs,
    ) -> impl std::future::Future<Output = Result<(), DbError>> + 'static {
        Stats::inc(&self.env.stats.early_cutoffs);
        self.env.emit(SchedEvent::EarlyCutoff {
            drv: self.drv_path.to_string(),
        });
        finish_cached(self.env.clone(), self.drv_path.to_string(), row, outputs)
    }

    /// Nobody needs the step any more: out of the queue, its running build killed, its rows closed
    /// as Cancelled, then the actor stops.
    fn abandon(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(drv = %self.drv_path, "step abandoned: no build needs it");
        self.dispatcher.do_send(StepLeft(self.drv_path.to_string()));
        if self.in_flight
            && let Some(abort) = &self.abort
        {
            abort.do_send(AbortJob {
                drv_path: self.drv_path.to_string(),
            });
        }
        let rows: Vec<Row> = self
            .running_row
            .take()
            .into_iter()
            .chain(std::mem::take(&mut self.pending_rows))
            .collect();
        let finishes: Vec<_> = rows
            .into_iter()
            .map(|row| {
                let f = self.finish_row(
                    row,
                    Status::Cancelled,
                    Some("cancelled: no build needs this step".into()),
                    Outputs::new(),
                    Some(0),
                );
                (row, f)
            })
            .collect();
        // The actor stops once its rows are closed. Nothing is left to fail: a row that cannot
        // be closed is logged with its fields and counted.
        self.busy = true;
        let env = self.env.clone();
        let drv = self.drv_path.to_string();
        let fut = self.env.offload(async move {
            for (row, f) in finishes {
                if let Err(e) = f.await {
                    WriteFailure::new("close an abandoned step's row", &drv, Some(row), &e);
                    Stats::inc(&env.stats.db_write_failures);
                }
            }
        });
        ctx.wait(fut.into_actor(self).map(|_, _, ctx| ctx.stop()));
    }

    fn record_failure(&mut self, failure: Failure, ctx: &mut Context<Self>) {
        Stats::inc(&self.env.stats.steps_failed);
        self.env.emit(SchedEvent::StepFinished {
            drv: self.drv_path.to_string(),
            status: failure.status.code(),
            built: false,
        });
        if failure.status == Status::DepFailed {
            // Not this step's own failure: the failing step records it.
            return;
        }
        let env = self.env.clone();
        let drv_path = self.drv_path.to_string();
        let system = self.system.clone();
        // A resolved step's own row is its Resolved one: it gets no second row.
        let owner = self.owner().filter(|_| self.resolved_row.is_none());
        let running = self.running_row.take();
        // The other builds that need this step learn where it failed from the failure itself
        // (each records its own row when the failure reaches it).
        self.failure_origin = running.map(|r| r.0).or(owner).map(|build| {
            Box::new(crate::actors::types::FailureOrigin {
                drv: drv_path.to_string(),
                system: system.clone(),
                status: failure.status,
                message: failure.message.clone(),
                build,
            })
        });
        let pending = std::mem::take(&mut self.pending_rows);
        let own_finish = running.map(|row| {
            self.finish_row(
                row,
                failure.status,
                Some(failure.message.clone()),
                Outputs::new(),
                Some(1),
            )
        });
        // Every write is tried; the first permanent error reaches the machine (which passes the
        // failure on again: the notification was queued behind these writes).
        let fut = async move {
            let now = env.now();
            let mut first: Option<WriteFailure> = None;
            let mut failed = |f: WriteFailure| {
                first.get_or_insert(f);
            };
            match (own_finish, running, owner) {
                (Some(f), row, _) => {
                    if let Err(e) = f.await {
                        failed(WriteFailure::new(
                            "record the step's failure",
                            &drv_path,
                            row,
                            &e,
                        ));
                    }
                }
                (None, _, Some(o)) => {
                    let mut s = NewStep::build(&drv_path, &system);
                    s.status = Some(failure.status);
                    s.error_msg = Some(failure.message.clone());
                    s.start_time = Some(now);
                    s.stop_time = Some(now);
                    if let Err(e) =
                        persist("create failed step", || env.db.create_step(BuildId(o), &s)).await
                    {
                        failed(WriteFailure::in_build(
                            "record the step's failure",
                            &drv_path,
                            o,
                            &e,
                        ));
                    }
                }
                (None, _, None) => {}
            }
            for row in pending {
                let f = FinishStep {
                    build: BuildId(row.0),
                    stepnr: row.1,
                    status: failure.status,
                    error_msg: Some(failure.message.clone()),
                    stop_time: now,
                    times_built: Some(0),
                    outputs: vec![],
                    realisations: vec![],
                    machine: None,
                };
                if let Err(e) = persist("finish step", || env.db.finish_step(&f)).await {
                    failed(WriteFailure::new(
                        "finish a pending row",
                        &drv_path,
                        Some(row),
                        &e,
                    ));
                }
            }
            if matches!(failure.status, Status::Failed | Status::FailedWithOutput)
                && let Err(e) =
                    persist("add failed path", || env.db.add_failed_path(&drv_path)).await
            {
                failed(WriteFailure::new(
                    "record the failed path",
                    &drv_path,
                    None,
                    &e,
                ));
            }
            first.map_or(Ok(()), Err)
        };
        self.io(ctx, fut);
    }
}

/// What an I/O effect changes in the actor besides the event it feeds.
pub enum After {
    None,
    Resolved { own: Row, child: Row },
    Running(Option<Row>),
}

/// A write of the step's that failed for good, with what the actor must take back: the rows the
/// write was to close (still open, so the step's failure closes them) and whether its job was
/// left unsent. Made by [`WriteFailure::new`], which logs it.
pub struct WriteFailure {
    message: String,
    reopen_running: Option<Row>,
    reopen_pending: Vec<Row>,
    not_started: bool,
}

impl WriteFailure {
    /// Logs the failure with the step's fields (drv, build, step number) and keeps its message.
    fn new(what: &str, drv: &str, row: Option<Row>, e: &DbError) -> Self {
        tracing::error!(
            drv,
            build = row.map(|r| r.0),
            stepnr = row.map(|r| r.1),
            what,
            error = %e,
            "a database write failed for good"
        );
        WriteFailure {
            message: format!("cannot {what} in the database: {e}"),
            reopen_running: None,
            reopen_pending: vec![],
            not_started: false,
        }
    }

    /// [`new`](Self::new) for a row not made yet, in `build`.
    fn in_build(what: &str, drv: &str, build: i64, e: &DbError) -> Self {
        tracing::error!(drv, build, what, error = %e, "a database write failed for good");
        WriteFailure {
            message: format!("cannot {what} in the database: {e}"),
            reopen_running: None,
            reopen_pending: vec![],
            not_started: false,
        }
    }

    fn reopen_running(mut self, row: Row) -> Self {
        self.reopen_running = Some(row);
        self
    }

    fn reopen_pending(mut self, row: Row) -> Self {
        self.reopen_pending.push(row);
        self
    }

    /// The job was not sent to the machine.
    fn not_started(mut self) -> Self {
        self.not_started = true;
        self
    }
}

impl After {
    fn apply(self, act: &mut StepActor) {
        match self {
            After::None => {}
            After::Resolved { own, child } => {
                act.pending_rows.retain(|r| *r != own);
                act.resolved_row = Some(own);
                act.child_row = Some(child);
            }
            After::Running(row) => act.running_row = row,
        }
    }
}

/// The state name operators see.
fn phase_name(p: &Phase) -> &'static str {
    match p {
        Phase::WaitingForInputs => "waiting_for_inputs",
        Phase::Resolving => "resolving",
        Phase::Runnable => "runnable",
        Phase::Building { .. } => "building",
        Phase::RetryWait => "retry_wait",
        Phase::AwaitingResolved { .. } => "awaiting_resolved",
        Phase::Succeeded(_) => "succeeded",
        Phase::Failed(_) => "failed",
    }
}

fn required_features(drv: &Derivation) -> std::collections::BTreeSet<String> {
    drv.env
        .get("requiredSystemFeatures")
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Finishes a pending row of a step whose drv was built elsewhere: Success, not built here.
async fn finish_cached(
    env: Arc<Env>,
    drv_path: String,
    row: Row,
    outputs: Outputs,
) -> Result<(), DbError> {
    {
        let f = FinishStep {
            build: BuildId(row.0),
            stepnr: row.1,
            status: Status::Success,
            error_msg: None,
            stop_time: env.now(),
            times_built: Some(0),
            outputs: outputs
                .iter()
                .map(|(o, p)| (o.clone(), Some(p.clone())))
                .collect(),
            realisations: outputs
                .iter()
                .map(|(o, p)| Realisation {
                    drv_path: drv_path.clone(),
                    output_name: o.clone(),
                    out_path: p.clone(),
                    build: Some(BuildId(row.0)),
                    stepnr: Some(row.1),
                })
                .collect(),
            machine: None,
        };
        persist("finish cached step", || env.db.finish_step(&f)).await?;
        Ok(())
    }
}

/// Records the drv's realisations in the store too (Nix's own realisation table).
async fn register_in_store(env: Arc<Env>, drv_path: String, outputs: Outputs) {
    {
        for (o, p) in outputs {
            if let Err(e) = env
                .store
                .register_realisation(&DrvOutput::new(drv_path.clone(), o), &p)
                .await
            {
                tracing::error!(drv = %drv_path, error = %e, "cannot register realisation in the store");
            }
        }
    }
}

impl Actor for StepActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        tracing::debug!(drv = %self.drv_path, "step started");
        self.describe();
        self.feed(Event::Start, ctx);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Stopping leaves the phase's gauge too (a step nobody references any more).
        self.account(self.machine.phase().gauge(), None);
        if let Some(c) = self.carried_row.take() {
            // Neither resumed nor closed (the machine closes it on every way forward): the
            // attempt is no one's any more, so it is closed here. A write that fails leaves the
            // row busy for the next start to decide.
            tracing::warn!(drv = %self.drv_path, build = c.row.0, stepnr = c.row.1, "a step stopped holding a carried attempt: closing it");
            let env = self.env.clone();
            let drv = self.drv_path.to_string();
            actix::spawn(self.env.offload(async move {
                let key = [(BuildId(c.row.0), c.row.1)];
                let closed = persist("close a carried attempt", || {
                    env.db.abort_steps(
                        &key,
                        env.now(),
                        "aborted: the runner restarted while this step was busy, and the step stopped",
                    )
                })
                .await;
                if let Err(e) = closed {
                    WriteFailure::new("close a carried attempt", &drv, Some(c.row), &e);
                    Stats::inc(&env.stats.db_write_failures);
                }
            }));
        }
        self.env.registry.remove(&self.drv_path);
        self.env.actors.unregister(&self.cell);
    }
}

impl Handler<OutputsLanded> for StepActor {
    type Result = ();
    fn handle(&mut self, msg: OutputsLanded, ctx: &mut Context<Self>) {
        self.cell.handled();
        let ev = match self.machine.phase() {
            Phase::AwaitingResolved { resolved } if resolved.as_str() == &*msg.from => {
                Event::ChildLanded(msg.outputs)
            }
            _ => Event::InputLanded {
                drv: msg.from,
                outputs: msg.outputs,
            },
        };
        self.feed(ev, ctx);
    }
}

impl Handler<StepFailed> for StepActor {
    type Result = ();
    fn handle(&mut self, msg: StepFailed, ctx: &mut Context<Self>) {
        self.cell.handled();
        let ev = match self.machine.phase() {
            Phase::AwaitingResolved { resolved } if resolved.as_str() == &*msg.from => {
                Event::ChildFailed(msg.failure)
            }
            _ => Event::InputFailed {
                drv: msg.from,
                failure: msg.failure,
            },
        };
        self.feed(ev, ctx);
    }
}

impl Handler<AddWaiter> for StepActor {
    type Result = ();
    fn handle(&mut self, msg: AddWaiter, ctx: &mut Context<Self>) {
        self.cell.handled();
        let key = msg.0.key();
        match self.waiter_index(&key) {
            Ok(i) => self.waiters[i] = msg.0,
            Err(i) => self.waiters.insert(i, msg.0),
        }
        self.feed(Event::WaiterAdded(key), ctx);
        self.describe();
    }
}

impl Handler<RemoveWaiter> for StepActor {
    type Result = ();
    fn handle(&mut self, msg: RemoveWaiter, ctx: &mut Context<Self>) {
        self.cell.handled();
        if let Ok(i) = self.waiter_index(&msg.0) {
            self.waiters.remove(i);
        }
        if let Waiter::Build(id) = &msg.0
            && let Ok(i) = self.builds.binary_search_by_key(id, |b| b.0)
        {
            self.builds.remove(i);
        }
        self.feed(Event::WaiterRemoved(msg.0), ctx);
        self.describe();
    }
}

impl Handler<AddBuilds> for StepActor {
    type Result = ();
    fn handle(&mut self, msg: AddBuilds, ctx: &mut Context<Self>) {
        self.cell.handled();
        self.env.stats.dec(&self.env.stats.membership_in_flight);
        let before = (self.owner(), self.priority());
        for (id, prio) in &msg.0 {
            match self.builds.binary_search_by_key(id, |b| b.0) {
                Ok(i) => self.builds[i].1 = prio.clone(),
                Err(i) => self.builds.insert(i, (*id, prio.clone())),
            }
        }
        // Passed down only when it changes what the step needs to know of its builds (the
        // owner, the priority): otherwise the inputs know better already. Failures reach
        // every dependent build through the waiters, so no step needs the full list (each
        // build's membership used to flow through its whole closure: quadratic in deep queues).
        if (self.owner(), self.priority()) != before {
            for d in &self.deps {
                self.env.stats.membership();
                d.do_send(msg.clone());
            }
            // Requeued only when its place in the queue changes.
            if matches!(self.machine.phase(), Phase::Runnable) && self.priority() != before.1 {
                // Requeued with the new priority (it stays Runnable: no gauge changes).
                self.queue.push_back(Effect::MakeRunnable);
                self.drain(ctx);
            }
        }
    }
}

impl Handler<AdoptRow> for StepActor {
    type Result = ();
    fn handle(&mut self, msg: AdoptRow, ctx: &mut Context<Self>) {
        self.cell.handled();
        let row = (msg.build, msg.stepnr);
        match self.machine.phase().clone() {
            // The step is finished: a row it cannot close is logged and counted (its outcome
            // reached the resolving step through the waiters already).
            Phase::Succeeded(outputs) => {
                // Early cutoff within the running graph: the resolved drv is built already.
                let f = self.early_cutoff(row, outputs);
                let drv = self.drv_path.to_string();
                self.io_detached(ctx, async move {
                    f.await
                        .map_err(|e| WriteFailure::new("finish a cached step", &drv, Some(row), &e))
                });
            }
            Phase::Failed(f) => {
                let fin = self.finish_row(row, f.status, Some(f.message), Outputs::new(), Some(0));
                let drv = self.drv_path.to_string();
                self.io_detached(ctx, async move {
                    fin.await
                        .map_err(|e| WriteFailure::new("close an adopted row", &drv, Some(row), &e))
                });
            }
            _ => self.pending_rows.push(row),
        }
    }
}

impl Handler<Assigned> for StepActor {
    type Result = ();
    fn handle(&mut self, msg: Assigned, ctx: &mut Context<Self>) {
        self.cell.handled();
        if !matches!(self.machine.phase(), Phase::Runnable) {
            // Assigned while no longer runnable: give the slot back.
            self.dispatcher
                .do_send(crate::actors::dispatcher::actor::SlotFreed(msg.machine));
            return;
        }
        self.runner = Some(msg.runner);
        self.abort = msg.abort;
        // The slot's machine, so a write failing before the job is sent gives it back.
        self.machine_name = msg.machine.clone();
        if let Some(t) = self.runnable_since.take() {
            self.env.stats.dispatch.observe(t.elapsed());
        }
        let ev = if msg.held {
            Event::Adopted {
                machine: msg.machine,
            }
        } else {
            Event::Dispatched {
                machine: msg.machine,
            }
        };
        self.feed(ev, ctx);
    }
}

impl Handler<JobDone> for StepActor {
    type Result = ();
    fn handle(&mut self, msg: JobDone, ctx: &mut Context<Self>) {
        self.cell.handled();
        self.in_flight = false;
        self.feed(Event::BuildDone(msg.0.storable()), ctx);
    }
}

impl Handler<NoMachine> for StepActor {
    type Result = ();
    fn handle(&mut self, msg: NoMachine, ctx: &mut Context<Self>) {
        self.cell.handled();
        self.feed(Event::NoMachine(msg.0), ctx);
    }
}
