//! Per-machine load over time (`/api/machines/history`): every machine's busy and total job
//! slots and its last reported load average, sampled on the server at the runner's history
//! interval and kept for its window (`[http] history_interval_s`, `history_window_s`, as the
//! runner-wide history of [`crate::actors::history`], which holds totals only), so the page's
//! graph is full as soon as it opens.
//!
//! The samples come from [`Admin::machines`] (the dispatcher's slots and `Env::heartbeats`), the
//! same answer as `/api/machines`. [`MachineHistory`] is plain data, tested without a runtime;
//! [`spawn_sampler`] is the timer that feeds it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::grpc::admin::Admin;
use crate::grpc::admin::admin_v1::Machine;

/// One machine at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MachineAt {
    pub id: String,
    pub busy: u32,
    pub slots: u32,
    /// The load average of its last heartbeat (0 when unknown).
    pub load: f64,
    pub enabled: bool,
}

impl From<&Machine> for MachineAt {
    fn from(m: &Machine) -> Self {
        MachineAt {
            id: m.id.clone(),
            busy: m.running,
            slots: m.max_jobs,
            load: m.load,
            enabled: m.enabled,
        }
    }
}

/// A bounded ring buffer of samples, oldest first.
#[derive(Debug, Clone)]
pub struct MachineHistory {
    interval: Duration,
    window: Duration,
    capacity: usize,
    samples: VecDeque<(i64, Vec<MachineAt>)>,
}

/// One machine's series: `[t_ms, busy, slots, load]` per sample it was connected in.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Series {
    pub id: String,
    pub points: Vec<(i64, u32, u32, f64)>,
    /// Over the samples: the most slots busy, and busy slots / slots (0–1).
    pub peak_busy: u32,
    pub utilisation: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoadAnswer {
    /// 0: the runner keeps no history.
    pub interval_s: f64,
    pub window_s: f64,
    /// Sample times, oldest first.
    pub times: Vec<i64>,
    pub machines: Vec<Series>,
}

impl MachineHistory {
    pub fn new(interval: Duration, window: Duration) -> Self {
        let interval = interval.max(Duration::from_millis(1));
        let capacity =
            ((window.as_secs_f64() / interval.as_secs_f64()).ceil() as usize + 1).clamp(2, 100_000);
        MachineHistory {
            interval,
            window,
            capacity,
            samples: VecDeque::new(),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Appends a sample; drops the oldest beyond the capacity or the window, and samples newer
    /// than `t_ms` or as new (the clock stepped back).
    pub fn push(&mut self, t_ms: i64, machines: Vec<MachineAt>) {
        while self.samples.back().is_some_and(|(t, _)| *t >= t_ms) {
            self.samples.pop_back();
        }
        self.samples.push_back((t_ms, machines));
        while self.samples.len() > self.capacity {
            self.samples.pop_front();
        }
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        let oldest = t_ms.saturating_sub(window_ms);
        while self.samples.front().is_some_and(|(t, _)| *t < oldest) {
            self.samples.pop_front();
        }
    }

    /// The samples after `after_ms`, per machine (machines by id).
    pub fn answer(&self, after_ms: i64) -> LoadAnswer {
        let mut by_id: BTreeMap<&str, Series> = BTreeMap::new();
        let mut times = vec![];
        for (t, ms) in self.samples.iter().filter(|(t, _)| *t > after_ms) {
            times.push(*t);
            for m in ms {
                let s = by_id.entry(&m.id).or_insert_with(|| Series {
                    id: m.id.clone(),
                    points: vec![],
                    peak_busy: 0,
                    utilisation: 0.0,
                });
                s.points.push((*t, m.busy, m.slots, m.load));
                s.peak_busy = s.peak_busy.max(m.busy);
            }
        }
        for s in by_id.values_mut() {
            let slots: u64 = s.points.iter().map(|p| u64::from(p.2)).sum();
            let busy: u64 = s.points.iter().map(|p| u64::from(p.1)).sum();
            s.utilisation = if slots == 0 {
                0.0
            } else {
                busy as f64 / slots as f64
            };
        }
        LoadAnswer {
            interval_s: self.interval.as_secs_f64(),
            window_s: self.window.as_secs_f64(),
            times,
            machines: by_id.into_values().collect(),
        }
    }
}

pub type SharedMachineHistory = Arc<Mutex<MachineHistory>>;

/// Samples `admin.machines()` every `history.interval()` while the runtime runs.
pub fn spawn_sampler(admin: Admin, history: SharedMachineHistory) -> tokio::task::JoinHandle<()> {
    let interval = history
        .lock()
        .map(|h| h.interval())
        .unwrap_or(Duration::from_secs(5));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let machines = match admin.machines().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "machine history: cannot list the machines");
                    continue;
                }
            };
            let sample: Vec<MachineAt> = machines.iter().map(MachineAt::from).collect();
            let t = admin.env().now_ms();
            match history.lock() {
                Ok(mut h) => h.push(t, sample),
                Err(p) => p.into_inner().push(t, sample),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, busy: u32, slots: u32) -> MachineAt {
        MachineAt {
            id: id.into(),
            busy,
            slots,
            load: 0.5,
            enabled: true,
        }
    }

    #[test]
    fn samples_become_one_series_per_machine() {
        let mut h = MachineHistory::new(Duration::from_secs(1), Duration::from_secs(60));
        h.push(1000, vec![m("a", 0, 2)]);
        h.push(2000, vec![m("a", 2, 2), m("b", 1, 4)]);
        h.push(3000, vec![m("a", 1, 2), m("b", 3, 4)]);
        let a = h.answer(0);
        assert_eq!(a.times, [1000, 2000, 3000]);
        let ids: Vec<&str> = a.machines.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(a.machines[0].points.len(), 3);
        assert_eq!(a.machines[0].peak_busy, 2);
        assert!((a.machines[0].utilisation - 0.5).abs() < 1e-9);
        // b joined at the second sample.
        assert_eq!(a.machines[1].points[0], (2000, 1, 4, 0.5));
        assert!((a.machines[1].utilisation - 0.5).abs() < 1e-9);
        // Only what came after a time.
        assert_eq!(h.answer(2000).times, [3000]);
    }

    #[test]
    fn the_window_and_the_capacity_bound_it() {
        let mut h = MachineHistory::new(Duration::from_secs(1), Duration::from_secs(10));
        for t in 0..100 {
            h.push(t * 1000, vec![m("a", 1, 1)]);
        }
        let a = h.answer(0);
        assert_eq!(a.times.len(), 11);
        assert_eq!(a.times.first(), Some(&89_000));
        // The clock stepped back: later samples go.
        h.push(95_000, vec![]);
        assert_eq!(h.answer(0).times.last(), Some(&95_000));
        assert!(h.answer(0).times.windows(2).all(|w| w[0] < w[1]));
    }
}
