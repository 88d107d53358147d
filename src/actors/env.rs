//! What every actor shares: the database, the store, the clock, the step registry, counters and the
//! event stream. Actors run on one arbiter and their database and store work on the I/O runtime
//! ([`io_runtime`]); the environment is reference-counted, never locked.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::broadcast;

use crate::actors::step::machine::RetryPolicy;
use crate::db::{Db, DbError};
use crate::store::Store;

/// Wall-clock time in unix seconds, injected so tests control it.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> i64;

    /// Unix milliseconds (for heartbeat ages and samples finer than a second).
    fn now_ms(&self) -> i64 {
        self.now().saturating_mul(1000)
    }
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// The last sign of life of a machine (`Env::heartbeats`, keyed by machine id).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heartbeat {
    /// Unix milliseconds of the last message from the builder (a heartbeat, a result).
    pub at_ms: i64,
    /// The builder's load average and free disk, from its last heartbeat message.
    pub load: f64,
    pub free_disk_bytes: u64,
    /// The in-process local builder: alive as long as the runner is, so its heartbeat is now.
    pub local: bool,
}

/// Counters every actor updates (read by progress lines, `/metrics` and benchmarks).
#[derive(Debug, Default)]
pub struct Stats {
    pub steps_created: AtomicU64,
    pub steps_runnable: AtomicU64,
    pub steps_running: AtomicU64,
    pub steps_built: AtomicU64,
    pub steps_failed: AtomicU64,
    pub resolutions: AtomicU64,
    pub early_cutoffs: AtomicU64,
    pub builds_finished: AtomicU64,
    pub actor_restarts: AtomicU64,
    /// Time from runnable to started on a machine.
    pub dispatch: Summary,
    /// Build durations, queued to finished.
    pub build_seconds: Summary,
    /// `AddBuilds` messages sent (build membership flowing down a closure), and those not yet
    /// handled: the queue is fully loaded only when none is in flight.
    pub membership_sent: AtomicU64,
    pub membership_in_flight: AtomicU64,
    /// Decrements of a gauge already at 0 (a bookkeeping bug: each is also logged as an error
    /// with the place it came from). The tests check it stays 0.
    pub gauge_underflows: AtomicU64,
    /// Database writes that failed for good (after the retries for a database that is away):
    /// each ended its step or build as a failure, or is logged where nothing is left to fail.
    pub db_write_failures: AtomicU64,
    /// Successful executor runs, with a bounded memory of the most recent drvs: a drv run again
    /// while it is remembered counts as a rerun.
    pub runs: RecentRuns,
}

impl Stats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Decrements a gauge. A gauge at 0 stays 0, and the underflow is not hidden: it is logged as
    /// an error naming the caller's source location and counted in
    /// [`gauge_underflows`](Self::gauge_underflows).
    #[track_caller]
    pub fn dec(&self, gauge: &AtomicU64) {
        let was = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        if was.is_err() {
            Stats::inc(&self.gauge_underflows);
            let at = std::panic::Location::caller();
            tracing::error!(at = %at, "gauge decremented below 0 (bookkeeping bug)");
        }
    }

    /// Counts an `AddBuilds` message about to be sent.
    pub fn membership(&self) {
        Stats::inc(&self.membership_sent);
        Stats::inc(&self.membership_in_flight);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// How many drvs [`RecentRuns`] remembers by default.
pub const RECENT_RUNS: usize = 65_536;

/// Executor runs: a total, and the last [`RECENT_RUNS`] drvs run, to count a drv run twice
/// (`reruns`) without a map that grows with every drv a long-running `qr serve` builds.
#[derive(Debug)]
pub struct RecentRuns {
    total: AtomicU64,
    reruns: AtomicU64,
    capacity: usize,
    recent: std::sync::Mutex<RecentSet>,
}

#[derive(Debug, Default)]
struct RecentSet {
    set: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Default for RecentRuns {
    fn default() -> Self {
        RecentRuns::with_capacity(RECENT_RUNS)
    }
}

impl RecentRuns {
    pub fn with_capacity(capacity: usize) -> Self {
        RecentRuns {
            total: AtomicU64::new(0),
            reruns: AtomicU64::new(0),
            capacity: capacity.max(1),
            recent: Default::default(),
        }
    }

    /// Counts a run of `drv_path`; true when it ran before (while still remembered).
    pub fn record(&self, drv_path: &str) -> bool {
        Stats::inc(&self.total);
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.set.contains(drv_path) {
            Stats::inc(&self.reruns);
            return true;
        }
        if r.order.len() >= self.capacity
            && let Some(old) = r.order.pop_front()
        {
            r.set.remove(&old);
        }
        r.set.insert(drv_path.to_string());
        r.order.push_back(drv_path.to_string());
        false
    }

    pub fn total(&self) -> u64 {
        Stats::get(&self.total)
    }

    pub fn reruns(&self) -> u64 {
        Stats::get(&self.reruns)
    }

    /// How many drvs are remembered (at most the capacity).
    pub fn remembered(&self) -> usize {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .order
            .len()
    }
}

/// A sum and a count of durations (a Prometheus summary without quantiles).
#[derive(Debug, Default)]
pub struct Summary {
    micros: AtomicU64,
    count: AtomicU64,
}

impl Summary {
    pub fn observe(&self, d: Duration) {
        self.micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// (sum in seconds, count).
    pub fn snapshot(&self) -> (f64, u64) {
        (
            self.micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.count.load(Ordering::Relaxed),
        )
    }
}

/// Timestamps for the benchmarks (`qr bench`): off unless [`Probe::enable`]d, and then only the
/// moments a latency is measured between. Off, each hook costs one atomic load.
#[derive(Debug, Default)]
pub struct Probe {
    on: std::sync::atomic::AtomicBool,
    data: std::sync::Mutex<ProbeData>,
}

#[derive(Debug, Default)]
pub struct ProbeData {
    /// drv → when its last input landed and it started resolving.
    pub resolving: std::collections::HashMap<String, std::time::Instant>,
    /// (drv, the resolved drv it attached to).
    pub resolved: Vec<(String, String)>,
    /// drv → when the dispatcher first queued it.
    pub runnable: std::collections::HashMap<String, std::time::Instant>,
    /// drv → when the dispatcher last assigned it to a machine.
    pub assigned: std::collections::HashMap<String, std::time::Instant>,
    /// drv → when its step was counted built (outputs registered, row written).
    pub built: std::collections::HashMap<String, std::time::Instant>,
}

impl Probe {
    pub fn enable(&self) {
        self.on.store(true, Ordering::Relaxed);
    }

    fn record(&self, f: impl FnOnce(&mut ProbeData)) {
        if self.on.load(Ordering::Relaxed) {
            let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut d);
        }
    }

    pub fn resolving(&self, drv: &str) {
        self.record(|d| {
            d.resolving
                .insert(drv.to_string(), std::time::Instant::now());
        });
    }

    pub fn resolved(&self, drv: &str, resolved: &str) {
        self.record(|d| d.resolved.push((drv.to_string(), resolved.to_string())));
    }

    pub fn runnable(&self, drv: &str) {
        self.record(|d| {
            d.runnable
                .entry(drv.to_string())
                .or_insert_with(std::time::Instant::now);
        });
    }

    pub fn assigned(&self, drv: &str) {
        self.record(|d| {
            d.assigned
                .insert(drv.to_string(), std::time::Instant::now());
        });
    }

    pub fn built(&self, drv: &str) {
        self.record(|d| {
            d.built.insert(drv.to_string(), std::time::Instant::now());
        });
    }

    /// Takes what was recorded.
    pub fn take(&self) -> ProbeData {
        std::mem::take(&mut *self.data.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// What happened, for watchers (progress line, admin event stream, dashboard).
#[derive(Debug, Clone, PartialEq)]
pub enum SchedEvent {
    BuildStarted {
        build: i64,
    },
    BuildFinished {
        build: i64,
        status: i32,
    },
    StepStarted {
        drv: String,
        machine: String,
    },
    StepFinished {
        drv: String,
        status: i32,
        built: bool,
    },
    StepResolved {
        drv: String,
        resolved: String,
    },
    EarlyCutoff {
        drv: String,
    },
    MachineJoined {
        machine: String,
    },
    MachineLeft {
        machine: String,
    },
}

/// How runnable steps are ordered and how long a step without history is expected to take
/// (`[scheduler] order`, `default_step_duration_s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduling {
    pub order: crate::actors::dispatcher::machine::Order,
    pub default_step_duration: Duration,
}

impl Default for Scheduling {
    fn default() -> Self {
        Scheduling {
            order: Default::default(),
            default_step_duration: Duration::from_secs(60),
        }
    }
}

/// The environment shared by the actors.
pub struct Env {
    pub db: Db,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub retry: RetryPolicy,
    pub stats: Stats,
    pub events: broadcast::Sender<SchedEvent>,
    /// Live actors for the admin API and the dashboard.
    pub actors: crate::actors::introspect::Actors,
    /// When this runner started (unix seconds).
    pub started_at: i64,
    /// Benchmark timestamps (off by default).
    pub probe: Probe,
    /// This runner's default timeouts, used where a build sets none.
    pub max_silent: Duration,
    pub timeout: Duration,
    /// The queue's order and expected step durations.
    pub scheduling: Scheduling,
    /// Where each successful executor run is appended (drv path per line), for operators and the
    /// restart tests that check no drv is built twice across processes.
    pub runs_ledger: Option<std::path::PathBuf>,
    /// Machines' last heartbeats (remote builders update theirs on every session message).
    pub heartbeats: DashMap<String, Heartbeat>,
    /// Where actors' I/O (database and store work) runs: a multi-threaded runtime of its own, so
    /// the one arbiter that runs every actor only handles messages. `None` (tests with paused
    /// time) runs the I/O on the actor's own thread.
    pub io: Option<tokio::runtime::Handle>,
    /// Offloaded I/O not finished yet (done or cancelled): a benchmark waits for none before
    /// it drops its database.
    pub io_in_flight: Arc<AtomicU64>,
    /// Rows busy on a remote builder at restart, not yet taken by their step or the sweep
    /// (`carried.rs`); empty unless restart recovery carried some.
    pub carried: crate::actors::carried::Carried,
    /// Test hook (feature `test-hooks` only): `QR_CRASH_AT=<point>` kills the process (SIGKILL)
    /// when it reaches that point.
    #[cfg(feature = "test-hooks")]
    crash_at: Option<String>,
}

impl Env {
    pub fn new(db: Db, store: Arc<dyn Store>, clock: Arc<dyn Clock>, retry: RetryPolicy) -> Self {
        let started_at = clock.now();
        Env {
            db,
            store,
            clock,
            retry,
            stats: Stats::default(),
            events: broadcast::channel(4096).0,
            actors: Default::default(),
            started_at,
            probe: Probe::default(),
            max_silent: Duration::from_secs(3600),
            timeout: Duration::from_secs(36000),
            scheduling: Scheduling::default(),
            runs_ledger: None,
            heartbeats: DashMap::new(),
            #[cfg(feature = "test-hooks")]
            crash_at: std::env::var("QR_CRASH_AT").ok().filter(|v| !v.is_empty()),
            io: None,
            io_in_flight: Default::default(),
            carried: Default::default(),
        }
    }

    /// `fut`, run on the I/O runtime when there is one ([`Env::io`]); otherwise as it is. Dropping
    /// the returned future cancels the work (as dropping `fut` would).
    pub fn offload<F>(&self, fut: F) -> impl Future<Output = F::Output> + 'static
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let in_flight = InFlight::new(self.io_in_flight.clone());
        offload_on(self.io.as_ref(), async move {
            let _counted = in_flight;
            fut.await
        })
    }

    /// Whether `QR_CRASH_AT` names this point (so a test hook may prepare the crash).
    #[cfg(feature = "test-hooks")]
    pub fn crash_armed(&self, point: &str) -> bool {
        self.crash_at.as_deref() == Some(point)
    }

    /// Kills the process with SIGKILL if `QR_CRASH_AT` names this point (crash tests only; the
    /// call sites are compiled with the `test-hooks` feature only).
    #[cfg(feature = "test-hooks")]
    pub fn crash_point(&self, point: &str) {
        if self.crash_at.as_deref() == Some(point) {
            tracing::warn!(point, "QR_CRASH_AT reached: killing the process");
            // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }

    /// Appends a successful executor run to the ledger.
    pub fn record_run(&self, drv_path: &str) {
        if self.stats.runs.record(drv_path) {
            tracing::warn!(drv = %drv_path, "a drv was run again by an executor");
        }
        if let Some(path) = &self.runs_ledger {
            use std::io::Write;
            let line = format!("{drv_path}\n");
            let res = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = res {
                tracing::warn!(path = %path.display(), error = %e, "cannot append to the runs ledger");
            }
        }
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Records that machine `id` is alive now (`load`: its load average and free disk bytes).
    pub fn heartbeat(&self, id: &str, load: Option<(f64, u64)>, local: bool) {
        let at_ms = self.now_ms();
        let update = |e: &mut Heartbeat| {
            e.at_ms = at_ms;
            e.local = local;
            if let Some((l, d)) = load {
                e.load = l;
                e.free_disk_bytes = d;
            }
        };
        if let Some(mut e) = self.heartbeats.get_mut(id) {
            update(&mut e);
            return;
        }
        let mut e = Heartbeat {
            at_ms,
            load: 0.0,
            free_disk_bytes: 0,
            local,
        };
        update(&mut e);
        self.heartbeats.insert(id.to_string(), e);
    }

    /// Machine `id`'s last heartbeat (the local builder's is now).
    pub fn last_heartbeat(&self, id: &str) -> Option<Heartbeat> {
        let mut h = *self.heartbeats.get(id)?;
        if h.local {
            h.at_ms = self.now_ms();
        }
        Some(h)
    }

    pub fn emit(&self, ev: SchedEvent) {
        let _ = self.events.send(ev);
    }
}

/// Runs a database write until it succeeds or fails for good: the database layer already retries
/// transient errors a few times; past that (the database is away) the actor keeps retrying with a
/// capped backoff and logs each failure, so no state it must journal is dropped. A permanent error
/// (a constraint, a missing row) is logged and returned.
pub async fn persist<T, F, Fut>(what: &str, mut op: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() || matches!(e, DbError::Unreachable { .. }) => {
                tracing::error!(what, error = %e, retry_in_ms = delay.as_millis() as u64, "database write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                tracing::error!(what, error = %e, "database write failed");
                return Err(e);
            }
        }
    }
}

/// The process's I/O runtime (created on first use, two worker threads, never shut down): the
/// database and store work of the actors, off the actors' arbiter.
pub fn io_runtime() -> std::io::Result<tokio::runtime::Handle> {
    // Built once (concurrent first callers wait for it): a second runtime dropped inside an
    // async context would panic.
    static RT: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("qr-io")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match rt {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(std::io::Error::other(format!(
            "cannot start the I/O runtime: {e}"
        ))),
    }
}

/// [`Env::offload`] on an explicit handle.
pub fn offload_on<F>(
    io: Option<&tokio::runtime::Handle>,
    fut: F,
) -> impl Future<Output = F::Output> + 'static
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    use futures::future::Either;
    match io {
        None => Either::Left(fut),
        Some(h) => {
            let task = AbortOnDrop(h.spawn(fut));
            Either::Right(async move {
                let mut task = task;
                match (&mut task.0).await {
                    Ok(v) => v,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // Cancelled: the I/O runtime is going away with the process.
                    Err(_) => std::future::pending().await,
                }
            })
        }
    }
}

/// One unit of [`Env::io_in_flight`], given back when dropped.
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn new(count: Arc<AtomicU64>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Aborts the spawned task when the waiting side is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_runs_are_bounded_and_count_reruns() {
        let r = RecentRuns::with_capacity(3);
        for d in ["a", "b", "c", "d"] {
            assert!(!r.record(d), "{d} ran once");
        }
        assert_eq!(r.remembered(), 3, "the oldest is forgotten");
        assert!(r.record("d"), "a rerun of a remembered drv");
        assert!(!r.record("a"), "a is no longer remembered");
        assert_eq!((r.total(), r.reruns()), (6, 1));
        assert_eq!(r.remembered(), 3);
    }

    #[test]
    fn a_gauge_underflow_stays_at_zero_and_is_counted() {
        let s = Stats::default();
        Stats::inc(&s.steps_running);
        s.dec(&s.steps_running);
        assert_eq!(Stats::get(&s.gauge_underflows), 0);
        s.dec(&s.steps_running);
        assert_eq!(Stats::get(&s.steps_running), 0);
        assert_eq!(Stats::get(&s.gauge_underflows), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn offload_runs_inline_without_an_io_runtime_and_elsewhere_with_one() {
        let here = std::thread::current().id();
        let ran_on = offload_on(None, async { std::thread::current().id() }).await;
        assert_eq!(ran_on, here);
        let io = io_runtime().expect("runtime");
        let ran_on = offload_on(Some(&io), async { std::thread::current().id() }).await;
        assert_ne!(ran_on, here);
        // The same runtime every time.
        assert_eq!(io_runtime().expect("runtime").id(), io.id());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn dropping_the_offloaded_future_cancels_the_work() {
        let io = io_runtime().expect("runtime");
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        struct OnDrop(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                if let Some(t) = self.0.take() {
                    let _ = t.send(());
                }
            }
        }
        let fut = offload_on(Some(&io), async move {
            let _guard = OnDrop(Some(dropped_tx));
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        });
        let waiting = tokio::spawn(fut);
        started_rx.await.expect("the offloaded work started");
        waiting.abort();
        // The work's own state is dropped on the I/O runtime once it is cancelled.
        tokio::time::timeout(Duration::from_secs(10), dropped_rx)
            .await
            .expect("cancelled in time")
            .expect("dropped, not leaked");
    }
}
