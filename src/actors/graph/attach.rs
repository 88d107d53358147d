//! Attaching a build's plan to the graph in one synchronous step (as Hydra's `attach_step`):
//! the missing steps are made inputs first, registered, wired to their waiters, and told which
//! build needs them; then the new steps join the critical paths ([`Graph::track`]) in the same
//! step, before any of them can be enqueued.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::Graph;
use super::plan::{Node, Plan};
use crate::actors::messages::{AddBuilds, BuildPrio, StepFailed};
use crate::actors::step::actor::StepRef;
use crate::actors::step::actor::{AddWaiter, WaiterAddr};
use crate::actors::step::{DynamicNeed, StepMachine};
use crate::actors::types::{Drv, Failure, Outputs, Status};

/// How the build's top-level drv stands after attaching.
pub enum Top {
    Built(Outputs),
    Failed(Failure),
    Step(StepRef),
    /// The graph changed while planning: plan again.
    Replan,
}

/// The synchronous phase: creates the missing step actors (inputs first), registers them, wires
/// waiters down and strong references up, and tells every step which build needs it.
pub fn attach(graph: &Arc<Graph>, plan: Plan, build: i64, prio: BuildPrio) -> Top {
    // A step that was live while planning may have finished since: plan again (its outputs are valid
    // now, so the next plan sees it built).
    if plan
        .nodes
        .iter()
        .any(|(d, n)| matches!(n, Node::Live) && !graph.is_live(d))
    {
        return Top::Replan;
    }
    // Each step with its shared drv path (the registry's key), so its dependents name it with
    // that one allocation.
    let mut actors: HashMap<String, (Drv, StepRef)> = HashMap::new();
    // The new steps, inputs first, with the steps they wait on (for the critical paths).
    let mut tracked: Vec<(Drv, Vec<Drv>)> = Vec::new();
    for drv_path in &plan.order {
        if let Some((key, live)) = graph.live(drv_path) {
            graph.env.stats.membership();
            live.send(AddBuilds(vec![(build, prio.clone())]));
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
        for input in drv.input_drvs.keys() {
            // The outputs used, and those holding derivations whose outputs are used.
            let outs = &drv.wanted_of_input(input);
            match plan.nodes.get(input) {
                Some(Node::Built(o)) => {
                    for out in outs {
                        if let Some(p) = o.get(out) {
                            landed.insert((input.clone(), out.clone()), p.clone());
                        }
                    }
                }
                Some(Node::CachedFailure) => {
                    // Waited on like any input, so the failure sent below fails the step (a step
                    // not waiting on it would ignore it, and build without the input).
                    inputs.push((input.as_str().into(), outs.iter().cloned().collect()));
                    failed_inputs.push(input.clone());
                }
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
            graph.env.retry.clone(),
        );
        if drv.has_dynamic_inputs() {
            machine = machine.with_dynamic(dynamic_needs(drv));
        }
        if let Some(r) = recorded {
            machine = machine.with_recorded_resolution(r.resolved.clone());
        }
        let rec_rows = recorded.as_ref().map(|r| (r.own, r.child));
        let (key, actor) = graph.spawn(
            machine,
            drv,
            deps,
            vec![(build, prio.clone())],
            rec_rows,
            false,
        );
        for d in dep_keys.iter().filter_map(|k| actors.get(&**k)) {
            d.1.send(AddWaiter(WaiterAddr::Step(
                key.clone(),
                Arc::downgrade(actor.slot()),
            )));
        }
        tracked.push((key.clone(), dep_keys));
        for f in failed_inputs {
            actor.send(StepFailed {
                from: f.as_str().into(),
                failure: Failure::new(
                    Status::CachedFailure,
                    format!("{f} failed before (cached failure)"),
                ),
            });
        }
        actors.insert(drv_path.clone(), (key, actor));
    }
    graph.track(&tracked, &prio.job_key());
    match plan.nodes.get(&plan.top) {
        Some(Node::Built(o)) => Top::Built(o.clone()),
        Some(Node::CachedFailure) => Top::Failed(Failure::new(
            Status::CachedFailure,
            format!("{} failed before (cached failure)", plan.top),
        )),
        _ => match actors.get(&plan.top) {
            Some((_, a)) => Top::Step(a.clone()),
            None => Top::Failed(Failure::new(
                Status::Aborted,
                format!("step for {} vanished while attaching", plan.top),
            )),
        },
    }
}

/// The levels of a derivation's dynamic inputs, as its step machine waits on them.
pub fn dynamic_needs(drv: &crate::store::Derivation) -> Vec<DynamicNeed> {
    drv.dynamic_levels()
        .into_iter()
        .map(|(input, chain, wanted)| DynamicNeed {
            input: input.into(),
            chain,
            wanted: wanted.into_iter().collect(),
        })
        .collect()
}

/// The drvs of the plan that are cached failures (each gets a step row in the build).
pub fn cached_failures(plan: &Plan) -> Vec<String> {
    plan.nodes
        .iter()
        .filter(|(_, n)| matches!(n, Node::CachedFailure))
        .map(|(d, _)| d.clone())
        .collect()
}
