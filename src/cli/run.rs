//! `qr run [--json] TARGET…`: the main job in one process — open the database and the store, start
//! the actors and an in-process local builder, queue the targets as builds, show progress, wait for
//! them, print one line per build and its steps (with the Resolved links). Exit 1 if any failed.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::json;

use super::Context;
use crate::actors::dispatcher::MachineInfo;
use crate::actors::env::{Env, SchedEvent, Stats, SystemClock, persist};
use crate::actors::machine::Executor;
use crate::actors::scheduler::Scheduler;
use crate::actors::step::RetryPolicy;
use crate::db::Db;
use crate::db::types::{Build, BuildId, BuildStatus, NewBuild, ProducedLink, Step};
use crate::store::{Derivation, Store, StoreDir};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Print one JSON object per build instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Jobset the builds are queued in.
    #[arg(long, default_value = "qr-run")]
    pub jobset: String,
    /// `.drv` store paths in the configured store, or JSON files of derivations (`derivation
    /// show` of Nix 2.8 to 2.35, any version), which are added to the store first.
    #[arg(required = true, value_name = "TARGET")]
    pub targets: Vec<String>,
}

/// Reads the TARGETs: drv paths as they are, JSON files added to the store (re-instantiated into
/// the configured store dir when written for another). Returns the top-level drvs.
pub async fn targets_to_drvs(
    store: &dyn Store,
    targets: &[String],
) -> anyhow::Result<Vec<(String, Derivation)>> {
    let mut tops = Vec::new();
    for t in targets {
        if t.ends_with(".json") {
            tops.extend(add_json_file(store, Path::new(t)).await?);
        } else {
            let drv = store.read_derivation(t).await.with_context(|| {
                format!("{t} is not a derivation in the store (add it with `qr import`)")
            })?;
            tops.push((t.clone(), drv));
        }
    }
    Ok(tops)
}

async fn add_json_file(
    store: &dyn Store,
    file: &Path,
) -> anyhow::Result<Vec<(String, Derivation)>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    // Any shape Nix has printed; versions 3 and 4 carry no store dir, the document's own hashes
    // tell which it is (the configured store's is tried first).
    let parsed =
        crate::store::drv_json::parse_show_document(&doc, std::slice::from_ref(store.store_dir()))
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let from = parsed.store_dir.clone();
    let mut hashes = crate::store::hash_modulo::DrvHashes::new(from.clone());
    let mut no_external =
        |p: &str| -> Result<Derivation, String> { Err(format!("{p} is not in the file")) };
    let drvs = parsed
        .import(&mut hashes, &mut no_external)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let drvs: Vec<(String, Derivation)> =
        drvs.into_iter().map(|(p, d)| (from.print(&p), d)).collect();
    let drvs = crate::store::relocate::relocate(&drvs, &from, store.store_dir())
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let used: std::collections::BTreeSet<&String> =
        drvs.iter().flat_map(|(_, d)| d.input_drvs.keys()).collect();
    let mut tops = Vec::new();
    for (path, drv) in &drvs {
        let added = store
            .add_derivation(drv)
            .await
            .with_context(|| format!("adding {path} to the store"))?;
        if added != *path {
            bail!("{}: the store computed {added} for {path}", file.display());
        }
        if !used.contains(path) {
            tops.push((path.clone(), drv.clone()));
        }
    }
    Ok(tops)
}

/// The limits of a build that sets none of its own: `[scheduler] max_silent_time_s` and
/// `build_timeout_s`, seconds (0: no limit), as stored in `builds.maxsilent` / `builds.timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultLimits {
    pub max_silent: i32,
    pub timeout: i32,
}

impl DefaultLimits {
    pub fn of(cfg: &crate::config::SchedulerConfig) -> Self {
        let clamp = |s: u64| i32::try_from(s).unwrap_or(i32::MAX);
        DefaultLimits {
            max_silent: clamp(cfg.max_silent_time_s),
            timeout: clamp(cfg.build_timeout_s),
        }
    }
}

/// Queues a build per top-level drv (with `limits`), reusing an unfinished build of the same drv in the jobset
/// (so running the same command after a crash resumes instead of duplicating).
pub async fn queue_builds(
    db: &Db,
    jobset: &str,
    tops: &[(String, Derivation)],
    now: i64,
    limits: &DefaultLimits,
) -> anyhow::Result<Vec<BuildId>> {
    persist("create jobset", || db.create_jobset(jobset, 100)).await?;
    let unfinished = persist("read the queue", || db.unfinished_builds()).await?;
    let mut ids = Vec::new();
    for (path, drv) in tops {
        if let Some(b) = unfinished
            .iter()
            .find(|b| b.jobset == jobset && &b.drv_path == path)
        {
            ids.push(b.id);
            continue;
        }
        let nb = NewBuild {
            jobset: jobset.to_string(),
            job: drv.name.clone(),
            drv_path: path.clone(),
            system: drv.system.clone(),
            priority: 0,
            global_priority: 0,
            max_silent: limits.max_silent,
            timeout: limits.timeout,
            timestamp: now,
            outputs: drv
                .outputs
                .iter()
                .map(|(o, out)| (o.clone(), out.path().map(str::to_string)))
                .collect(),
        };
        ids.push(persist("queue build", || db.create_build(&nb)).await?);
    }
    Ok(ids)
}

/// A build and its steps, as reported.
pub struct Report {
    pub build: Build,
    pub outputs: BTreeMap<String, Option<String>>,
    pub steps: Vec<Step>,
    /// Dynamic derivations: the links between producers' rows and produced drvs' rows, with a
    /// row of this build on either side.
    pub produced: Vec<ProducedLink>,
}

pub async fn report(db: &Db, ids: &[BuildId]) -> anyhow::Result<Vec<Report>> {
    let mut out = Vec::new();
    for id in ids {
        let build = persist("read build", || db.get_build(*id)).await?;
        let outputs = persist("read build outputs", || db.build_outputs(*id))
            .await?
            .into_iter()
            .map(|o| (o.name, o.path))
            .collect();
        let steps = persist("read steps", || db.steps_of_build(*id)).await?;
        let produced = persist("read produced links", || db.produced_links(*id)).await?;
        out.push(Report {
            build,
            outputs,
            steps,
            produced,
        });
    }
    Ok(out)
}

/// Prints the builds (a JSON object per line, or the table); true when every one succeeded.
pub fn print_reports(reports: &[Report], json: bool) -> bool {
    if json {
        for r in reports {
            println!("{}", report_json(r));
        }
    } else {
        print!("{}", report_table(reports));
    }
    reports
        .iter()
        .all(|r| r.build.build_status == Some(BuildStatus::Success))
}

pub fn report_json(r: &Report) -> serde_json::Value {
    json!({
        "id": r.build.id.0,
        "job": r.build.job,
        "drvPath": r.build.drv_path,
        "status": r.build.build_status.map(|s| s.code()),
        "outputs": r.outputs,
        "steps": r.steps.iter().map(|s| json!({
            "stepnr": s.stepnr,
            "drvPath": s.drv_path,
            "status": s.status.map(|s| s.code()),
            "resolvedToStep": s.resolved_to_step,
            "producedBy": r.produced.iter()
                .filter(|l| l.produced_build == r.build.id && l.produced_step == s.stepnr)
                .map(|l| json!({"build": l.build.0, "stepnr": l.stepnr, "output": l.output}))
                .collect::<Vec<_>>(),
            "built": s.status == Some(BuildStatus::Success) && s.times_built.unwrap_or(0) > 0,
            "machine": s.machine,
            "errorMsg": s.error_msg,
        })).collect::<Vec<_>>(),
    })
}

fn status_name(s: Option<BuildStatus>) -> String {
    match s {
        None => "unfinished".into(),
        Some(s) => format!("{s:?}"),
    }
}

fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

pub fn report_table(reports: &[Report]) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    for r in reports {
        let outs: Vec<String> = r
            .outputs
            .iter()
            .map(|(o, p)| format!("{o}={}", p.as_deref().unwrap_or("-")))
            .collect();
        let _ = writeln!(
            t,
            "build {:<4} {:<24} {:<16} {}",
            r.build.id.0,
            r.build.job,
            status_name(r.build.build_status),
            outs.join(" ")
        );
        for s in &r.steps {
            let how = match (s.status, s.resolved_to_step) {
                (Some(BuildStatus::Resolved), Some(to)) => format!("resolved -> step {to}"),
                (Some(BuildStatus::Success), _) if s.times_built.unwrap_or(0) > 0 => {
                    format!("built on {}", s.machine)
                }
                (Some(BuildStatus::Success), _) => "cached (already built)".into(),
                _ => String::new(),
            };
            let by: Vec<String> = r
                .produced
                .iter()
                .filter(|l| l.produced_build == r.build.id && l.produced_step == s.stepnr)
                .map(|l| match l.build == r.build.id {
                    true => format!("step {}^{}", l.stepnr, l.output),
                    false => format!("build {} step {}^{}", l.build, l.stepnr, l.output),
                })
                .collect();
            let how = match (how.is_empty(), by.is_empty()) {
                (_, true) => how,
                (true, false) => format!("produced by {}", by.join(", ")),
                (false, false) => format!("{how}; produced by {}", by.join(", ")),
            };
            let _ = writeln!(
                t,
                "  step {:<3} {:<52} {:<16} {}",
                s.stepnr,
                base(&s.drv_path),
                status_name(s.status),
                how
            );
            if let (Some(st), Some(msg)) = (s.status, &s.error_msg) {
                if st != BuildStatus::Success {
                    for line in msg
                        .lines()
                        .rev()
                        .take(10)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                    {
                        let _ = writeln!(t, "      | {line}");
                    }
                }
            }
        }
    }
    t
}

/// Opens the store the configuration names.
pub async fn open_store(ctx: &Context) -> anyhow::Result<Arc<crate::store::local::LocalStore>> {
    let dir = StoreDir::new(ctx.config.store.dir.clone()).context("[store] dir")?;
    let store = crate::store::local::LocalStore::open(dir, ctx.store_root())
        .await
        .with_context(|| format!("opening the store at {}", ctx.store_root().display()))?;
    Ok(Arc::new(store))
}

/// Opens the database (one clear line and a non-zero exit when unreachable).
/// `[notify]` is checked first (a bad webhook is a clear error before anything is written), and
/// its webhooks given to the database, whose writes then queue their events.
pub async fn open_db(ctx: &Context) -> anyhow::Result<Db> {
    let notify = notify_settings(ctx)?;
    Ok(Db::connect_with(
        &ctx.config.database.url,
        crate::db::DbOptions {
            max_connections: ctx.config.database.max_connections,
            notify: notify.targets(),
            ..crate::db::DbOptions::default()
        },
    )
    .await?)
}

/// `[notify]`, checked.
pub fn notify_settings(ctx: &Context) -> anyhow::Result<crate::notify::NotifySettings> {
    Ok(crate::notify::NotifySettings::from_config(
        &ctx.config.notify,
    )?)
}

/// Starts the delivery of `[notify]`'s webhooks on `rt`.
pub fn start_notify(
    rt: &tokio::runtime::Handle,
    db: &Db,
    settings: &crate::notify::NotifySettings,
) -> anyhow::Result<()> {
    crate::notify::deliver::spawn(rt, db.clone(), settings).context("[notify]")?;
    Ok(())
}

pub fn local_machine(ctx: &Context) -> MachineInfo {
    let systems = if ctx.config.local_builder.systems.is_empty() {
        [crate::config::this_system(), "builtin".to_string()].into()
    } else {
        ctx.config.local_builder.systems.iter().cloned().collect()
    };
    MachineInfo {
        id: "localhost".into(),
        systems,
        supported_features: ctx.config.local_builder.features.iter().cloned().collect(),
        mandatory_features: ctx
            .config
            .local_builder
            .mandatory_features
            .iter()
            .cloned()
            .collect(),
        max_jobs: ctx.config.local_max_jobs() as u32,
        speed_factor: 1.0,
    }
}

/// The local builder's executor, as `[local_builder] executor` says.
pub fn local_executor(
    ctx: &Context,
    store: Arc<crate::store::LocalStore>,
) -> anyhow::Result<Arc<dyn Executor>> {
    match ctx.config.local_builder.executor.as_str() {
        "simulated" => Ok(Arc::new(
            crate::actors::machine::simulated::SimulatedExecutor::new(store),
        )),
        "native" => native_executor(ctx, store),
        other => {
            bail!("[local_builder] executor = {other:?}: expected \"native\" or \"simulated\"")
        }
    }
}

fn native_executor(
    ctx: &Context,
    store: Arc<crate::store::LocalStore>,
) -> anyhow::Result<Arc<dyn Executor>> {
    let cfg = crate::builder::executor::ExecutorConfig::from_config(&ctx.config, &ctx.state_dir);
    Ok(Arc::new(crate::builder::executor::NativeExecutor::new(
        store, cfg,
    )))
}

pub fn retry_policy(ctx: &Context) -> RetryPolicy {
    let s = &ctx.config.scheduler;
    RetryPolicy {
        max_tries: s.max_tries.max(1),
        interval: Duration::from_secs_f64(s.retry_interval_s.max(0.0)),
        backoff: s.retry_backoff,
    }
}

pub fn run(ctx: Context, args: RunArgs) -> anyhow::Result<ExitCode> {
    let system = actix_rt::System::new();
    system.block_on(run_async(ctx, args))
}

async fn run_async(ctx: Context, args: RunArgs) -> anyhow::Result<ExitCode> {
    let db = open_db(&ctx).await?;
    let store = open_store(&ctx).await?;
    let tops = targets_to_drvs(&*store, &args.targets).await?;
    // A bad `[cache]` (with an upload) is reported before anything is built.
    let publisher = upload_publisher(&ctx, store.clone())?;
    let clock = Arc::new(SystemClock);
    let ids = queue_builds(
        &db,
        &args.jobset,
        &tops,
        crate::actors::env::Clock::now(&*clock),
        &DefaultLimits::of(&ctx.config.scheduler),
    )
    .await?;
    let mut env = Env::new(db.clone(), store.clone(), clock, retry_policy(&ctx));
    env.max_silent = Duration::from_secs(ctx.config.scheduler.max_silent_time_s);
    env.timeout = Duration::from_secs(ctx.config.scheduler.build_timeout_s);
    env.scheduling = ctx.config.scheduler.scheduling();
    let executor = local_executor(&ctx, store.clone())?;
    env.runs_ledger = Some(ctx.state_dir.join("runs.log"));
    let io = crate::actors::env::io_runtime().context("starting the I/O runtime")?;
    env.db.run_batches_on(io.clone());
    let notify = notify_settings(&ctx)?;
    start_notify(&io, &db, &notify)?;
    env.io = Some(io);
    let env = Arc::new(env);
    let mut events = env.events.subscribe();
    let machines = if ctx.config.local_builder.enabled {
        vec![(local_machine(&ctx), executor)]
    } else {
        vec![]
    };
    let (_sched, recovery) = Scheduler::start(
        env.clone(),
        machines,
        Duration::from_secs(ctx.config.scheduler.unsupported_wait_s),
    )
    .await?;
    if recovery.aborted > 0 || recovery.resolutions > 0 {
        eprintln!(
            "recovered: {} busy step(s) aborted and retried, {} recorded resolution(s) re-attached",
            recovery.aborted, recovery.resolutions
        );
    }
    // Wait for our builds, with a progress line on a terminal.
    let mut pending: std::collections::BTreeSet<i64> = std::collections::BTreeSet::new();
    for id in &ids {
        if !persist("read build", || db.get_build(*id)).await?.finished {
            pending.insert(id.0);
        }
    }
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while !pending.is_empty() {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(SchedEvent::BuildFinished { build, .. }) => { pending.remove(&build); }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for id in pending.clone() {
                        if persist("read build", || db.get_build(BuildId(id))).await?.finished { pending.remove(&id); }
                    }
                }
                Err(_) => break,
            },
            _ = tick.tick() => {
                if tty {
                    let s = &env.stats;
                    eprint!("\r\x1b[2Kbuilds left {} | steps built {} running {} queued {} failed {} | resolved {} | cached {}",
                        pending.len(), Stats::get(&s.steps_built), Stats::get(&s.steps_running), Stats::get(&s.steps_runnable),
                        Stats::get(&s.steps_failed), Stats::get(&s.resolutions), Stats::get(&s.early_cutoffs));
                }
            }
        }
    }
    if tty {
        eprint!("\r\x1b[2K");
    }
    if let Some(p) = publisher {
        publish_once(p).await?;
    }
    let ok = print_reports(&report(&db, &ids).await?, args.json);
    if !notify.webhooks.is_empty() {
        // This run's events are delivered before it exits (what is left, by the next start).
        let left = crate::notify::deliver::drain(&db, &notify)
            .await
            .context("waiting for the notifications to be delivered")?;
        if left > 0 {
            eprintln!(
                "qr run: {left} notification(s) not delivered yet; the next `qr serve` or `qr run` delivers them"
            );
        }
    }
    actix_rt::System::current().stop();
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The `file://` publisher `[cache] upload` asks for, if any.
fn upload_publisher(
    ctx: &Context,
    store: Arc<crate::store::LocalStore>,
) -> anyhow::Result<Option<crate::cache::publish::Publisher>> {
    if ctx.config.cache.upload.is_empty() {
        return Ok(None);
    }
    let log_dirs = vec![
        crate::builder::executor::ExecutorConfig::from_config(&ctx.config, &ctx.state_dir).log_dir,
    ];
    let cache = crate::cache::setup::cache_from_config(&ctx.config.cache, store, log_dirs)?;
    crate::cache::setup::publisher(&ctx.config.cache, &cache)
}

/// One publisher pass, so what this run realised is in the `file://` cache when it exits.
async fn publish_once(mut p: crate::cache::publish::Publisher) -> anyhow::Result<()> {
    let done = p
        .pass()
        .await
        .with_context(|| format!("publishing to {}", p.dir().display()))?;
    tracing::info!(realisations = done.realisations, paths = done.paths, logs = done.logs,
        dir = %p.dir().display(), "published to the binary cache");
    Ok(())
}
