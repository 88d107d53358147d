//! `qr submit [--wait] [--json] TARGET…`: queues builds into the database for a running `qr serve`
//! (PostgreSQL notifies it; on SQLite its periodic rescan picks them up). With `--wait`, waits for
//! them to finish and prints them as `qr run` does (exit 1 if any failed).

use std::process::ExitCode;
use std::time::Duration;

use super::Context;
use super::run::{
    open_db, open_store, queue_builds, report, report_json, report_table, targets_to_drvs,
};
use crate::actors::env::persist;
use crate::db::types::BuildStatus;

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
    /// `.drv` store paths in the configured store, or JSON files of derivations.
    #[arg(required = true, value_name = "TARGET")]
    pub targets: Vec<String>,
}

pub fn run(ctx: Context, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(submit(ctx, args))
}

async fn submit(ctx: Context, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let db = open_db(&ctx).await?;
    let store = open_store(&ctx).await?;
    let tops = targets_to_drvs(&*store, &args.targets).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let ids = queue_builds(&db, &args.jobset, &tops, now).await?;
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
    let start = std::time::Instant::now();
    loop {
        let mut all = true;
        for id in &ids {
            if !persist("read build", || db.get_build(*id)).await?.finished {
                all = false;
                break;
            }
        }
        if all {
            break;
        }
        if args.timeout > 0 && start.elapsed() > Duration::from_secs(args.timeout) {
            anyhow::bail!("the builds did not finish within {} s", args.timeout);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reports = report(&db, &ids).await?;
    if args.json {
        for r in &reports {
            println!("{}", report_json(r));
        }
    } else {
        print!("{}", report_table(&reports));
    }
    let ok = reports
        .iter()
        .all(|r| r.build.build_status == Some(BuildStatus::Success));
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
