//! The runner's Prometheus metrics beyond the actors' [`Stats`](crate::actors::env::Stats): one
//! registry per process ([`global`]; a runner is one process), fed where each thing happens — the
//! queue monitor's reads, the dispatcher's decisions, the machines' jobs, the builders' NAR
//! transfers, the binary cache's requests — and rendered by `/metrics`
//! ([`crate::web::metrics`]). Every update is a relaxed atomic add, or a short lock of a map
//! keyed by a label (a machine, a machine type, a phase) that is looked up once per event.
//!
//! `docs/ops.md` lists the families and how they map to Hydra's queue runner's.

pub mod machines;
pub mod steps;
pub mod text;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use machines::{JobTimer, MachineCounters, Phase};

/// A monotonic count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds a duration in microseconds (read back as seconds by [`Counter::seconds`]).
    pub fn add_duration(&self, d: Duration) {
        self.add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// A counter of microseconds, in seconds.
    pub fn seconds(&self) -> f64 {
        self.get() as f64 / 1e6
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    /// One more while the guard lives.
    pub fn hold(self: &Arc<Self>) -> GaugeHold {
        self.add(1);
        GaugeHold(self.clone())
    }
}

/// One unit of a [`Gauge`], given back when dropped.
#[derive(Debug)]
pub struct GaugeHold(Arc<Gauge>);

impl Drop for GaugeHold {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

/// Bucket bounds (seconds) for durations from a millisecond to a day: steps and phases.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 7200.0, 86400.0,
];
/// Bucket bounds for counts of input derivations (as Hydra's `build_input_drvs`).
pub const COUNT_BUCKETS: &[f64] = &[0.0, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0];
/// Bucket bounds for sizes in bytes (as Hydra's `build_closure_size_bytes`).
pub const BYTES_BUCKETS: &[f64] = &[1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];

/// A Prometheus histogram with fixed bounds (a last `+Inf` bucket is implied).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: Vec<AtomicU64>,
    /// The sum, in millionths of the unit.
    sum_micros: AtomicU64,
}

/// A histogram as read at one moment: cumulative buckets ending with `+Inf` (= `count`).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v * 1e6).round() as u64, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(self.counts.len());
        let mut acc = 0;
        for (i, c) in self.counts.iter().enumerate() {
            acc += c.load(Ordering::Relaxed);
            buckets.push((self.bounds.get(i).copied().unwrap_or(f64::INFINITY), acc));
        }
        HistogramSnapshot {
            buckets,
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: acc,
        }
    }
}

/// A family's members by their labels (`k="v",…` as rendered), made on first use.
pub struct Labeled<T> {
    make: fn() -> T,
    members: Mutex<BTreeMap<String, Arc<T>>>,
}

impl<T> Labeled<T> {
    pub fn new(make: fn() -> T) -> Self {
        Labeled {
            make,
            members: Mutex::new(BTreeMap::new()),
        }
    }

    /// The member with these labels (`[("machine", "m1")]`).
    pub fn with(&self, labels: &[(&str, &str)]) -> Arc<T> {
        let key = text::labels(labels);
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key)
            .or_insert_with(|| Arc::new((self.make)()))
            .clone()
    }

    /// Every member, by labels.
    pub fn snapshot(&self) -> Vec<(String, Arc<T>)> {
        let m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl<T: Default> Default for Labeled<T> {
    fn default() -> Self {
        Labeled::new(T::default)
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn count_histogram() -> Histogram {
    Histogram::new(COUNT_BUCKETS)
}

fn bytes_histogram() -> Histogram {
    Histogram::new(BYTES_BUCKETS)
}

/// The queue monitor's reads of the queue (Hydra's `queue_checks_*`, `builds_read*`).
#[derive(Debug, Default)]
pub struct QueueMetrics {
    pub checks_started: Counter,
    pub checks_finished: Counter,
    /// Reads that failed (the monitor reads again a second later).
    pub checks_failed: Counter,
    pub builds_read: Counter,
    /// Microseconds spent reading.
    pub read_micros: Counter,
    /// Queue events (notifications, rescans) handled.
    pub wakeups: Counter,
    /// Build actors started.
    pub builds_loaded: Counter,
}

/// A read of the queue, from its start to [`QueueCheck::finish`].
#[must_use = "finish the check"]
pub struct QueueCheck {
    start: std::time::Instant,
}

impl QueueMetrics {
    pub fn check(&self) -> QueueCheck {
        self.checks_started.inc();
        QueueCheck {
            start: std::time::Instant::now(),
        }
    }
}

impl QueueCheck {
    /// The read ended with `rows` builds, or failed.
    pub fn finish<E>(self, rows: Result<usize, E>) {
        let q = &global().queue;
        q.read_micros.add_duration(self.start.elapsed());
        match rows {
            Ok(n) => {
                q.checks_finished.inc();
                q.builds_read.add(n as u64);
            }
            Err(_) => q.checks_failed.inc(),
        }
    }
}

/// Builds as they finish.
#[derive(Default)]
pub struct BuildMetrics {
    /// By `status` (Hydra's names, lower case).
    pub finished: Labeled<Counter>,
}

impl BuildMetrics {
    pub fn finished(&self, status_code: i32) {
        self.finished
            .with(&[("status", status_name(status_code))])
            .inc();
    }
}

/// The dispatcher's decisions (Hydra's `dispatch_wakeup`, `dispatch_time_ms`).
#[derive(Debug, Default)]
pub struct DispatcherMetrics {
    pub wakeups: Counter,
    pub busy_micros: Counter,
}

impl DispatcherMetrics {
    /// One decision (a step became runnable, a slot was freed) that took `d`.
    pub fn decided(&self, d: Duration) {
        self.wakeups.inc();
        self.busy_micros.add_duration(d);
    }
}

/// The binary cache over HTTP and its `file://` upload.
#[derive(Default)]
pub struct CacheMetrics {
    /// By `kind` (`cache_info`, `narinfo`, `nar`, `log`, `realisation`, `other`) and `result`
    /// (`hit`, `miss`, `error`).
    pub requests: Labeled<Counter>,
    /// Body bytes sent, by `kind`.
    pub bytes: Labeled<Counter>,
    pub compressions: Counter,
    pub compression_in_bytes: Counter,
    pub compression_out_bytes: Counter,
    pub compression_micros: Counter,
    /// Passes of the `file://` publisher by `result` (`ok`, `error`).
    pub upload_passes: Labeled<Counter>,
    pub upload_paths: Counter,
    /// Paths found in the upload directory already (not written again).
    pub upload_skipped: Counter,
    pub upload_realisations: Counter,
    pub upload_logs: Counter,
    pub upload_nar_bytes: Counter,
    pub upload_file_bytes: Counter,
}

impl CacheMetrics {
    /// A NAR of `nar_bytes` compressed to `file_bytes` in `d`.
    pub fn compressed(&self, nar_bytes: u64, file_bytes: u64, d: Duration) {
        self.compressions.inc();
        self.compression_in_bytes.add(nar_bytes);
        self.compression_out_bytes.add(file_bytes);
        self.compression_micros.add_duration(d);
    }
}

/// Everything [`global`] holds.
#[derive(Default)]
pub struct Metrics {
    pub queue: QueueMetrics,
    pub builds: BuildMetrics,
    pub steps: steps::StepMetrics,
    pub dispatcher: DispatcherMetrics,
    /// By `machine`.
    pub machines: Labeled<MachineCounters>,
    pub cache: CacheMetrics,
}

impl Metrics {
    /// Machine `id`'s counters.
    pub fn machine(&self, id: &str) -> Arc<MachineCounters> {
        self.machines.with(&[("machine", id)])
    }
}

/// The process's registry.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

/// Hydra's name of a build status code, as a label value.
pub fn status_name(code: i32) -> &'static str {
    match code {
        0 => "success",
        1 => "failed",
        2 => "dep_failed",
        3 => "aborted",
        4 => "cancelled",
        6 => "failed_with_output",
        7 => "timed_out",
        8 => "cached_failure",
        9 => "unsupported",
        10 => "log_limit_exceeded",
        11 => "nar_size_limit_exceeded",
        12 => "not_deterministic",
        13 => "resolved",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 1.0, 3.0, 20.0, f64::NAN] {
            h.observe(v);
        }
        let s = h.snapshot();
        // NaN is observed as 0.
        assert_eq!(
            s.buckets,
            vec![(1.0, 3), (10.0, 4), (f64::INFINITY, 5)],
            "{s:?}"
        );
        assert_eq!(s.count, 5);
        assert!((s.sum - 24.5).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn labeled_members_are_made_once_and_listed_in_order() {
        let l: Labeled<Counter> = Labeled::default();
        l.with(&[("machine", "b")]).inc();
        l.with(&[("machine", "a")]).add(2);
        l.with(&[("machine", "b")]).inc();
        let s: Vec<(String, u64)> = l
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k, v.get()))
            .collect();
        assert_eq!(
            s,
            vec![
                ("machine=\"a\"".to_string(), 2),
                ("machine=\"b\"".to_string(), 2)
            ]
        );
    }

    #[test]
    fn a_gauge_hold_gives_its_unit_back() {
        let g = Arc::new(Gauge::default());
        let a = g.hold();
        let b = g.hold();
        assert_eq!(g.get(), 2);
        drop(a);
        drop(b);
        assert_eq!(g.get(), 0);
    }

    #[test]
    fn status_names_are_hydras() {
        assert_eq!(status_name(0), "success");
        assert_eq!(status_name(13), "resolved");
        assert_eq!(status_name(5), "other");
    }
}
