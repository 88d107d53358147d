//! The one registry of step actors, keyed by drv path: whoever needs a drv built finds the live
//! step here (weakly held: a step lives as long as something downstream holds it).

use std::sync::{Arc, Weak};

use actix::{Addr, WeakAddr};
use dashmap::DashMap;

use crate::actors::step::actor::{StepActor, StepRef};
use crate::actors::types::Drv;

/// A registered step: its address (weak: whether the actor lives), and the shared strong
/// reference handed to dependents while one of them holds it.
struct Entry {
    addr: WeakAddr<StepActor>,
    shared: Weak<Addr<StepActor>>,
}

/// Keyed by the step's own [`Drv`] (shared with the step, not a copy).
#[derive(Default)]
pub struct Registry {
    steps: DashMap<Drv, Entry>,
}

impl Registry {
    /// The live step for `drv`, if any.
    pub fn get(&self, drv: &str) -> Option<Addr<StepActor>> {
        let addr = self.steps.get(drv).and_then(|e| e.addr.upgrade());
        if addr.is_none() {
            self.steps.remove_if(drv, |_, e| e.addr.upgrade().is_none());
        }
        addr
    }

    /// The live step for `drv` with its shared drv path (for whoever names it from now on) and
    /// the strong reference its dependents share.
    pub fn get_keyed(&self, drv: &str) -> Option<(Drv, StepRef)> {
        let found = self.steps.get_mut(drv).and_then(|mut e| {
            let key = e.key().clone();
            if let Some(s) = e.shared.upgrade() {
                return Some((key, s));
            }
            let s = Arc::new(e.addr.upgrade()?);
            e.shared = Arc::downgrade(&s);
            Some((key, s))
        });
        if found.is_none() {
            self.steps.remove_if(drv, |_, e| e.addr.upgrade().is_none());
        }
        found
    }

    pub fn insert(&self, drv: &Drv, addr: &StepRef) {
        self.steps.insert(
            drv.clone(),
            Entry {
                addr: addr.downgrade(),
                shared: Arc::downgrade(addr),
            },
        );
    }

    /// Forgets `drv` (when its actor stops).
    pub fn remove(&self, drv: &str) {
        self.steps.remove_if(drv, |_, e| e.addr.upgrade().is_none());
    }

    /// Live step actors.
    pub fn len(&self) -> usize {
        self.steps
            .iter()
            .filter(|e| e.value().addr.upgrade().is_some())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drv paths of the live steps.
    pub fn drvs(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|e| e.value().addr.upgrade().is_some())
            .map(|e| e.key().to_string())
            .collect()
    }
}
