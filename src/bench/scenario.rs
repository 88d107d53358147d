//! The scenarios `qr bench` runs, each in a fresh store and database, through the real actors:
//!
//! - **layered**: a graph of `steps` derivations is written to the store and queued as builds
//!   (setup, not timed); the scheduler starts with no machine and is timed until every step actor
//!   exists and the dispatcher holds every runnable step (*load*), and RSS is read before and
//!   after (*memory per live step*). Then a machine joins and the run is timed until every build
//!   has finished (*build*: steps/s, write transactions per step, dispatch decisions, and for each
//!   CA or deferred step the time from its last input landing to its resolved step being queued).
//! - **dispatch**: `steps` independent derivations (one layer) are loaded the same way, so the
//!   dispatcher holds them all as runnable; then a machine joins and the decisions made while the
//!   first `sample` steps build are the dispatch latency at that queue size.
//! - **pick-up** (`super::pickup`): builds queued by another connection pool, one at a time, each
//!   timed from its insert to its step's start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use serde::Serialize;

use super::graph::{self, GraphSpec};
use super::measure::{Percentiles, rss_bytes, trim_heap, wait_until};
use crate::actors::dispatcher::MachineInfo;
use crate::actors::dispatcher::actor::GetStatus;
use crate::actors::env::{Env, Stats, SystemClock};
use crate::actors::machine::Executor;
use crate::actors::machine::local::LocalMachine;
use crate::actors::scheduler::Scheduler;
use crate::actors::step::RetryPolicy;
use crate::db::{Db, DbOptions};
use crate::store::{LocalStore, Store, StoreDir};

/// Which database a scenario runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbTarget {
    /// A fresh SQLite file in the scenario's directory.
    Sqlite,
    /// A fresh database created through `base_url` (and dropped afterwards).
    Postgres { base_url: String },
}

impl DbTarget {
    pub fn name(&self) -> &'static str {
        match self {
            DbTarget::Sqlite => "sqlite",
            DbTarget::Postgres { .. } => "postgres",
        }
    }
}

/// Who builds the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// Zero-time builds: outputs are computed and registered, nothing runs.
    Simulated,
    /// The native executor runs the trivial builders (`/bin/sh -c "echo … > $out"`).
    Native,
}

/// What a scenario needs besides the graph.
#[derive(Debug, Clone)]
pub struct Params {
    pub executor: ExecutorKind,
    /// The machine's slots.
    pub slots: u32,
    /// Concurrent writes while setting up (store adds, build inserts).
    pub setup_parallel: usize,
    /// Parent of the scenario's scratch directory.
    pub work_dir: PathBuf,
    /// Longest a timed phase may take.
    pub timeout: Duration,
    /// `synchronous_commit = off` (PostgreSQL) and `synchronous = OFF` would remove the commit
    /// fsyncs; when set, the scenario reports it. (PostgreSQL only: set through the URL.)
    pub pg_async_commit: bool,
    /// Layered: stop after the load (no machine joins).
    pub load_only: bool,
    /// The store does not fsync contents during the measured phases either (shows what the
    /// scheduler does when the disk is not the bound).
    pub no_fsync: bool,
    /// PostgreSQL: step writes arriving together share a statement ([`DbOptions::batch_writes`]).
    pub batch_writes: bool,
    /// The queue's order (`[scheduler] order`): with `critical-path` the graph tracks every
    /// step's critical path.
    pub order: crate::actors::dispatcher::Order,
}

/// Untimed preparation.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub steps: usize,
    pub layers: usize,
    pub builds: usize,
    pub ca: usize,
    pub to_resolve: usize,
    pub generate_s: f64,
    pub store_s: f64,
    pub queue_s: f64,
}

/// Queue load: from the scheduler's start to every step actor created and queued.
#[derive(Debug, Clone, Serialize)]
pub struct Load {
    pub seconds: f64,
    pub steps_per_s: f64,
    pub live_steps: usize,
    /// Of those, the steps held as plain state (waiting for inputs, no actor).
    pub dormant_steps: usize,
    pub runnable: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// (RSS after − RSS before) / live step actors; includes the build actors, the dispatcher's
    /// queue entries and the registry. Both readings follow `malloc_trim`, so what the allocator
    /// keeps from the load's transient peak (parsed plans) is not counted.
    pub rss_per_step_bytes: f64,
    /// RSS before that trim: the transient peak's leftovers included.
    pub rss_untrimmed_bytes: u64,
    pub rss_per_step_untrimmed_bytes: f64,
    /// `AddBuilds` messages the load sent: one per (build, step of its closure below the part
    /// another build attached first).
    pub membership_messages: u64,
}

/// Building everything once a machine joined.
#[derive(Debug, Clone, Serialize)]
pub struct Build {
    pub seconds: f64,
    /// Executor runs (original steps plus resolved steps).
    pub steps_built: u64,
    pub resolutions: u64,
    pub early_cutoffs: u64,
    /// Steps finished per second: every step built, plus every CA step finished through its
    /// resolved step.
    pub steps_finished: u64,
    pub steps_per_s: f64,
    /// Write transactions committed during the phase ([`Db::write_transactions`]).
    pub write_transactions: u64,
    pub tx_per_finished_step: f64,
    /// Dispatcher decisions (Runnable/SlotFreed handled), µs.
    pub dispatch_us: Percentiles,
    /// Last input landed → resolved step queued in the dispatcher, ms.
    pub resolution_ms: Percentiles,
    /// Resolutions that attached to a resolved step already queued or built (not timed).
    pub resolution_shared: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Layered {
    pub backend: &'static str,
    pub executor: ExecutorKind,
    pub slots: u32,
    pub spec: GraphSpec,
    pub setup: Setup,
    pub load: Load,
    /// `None` with `--load-only`.
    pub build: Option<Build>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dispatch {
    pub backend: &'static str,
    pub slots: u32,
    pub setup: Setup,
    pub load: Load,
    /// Runnable steps when the machine joined.
    pub runnable_at_join: usize,
    /// Steps built while sampling (the queue shrank by this much).
    pub sampled_steps: u64,
    pub seconds: f64,
    /// Decisions while sampling, µs.
    pub decisions_us: Percentiles,
}

/// A fresh database; dropped (PostgreSQL) when done.
pub(super) struct FreshDb {
    pub(super) db: Db,
    /// Where the setup queues its builds: on PostgreSQL a second pool whose commits do not wait
    /// for the WAL flush (setup is not measured; 200,000 builds one fsync each took minutes).
    pub(super) setup: Db,
    /// PostgreSQL: the base URL it was created through, and its name.
    pub(super) pg: Option<(String, String)>,
    /// PostgreSQL: the URL of the database (what `db` connected to).
    pub(super) url: String,
}

impl FreshDb {
    pub(super) async fn open(target: &DbTarget, dir: &Path, p: &Params) -> anyhow::Result<FreshDb> {
        let async_commit = p.pg_async_commit;
        match target {
            DbTarget::Sqlite => {
                let db = Db::connect(&crate::db::default_url(dir), 8).await?;
                Ok(FreshDb {
                    setup: db.clone(),
                    db,
                    pg: None,
                    url: crate::db::default_url(dir),
                })
            }
            DbTarget::Postgres { base_url } => {
                use sqlx::Connection;
                let name = format!(
                    "qr_bench_{}_{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.subsec_nanos())
                        .unwrap_or(0)
                );
                let mut c = sqlx::PgConnection::connect(base_url)
                    .await
                    .with_context(|| {
                        format!("connecting to {}", crate::db::redact_url(base_url))
                    })?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut c)
                    .await?;
                let _ = c.close().await;
                let (prefix, query) = match base_url.split_once('?') {
                    Some((p, q)) => (p, format!("?{q}")),
                    None => (base_url.as_str(), String::new()),
                };
                let mut url = match prefix.rsplit_once('/') {
                    Some((host, _)) => format!("{host}/{name}{query}"),
                    None => anyhow::bail!("--postgres-url needs a database name"),
                };
                let mut async_url = url.clone();
                async_url.push(if query.is_empty() { '?' } else { '&' });
                async_url.push_str("options=-c%20synchronous_commit%3Doff");
                if async_commit {
                    url = async_url.clone();
                }
                let opts = DbOptions {
                    max_connections: 8,
                    batch_writes: p.batch_writes,
                    ..DbOptions::default()
                };
                let db = Db::connect_with(&url, opts).await?;
                let setup = Db::connect(&async_url, 8).await?;
                Ok(FreshDb {
                    db,
                    setup,
                    pg: Some((base_url.clone(), name)),
                    url,
                })
            }
        }
    }
}

/// What a scenario leaves for after its actors are gone: the scratch directory and the
/// PostgreSQL database (removed by [`in_system`] once the actix system has stopped, so no actor
/// still running a job writes into a removed directory or a dropped database).
struct Leftover {
    dir: tempfile::TempDir,
    pg: Option<(String, String)>,
}

static LEFTOVERS: std::sync::Mutex<Vec<Leftover>> = std::sync::Mutex::new(Vec::new());

pub(super) fn leave(dir: tempfile::TempDir, fresh: &FreshDb) {
    leave_parts(dir, fresh.pg.clone());
}

/// [`leave`] for a scenario that opened its database in an earlier system.
pub(super) fn leave_parts(dir: tempfile::TempDir, pg: Option<(String, String)>) {
    LEFTOVERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Leftover { dir, pg });
}

async fn clean_up() {
    let left: Vec<Leftover> =
        std::mem::take(&mut *LEFTOVERS.lock().unwrap_or_else(|p| p.into_inner()));
    for l in left {
        if let Some((base, name)) = &l.pg {
            use sqlx::Connection;
            if let Ok(mut c) = sqlx::PgConnection::connect(base).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut c)
                    .await;
                let _ = c.close().await;
            }
        }
        drop(l.dir);
    }
}

/// The simulated machine of the scenarios: this system, `slots` jobs.
pub(super) fn machine_info(slots: u32) -> MachineInfo {
    MachineInfo {
        id: "bench".into(),
        systems: [crate::config::this_system(), "builtin".to_string()].into(),
        supported_features: Default::default(),
        mandatory_features: Default::default(),
        max_jobs: slots,
        speed_factor: 1.0,
    }
}

fn executor(p: &Params, store: Arc<LocalStore>, dir: &Path) -> Arc<dyn Executor> {
    match p.executor {
        ExecutorKind::Simulated => Arc::new(
            crate::actors::machine::simulated::SimulatedExecutor::new(store),
        ),
        ExecutorKind::Native => {
            let cfg = crate::builder::executor::ExecutorConfig::new(dir);
            Arc::new(crate::builder::executor::NativeExecutor::new(store, cfg))
        }
    }
}

/// The scheduler started on a loaded queue, and what loading it measured.
pub(super) struct Loaded {
    pub(super) env: Arc<Env>,
    pub(super) sched: Scheduler,
    pub(super) setup: Setup,
    pub(super) load: Load,
    pub(super) decisions_before: usize,
}

/// Setup (store, queue), then the timed load with no machine.
pub(super) async fn setup_and_load(
    spec: &GraphSpec,
    p: &Params,
    store: &Arc<LocalStore>,
    db: &Db,
    setup_db: &Db,
) -> anyhow::Result<Loaded> {
    let t = Instant::now();
    let graph = graph::generate(spec, store.store_dir(), &crate::config::this_system())?;
    let generate_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    // Setup is not measured: the scratch store is filled without fsyncs, then they are back on.
    store.set_fsync(false);
    let added = graph::add_to_store(&**store, &graph, p.setup_parallel).await;
    store.set_fsync(!p.no_fsync);
    added?;
    let store_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let clock = SystemClock;
    let builds = graph::queue_builds(
        setup_db,
        "bench",
        &graph,
        crate::actors::env::Clock::now(&clock),
        p.setup_parallel,
    )
    .await?;
    let queue_s = t.elapsed().as_secs_f64();
    let setup = Setup {
        steps: graph.drvs.len(),
        layers: graph.layers.len(),
        builds: builds.len(),
        ca: graph.ca,
        to_resolve: graph.to_resolve,
        generate_s,
        store_s,
        queue_s,
    };
    let n = graph.drvs.len();
    let leaves = graph.layers[0];
    drop(graph);
    trim_heap();
    let rss_before = rss_bytes();

    let env = runner_env(db, store, p.order)?;
    let t0 = Instant::now();
    let (sched, _) = Scheduler::start(env.clone(), vec![], Duration::from_secs(30 * 86400)).await?;
    let s = &env.stats;
    wait_until("every step actor", p.timeout, || {
        Ok(Stats::get(&s.steps_created) >= n as u64)
    })
    .await?;
    wait_until("every leaf queued", p.timeout, || {
        Ok(Stats::get(&s.steps_runnable) >= leaves as u64)
    })
    .await?;
    // Every step knows every build that needs it (priorities, failure rows) only once the
    // membership messages flowing down the closures are handled.
    wait_until("build membership to settle", p.timeout, || {
        Ok(Stats::get(&s.membership_in_flight) == 0)
    })
    .await?;
    // Mailboxes are FIFO: once this answers, the dispatcher has handled every Runnable sent.
    let status = sched.dispatcher.send(GetStatus).await?;
    let seconds = t0.elapsed().as_secs_f64();
    let rss_untrimmed = rss_bytes();
    trim_heap();
    let rss_after = rss_bytes();
    let live = sched.graph.len();
    let load = Load {
        seconds,
        steps_per_s: n as f64 / seconds,
        live_steps: live,
        dormant_steps: sched.graph.dormant(),
        runnable: status.runnable,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_per_step_bytes: rss_after.saturating_sub(rss_before) as f64 / live.max(1) as f64,
        rss_untrimmed_bytes: rss_untrimmed,
        membership_messages: Stats::get(&s.membership_sent),
        rss_per_step_untrimmed_bytes: rss_untrimmed.saturating_sub(rss_before) as f64
            / live.max(1) as f64,
    };
    Ok(Loaded {
        env,
        sched,
        setup,
        load,
        decisions_before: status.decision_ns.len(),
    })
}

/// The runner's environment of the scenarios: the system clock, default retries, the queue's
/// `order`, and the I/O runtime (database batches included) that `qr serve` gives its actors.
pub(super) fn runner_env(
    db: &Db,
    store: &Arc<LocalStore>,
    order: crate::actors::dispatcher::Order,
) -> anyhow::Result<Arc<Env>> {
    let mut env = Env::new(
        db.clone(),
        store.clone(),
        Arc::new(SystemClock),
        RetryPolicy::default(),
    );
    env.scheduling.order = order;
    let io = crate::actors::env::io_runtime()?;
    env.db.run_batches_on(io.clone());
    env.io = Some(io);
    Ok(Arc::new(env))
}

pub(super) fn ns_to_us(v: &[u64]) -> Percentiles {
    Percentiles::of(v.iter().map(|&n| n as f64).collect()).scaled(1000.0)
}

/// A scenario's scratch directory (removed when dropped), its store under it, and its fresh
/// database.
pub(super) struct Scratch {
    pub(super) dir: tempfile::TempDir,
    pub(super) store: Arc<LocalStore>,
    pub(super) fresh: FreshDb,
}

/// Makes a scenario's [`Scratch`] under `p.work_dir`, with a fresh database on `target`.
pub(super) async fn open_scratch(p: &Params, target: &DbTarget) -> anyhow::Result<Scratch> {
    let dir = tempfile::tempdir_in(&p.work_dir).context("scratch directory")?;
    let root = dir.path().join("store");
    let store =
        Arc::new(LocalStore::open(StoreDir::new(root.display().to_string())?, &root).await?);
    let fresh = FreshDb::open(target, dir.path(), p).await?;
    Ok(Scratch { dir, store, fresh })
}

/// The layered scenario (see the module docs).
pub async fn layered(spec: GraphSpec, p: Params, target: DbTarget) -> anyhow::Result<Layered> {
    let Scratch { dir, store, fresh } = open_scratch(&p, &target).await?;
    let db = fresh.db.clone();
    let result = async {
        let loaded = setup_and_load(&spec, &p, &store, &db, &fresh.setup).await?;
        if p.load_only {
            return Ok(Layered {
                backend: target.name(),
                executor: p.executor,
                slots: p.slots,
                spec: spec.clone(),
                setup: loaded.setup,
                load: loaded.load,
                build: None,
            });
        }
        let env = loaded.env.clone();
        let s = &env.stats;
        env.probe.enable();
        let tx0 = db.write_transactions();
        let builds = loaded.setup.builds as u64;
        let t1 = Instant::now();
        let _machine = LocalMachine::new(
            env.clone(),
            machine_info(p.slots),
            executor(&p, store.clone(), dir.path()),
            loaded.sched.dispatcher.clone(),
        )
        .start();
        wait_until("every build to finish", p.timeout, || {
            if Stats::get(&s.steps_failed) > 0 {
                return Err(format!("{} step(s) failed", Stats::get(&s.steps_failed)));
            }
            Ok(Stats::get(&s.builds_finished) >= builds)
        })
        .await?;
        let seconds = t1.elapsed().as_secs_f64();
        let writes = db.write_transactions() - tx0;
        let status = loaded.sched.dispatcher.send(GetStatus).await?;
        let data = env.probe.take();
        let mut lat = Vec::new();
        let mut shared = 0;
        for (drv, child) in &data.resolved {
            match (data.resolving.get(drv), data.runnable.get(child)) {
                (Some(t0), Some(t1)) if t1 > t0 => lat.push((*t1 - *t0).as_secs_f64() * 1e3),
                _ => shared += 1,
            }
        }
        let (built, resolutions) = (Stats::get(&s.steps_built), Stats::get(&s.resolutions));
        let finished = built + resolutions;
        let build = Build {
            seconds,
            steps_built: built,
            resolutions,
            early_cutoffs: Stats::get(&s.early_cutoffs),
            steps_finished: finished,
            steps_per_s: finished as f64 / seconds,
            write_transactions: writes,
            tx_per_finished_step: writes as f64 / finished.max(1) as f64,
            dispatch_us: ns_to_us(
                &status.decision_ns[loaded.decisions_before.min(status.decision_ns.len())..],
            ),
            resolution_ms: Percentiles::of(lat),
            resolution_shared: shared,
        };
        Ok::<_, anyhow::Error>(Layered {
            backend: target.name(),
            executor: p.executor,
            slots: p.slots,
            spec: spec.clone(),
            setup: loaded.setup,
            load: loaded.load,
            build: Some(build),
        })
    }
    .await;
    leave(dir, &fresh);
    result
}

/// The dispatch scenario (see the module docs): `steps` independent steps, `sample` of them built.
pub async fn dispatch(
    steps: usize,
    sample: u64,
    tag: String,
    p: Params,
    target: DbTarget,
) -> anyhow::Result<Dispatch> {
    let spec = GraphSpec {
        steps,
        ca_fraction: 0.0,
        fan_in: 0,
        depth: 1,
        seed: 1,
        tag,
    };
    let Scratch { dir, store, fresh } = open_scratch(&p, &target).await?;
    let db = fresh.db.clone();
    let result = async {
        let loaded = setup_and_load(&spec, &p, &store, &db, &fresh.setup).await?;
        let env = loaded.env.clone();
        let s = &env.stats;
        let sample = sample.min(steps as u64);
        let t1 = Instant::now();
        let _machine = LocalMachine::new(
            env.clone(),
            machine_info(p.slots),
            executor(&p, store.clone(), dir.path()),
            loaded.sched.dispatcher.clone(),
        )
        .start();
        wait_until("the sampled steps to build", p.timeout, || {
            if Stats::get(&s.steps_failed) > 0 {
                return Err(format!("{} step(s) failed", Stats::get(&s.steps_failed)));
            }
            Ok(Stats::get(&s.steps_built) >= sample)
        })
        .await?;
        let seconds = t1.elapsed().as_secs_f64();
        let status = loaded.sched.dispatcher.send(GetStatus).await?;
        let decisions =
            &status.decision_ns[loaded.decisions_before.min(status.decision_ns.len())..];
        // The machine leaves; the jobs it runs finish before the scenario ends.
        loaded
            .sched
            .dispatcher
            .send(crate::actors::dispatcher::actor::MachineLeft(
                "bench".into(),
            ))
            .await?;
        let _ = wait_until("the running jobs", Duration::from_secs(60), || {
            Ok(Stats::get(&s.steps_running) == 0)
        })
        .await;
        // Their rows are written before the database is dropped.
        let _ = wait_until("the I/O in flight", Duration::from_secs(60), || {
            Ok(env.io_in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0)
        })
        .await;
        Ok::<_, anyhow::Error>(Dispatch {
            backend: target.name(),
            slots: p.slots,
            runnable_at_join: loaded.load.runnable,
            setup: loaded.setup,
            load: loaded.load,
            sampled_steps: Stats::get(&s.steps_built),
            seconds,
            decisions_us: ns_to_us(decisions),
        })
    }
    .await;
    leave(dir, &fresh);
    result
}

/// Runs `f` in an actix system of its own on a fresh thread (so every actor is gone afterwards).
pub fn in_system<T, F, Fut>(f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + 'static,
{
    std::thread::spawn(move || {
        let system = actix_rt::System::new();
        let r = system.block_on(f());
        // Not dropped: tearing the runtime down under live actors drops database connections
        // outside any runtime (sqlx panics there). The frozen system is leaked instead; the
        // next scenario measures its own RSS baseline.
        std::mem::forget(system);
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(clean_up());
        }
        r
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?
}

/// Independent step `i` of the dispatch scenarios, for `system`.
pub fn runnable_step(i: usize, system: &str) -> crate::actors::dispatcher::machine::RunnableStep {
    use crate::actors::dispatcher::machine::{Priority, RunnableStep};
    RunnableStep {
        drv: format!("/nix/store/{i:032}-bench-{i}.drv"),
        system: system.to_string(),
        features: Default::default(),
        prefer_local: false,
        priority: Priority {
            global_priority: 0,
            jobset: "bench".into(),
            local_priority: 0,
            critical_path_ms: 0,
            build_id: i as i64,
        },
    }
}

/// The dispatcher's state machine with a full machine of `slots` (the scenarios' machine) and
/// `runnable` more steps ([`runnable_step`] `0..runnable + slots`) queued.
pub fn queued_dispatcher(
    runnable: usize,
    slots: u32,
) -> crate::actors::dispatcher::machine::Dispatcher {
    use crate::actors::dispatcher::machine::{Dispatcher, Event};
    let mut d = Dispatcher::new(Duration::from_secs(30 * 86400));
    d.on(Event::MachineJoined(machine_info(slots)));
    let system = crate::config::this_system();
    for i in 0..runnable + slots as usize {
        d.on(Event::Runnable(runnable_step(i, &system)));
    }
    d
}

/// The dispatcher's state machine alone (no actors): `runnable` steps queued and a full machine of
/// `slots`; then each round frees a slot (one assignment) and queues a new step. Returns the
/// decision latencies (µs) of `rounds` rounds (two decisions each).
pub fn dispatch_pure(runnable: usize, slots: u32, rounds: usize) -> Percentiles {
    use crate::actors::dispatcher::machine::Event;
    let mut d = queued_dispatcher(runnable, slots);
    let system = crate::config::this_system();
    let step = |i: usize| runnable_step(i, &system);
    let mut ns = Vec::with_capacity(rounds * 2);
    for next in (runnable + slots as usize..).take(rounds) {
        let t = Instant::now();
        let e = d.on(Event::SlotFreed("bench".into()));
        ns.push(t.elapsed().as_nanos() as f64);
        debug_assert_eq!(e.len(), 1);
        let s = step(next);
        let t = Instant::now();
        d.on(Event::Runnable(s));
        ns.push(t.elapsed().as_nanos() as f64);
    }
    Percentiles::of(ns).scaled(1000.0)
}

/// Whether PostgreSQL answers at `url` (for the smoke test and `--backend both`).
pub async fn postgres_reachable(url: &str) -> bool {
    use sqlx::Connection;
    matches!(
        tokio::time::timeout(Duration::from_secs(3), sqlx::PgConnection::connect(url)).await,
        Ok(Ok(_))
    )
}
