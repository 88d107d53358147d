//! The step graph: the one registry of live steps, keyed by drv path, and the only code that makes
//! steps — a build's plan, attached in one synchronous step ([`attach`]), and the child a
//! resolution needs ([`StepGraph::spawn_resolved`]).
//!
//! Strong references point down the graph (a build to its top step, a step to its inputs and its
//! resolved child), weak ones up (a step to its waiters); the registry holds steps weakly, so a step
//! lives as long as something downstream needs it.

pub mod attach;
pub mod critical_path;
pub mod durations;
pub mod live_paths;
pub mod plan;
pub mod registry;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix::prelude::*;

use crate::actors::dispatcher::actor::{CriticalPaths, DispatcherActor};
use crate::actors::dispatcher::machine::{MachineInfo, can_build_locally};
use crate::actors::env::{Env, Stats};
use crate::actors::messages::BuildPrio;
use crate::actors::step::StepMachine;
pub use crate::actors::step::actor::StepRef;
use crate::actors::step::actor::{ExpandProduced, StepActor, StepGraph, StepSlot, WaiterAddr};
use crate::actors::step::core::In;
use crate::actors::step::core::Row;
use crate::actors::types::Drv;
use crate::db::types::StepDuration;
use crate::store::Derivation;
use crate::store::drv_options::DrvOptions;
use critical_path::Changes;
use live_paths::LivePaths;
use registry::Registry;

pub struct Graph {
    registry: Registry,
    env: Arc<Env>,
    /// Shared by every step (an `Addr` clone allocates twice).
    dispatcher: Arc<Addr<DispatcherActor>>,
    /// The live steps' critical paths and expected durations: changed only in the graph's
    /// synchronous steps (attaching, a step finishing or stopping), on the actors' thread.
    paths: Mutex<LivePaths>,
    /// The expander, for the derivations steps' inputs produce (set once it is started).
    expander: std::sync::OnceLock<Recipient<ExpandProduced>>,
    /// The runner's own (in-process) builders: a step prefers a local build only if one of them
    /// could build it.
    local: Vec<MachineInfo>,
    /// Produced derivations (dynamic derivations) → the (producer drv, output) pairs holding
    /// them, noted when a dependent attaches one and dropped when its step stops: the rows the
    /// step makes link to the producers' rows (`producedsteps`).
    producers: Mutex<HashMap<Drv, Vec<(String, String)>>>,
}

impl Graph {
    pub fn new(
        env: Arc<Env>,
        dispatcher: Addr<DispatcherActor>,
        local: Vec<MachineInfo>,
    ) -> Arc<Self> {
        Arc::new(Graph {
            registry: Registry::default(),
            paths: Mutex::new(LivePaths::new(&env.scheduling)),
            env,
            dispatcher: Arc::new(dispatcher),
            expander: std::sync::OnceLock::new(),
            local,
            producers: Mutex::new(HashMap::new()),
        })
    }

    /// The critical paths (a panic while holding them leaves nothing half-done: every change
    /// is one call).
    fn paths(&self) -> MutexGuard<'_, LivePaths> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Learns expected durations from history rows, newest first (at start).
    pub fn learn(&self, history: &[StepDuration]) {
        self.paths().learn(history);
    }

    /// Steps tracked for their critical path.
    pub fn tracked(&self) -> usize {
        self.paths().len()
    }

    /// A step's remaining critical path (ms), 0 when it is not tracked.
    pub fn critical_path_ms(&self, drv: &str) -> u64 {
        self.paths().value(drv)
    }

    /// Tracks a build's new steps (inputs first, each with the steps it waits on); queued steps
    /// whose path grew are moved in the dispatcher's queue, in one message.
    pub(crate) fn track(&self, steps: &[(Drv, Vec<Drv>)], job: &str) {
        let changes = self.paths().attach(steps, job);
        self.moved(changes);
    }

    /// Tells the dispatcher of changed paths (one message per graph change; steps not queued
    /// are ignored there).
    fn moved(&self, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        let changes = changes
            .into_iter()
            .map(|(d, ms)| (d.to_string(), ms))
            .collect();
        self.dispatcher.do_send(CriticalPaths(changes));
    }

    /// The expander steps hand produced derivations to (once; later calls are ignored).
    pub fn set_expander(&self, expander: Recipient<ExpandProduced>) {
        if self.expander.set(expander).is_err() {
            tracing::warn!("the graph's expander was set twice; the first one stays");
        }
    }

    /// What the step of `drv` needs of a machine: its required features, and whether it prefers
    /// a local build — Hydra's `preferLocalBuild && canBuildLocally`, the runner's own builders
    /// standing for the runner's Nix (one with a slot that has the system and every feature).
    /// Options that cannot be read (a bad `__json`) count as none (logged).
    fn needs(&self, drv_path: &str, drv: &Derivation) -> (BTreeSet<String>, bool) {
        let opts = DrvOptions::of(drv).unwrap_or_else(|e| {
            tracing::warn!(drv = %drv_path, error = %e, "cannot read the derivation's options: dispatched as if it had none");
            DrvOptions::default()
        });
        let prefer_local = opts.prefer_local_build
            && can_build_locally(&self.local, &drv.system, &opts.required_features);
        (opts.required_features, prefer_local)
    }

    /// Whether a step for `drv` is live (dormant or an actor).
    pub fn is_live(&self, drv: &str) -> bool {
        self.registry.contains(drv)
    }

    /// The live step for `drv`, with its shared drv path and the strong reference its dependents
    /// share.
    pub fn live(&self, drv: &str) -> Option<(Drv, StepRef)> {
        self.registry.get_keyed(drv)
    }

    /// Live steps (dormant ones included).
    pub fn len(&self) -> usize {
        self.registry.len()
    }

    /// Steps held dormant: plain state waiting for inputs, no actor.
    pub fn dormant(&self) -> usize {
        self.registry.dormant()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes, registers and starts a step: the one place a step is made. It starts dormant
    /// (plain state, see [`slot`](crate::actors::step::slot)) and takes its start event at once:
    /// a step that only waits for inputs stays so, any other gets its actor.
    pub fn spawn(
        self: &Arc<Self>,
        machine: StepMachine<WaiterAddr>,
        drv: &Derivation,
        deps: Vec<StepRef>,
        builds: Vec<(i64, BuildPrio)>,
        recorded: Option<(Row, Option<Row>)>,
        resolved_child: bool,
    ) -> (Drv, StepRef) {
        let key = machine.drv().clone();
        let graph: Arc<dyn StepGraph> = self.clone();
        let (features, prefer_local) = self.needs(&key, drv);
        let actor = StepActor::new(
            self.env.clone(),
            self.dispatcher.clone(),
            graph,
            machine,
            drv,
            (features, prefer_local),
            deps,
            builds,
            recorded,
            resolved_child,
        );
        let step = StepSlot::dormant(actor);
        self.registry.insert(&key, &step);
        crate::metrics::global().steps.spawned(&self.env, &key, drv);
        Stats::inc(&self.env.stats.steps_created);
        step.slot().post(In::Start);
        (key, step)
    }
}

impl StepGraph for Graph {
    fn live(&self, drv: &str) -> Option<(Drv, StepRef)> {
        Graph::live(self, drv)
    }

    fn spawn_resolved(
        self: Arc<Self>,
        resolved: &str,
        drv: &Derivation,
        builds: Vec<(i64, BuildPrio)>,
    ) -> (Drv, StepRef) {
        // The registry changes only on the actors' thread; it is looked at again after the
        // lookup's I/O all the same.
        if let Some(live) = Graph::live(&self, resolved) {
            return live;
        }
        let machine = StepMachine::new(
            resolved,
            false,
            Default::default(),
            Default::default(),
            self.env.retry.clone(),
        );
        let (key, step) = self.spawn(machine, drv, vec![], builds, None, true);
        self.paths().add_resolved(&key);
        (key, step)
    }

    fn forget(&self, drv: &str) {
        self.registry.remove(drv);
        self.producers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(drv);
        let changes = self.paths().finished(drv, None);
        self.moved(changes);
    }

    fn critical_path_ms(&self, drv: &str) -> u64 {
        Graph::critical_path_ms(self, drv)
    }

    fn linked(&self, input: &Drv, dependent: &Drv) {
        let changes = self.paths().link(input, dependent);
        self.moved(changes);
    }

    fn finished(&self, drv: &str, built: Option<(Option<&str>, Duration)>) {
        let changes = self.paths().finished(drv, built);
        self.moved(changes);
    }

    fn expander(&self) -> Option<Recipient<ExpandProduced>> {
        self.expander.get().cloned()
    }

    fn produced_by(&self, drv: &str, by: &[(String, String)], noted: bool) {
        let mut producers = self.producers.lock().unwrap_or_else(|p| p.into_inner());
        if !noted {
            producers.remove(drv);
            return;
        }
        let known = producers.entry(drv.into()).or_default();
        for b in by {
            if !known.contains(b) {
                known.push(b.clone());
            }
        }
    }

    fn producers_of(&self, drv: &str) -> Vec<(String, String)> {
        let producers = self.producers.lock().unwrap_or_else(|p| p.into_inner());
        producers.get(drv).cloned().unwrap_or_default()
    }
}
