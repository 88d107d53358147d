//! How long a step is expected to take, from history: the mean of the last few durations of the
//! same drv name (the drv path without its hash and `.drv`: `hello-2.12`), else of the same job,
//! else a default. Loaded at start from the latest finished steps (`Db::recent_step_durations`)
//! and updated as steps finish. Pure.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Durations kept per name and per job.
pub const KEEP: usize = 5;

/// The name a drv path's history is kept under: its file name without the hash and `.drv`
/// (`/nix/store/<hash>-hello-2.12.drv` → `hello-2.12`). A path without a hash is taken whole.
pub fn drv_name(drv_path: &str) -> &str {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    let base = base.strip_suffix(".drv").unwrap_or(base);
    match base.split_once('-') {
        Some((hash, rest)) if hash.len() == 32 && !rest.is_empty() => rest,
        _ => base,
    }
}

/// Where an estimate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Name,
    Job,
    Default,
}

/// The estimator.
#[derive(Debug, Clone)]
pub struct Durations {
    by_name: HashMap<String, VecDeque<u64>>,
    by_job: HashMap<String, VecDeque<u64>>,
    default_ms: u64,
}

impl Durations {
    pub fn new(default: Duration) -> Self {
        Durations {
            by_name: HashMap::new(),
            by_job: HashMap::new(),
            default_ms: u64::try_from(default.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// A finished step of `drv_path` (in a build of `job`, when known) took `took`.
    pub fn record(&mut self, drv_path: &str, job: Option<&str>, took: Duration) {
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        push(self.by_name.entry(drv_name(drv_path).to_string()), ms);
        if let Some(j) = job.filter(|j| !j.is_empty()) {
            push(self.by_job.entry(j.to_string()), ms);
        }
    }

    /// The expected duration of a step of `drv_path` (ms), and where it came from.
    pub fn expected_ms(&self, drv_path: &str, job: Option<&str>) -> (u64, Source) {
        if let Some(m) = self.by_name.get(drv_name(drv_path)).and_then(mean) {
            return (m, Source::Name);
        }
        if let Some(m) = job.and_then(|j| self.by_job.get(j)).and_then(mean) {
            return (m, Source::Job);
        }
        (self.default_ms, Source::Default)
    }

    /// Names with a history.
    pub fn names(&self) -> usize {
        self.by_name.len()
    }
}

fn push(e: std::collections::hash_map::Entry<'_, String, VecDeque<u64>>, ms: u64) {
    let q = e.or_default();
    if q.len() == KEEP {
        q.pop_front();
    }
    q.push_back(ms);
}

fn mean(q: &VecDeque<u64>) -> Option<u64> {
    if q.is_empty() {
        return None;
    }
    let sum: u128 = q.iter().map(|&x| u128::from(x)).sum();
    u64::try_from(sum / q.len() as u128).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    fn path(name: &str) -> String {
        format!("/nix/store/{HASH}-{name}.drv")
    }

    #[test]
    fn names_drop_the_hash_and_drv() {
        assert_eq!(drv_name(&path("hello-2.12")), "hello-2.12");
        assert_eq!(drv_name(&path("source")), "source");
        // No hash: the file name as it is.
        assert_eq!(drv_name("/tmp/x/foo-bar.drv"), "foo-bar");
        assert_eq!(drv_name("plain"), "plain");
    }

    #[test]
    fn same_name_then_job_then_default() {
        let mut d = Durations::new(Duration::from_secs(60));
        assert_eq!(
            d.expected_ms(&path("a"), Some("j")),
            (60_000, Source::Default)
        );
        d.record(&path("b"), Some("j"), Duration::from_secs(10));
        // Another name in the same job: the job's history.
        assert_eq!(d.expected_ms(&path("a"), Some("j")), (10_000, Source::Job));
        assert_eq!(d.expected_ms(&path("a"), None), (60_000, Source::Default));
        d.record(&path("a"), None, Duration::from_secs(2));
        // A drv of the same name with another hash counts as the same.
        let other = format!("/nix/store/{}-a.drv", "z".repeat(32));
        assert_eq!(d.expected_ms(&other, Some("j")), (2_000, Source::Name));
    }

    #[test]
    fn the_mean_of_the_last_few() {
        let mut d = Durations::new(Duration::from_secs(60));
        // An old outlier falls out after KEEP newer ones.
        d.record(&path("a"), None, Duration::from_secs(1000));
        for _ in 0..KEEP {
            d.record(&path("a"), None, Duration::from_secs(4));
        }
        assert_eq!(d.expected_ms(&path("a"), None).0, 4_000);
        d.record(&path("a"), None, Duration::from_secs(9));
        // (4 * 4 + 9) / 5 = 5 s
        assert_eq!(d.expected_ms(&path("a"), None).0, 5_000);
        assert_eq!(d.names(), 1);
    }
}
