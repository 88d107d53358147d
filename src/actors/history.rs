//! The runner's recent history for the dashboard's graph and `GetHistory`: every few seconds
//! `qr serve` samples the queue length, the runnable and running steps, and how many steps were
//! built or failed and builds finished since the previous sample, into a bounded ring buffer (the
//! last `[http] history_window_s`, 15 minutes by default).
//!
//! [`History`] (the ring buffer) and [`Sampler`] (counter totals → per-interval deltas) are plain
//! data, tested with no runtime; [`spawn_sampler`] is the timer that feeds them from [`Env`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::actors::env::{Env, Stats};

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Sample {
    /// Unix milliseconds (the runner's clock).
    pub t_ms: i64,
    /// Unfinished builds in the database (the previous sample's value if it could not be read).
    pub builds_queued: u64,
    /// Steps waiting for a machine, and steps building, at that moment.
    pub runnable: u64,
    pub running: u64,
    /// Since the previous sample: steps built, steps failed, builds finished.
    pub built: u64,
    pub failed: u64,
    pub finished: u64,
}

/// A bounded ring buffer of samples, oldest first: at most `capacity` samples, none older than
/// `window` before the newest.
#[derive(Debug, Clone)]
pub struct History {
    interval: Duration,
    window: Duration,
    capacity: usize,
    samples: VecDeque<Sample>,
}

impl History {
    /// Room for `window / interval` samples (plus one), at least 2.
    pub fn new(interval: Duration, window: Duration) -> Self {
        let interval = interval.max(Duration::from_millis(1));
        let capacity = (window.as_secs_f64() / interval.as_secs_f64()).ceil() as usize + 1;
        let capacity = capacity.clamp(2, 100_000);
        History {
            interval,
            window,
            capacity,
            samples: VecDeque::with_capacity(capacity),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Appends a sample, dropping the oldest beyond the capacity or the window. A sample older
    /// than the newest (the clock stepped back) replaces the samples newer than it.
    pub fn push(&mut self, s: Sample) {
        // Keep the buffer sorted: if the clock went back, what came "later" is dropped.
        while self.samples.back().is_some_and(|last| last.t_ms > s.t_ms) {
            self.samples.pop_back();
        }
        self.samples.push_back(s);
        while self.samples.len() > self.capacity {
            self.samples.pop_front();
        }
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        let oldest_kept = s.t_ms.saturating_sub(window_ms);
        while self.samples.front().is_some_and(|f| f.t_ms < oldest_kept) {
            self.samples.pop_front();
        }
    }

    /// The samples taken after `after_ms` (0: all), oldest first.
    pub fn since(&self, after_ms: i64) -> Vec<Sample> {
        let start = self.samples.partition_point(|s| s.t_ms <= after_ms);
        self.samples.range(start..).copied().collect()
    }
}

/// Cumulative counters as read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub built: u64,
    pub failed: u64,
    pub finished: u64,
}

/// Gauges as read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gauges {
    /// `None`: the queue length could not be read (the previous one is repeated).
    pub builds_queued: Option<u64>,
    pub runnable: u64,
    pub running: u64,
}

/// Turns totals into per-interval deltas.
#[derive(Debug, Clone, Default)]
pub struct Sampler {
    prev: Option<Totals>,
    queued: u64,
}

impl Sampler {
    /// The sample at `t_ms`. The first sample's deltas are 0 (there is no interval before it);
    /// a counter that went down (it cannot, but) counts as 0.
    pub fn sample(&mut self, t_ms: i64, totals: Totals, gauges: Gauges) -> Sample {
        let prev = self.prev.replace(totals).unwrap_or(totals);
        if let Some(q) = gauges.builds_queued {
            self.queued = q;
        }
        Sample {
            t_ms,
            builds_queued: self.queued,
            runnable: gauges.runnable,
            running: gauges.running,
            built: totals.built.saturating_sub(prev.built),
            failed: totals.failed.saturating_sub(prev.failed),
            finished: totals.finished.saturating_sub(prev.finished),
        }
    }
}

/// A history shared by the sampler and its readers.
pub type SharedHistory = Arc<Mutex<History>>;

/// Samples `env` every `history.interval()` for as long as the runtime runs (a tokio task; the
/// clock is `env`'s, the timer tokio's). The queue length is one `count(*)` through the partial
/// index of unfinished builds; everything else is counters.
pub fn spawn_sampler(env: Arc<Env>, history: SharedHistory) -> tokio::task::JoinHandle<()> {
    let interval = history
        .lock()
        .map(|h| h.interval())
        .unwrap_or(Duration::from_secs(5));
    tokio::spawn(async move {
        let mut sampler = Sampler::default();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // A database that does not answer quickly does not hold the graph back.
            let queued = match tokio::time::timeout(
                interval.max(Duration::from_secs(1)),
                env.db.count_unfinished_builds(),
            )
            .await
            {
                Ok(Ok(n)) => Some(n),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "history: cannot count the queue");
                    None
                }
                Err(_) => None,
            };
            let s = &env.stats;
            let sample = sampler.sample(
                env.now_ms(),
                Totals {
                    built: Stats::get(&s.steps_built),
                    failed: Stats::get(&s.steps_failed),
                    finished: Stats::get(&s.builds_finished),
                },
                Gauges {
                    builds_queued: queued,
                    runnable: Stats::get(&s.steps_runnable),
                    running: Stats::get(&s.steps_running),
                },
            );
            match history.lock() {
                Ok(mut h) => h.push(sample),
                Err(p) => p.into_inner().push(sample),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t_ms: i64) -> Sample {
        Sample {
            t_ms,
            ..Sample::default()
        }
    }

    #[test]
    fn the_ring_buffer_keeps_the_window() {
        let mut h = History::new(Duration::from_secs(5), Duration::from_secs(900));
        assert_eq!(h.capacity(), 181);
        for i in 0..1000 {
            h.push(at(i * 5000));
        }
        assert_eq!(h.len(), 181);
        let all = h.since(0);
        assert_eq!(all.first().map(|s| s.t_ms), Some(819 * 5000));
        assert_eq!(all.last().map(|s| s.t_ms), Some(999 * 5000));
        assert!(all.windows(2).all(|w| w[0].t_ms < w[1].t_ms));
        // Only what came after a time.
        assert_eq!(h.since(998 * 5000), vec![at(999 * 5000)]);
        assert!(h.since(999 * 5000).is_empty());
    }

    #[test]
    fn samples_older_than_the_window_go_even_below_capacity() {
        let mut h = History::new(Duration::from_secs(1), Duration::from_secs(10));
        h.push(at(0));
        h.push(at(1000));
        // The runner was paused for a minute: the old samples are out of the window.
        h.push(at(61_000));
        assert_eq!(h.since(0), vec![at(61_000)]);
        h.push(at(71_000));
        assert_eq!(h.len(), 2);
        h.push(at(71_001));
        assert_eq!(h.since(0).first().map(|s| s.t_ms), Some(71_000));
    }

    #[test]
    fn a_clock_stepping_back_keeps_the_buffer_sorted() {
        let mut h = History::new(Duration::from_secs(1), Duration::from_secs(60));
        for t in [1000, 2000, 3000] {
            h.push(at(t));
        }
        h.push(at(2500));
        let ts: Vec<i64> = h.since(0).iter().map(|s| s.t_ms).collect();
        assert_eq!(ts, [1000, 2000, 2500]);
    }

    #[test]
    fn tiny_windows_still_hold_two_samples() {
        let h = History::new(Duration::from_secs(10), Duration::from_secs(1));
        assert_eq!(h.capacity(), 2);
        let h = History::new(Duration::ZERO, Duration::from_secs(1));
        assert!(h.capacity() >= 2);
    }

    #[test]
    fn the_sampler_turns_totals_into_deltas() {
        let mut s = Sampler::default();
        let g = |q: Option<u64>, runnable, running| Gauges {
            builds_queued: q,
            runnable,
            running,
        };
        let t = |built, failed, finished| Totals {
            built,
            failed,
            finished,
        };
        let a = s.sample(1000, t(10, 1, 2), g(Some(5), 3, 2));
        assert_eq!(
            (a.built, a.failed, a.finished, a.builds_queued),
            (0, 0, 0, 5)
        );
        let b = s.sample(6000, t(14, 1, 3), g(Some(4), 1, 2));
        assert_eq!(
            (b.t_ms, b.built, b.failed, b.finished, b.builds_queued),
            (6000, 4, 0, 1, 4)
        );
        assert_eq!((b.runnable, b.running), (1, 2));
        // The queue could not be read: the last value is repeated.
        let c = s.sample(11_000, t(14, 2, 3), g(None, 0, 0));
        assert_eq!((c.built, c.failed, c.builds_queued), (0, 1, 4));
        // A counter going down counts as nothing.
        let d = s.sample(16_000, t(1, 2, 3), g(Some(0), 0, 0));
        assert_eq!(d.built, 0);
        let e = s.sample(21_000, t(3, 2, 3), g(Some(0), 0, 0));
        assert_eq!(e.built, 2);
    }
}
