//! Measuring: resident memory, percentiles, waiting for a counter, the machine we ran on.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Resident set size of this process in bytes (`/proc/self/statm`), 0 where unavailable.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// Gives freed heap memory back to the kernel, so an RSS baseline is not inflated by what the
/// setup allocated and freed (which later allocations would reuse without raising RSS).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Percentiles of a sample (nearest rank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(mut v: Vec<f64>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Percentiles {
            count: v.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }

    /// The same figures, each divided by `by` (e.g. ns → µs).
    pub fn scaled(self, by: f64) -> Percentiles {
        Percentiles {
            p50: self.p50 / by,
            p90: self.p90 / by,
            p99: self.p99 / by,
            max: self.max / by,
            mean: self.mean / by,
            ..self
        }
    }
}

/// Polls `done` every millisecond until it holds (returning when it did) or `limit` passes.
pub async fn wait_until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> Result<bool, String>,
) -> anyhow::Result<Instant> {
    let start = Instant::now();
    loop {
        match done() {
            Ok(true) => return Ok(Instant::now()),
            Ok(false) => {}
            Err(e) => anyhow::bail!("while waiting for {what}: {e}"),
        }
        if start.elapsed() > limit {
            anyhow::bail!("gave up waiting for {what} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// CPU time (user + system, seconds) process `pid` has used, from `/proc/<pid>/stat`; `None` when
/// it is gone or unreadable.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat).map(|ticks| ticks as f64 / clock_ticks())
}

/// utime + stime (clock ticks) of a `/proc/<pid>/stat` line; the command name may hold spaces
/// and parentheses, so fields are counted after its last `)`.
fn parse_stat_cpu(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds of every process named `name` (`/proc/<pid>/comm`), e.g. the PostgreSQL server
/// and its backends, with their number.
pub fn processes_cpu_s(name: &str) -> (f64, usize) {
    let mut total = 0.0;
    let mut n = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            if let Some(s) = process_cpu_s(pid) {
                total += s;
                n += 1;
            }
        }
    }
    (total, n)
}

/// The machine's CPU seconds from `/proc/stat`: (busy, all), summed over the cores (iowait
/// counts as idle).
pub fn machine_cpu_s() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already)
    let all: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let t = clock_ticks();
    ((all - idle.min(all)) as f64 / t, all as f64 / t)
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    pub nproc: usize,
    pub cpu: String,
    pub mem_total: String,
    pub kernel: String,
}

impl MachineInfo {
    pub fn here() -> MachineInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        MachineInfo {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu,
            mem_total,
            kernel,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(vec![]).count, 0);
        assert_eq!(Percentiles::of(vec![3.0]).p99, 3.0);
    }

    #[test]
    fn cpu_of_a_stat_line_with_an_odd_name() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 9 0 0";
        assert_eq!(parse_stat_cpu(line), Some(325));
        assert_eq!(parse_stat_cpu("42 (x) S 1"), None);
        assert!(process_cpu_s(std::process::id()).is_some());
        let (busy, all) = machine_cpu_s();
        assert!(all > 0.0 && busy <= all);
    }

    #[test]
    fn rss_is_read() {
        assert!(rss_bytes() > 0);
    }
}
