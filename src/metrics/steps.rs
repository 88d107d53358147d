//! Steps: started and finished (by status), retries, phase durations, the wait for a machine and
//! the inputs per machine type (Hydra's `machine_type` label: the system, and the required
//! features when there are any, e.g. `x86_64-linux:kvm,nixos-test`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{
    Counter, Gauge, Histogram, Labeled, bytes_histogram, count_histogram, duration_histogram,
};
use crate::actors::env::Env;
use crate::actors::introspect::ActorId;
use crate::actors::step::core::Note;
use crate::store::Derivation;

pub struct StepMetrics {
    pub started: Counter,
    /// By `status`.
    pub finished: Labeled<Counter>,
    /// Transient failures retried (the retry timer set).
    pub retries: Counter,
    /// Produced derivations (dynamic derivations: a `.drv` an input's output holds) whose step
    /// a dependent waits on (made then, or shared when live).
    pub dynamic: Counter,
    /// NAR streams to builders in flight (inputs being copied to machines).
    pub copying_to: Arc<Gauge>,
    /// NAR uploads from builders in flight (outputs being copied from machines).
    pub copying_from: Arc<Gauge>,
    /// By `phase` (`preparing`, `building`, `receiving_outputs`, `total`).
    pub phases: Labeled<Histogram>,
    /// Runnable to taken by a machine, by `machine_type`.
    pub job_wait: Labeled<Histogram>,
    /// A step's remaining critical path (expected seconds from its start to the end of the
    /// longest chain of steps waiting on it) when it is queued, by `machine_type`.
    pub critical_path: Labeled<Histogram>,
    /// Input derivations per step, by `machine_type`.
    pub input_drvs: Labeled<Histogram>,
    /// Bytes of the input closure sent with a job to a remote builder, by `machine_type`.
    pub input_closure_bytes: Labeled<Histogram>,
    types: Mutex<HashMap<String, Arc<str>>>,
}

impl Default for StepMetrics {
    fn default() -> Self {
        StepMetrics {
            started: Counter::default(),
            finished: Labeled::default(),
            retries: Counter::default(),
            dynamic: Counter::default(),
            copying_to: Arc::default(),
            copying_from: Arc::default(),
            phases: Labeled::new(duration_histogram),
            job_wait: Labeled::new(duration_histogram),
            critical_path: Labeled::new(duration_histogram),
            input_drvs: Labeled::new(count_histogram),
            input_closure_bytes: Labeled::new(bytes_histogram),
            types: Mutex::default(),
        }
    }
}

/// The machine type of a derivation: its system, then `:` and its required features (sorted,
/// comma-separated) when it has any.
pub fn machine_type_of(drv: &Derivation) -> String {
    // Read as the dispatcher reads them (structured attributes too); none when unreadable.
    let features: Vec<String> = crate::store::drv_options::DrvOptions::of(drv)
        .map(|o| o.required_features.into_iter().collect())
        .unwrap_or_default();
    if features.is_empty() {
        drv.system.clone()
    } else {
        format!("{}:{}", drv.system, features.join(","))
    }
}

/// The label of a step without a known machine type.
pub const UNKNOWN_TYPE: &str = "unknown";

impl StepMetrics {
    /// The histogram of `phase`.
    pub fn phase(&self, phase: &str) -> Arc<Histogram> {
        self.phases.with(&[("phase", phase)])
    }

    /// One shared copy of a machine type's name.
    pub fn intern(&self, machine_type: String) -> Arc<str> {
        let mut m = self.types.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = m.get(&machine_type) {
            return t.clone();
        }
        let t: Arc<str> = machine_type.as_str().into();
        m.insert(machine_type, t.clone());
        t
    }

    /// A step actor for `drv` was made (its introspection cell registered as `key`): its cell
    /// learns its machine type, and its input derivations are counted.
    pub fn spawned(&self, env: &Env, key: &str, drv: &Derivation) {
        let t = self.intern(machine_type_of(drv));
        self.input_drvs
            .with(&[("machine_type", &t)])
            .observe(drv.input_drvs.len() as f64);
        if let Some(cell) = env.actors.cell(&ActorId::Step(key.into())) {
            cell.set_group(t);
        }
    }

    /// What a step told its watchers.
    pub fn noted(&self, n: &Note) {
        match n {
            Note::Started { .. } => self.started.inc(),
            Note::Finished { status, .. } => self
                .finished
                .with(&[("status", super::status_name(status.code()))])
                .inc(),
            Note::Dispatched | Note::EarlyCutoff { .. } => {}
        }
    }

    /// A step of `machine_type` was queued with this remaining critical path.
    pub fn queued(&self, machine_type: Option<&Arc<str>>, critical_path_ms: u64) {
        let t = machine_type.map_or(UNKNOWN_TYPE, |t| &**t);
        self.critical_path
            .with(&[("machine_type", t)])
            .observe_duration(Duration::from_millis(critical_path_ms));
    }

    /// A step of `machine_type` waited `d` from runnable to taken by a machine.
    pub fn waited(&self, machine_type: Option<&Arc<str>>, d: Duration) {
        let t = machine_type.map_or(UNKNOWN_TYPE, |t| &**t);
        self.job_wait
            .with(&[("machine_type", t)])
            .observe_duration(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_types_name_the_system_and_sorted_features() {
        let mut d = Derivation {
            system: "x86_64-linux".into(),
            ..Derivation::default()
        };
        assert_eq!(machine_type_of(&d), "x86_64-linux");
        d.env.insert(
            "requiredSystemFeatures".into(),
            "kvm  big-parallel kvm".into(),
        );
        assert_eq!(machine_type_of(&d), "x86_64-linux:big-parallel,kvm");
        let m = StepMetrics::default();
        let a = m.intern("x".into());
        let b = m.intern("x".into());
        assert!(Arc::ptr_eq(&a, &b));
    }
}
