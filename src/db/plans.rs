//! Query plans of the hot queries, so tests (and operators) can check that none of them scans a
//! whole table: SQLite's `EXPLAIN QUERY PLAN`, PostgreSQL's `EXPLAIN (COSTS OFF)` with
//! `enable_seqscan = off` (a sequential scan then appears only where no index can serve).

use super::error::DbError;
use super::{Backend, Db, Pool, sql};

/// One hot query and its plan, one line per plan node (indented by depth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryPlan {
    pub name: &'static str,
    pub sql: String,
    pub plan: Vec<String>,
}

/// Partial indexes whose full scan is the intended plan: they hold only live rows (unfinished
/// builds, busy steps, steps without a status), never history. (`indexbuildstepsonresolvedtostep`
/// is not one: it holds every Resolved row ever written, and is only probed by build.)
pub const BOUNDED_INDEXES: [&str; 3] = [
    "indexbuildsonunfinished",
    "indexbuildstepsonbusy",
    "indexbuildstepsonpending",
];

impl QueryPlan {
    /// The plan lines that read a whole table: a sequential scan, or a scan of a whole index
    /// (no index condition) that is not one of [`BOUNDED_INDEXES`]. Empty for a good plan.
    pub fn full_scans(&self, backend: Backend) -> Vec<&str> {
        let bounded = |l: &str| BOUNDED_INDEXES.iter().any(|i| l.contains(i));
        let mut bad = Vec::new();
        for (n, line) in self.plan.iter().enumerate() {
            let l = line.trim();
            let full = match backend {
                Backend::Sqlite => {
                    // "SCAN t", "SCAN t USING [COVERING] INDEX i": every row of t or of i.
                    l.starts_with("SCAN ") && !l.starts_with("SCAN CONSTANT ROW") && !bounded(l)
                }
                Backend::Postgres => {
                    let node = l.trim_start_matches("->").trim();
                    if node.starts_with("Seq Scan") {
                        true
                    } else if node.contains("Index Scan") || node.contains("Index Only Scan") {
                        // An index scan without an "Index Cond" among its detail lines (the
                        // following lines indented deeper, up to the next node) reads it all.
                        let indent = line.len() - line.trim_start().len();
                        let has_cond = self.plan[n + 1..]
                            .iter()
                            .take_while(|d| {
                                let t = d.trim_start();
                                d.len() - t.len() > indent && !t.starts_with("->")
                            })
                            .any(|d| d.contains("Index Cond"));
                        !has_cond && !bounded(node)
                    } else {
                        false
                    }
                }
            };
            if full {
                bad.push(l);
            }
        }
        bad
    }
}

enum P {
    I64(i64),
    I32(i32),
    Text(&'static str),
    Texts(Vec<String>),
}

fn hot_queries(backend: Backend) -> Vec<(&'static str, String, Vec<P>)> {
    use P::*;
    let b = || I64(1);
    let s = || I32(1);
    let drv = || Text("/nix/store/00000000000000000000000000000000-x.drv");
    let mut q: Vec<(&'static str, String, Vec<P>)> = vec![
        ("unfinished_builds", sql::UNFINISHED_BUILDS.into(), vec![]),
        (
            "unfinished_builds_since",
            sql::UNFINISHED_BUILDS_SINCE.into(),
            vec![b()],
        ),
        ("get_build", sql::GET_BUILD.into(), vec![b()]),
        ("build_outputs", sql::BUILD_OUTPUTS.into(), vec![b()]),
        (
            "finish_build",
            sql::FINISH_BUILD.into(),
            vec![b(), I32(0), I64(0), I64(0), I32(0)],
        ),
        (
            "cancel_build",
            sql::CANCEL_BUILD.to_string(),
            vec![b(), I64(0)],
        ),
        ("restart_build", sql::RESTART_BUILD.into(), vec![b()]),
        (
            "restart_build: clear failed drvs",
            sql::CLEAR_FAILED_STEP_DRVS.into(),
            vec![b()],
        ),
        (
            "restart_build: clear failed outputs",
            sql::CLEAR_FAILED_STEP_OUTPUTS.into(),
            vec![b()],
        ),
        ("bump_build", sql::BUMP_BUILD.into(), vec![b(), I32(1)]),
        (
            "allocate step numbers",
            sql::ALLOC_STEPNRS.into(),
            vec![b(), I32(1)],
        ),
        ("step", sql::STEP.into(), vec![b(), s()]),
        ("step status", sql::STEP_STATUS.into(), vec![b(), s()]),
        ("steps_of_build", sql::STEPS_OF_BUILD.into(), vec![b()]),
        ("step_outputs", sql::STEP_OUTPUTS.into(), vec![b(), s()]),
        (
            "start_step",
            sql::START_STEP.into(),
            vec![b(), s(), I32(30), Text("m"), I64(0)],
        ),
        (
            "set_step_busy",
            sql::SET_STEP_BUSY.into(),
            vec![b(), s(), I32(30)],
        ),
        (
            "finish_step",
            sql::FINISH_STEP.to_string(),
            vec![b(), s(), I32(0), Text("e"), I64(0), I32(1), Text("m")],
        ),
        (
            "resolve_step: mark original",
            sql::MARK_RESOLVED.to_string(),
            vec![b(), s(), I64(0), I32(2)],
        ),
        (
            "steps_resolved_to",
            sql::STEPS_RESOLVED_TO.to_string(),
            vec![b(), s()],
        ),
        ("busy_steps", sql::BUSY_STEPS.to_string(), vec![]),
        (
            "abort_busy_steps",
            sql::ABORT_BUSY_STEPS.to_string(),
            vec![I64(0), Text("aborted")],
        ),
        (
            "abort_busy_steps: stray",
            sql::CLEAR_STRAY_BUSY.to_string(),
            vec![],
        ),
        (
            "abort_steps",
            sql::ABORT_STEP.to_string(),
            vec![b(), s(), I64(0), Text("aborted")],
        ),
        (
            "abort_steps: stray",
            sql::CLEAR_FINISHED_BUSY.to_string(),
            vec![],
        ),
        (
            "resolved_steps",
            match backend {
                Backend::Sqlite => sql::RESOLVED_STEPS_SQLITE.to_string(),
                Backend::Postgres => sql::RESOLVED_STEPS_PG.to_string(),
            },
            vec![],
        ),
        (
            "pending_targets_of_finished",
            sql::PENDING_TARGETS_OF_FINISHED.to_string(),
            vec![],
        ),
        (
            "count_unfinished_builds",
            sql::COUNT_UNFINISHED_BUILDS.into(),
            vec![],
        ),
        (
            "jobset_seconds_since",
            sql::JOBSET_SECONDS.into(),
            // A recent window.
            vec![I64(1_700_000_000)],
        ),
        (
            "recent_step_durations",
            sql::RECENT_STEP_DURATIONS.to_string(),
            vec![I64(1_700_000_000), I64(50_000)],
        ),
        (
            "is_failed_path",
            sql::IS_FAILED_PATH.into(),
            vec![Text("/nix/store/x")],
        ),
        (
            "realisation",
            sql::REALISATION.into(),
            vec![drv(), Text("out")],
        ),
        (
            "realisations_for_drv",
            sql::REALISATIONS_FOR_DRV.into(),
            vec![drv()],
        ),
        (
            "record_eval: existing build of a drv",
            super::evals::EXISTING_BUILD.into(),
            vec![Text("main"), drv()],
        ),
        (
            "unfinished_aggregates",
            match backend {
                Backend::Sqlite => super::evals::UNFINISHED_AGGREGATES.into(),
                Backend::Postgres => super::evals::UNFINISHED_AGGREGATES_PG.into(),
            },
            vec![I64(0)],
        ),
        (
            "constituents_of",
            super::evals::CONSTITUENTS_OF.into(),
            vec![b()],
        ),
        (
            "eval: members",
            super::evals::EVAL_MEMBERS.into(),
            vec![b()],
        ),
    ];
    q.push(match backend {
        Backend::Postgres => (
            "failed_paths_among",
            sql::FAILED_PATHS_AMONG_PG.into(),
            vec![Texts(vec!["/nix/store/a".into(), "/nix/store/b".into()])],
        ),
        Backend::Sqlite => (
            "failed_paths_among",
            sql::failed_paths_among_sqlite(2),
            vec![Text("/nix/store/a"), Text("/nix/store/b")],
        ),
    });
    q
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;
type PgQueryScalar<'q> =
    sqlx::query::QueryScalar<'q, sqlx::Postgres, String, sqlx::postgres::PgArguments>;

/// Binds `params` to an SQLite query (it has no array parameters: the caller spells them out).
fn bind_sqlite<'q>(mut q: SqliteQuery<'q>, params: &'q [P]) -> SqliteQuery<'q> {
    for p in params {
        q = match p {
            P::I64(x) => q.bind(*x),
            P::I32(x) => q.bind(*x),
            P::Text(x) => q.bind(*x),
            P::Texts(_) => q,
        };
    }
    q
}

/// Binds `params` to a PostgreSQL query.
fn bind_pg<'q>(mut q: PgQueryScalar<'q>, params: &'q [P]) -> PgQueryScalar<'q> {
    for p in params {
        q = match p {
            P::I64(x) => q.bind(*x),
            P::I32(x) => q.bind(*x),
            P::Text(x) => q.bind(*x),
            P::Texts(v) => q.bind(v),
        };
    }
    q
}

impl Db {
    /// The plans of the runner's hot queries on this database.
    pub async fn explain_hot_queries(&self) -> Result<Vec<QueryPlan>, DbError> {
        let backend = self.backend();
        let mut out = Vec::new();
        match &self.inner.pool {
            Pool::Sqlite(pool) => {
                use sqlx::Row;
                for (name, sql, params) in hot_queries(backend) {
                    let text = format!("EXPLAIN QUERY PLAN {sql}");
                    let rows = bind_sqlite(sqlx::query(&text), &params)
                        .fetch_all(pool)
                        .await?;
                    // (id, parent, notused, detail); indent by depth.
                    let mut depth: Vec<(i64, usize)> = Vec::new();
                    let mut plan = Vec::new();
                    for r in rows {
                        let id: i64 = r.try_get(0)?;
                        let parent: i64 = r.try_get(1)?;
                        let detail: String = r.try_get(3)?;
                        let d = depth
                            .iter()
                            .find(|(i, _)| *i == parent)
                            .map_or(0, |(_, d)| d + 1);
                        depth.push((id, d));
                        plan.push(format!("{}{}", "  ".repeat(d), detail));
                    }
                    out.push(QueryPlan { name, sql, plan });
                }
            }
            Pool::Postgres(pool, _) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SET LOCAL enable_seqscan = off")
                    .execute(&mut *tx)
                    .await?;
                for (name, sql, params) in hot_queries(backend) {
                    let text = format!("EXPLAIN (COSTS OFF) {sql}");
                    let plan: Vec<String> = bind_pg(sqlx::query_scalar(&text), &params)
                        .fetch_all(&mut *tx)
                        .await?;
                    out.push(QueryPlan { name, sql, plan });
                }
                tx.rollback().await?;
            }
        }
        Ok(out)
    }
}

/// A recovery query run under `EXPLAIN ANALYZE` on a filled database (`qr bench
/// --restart-scale`): its plan with the rows and times it really saw.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AnalyzedPlan {
    pub name: &'static str,
    pub sql: String,
    pub plan: Vec<String>,
    /// The plan's "Execution Time", ms.
    pub execution_ms: f64,
    /// [`QueryPlan::full_scans`] of the plan: empty when nothing reads a whole table.
    pub full_scans: Vec<String>,
}

/// Resolved rows as recovery read them before `indexbuildstepsonpending`: every Resolved row of
/// the whole history, then one `get_build` per build to drop the finished ones. Kept to show
/// its plan beside the new one.
pub const RESOLVED_STEPS_BEFORE: &str = "select o.build, o.stepnr, r.build, r.stepnr, r.status \
     from buildsteps o join buildsteps r on r.build = o.build and r.stepnr = o.resolvedtostep \
     where o.status = 13";

/// What a start reads and writes before the queue is loaded, and the batched reads of loading it
/// (PostgreSQL text). `drvs`: a sample of queued drvs for the batched lookups.
fn recovery_queries(drvs: &[String], now: i64) -> Vec<(&'static str, String, Vec<P>)> {
    use P::*;
    vec![
        (
            "abort_busy_steps",
            sql::ABORT_BUSY_STEPS.to_string(),
            vec![I64(now), Text("aborted: explain")],
        ),
        (
            "abort_busy_steps: stray",
            sql::CLEAR_STRAY_BUSY.to_string(),
            vec![],
        ),
        ("busy_steps (carried)", sql::BUSY_STEPS.to_string(), vec![]),
        ("resolved_steps", sql::RESOLVED_STEPS_PG.to_string(), vec![]),
        (
            "resolved_steps before (whole history)",
            RESOLVED_STEPS_BEFORE.into(),
            vec![],
        ),
        (
            "pending_targets_of_finished",
            sql::PENDING_TARGETS_OF_FINISHED.to_string(),
            vec![],
        ),
        ("jobsets", sql::JOBSETS.into(), vec![]),
        ("unfinished_builds", sql::UNFINISHED_BUILDS.into(), vec![]),
        (
            "unfinished_aggregates",
            super::evals::UNFINISHED_AGGREGATES_PG.into(),
            vec![I64(0)],
        ),
        (
            "count_unfinished_builds",
            sql::COUNT_UNFINISHED_BUILDS.into(),
            vec![],
        ),
        (
            "failed_paths_among (queue load, per batch)",
            sql::FAILED_PATHS_AMONG_PG.into(),
            vec![Texts(drvs.to_vec())],
        ),
        (
            "realisations_for_drvs (queue load, per batch)",
            sql::REALISATIONS_FOR_DRVS_PG.into(),
            vec![Texts(drvs.to_vec())],
        ),
    ]
}

impl Db {
    /// `EXPLAIN (ANALYZE, COSTS OFF)` of every recovery query (PostgreSQL), in one transaction
    /// that is rolled back (the writes among them change nothing). `drvs`: queued drvs for the
    /// batched lookups; `now`: the abort's stop time.
    pub async fn explain_recovery(
        &self,
        drvs: &[String],
        now: i64,
    ) -> Result<Vec<AnalyzedPlan>, DbError> {
        let Pool::Postgres(pool, _) = &self.inner.pool else {
            return Err(DbError::Invalid(
                "explain_recovery runs on PostgreSQL".into(),
            ));
        };
        let mut tx = pool.begin().await?;
        let mut out = Vec::new();
        for (name, sql, params) in recovery_queries(drvs, now) {
            let text = format!("EXPLAIN (ANALYZE, COSTS OFF) {sql}");
            let plan: Vec<String> = bind_pg(sqlx::query_scalar(&text), &params)
                .fetch_all(&mut *tx)
                .await?;
            let execution_ms = plan
                .iter()
                .find_map(|l| l.trim().strip_prefix("Execution Time:"))
                .and_then(|v| v.trim().trim_end_matches("ms").trim().parse().ok())
                .unwrap_or(f64::NAN);
            let qp = QueryPlan {
                name,
                sql: sql.clone(),
                plan: plan.clone(),
            };
            let full_scans = qp
                .full_scans(Backend::Postgres)
                .into_iter()
                .map(str::to_string)
                .collect();
            out.push(AnalyzedPlan {
                name,
                sql,
                plan,
                execution_ms,
                full_scans,
            });
        }
        tx.rollback().await?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(lines: &[&str]) -> QueryPlan {
        QueryPlan {
            name: "t",
            sql: String::new(),
            plan: lines.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn detects_full_scans() {
        let bad = plan(&["SCAN buildsteps"]);
        assert_eq!(bad.full_scans(Backend::Sqlite), ["SCAN buildsteps"]);
        let bad = plan(&["SCAN b USING INDEX sqlite_autoindex_buildsteps_1"]);
        assert_eq!(bad.full_scans(Backend::Sqlite).len(), 1);
        let ok = plan(&[
            "SCAN builds USING INDEX indexbuildsonunfinished",
            "SEARCH buildsteps USING INDEX sqlite_autoindex_buildsteps_1 (build=?)",
            "  USE TEMP B-TREE FOR ORDER BY",
        ]);
        assert!(ok.full_scans(Backend::Sqlite).is_empty());
        let bad = plan(&["SCAN s USING COVERING INDEX indexbuildstepsonstoptime"]);
        assert_eq!(bad.full_scans(Backend::Sqlite).len(), 1);
        let bad = plan(&["Sort", "  ->  Seq Scan on buildsteps"]);
        assert_eq!(bad.full_scans(Backend::Postgres).len(), 1);
        let ok = plan(&[
            "Nested Loop",
            "  ->  Index Scan using buildsteps_pkey on buildsteps",
            "        Index Cond: ((build = 1) AND (stepnr = 1))",
            "  ->  Index Scan using indexbuildsonunfinished on builds",
        ]);
        assert!(ok.full_scans(Backend::Postgres).is_empty());
        let bad = plan(&[
            "Hash Join",
            "  ->  Bitmap Heap Scan on buildsteps s",
            "        Recheck Cond: (stoptime >= 0)",
            "        ->  Bitmap Index Scan on indexbuildstepsonstoptime",
            "              Index Cond: (stoptime >= 0)",
            "  ->  Hash",
            "        ->  Index Scan using indexbuildsonjobset on builds b",
            "  ->  Index Only Scan using builds_pkey on builds",
            "        Filter: (finished = 0)",
        ]);
        assert_eq!(
            bad.full_scans(Backend::Postgres),
            [
                "->  Index Scan using indexbuildsonjobset on builds b",
                "->  Index Only Scan using builds_pkey on builds"
            ]
        );
    }

    #[test]
    fn every_recovery_query_has_its_parameters() {
        for (name, sql, params) in recovery_queries(&["/nix/store/a".into()], 0) {
            let max = (1..=20)
                .filter(|i| sql.contains(&format!("${i}")))
                .max()
                .unwrap_or(0);
            assert_eq!(max, params.len(), "{name}");
        }
    }

    #[test]
    fn every_query_has_its_parameters() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            for (name, sql, params) in hot_queries(backend) {
                let max = (1..=20)
                    .filter(|i| sql.contains(&format!("${i}")))
                    .max()
                    .unwrap_or(0);
                let n = match params.first() {
                    Some(P::Texts(_)) => 1,
                    _ => params.len(),
                };
                assert_eq!(max, n, "{name}");
            }
        }
    }
}
