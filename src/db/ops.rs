//! The typed operations of [`Db`]. A read runs under the read retry ([`Db::reading`]); a write
//! is a [`Write`](super::write::Write) value (`steps`, `builds`, `evals`) run by the one write
//! retry layer ([`Db::write`]), through the PostgreSQL batch for the hot step writes
//! ([`Db::write_batched`]).

use super::Db;
use super::builds::{
    BumpBuild, CancelBuild, CreateBuild, FailedPath, FinishBuildWrite, RestartBuild, UpsertJobset,
};
use super::error::DbError;
use super::exec::Row;
use super::notify::QueueEvent;
use super::sql;
use super::steps::{
    AbortSteps, CreateSteps, FinishStepWrite, InsertRealisation, Kept, ResolveStep, SetStepBusy,
    StartStep,
};
use super::types::{
    Build, BuildId, BuildStatus, BusyPhase, FinishBuild, FinishStep, Jobset, JobsetSeconds,
    NewBuild, NewStep, OutputRow, ProducedLink, Realisation, RealisationConflict, ResolvedPair,
    Step, StepDuration, StepNr,
};
use super::write::found;

fn check_new_step(s: &NewStep) -> Result<(), DbError> {
    if s.status == Some(BuildStatus::Resolved) {
        return Err(DbError::Invalid(
            "a step is marked Resolved only by resolve_step".into(),
        ));
    }
    Ok(())
}

/// Decodes every row with `f`.
fn decode<T>(rows: Vec<Row>, f: impl Fn(&Row) -> Result<T, DbError>) -> Result<Vec<T>, DbError> {
    rows.iter().map(f).collect()
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
        self.write(&UpsertJobset { name, shares }).await
    }

    pub async fn jobsets(&self) -> Result<Vec<Jobset>, DbError> {
        self.reading("jobsets", || async move {
            decode(self.exec().fetch_all(sql::JOBSETS, &[]).await?, Row::jobset)
        })
        .await
    }

    /// Step seconds per jobset for steps that stopped at or after `since` (scheduling shares).
    pub async fn jobset_seconds_since(&self, since: i64) -> Result<Vec<JobsetSeconds>, DbError> {
        self.reading("jobset_seconds_since", || async move {
            let rows = self
                .exec()
                .fetch_all(sql::JOBSET_SECONDS, &[&since])
                .await?;
            decode(rows, Row::jobset_seconds)
        })
        .await
    }

    /// The latest successful build steps that stopped at or after `since`, newest first, at
    /// most `limit` of them (expected step durations for the critical path).
    pub async fn recent_step_durations(
        &self,
        since: i64,
        limit: i64,
    ) -> Result<Vec<StepDuration>, DbError> {
        self.reading("recent_step_durations", || async move {
            let rows = self
                .exec()
                .fetch_all(&sql::RECENT_STEP_DURATIONS, &[&since, &limit])
                .await?;
            decode(rows, Row::step_duration)
        })
        .await
    }

    // ---------------------------------------------------------------- builds

    /// Queues a build (with its `buildoutputs` rows) and announces it (`builds_added`).
    pub async fn create_build(&self, b: &NewBuild) -> Result<BuildId, DbError> {
        let id = self.write(&CreateBuild(b)).await?;
        self.emit(QueueEvent::BuildsAdded(Some(id)));
        Ok(id)
    }

    pub async fn get_build(&self, id: BuildId) -> Result<Build, DbError> {
        self.reading("get_build", || async move {
            match self.exec().fetch_optional(sql::GET_BUILD, &[&id.0]).await? {
                Some(r) => r.build(),
                None => Err(DbError::BuildNotFound(id)),
            }
        })
        .await
    }

    pub async fn build_outputs(&self, id: BuildId) -> Result<Vec<OutputRow>, DbError> {
        self.reading("build_outputs", || async move {
            decode(
                self.exec().fetch_all(sql::BUILD_OUTPUTS, &[&id.0]).await?,
                Row::output,
            )
        })
        .await
    }

    /// The `limit` most recent builds, newest first (admin listing).
    pub async fn recent_builds(&self, limit: i64) -> Result<Vec<Build>, DbError> {
        self.reading("recent_builds", || async move {
            decode(
                self.exec().fetch_all(sql::RECENT_BUILDS, &[&limit]).await?,
                Row::build,
            )
        })
        .await
    }

    /// How many builds are unfinished (the queue's length; read through the partial index).
    pub async fn count_unfinished_builds(&self) -> Result<u64, DbError> {
        self.reading("count_unfinished_builds", || async move {
            let row = self
                .exec()
                .fetch_optional(sql::COUNT_UNFINISHED_BUILDS, &[])
                .await?;
            let n: i64 = match row {
                Some(r) => r.first()?,
                None => 0,
            };
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    /// The queue: unfinished builds by global priority (desc), priority (desc), id.
    pub async fn unfinished_builds(&self) -> Result<Vec<Build>, DbError> {
        self.reading("unfinished_builds", || async move {
            decode(
                self.exec().fetch_all(sql::UNFINISHED_BUILDS, &[]).await?,
                Row::build,
            )
        })
        .await
    }

    /// Unfinished builds with an id above `after`, by id (incremental queue reads).
    pub async fn unfinished_builds_since(&self, after: BuildId) -> Result<Vec<Build>, DbError> {
        self.reading("unfinished_builds_since", || async move {
            let rows = self
                .exec()
                .fetch_all(sql::UNFINISHED_BUILDS_SINCE, &[&after.0])
                .await?;
            decode(rows, Row::build)
        })
        .await
    }

    /// Finishes a build with its outputs, in one transaction. `Ok(false)` (and nothing written)
    /// if it was already finished: a finished build is never touched again.
    pub async fn finish_build(&self, f: &FinishBuild) -> Result<bool, DbError> {
        if f.status == BuildStatus::Resolved {
            return Err(DbError::Invalid("a build cannot finish as Resolved".into()));
        }
        self.write(&FinishBuildWrite(f)).await
    }

    /// Cancels an unfinished build (status Cancelled) and announces it (`builds_cancelled`).
    /// `Ok(false)` if it was already finished.
    pub async fn cancel_build(&self, id: BuildId, stop_time: i64) -> Result<bool, DbError> {
        let done = self.write(&CancelBuild { id, stop_time }).await?;
        if done {
            self.emit(QueueEvent::BuildsCancelled(Some(id)));
        }
        Ok(done)
    }

    /// Puts a finished build back in the queue (clearing its status and the cached failures of
    /// its steps) and announces it (`builds_restarted`). `Ok(false)` if it was not finished.
    /// Its steps stay as history; new steps get new numbers.
    pub async fn restart_build(&self, id: BuildId) -> Result<bool, DbError> {
        let done = self.write(&RestartBuild(id)).await?;
        if done {
            self.emit(QueueEvent::BuildsRestarted(Some(id)));
        }
        Ok(done)
    }

    /// Sets an unfinished build's global priority and announces it (`builds_bumped`).
    /// `Ok(false)` if the build is finished.
    pub async fn bump_build(&self, id: BuildId, global_priority: i32) -> Result<bool, DbError> {
        let done = self
            .write(&BumpBuild {
                id,
                global_priority,
            })
            .await?;
        if done {
            self.emit(QueueEvent::BuildsBumped(Some(id)));
        }
        Ok(done)
    }

    // ---------------------------------------------------------------- steps

    /// Inserts a step of `build` (with its outputs) under a freshly allocated number, all or
    /// nothing; concurrent callers never get the same number.
    pub async fn create_step(&self, build: BuildId, step: &NewStep) -> Result<StepNr, DbError> {
        check_new_step(step)?;
        let w = CreateSteps {
            build,
            rows: vec![step.clone()],
            resolves: false,
        };
        match w.links_producers() {
            true => self.write(&w).await,
            false => self.write_batched(w).await,
        }
    }

    pub async fn step(&self, build: BuildId, stepnr: StepNr) -> Result<Step, DbError> {
        self.reading("step", || async move {
            match self
                .exec()
                .fetch_optional(sql::STEP, &[&build.0, &stepnr])
                .await?
            {
                Some(r) => r.step(""),
                None => Err(DbError::StepNotFound { build, stepnr }),
            }
        })
        .await
    }

    pub async fn steps_of_build(&self, build: BuildId) -> Result<Vec<Step>, DbError> {
        self.reading("steps_of_build", || async move {
            let rows = self
                .exec()
                .fetch_all(sql::STEPS_OF_BUILD, &[&build.0])
                .await?;
            decode(rows, |r| r.step(""))
        })
        .await
    }

    /// The `producedsteps` links with a row of `build` on either side (dynamic derivations: a
    /// producer's row and the rows of the drv its output holds), ordered.
    pub async fn produced_links(&self, build: BuildId) -> Result<Vec<ProducedLink>, DbError> {
        self.reading("produced_links", || async move {
            let rows = self
                .exec()
                .fetch_all(sql::PRODUCED_LINKS_OF_BUILD, &[&build.0])
                .await?;
            decode(rows, |r| r.produced_link())
        })
        .await
    }

    pub async fn step_outputs(
        &self,
        build: BuildId,
        stepnr: StepNr,
    ) -> Result<Vec<OutputRow>, DbError> {
        self.reading("step_outputs", || async move {
            let rows = self
                .exec()
                .fetch_all(sql::STEP_OUTPUTS, &[&build.0, &stepnr])
                .await?;
            decode(rows, Row::output)
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
        let w = StartStep {
            build,
            stepnr,
            machine: machine.to_string(),
            busy,
            time: start_time,
        };
        self.write_batched(w).await
    }

    /// Sets an unfinished step's busy phase.
    pub async fn set_step_busy(
        &self,
        build: BuildId,
        stepnr: StepNr,
        busy: BusyPhase,
    ) -> Result<(), DbError> {
        self.write(&SetStepBusy {
            build,
            stepnr,
            busy,
        })
        .await
    }

    /// Finishes a step, all or nothing: the step row (busy 0, status, stop time, …), its
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
        let kept = self.write_batched(FinishStepWrite(f.clone())).await?;
        self.disagreements(kept).await
    }

    /// The realisations not inserted whose recorded path differs from the attempted one; an
    /// unknown recorded path (recorded by another transaction after the statement's snapshot,
    /// or unknown after a lost reply) is read.
    async fn disagreements(&self, kept: Vec<Kept>) -> Result<Vec<RealisationConflict>, DbError> {
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

    /// The resolve write: inserts the step row for the resolved derivation (with its outputs)
    /// under a new number, and marks step `stepnr` `Resolved` (busy 0, `stop_time`) pointing at
    /// it — all or nothing. Returns the new step's number. The original must be unfinished
    /// (`StepFinished` otherwise, and nothing is written).
    pub async fn resolve_step(
        &self,
        build: BuildId,
        stepnr: StepNr,
        resolved: &NewStep,
        stop_time: i64,
    ) -> Result<StepNr, DbError> {
        check_new_step(resolved)?;
        self.write(&ResolveStep {
            build,
            stepnr,
            resolved,
            stop_time,
        })
        .await
    }

    /// [`Db::resolve_step`] for a step that has no row yet: all or nothing, inserts its row
    /// (`own`) already `Resolved` and the resolved step's row (`resolved`) it points at.
    /// Returns (own number, resolved number). Creating the row and resolving it in two
    /// transactions would leave a pending row behind when the process dies between them,
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
        let mut marked = own.clone();
        marked.busy = BusyPhase::NotBusy;
        marked.status = Some(BuildStatus::Resolved);
        marked.stop_time = Some(stop_time);
        let w = CreateSteps {
            build,
            rows: vec![marked, resolved.clone()],
            resolves: true,
        };
        let nr = match w.links_producers() {
            true => self.write(&w).await?,
            false => self.write_batched(w).await?,
        };
        Ok((nr - 1, nr))
    }

    /// The step `(build, stepnr)` is Resolved to, if it is, to a row of `resolved_drv`.
    pub(crate) async fn resolution_of(
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
            let rows = self
                .exec()
                .fetch_all(&sql::STEPS_RESOLVED_TO, &[&build.0, &stepnr])
                .await?;
            decode(rows, |r| r.step(""))
        })
        .await
    }

    // ---------------------------------------------------------------- recovery

    /// Rows left busy (by a crash, at start), by build and step number.
    pub async fn busy_steps(&self) -> Result<Vec<Step>, DbError> {
        self.reading("busy_steps", || async move {
            decode(self.exec().fetch_all(&sql::BUSY_STEPS, &[]).await?, |r| {
                r.step("")
            })
        })
        .await
    }

    /// Closes every busy step without a status as Aborted (busy 0, `stop_time`, `error_msg`) in
    /// one transaction, and returns those rows (as now stored) by build and step number. Busy
    /// flags on rows that already have a status are cleared too.
    pub async fn abort_busy_steps(
        &self,
        stop_time: i64,
        error_msg: &str,
    ) -> Result<Vec<Step>, DbError> {
        self.write(&AbortSteps {
            rows: None,
            stop_time,
            error_msg,
        })
        .await
    }

    /// Closes these rows as Aborted (busy 0, `stop_time`, `error_msg`) where they are still
    /// unfinished, in one transaction, and returns the rows it closed (as now stored) by build
    /// and step number. Busy flags on rows that already have a status are cleared too; other
    /// busy rows are left as they are (restart recovery carries them, `actors/carried.rs`).
    pub async fn abort_steps(
        &self,
        rows: &[(BuildId, StepNr)],
        stop_time: i64,
        error_msg: &str,
    ) -> Result<Vec<Step>, DbError> {
        self.write(&AbortSteps {
            rows: Some(rows),
            stop_time,
            error_msg,
        })
        .await
    }

    /// Every step of an unfinished build marked Resolved, with the step it points at, by build
    /// and step number. The Resolved rows of finished builds (history) are not read.
    pub async fn resolved_steps(&self) -> Result<Vec<ResolvedPair>, DbError> {
        self.reading("resolved_steps", || async move {
            let q: &str = match self.backend() {
                super::Backend::Postgres => &sql::RESOLVED_STEPS_PG,
                super::Backend::Sqlite => &sql::RESOLVED_STEPS_SQLITE,
            };
            let rows = self.exec().fetch_all(q, &[]).await?;
            let mut pairs = decode(rows, |r| {
                Ok(ResolvedPair {
                    original: r.step("o_")?,
                    resolved: r.step("r_")?,
                })
            })?;
            pairs.sort_by_key(|p| (p.original.build, p.original.stepnr));
            Ok(pairs)
        })
        .await
    }

    /// The pending (not started, no status) targets of Resolved rows whose build is finished:
    /// nothing will ever finish them. By build and step number.
    pub async fn pending_targets_of_finished(&self) -> Result<Vec<(BuildId, StepNr)>, DbError> {
        self.reading("pending_targets_of_finished", || async move {
            let rows = self
                .exec()
                .fetch_all(&sql::PENDING_TARGETS_OF_FINISHED, &[])
                .await?;
            decode(rows, |r| Ok((BuildId(r.get("build")?), r.get("stepnr")?)))
        })
        .await
    }

    // ---------------------------------------------------------------- failed paths

    /// Records a cached failure (idempotent).
    pub async fn add_failed_path(&self, path: &str) -> Result<(), DbError> {
        self.write(&FailedPath { path, add: true }).await?;
        Ok(())
    }

    /// Forgets a cached failure; `Ok(false)` if there was none.
    pub async fn remove_failed_path(&self, path: &str) -> Result<bool, DbError> {
        self.write(&FailedPath { path, add: false }).await
    }

    pub async fn is_failed_path(&self, path: &str) -> Result<bool, DbError> {
        self.reading("is_failed_path", || async move {
            let hit = self
                .exec()
                .fetch_optional(sql::IS_FAILED_PATH, &[&path])
                .await?;
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
        self.write_batched(InsertRealisation(r.clone())).await
    }

    pub async fn realisation(
        &self,
        drv_path: &str,
        output_name: &str,
    ) -> Result<Option<Realisation>, DbError> {
        self.reading("realisation", || async move {
            self.exec()
                .fetch_optional(sql::REALISATION, &[&drv_path, &output_name])
                .await?
                .map(|r| r.realisation())
                .transpose()
        })
        .await
    }

    /// The recorded realisations of a derivation, by output name.
    pub async fn realisations_for_drv(&self, drv_path: &str) -> Result<Vec<Realisation>, DbError> {
        self.reading("realisations_for_drv", || async move {
            let rows = self
                .exec()
                .fetch_all(sql::REALISATIONS_FOR_DRV, &[&drv_path])
                .await?;
            decode(rows, Row::realisation)
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
                    .into_iter()
                    .map(Row::Pg)
                    .collect(),
                super::Pool::Sqlite(pool) => {
                    let mut out = Vec::new();
                    for chunk in drv_paths.chunks(500) {
                        let q = sql::realisations_for_drvs_sqlite(chunk.len());
                        let mut query = sqlx::query(&q).persistent(false);
                        for p in chunk {
                            query = query.bind(p);
                        }
                        out.extend(query.fetch_all(pool).await?.into_iter().map(Row::Sqlite));
                    }
                    out
                }
            };
            decode(rows, Row::realisation)
        })
        .await
    }

    // ---------------------------------------------------------------- escape hatch

    /// Runs one SQL statement as given: no retry, no types, no notifications. For tooling and
    /// tests (e.g. proving a constraint rejects a row the typed API would never write).
    pub async fn execute_unchecked(&self, statement: &str) -> Result<u64, DbError> {
        Ok(self.exec().execute(statement, &[]).await?)
    }
}
