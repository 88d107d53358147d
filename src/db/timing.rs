//! Transaction latency: every attempt of every operation is timed into a histogram per kind (read
//! or write), exported by `/metrics` as `qr_db_transaction_seconds`. Observing is a few relaxed
//! atomic adds; nothing is locked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the histogram's buckets; a last `+Inf` bucket is implied.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus-style histogram of durations with the fixed [`BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations ≤ it), cumulative, ending with `+Inf` (= `count`).
    pub buckets: Vec<(f64, u64)>,
    /// Sum of the observations in seconds.
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The cumulative buckets. Read without a lock, so under concurrent observations `count` is
    /// taken as the `+Inf` bucket, which keeps every bucket ≤ the next one.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        let mut acc = 0u64;
        for (i, le) in BUCKETS.iter().enumerate() {
            acc += self.counts[i].load(Ordering::Relaxed);
            buckets.push((*le, acc));
        }
        acc += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let count = acc.max(self.count.load(Ordering::Relaxed));
        buckets.push((f64::INFINITY, count));
        HistogramSnapshot {
            buckets,
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count,
        }
    }
}

/// What an operation does to the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxKind {
    /// Only reads (one statement or a few, no transaction of its own).
    Read,
    /// Writes: a write transaction (`BEGIN IMMEDIATE` on SQLite) or a single-statement write.
    Write,
}

impl TxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TxKind::Read => "read",
            TxKind::Write => "write",
        }
    }
}

/// The latency histograms of a [`super::Db`], one per [`TxKind`].
#[derive(Debug, Default)]
pub struct TxTimings {
    read: Histogram,
    write: Histogram,
    /// Operations that failed for good (after their retries), by kind.
    failures: [AtomicU64; 2],
}

impl TxTimings {
    /// An operation of `kind` failed for good.
    pub fn failed(&self, kind: TxKind) {
        self.failures[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Operations of `kind` that failed for good.
    pub fn failures(&self, kind: TxKind) -> u64 {
        self.failures[kind as usize].load(Ordering::Relaxed)
    }

    pub fn of(&self, kind: TxKind) -> &Histogram {
        match kind {
            TxKind::Read => &self.read,
            TxKind::Write => &self.write,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_with_the_count() {
        let h = Histogram::default();
        for ms in [0, 1, 3, 3, 40, 700, 20_000] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 7);
        assert_eq!(s.buckets.len(), BUCKETS.len() + 1);
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 7)));
        let at = |le: f64| s.buckets.iter().find(|b| b.0 == le).map(|b| b.1);
        assert_eq!(at(0.0005), Some(1)); // 0 ms
        assert_eq!(at(0.001), Some(2)); // + 1 ms (bounds are inclusive)
        assert_eq!(at(0.005), Some(4));
        assert_eq!(at(0.05), Some(5));
        assert_eq!(at(1.0), Some(6));
        assert_eq!(at(10.0), Some(6)); // 20 s only in +Inf
        assert!(s.buckets.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!((s.sum - 20.747).abs() < 1e-9, "{}", s.sum);
    }
}
