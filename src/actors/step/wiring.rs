//! What a step actor holds of the others, as actix addresses: its waiters, its inputs and child,
//! the machine running its job, and the graph it was made in.

use std::sync::{Arc, Weak};

use actix::prelude::*;
use actix::{WeakAddr, WeakRecipient};

use super::core::{Produced, StepCore, Wiring};
use super::slot::{Holder, Slot};
use crate::actors::driver::Driver;
use crate::actors::messages::{AbortJob, BuildPrio, OutputsLanded, RunJob, StepFailed};
use crate::actors::types::{Drv, Waiter, WaiterRef};
use crate::store::Derivation;

/// The step actor.
pub type StepActor = Driver<StepCore<Actix>>;

/// A step's identity: dormant state or a live actor (see [`slot`](super::slot)); its waiters
/// hold it weakly.
pub type StepSlot = Slot<StepActor>;

/// A strong reference to a step shared by the steps and builds that need it: the step lives
/// while any clone does (or, once live, while its actor runs).
pub type StepRef = Arc<Holder<StepActor>>;

/// How a step reaches its graph (implemented by [`Graph`](crate::actors::graph::Graph)): the
/// registry, and the making of a resolution's child.
pub trait StepGraph: Send + Sync {
    /// The live step for `drv`, with its shared drv path.
    fn live(&self, drv: &str) -> Option<(Drv, StepRef)>;
    /// The step of the resolved drv, for these builds: live, or made now.
    fn spawn_resolved(
        self: Arc<Self>,
        resolved: &str,
        drv: &Derivation,
        builds: Vec<(i64, BuildPrio)>,
    ) -> (Drv, StepRef);
    /// The step for `drv` stopped.
    fn forget(&self, drv: &str);
    /// The step's remaining critical path (ms), for its place in the queue.
    fn critical_path_ms(&self, drv: &str) -> u64;
    /// `dependent` waits on `input` from now on (a step on its resolution's child).
    fn linked(&self, input: &Drv, dependent: &Drv);
    /// The step finished; `built`: its build's job key and how long it took, to learn from.
    fn finished(&self, drv: &str, built: Option<(Option<&str>, std::time::Duration)>);
    /// Where the closure of a derivation an input produced is expanded and attached (the
    /// expander every build uses); `None` before it is started.
    fn expander(&self) -> Option<Recipient<ExpandProduced>>;
    /// `drv` is a derivation these (producer drv, output) pairs hold (dynamic derivations): the
    /// rows its step makes from now on link to theirs. `false` undoes it (no step was made).
    fn produced_by(&self, drv: &str, by: &[(String, String)], noted: bool);
    /// The (producer drv, output) pairs holding `drv`, for the rows its step makes.
    fn producers_of(&self, drv: &str) -> Vec<(String, String)>;
}

/// Expand and attach the closure of `drv`, a derivation an input of a step produced (dynamic
/// derivations), for `build`: its step is shared when live, made with its closure's when
/// missing, and none is made when it is built.
pub struct ExpandProduced {
    pub drv: String,
    pub build: i64,
    pub prio: BuildPrio,
}

impl Message for ExpandProduced {
    type Result = Produced<StepRef>;
}

/// How to reach a waiter (weakly: references point up the graph weakly).
#[derive(Clone, Debug)]
pub enum WaiterAddr {
    Step(Drv, Weak<StepSlot>),
    Build(i64, WeakRecipient<OutputsLanded>, WeakRecipient<StepFailed>),
}

impl WaiterAddr {
    /// A build waiting on its top step.
    pub fn build<A>(id: i64, addr: WeakAddr<A>) -> Self
    where
        A: Actor<Context = Context<A>> + Handler<OutputsLanded> + Handler<StepFailed>,
    {
        WaiterAddr::Build(id, addr.clone().recipient(), addr.recipient())
    }
}

impl WaiterRef for WaiterAddr {
    fn key(&self) -> Waiter {
        match self {
            WaiterAddr::Step(d, _) => Waiter::Step(d.clone()),
            WaiterAddr::Build(id, ..) => Waiter::Build(*id),
        }
    }

    fn cmp_key(&self, w: &Waiter) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        match (self, w) {
            (WaiterAddr::Step(d, _), Waiter::Step(e)) => d.cmp(e),
            (WaiterAddr::Step(..), Waiter::Build(_)) => Ordering::Less,
            (WaiterAddr::Build(..), Waiter::Step(_)) => Ordering::Greater,
            (WaiterAddr::Build(i, ..), Waiter::Build(j)) => i.cmp(j),
        }
    }
}

/// A waiter for the step's outputs.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddWaiter(pub WaiterAddr);

/// What the actor's step holds: actix addresses.
#[derive(Debug, Clone, Copy)]
pub struct Actix;

impl Wiring for Actix {
    type Waiter = WaiterAddr;
    type Dep = StepRef;
    type Job = JobRoute;
    type Drv = Arc<Derivation>;
}

/// The machine a step was assigned: where its job goes, and how to stop it.
#[derive(Debug, Clone)]
pub struct JobRoute {
    pub runner: Recipient<RunJob>,
    pub abort: Option<Recipient<AbortJob>>,
}
