//! The one registry of step actors, keyed by drv path: whoever needs a drv built finds the live
//! step here (weakly held: a step lives as long as something downstream holds it).

use actix::{Addr, WeakAddr};
use dashmap::DashMap;

use crate::actors::step::actor::StepActor;
use crate::actors::types::Drv;

/// Keyed by the step's own [`Drv`] (shared with the step, not a copy).
#[derive(Default)]
pub struct Registry {
    steps: DashMap<Drv, WeakAddr<StepActor>>,
}

impl Registry {
    /// The live step for `drv`, if any.
    pub fn get(&self, drv: &str) -> Option<Addr<StepActor>> {
        self.get_keyed(drv).map(|(_, a)| a)
    }

    /// The live step for `drv` with its shared drv path (for whoever names it from now on).
    pub fn get_keyed(&self, drv: &str) -> Option<(Drv, Addr<StepActor>)> {
        let found = self
            .steps
            .get(drv)
            .and_then(|e| e.value().upgrade().map(|a| (e.key().clone(), a)));
        if found.is_none() {
            self.steps.remove_if(drv, |_, w| w.upgrade().is_none());
        }
        found
    }

    pub fn insert(&self, drv: &Drv, addr: &Addr<StepActor>) {
        self.steps.insert(drv.clone(), addr.downgrade());
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
            .map(|e| e.key().to_string())
            .collect()
    }
}
