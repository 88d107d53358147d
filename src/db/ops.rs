//! The typed operations of [`Db`]. Each runs under the retry wrapper; each that writes more
//! than one row is one transaction (SQLite: `BEGIN IMMEDIATE`, so the write lock is taken up
//! front and a transaction never fails half-way for a lock upgrade).

use sqlx::postgres::{PgPool, Postgres};
use sqlx::sqlite::{Sqlite, SqlitePool};
use std::sync::atomic::{AtomicI64, Ordering};

use sqlx::{Database, Transaction};

use super::batch::Outcome;
use super::error::{DbError, Transient};
use super::fault::FaultPoint;
use super::notify::QueueEvent;
use super::rows::RowExt;
use super::sql;
use super::types::{
    Build, BuildId, BuildStatus, BusyPhase, FinishBuild, FinishStep, Jobset, JobsetSeconds,
    NewBuild, NewStep, OutputRow, Realisation, RealisationConflict, ResolvedPair, Step, StepNr,
};
use super::{Db, on_pool};

/// Starting a write transaction, per backend.
pub(crate) trait WritePool {
    type Db: Database;
    async fn begin_write(&self) -> Result<Transaction<'static, Self::Db>, sqlx::Error>;
}

impl WritePool for SqlitePool {
    type Db = Sqlite;
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl WritePool for PgPool {
    type Db = Postgres;
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.begin().await
    }
}

/// The error an injected lost connection `when` ("before"/"after") `COMMIT` stands for.
fn lost_commit(when: &str) -> DbError {
    DbError::CommitOutcomeUnknown(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        format!("fault injected: connection lost {when} COMMIT"),
    )))
}

/// An error answering a commit: the database refusing it means it did not happen — except the
/// server going away (57P0x), which, like a lost connection, leaves the outcome unknown.
fn commit_error(e: sqlx::Error) -> DbError {
    match e {
        sqlx::Error::Database(_) if super::classify(&e) != Some(Transient::ConnectionLost) => {
            DbError::Sql(e)
        }
        e => DbError::CommitOutcomeUnknown(e),
    }
}

/// Commits; a connection lost during `COMMIT` leaves the outcome unknown, so it is reported as
/// such (and not retried) rather than as a transient error.
/// Counts the committed write transaction ([`Db::write_transactions`]).
pub(super) async fn commit<DB: Database>(
    db: &Db,
    tx: Transaction<'static, DB>,
) -> Result<(), DbError> {
    if db.fault(FaultPoint::CommitLostBefore).is_err() {
        drop(tx); // rolled back
        return Err(lost_commit("before"));
    }
    tx.commit().await.map_err(commit_error)?;
    db.count_write();
    if db.fault(FaultPoint::CommitLostAfter).is_err() {
        return Err(lost_commit("after"));
    }
    Ok(())
}

/// Runs one write statement in its own (implicit) transaction, as [`commit`] does a
/// transaction: an error that is not the database refusing it (the connection was lost while
/// the statement ran) leaves the outcome unknown; counted as a write transaction; the
/// commit-lost faults apply.
pub(super) async fn autocommit<T>(
    db: &Db,
    statement: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, DbError> {
    if db.fault(FaultPoint::CommitLostBefore).is_err() {
        return Err(lost_commit("before"));
    }
    let v = statement.await.map_err(|e| match e {
        // Not sent at all: nothing happened.
        e @ (sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed) => DbError::Sql(e),
        e => commit_error(e),
    })?;
    db.count_write();
    if db.fault(FaultPoint::CommitLostAfter).is_err() {
        return Err(lost_commit("after"));
    }
    Ok(v)
}

/// Outputs with unique names, as upserting them one by one leaves them: a later known path
/// replaces an earlier one, a later `None` keeps it. As two arrays (names, paths).
pub(super) fn unique_outputs(
    outputs: &[super::types::Output],
) -> (Vec<String>, Vec<Option<String>>) {
    let mut m: std::collections::BTreeMap<&str, Option<&str>> = Default::default();
    for (name, path) in outputs {
        let e = m.entry(name.as_str()).or_insert(None);
        if let Some(p) = path {
            *e = Some(p.as_str());
        }
    }
    m.into_iter()
        .map(|(n, p)| (n.to_string(), p.map(str::to_string)))
        .unzip()
}

/// Whether a stored step row is the one `s` describes (after a commit whose reply was lost).
fn step_is(row: &Step, s: &NewStep) -> bool {
    row.drv_path == s.drv_path
        && row.step_type == s.step_type
        && row.busy == s.busy
        && row.status == s.status
        && row.machine == s.machine
        && row.start_time == s.start_time
        && row.stop_time == s.stop_time
        && row.propagated_from == s.propagated_from
        && row.times_built == s.times_built
}

/// For a check: `None` when the row is not there.
fn found<T>(r: Result<T, DbError>) -> Result<Option<T>, DbError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(DbError::StepNotFound { .. } | DbError::BuildNotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The error for an update of step `(build, stepnr)` that matched no row.
macro_rules! step_miss {
    ($exec:expr, $build:expr, $stepnr:expr) => {{
        let (build, stepnr): (BuildId, StepNr) = ($build, $stepnr);
        let st: Option<Option<i32>> = sqlx::query_scalar(sql::STEP_STATUS)
            .bind(build.0)
            .bind(stepnr)
            .fetch_optional($exec)
            .await?;
        match st {
            None => DbError::StepNotFound { build, stepnr },
            Some(_) => DbError::StepFinished { build, stepnr },
        }
    }};
}

/// `Ok(false)` if build `$id` exists (the update's condition did not hold), else `BuildNotFound`.
macro_rules! build_miss {
    ($exec:expr, $id:expr) => {{
        let id: BuildId = $id;
        let f: Option<i32> = sqlx::query_scalar(sql::BUILD_FINISHED)
            .bind(id.0)
            .fetch_optional($exec)
            .await?;
        match f {
            None => Err(DbError::BuildNotFound(id)),
            Some(_) => Ok(false),
        }
    }};
}

/// Binds a [`NewStep`]'s columns, in the order the step statements take them: type, drv, busy,
/// status, error, start, stop, machine, system, propagated-from, times built.
macro_rules! step_binds {
    ($q:expr, $s:expr) => {{
        let s: &NewStep = $s;
        $q.bind(s.step_type.code())
            .bind(&s.drv_path)
            .bind(s.busy.code())
            .bind(s.status.map(BuildStatus::code))
            .bind(&s.error_msg)
            .bind(s.start_time)
            .bind(s.stop_time)
            .bind(&s.machine)
            .bind(&s.system)
            .bind(s.propagated_from.map(|b| b.0))
            .bind(s.times_built)
    }};
}

/// Inserts step row `$nr` of `$build` from a `NewStep`, and its outputs.
macro_rules! insert_step {
    ($tx:expr, $build:expr, $nr:expr, $step:expr) => {{
        let (build, nr, s): (BuildId, StepNr, &NewStep) = ($build, $nr, $step);
        step_binds!(sqlx::query(sql::INSERT_STEP).bind(build.0).bind(nr), s)
            .bind(None::<i32>)
            .execute(&mut *$tx)
            .await?;
        for (name, path) in &s.outputs {
            sqlx::query(sql::UPSERT_STEP_OUTPUT)
                .bind(build.0)
                .bind(nr)
                .bind(name)
                .bind(path)
                .execute(&mut *$tx)
                .await?;
        }
    }};
}

/// Allocates the next step number of `$build` inside transaction `$tx`.
macro_rules! alloc_stepnr {
    ($tx:expr, $build:expr) => {{
        let build: BuildId = $build;
        let nr: Option<StepNr> = sqlx::query_scalar(sql::ALLOC_STEPNR)
            .bind(build.0)
            .fetch_optional(&mut *$tx)
            .await?;
        nr.ok_or(DbError::BuildNotFound(build))?
    }};
}

/// Inside transaction `$tx`, marks step `$stepnr` of `$build` Resolved (13) at `$stop` with
/// `resolvedtostep = $to`; a step that is not there (or already finished) is the usual miss.
macro_rules! mark_resolved {
    ($tx:expr, $build:expr, $stepnr:expr, $stop:expr, $to:expr) => {{
        let build: BuildId = $build;
        let stepnr: StepNr = $stepnr;
        let n = sqlx::query(sql::MARK_RESOLVED)
            .bind(build.0)
            .bind(stepnr)
            .bind($stop)
            .bind($to)
            .execute(&mut *$tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(step_miss!(&mut *$tx, build, stepnr));
        }
    }};
}

/// Inserts a realisation unless one is recorded; `Some(conflict)` if the recorded one differs.
macro_rules! insert_realisation {
    ($exec:expr, $r:expr) => {{
        let r: &Realisation = $r;
        let inserted = sqlx::query(sql::INSERT_REALISATION)
            .bind(&r.drv_path)
            .bind(&r.output_name)
            .bind(&r.out_path)
            .bind(r.build.map(|b| b.0))
            .bind(r.stepnr)
            .execute(&mut *$exec)
            .await?
            .rows_affected();
        if inserted == 0 {
            let existing = sqlx::query(sql::REALISATION)
                .bind(&r.drv_path)
                .bind(&r.output_name)
                .fetch_optional(&mut *$exec)
                .await?
                .map(|row| row.realisation())
                .transpose()?;
            match existing {
                Some(e) if e.out_path != r.out_path => Some(RealisationConflict {
                    drv_path: r.drv_path.clone(),
                    output_name: r.output_name.clone(),
                    existing: e.out_path,
                    attempted: r.out_path.clone(),
                }),
                _ => None,
            }
        } else {
            None
        }
    }};
}

fn check_new_step(s: &NewStep) -> Result<(), DbError> {
    if s.status == Some(BuildStatus::Resolved) {
        return Err(DbError::Invalid(
            "a step is marked Resolved only by resolve_step".into(),
        ));
    }
    Ok(())
}

impl Db {
    // ---------------------------------------------------------------- jobsets

    /// Creates the jobset, or sets its scheduling shares if it exists.
    pub async fn create_jobset(&self, name: &str, shares: i32) -> Result<(), DbError> {
        if shares <= 0 {
            return Err(DbError::Invalid(format!(
                "scheduling shares must be positive, not {shares}"
            )));
        }
        self.writing("create_jobset", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::UPSERT_JOBSET)
                    .bind(name)
                    .bind(shares)
                    .execute(pool)
                    .await?;
            });
            self.count_write();
            Ok(())
        })
        .await
    }

    pub async fn jobsets(&self) -> Result<Vec<Jobset>, DbError> {
        self.reading("jobsets", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::JOBSETS)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.jobset())
                    .collect()
            })
        })
        .await
    }

    /// Step seconds per jobset for steps that stopped at or after `since` (scheduling shares).
    pub async fn jobset_seconds_since(&self, since: i64) -> Result<Vec<JobsetSeconds>, DbError> {
        self.reading("jobset_seconds_since", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::JOBSET_SECONDS)
                    .bind(since)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.jobset_seconds())
                    .collect()
            })
        })
        .await
    }

    // ---------------------------------------------------------------- builds

    /// Queues a build (with its `buildoutputs` rows) and announces it (`builds_added`).
    pub async fn create_build(&self, b: &NewBuild) -> Result<BuildId, DbError> {
        // The id the last attempt inserted: after a lost commit reply, the row tells.
        let inserted = &AtomicI64::new(0);
        let id = self
            .retrying_checked(
                "create_build",
                || async move {
                    on_pool!(self, |pool| {
                        let mut tx = pool.begin_write().await?;
                        let id: i64 = sqlx::query_scalar(sql::INSERT_BUILD)
                            .bind(&b.jobset)
                            .bind(&b.job)
                            .bind(&b.drv_path)
                            .bind(&b.system)
                            .bind(b.priority)
                            .bind(b.global_priority)
                            .bind(b.max_silent)
                            .bind(b.timeout)
                            .bind(b.timestamp)
                            .fetch_one(&mut *tx)
                            .await
                            .map_err(|e| match DbError::from(e) {
                                e if e.is_foreign_key_violation() => {
                                    DbError::JobsetNotFound(b.jobset.clone())
                                }
                                e => e,
                            })?;
                        inserted.store(id, Ordering::SeqCst);
                        for (name, path) in &b.outputs {
                            sqlx::query(sql::UPSERT_BUILD_OUTPUT)
                                .bind(id)
                                .bind(name)
                                .bind(path)
                                .execute(&mut *tx)
                                .await?;
                        }
                        commit(self, tx).await?;
                        Ok(BuildId(id))
                    })
                },
                || async move {
                    let id = BuildId(inserted.load(Ordering::SeqCst));
                    Ok(found(self.get_build(id).await)?
                        .filter(|x| {
                            x.drv_path == b.drv_path
                                && x.jobset == b.jobset
                                && x.timestamp == b.timestamp
                        })
                        .map(|_| id))
                },
            )
            .await?;
        self.emit(QueueEvent::BuildsAdded(Some(id)));
        Ok(id)
    }

    pub async fn get_build(&self, id: BuildId) -> Result<Build, DbError> {
        self.reading("get_build", || async move {
            let row = on_pool!(self, |pool| {
                sqlx::query(sql::GET_BUILD)
                    .bind(id.0)
                    .fetch_optional(pool)
                    .await?
                    .map(|r| r.build())
                    .transpose()?
            });
            row.ok_or(DbError::BuildNotFound(id))
        })
        .await
    }

    pub async fn build_outputs(&self, id: BuildId) -> Result<Vec<OutputRow>, DbError> {
        self.reading("build_outputs", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::BUILD_OUTPUTS)
                    .bind(id.0)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.output())
                    .collect()
            })
        })
        .await
    }

    /// The `limit` most recent builds, newest first (admin listing).
    pub async fn recent_builds(&self, limit: i64) -> Result<Vec<Build>, DbError> {
        self.reading("recent_builds", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::RECENT_BUILDS)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.build())
                    .collect()
            })
        })
        .await
    }

    /// How many builds are unfinished (the queue's length; read through the partial index).
    pub async fn count_unfinished_builds(&self) -> Result<u64, DbError> {
        self.reading("count_unfinished_builds", || async move {
            let n: i64 = on_pool!(self, |pool| {
                sqlx::query_scalar(sql::COUNT_UNFINISHED_BUILDS)
                    .fetch_one(pool)
                    .await?
            });
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    /// The queue: unfinished builds by global priority (desc), priority (desc), id.
    pub async fn unfinished_builds(&self) -> Result<Vec<Build>, DbError> {
        self.reading("unfinished_builds", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::UNFINISHED_BUILDS)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.build())
                    .collect()
            })
        })
        .await
    }

    /// Unfinished builds with an id above `after`, by id (incremental queue reads).
    pub async fn unfinished_builds_since(&self, after: BuildId) -> Result<Vec<Build>, DbError> {
        self.reading("unfinished_builds_since", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::UNFINISHED_BUILDS_SINCE)
                    .bind(after.0)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.build())
                    .collect()
            })
        })
        .await
    }

    /// Finishes a build with its outputs, in one transaction. `Ok(false)` (and nothing written)
    /// if it was already finished: a finished build is never touched again.
    pub async fn finish_build(&self, f: &FinishBuild) -> Result<bool, DbError> {
        if f.status == BuildStatus::Resolved {
            return Err(DbError::Invalid("a build cannot finish as Resolved".into()));
        }
        self.retrying_checked(
            "finish_build",
            || async move {
                on_pool!(self, |pool| {
                    let mut tx = pool.begin_write().await?;
                    let n = sqlx::query(sql::FINISH_BUILD)
                        .bind(f.build.0)
                        .bind(f.status.code())
                        .bind(f.start_time)
                        .bind(f.stop_time)
                        .bind(i32::from(f.is_cached))
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if n == 0 {
                        return build_miss!(&mut *tx, f.build);
                    }
                    self.fault(FaultPoint::FinishBuildAfterBuildRow)?;
                    for (name, path) in &f.outputs {
                        sqlx::query(sql::UPSERT_BUILD_OUTPUT)
                            .bind(f.build.0)
                            .bind(name)
                            .bind(path)
                            .execute(&mut *tx)
                            .await?;
                    }
                    commit(self, tx).await?;
                    Ok(true)
                })
            },
            || async move {
                Ok(found(self.get_build(f.build).await)?
                    .filter(|b| b.finished && b.build_status == Some(f.status))
                    .map(|_| true))
            },
        )
        .await
    }

    /// Cancels an unfinished build (status 4) and announces it (`builds_cancelled`).
    /// `Ok(false)` if it was already finished.
    pub async fn cancel_build(&self, id: BuildId, stop_time: i64) -> Result<bool, DbError> {
        let done = self
            .writing("cancel_build", || async move {
                on_pool!(self, |pool| {
                    let n = sqlx::query(sql::CANCEL_BUILD)
                        .bind(id.0)
                        .bind(stop_time)
                        .execute(pool)
                        .await?
                        .rows_affected();
                    self.count_write();
                    if n == 0 {
                        return build_miss!(pool, id);
                    }
                    Ok(true)
                })
            })
            .await?;
        if done {
            self.emit(QueueEvent::BuildsCancelled(Some(id)));
        }
        Ok(done)
    }

    /// Puts a finished build back in the queue (clearing its status and the cached failures of
    /// its steps) and announces it (`builds_restarted`). `Ok(false)` if it was not finished.
    /// Its steps stay as history; new steps get new numbers.
    pub async fn restart_build(&self, id: BuildId) -> Result<bool, DbError> {
        let done = self
            .retrying_checked(
                "restart_build",
                || async move {
                    on_pool!(self, |pool| {
                        let mut tx = pool.begin_write().await?;
                        let n = sqlx::query(sql::RESTART_BUILD)
                            .bind(id.0)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        if n == 0 {
                            return build_miss!(&mut *tx, id);
                        }
                        for q in [sql::CLEAR_FAILED_STEP_DRVS, sql::CLEAR_FAILED_STEP_OUTPUTS] {
                            sqlx::query(q).bind(id.0).execute(&mut *tx).await?;
                        }
                        commit(self, tx).await?;
                        Ok(true)
                    })
                },
                || async move {
                    // It was finished when this transaction updated it: unfinished now means done.
                    Ok(found(self.get_build(id).await)?
                        .filter(|b| !b.finished)
                        .map(|_| true))
                },
            )
            .await?;
        if done {
            self.emit(QueueEvent::BuildsRestarted(Some(id)));
        }
        Ok(done)
    }

    /// Sets an unfinished build's global priority and announces it (`builds_bumped`).
    /// `Ok(false)` if the build is finished or already has that priority.
    pub async fn bump_build(&self, id: BuildId, global_priority: i32) -> Result<bool, DbError> {
        let done = self
            .writing("bump_build", || async move {
                on_pool!(self, |pool| {
                    let n = sqlx::query(sql::BUMP_BUILD)
                        .bind(id.0)
                        .bind(global_priority)
                        .execute(pool)
                        .await?
                        .rows_affected();
                    self.count_write();
                    if n == 0 {
                        return build_miss!(pool, id);
                    }
                    Ok(true)
                })
            })
            .await?;
        if done {
            self.emit(QueueEvent::BuildsBumped(Some(id)));
        }
        Ok(done)
    }

    // ---------------------------------------------------------------- steps

    /// Inserts a step of `build` (with its outputs) under a freshly allocated number, in one
    /// transaction; concurrent callers never get the same number.
    pub async fn create_step(&self, build: BuildId, step: &NewStep) -> Result<StepNr, DbError> {
        check_new_step(step)?;
        if let Some(batch) = self.batch(Some(FaultPoint::CreateStepAfterAlloc)) {
            let (out, nr) = batch
                .create(&self.inner, build, vec![step.clone()], false)
                .await;
            match out {
                Outcome::Done(nr) => return Ok(nr),
                // The row is there if the lost statement was committed; if not, the number is
                // used now.
                Outcome::Unknown if nr > 0 => {
                    let mine = async || {
                        let row = found(self.step(build, nr).await)?;
                        Ok(row.filter(|row| step_is(row, step)).map(|_| nr))
                    };
                    if let Some(nr) = self.read_back("create_step", mine).await? {
                        return Ok(nr);
                    }
                    if let Some(pl) = self.one_statement_pool(FaultPoint::CreateStepAfterAlloc) {
                        return self.insert_step_pg(pl, build, nr, step).await;
                    }
                }
                Outcome::Unknown | Outcome::Alone => {}
            }
        }
        if let Some((pool, lanes)) = self.one_statement_pool(FaultPoint::CreateStepAfterAlloc) {
            return self.create_step_pg((pool, lanes), build, step).await;
        }
        // The number the last attempt allocated: after a lost commit reply, the row tells.
        let allocated = &AtomicI64::new(0);
        self.retrying_checked(
            "create_step",
            || async move {
                on_pool!(self, |pool| {
                    let mut tx = pool.begin_write().await?;
                    let nr = alloc_stepnr!(tx, build);
                    allocated.store(i64::from(nr), Ordering::SeqCst);
                    self.fault(FaultPoint::CreateStepAfterAlloc)?;
                    insert_step!(tx, build, nr, step);
                    commit(self, tx).await?;
                    Ok(nr)
                })
            },
            || async move {
                let nr = allocated.load(Ordering::SeqCst) as StepNr;
                Ok(found(self.step(build, nr).await)?
                    .filter(|row| step_is(row, step))
                    .map(|_| nr))
            },
        )
        .await
    }

    /// [`Db::create_step`] in two round trips: the number is allocated in a transaction of its
    /// own (a number lost to a failure later is a gap, never a duplicate), then the row and its
    /// outputs are inserted by one statement.
    async fn create_step_pg(
        &self,
        (pool, lanes): (&PgPool, &super::lanes::Lanes),
        build: BuildId,
        step: &NewStep,
    ) -> Result<StepNr, DbError> {
        let nr: StepNr = self
            .writing("create_step", || async move {
                let nr: Option<StepNr> = lanes
                    .run(async |c| {
                        sqlx::query_scalar(sql::ALLOC_STEPNR)
                            .bind(build.0)
                            .fetch_optional(&mut *c)
                            .await
                    })
                    .await?;
                self.count_write();
                nr.ok_or(DbError::BuildNotFound(build))
            })
            .await?;
        self.insert_step_pg((pool, lanes), build, nr, step).await
    }

    /// The second round trip of [`Db::create_step_pg`]: the row (and its outputs) under the
    /// allocated number `nr`, by one statement.
    async fn insert_step_pg(
        &self,
        (_, lanes): (&PgPool, &super::lanes::Lanes),
        build: BuildId,
        nr: StepNr,
        step: &NewStep,
    ) -> Result<StepNr, DbError> {
        let (names, paths) = unique_outputs(&step.outputs);
        let (names, paths) = (&names, &paths);
        let s = step;
        self.retrying_checked(
            "create_step",
            || async move {
                let inserted: Option<StepNr> = autocommit(
                    self,
                    lanes.run(async |c| {
                        step_binds!(
                            sqlx::query_scalar(sql::PG_INSERT_STEP_WITH_OUTPUTS)
                                .bind(build.0)
                                .bind(nr),
                            s
                        )
                        .bind(names)
                        .bind(paths)
                        .fetch_optional(&mut *c)
                        .await
                    }),
                )
                .await?;
                inserted.ok_or(DbError::BuildNotFound(build))
            },
            || async move {
                Ok(found(self.step(build, nr).await)?
                    .filter(|row| step_is(row, step))
                    .map(|_| nr))
            },
        )
        .await
    }

    pub async fn step(&self, build: BuildId, stepnr: StepNr) -> Result<Step, DbError> {
        self.reading("step", || async move {
            let row = on_pool!(self, |pool| {
                sqlx::query(sql::STEP)
                    .bind(build.0)
                    .bind(stepnr)
                    .fetch_optional(pool)
                    .await?
                    .map(|r| r.step(""))
                    .transpose()?
            });
            row.ok_or(DbError::StepNotFound { build, stepnr })
        })
        .await
    }

    pub async fn steps_of_build(&self, build: BuildId) -> Result<Vec<Step>, DbError> {
        self.reading("steps_of_build", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::STEPS_OF_BUILD)
                    .bind(build.0)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.step(""))
                    .collect()
            })
        })
        .await
    }

    pub async fn step_outputs(
        &self,
        build: BuildId,
        stepnr: StepNr,
    ) -> Result<Vec<OutputRow>, DbError> {
        self.reading("step_outputs", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::STEP_OUTPUTS)
                    .bind(build.0)
                    .bind(stepnr)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.output())
                    .collect()
            })
        })
        .await
    }

    /// Marks an unfinished step as running on `machine` since `start_time`, in phase `busy`.
    pub async fn start_step(
        &self,
        build: BuildId,
        stepnr: StepNr,
        machine: &str,
        busy: BusyPhase,
        start_time: i64,
    ) -> Result<(), DbError> {
        if let Some(batch) = self.batch(None)
            && let Outcome::Done(()) = batch
                .start(&self.inner, (build, stepnr), machine, busy, start_time)
                .await
        {
            return Ok(());
        }
        self.writing("start_step", || async move {
            on_pool!(self, |pool| {
                let n = sqlx::query(sql::START_STEP)
                    .bind(build.0)
                    .bind(stepnr)
                    .bind(busy.code())
                    .bind(machine)
                    .bind(start_time)
                    .execute(pool)
                    .await?
                    .rows_affected();
                self.count_write();
                if n == 0 {
                    return Err(step_miss!(pool, build, stepnr));
                }
                Ok(())
            })
        })
        .await
    }

    /// Sets an unfinished step's busy phase.
    pub async fn set_step_busy(
        &self,
        build: BuildId,
        stepnr: StepNr,
        busy: BusyPhase,
    ) -> Result<(), DbError> {
        self.writing("set_step_busy", || async move {
            on_pool!(self, |pool| {
                let n = sqlx::query(sql::SET_STEP_BUSY)
                    .bind(build.0)
                    .bind(stepnr)
                    .bind(busy.code())
                    .execute(pool)
                    .await?
                    .rows_affected();
                self.count_write();
                if n == 0 {
                    return Err(step_miss!(pool, build, stepnr));
                }
                Ok(())
            })
        })
        .await
    }

    /// Finishes a step in ONE transaction: the step row (busy 0, status, stop time, …), its
    /// outputs (upserted) and its realisations. A realisation already recorded with a different
    /// output path is kept (first writer wins, as in Nix's build trace); such disagreements are
    /// returned, and the rest is committed. Fails with `StepFinished` if the step already has a
    /// status.
    pub async fn finish_step(&self, f: &FinishStep) -> Result<Vec<RealisationConflict>, DbError> {
        if f.status == BuildStatus::Resolved {
            return Err(DbError::Invalid(
                "finish_step cannot mark a step Resolved; use resolve_step".into(),
            ));
        }
        if let Some(batch) = self.batch(Some(FaultPoint::FinishStepAfterStepRow)) {
            let kept = match batch.finish(&self.inner, f).await {
                Outcome::Done(kept) => Some(kept),
                // Unfinished until the statement: finished with our status means it was ours.
                Outcome::Unknown => {
                    let ours = async || {
                        let row = found(self.step(f.build, f.stepnr).await)?;
                        Ok(row.filter(|row| row.status == Some(f.status)))
                    };
                    self.read_back("finish_step", ours).await?.map(|_| {
                        let all = f.realisations.iter();
                        all.map(|r| (r.drv_path.clone(), r.output_name.clone()))
                            .collect()
                    })
                }
                Outcome::Alone => None,
            };
            if let Some(kept) = kept {
                return self.realisation_conflicts(f, kept).await;
            }
        }
        if let Some((pool, lanes)) = self.one_statement_pool(FaultPoint::FinishStepAfterStepRow) {
            return self.finish_step_pg((pool, lanes), f).await;
        }
        self.retrying_checked(
            "finish_step",
            || async move {
                on_pool!(self, |pool| {
                    let mut tx = pool.begin_write().await?;
                    let n = sqlx::query(sql::FINISH_STEP)
                        .bind(f.build.0)
                        .bind(f.stepnr)
                        .bind(f.status.code())
                        .bind(&f.error_msg)
                        .bind(f.stop_time)
                        .bind(f.times_built)
                        .bind(&f.machine)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if n == 0 {
                        return Err(step_miss!(&mut *tx, f.build, f.stepnr));
                    }
                    self.fault(FaultPoint::FinishStepAfterStepRow)?;
                    for (name, path) in &f.outputs {
                        sqlx::query(sql::UPSERT_STEP_OUTPUT)
                            .bind(f.build.0)
                            .bind(f.stepnr)
                            .bind(name)
                            .bind(path)
                            .execute(&mut *tx)
                            .await?;
                    }
                    let mut conflicts = Vec::new();
                    for r in &f.realisations {
                        if let Some(c) = insert_realisation!(tx, r) {
                            conflicts.push(c);
                        }
                    }
                    commit(self, tx).await?;
                    Ok(conflicts)
                })
            },
            || async move {
                // Unfinished until this transaction (it updates only a row without a status).
                Ok(found(self.step(f.build, f.stepnr).await)?
                    .filter(|row| row.status == Some(f.status))
                    .map(|_| Vec::new()))
            },
        )
        .await
    }

    /// The disagreements among the realisations of `f` that were `kept` (not inserted: one was
    /// recorded for the drv output already).
    async fn realisation_conflicts(
        &self,
        f: &FinishStep,
        kept: Vec<(String, String)>,
    ) -> Result<Vec<RealisationConflict>, DbError> {
        let kept = kept.into_iter().filter_map(|(drv, out)| {
            let r = f
                .realisations
                .iter()
                .find(|r| r.drv_path == drv && r.output_name == out)?;
            Some((drv, out, r.out_path.clone(), None))
        });
        self.disagreements(kept).await
    }

    /// The realisations not inserted (drv, output, attempted path, the recorded path if known)
    /// whose recorded path differs from the attempted one; an unknown recorded path (recorded
    /// by another transaction after the statement's snapshot, or unknown after a lost reply) is
    /// read.
    async fn disagreements(
        &self,
        kept: impl IntoIterator<Item = (String, String, String, Option<String>)>,
    ) -> Result<Vec<RealisationConflict>, DbError> {
        let mut conflicts = Vec::new();
        for (drv, out, attempted, recorded) in kept {
            let recorded = match recorded {
                Some(p) => Some(p),
                None => self.realisation(&drv, &out).await?.map(|r| r.out_path),
            };
            if let Some(existing) = recorded
                && existing != attempted
            {
                conflicts.push(RealisationConflict {
                    drv_path: drv,
                    output_name: out,
                    existing,
                    attempted,
                });
            }
        }
        Ok(conflicts)
    }

    /// [`Db::finish_step`] in one statement (one round trip).
    async fn finish_step_pg(
        &self,
        (pool, lanes): (&PgPool, &super::lanes::Lanes),
        f: &FinishStep,
    ) -> Result<Vec<RealisationConflict>, DbError> {
        let (names, paths) = unique_outputs(&f.outputs);
        let (names, paths) = (&names, &paths);
        let rs = &f.realisations;
        let r_drvs: &Vec<&str> = &rs.iter().map(|r| r.drv_path.as_str()).collect();
        let r_outs: &Vec<&str> = &rs.iter().map(|r| r.output_name.as_str()).collect();
        let r_paths: &Vec<&str> = &rs.iter().map(|r| r.out_path.as_str()).collect();
        let r_builds: &Vec<Option<i64>> = &rs.iter().map(|r| r.build.map(|b| b.0)).collect();
        let r_nrs: &Vec<Option<StepNr>> = &rs.iter().map(|r| r.stepnr).collect();
        type Kept = (
            i64,
            Vec<String>,
            Vec<String>,
            Vec<String>,
            Vec<Option<String>>,
        );
        let kept: Kept = self
            .retrying_checked(
                "finish_step",
                || async move {
                    let row: Kept = autocommit(
                        self,
                        lanes.run(async |c| {
                            sqlx::query_as(sql::PG_FINISH_STEP)
                                .bind(f.build.0)
                                .bind(f.stepnr)
                                .bind(f.status.code())
                                .bind(&f.error_msg)
                                .bind(f.stop_time)
                                .bind(f.times_built)
                                .bind(&f.machine)
                                .bind(names)
                                .bind(paths)
                                .bind(r_drvs)
                                .bind(r_outs)
                                .bind(r_paths)
                                .bind(r_builds)
                                .bind(r_nrs)
                                .fetch_one(&mut *c)
                                .await
                        }),
                    )
                    .await?;
                    if row.0 == 0 {
                        return Err(step_miss!(pool, f.build, f.stepnr));
                    }
                    Ok(row)
                },
                || async move {
                    // Unfinished until this statement (it updates only a row without a status);
                    // what it kept of the realisations is read again below.
                    Ok(found(self.step(f.build, f.stepnr).await)?
                        .filter(|row| row.status == Some(f.status))
                        .map(|_| {
                            let all = |g: fn(&Realisation) -> &str| {
                                rs.iter().map(|r| g(r).to_string()).collect::<Vec<_>>()
                            };
                            (
                                1,
                                all(|r| &r.drv_path),
                                all(|r| &r.output_name),
                                all(|r| &r.out_path),
                                vec![None; rs.len()],
                            )
                        }))
                },
            )
            .await?;
        // Realisations already recorded: a disagreement is reported.
        let (_, drvs, outs, attempted, recorded) = kept;
        let kept = drvs.into_iter().zip(outs).zip(attempted).zip(recorded);
        self.disagreements(kept.map(|(((d, o), a), r)| (d, o, a, r)))
            .await
    }

    /// The resolve transaction: inserts the step row for the resolved derivation (with its
    /// outputs) under a new number, THEN marks step `stepnr` `Resolved` (status 13, busy 0,
    /// `stop_time`) pointing at it — all or nothing. Returns the new step's number. The original
    /// must be unfinished (`StepFinished` otherwise, and nothing is written).
    pub async fn resolve_step(
        &self,
        build: BuildId,
        stepnr: StepNr,
        resolved: &NewStep,
        stop_time: i64,
    ) -> Result<StepNr, DbError> {
        check_new_step(resolved)?;
        if let Some((pool, lanes)) = self.one_statement_pool(FaultPoint::ResolveAfterInsert) {
            let (names, paths) = unique_outputs(&resolved.outputs);
            let (names, paths) = (&names, &paths);
            let s = resolved;
            return self
                .retrying_checked(
                    "resolve_step",
                    || async move {
                        let nr: Option<StepNr> = autocommit(
                            self,
                            lanes.run(async |c| {
                                step_binds!(
                                    sqlx::query_scalar(sql::PG_RESOLVE_STEP)
                                        .bind(build.0)
                                        .bind(stepnr)
                                        .bind(stop_time),
                                    s
                                )
                                .bind(names)
                                .bind(paths)
                                .fetch_one(&mut *c)
                                .await
                            }),
                        )
                        .await?;
                        match nr {
                            Some(nr) => Ok(nr),
                            None => match step_miss!(pool, build, stepnr) {
                                e @ DbError::StepNotFound { .. } => {
                                    Err(match build_miss!(pool, build) {
                                        Err(b) => b,
                                        Ok(_) => e,
                                    })
                                }
                                e => Err(e),
                            },
                        }
                    },
                    || async move { self.resolution_of(build, stepnr, &s.drv_path).await },
                )
                .await;
        }
        self.retrying_checked(
            "resolve_step",
            || async move {
                on_pool!(self, |pool| {
                    let mut tx = pool.begin_write().await?;
                    let nr = alloc_stepnr!(tx, build);
                    insert_step!(tx, build, nr, resolved);
                    self.fault(FaultPoint::ResolveAfterInsert)?;
                    mark_resolved!(tx, build, stepnr, stop_time, nr);
                    commit(self, tx).await?;
                    Ok(nr)
                })
            },
            || async move { self.resolution_of(build, stepnr, &resolved.drv_path).await },
        )
        .await
    }

    /// [`Db::resolve_step`] for a step that has no row yet: in ONE transaction, inserts its row
    /// (`own`), the resolved step's row (`resolved`), and marks its row `Resolved` pointing at
    /// the resolved one. Returns (own number, resolved number). Creating the row and resolving it
    /// in two transactions would leave a pending row behind when the process dies between them,
    /// which nothing finishes after a restart (the restarted step makes a new one).
    pub async fn create_and_resolve_step(
        &self,
        build: BuildId,
        own: &NewStep,
        resolved: &NewStep,
        stop_time: i64,
    ) -> Result<(StepNr, StepNr), DbError> {
        check_new_step(own)?;
        check_new_step(resolved)?;
        if own.status.is_some() {
            return Err(DbError::Invalid(
                "create_and_resolve_step: the original step must be unfinished".into(),
            ));
        }
        if let Some(batch) = self.batch(Some(FaultPoint::ResolveAfterInsert)) {
            let mut marked = own.clone();
            marked.busy = BusyPhase::NotBusy;
            marked.status = Some(BuildStatus::Resolved);
            marked.stop_time = Some(stop_time);
            let rows = vec![marked, resolved.clone()];
            let (out, nr) = batch.create(&self.inner, build, rows, true).await;
            match out {
                Outcome::Done(nr) => return Ok((nr - 1, nr)),
                // The rows are there if the lost statement was committed; if not, the numbers
                // are used now.
                Outcome::Unknown if nr > 0 => {
                    let (o, r) = (&own.drv_path, &resolved.drv_path);
                    let mine = async || self.created_and_resolved(build, nr - 1, o, r).await;
                    if let Some(nrs) = self.read_back("create_and_resolve_step", mine).await? {
                        return Ok(nrs);
                    }
                    if let Some(pl) = self.one_statement_pool(FaultPoint::ResolveAfterInsert) {
                        return self
                            .insert_created_and_resolved_pg(pl, build, nr, own, resolved, stop_time)
                            .await;
                    }
                }
                Outcome::Unknown | Outcome::Alone => {}
            }
        }
        if let Some((pool, lanes)) = self.one_statement_pool(FaultPoint::ResolveAfterInsert) {
            return self
                .create_and_resolve_step_pg((pool, lanes), build, own, resolved, stop_time)
                .await;
        }
        // The original's number in the last attempt: after a lost commit reply, its row tells.
        let allocated = &AtomicI64::new(0);
        self.retrying_checked(
            "create_and_resolve_step",
            || async move {
                on_pool!(self, |pool| {
                    let mut tx = pool.begin_write().await?;
                    let own_nr = alloc_stepnr!(tx, build);
                    allocated.store(i64::from(own_nr), Ordering::SeqCst);
                    insert_step!(tx, build, own_nr, own);
                    let nr = alloc_stepnr!(tx, build);
                    insert_step!(tx, build, nr, resolved);
                    self.fault(FaultPoint::ResolveAfterInsert)?;
                    mark_resolved!(tx, build, own_nr, stop_time, nr);
                    commit(self, tx).await?;
                    Ok((own_nr, nr))
                })
            },
            || async move {
                let own_nr = allocated.load(Ordering::SeqCst) as StepNr;
                self.created_and_resolved(build, own_nr, &own.drv_path, &resolved.drv_path)
                    .await
            },
        )
        .await
    }

    /// Allocates `count` step numbers of `build` in a transaction of its own; returns the last.
    /// A number a later failure leaves unused is a gap, never a duplicate.
    async fn alloc_stepnrs_pg(
        &self,
        (_, lanes): (&PgPool, &super::lanes::Lanes),
        build: BuildId,
        count: i32,
    ) -> Result<StepNr, DbError> {
        self.writing("alloc_stepnrs", || async move {
            let nr: Option<StepNr> = lanes
                .run(async |c| {
                    sqlx::query_scalar(sql::PG_ALLOC_STEPNRS)
                        .bind(build.0)
                        .bind(count)
                        .fetch_optional(&mut *c)
                        .await
                })
                .await?;
            self.count_write();
            nr.ok_or(DbError::BuildNotFound(build))
        })
        .await
    }

    /// [`Db::create_and_resolve_step`] in two round trips: two numbers, then one statement.
    async fn create_and_resolve_step_pg(
        &self,
        (pool, lanes): (&PgPool, &super::lanes::Lanes),
        build: BuildId,
        own: &NewStep,
        resolved: &NewStep,
        stop_time: i64,
    ) -> Result<(StepNr, StepNr), DbError> {
        let nr = self.alloc_stepnrs_pg((pool, lanes), build, 2).await?;
        self.insert_created_and_resolved_pg((pool, lanes), build, nr, own, resolved, stop_time)
            .await
    }

    /// The second round trip of [`Db::create_and_resolve_step_pg`]: both rows under the
    /// allocated numbers `nr - 1` (own) and `nr` (resolved), by one statement.
    async fn insert_created_and_resolved_pg(
        &self,
        (_, lanes): (&PgPool, &super::lanes::Lanes),
        build: BuildId,
        nr: StepNr,
        own: &NewStep,
        resolved: &NewStep,
        stop_time: i64,
    ) -> Result<(StepNr, StepNr), DbError> {
        let own_nr = nr - 1;
        let (own_names, own_paths) = unique_outputs(&own.outputs);
        let (res_names, res_paths) = unique_outputs(&resolved.outputs);
        let outs = (&own_names, &own_paths, &res_names, &res_paths);
        let (o, s) = (own, resolved);
        self.retrying_checked(
            "create_and_resolve_step",
            || async move {
                let created: i64 = autocommit(
                    self,
                    lanes.run(async |c| {
                        step_binds!(
                            sqlx::query_scalar(sql::PG_CREATE_AND_RESOLVE_STEP)
                                .bind(build.0)
                                .bind(own_nr)
                                .bind(nr)
                                .bind(stop_time)
                                .bind(o.step_type.code())
                                .bind(&o.drv_path)
                                .bind(&o.error_msg)
                                .bind(o.start_time)
                                .bind(&o.machine)
                                .bind(&o.system)
                                .bind(o.propagated_from.map(|b| b.0))
                                .bind(o.times_built),
                            s
                        )
                        .bind(outs.0)
                        .bind(outs.1)
                        .bind(outs.2)
                        .bind(outs.3)
                        .fetch_one(&mut *c)
                        .await
                    }),
                )
                .await?;
                if created != 1 {
                    return Err(DbError::Invalid(format!(
                        "create_and_resolve_step inserted {created} rows for step {own_nr}"
                    )));
                }
                Ok((own_nr, nr))
            },
            || async move {
                self.created_and_resolved(build, own_nr, &o.drv_path, &s.drv_path)
                    .await
            },
        )
        .await
    }

    /// After a lost reply to create-and-resolve: (own number, resolved number) if step `own_nr`
    /// is a row of `own_drv` Resolved to a row of `resolved_drv`, i.e. the commit happened.
    async fn created_and_resolved(
        &self,
        build: BuildId,
        own_nr: StepNr,
        own_drv: &str,
        resolved_drv: &str,
    ) -> Result<Option<(StepNr, StepNr)>, DbError> {
        let mine =
            found(self.step(build, own_nr).await)?.is_some_and(|row| row.drv_path == own_drv);
        Ok(if mine {
            self.resolution_of(build, own_nr, resolved_drv)
                .await?
                .map(|nr| (own_nr, nr))
        } else {
            None
        })
    }

    /// The step `(build, stepnr)` is Resolved to, if it is, to a row of `resolved_drv`.
    async fn resolution_of(
        &self,
        build: BuildId,
        stepnr: StepNr,
        resolved_drv: &str,
    ) -> Result<Option<StepNr>, DbError> {
        let Some(row) = found(self.step(build, stepnr).await)? else {
            return Ok(None);
        };
        let Some(to) = row
            .resolved_to_step
            .filter(|_| row.status == Some(BuildStatus::Resolved))
        else {
            return Ok(None);
        };
        Ok(found(self.step(build, to).await)?
            .filter(|t| t.drv_path == resolved_drv)
            .map(|_| to))
    }

    /// The steps of `build` marked Resolved with `resolvedtostep = stepnr`.
    pub async fn steps_resolved_to(
        &self,
        build: BuildId,
        stepnr: StepNr,
    ) -> Result<Vec<Step>, DbError> {
        self.reading("steps_resolved_to", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::STEPS_RESOLVED_TO)
                    .bind(build.0)
                    .bind(stepnr)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.step(""))
                    .collect()
            })
        })
        .await
    }

    // ---------------------------------------------------------------- recovery

    /// Rows left busy (by a crash, at start), by build and step number.
    pub async fn busy_steps(&self) -> Result<Vec<Step>, DbError> {
        self.reading("busy_steps", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::BUSY_STEPS)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.step(""))
                    .collect()
            })
        })
        .await
    }

    /// Closes every busy step without a status as Aborted (status 3, busy 0, `stop_time`,
    /// `error_msg`) in one transaction, and returns those rows (as now stored) by build and step
    /// number. Busy flags on rows that already have a status are cleared too.
    pub async fn abort_busy_steps(
        &self,
        stop_time: i64,
        error_msg: &str,
    ) -> Result<Vec<Step>, DbError> {
        // After a lost commit reply it runs again: rows it had closed are not returned then.
        self.retrying_checked(
            "abort_busy_steps",
            || async move {
                let mut steps: Vec<Step> = on_pool!(self, |pool| {
                    let mut tx = pool.begin_write().await?;
                    let rows = sqlx::query(sql::ABORT_BUSY_STEPS)
                        .bind(stop_time)
                        .bind(error_msg)
                        .fetch_all(&mut *tx)
                        .await?;
                    let steps = rows
                        .iter()
                        .map(|r| r.step(""))
                        .collect::<Result<Vec<_>, _>>()?;
                    sqlx::query(sql::CLEAR_STRAY_BUSY).execute(&mut *tx).await?;
                    commit(self, tx).await?;
                    steps
                });
                steps.sort_by_key(|s| (s.build, s.stepnr));
                Ok(steps)
            },
            || async { Ok(None) },
        )
        .await
    }

    /// Closes these rows as Aborted (status 3, busy 0, `stop_time`, `error_msg`) where they are
    /// still unfinished, in one transaction, and returns the rows it closed (as now stored) by
    /// build and step number. Busy flags on rows that already have a status are cleared too; other
    /// busy rows are left as they are (restart recovery carries them, `actors/carried.rs`).
    pub async fn abort_steps(
        &self,
        rows: &[(BuildId, StepNr)],
        stop_time: i64,
        error_msg: &str,
    ) -> Result<Vec<Step>, DbError> {
        // After a lost commit reply it runs again: rows it had closed are not returned then.
        self.retrying_checked(
            "abort_steps",
            || async move {
                let mut steps: Vec<Step> = on_pool!(self, |pool| {
                    let mut tx = pool.begin_write().await?;
                    let mut steps = Vec::with_capacity(rows.len());
                    for (build, stepnr) in rows {
                        if let Some(r) = sqlx::query(sql::ABORT_STEP)
                            .bind(build.0)
                            .bind(*stepnr)
                            .bind(stop_time)
                            .bind(error_msg)
                            .fetch_optional(&mut *tx)
                            .await?
                        {
                            steps.push(r.step("")?);
                        }
                    }
                    sqlx::query(sql::CLEAR_FINISHED_BUSY)
                        .execute(&mut *tx)
                        .await?;
                    commit(self, tx).await?;
                    steps
                });
                steps.sort_by_key(|s| (s.build, s.stepnr));
                Ok(steps)
            },
            || async { Ok(None) },
        )
        .await
    }

    /// Every step marked Resolved with the step it points at, by build and step number.
    pub async fn resolved_steps(&self) -> Result<Vec<ResolvedPair>, DbError> {
        self.reading("resolved_steps", || async move {
            let mut pairs: Vec<ResolvedPair> = on_pool!(self, |pool| {
                sqlx::query(sql::RESOLVED_STEPS)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(ResolvedPair {
                            original: r.step("o_")?,
                            resolved: r.step("r_")?,
                        })
                    })
                    .collect::<Result<_, DbError>>()?
            });
            pairs.sort_by_key(|p| (p.original.build, p.original.stepnr));
            Ok(pairs)
        })
        .await
    }

    // ---------------------------------------------------------------- failed paths

    /// Records a cached failure (idempotent).
    pub async fn add_failed_path(&self, path: &str) -> Result<(), DbError> {
        self.writing("add_failed_path", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::ADD_FAILED_PATH)
                    .bind(path)
                    .execute(pool)
                    .await?;
            });
            self.count_write();
            Ok(())
        })
        .await
    }

    /// Forgets a cached failure; `Ok(false)` if there was none.
    pub async fn remove_failed_path(&self, path: &str) -> Result<bool, DbError> {
        self.writing("remove_failed_path", || async move {
            let n = on_pool!(self, |pool| {
                sqlx::query(sql::REMOVE_FAILED_PATH)
                    .bind(path)
                    .execute(pool)
                    .await?
                    .rows_affected()
            });
            self.count_write();
            Ok(n > 0)
        })
        .await
    }

    pub async fn is_failed_path(&self, path: &str) -> Result<bool, DbError> {
        self.reading("is_failed_path", || async move {
            let hit: Option<String> = on_pool!(self, |pool| {
                sqlx::query_scalar(sql::IS_FAILED_PATH)
                    .bind(path)
                    .fetch_optional(pool)
                    .await?
            });
            Ok(hit.is_some())
        })
        .await
    }

    /// The cached failures among `paths`, sorted, without duplicates.
    pub async fn failed_paths_among(&self, paths: &[String]) -> Result<Vec<String>, DbError> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        self.reading("failed_paths_among", || async move {
            let mut out: Vec<String> = match &self.inner.pool {
                super::Pool::Postgres(pool, _) => {
                    sqlx::query_scalar(sql::FAILED_PATHS_AMONG_PG)
                        .bind(paths)
                        .fetch_all(pool)
                        .await?
                }
                super::Pool::Sqlite(pool) => {
                    let mut out = Vec::new();
                    for chunk in paths.chunks(500) {
                        let q = sql::failed_paths_among_sqlite(chunk.len());
                        let mut query = sqlx::query_scalar::<_, String>(&q).persistent(false);
                        for p in chunk {
                            query = query.bind(p);
                        }
                        out.extend(query.fetch_all(pool).await?);
                    }
                    out
                }
            };
            out.sort();
            out.dedup();
            Ok(out)
        })
        .await
    }

    // ---------------------------------------------------------------- realisations

    /// Records a realisation. Idempotent: the same one again is `Ok`; a different out path for a
    /// recorded `(drv_path, output_name)` is `Err(RealisationConflict)` and the recorded one stays.
    pub async fn insert_realisation(&self, r: &Realisation) -> Result<(), DbError> {
        if let Some(batch) = self.batch(None)
            && let Outcome::Done(()) = batch.realise(&self.inner, r).await
        {
            return Ok(());
        }
        self.writing("insert_realisation", || async move {
            let conflict = on_pool!(self, |pool| {
                let mut conn = pool.acquire().await?;
                insert_realisation!(conn, r)
            });
            self.count_write();
            match conflict {
                Some(c) => Err(DbError::RealisationConflict(c)),
                None => Ok(()),
            }
        })
        .await
    }

    pub async fn realisation(
        &self,
        drv_path: &str,
        output_name: &str,
    ) -> Result<Option<Realisation>, DbError> {
        self.reading("realisation", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::REALISATION)
                    .bind(drv_path)
                    .bind(output_name)
                    .fetch_optional(pool)
                    .await?
                    .map(|r| r.realisation())
                    .transpose()
            })
        })
        .await
    }

    /// The recorded realisations of a derivation, by output name.
    pub async fn realisations_for_drv(&self, drv_path: &str) -> Result<Vec<Realisation>, DbError> {
        self.reading("realisations_for_drv", || async move {
            on_pool!(self, |pool| {
                sqlx::query(sql::REALISATIONS_FOR_DRV)
                    .bind(drv_path)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.realisation())
                    .collect()
            })
        })
        .await
    }

    /// The recorded realisations of any output of `drv_paths` (queue expansion asks for a
    /// level of a closure at once).
    pub async fn realisations_for_drvs(
        &self,
        drv_paths: &[String],
    ) -> Result<Vec<Realisation>, DbError> {
        if drv_paths.is_empty() {
            return Ok(Vec::new());
        }
        self.reading("realisations_for_drvs", || async move {
            let rows = match &self.inner.pool {
                super::Pool::Postgres(pool, _) => sqlx::query(sql::REALISATIONS_FOR_DRVS_PG)
                    .bind(drv_paths)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| r.realisation())
                    .collect::<Result<Vec<_>, _>>()?,
                super::Pool::Sqlite(pool) => {
                    let mut out = Vec::new();
                    for chunk in drv_paths.chunks(500) {
                        let q = sql::realisations_for_drvs_sqlite(chunk.len());
                        let mut query = sqlx::query(&q).persistent(false);
                        for p in chunk {
                            query = query.bind(p);
                        }
                        for r in query.fetch_all(pool).await? {
                            out.push(r.realisation()?);
                        }
                    }
                    out
                }
            };
            Ok(rows)
        })
        .await
    }

    // ---------------------------------------------------------------- escape hatch

    /// Runs one SQL statement as given: no retry, no types, no notifications. For tooling and
    /// tests (e.g. proving a constraint rejects a row the typed API would never write).
    pub async fn execute_unchecked(&self, statement: &str) -> Result<u64, DbError> {
        Ok(on_pool!(self, |pool| {
            sqlx::query(statement).execute(pool).await?.rows_affected()
        }))
    }
}
