//! The restart-at-scale scenario (`qr bench --restart-scale`): a PostgreSQL database filled with a
//! history (finished builds and their steps, a share of them Resolved, outputs, realisations,
//! cached failures) and a queue (builds over a layered graph whose drvs are in the store, some
//! with a step row left busy by the "crash", some with a recorded resolution and its pending
//! target); then a runner starts on it in a fresh actix system, with a machine, and is timed to
//! its first dispatch (a job handed to the machine's executor) and to full recovery (every
//! unfinished build has its actor, every step its actor, every runnable step is queued).
//!
//! The fill is server-side SQL (`generate_series`, `unnest` arrays), not row by row, and is
//! reported apart. The recovery queries are `EXPLAIN ANALYZE`d on the filled database
//! ([`Db::explain_recovery`]) before the runner starts.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use serde::Serialize;

use super::graph::{self, GraphSpec};
use super::measure::{rss_bytes, wait_until};
use super::scenario::{self, DbTarget, FreshDb, Params};
use crate::actors::dispatcher::actor::GetStatus;
use crate::actors::env::Stats;
use crate::actors::machine::Executor;
use crate::actors::machine::executor::{Built, ExecFailure, Job};
use crate::actors::queue_monitor::ActiveBuilds;
use crate::actors::scheduler::Scheduler;
use crate::db::AnalyzedPlan;
use crate::db::types::{BuildStatus, BusyPhase};
use crate::db::{Db, DbOptions};
use crate::store::{LocalStore, Store, StoreDir};

/// The sizes of the scenario.
#[derive(Debug, Clone, Serialize)]
pub struct RestartSpec {
    pub history_builds: u64,
    /// Steps of the history (rounded down to a whole number per build, at least one each).
    pub history_steps: u64,
    pub queued_builds: usize,
    /// Derivations of the queued graph (each a step to build).
    pub queued_steps: usize,
    /// Queued builds with a step row left busy (mid-build at the crash).
    pub busy_rows: usize,
    /// Queued builds whose top step was Resolved before the crash, its target pending.
    pub resolved_rows: usize,
    /// Layers of the queued graph.
    pub depth: usize,
    pub fan_in: usize,
    pub ca_fraction: f64,
    pub seed: u64,
    pub tag: String,
}

/// Filling the database and the store (not part of the recovery's time).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fill {
    pub history_builds: u64,
    pub history_steps: u64,
    pub history_resolved: u64,
    pub history_s: f64,
    pub graph_s: f64,
    /// The queued graph's drvs (and the resolved drvs) written to the store, without fsyncs.
    pub store_s: f64,
    pub drvs_written: usize,
    pub queue_s: f64,
    pub queued_builds: usize,
    pub busy_rows: usize,
    pub resolved_rows: usize,
    /// `ANALYZE` of the filled tables (what autovacuum would have done on a live server).
    pub analyze_s: f64,
    pub total_s: f64,
    pub database_bytes: i64,
    pub buildsteps_rows: i64,
}

/// What the runner's start took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recovery {
    /// Start → `Scheduler::start` returned (busy rows aborted, Resolved rows read).
    pub recover_s: f64,
    /// Start → the first job handed to the machine's executor.
    pub first_dispatch_s: f64,
    /// Start → every build actor, every step actor, every runnable step queued.
    pub full_recovery_s: f64,
    pub build_actors: usize,
    pub steps_created: u64,
    pub expected_steps: u64,
    /// Runnable steps queued plus those on the machine, and what the graph's shape says.
    pub runnable_or_running: u64,
    pub expected_runnable: u64,
    pub aborted_busy: usize,
    pub resolutions_reattached: usize,
    pub orphaned: usize,
    pub jobs_started: u64,
    /// This process's RSS after full recovery (includes what the fill left allocated).
    pub rss_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestartScale {
    pub backend: &'static str,
    pub slots: u32,
    pub spec: RestartSpec,
    pub fill: Fill,
    pub recovery: Recovery,
    /// `EXPLAIN ANALYZE` of every recovery query on the filled database (rolled back).
    pub plans: Vec<AnalyzedPlan>,
}

/// The goals of the issue.
pub const GOAL_FIRST_DISPATCH_S: f64 = 10.0;
pub const GOAL_FULL_RECOVERY_S: f64 = 30.0;

/// A machine's executor that takes every job and never finishes it: the first call is the first
/// dispatch, and the steps it holds stay running, so the queue stays as recovery left it.
#[derive(Default)]
struct Held {
    first: std::sync::OnceLock<Instant>,
    started: AtomicU64,
}

#[async_trait]
impl Executor for Held {
    async fn execute(&self, _job: Job) -> Result<Built, ExecFailure> {
        self.first.get_or_init(Instant::now);
        self.started.fetch_add(1, Ordering::Relaxed);
        std::future::pending().await
    }
}

/// What the fill hands to the restart.
struct Filled {
    url: String,
    pg: Option<(String, String)>,
    root: PathBuf,
    fill: Fill,
    plans: Vec<AnalyzedPlan>,
    expected_steps: u64,
    expected_runnable: u64,
}

/// The scenario: fill (one actix system), then the restart (a fresh one), then the clean-up.
pub fn restart_scale(
    spec: RestartSpec,
    p: Params,
    base_url: String,
) -> anyhow::Result<RestartScale> {
    let dir = tempfile::tempdir_in(&p.work_dir).context("scratch directory")?;
    let root = dir.path().join("store");
    let (s2, p2, r2) = (spec.clone(), p.clone(), root.clone());
    let filled = scenario::in_system(move || async move {
        let store =
            Arc::new(LocalStore::open(StoreDir::new(r2.display().to_string())?, &r2).await?);
        let target = DbTarget::Postgres { base_url };
        let fresh = FreshDb::open(&target, r2.parent().unwrap_or(&r2), &p2).await?;
        let r = fill(&s2, &store, &fresh).await;
        let out = match r {
            Ok((fill, plans, es, er)) => Ok(Filled {
                url: fresh.url.clone(),
                pg: fresh.pg.clone(),
                root: r2.clone(),
                fill,
                plans,
                expected_steps: es,
                expected_runnable: er,
            }),
            Err(e) => Err(e),
        };
        fresh.db.close().await;
        fresh.setup.close().await;
        if out.is_err() {
            // Nothing runs in this system any more: the database goes with it.
            drop_database(fresh.pg.as_ref()).await;
        }
        out
    });
    let filled = filled?;
    let (spec2, slots, timeout) = (spec.clone(), p.slots, p.timeout);
    scenario::in_system(move || async move {
        let pg = filled.pg.clone();
        let r = restart(&spec2, slots, timeout, &filled).await;
        scenario::leave_parts(dir, pg);
        let recovery = r?;
        Ok(RestartScale {
            backend: "postgres",
            slots,
            spec: spec2,
            fill: filled.fill,
            recovery,
            plans: filled.plans,
        })
    })
}

async fn drop_database(pg: Option<&(String, String)>) {
    use sqlx::Connection;
    let Some((base, name)) = pg else { return };
    match sqlx::PgConnection::connect(base).await {
        Ok(mut c) => {
            if let Err(e) = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut c)
                .await
            {
                eprintln!("qr bench: cannot drop {name}: {e}");
            }
            if let Err(e) = c.close().await {
                tracing::debug!(error = %e, "closing the clean-up connection");
            }
        }
        Err(e) => eprintln!("qr bench: cannot drop {name}: {e}"),
    }
}

/// The history: `history_builds` finished builds of `k` steps each (every other build's step 1
/// Resolved to its step 2, one in 50 failed), their outputs, the realisations of the resolved
/// steps, 10,000 cached failures. All server-side.
async fn fill_history(
    pool: &sqlx::PgPool,
    spec: &RestartSpec,
    now: i64,
    system: &str,
) -> anyhow::Result<(u64, u64, u64)> {
    let h = i64::try_from(spec.history_builds).context("--history-builds")?;
    if h == 0 {
        return Ok((0, 0, 0));
    }
    let k = i32::try_from((spec.history_steps / spec.history_builds).max(1))
        .context("steps per build")?;
    let mut c = pool.acquire().await?;
    for q in [
        "set synchronous_commit = off",
        "set maintenance_work_mem = '256MB'",
        // No triggers for the history (its `builds_added` notifications were consumed long
        // ago; 1,000,000 of them in one transaction took two minutes), nor foreign-key checks
        // (the generated rows are consistent). Reset below.
        "set session_replication_role = replica",
        "insert into jobsets (name, schedulingshares) select 'history-' || j, 100 \
         from generate_series(0, 9) j on conflict (name) do nothing",
    ] {
        sqlx::query(q).execute(&mut *c).await?;
    }
    // Builds ended two seconds apart, the newest just before `now`.
    sqlx::query(
        "insert into builds (id, jobset, job, drvpath, system, priority, globalpriority, \
         maxsilent, timeout, timestamp, finished, buildstatus, starttime, stoptime, \
         iscachedbuild, laststepnr) \
         select g, 'history-' || (g % 10), 'job-' || (g % 5000), \
         '/nix/store/' || md5('b' || g) || '-hist-' || g || '.drv', $2, 0, 0, 3600, 36000, \
         $3 - ($1 - g) * 2 - 200, 1, case when g % 50 = 0 then 1 else 0 end, \
         $3 - ($1 - g) * 2 - 100, $3 - ($1 - g) * 2, 0, $4 \
         from generate_series(1, $1) g",
    )
    .bind(h)
    .bind(system)
    .bind(now)
    .bind(k)
    .execute(&mut *c)
    .await?;
    sqlx::query("select setval('builds_id_seq', $1)")
        .bind(h)
        .execute(&mut *c)
        .await?;
    let resolved = BuildStatus::Resolved.code();
    let steps = sqlx::query(
        "insert into buildsteps (build, stepnr, type, drvpath, busy, status, errormsg, \
         starttime, stoptime, machine, system, propagatedfrom, overhead, timesbuilt, \
         isnondeterministic, resolvedtostep) \
         select b, n, 0, '/nix/store/' || md5('s' || b || '-' || n) || '-hist-step.drv', 0, \
         case when b % 2 = 0 and n = 1 and $2 >= 2 then $5 \
              when b % 50 = 0 and n = $2 then 1 else 0 end, \
         null::text, t + n, t + n + 30, 'hist-' || (b % 8), $3, null::bigint, null::integer, 1, false, \
         case when b % 2 = 0 and n = 1 and $2 >= 2 then 2 end \
         from (select g as b, $4 - ($1 - g) * 2 - 100 as t from generate_series(1, $1) g) x \
         cross join generate_series(1, $2) n",
    )
    .bind(h)
    .bind(k)
    .bind(system)
    .bind(now)
    .bind(resolved)
    .execute(&mut *c)
    .await?
    .rows_affected();
    sqlx::query(
        "insert into buildoutputs (build, name, path) \
         select g, 'out', '/nix/store/' || md5('o' || g) || '-hist' from generate_series(1, $1) g",
    )
    .bind(h)
    .execute(&mut *c)
    .await?;
    let mut resolved_rows = 0;
    if k >= 2 {
        resolved_rows = sqlx::query(
            "insert into realisations (drvpath, outputname, outpath, build, stepnr) \
             select '/nix/store/' || md5('s' || b || '-2') || '-hist-step.drv', 'out', \
             '/nix/store/' || md5('r' || b) || '-hist', b, 2 from generate_series(2, $1, 2) b",
        )
        .bind(h)
        .execute(&mut *c)
        .await?
        .rows_affected();
    }
    sqlx::query(
        "insert into failedpaths (path) select '/nix/store/' || md5('f' || g) || '-failed' \
         from generate_series(1, 10000) g on conflict (path) do nothing",
    )
    .execute(&mut *c)
    .await?;
    sqlx::query("set session_replication_role = origin")
        .execute(&mut *c)
        .await?;
    Ok((h as u64, steps, resolved_rows))
}

/// The queue: which drvs are queued as builds, which carry a busy row or a recorded resolution,
/// and what the runner must hold once it recovered.
struct QueuePlan {
    builds: Vec<String>,
    busy: Vec<(usize, String)>,
    resolved: Vec<(usize, String)>,
    expected_steps: u64,
    expected_runnable: u64,
}

fn plan_queue(g: &graph::Graph, spec: &RestartSpec) -> anyhow::Result<QueuePlan> {
    let by_path: HashMap<&str, &crate::store::Derivation> =
        g.drvs.iter().map(|(p, d)| (p.as_str(), d)).collect();
    let mut builds: Vec<String> = g.tops.iter().take(spec.queued_builds).cloned().collect();
    let tops: HashSet<&str> = g.tops.iter().map(String::as_str).collect();
    // More builds than tops: builds of drvs lower down too (jobs sharing dependencies), from the
    // upper layers down.
    for (p, _) in g.drvs.iter().rev() {
        if builds.len() >= spec.queued_builds {
            break;
        }
        if !tops.contains(p.as_str()) {
            builds.push(p.clone());
        }
    }
    let busy_n = spec.busy_rows.min(builds.len());
    // Mid-build: a leaf of the build's closure (its first input, down to the first layer).
    let mut busy = Vec::with_capacity(busy_n);
    for (i, b) in builds.iter().enumerate().take(busy_n) {
        let mut d = b.as_str();
        while let Some(first) = by_path.get(d).and_then(|drv| drv.input_drvs.keys().next()) {
            d = first.as_str();
        }
        busy.push((i, d.to_string()));
    }
    // Resolved: tops (needed by their build only) that resolve before they build.
    let mut resolved = Vec::new();
    for (i, b) in builds.iter().enumerate().skip(busy_n) {
        if resolved.len() >= spec.resolved_rows {
            break;
        }
        let Some(drv) = by_path.get(b.as_str()) else {
            continue;
        };
        if tops.contains(b.as_str()) && drv.needs_resolution() && !drv.input_drvs.is_empty() {
            resolved.push((i, b.clone()));
        }
    }
    // The closure the runner will hold: a recorded resolution's inputs are not walked.
    let recorded: HashSet<&str> = resolved.iter().map(|(_, d)| d.as_str()).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut stack: Vec<&str> = builds.iter().map(String::as_str).collect();
    let mut runnable = 0u64;
    while let Some(d) = stack.pop() {
        if !seen.insert(d) {
            continue;
        }
        let drv = by_path
            .get(d)
            .with_context(|| format!("{d} is not in the graph"))?;
        if recorded.contains(d) {
            continue;
        }
        if drv.input_drvs.is_empty() {
            runnable += 1;
        }
        stack.extend(drv.input_drvs.keys().map(String::as_str));
    }
    let n_res = resolved.len() as u64;
    let expected_steps = seen.len() as u64 + n_res;
    drop(seen);
    drop(recorded);
    Ok(QueuePlan {
        expected_steps,
        expected_runnable: runnable + n_res,
        builds,
        busy,
        resolved,
    })
}

/// The queued builds, their outputs, the busy rows and the Resolved pairs, with `unnest` arrays
/// (20,000 rows a statement).
async fn fill_queue(
    pool: &sqlx::PgPool,
    g: &graph::Graph,
    plan: &QueuePlan,
    resolved_drvs: &[String],
    now: i64,
) -> anyhow::Result<()> {
    let by_path: HashMap<&str, &crate::store::Derivation> =
        g.drvs.iter().map(|(p, d)| (p.as_str(), d)).collect();
    let mut c = pool.acquire().await?;
    sqlx::query("set synchronous_commit = off")
        .execute(&mut *c)
        .await?;
    sqlx::query("insert into jobsets (name, schedulingshares) values ('bench', 100) on conflict (name) do nothing")
        .execute(&mut *c)
        .await?;
    let mut ids: HashMap<String, i64> = HashMap::with_capacity(plan.builds.len());
    for chunk in plan.builds.chunks(20_000) {
        let mut jobs = Vec::with_capacity(chunk.len());
        let mut systems = Vec::with_capacity(chunk.len());
        for d in chunk {
            let drv = by_path
                .get(d.as_str())
                .context("queued drv not in the graph")?;
            jobs.push(drv.name.clone());
            systems.push(drv.system.clone());
        }
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "insert into builds (jobset, job, drvpath, system, timestamp) \
             select 'bench', j, d, s, $4 from unnest($1::text[], $2::text[], $3::text[]) \
             as u(j, d, s) returning id, drvpath",
        )
        .bind(&jobs)
        .bind(chunk)
        .bind(&systems)
        .bind(now)
        .fetch_all(&mut *c)
        .await?;
        let (mut ob, mut on, mut op) = (Vec::new(), Vec::new(), Vec::new());
        for (id, d) in rows {
            let drv = by_path
                .get(d.as_str())
                .context("inserted drv not in the graph")?;
            for (name, out) in &drv.outputs {
                ob.push(id);
                on.push(name.clone());
                op.push(out.path().map(str::to_string));
            }
            ids.insert(d, id);
        }
        sqlx::query(
            "insert into buildoutputs (build, name, path) \
             select * from unnest($1::int8[], $2::text[], $3::text[])",
        )
        .bind(&ob)
        .bind(&on)
        .bind(&op)
        .execute(&mut *c)
        .await?;
    }
    let id_of = |i: usize| -> anyhow::Result<i64> {
        ids.get(&plan.builds[i])
            .copied()
            .context("a queued build has no id")
    };
    // Step rows: (build, number, drv, busy, status, start, stop, machine, resolved to).
    let (mut b, mut n, mut d, mut busy, mut st) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut start, mut stop, mut machine, mut to) = (vec![], vec![], vec![], vec![]);
    let (mut last_b, mut last_n) = (vec![], vec![]);
    for (i, drv) in &plan.busy {
        let id = id_of(*i)?;
        b.push(id);
        n.push(1i32);
        d.push(drv.clone());
        busy.push(BusyPhase::Building.code());
        st.push(None::<i32>);
        start.push(Some(now - 60));
        stop.push(None::<i64>);
        machine.push("builder-before-the-crash".to_string());
        to.push(None::<i32>);
        last_b.push(id);
        last_n.push(1i32);
    }
    for ((i, drv), res) in plan.resolved.iter().zip(resolved_drvs) {
        let id = id_of(*i)?;
        // The original, Resolved to step 2 ...
        b.push(id);
        n.push(1);
        d.push(drv.clone());
        busy.push(BusyPhase::NotBusy.code());
        st.push(Some(BuildStatus::Resolved.code()));
        start.push(Some(now - 120));
        stop.push(Some(now - 120));
        machine.push(String::new());
        to.push(Some(2));
        // ... and the resolved drv's step, pending.
        b.push(id);
        n.push(2);
        d.push(res.clone());
        busy.push(BusyPhase::NotBusy.code());
        st.push(None);
        start.push(None);
        stop.push(None);
        machine.push(String::new());
        to.push(None);
        last_b.push(id);
        last_n.push(2);
    }
    if !b.is_empty() {
        sqlx::query(
            "insert into buildsteps (build, stepnr, type, drvpath, busy, status, starttime, \
             stoptime, machine, system, resolvedtostep) \
             select b, n, 0, d, busy, st, t0, t1, m, $10, r from unnest($1::int8[], \
             $2::int4[], $3::text[], $4::int4[], $5::int4[], $6::int8[], $7::int8[], \
             $8::text[], $9::int4[]) as u(b, n, d, busy, st, t0, t1, m, r)",
        )
        .bind(&b)
        .bind(&n)
        .bind(&d)
        .bind(&busy)
        .bind(&st)
        .bind(&start)
        .bind(&stop)
        .bind(&machine)
        .bind(&to)
        .bind(crate::config::this_system())
        .execute(&mut *c)
        .await?;
        sqlx::query(
            "update builds set laststepnr = u.n from unnest($1::int8[], $2::int4[]) as u(id, n) \
             where builds.id = u.id",
        )
        .bind(&last_b)
        .bind(&last_n)
        .execute(&mut *c)
        .await?;
    }
    Ok(())
}

/// Fills history, store and queue; then `ANALYZE` and the plans. Returns the fill's figures, the
/// plans, and the steps and runnable steps the runner will hold.
async fn fill(
    spec: &RestartSpec,
    store: &Arc<LocalStore>,
    fresh: &FreshDb,
) -> anyhow::Result<(Fill, Vec<AnalyzedPlan>, u64, u64)> {
    let pool = fresh
        .setup
        .postgres_pool()
        .context("the restart scenario runs on PostgreSQL")?
        .clone();
    let system = crate::config::this_system();
    let now = crate::actors::env::Clock::now(&crate::actors::env::SystemClock);
    let t_all = Instant::now();
    let t = Instant::now();
    eprintln!(
        "qr bench: restart: history of {} builds, {} steps",
        spec.history_builds, spec.history_steps
    );
    let (hb, hs, hr) = fill_history(&pool, spec, now, &system).await?;
    let history_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let gspec = GraphSpec {
        steps: spec.queued_steps,
        ca_fraction: spec.ca_fraction,
        fan_in: spec.fan_in,
        depth: spec.depth.clamp(1, spec.queued_steps.max(1)),
        seed: spec.seed,
        tag: spec.tag.clone(),
    };
    let g = graph::generate(&gspec, store.store_dir(), &system)?;
    let plan = plan_queue(&g, spec)?;
    // The resolved drvs: CA derivations without inputs (what resolving leaves of a drv whose
    // inputs are built), one per recorded resolution.
    let rspec = GraphSpec {
        steps: plan.resolved.len().max(1),
        ca_fraction: 1.0,
        fan_in: 0,
        depth: 1,
        seed: spec.seed,
        tag: format!("{}r", spec.tag),
    };
    let rg = graph::generate(&rspec, store.store_dir(), &system)?;
    let resolved_drvs: Vec<String> = rg
        .drvs
        .iter()
        .take(plan.resolved.len())
        .map(|(p, _)| p.clone())
        .collect();
    let graph_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    eprintln!(
        "qr bench: restart: {} drvs into the store",
        g.drvs.len() + rg.drvs.len()
    );
    store.set_fsync(false);
    let added = async {
        graph::add_to_store(&**store, &g, 64).await?;
        graph::add_to_store(&**store, &rg, 64).await
    }
    .await;
    store.set_fsync(true);
    added?;
    let store_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    eprintln!(
        "qr bench: restart: {} queued builds ({} busy rows, {} Resolved)",
        plan.builds.len(),
        plan.busy.len(),
        plan.resolved.len()
    );
    fill_queue(&pool, &g, &plan, &resolved_drvs, now).await?;
    let queue_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    sqlx::query("analyze").execute(&pool).await?;
    let analyze_s = t.elapsed().as_secs_f64();
    let total_s = t_all.elapsed().as_secs_f64();
    let database_bytes: i64 = sqlx::query_scalar("select pg_database_size(current_database())")
        .fetch_one(&pool)
        .await?;
    let buildsteps_rows: i64 = sqlx::query_scalar("select count(*) from buildsteps")
        .fetch_one(&pool)
        .await?;

    // The plans, on a pool of its own (the runner's options), rolled back.
    let sample: Vec<String> = plan.builds.iter().take(1000).cloned().collect();
    let plans = fresh
        .db
        .explain_recovery(&sample, now)
        .await
        .context("EXPLAIN ANALYZE of the recovery queries")?;
    let fill = Fill {
        history_builds: hb,
        history_steps: hs,
        history_resolved: hr,
        history_s,
        graph_s,
        store_s,
        drvs_written: g.drvs.len() + resolved_drvs.len(),
        queue_s,
        queued_builds: plan.builds.len(),
        busy_rows: plan.busy.len(),
        resolved_rows: plan.resolved.len(),
        analyze_s,
        total_s,
        database_bytes,
        buildsteps_rows,
    };
    Ok((fill, plans, plan.expected_steps, plan.expected_runnable))
}

/// The runner's start on the filled database, in this (fresh) actix system.
async fn restart(
    spec: &RestartSpec,
    slots: u32,
    timeout: Duration,
    f: &Filled,
) -> anyhow::Result<Recovery> {
    let root = &f.root;
    let store = Arc::new(LocalStore::open(StoreDir::new(root.display().to_string())?, root).await?);
    let db = Db::connect_with(
        &f.url,
        DbOptions {
            max_connections: 8,
            ..DbOptions::default()
        },
    )
    .await?;
    let env = scenario::runner_env(&db, &store, crate::actors::dispatcher::Order::default())?;
    let held = Arc::new(Held::default());
    let machine: Arc<dyn Executor> = held.clone();
    eprintln!("qr bench: restart: the runner starts");
    let t0 = Instant::now();
    let (sched, rec) = Scheduler::start(
        env.clone(),
        vec![(scenario::machine_info(slots), machine)],
        Duration::from_secs(30 * 86400),
    )
    .await?;
    let recover_s = t0.elapsed().as_secs_f64();
    let s = &env.stats;
    let (es, er) = (f.expected_steps, f.expected_runnable);
    let counters = || {
        format!(
            "steps created {} of {es}, runnable or running {} of {er}, membership in flight {}, \
             jobs started {}",
            Stats::get(&s.steps_created),
            Stats::get(&s.steps_runnable) + Stats::get(&s.steps_running),
            Stats::get(&s.membership_in_flight),
            held.started.load(Ordering::Relaxed)
        )
    };
    let settled = wait_until("full recovery", timeout, || {
        Ok(Stats::get(&s.steps_created) >= es
            && Stats::get(&s.membership_in_flight) == 0
            && Stats::get(&s.steps_runnable) + Stats::get(&s.steps_running) >= er)
    })
    .await;
    if let Err(e) = settled {
        return Err(e.context(counters()));
    }
    let deadline = Instant::now() + timeout;
    let mut build_actors = sched.monitor.send(ActiveBuilds).await?;
    while build_actors < spec.queued_builds.min(f.fill.queued_builds) {
        if Instant::now() > deadline {
            anyhow::bail!(
                "{build_actors} build actors after {timeout:?}; {}",
                counters()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        build_actors = sched.monitor.send(ActiveBuilds).await?;
    }
    // FIFO mailbox: once this answers, the dispatcher has handled every Runnable sent.
    let status = sched.dispatcher.send(GetStatus).await?;
    let full_recovery_s = t0.elapsed().as_secs_f64();
    let first_dispatch_s = match held.first.get() {
        Some(t) => t.duration_since(t0).as_secs_f64(),
        None => {
            let first = wait_until("the first dispatch", timeout, || {
                Ok(held.first.get().is_some())
            })
            .await
            .with_context(counters)?;
            first.duration_since(t0).as_secs_f64()
        }
    };
    Ok(Recovery {
        recover_s,
        first_dispatch_s,
        full_recovery_s,
        build_actors,
        steps_created: Stats::get(&s.steps_created),
        expected_steps: es,
        runnable_or_running: status.runnable as u64 + Stats::get(&s.steps_running),
        expected_runnable: er,
        aborted_busy: rec.aborted,
        resolutions_reattached: rec.resolutions,
        orphaned: rec.orphaned,
        jobs_started: held.started.load(Ordering::Relaxed),
        rss_bytes: rss_bytes(),
    })
}
