//! Aggregate builds (Hydra's aggregate jobs, e.g. nixpkgs' `tested`): a build with recorded
//! constituents (`aggregateconstituents`, written by `qr submit --eval-jobs`) succeeds only when
//! every constituent build does.
//!
//! The queue monitor holds an aggregate back — no build actor, nothing expanded — while any
//! constituent is unfinished. When one has failed (any status but Success), the aggregate ends at
//! once as DepFailed (2), as in Hydra, where the aggregate's drv depends on its constituents and a
//! failed dependency makes it DepFailed; a step row for the aggregate's drv says which
//! constituent failed (`propagatedfrom`). When all succeeded, it is built like any other build.
//! The decision is [`gate`], a plain function; [`fail`] performs the failure.

use std::collections::{BTreeMap, BTreeSet};

use crate::actors::env::{Env, SchedEvent, Stats, persist};
use crate::db::types::{Build, BuildId, BuildStatus, FinishBuild, NewStep};
use crate::db::{ConstituentState, DbError};

/// What to do with an unfinished aggregate build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Every constituent succeeded: build it.
    Ready,
    /// These constituents are unfinished (and none failed yet): hold it back.
    Waiting(BTreeSet<i64>),
    /// This constituent (the lowest id among the failed ones) ended with this status.
    Failed {
        constituent: BuildId,
        status: BuildStatus,
    },
}

/// The gate of one aggregate from the states of its constituents. A failed constituent decides at
/// once, even while others still run.
pub fn gate(states: &[ConstituentState]) -> Gate {
    let failed = states
        .iter()
        .filter(|s| s.finished && s.status != Some(BuildStatus::Success))
        .min_by_key(|s| s.constituent);
    if let Some(f) = failed {
        return Gate::Failed {
            constituent: f.constituent,
            // A finished build always has a status (schema check); Failed if one had none.
            status: f.status.unwrap_or(BuildStatus::Failed),
        };
    }
    let waiting: BTreeSet<i64> = states
        .iter()
        .filter(|s| !s.finished)
        .map(|s| s.constituent.0)
        .collect();
    if waiting.is_empty() {
        Gate::Ready
    } else {
        Gate::Waiting(waiting)
    }
}

/// The gates of the aggregates among `states` (rows of several aggregates), by aggregate id.
pub fn gates(states: &[ConstituentState]) -> BTreeMap<i64, Gate> {
    let mut by: BTreeMap<i64, Vec<ConstituentState>> = BTreeMap::new();
    for s in states {
        by.entry(s.aggregate.0).or_default().push(*s);
    }
    by.into_iter().map(|(a, v)| (a, gate(&v))).collect()
}

/// The message of the aggregate's DepFailed step.
pub fn failure_message(constituent: BuildId, status: BuildStatus) -> String {
    format!("constituent build {constituent} of this aggregate ended {status:?}")
}

/// Ends an aggregate build as DepFailed because `constituent` ended with `status`: a finished
/// step row for its drv (DepFailed, `propagatedfrom` the constituent, the reason as its error),
/// then the build row; the build-finished event is sent as a build actor sends it.
pub async fn fail(
    env: &Env,
    build: &Build,
    constituent: BuildId,
    status: BuildStatus,
) -> Result<(), DbError> {
    let now = env.now();
    let message = failure_message(constituent, status);
    tracing::info!(build = build.id.0, job = %build.job, constituent = constituent.0, status = ?status, "aggregate failed: a constituent did not succeed");
    // A runner that stopped between the two writes left the step row: it is not written twice.
    let steps = persist("read the aggregate's steps", || {
        env.db.steps_of_build(build.id)
    })
    .await?;
    let recorded = steps.iter().any(|s| {
        s.status == Some(BuildStatus::DepFailed) && s.propagated_from == Some(constituent)
    });
    if !recorded {
        let mut s = NewStep::build(&build.drv_path, &build.system);
        s.status = Some(BuildStatus::DepFailed);
        s.error_msg = Some(message);
        s.start_time = Some(now);
        s.stop_time = Some(now);
        s.propagated_from = Some(constituent);
        persist("record the aggregate's failed step", || {
            env.db.create_step(build.id, &s)
        })
        .await?;
    }
    let f = FinishBuild {
        build: build.id,
        status: BuildStatus::DepFailed,
        start_time: None,
        stop_time: now,
        is_cached: false,
        outputs: vec![],
    };
    if persist("finish the aggregate", || env.db.finish_build(&f)).await? {
        Stats::inc(&env.stats.builds_finished);
        crate::metrics::global()
            .builds
            .finished(BuildStatus::DepFailed.code());
        env.emit(SchedEvent::BuildFinished {
            build: build.id.0,
            status: BuildStatus::DepFailed.code(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(c: i64, finished: bool, status: Option<BuildStatus>) -> ConstituentState {
        ConstituentState {
            aggregate: BuildId(100),
            constituent: BuildId(c),
            finished,
            status,
        }
    }

    #[test]
    fn all_succeeded_is_ready() {
        let ok = Some(BuildStatus::Success);
        assert_eq!(gate(&[st(1, true, ok), st(2, true, ok)]), Gate::Ready);
        assert_eq!(gate(&[]), Gate::Ready);
    }

    #[test]
    fn unfinished_constituents_hold_it_back() {
        let ok = Some(BuildStatus::Success);
        assert_eq!(
            gate(&[st(1, true, ok), st(2, false, None), st(3, false, None)]),
            Gate::Waiting([2, 3].into())
        );
    }

    #[test]
    fn a_failed_constituent_decides_at_once() {
        let g = gate(&[
            st(1, false, None),
            st(4, true, Some(BuildStatus::Cancelled)),
            st(3, true, Some(BuildStatus::Failed)),
            st(2, true, Some(BuildStatus::Success)),
        ]);
        assert_eq!(
            g,
            Gate::Failed {
                constituent: BuildId(3),
                status: BuildStatus::Failed
            }
        );
    }

    #[test]
    fn rows_of_several_aggregates_are_gated_apart() {
        let mut rows = vec![st(1, true, Some(BuildStatus::Success))];
        rows.push(ConstituentState {
            aggregate: BuildId(200),
            ..st(2, false, None)
        });
        let g = gates(&rows);
        assert_eq!(g[&100], Gate::Ready);
        assert_eq!(g[&200], Gate::Waiting([2].into()));
    }
}
