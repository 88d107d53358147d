//! What operators see of a step (the admin API's and the dashboard's actor tree): refreshed from
//! the core after every event, rebuilt only when something shown changed.

use std::mem::Discriminant;

use super::core::{StepCore, Wiring};
use super::machine::Phase;
use crate::actors::introspect::{ActorCell, ActorId};
use crate::actors::types::{Waiter, WaiterRef};

/// What was last shown, to tell whether to rebuild it.
#[derive(Default)]
pub struct Described {
    shown: Option<(Discriminant<Phase>, usize, usize, bool)>,
}

impl Described {
    pub fn refresh<A: Wiring>(&mut self, core: &StepCore<A>, cell: &ActorCell) {
        cell.set_blocked(core.is_awaiting());
        cell.set_queued(core.queued());
        let m = core.machine();
        let now = (
            std::mem::discriminant(m.phase()),
            m.waiters().count(),
            m.waiting_on().count(),
            core.resolved_to().is_some(),
        );
        let Some(was) = self.shown.replace(now) else {
            return describe(core, cell);
        };
        if (was.0, was.1, was.3) != (now.0, now.1, now.3) {
            describe(core, cell);
        } else if was.2 != now.2 {
            // Still waiting: only the inputs that landed go.
            let waiting = waiting_on(core);
            cell.describe(|d| d.waiting_on = waiting);
        }
    }
}

/// The state name operators see.
pub fn phase_name(p: &Phase) -> &'static str {
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

fn waiting_on<A: Wiring>(core: &StepCore<A>) -> Vec<ActorId> {
    match core.phase() {
        Phase::WaitingForInputs => core
            .machine()
            .waiting_on_drvs()
            .map(|d| ActorId::Step(d.clone()))
            .collect(),
        Phase::AwaitingResolved { resolved } => vec![ActorId::Step(match core.resolved_to() {
            Some(r) if **r == **resolved => r.clone(),
            _ => resolved.as_str().into(),
        })],
        _ => vec![],
    }
}

fn describe<A: Wiring>(core: &StepCore<A>, cell: &ActorCell) {
    let phase = core.phase();
    let state = phase_name(phase);
    let waiting = waiting_on(core);
    let detail = match phase {
        Phase::Building { machine } => format!("building on {machine}"),
        Phase::AwaitingResolved { resolved } => format!("resolved to {resolved}"),
        Phase::Succeeded(_) if core.resolved_to().is_some() => "resolved; child built".into(),
        _ if core.is_resolved_child() => "resolved child".into(),
        Phase::Failed(f) => f.message.clone(),
        Phase::RetryWait => format!("retry {} pending", core.machine().tries()),
        _ => String::new(),
    };
    // The input steps still attached, and the resolved child.
    let mut children: Vec<ActorId> = core
        .machine()
        .waiting_on_drvs()
        .map(|d| ActorId::Step(d.clone()))
        .collect();
    if let Some(r) = core.resolved_to() {
        children.push(ActorId::Step(r.clone()));
    }
    let mut parents: Vec<ActorId> = core
        .machine()
        .waiters()
        .map(|w| match w.key() {
            Waiter::Build(b) => ActorId::Build(b),
            Waiter::Step(s) => ActorId::Step(s),
        })
        .collect();
    // As the printed ids sort.
    parents.sort_by_cached_key(|p| p.to_string());
    cell.describe(|d| {
        if d.state != state {
            d.state = state.into();
        }
        d.waiting_on = waiting;
        d.detail = detail;
        d.parents = parents;
        d.children = children;
    });
}
