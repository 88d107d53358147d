//! `qr submit [--wait] [--json] TARGET…`: queues builds into the database for a running `qr serve`
//! (PostgreSQL notifies it; on SQLite its periodic rescan picks them up). With `--wait`, waits for
//! them to finish and prints them as `qr run` does (exit 1 if any failed).
//!
//! `qr submit --eval-jobs FILE|-` reads nix-eval-jobs' JSON lines instead (`cli::eval_jobs`): one
//! build per job, named by its attr, in `--jobset`; drvs missing from qr's store are imported with
//! their closures from `--from DIR` (default: the logical store dir, when it is a directory); each
//! submit is one evaluation (`qr admin evals`). Lines that queue nothing are reported on stderr and
//! recorded with the evaluation; the exit status is then 1.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

use super::Context;
use super::eval_jobs::{self, LineError, Parsed};
use super::run::{
    DefaultLimits, open_db, open_store, print_reports, queue_builds, report, report_json,
    report_table, targets_to_drvs,
};
use crate::actors::env::persist;
use crate::db::types::{BuildId, BuildStatus};
use crate::db::{Db, EvalError, NewEval, NewEvalJob};
use crate::store::{LocalStore, Store};

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// Wait until the builds finish, then print them.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON (one object per build).
    #[arg(long)]
    pub json: bool,
    /// Give up waiting after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
    /// Jobset the builds are queued in.
    #[arg(long, default_value = "qr-submit")]
    pub jobset: String,
    /// Read nix-eval-jobs' JSON lines from FILE (`-`: standard input): one build per job.
    #[arg(long, value_name = "FILE", conflicts_with = "targets")]
    pub eval_jobs: Option<String>,
    /// With --eval-jobs: the directory laid out as a store that drvs missing from qr's store are
    /// imported from (default: the logical store dir, e.g. /nix/store, when it is a directory).
    #[arg(long, value_name = "DIR", requires = "eval_jobs")]
    pub from: Option<PathBuf>,
    /// `.drv` store paths in the configured store, or JSON files of derivations.
    #[arg(required_unless_present = "eval_jobs", value_name = "TARGET")]
    pub targets: Vec<String>,
}

pub fn run(ctx: Context, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(submit(ctx, args))
}

async fn submit(ctx: Context, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    if let Some(file) = args.eval_jobs.clone() {
        return submit_eval_jobs(ctx, args, &file).await;
    }
    let db = open_db(&ctx).await?;
    let store = open_store(&ctx).await?;
    let tops = targets_to_drvs(&*store, &args.targets).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let limits = DefaultLimits::of(&ctx.config.scheduler);
    let ids = queue_builds(&db, &args.jobset, &tops, now, &limits).await?;
    if !args.wait {
        for (id, (path, _)) in ids.iter().zip(&tops) {
            if args.json {
                println!("{}", serde_json::json!({"id": id.0, "drvPath": path}));
            } else {
                println!("build {} {path}", id.0);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    wait_for(&db, &ids, args.timeout).await?;
    let ok = print_reports(&report(&db, &ids).await?, args.json);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Waits until every build of `ids` is finished (`timeout` seconds, 0: forever).
async fn wait_for(db: &Db, ids: &[BuildId], timeout: u64) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let mut all = true;
        for id in ids {
            if !persist("read build", || db.get_build(*id)).await?.finished {
                all = false;
                break;
            }
        }
        if all {
            return Ok(());
        }
        if timeout > 0 && start.elapsed() > Duration::from_secs(timeout) {
            anyhow::bail!("the builds did not finish within {timeout} s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads FILE, or standard input for `-`.
fn read_input(file: &str) -> anyhow::Result<Vec<u8>> {
    if file == "-" {
        let mut v = Vec::new();
        std::io::stdin()
            .read_to_end(&mut v)
            .context("reading nix-eval-jobs' lines from standard input")?;
        Ok(v)
    } else {
        std::fs::read(file).with_context(|| format!("reading {file}"))
    }
}

/// Where missing drvs come from: `--from`, else the logical store dir when it is a directory
/// other than qr's own store.
fn import_dir(args: &SubmitArgs, store: &LocalStore) -> Option<PathBuf> {
    if let Some(d) = &args.from {
        return Some(d.clone());
    }
    let logical = Path::new(store.store_dir().as_str());
    let own = std::fs::canonicalize(store.root()).ok();
    (logical.is_dir() && std::fs::canonicalize(logical).ok() != own).then(|| logical.to_path_buf())
}

/// Makes `job`'s drv valid in qr's store (importing its closure from `from`) and returns the
/// build it needs; the error is the line's.
async fn prepare_job(
    store: &LocalStore,
    from: Option<&Path>,
    job: &eval_jobs::Job,
    defaults: &DefaultLimits,
) -> Result<NewEvalJob, String> {
    let drv = &job.drv_path;
    let valid = store
        .is_valid_path(drv)
        .await
        .map_err(|e| format!("cannot look up {drv} in the store: {e}"))?;
    if !valid {
        let Some(dir) = from else {
            return Err(format!(
                "{drv} is not in qr's store and there is nothing to import it from (pass --from DIR)"
            ));
        };
        store
            .import_from_dir(dir, std::slice::from_ref(drv))
            .await
            .map_err(|e| format!("cannot import {drv} from {}: {e}", dir.display()))?;
    }
    let d = store
        .read_derivation(drv)
        .await
        .map_err(|e| format!("cannot read {drv}: {e}"))?;
    Ok(NewEvalJob {
        job: job.attr.clone(),
        drv_path: drv.clone(),
        system: d.system.clone(),
        outputs: d
            .outputs
            .iter()
            .map(|(o, out)| (o.clone(), out.path().map(str::to_string)))
            .collect(),
        constituents: vec![],
        max_silent: job.limits.max_silent.map_or(defaults.max_silent, seconds),
        timeout: job.limits.timeout.map_or(defaults.timeout, seconds),
        repo: job.repo.clone(),
        rev: job.rev.clone(),
    })
}

/// A limit the parser bounded to the column's range.
fn seconds(s: u32) -> i32 {
    i32::try_from(s).unwrap_or(i32::MAX)
}

/// A line error on stderr: `line N (job A): message` (a message of several lines indented).
fn print_error(e: &LineError) {
    let head = match &e.attr {
        Some(a) => format!("line {} (job {a})", e.line),
        None => format!("line {}", e.line),
    };
    let mut lines = e.message.lines();
    eprintln!("qr: {head}: {}", lines.next().unwrap_or(""));
    for l in lines.filter(|l| !l.trim().is_empty()) {
        eprintln!("    {l}");
    }
}

async fn submit_eval_jobs(ctx: Context, args: SubmitArgs, file: &str) -> anyhow::Result<ExitCode> {
    let input = read_input(file)?;
    let db = open_db(&ctx).await?;
    let store = open_store(&ctx).await?;
    let from = import_dir(&args, &store);
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    let mut prepared = std::collections::HashMap::new();
    let defaults = DefaultLimits::of(&ctx.config.scheduler);
    for p in eval_jobs::parse(&input, store.store_dir()) {
        match p {
            Parsed::Error(e) => errors.push(e),
            Parsed::Job(j) => match prepare_job(&store, from.as_deref(), &j, &defaults).await {
                Ok(nj) => {
                    prepared.insert(j.attr.clone(), nj);
                    jobs.push(j);
                }
                Err(message) => errors.push(LineError {
                    line: j.line,
                    attr: Some(j.attr),
                    message,
                }),
            },
        }
    }
    let resolved = eval_jobs::resolve_constituents(jobs, errors);
    for w in &resolved.warnings {
        eprintln!("qr: warning: {w}");
    }
    for e in &resolved.errors {
        print_error(e);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let eval = NewEval {
        jobset: args.jobset.clone(),
        timestamp: now,
        source: if file == "-" {
            "-".into()
        } else {
            std::fs::canonicalize(file)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| file.to_string())
        },
        jobs: resolved
            .jobs
            .iter()
            .filter_map(|(j, cs)| {
                prepared.remove(&j.attr).map(|mut nj| {
                    nj.constituents = cs.clone();
                    nj
                })
            })
            .collect(),
        errors: resolved
            .errors
            .iter()
            .map(|e| EvalError {
                line: e.line as i64,
                job: e.attr.clone(),
                message: e.message.clone(),
            })
            .collect(),
    };
    let rec = persist("record the evaluation", || db.record_eval(&eval))
        .await
        .context("recording the evaluation")?;
    let new = rec.members.iter().filter(|m| m.is_new).count();
    eprintln!(
        "evaluation {} of jobset {}: {} jobs, {} new builds, {} existing, {} errors",
        rec.id,
        args.jobset,
        rec.members.len(),
        new,
        rec.members.len() - new,
        eval.errors.len()
    );
    let clean = eval.errors.is_empty();
    if !args.wait {
        for (m, j) in rec.members.iter().zip(&eval.jobs) {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"eval": rec.id, "id": m.build.0, "job": m.job,
                        "drvPath": j.drv_path, "isNew": m.is_new})
                );
            } else {
                let how = if m.is_new { "new" } else { "existing" };
                println!("build {} {} {} ({how})", m.build.0, m.job, j.drv_path);
            }
        }
        return Ok(if clean {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let ids: Vec<BuildId> = rec
        .members
        .iter()
        .map(|m| m.build)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    wait_for(&db, &ids, args.timeout).await?;
    let reports = report(&db, &ids).await?;
    let mut ok = clean;
    for m in &rec.members {
        let Some(r) = reports.iter().find(|r| r.build.id == m.build) else {
            continue;
        };
        ok &= r.build.build_status == Some(BuildStatus::Success);
        if args.json {
            let mut v = report_json(r);
            v["job"] = m.job.clone().into();
            v["isNew"] = m.is_new.into();
            v["eval"] = rec.id.into();
            println!("{v}");
        } else {
            print!("{}", report_table(std::slice::from_ref(r)));
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
