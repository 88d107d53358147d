//! The one registry of steps, keyed by drv path: whoever needs a drv built finds its step here,
//! dormant or live (weakly held: a step lives as long as something downstream holds it, or its
//! actor still runs).

use std::sync::{Arc, Weak};

use dashmap::DashMap;

use crate::actors::step::actor::{StepRef, StepSlot};
use crate::actors::types::Drv;

/// Keyed by the step's own [`Drv`] (shared with the step, not a copy).
#[derive(Default)]
pub struct Registry {
    steps: DashMap<Drv, Weak<StepSlot>>,
}

fn alive(slot: &Weak<StepSlot>) -> bool {
    slot.upgrade().is_some_and(|s| s.alive())
}

// No step is upgraded while a map guard is held: the upgraded reference may be the last one
// (its holders went on another thread), and dropping a step forgets it here.
impl Registry {
    fn entry(&self, drv: &str) -> Option<(Drv, Weak<StepSlot>)> {
        self.steps
            .get(drv)
            .map(|e| (e.key().clone(), e.value().clone()))
    }

    /// Forgets `drv`'s entry when it is still `slot` and that step went.
    fn forget_dead(&self, drv: &str, slot: &Weak<StepSlot>) {
        if !alive(slot) {
            self.steps.remove_if(drv, |_, e| e.ptr_eq(slot));
        }
    }

    fn slots(&self) -> Vec<(Drv, Weak<StepSlot>)> {
        self.steps
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    /// Whether a step for `drv` lives.
    pub fn contains(&self, drv: &str) -> bool {
        let Some((_, slot)) = self.entry(drv) else {
            return false;
        };
        let found = alive(&slot);
        if !found {
            self.forget_dead(drv, &slot);
        }
        found
    }

    /// The step for `drv` with its shared drv path (for whoever names it from now on) and the
    /// strong reference its dependents share.
    pub fn get_keyed(&self, drv: &str) -> Option<(Drv, StepRef)> {
        let (key, slot) = self.entry(drv)?;
        let found = slot.upgrade().and_then(|s| s.holder());
        match found {
            Some(holder) => Some((key, holder)),
            None => {
                self.forget_dead(drv, &slot);
                None
            }
        }
    }

    pub fn insert(&self, drv: &Drv, step: &StepRef) {
        self.steps.insert(drv.clone(), Arc::downgrade(step.slot()));
    }

    /// Forgets `drv` (when its step stops), unless a step made for it since lives.
    pub fn remove(&self, drv: &str) {
        if let Some((_, slot)) = self.entry(drv) {
            self.forget_dead(drv, &slot);
        }
    }

    /// Live steps (dormant ones included).
    pub fn len(&self) -> usize {
        self.slots().iter().filter(|(_, s)| alive(s)).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Steps held dormant (plain state, no actor).
    pub fn dormant(&self) -> usize {
        self.slots()
            .iter()
            .filter(|(_, s)| s.upgrade().is_some_and(|s| s.alive() && s.is_dormant()))
            .count()
    }

    /// Drv paths of the live steps.
    pub fn drvs(&self) -> Vec<String> {
        self.slots()
            .into_iter()
            .filter(|(_, s)| alive(s))
            .map(|(d, _)| d.to_string())
            .collect()
    }
}
