//! The build's I/O: the step rows it records and its own finish, each returning what the core
//! takes as the reply.

use std::sync::Arc;

use super::core::{BuildRow, Finish};
use crate::actors::env::{Env, SchedEvent, Stats, persist};
use crate::actors::types::Status;
use crate::db::DbError;
use crate::db::types::{BuildId, FinishBuild, NewStep};

/// As in Hydra: a step row for each cached failure met, and one saying where a failure another
/// build recorded was. Every row is tried; the first permanent error is returned (logged with the
/// build's fields).
pub async fn record_rows(
    env: Arc<Env>,
    build: BuildId,
    system: String,
    rows: Vec<BuildRow>,
) -> Result<(), String> {
    let now = env.now();
    let mut first = Ok(());
    for r in rows {
        let (s, what, drv) = match r {
            BuildRow::CachedFailure { drv } => {
                let mut s = NewStep::build(&drv, &system);
                s.status = Some(Status::CachedFailure);
                s.error_msg = Some("cached failure".into());
                (s, "record a cached failure", drv)
            }
            BuildRow::Propagated(o) => {
                let mut s = NewStep::build(&o.drv, &o.system);
                s.status = Some(o.status);
                s.error_msg = Some(o.message.clone());
                s.propagated_from = Some(BuildId(o.build));
                (s, "record a propagated failure", o.drv)
            }
        };
        let mut s = s;
        s.start_time = Some(now);
        s.stop_time = Some(now);
        if let Err(e) = persist("record a step row", || env.db.create_step(build, &s)).await {
            let m = write_failed(&env, build.0, what, &drv, &e);
            if first.is_ok() {
                first = Err(m);
            }
        }
    }
    first
}

/// Finishes the build row (only if unfinished), then counts and tells watchers.
pub async fn finish(env: Arc<Env>, id: BuildId, queued: i64, f: Finish) -> Result<(), String> {
    match &f.message {
        Some(m) => {
            tracing::info!(build = id.0, status = f.status.code(), message = %m, "build finished")
        }
        None => tracing::info!(build = id.0, status = f.status.code(), "build finished"),
    }
    let row = FinishBuild {
        build: id,
        status: f.status,
        start_time: None,
        stop_time: env.now(),
        is_cached: f.cached,
        outputs: f
            .outputs
            .into_iter()
            .map(|(o, p)| (o, Some(p)))
            .collect::<Vec<_>>(),
    };
    if let Err(e) = persist("finish build", || env.db.finish_build(&row)).await {
        return Err(write_failed(&env, id.0, "finish the build", "", &e));
    }
    Stats::inc(&env.stats.builds_finished);
    crate::metrics::global().builds.finished(f.status.code());
    env.stats
        .build_seconds
        .observe(std::time::Duration::from_secs(
            (row.stop_time - queued).max(0) as u64,
        ));
    env.emit(SchedEvent::BuildFinished {
        build: id.0,
        status: f.status.code(),
    });
    Ok(())
}

/// Logs a write of build `build` that failed for good (with the drv it concerned, if any),
/// counts it, and returns the message the build finishes with.
fn write_failed(env: &Env, build: i64, what: &str, drv: &str, e: &DbError) -> String {
    Stats::inc(&env.stats.db_write_failures);
    tracing::error!(build, drv, what, error = %e, "a database write failed for good");
    format!("cannot {what} in the database: {e}")
}
