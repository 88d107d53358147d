//! The build, jobset and failed-path writes, each a [`Write`]: one statement, or one
//! transaction where it writes more than one row, the same SQL on both backends.

use super::Db;
use super::error::DbError;
use super::fault::FaultPoint;
use super::outbox;
use super::sql;
use super::steps::build_miss;
use super::types::{BuildId, BuildStatus, FinishBuild, NewBuild};
use super::write::{Write, found};

/// Queueing a build with its `buildoutputs` rows.
pub(crate) struct CreateBuild<'a>(pub(crate) &'a NewBuild);

impl Write for CreateBuild<'_> {
    type Answer = BuildId;
    /// The id the last attempt inserted: after a lost reply, the row tells.
    type Trace = i64;

    fn name(&self) -> &'static str {
        "create_build"
    }

    async fn apply(&self, db: &Db, inserted: &mut i64) -> Result<BuildId, DbError> {
        let b = self.0;
        let mut tx = db.begin_write().await?;
        let row = tx
            .exec()
            .fetch_optional(
                sql::INSERT_BUILD,
                &[
                    &b.jobset,
                    &b.job,
                    &b.drv_path,
                    &b.system,
                    &b.priority,
                    &b.global_priority,
                    &b.max_silent,
                    &b.timeout,
                    &b.timestamp,
                ],
            )
            .await
            .map_err(|e| match DbError::from(e) {
                e if e.is_foreign_key_violation() => DbError::JobsetNotFound(b.jobset.clone()),
                e => e,
            })?;
        let id: i64 = match row {
            Some(r) => r.first()?,
            None => return Err(DbError::Invalid("inserting a build returned no id".into())),
        };
        *inserted = id;
        for (name, path) in &b.outputs {
            tx.exec()
                .execute(sql::UPSERT_BUILD_OUTPUT, &[&id, name, path])
                .await?;
        }
        db.commit(tx).await?;
        Ok(BuildId(id))
    }

    async fn verify(&self, db: &Db, inserted: &i64) -> Result<Option<BuildId>, DbError> {
        let (b, id) = (self.0, BuildId(*inserted));
        if id.0 == 0 {
            return Ok(None);
        }
        Ok(found(db.get_build(id).await)?
            .filter(|x| {
                x.drv_path == b.drv_path && x.jobset == b.jobset && x.timestamp == b.timestamp
            })
            .map(|_| id))
    }
}

/// Finishing a build with its outputs, in one transaction; `false` (and nothing written) if it
/// was finished already.
pub(crate) struct FinishBuildWrite<'a>(pub(crate) &'a FinishBuild);

impl Write for FinishBuildWrite<'_> {
    type Answer = bool;
    type Trace = ();

    fn name(&self) -> &'static str {
        "finish_build"
    }

    async fn apply(&self, db: &Db, _: &mut ()) -> Result<bool, DbError> {
        let f = self.0;
        let mut tx = db.begin_write().await?;
        let n = tx
            .exec()
            .execute(
                sql::FINISH_BUILD,
                &[
                    &f.build.0,
                    &f.status.code(),
                    &f.start_time,
                    &f.stop_time,
                    &i32::from(f.is_cached),
                ],
            )
            .await?;
        if n == 0 {
            return build_miss(tx.exec(), f.build).await;
        }
        db.fault(FaultPoint::FinishBuildAfterBuildRow)?;
        for (name, path) in &f.outputs {
            tx.exec()
                .execute(sql::UPSERT_BUILD_OUTPUT, &[&f.build.0, name, path])
                .await?;
        }
        outbox::insert_finish(&mut tx, db.notify_targets(), f).await?;
        db.commit(tx).await?;
        Ok(true)
    }

    async fn verify(&self, db: &Db, _: &()) -> Result<Option<bool>, DbError> {
        let f = self.0;
        Ok(found(db.get_build(f.build).await)?
            .filter(|b| b.finished && b.build_status == Some(f.status))
            .map(|_| true))
    }
}

/// Cancelling an unfinished build; `false` if it was finished.
pub(crate) struct CancelBuild {
    pub(crate) id: BuildId,
    pub(crate) stop_time: i64,
}

impl Write for CancelBuild {
    type Answer = bool;
    type Trace = ();

    fn name(&self) -> &'static str {
        "cancel_build"
    }

    /// One statement; with webhooks, one transaction with the build's outbox rows.
    async fn apply(&self, db: &Db, _: &mut ()) -> Result<bool, DbError> {
        let targets = db.notify_targets();
        let args: [&dyn super::exec::Param; 2] = [&self.id.0, &self.stop_time];
        if targets.build_started.is_empty() && targets.build_finished.is_empty() {
            let n = db.execute_write(&sql::CANCEL_BUILD, &args).await?;
            if n == 0 {
                return build_miss(db.exec(), self.id).await;
            }
            return Ok(true);
        }
        let mut tx = db.begin_write().await?;
        let n = tx.exec().execute(&sql::CANCEL_BUILD, &args).await?;
        if n == 0 {
            return build_miss(tx.exec(), self.id).await;
        }
        let (id, stop) = (self.id, self.stop_time);
        outbox::insert_finished(
            &mut tx,
            targets,
            id,
            BuildStatus::Cancelled,
            None,
            stop,
            false,
        )
        .await?;
        db.commit(tx).await?;
        Ok(true)
    }

    /// Cancelled at our time: it was ours.
    async fn verify(&self, db: &Db, _: &()) -> Result<Option<bool>, DbError> {
        Ok(found(db.get_build(self.id).await)?
            .filter(|b| {
                b.finished
                    && b.build_status == Some(BuildStatus::Cancelled)
                    && b.stop_time == Some(self.stop_time)
            })
            .map(|_| true))
    }
}

/// Putting a finished build back in the queue, forgetting the cached failures of its steps;
/// `false` if it was not finished.
pub(crate) struct RestartBuild(pub(crate) BuildId);

impl Write for RestartBuild {
    type Answer = bool;
    type Trace = ();

    fn name(&self) -> &'static str {
        "restart_build"
    }

    async fn apply(&self, db: &Db, _: &mut ()) -> Result<bool, DbError> {
        let id = self.0;
        let mut tx = db.begin_write().await?;
        let n = tx.exec().execute(sql::RESTART_BUILD, &[&id.0]).await?;
        if n == 0 {
            return build_miss(tx.exec(), id).await;
        }
        for q in [sql::CLEAR_FAILED_STEP_DRVS, sql::CLEAR_FAILED_STEP_OUTPUTS] {
            tx.exec().execute(q, &[&id.0]).await?;
        }
        db.commit(tx).await?;
        Ok(true)
    }

    /// It was finished when the write updated it: unfinished now means done.
    async fn verify(&self, db: &Db, _: &()) -> Result<Option<bool>, DbError> {
        Ok(found(db.get_build(self.0).await)?
            .filter(|b| !b.finished)
            .map(|_| true))
    }
}

/// Setting an unfinished build's global priority; `false` if it is finished.
pub(crate) struct BumpBuild {
    pub(crate) id: BuildId,
    pub(crate) global_priority: i32,
}

impl Write for BumpBuild {
    type Answer = bool;
    type Trace = ();

    fn name(&self) -> &'static str {
        "bump_build"
    }

    async fn apply(&self, db: &Db, _: &mut ()) -> Result<bool, DbError> {
        let n = db
            .execute_write(sql::BUMP_BUILD, &[&self.id.0, &self.global_priority])
            .await?;
        if n == 0 {
            return build_miss(db.exec(), self.id).await;
        }
        Ok(true)
    }

    /// Setting the same priority again is harmless.
    async fn verify(&self, _: &Db, _: &()) -> Result<Option<bool>, DbError> {
        Ok(None)
    }
}

/// Creating a jobset, or setting its scheduling shares.
pub(crate) struct UpsertJobset<'a> {
    pub(crate) name: &'a str,
    pub(crate) shares: i32,
}

impl Write for UpsertJobset<'_> {
    type Answer = ();
    type Trace = ();

    fn name(&self) -> &'static str {
        "create_jobset"
    }

    async fn apply(&self, db: &Db, _: &mut ()) -> Result<(), DbError> {
        db.execute_write(sql::UPSERT_JOBSET, &[&self.name, &self.shares])
            .await?;
        Ok(())
    }

    /// An upsert: harmless again.
    async fn verify(&self, _: &Db, _: &()) -> Result<Option<()>, DbError> {
        Ok(None)
    }
}

/// Recording a cached failure (idempotent), or (`add: false`) forgetting it: answered with
/// whether a row changed.
pub(crate) struct FailedPath<'a> {
    pub(crate) path: &'a str,
    pub(crate) add: bool,
}

impl Write for FailedPath<'_> {
    type Answer = bool;
    type Trace = ();

    fn name(&self) -> &'static str {
        match self.add {
            true => "add_failed_path",
            false => "remove_failed_path",
        }
    }

    async fn apply(&self, db: &Db, _: &mut ()) -> Result<bool, DbError> {
        let q = match self.add {
            true => sql::ADD_FAILED_PATH,
            false => sql::REMOVE_FAILED_PATH,
        };
        Ok(db.execute_write(q, &[&self.path]).await? > 0)
    }

    /// Inserting or deleting again is harmless.
    async fn verify(&self, _: &Db, _: &()) -> Result<Option<bool>, DbError> {
        Ok(None)
    }
}
