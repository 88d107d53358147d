//! The live steps' remaining critical paths: every step the graph makes is tracked in
//! [`CriticalPath`] with the expected duration [`Durations`] gives it, and leaves it when it
//! finishes or stops. What changed for steps that were already tracked is handed back for the
//! dispatcher (a queued step moves); a new step's value is read when it is enqueued. With
//! `[scheduler] order = "build-id"` nothing is tracked (every value is 0); durations are still
//! learnt. Pure: the graph holds it behind a lock and does the sending.

use std::collections::HashSet;
use std::time::Duration;

use super::critical_path::{Changes, CriticalPath};
use super::durations::Durations;
use crate::actors::dispatcher::machine::Order;
use crate::actors::env::Scheduling;
use crate::actors::messages::job_key;
use crate::actors::types::Drv;
use crate::db::types::StepDuration;

#[derive(Debug)]
pub struct LivePaths {
    /// Whether critical paths are tracked at all (`Order::CriticalPath`).
    tracking: bool,
    paths: CriticalPath,
    durations: Durations,
}

impl LivePaths {
    pub fn new(scheduling: &Scheduling) -> Self {
        LivePaths {
            tracking: scheduling.order == Order::CriticalPath,
            paths: CriticalPath::new(),
            durations: Durations::new(scheduling.default_step_duration),
        }
    }

    /// Learns from history rows, newest first (as `Db::recent_step_durations` returns them): the
    /// newest are recorded last, so they are the ones kept.
    pub fn learn(&mut self, history: &[StepDuration]) {
        for row in history.iter().rev() {
            let secs = u64::try_from(row.seconds).unwrap_or(0);
            let job = job_key(&row.jobset, &row.job);
            self.durations
                .record(&row.drv_path, Some(&job), Duration::from_secs(secs));
        }
    }

    /// A build's new steps, inputs first, each with the steps it waits on (live ones included:
    /// they rise if the new steps make their path longer), expected as `job`'s steps (its key,
    /// `messages::job_key`). Returns the changed values of steps that were tracked before.
    pub fn attach(&mut self, steps: &[(Drv, Vec<Drv>)], job: &str) -> Changes {
        if !self.tracking || steps.is_empty() {
            return Changes::new();
        }
        let fresh: HashSet<&Drv> = steps
            .iter()
            .map(|(d, _)| d)
            .filter(|d| self.paths.value(d).is_none())
            .collect();
        let with_ms: Vec<(Drv, u64, Vec<Drv>)> = steps
            .iter()
            .map(|(d, inputs)| {
                let (ms, _) = self.durations.expected_ms(d, Some(job));
                (d.clone(), ms, inputs.clone())
            })
            .collect();
        let mut changes = self.paths.insert_all(&with_ms);
        changes.retain(|(d, _)| !fresh.contains(d));
        changes
    }

    /// The step of a resolved drv, made for the step that resolved to it: it does that step's
    /// work, so it adds no duration of its own ([`Self::link`] gives it its parent's path).
    pub fn add_resolved(&mut self, child: &Drv) {
        if self.tracking && self.paths.value(child).is_none() {
            self.paths.insert(child, 0, &[]);
        }
    }

    /// `dependent` waits on `input` from now on (a step on its resolved child). Returns the
    /// changed values.
    pub fn link(&mut self, input: &Drv, dependent: &Drv) -> Changes {
        if !self.tracking {
            return Changes::new();
        }
        self.paths.link(input, dependent)
    }

    /// The step's remaining critical path (ms); 0 when it is not tracked.
    pub fn value(&self, drv: &str) -> u64 {
        self.paths.value(drv).unwrap_or(0)
    }

    /// The step finished (or stopped): it leaves the structure; `built` is how long its build
    /// took and in which job, to learn from. Returns the changed values of the steps it waited
    /// on.
    pub fn finished(&mut self, drv: &str, built: Option<(Option<&str>, Duration)>) -> Changes {
        if let Some((job, took)) = built {
            self.durations.record(drv, job, took);
        }
        self.paths.remove(drv)
    }

    /// The expected duration of a step of `drv` in `job` (ms).
    pub fn expected_ms(&self, drv: &str, job: Option<&str>) -> u64 {
        self.durations.expected_ms(drv, job).0
    }

    /// Tracked steps.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    fn drv(name: &str) -> Drv {
        format!("/nix/store/{H}-{name}.drv").as_str().into()
    }

    fn scheduling(order: Order) -> Scheduling {
        Scheduling {
            order,
            default_step_duration: Duration::from_secs(1),
        }
    }

    fn row(name: &str, job: &str, seconds: i64) -> StepDuration {
        StepDuration {
            drv_path: drv(name).to_string(),
            jobset: "js".into(),
            job: job.into(),
            seconds,
        }
    }

    #[test]
    fn attached_steps_get_their_history_and_only_old_steps_are_reported() {
        let mut p = LivePaths::new(&scheduling(Order::CriticalPath));
        // Newest first: the newest (30 s) is kept last; the mean of both is 20 s.
        p.learn(&[row("long", "j", 30), row("long", "j", 10)]);
        let (long, short) = (drv("long"), drv("short"));
        // short waits on long: long's path is 20 s + short's 1 s (the default).
        let changes = p.attach(
            &[(long.clone(), vec![]), (short.clone(), vec![long.clone()])],
            "js/j2",
        );
        assert!(
            changes.is_empty(),
            "new steps are read when enqueued: {changes:?}"
        );
        assert_eq!(p.value(&long), 21_000);
        assert_eq!(p.value(&short), 1_000);
        // Another build's new step waits on the live `long`: only `long` is reported.
        let top = drv("top");
        let changes = p.attach(&[(top.clone(), vec![long.clone()])], "js/j");
        // top has no history of its name; its job's history is long's (20 s).
        assert_eq!(p.value(&top), 20_000);
        assert_eq!(changes, vec![(long.clone(), 40_000)]);
    }

    #[test]
    fn finished_steps_leave_and_teach() {
        let mut p = LivePaths::new(&scheduling(Order::CriticalPath));
        let (a, b) = (drv("a"), drv("b"));
        p.attach(&[(a.clone(), vec![]), (b.clone(), vec![a.clone()])], "js/j");
        assert_eq!(p.value(&a), 2_000);
        // b stops (its build cancelled): a's path falls to its own.
        let changes = p.finished(&b, None);
        assert_eq!(changes, vec![(a.clone(), 1_000)]);
        let changes = p.finished(&a, Some((Some("js/j"), Duration::from_secs(7))));
        assert!(changes.is_empty());
        assert!(p.is_empty(), "no step left behind");
        assert_eq!(p.value(&a), 0);
        // What a taught: its name, and its job.
        assert_eq!(p.expected_ms(&a, None), 7_000);
        assert_eq!(p.expected_ms(&drv("other"), Some("js/j")), 7_000);
    }

    #[test]
    fn a_resolved_child_carries_its_parents_path() {
        let mut p = LivePaths::new(&scheduling(Order::CriticalPath));
        p.learn(&[row("ca", "j", 5), row("top", "j", 3)]);
        let (ca, top) = (drv("ca"), drv("top"));
        p.attach(
            &[(ca.clone(), vec![]), (top.clone(), vec![ca.clone()])],
            "js/j",
        );
        assert_eq!(p.value(&ca), 8_000);
        let child = drv("ca-resolved");
        p.add_resolved(&child);
        assert_eq!(p.value(&child), 0);
        let changes = p.link(&child, &ca);
        assert_eq!(changes, vec![(child.clone(), 8_000)]);
        p.finished(&child, None);
        p.finished(&ca, None);
        p.finished(&top, None);
        assert!(p.is_empty());
    }

    #[test]
    fn build_id_order_tracks_nothing() {
        let mut p = LivePaths::new(&scheduling(Order::BuildId));
        let a = drv("a");
        assert!(p.attach(&[(a.clone(), vec![])], "js/j").is_empty());
        p.add_resolved(&drv("r"));
        assert_eq!(p.value(&a), 0);
        assert!(p.is_empty());
        // Durations are still learnt.
        p.finished(&a, Some((None, Duration::from_secs(4))));
        assert_eq!(p.expected_ms(&a, None), 4_000);
    }
}
