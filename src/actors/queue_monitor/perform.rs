//! The queue monitor's I/O: each function returns the event its answer is.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::core::{In, Routes};
use crate::actors::aggregate;
use crate::actors::env::Env;
use crate::db::types::{Build, BuildId, BuildStatus};

/// The unfinished builds (all, or after `after`) and the gates of the aggregates among them,
/// with the jobsets' shares.
pub async fn read<R: Routes>(env: Arc<Env>, after: Option<BuildId>) -> In<R> {
    let check = crate::metrics::global().queue.check();
    let shares = match env.db.jobsets().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the jobsets' shares; keeping the ones known");
            Vec::new()
        }
    };
    let rows = match after {
        None => env.db.unfinished_builds().await,
        Some(id) => env.db.unfinished_builds_since(id).await,
    };
    // After the rows: an aggregate among them has its constituents recorded (one transaction), so
    // it is gated, never started early.
    let rows = match rows {
        Ok(rows) => env
            .db
            .unfinished_aggregates(after.unwrap_or(BuildId(0)))
            .await
            .map(|s| (rows, aggregate::gates(&s))),
        Err(e) => Err(e),
    };
    let rows = rows.map_err(|e| {
        tracing::error!(error = %e, "cannot read the queue; reading it again in a second");
        e.to_string()
    });
    check.finish(rows.as_ref().map(|(r, _)| r.len()));
    In::Read { shares, rows }
}

/// An aggregate looked at again: its row and its gate now.
pub async fn regate<R: Routes>(env: Arc<Env>, aggregate: i64) -> In<R> {
    let id = BuildId(aggregate);
    let result = async {
        let states = env.db.constituents_of(id).await?;
        let row = env.db.get_build(id).await?;
        Ok::<_, crate::db::DbError>((row, aggregate::gate(&states)))
    }
    .await
    .map_err(|e| {
        tracing::warn!(build = aggregate, error = %e, "cannot gate the aggregate again; the next rescan does");
        e.to_string()
    });
    In::Regated { aggregate, result }
}

/// Ends an aggregate as DepFailed.
pub async fn fail_aggregate<R: Routes>(
    env: Arc<Env>,
    row: Build,
    constituent: BuildId,
    status: BuildStatus,
) -> In<R> {
    if let Err(e) = aggregate::fail(&env, &row, constituent, status).await {
        tracing::error!(build = row.id.0, error = %e, "cannot end the aggregate as DepFailed; the next rescan tries again");
    }
    In::AggregateEnded(row.id.0)
}

/// Each build's global priority now, by id (a build not read is left out: logged).
pub async fn priorities(env: Arc<Env>, ids: Vec<i64>) -> BTreeMap<i64, i32> {
    let mut out = BTreeMap::new();
    for id in ids {
        match env.db.get_build(BuildId(id)).await {
            Ok(b) => {
                out.insert(id, b.global_priority);
            }
            Err(e) => tracing::warn!(build = id, error = %e, "cannot read the bumped build"),
        }
    }
    out
}
