//! The one registry of step actors, keyed by drv path: whoever needs a drv built finds the live
//! step here (weakly held: a step lives as long as something downstream holds it).

use actix::{Addr, WeakAddr};
use dashmap::DashMap;

use crate::actors::step::actor::StepActor;

#[derive(Default)]
pub struct Registry {
    steps: DashMap<String, WeakAddr<StepActor>>,
}

impl Registry {
    /// The live step for `drv`, if any.
    pub fn get(&self, drv: &str) -> Option<Addr<StepActor>> {
        let addr = self.steps.get(drv).and_then(|w| w.upgrade());
        if addr.is_none() {
            self.steps.remove_if(drv, |_, w| w.upgrade().is_none());
        }
        addr
    }

    pub fn insert(&self, drv: &str, addr: &Addr<StepActor>) {
        self.steps.insert(drv.to_string(), addr.downgrade());
    }

    /// Forgets `drv` (when its actor stops).
    pub fn remove(&self, drv: &str) {
        self.steps.remove_if(drv, |_, w| w.upgrade().is_none());
    }

    /// Live step actors.
    pub fn len(&self) -> usize {
        self.steps
            .iter()
            .filter(|e| e.value().upgrade().is_some())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drv paths of the live steps.
    pub fn drvs(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|e| e.value().upgrade().is_some())
            .map(|e| e.key().clone())
            .collect()
    }
}
