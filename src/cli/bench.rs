//! `qr bench`: synthetic build graphs through the real actors, database and store (see
//! `crate::bench`), on SQLite and/or PostgreSQL; prints a table of the figures against the targets,
//! or (`--json`) one JSON document with every figure. `BENCHMARKS.md` holds the reference runs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::Context;
use crate::bench::graph::GraphSpec;
use crate::bench::measure::{MachineInfo, Percentiles};
use crate::bench::scenario::{self, DbTarget, ExecutorKind, Params};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Sqlite,
    Postgres,
    Both,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Derivations (steps) in the layered graph.
    #[arg(long, default_value_t = 10_000)]
    pub steps: usize,
    /// Share of floating content-addressed derivations (the rest are input-addressed, deferred
    /// when they read a CA or deferred one).
    #[arg(long, default_value_t = 0.5)]
    pub ca_fraction: f64,
    /// Inputs per derivation above the first layer.
    #[arg(long, default_value_t = 3)]
    pub fan_in: usize,
    /// Layers of the graph.
    #[arg(long, default_value_t = 10)]
    pub depth: usize,
    /// Seed of the graph's random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "both")]
    pub backend: BackendArg,
    /// Where fresh PostgreSQL databases are created (and dropped afterwards).
    #[arg(
        long,
        env = "QR_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// Who builds: zero-time simulated builds, or the native executor on the trivial builders.
    #[arg(long, value_enum, default_value = "simulated")]
    pub executor: ExecutorKind,
    /// The machine's slots (default: 64 for simulated builds, the number of cores for native).
    #[arg(long)]
    pub slots: Option<u32>,
    /// Independent steps queued for the dispatch scenario (default: --steps; 0 skips it).
    #[arg(long)]
    pub dispatch_steps: Option<usize>,
    /// Steps built while dispatch decisions are sampled (default: 5% of --dispatch-steps).
    #[arg(long)]
    pub dispatch_sample: Option<u64>,
    /// Skip the layered scenario (load, build, resolution).
    #[arg(long)]
    pub no_layered: bool,
    /// Layered scenario: measure the load (and memory) only; no machine joins.
    #[arg(long)]
    pub load_only: bool,
    /// PostgreSQL sessions with `synchronous_commit = off` (commits do not wait for the WAL
    /// flush): shows what the fsync costs.
    #[arg(long)]
    pub pg_async_commit: bool,
    /// The store does not fsync build outputs and resolved drvs, nor its metadata commits
    /// (SQLite `synchronous = OFF`), during the measured phases (combine with
    /// --pg-async-commit): what the scheduler does when the disk is not the bound.
    #[arg(long)]
    pub no_fsync: bool,
    /// PostgreSQL: every step write its own statement and commit, as before writes arriving
    /// together were coalesced (to measure what the coalescing gives).
    #[arg(long)]
    pub no_batch_writes: bool,
    /// Pick-up scenario: builds queued one at a time by another connection pool (as `qr submit`
    /// in another process), each timed from its insert to its step's start (0 skips it).
    #[arg(long, default_value_t = 50)]
    pub pickup: usize,
    /// Remote-builder scenario: the layered graph built by this many `qr builder` processes
    /// (zero-time simulated builds, small NARs uploaded) over gRPC on loopback (0 skips it).
    #[arg(long, default_value_t = 0)]
    pub remote_builders: usize,
    /// Slots of each remote builder (default: --slots divided among them, at least 1).
    #[arg(long)]
    pub remote_jobs: Option<u32>,
    /// Scratch directory parent (default: <state dir>/bench); each scenario's is removed after.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Longest a timed phase may take, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_s: u64,
    /// The queue's order in the real-actor scenarios (`[scheduler] order`: `critical-path`, the
    /// default, tracks every step's critical path; `build-id` does not).
    #[arg(long, default_value = "critical-path", value_parser = parse_order)]
    pub order: crate::actors::dispatcher::Order,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Only the makespan scenario (virtual time, no database): the real dispatcher and
    /// critical-path tracker on a seeded DAG of --makespan-steps steps, once per order.
    #[arg(long)]
    pub makespan: bool,
    #[arg(long, default_value_t = 7_200)]
    pub makespan_steps: usize,
    /// Makespan scenario: inputs are picked among this many steps made before (smaller: deeper).
    #[arg(long, default_value_t = 2_000)]
    pub makespan_window: usize,
    /// Makespan scenario: longest true step duration, in seconds.
    #[arg(long, default_value_t = 7_200.0)]
    pub makespan_max_duration_s: f64,
    /// Makespan scenario: seconds between the evaluations' arrivals.
    #[arg(long, default_value_t = 300)]
    pub makespan_eval_interval_s: u64,
    /// Only the restart-at-scale scenario (PostgreSQL): a database filled with a history and a
    /// queue, then a runner started on it, timed to its first dispatch and to full recovery.
    #[arg(long)]
    pub restart_scale: bool,
    /// Restart scenario: finished builds in the history.
    #[arg(long, default_value_t = 1_000_000)]
    pub history_builds: u64,
    /// Restart scenario: steps of the history (a whole number per build).
    #[arg(long, default_value_t = 5_000_000)]
    pub history_steps: u64,
    /// Restart scenario: unfinished builds.
    #[arg(long, default_value_t = 100_000)]
    pub queued_builds: usize,
    /// Restart scenario: derivations of the queued graph (unfinished steps).
    #[arg(long, default_value_t = 250_000)]
    pub queued_steps: usize,
    /// Restart scenario: queued builds with a step row left busy by the crash.
    #[arg(long, default_value_t = 1_000)]
    pub busy_rows: usize,
    /// Restart scenario: queued builds whose top step was Resolved, its target pending.
    #[arg(long, default_value_t = 5_000)]
    pub resolved_rows: usize,
    /// Restart scenario: layers of the queued graph.
    #[arg(long, default_value_t = 5)]
    pub queued_depth: usize,
    /// Only the actor-cost measurement: RSS per idle actix actor, per actor the size of a step
    /// actor, and per the same bytes held as plain state, over this many of each.
    #[arg(long)]
    pub actor_cost: Option<usize>,
}

fn parse_order(s: &str) -> Result<crate::actors::dispatcher::Order, String> {
    use crate::actors::dispatcher::Order;
    [Order::CriticalPath, Order::BuildId]
        .into_iter()
        .find(|o| o.as_str() == s)
        .ok_or_else(|| format!("expected critical-path or build-id, not {s:?}"))
}

/// The targets of the performance issue (2-core machine).
const TARGET_LOAD_STEPS_PER_S: f64 = 20_000.0;
const TARGET_BUILD_STEPS_PER_S: f64 = 5_000.0;
const TARGET_DISPATCH_P99_US: f64 = 50.0;
const TARGET_RESOLUTION_P99_MS: f64 = 2.0;
const TARGET_RSS_PER_STEP: f64 = 2048.0;
const TARGET_REMOTE_STEPS_PER_S: f64 = 2_000.0;

pub fn run(ctx: Context, args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.makespan {
        return makespan(&args);
    }
    if args.restart_scale {
        return restart_scale(&ctx, &args);
    }
    if let Some(n) = args.actor_cost {
        let cost = crate::bench::actor_cost::actor_cost(n.max(1))?;
        let doc = json!({
            "qr_version": env!("CARGO_PKG_VERSION"),
            "machine": MachineInfo::here(),
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "actor_cost": cost,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| ctx.state_dir.join("bench"));
    std::fs::create_dir_all(&work_dir)?;
    let slots = args.slots.unwrap_or(match args.executor {
        ExecutorKind::Simulated => 64,
        ExecutorKind::Native => std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
    });
    let params = Params {
        executor: args.executor,
        slots,
        setup_parallel: 64,
        work_dir,
        timeout: Duration::from_secs(args.timeout_s),
        pg_async_commit: args.pg_async_commit,
        load_only: args.load_only,
        no_fsync: args.no_fsync,
        batch_writes: !args.no_batch_writes,
        order: args.order,
    };
    let mut targets = Vec::new();
    if args.backend != BackendArg::Postgres {
        targets.push(DbTarget::Sqlite);
    }
    let mut notes: Vec<String> = Vec::new();
    if args.backend != BackendArg::Sqlite {
        let url = args.postgres_url.clone();
        let up =
            scenario::in_system(
                move || async move { Ok(scenario::postgres_reachable(&url).await) },
            )?;
        if up {
            targets.push(DbTarget::Postgres {
                base_url: args.postgres_url.clone(),
            });
        } else if args.backend == BackendArg::Postgres {
            anyhow::bail!(
                "PostgreSQL is not reachable at {}",
                crate::db::redact_url(&args.postgres_url)
            );
        } else {
            let n = format!(
                "PostgreSQL not reachable at {}: skipped",
                crate::db::redact_url(&args.postgres_url)
            );
            eprintln!("qr bench: {n}");
            notes.push(n);
        }
    }
    let tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let spec = GraphSpec {
        steps: args.steps,
        ca_fraction: args.ca_fraction,
        fan_in: args.fan_in,
        depth: args.depth,
        seed: args.seed,
        tag: tag.clone(),
    };
    let dispatch_steps = args.dispatch_steps.unwrap_or(args.steps);
    let sample = args
        .dispatch_sample
        .unwrap_or((dispatch_steps as u64 / 20).max(1));

    let mut layered = Vec::new();
    let mut dispatch = Vec::new();
    let mut pickup = Vec::new();
    let mut remote = Vec::new();
    let remote_spec = crate::bench::remote::RemoteSpec {
        builders: args.remote_builders,
        jobs: args
            .remote_jobs
            .unwrap_or_else(|| slots.div_ceil(args.remote_builders.max(1) as u32))
            .max(1),
        exe: std::env::current_exe().context("the path of this qr binary")?,
    };
    for t in &targets {
        if args.remote_builders > 0 {
            eprintln!(
                "qr bench: remote, {} steps, {} builders x {} slots over gRPC, {}",
                args.steps,
                remote_spec.builders,
                remote_spec.jobs,
                t.name()
            );
            let (s, r, p, t2) = (
                GraphSpec {
                    tag: format!("{tag}r"),
                    ..spec.clone()
                },
                remote_spec.clone(),
                params.clone(),
                t.clone(),
            );
            remote.push(scenario::in_system(move || {
                crate::bench::remote::remote(s, r, p, t2)
            })?);
        }
        if args.pickup > 0 {
            eprintln!(
                "qr bench: pick-up, {} builds from another process, {}",
                args.pickup,
                t.name()
            );
            let (p, t2, n) = (params.clone(), t.clone(), args.pickup);
            pickup.push(scenario::in_system(move || {
                crate::bench::pickup::pickup(n, p, t2)
            })?);
        }
        if !args.no_layered {
            eprintln!("qr bench: layered, {} steps, {}", args.steps, t.name());
            let (s, p, t2) = (spec.clone(), params.clone(), t.clone());
            layered.push(scenario::in_system(move || scenario::layered(s, p, t2))?);
        }
        if dispatch_steps > 0 {
            eprintln!(
                "qr bench: dispatch, {dispatch_steps} runnable, {}",
                t.name()
            );
            let (p, t2, tag) = (params.clone(), t.clone(), format!("{tag}d"));
            dispatch.push(scenario::in_system(move || {
                scenario::dispatch(dispatch_steps, sample, tag, p, t2)
            })?);
        }
    }
    let pure_n = if dispatch_steps > 0 {
        dispatch_steps
    } else {
        args.steps
    };
    let pure = scenario::dispatch_pure(pure_n, slots, 50_000);

    let mut summary = summarise(&layered, &dispatch, pure_n, &pure);
    summary.extend(pickup_rows(&pickup));
    summary.extend(remote_rows(&remote));
    let doc = json!({
        "qr_version": env!("CARGO_PKG_VERSION"),
        "machine": MachineInfo::here(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "executor": args.executor,
        "slots": slots,
        "layered": layered,
        "dispatch": dispatch,
        "dispatch_pure": { "runnable": pure_n, "slots": slots, "decisions_us": pure },
        "pickup": pickup,
        "remote": remote,
        "summary": summary,
        "no_fsync": args.no_fsync,
        "pg_async_commit": args.pg_async_commit,
        "batch_writes": !args.no_batch_writes,
        "notes": notes,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", table(&doc));
    }
    Ok(ExitCode::SUCCESS)
}

/// One row per figure and backend: `{metric, backend, value, unit, target, met}`.
fn summarise(
    layered: &[scenario::Layered],
    dispatch: &[scenario::Dispatch],
    pure_n: usize,
    pure: &Percentiles,
) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut row =
        |metric: String, backend: &str, value: f64, unit: &str, target: Option<(&str, bool)>| {
            rows.push(json!({
                "metric": metric,
                "backend": backend,
                "value": value,
                "unit": unit,
                "target": target.map(|t| t.0),
                "met": target.map(|t| t.1),
            }));
        };
    for l in layered {
        let b = l.backend;
        let n = l.setup.steps;
        row(
            format!("load: steps/s ({n} steps)"),
            b,
            l.load.steps_per_s,
            "steps/s",
            Some((">= 20000", l.load.steps_per_s >= TARGET_LOAD_STEPS_PER_S)),
        );
        row(
            format!("load: time ({n} steps)"),
            b,
            l.load.seconds,
            "s",
            None,
        );
        row(
            format!("RSS per live step ({} steps, layered)", l.load.live_steps),
            b,
            l.load.rss_per_step_bytes,
            "bytes",
            Some(("<= 2048", l.load.rss_per_step_bytes <= TARGET_RSS_PER_STEP)),
        );
        row(
            "steps held dormant after the load".into(),
            b,
            l.load.dormant_steps as f64,
            "steps",
            None,
        );
        let Some(build) = &l.build else {
            continue;
        };
        let exec = match l.executor {
            ExecutorKind::Simulated => "zero-time",
            ExecutorKind::Native => "native",
        };
        let build_target = (b == "postgres" && l.executor == ExecutorKind::Simulated)
            .then_some((">= 5000", build.steps_per_s >= TARGET_BUILD_STEPS_PER_S));
        row(
            format!(
                "build: {exec} steps/s, {} slots ({} steps finished)",
                l.slots, build.steps_finished
            ),
            b,
            build.steps_per_s,
            "steps/s",
            build_target,
        );
        row(
            "build: dispatch decision p50".into(),
            b,
            build.dispatch_us.p50,
            "µs",
            None,
        );
        row(
            "build: dispatch decision p99".into(),
            b,
            build.dispatch_us.p99,
            "µs",
            None,
        );
        row(
            format!("resolution p50 ({} timed)", build.resolution_ms.count),
            b,
            build.resolution_ms.p50,
            "ms",
            None,
        );
        row(
            format!("resolution p99 ({} timed)", build.resolution_ms.count),
            b,
            build.resolution_ms.p99,
            "ms",
            Some((
                "<= 2 (excl. fsync)",
                build.resolution_ms.p99 <= TARGET_RESOLUTION_P99_MS,
            )),
        );
        row(
            "write transactions per finished step".into(),
            b,
            build.tx_per_finished_step,
            "tx",
            None,
        );
    }
    for d in dispatch {
        let b = d.backend;
        row(
            format!("load: steps/s ({} independent steps)", d.setup.steps),
            b,
            d.load.steps_per_s,
            "steps/s",
            Some((">= 20000", d.load.steps_per_s >= TARGET_LOAD_STEPS_PER_S)),
        );
        row(
            format!(
                "RSS per live step ({} steps, independent)",
                d.load.live_steps
            ),
            b,
            d.load.rss_per_step_bytes,
            "bytes",
            Some(("<= 2048", d.load.rss_per_step_bytes <= TARGET_RSS_PER_STEP)),
        );
        row(
            format!("dispatch p50 ({} runnable, actors)", d.runnable_at_join),
            b,
            d.decisions_us.p50,
            "µs",
            None,
        );
        row(
            format!("dispatch p99 ({} runnable, actors)", d.runnable_at_join),
            b,
            d.decisions_us.p99,
            "µs",
            Some(("<= 50", d.decisions_us.p99 <= TARGET_DISPATCH_P99_US)),
        );
    }
    row(
        format!("dispatch p50 ({pure_n} runnable, state machine)"),
        "-",
        pure.p50,
        "µs",
        None,
    );
    row(
        format!("dispatch p99 ({pure_n} runnable, state machine)"),
        "-",
        pure.p99,
        "µs",
        Some(("<= 50", pure.p99 <= TARGET_DISPATCH_P99_US)),
    );
    rows
}

/// The target of the issue: a build submitted to a running runner starts within a second.
const TARGET_PICKUP_MS: f64 = 1000.0;

/// The pick-up figures, as rows of the summary.
fn pickup_rows(pickup: &[crate::bench::pickup::Pickup]) -> Vec<Value> {
    let mut rows = Vec::new();
    for pk in pickup {
        for (name, v, target) in [
            ("p50", pk.latency_ms.p50, None),
            (
                "p99",
                pk.latency_ms.p99,
                Some(pk.latency_ms.p99 <= TARGET_PICKUP_MS),
            ),
        ] {
            rows.push(json!({
                "metric": format!("submit → step start {name} ({} from another process)", pk.submissions),
                "backend": pk.backend,
                "value": v,
                "unit": "ms",
                "target": target.map(|_| "<= 1000"),
                "met": target,
            }));
        }
    }
    rows
}

/// The remote-builder figures, as rows of the summary.
fn remote_rows(remote: &[crate::bench::remote::Remote]) -> Vec<Value> {
    let mut rows = Vec::new();
    for r in remote {
        let b = &r.build;
        let what = format!("{} builders x {}", r.builders, r.jobs_per_builder);
        let mut row = |metric: String, value: f64, unit: &str, target: Option<(&str, bool)>| {
            rows.push(json!({
                "metric": metric,
                "backend": r.backend,
                "value": value,
                "unit": unit,
                "target": target.map(|t| t.0),
                "met": target.map(|t| t.1),
            }));
        };
        row(
            format!("remote: zero-time steps/s, {what} (all joined)"),
            b.steps_per_s,
            "steps/s",
            Some((">= 2000", b.steps_per_s >= TARGET_REMOTE_STEPS_PER_S)),
        );
        row(
            format!("remote: steps/s from spawn ({} finished)", b.steps_finished),
            b.steps_per_s_from_spawn,
            "steps/s",
            None,
        );
        row(
            "remote: step p50 (assigned → built)".into(),
            b.step_ms.p50,
            "ms",
            None,
        );
        row(
            "remote: step p99 (assigned → built)".into(),
            b.step_ms.p99,
            "ms",
            None,
        );
        row(
            "remote: CPU busy share".into(),
            r.cpu.machine_busy_share,
            "",
            None,
        );
        row("remote: runner CPU".into(), r.cpu.runner_s, "s", None);
        row("remote: builders CPU".into(), r.cpu.builders_s, "s", None);
        row("remote: postgres CPU".into(), r.cpu.postgres_s, "s", None);
    }
    rows
}

/// The summary as a table: one line per figure, a column per backend.
fn table(doc: &Value) -> String {
    use std::fmt::Write;
    let rows = doc["summary"].as_array().cloned().unwrap_or_default();
    let mut metrics: Vec<String> = Vec::new();
    for r in &rows {
        let m = r["metric"].as_str().unwrap_or_default().to_string();
        if !metrics.contains(&m) {
            metrics.push(m);
        }
    }
    let cell = |m: &str, b: &str| -> String {
        rows.iter()
            .find(|r| r["metric"] == m && (r["backend"] == b || r["backend"] == "-"))
            .map(|r| {
                let v = r["value"].as_f64().unwrap_or(f64::NAN);
                let unit = r["unit"].as_str().unwrap_or_default();
                let mark = match r["met"].as_bool() {
                    Some(true) => " ok",
                    Some(false) => " MISSED",
                    None => "",
                };
                format!("{} {unit}{mark}", fmt_num(v))
            })
            .unwrap_or_else(|| "-".into())
    };
    let target = |m: &str| -> String {
        rows.iter()
            .find(|r| r["metric"] == m && !r["target"].is_null())
            .and_then(|r| r["target"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let mut t = String::new();
    let m = &doc["machine"];
    let _ = writeln!(
        t,
        "qr bench on {} cores, {}, {} RAM",
        m["nproc"],
        m["cpu"].as_str().unwrap_or("?"),
        m["mem_total"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        t,
        "{:<52} {:>24} {:>24}  target",
        "figure", "sqlite", "postgres"
    );
    for m in &metrics {
        let _ = writeln!(
            t,
            "{:<52} {:>24} {:>24}  {}",
            m,
            cell(m, "sqlite"),
            cell(m, "postgres"),
            target(m)
        );
    }
    for r in doc["remote"].as_array().into_iter().flatten() {
        let _ = writeln!(
            t,
            "remote ({}): bound: {}",
            r["backend"].as_str().unwrap_or_default(),
            r["bound"].as_str().unwrap_or_default()
        );
    }
    for n in doc["notes"].as_array().into_iter().flatten() {
        let _ = writeln!(t, "note: {}", n.as_str().unwrap_or_default());
    }
    t
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `qr bench --makespan`: both orders on one workload, against the lower bound.
fn makespan(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    use crate::bench::makespan::{Spec, run};
    if args.makespan_steps < 2 {
        anyhow::bail!("--makespan-steps must be at least 2");
    }
    let spec = Spec {
        steps: args.makespan_steps,
        window: args.makespan_window.max(1),
        max_duration_s: args.makespan_max_duration_s.max(1.0),
        eval_interval_s: args.makespan_eval_interval_s,
        seed: args.seed,
        ..Spec::default()
    };
    let report = run(&spec);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "makespan scenario: {} steps, {} evaluations every {} s, {} machines x {} slots, seed {}",
        report.steps_built,
        spec.evaluations,
        spec.eval_interval_s,
        spec.machines,
        spec.slots_per_machine,
        spec.seed
    );
    println!(
        "total work {:.0} s, work / slots {:.0} s, critical path {:.0} s: lower bound {:.0} s",
        report.total_work_s, report.work_bound_s, report.critical_path_s, report.lower_bound_s
    );
    for r in &report.runs {
        println!(
            "  {:<14} makespan {:>8.0} s  ratio {:.3}  (reprioritised {}, tracker visits {})",
            r.order, r.makespan_s, r.ratio, r.reprioritised, r.cp_visits
        );
    }
    println!("note: {}", report.note);
    Ok(ExitCode::SUCCESS)
}

/// `qr bench --restart-scale`: the restart scenario alone, its figures against the goals.
fn restart_scale(ctx: &Context, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    use crate::bench::restart::{self, GOAL_FIRST_DISPATCH_S, GOAL_FULL_RECOVERY_S, RestartSpec};
    if args.backend == BackendArg::Sqlite {
        anyhow::bail!("--restart-scale fills PostgreSQL: use --backend postgres");
    }
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| ctx.state_dir.join("bench"));
    std::fs::create_dir_all(&work_dir)?;
    let params = Params {
        executor: ExecutorKind::Simulated,
        slots: args.slots.unwrap_or(64),
        setup_parallel: 64,
        work_dir,
        timeout: Duration::from_secs(args.timeout_s),
        pg_async_commit: args.pg_async_commit,
        load_only: false,
        no_fsync: args.no_fsync,
        batch_writes: !args.no_batch_writes,
        order: args.order,
    };
    let spec = RestartSpec {
        history_builds: args.history_builds,
        history_steps: args.history_steps,
        queued_builds: args.queued_builds,
        queued_steps: args.queued_steps,
        busy_rows: args.busy_rows,
        resolved_rows: args.resolved_rows,
        depth: args.queued_depth,
        fan_in: args.fan_in,
        ca_fraction: args.ca_fraction,
        seed: args.seed,
        tag: format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        ),
    };
    let r = restart::restart_scale(spec, params, args.postgres_url.clone())?;
    let rec = &r.recovery;
    let row = |metric: &str, value: f64, unit: &str, target: Option<(&str, bool)>| {
        json!({
            "metric": metric,
            "backend": "postgres",
            "value": value,
            "unit": unit,
            "target": target.map(|t| t.0),
            "met": target.map(|t| t.1),
        })
    };
    let scans: usize = r
        .plans
        .iter()
        .filter(|p| !p.name.contains("before"))
        .map(|p| p.full_scans.len())
        .sum();
    let summary = vec![
        row(
            "restart: fill (not part of recovery)",
            r.fill.total_s,
            "s",
            None,
        ),
        row(
            "restart: first dispatch",
            rec.first_dispatch_s,
            "s",
            Some(("<= 10", rec.first_dispatch_s <= GOAL_FIRST_DISPATCH_S)),
        ),
        row(
            "restart: full recovery",
            rec.full_recovery_s,
            "s",
            Some(("<= 30", rec.full_recovery_s <= GOAL_FULL_RECOVERY_S)),
        ),
        row(
            "restart: recovery reads and aborts",
            rec.recover_s,
            "s",
            None,
        ),
        row(
            "restart: recovery plans reading a whole table",
            scans as f64,
            "plans",
            Some(("0", scans == 0)),
        ),
    ];
    let doc = json!({
        "qr_version": env!("CARGO_PKG_VERSION"),
        "machine": MachineInfo::here(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "restart": r,
        "summary": summary,
        "notes": Vec::<String>::new(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", table(&doc));
    }
    Ok(ExitCode::SUCCESS)
}
