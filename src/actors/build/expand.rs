//! Expanding a build's drv closure into steps: all I/O first (read the drvs, ask the store and the
//! database what is built or failed), then one synchronous change of the actor graph (as Hydra's
//! `attach_step`). A drv whose outputs are valid (or realised) needs no step; a drv in `FailedPaths`
//! is a cached failure; a drv with a live step shares it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;

use crate::actors::dispatcher::actor::DispatcherActor;
use crate::actors::env::{Env, Stats, persist};
use crate::actors::messages::{AddBuilds, AddWaiter, BuildPrio, StepFailed, WaiterAddr};
use crate::actors::registry::StepRef;
use crate::actors::step::StepMachine;
use crate::actors::step::actor::{Row, StepActor};
use crate::actors::types::{Drv, Failure, Outputs, Status};
use crate::store::Derivation;

/// What the I/O found for one drv of the closure.
pub enum Node {
    /// Every output is valid: no step.
    Built(Outputs),
    /// In `FailedPaths`.
    CachedFailure,
    /// A step actor already exists (attached at graph-change time).
    Live,
    /// A step to create; `recorded` is a resolution the database already holds (restart).
    New {
        drv: Arc<Derivation>,
        recorded: Option<Recorded>,
    },
}

/// A resolution recorded before a restart: the resolved drv, our Resolved row and its target row
/// (`child`, when that row is still pending and so to be adopted by the resolved step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub resolved: String,
    pub own: Row,
    pub child: Option<Row>,
}

/// Finds (and takes) the recorded resolution of a drv.
pub type RecordedLookup = Arc<dyn Fn(&str) -> Option<Recorded>>;

/// The result of the I/O phase.
pub struct Plan {
    pub top: String,
    pub nodes: HashMap<String, Node>,
    /// New and live drvs, inputs before the steps that need them.
    pub order: Vec<String>,
}

/// The outputs of `drv` if every one is valid: static paths for input-addressed and fixed outputs,
/// realisations (database, then store) for floating and deferred ones.
pub async fn built_outputs(env: &Env, drv_path: &str, drv: &Derivation) -> Option<Outputs> {
    let mut outputs = Outputs::new();
    for (name, out) in &drv.outputs {
        let path = match out.path() {
            Some(p) => p.to_string(),
            None => match env.db.realisation(drv_path, name).await {
                Ok(Some(r)) => r.out_path,
                _ => env
                    .store
                    .query_realisation(&crate::store::DrvOutput::new(drv_path, name))
                    .await
                    .ok()??,
            },
        };
        if !env.store.is_valid_path(&path).await.ok()? {
            return None;
        }
        outputs.insert(name.clone(), path);
    }
    Some(outputs)
}

/// The I/O phase for many builds at once: walks the closures of `tops` level by level (stopping at
/// built, failed and live drvs), each level read with a few batched queries, so builds that share
/// inputs read them once. A drv that cannot be read fails only the builds that need it.
pub async fn plan_many(
    env: &Env,
    tops: &[String],
    recorded: &dyn Fn(&str) -> Option<Recorded>,
) -> Result<Planned, String> {
    let mut nodes: HashMap<String, Planned1> = HashMap::new();
    let mut queued: HashSet<String> = tops.iter().cloned().collect();
    let mut frontier: Vec<String> = queued.iter().cloned().collect();
    while !frontier.is_empty() {
        let mut to_read = Vec::new();
        for d in frontier.drain(..) {
            if env.registry.get(&d).is_some() {
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

/// [`built_outputs`] for many drvs: realisations (database, then store) and validity in batches.
pub async fn built_outputs_many(
    env: &Env,
    drvs: &[(String, Derivation)],
) -> HashMap<String, Outputs> {
    let floating: Vec<String> = drvs
        .iter()
        .filter(|(_, d)| d.outputs.values().any(|o| o.path().is_none()))
        .map(|(p, _)| p.clone())
        .collect();
    let mut realised: HashMap<(String, String), String> = HashMap::new();
    if !floating.is_empty() {
        if let Ok(rs) = env.db.realisations_for_drvs(&floating).await {
            for r in rs {
                realised.insert((r.drv_path, r.output_name), r.out_path);
            }
        }
        let missing: Vec<crate::store::DrvOutput> = drvs
            .iter()
            .flat_map(|(p, d)| {
                d.outputs
                    .iter()
                    .filter(|(_, o)| o.path().is_none())
                    .map(move |(name, _)| (p, name))
            })
            .filter(|(p, name)| !realised.contains_key(&((*p).clone(), (*name).clone())))
            .map(|(p, name)| crate::store::DrvOutput::new(p.clone(), name.clone()))
            .collect();
        if !missing.is_empty()
            && let Ok(rs) = env.store.query_realisations(&missing).await
        {
            for (k, path) in rs {
                realised.insert((k.drv_path, k.output), path);
            }
        }
    }
    let mut candidates: Vec<(&String, Outputs)> = Vec::new();
    for (p, d) in drvs {
        let mut outputs = Outputs::new();
        let complete = d.outputs.iter().all(|(name, out)| {
            let path = match out.path() {
                Some(s) => Some(s.to_string()),
                None => realised.get(&(p.clone(), name.clone())).cloned(),
            };
            path.map(|s| outputs.insert(name.clone(), s)).is_some()
        });
        if complete {
            candidates.push((p, outputs));
        }
    }
    let paths: Vec<String> = candidates
        .iter()
        .flat_map(|(_, o)| o.values().cloned())
        .collect();
    let valid = match env.store.valid_among(&paths).await {
        Ok(v) => v,
        Err(_) => return HashMap::new(),
    };
    candidates
        .into_iter()
        .filter(|(_, o)| o.values().all(|p| valid.contains(p)))
        .map(|(p, o)| (p.clone(), o))
        .collect()
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
    pub fn plan_for(&self, env: &Env, top: &str) -> PlanFor {
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
            if env.registry.get(&drv_path).is_some() {
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

/// How the build's top-level drv stands after attaching.
pub enum Top {
    Built(Outputs),
    Failed(Failure),
    Step(Addr<StepActor>),
    /// The graph changed while planning: plan again.
    Replan,
}

/// The synchronous phase: creates the missing step actors (inputs first), registers them, wires
/// waiters down and strong references up, and tells every step which build needs it.
pub fn attach(
    env: &Arc<Env>,
    dispatcher: &Arc<Addr<DispatcherActor>>,
    plan: Plan,
    build: i64,
    prio: BuildPrio,
) -> Top {
    // A step that was live while planning may have finished since: plan again (its outputs are valid
    // now, so the next plan sees it built).
    if plan
        .nodes
        .iter()
        .any(|(d, n)| matches!(n, Node::Live) && env.registry.get(d).is_none())
    {
        return Top::Replan;
    }
    // Each step with its shared drv path (the registry's key), so its dependents name it with
    // that one allocation.
    let mut actors: HashMap<String, (Drv, StepRef)> = HashMap::new();
    for drv_path in &plan.order {
        if let Some((key, live)) = env.registry.get_keyed(drv_path) {
            env.stats.membership();
            live.do_send(AddBuilds(vec![(build, prio.clone())]));
            actors.insert(drv_path.clone(), (key, live));
            continue;
        }
        let Some(Node::New { drv, recorded }) = plan.nodes.get(drv_path) else {
            continue;
        };
        let mut inputs: Vec<(Drv, Vec<String>)> = Vec::new();
        let mut landed = BTreeMap::new();
        let mut deps = Vec::new();
        let mut failed_inputs = Vec::new();
        for (input, outs) in &drv.input_drvs {
            match plan.nodes.get(input) {
                Some(Node::Built(o)) => {
                    for out in outs {
                        if let Some(p) = o.get(out) {
                            landed.insert((input.clone(), out.clone()), p.clone());
                        }
                    }
                }
                Some(Node::CachedFailure) => failed_inputs.push(input.clone()),
                _ => match actors.get(input) {
                    Some((key, a)) => {
                        inputs.push((key.clone(), outs.iter().cloned().collect()));
                        deps.push(a.clone());
                    }
                    None if recorded.is_some() => {}
                    None => failed_inputs.push(input.clone()),
                },
            }
        }
        let key: Drv = drv_path.as_str().into();
        let dep_keys: Vec<Drv> = inputs.iter().map(|(k, _)| k.clone()).collect();
        let mut machine = StepMachine::with_inputs(
            key.clone(),
            drv.needs_resolution(),
            inputs,
            landed,
            env.retry.clone(),
        );
        if let Some(r) = recorded {
            machine = machine.with_recorded_resolution(r.resolved.clone());
        }
        let rec_rows = recorded.as_ref().map(|r| (r.own, r.child));
        let actor = Arc::new(
            StepActor::new(
                env.clone(),
                dispatcher.clone(),
                machine,
                drv,
                deps,
                vec![(build, prio.clone())],
                rec_rows,
            )
            .start(),
        );
        env.registry.insert(&key, &actor);
        Stats::inc(&env.stats.steps_created);
        for d in dep_keys.iter().filter_map(|k| actors.get(&**k)) {
            d.1.do_send(AddWaiter(WaiterAddr::Step(key.clone(), actor.downgrade())));
        }
        for f in failed_inputs {
            actor.do_send(StepFailed {
                from: f.as_str().into(),
                failure: Failure::new(
                    Status::CachedFailure,
                    format!("{f} failed before (cached failure)"),
                ),
            });
        }
        actors.insert(drv_path.clone(), (key, actor));
    }
    match plan.nodes.get(&plan.top) {
        Some(Node::Built(o)) => Top::Built(o.clone()),
        Some(Node::CachedFailure) => Top::Failed(Failure::new(
            Status::CachedFailure,
            format!("{} failed before (cached failure)", plan.top),
        )),
        _ => match actors.get(&plan.top) {
            Some((_, a)) => Top::Step(Addr::clone(a)),
            None => Top::Failed(Failure::new(
                Status::Aborted,
                format!("step for {} vanished while attaching", plan.top),
            )),
        },
    }
}

/// The drvs of the plan that are cached failures (each gets a step row in the build).
pub fn cached_failures(plan: &Plan) -> Vec<String> {
    plan.nodes
        .iter()
        .filter(|(_, n)| matches!(n, Node::CachedFailure))
        .map(|(d, _)| d.clone())
        .collect()
}
