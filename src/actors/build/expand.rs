//! Expanding a build's drv closure into steps: all I/O first (read the drvs, ask the store and the
//! database what is built or failed), then one synchronous change of the actor graph (as Hydra's
//! `attach_step`). A drv whose outputs are valid (or realised) needs no step; a drv in `FailedPaths`
//! is a cached failure; a drv with a live step shares it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;

use crate::actors::dispatcher::actor::DispatcherActor;
use crate::actors::env::{Env, Stats};
use crate::actors::messages::{AddBuilds, AddWaiter, BuildPrio, StepFailed, WaiterAddr};
use crate::actors::step::StepMachine;
use crate::actors::step::actor::{Row, StepActor};
use crate::actors::types::{Failure, Outputs, Status};
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

/// The I/O phase: walks the closure of `top` (stopping at built, failed and live drvs).
pub async fn plan(
    env: &Env,
    top: &str,
    recorded: &dyn Fn(&str) -> Option<Recorded>,
) -> Result<Plan, String> {
    let mut nodes = HashMap::new();
    let mut order = Vec::new();
    // Iterative post-order walk: (drv, children pushed?)
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
        let drv = env
            .store
            .read_derivation(&drv_path)
            .await
            .map_err(|e| format!("cannot read {drv_path}: {e}"))?;
        if let Some(outputs) = built_outputs(env, &drv_path, &drv).await {
            nodes.insert(drv_path, Node::Built(outputs));
            continue;
        }
        let failed = env
            .db
            .is_failed_path(&drv_path)
            .await
            .map_err(|e| format!("database: {e}"))?;
        if failed {
            nodes.insert(drv_path, Node::CachedFailure);
            continue;
        }
        let rec = recorded(&drv_path);
        stack.push((drv_path.clone(), true));
        if rec.is_none() {
            for input in drv.input_drvs.keys() {
                if !seen.contains(input) {
                    stack.push((input.clone(), false));
                }
            }
        }
        nodes.insert(
            drv_path,
            Node::New {
                drv: Arc::new(drv),
                recorded: rec,
            },
        );
    }
    Ok(Plan {
        top: top.to_string(),
        nodes,
        order,
    })
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
    dispatcher: &Addr<DispatcherActor>,
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
    let mut actors: HashMap<String, Addr<StepActor>> = HashMap::new();
    let builds: BTreeMap<i64, BuildPrio> = [(build, prio.clone())].into();
    for drv_path in &plan.order {
        if let Some(live) = env.registry.get(drv_path) {
            live.do_send(AddBuilds(vec![(build, prio.clone())]));
            actors.insert(drv_path.clone(), live);
            continue;
        }
        let Some(Node::New { drv, recorded }) = plan.nodes.get(drv_path) else {
            continue;
        };
        let mut inputs = BTreeMap::new();
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
                    Some(a) => {
                        inputs.insert(input.clone(), outs.clone());
                        deps.push(a.clone());
                    }
                    None if recorded.is_some() => {}
                    None => failed_inputs.push(input.clone()),
                },
            }
        }
        let mut machine = StepMachine::new(
            drv_path.clone(),
            drv.needs_resolution(),
            inputs,
            landed,
            env.retry.clone(),
        );
        if let Some(r) = recorded {
            machine = machine.with_recorded_resolution(r.resolved.clone());
        }
        let rec_rows = recorded.as_ref().map(|r| (r.own, r.child));
        let actor = StepActor::new(
            env.clone(),
            dispatcher.clone(),
            machine,
            drv.clone(),
            deps.clone(),
            builds.clone(),
            rec_rows,
        )
        .start();
        env.registry.insert(drv_path, &actor);
        Stats::inc(&env.stats.steps_created);
        for d in &deps {
            d.do_send(AddWaiter(WaiterAddr::Step(
                drv_path.clone(),
                actor.downgrade(),
            )));
        }
        for f in failed_inputs {
            actor.do_send(StepFailed {
                from: f.clone(),
                failure: Failure::new(
                    Status::CachedFailure,
                    format!("{f} failed before (cached failure)"),
                ),
            });
        }
        actors.insert(drv_path.clone(), actor);
    }
    match plan.nodes.get(&plan.top) {
        Some(Node::Built(o)) => Top::Built(o.clone()),
        Some(Node::CachedFailure) => Top::Failed(Failure::new(
            Status::CachedFailure,
            format!("{} failed before (cached failure)", plan.top),
        )),
        _ => match actors.get(&plan.top) {
            Some(a) => Top::Step(a.clone()),
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
