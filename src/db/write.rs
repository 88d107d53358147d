//! One write path per database operation. A write is a value ([`Write`]): its parameters, how it
//! is applied ([`Write::apply`], one transaction or one statement, per backend) and how a lost
//! reply is read back ([`Write::verify`]). [`Db::write`] is the one retry layer every write goes
//! through; the PostgreSQL batch ([`super::batch`]) hands it the writes whose statement did not
//! answer them ([`Db::write_batched`]).

use std::future::Future;

use super::error::{DbError, Transient};
use super::exec::{Exec, Param, Tx};
use super::fault::FaultPoint;
use super::retry::jitter;
use super::timing::TxKind;
use super::{Db, Pool};

/// A database write: its parameters as a value.
pub(crate) trait Write: Send + Sync {
    /// What the caller gets when it was written.
    type Answer: Send;
    /// What an attempt learned that a later attempt or the read-back needs (e.g. the step
    /// number it allocated). Starts as `Default` and lives across the attempts of one write.
    type Trace: Default + Send + Sync;

    /// The operation's name (logs, retries).
    fn name(&self) -> &'static str;

    /// One attempt: one transaction, or one statement (its own transaction). An error
    /// [`DbError::CommitOutcomeUnknown`] means the reply to the commit was lost.
    fn apply(
        &self,
        db: &Db,
        trace: &mut Self::Trace,
    ) -> impl Future<Output = Result<Self::Answer, DbError>> + Send;

    /// After a lost reply: `Some(answer)` if the attempt was committed, `None` if it was not
    /// (it is applied again). A write that is harmless to apply twice may say `None` always.
    fn verify(
        &self,
        db: &Db,
        trace: &Self::Trace,
    ) -> impl Future<Output = Result<Option<Self::Answer>, DbError>> + Send;
}

/// Where the retry layer starts.
pub(crate) enum Start<T> {
    /// Apply the write, with what an attempt elsewhere (the batch) learned.
    Fresh(T),
    /// An attempt elsewhere (the batch) lost its reply: read back first, with what the attempt
    /// learned.
    Lost(T, sqlx::Error),
}

impl Db {
    /// Applies `w` until it is written or fails for good ([`Db::write_from`]).
    pub(crate) async fn write<W: Write>(&self, w: &W) -> Result<W::Answer, DbError> {
        self.write_from(w, Start::Fresh(W::Trace::default())).await
    }

    /// The retry layer: apply; on a transient error apply again (bounded by
    /// [`RetryPolicy`](super::RetryPolicy), logging each retry); on a lost reply read back first
    /// ([`Write::verify`], asked until the database answers, since giving up would leave the
    /// outcome unknown again) and apply again only if it was not written. A lost reply past the
    /// bound is returned as the lost connection (a transient error: nothing was committed).
    /// Each attempt is timed as a write.
    pub(crate) async fn write_from<W: Write>(
        &self,
        w: &W,
        start: Start<W::Trace>,
    ) -> Result<W::Answer, DbError> {
        let r = self.write_attempts(w, start).await;
        if r.is_err() {
            // Failed for good: counted for the metrics.
            self.inner.timings.failed(TxKind::Write);
        }
        r
    }

    async fn write_attempts<W: Write>(
        &self,
        w: &W,
        start: Start<W::Trace>,
    ) -> Result<W::Answer, DbError> {
        let policy = self.inner.options.retry;
        let hist = self.inner.timings.of(TxKind::Write);
        let max = policy.max_attempts.max(1);
        let what = w.name();
        let (mut trace, mut lost) = match start {
            Start::Fresh(t) => (t, None),
            Start::Lost(t, e) => (t, Some(e)),
        };
        let mut attempt = 1;
        loop {
            let e = match lost.take() {
                Some(source) => DbError::CommitOutcomeUnknown(source),
                None => {
                    let begun = std::time::Instant::now();
                    let r = w.apply(self, &mut trace).await;
                    hist.observe(begun.elapsed());
                    match r {
                        Ok(v) => return Ok(v),
                        Err(e) => e,
                    }
                }
            };
            let (e, kind) = match e {
                DbError::CommitOutcomeUnknown(source) => {
                    if let Some(v) = self.verify(w, &trace).await? {
                        tracing::warn!(op = what, error = %source, "the connection was lost during COMMIT; the commit had happened");
                        return Ok(v);
                    }
                    if attempt >= max {
                        tracing::error!(op = what, attempts = attempt, error = %source, "the connection was lost during COMMIT, which had not happened; giving up");
                        return Err(DbError::Sql(source));
                    }
                    tracing::warn!(op = what, attempt, error = %source, "the connection was lost during COMMIT, which had not happened");
                    (DbError::Sql(source), Transient::ConnectionLost)
                }
                e => match e.transient() {
                    None => return Err(e),
                    Some(kind) if attempt >= max => {
                        tracing::error!(op = what, attempts = attempt, ?kind, error = %e, "database write failed; giving up");
                        return Err(e);
                    }
                    Some(kind) => (e, kind),
                },
            };
            let delay = jitter(policy.delay(attempt));
            tracing::warn!(op = what, attempt, max_attempts = max, ?kind, ?delay, error = %e, "database write failed; retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// [`Write::verify`], asked again (backing off) while the database does not answer.
    async fn verify<W: Write>(
        &self,
        w: &W,
        trace: &W::Trace,
    ) -> Result<Option<W::Answer>, DbError> {
        let policy = self.inner.options.retry;
        let mut n = 1;
        loop {
            match w.verify(self, trace).await {
                Ok(found) => return Ok(found),
                Err(e) if e.is_retryable() => {
                    let delay = jitter(policy.delay(n));
                    tracing::warn!(op = w.name(), error = %e, ?delay, "cannot tell yet whether a commit whose reply was lost happened; checking again");
                    tokio::time::sleep(delay).await;
                    n += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts a write transaction (SQLite: `BEGIN IMMEDIATE`, so the write lock is taken up front
    /// and a transaction never fails half-way for a lock upgrade).
    pub(crate) async fn begin_write(&self) -> Result<Tx, DbError> {
        Ok(match &self.inner.pool {
            Pool::Sqlite(p) => Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Pool::Postgres(p, _) => Tx::Pg(p.begin().await?),
        })
    }

    /// Commits; a connection lost during `COMMIT` leaves the outcome unknown, so it is reported
    /// as such ([`DbError::CommitOutcomeUnknown`]) rather than as a transient error. Counts the
    /// committed write transaction ([`Db::write_transactions`]); the commit-lost faults apply.
    pub(crate) async fn commit(&self, tx: Tx) -> Result<(), DbError> {
        if self.fault(FaultPoint::CommitLostBefore).is_err() {
            drop(tx); // rolled back
            return Err(lost_commit("before"));
        }
        tx.commit().await.map_err(commit_error)?;
        self.count_write();
        if self.fault(FaultPoint::CommitLostAfter).is_err() {
            return Err(lost_commit("after"));
        }
        Ok(())
    }

    /// Runs one write statement in its own (implicit) transaction, as [`Db::commit`] does a
    /// transaction: an error that is not the database refusing it (the connection was lost
    /// while the statement ran) leaves the outcome unknown; counted as a write transaction; the
    /// commit-lost faults apply.
    pub(crate) async fn autocommit<T>(
        &self,
        statement: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, DbError> {
        if self.fault(FaultPoint::CommitLostBefore).is_err() {
            return Err(lost_commit("before"));
        }
        let v = statement.await.map_err(|e| match e {
            // Not sent at all: nothing happened.
            e @ (sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed) => DbError::Sql(e),
            e => commit_error(e),
        })?;
        self.count_write();
        if self.fault(FaultPoint::CommitLostAfter).is_err() {
            return Err(lost_commit("after"));
        }
        Ok(v)
    }

    /// One write statement on the pool ([`Db::autocommit`]); the number of rows it changed.
    pub(crate) async fn execute_write(
        &self,
        sql: &str,
        args: &[&dyn Param],
    ) -> Result<u64, DbError> {
        self.autocommit(self.exec().execute(sql, args)).await
    }

    /// The connections of PostgreSQL's one-statement writes (none on SQLite).
    pub(crate) fn lanes(&self) -> Option<&super::lanes::Lanes> {
        self.inner.lanes.as_ref()
    }

    /// The pool, for one statement.
    pub(crate) fn exec(&self) -> Exec<'_> {
        match &self.inner.pool {
            Pool::Sqlite(p) => Exec::SqlitePool(p),
            Pool::Postgres(p, _) => Exec::PgPool(p),
        }
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

/// For a read-back: `None` when the row is not there.
pub(crate) fn found<T>(r: Result<T, DbError>) -> Result<Option<T>, DbError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(DbError::StepNotFound { .. } | DbError::BuildNotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::db::{DbOptions, RetryPolicy};

    /// A write that fails as scripted (one error per attempt, then succeeds with the attempt's
    /// number) and whose read-back answers as told, counting both.
    #[derive(Default)]
    struct Scripted {
        errors: Mutex<Vec<DbError>>,
        landed: Option<u32>,
        applied: Mutex<u32>,
        verified: Mutex<u32>,
    }

    fn lost() -> DbError {
        DbError::CommitOutcomeUnknown(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()))
    }

    fn transient() -> DbError {
        DbError::Sql(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()))
    }

    impl Write for Scripted {
        type Answer = u32;
        type Trace = ();

        fn name(&self) -> &'static str {
            "scripted"
        }

        async fn apply(&self, _: &Db, _: &mut ()) -> Result<u32, DbError> {
            let n = {
                let mut a = self.applied.lock().unwrap_or_else(|p| p.into_inner());
                *a += 1;
                *a
            };
            let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
            match errors.is_empty() {
                true => Ok(n),
                false => Err(errors.remove(0)),
            }
        }

        async fn verify(&self, _: &Db, _: &()) -> Result<Option<u32>, DbError> {
            *self.verified.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            Ok(self.landed)
        }
    }

    fn scripted(errors: Vec<DbError>, landed: Option<u32>) -> Scripted {
        Scripted {
            errors: Mutex::new(errors),
            landed,
            ..Scripted::default()
        }
    }

    async fn db_with(max_attempts: u32) -> Db {
        let retry = RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        };
        let opts = DbOptions {
            retry,
            ..DbOptions::default()
        };
        Db::connect_with("sqlite::memory:", opts).await.expect("db")
    }

    fn counts(w: &Scripted) -> (u32, u32) {
        let a = *w.applied.lock().unwrap_or_else(|p| p.into_inner());
        let v = *w.verified.lock().unwrap_or_else(|p| p.into_inner());
        (a, v)
    }

    #[tokio::test]
    async fn transient_errors_are_applied_again_up_to_the_bound() {
        let db = db_with(3).await;
        let w = scripted(vec![transient(), transient()], None);
        assert_eq!(db.write(&w).await.ok(), Some(3));
        assert_eq!(counts(&w), (3, 0));
        let w = scripted(vec![transient(), transient(), transient()], None);
        assert!(db.write(&w).await.is_err_and(|e| e.is_retryable()));
        assert_eq!(counts(&w), (3, 0));
    }

    #[tokio::test]
    async fn a_permanent_error_is_returned_at_once() {
        let db = db_with(5).await;
        let w = scripted(vec![DbError::Invalid("no".into())], None);
        assert!(matches!(db.write(&w).await, Err(DbError::Invalid(_))));
        assert_eq!(counts(&w), (1, 0));
    }

    #[tokio::test]
    async fn a_lost_reply_is_read_back_before_applying_again() {
        let db = db_with(5).await;
        // Committed: the read-back's answer, and no second attempt.
        let w = scripted(vec![lost()], Some(77));
        assert_eq!(db.write(&w).await.ok(), Some(77));
        assert_eq!(counts(&w), (1, 1));
        // Not committed: applied again.
        let w = scripted(vec![lost()], None);
        assert_eq!(db.write(&w).await.ok(), Some(2));
        assert_eq!(counts(&w), (2, 1));
        // Lost past the bound: the lost connection, a transient error.
        let db = db_with(2).await;
        let w = scripted(vec![lost(), lost()], None);
        assert!(db.write(&w).await.is_err_and(|e| e.is_retryable()));
        assert_eq!(counts(&w), (2, 2));
    }

    #[tokio::test]
    async fn a_write_whose_batch_lost_its_reply_starts_with_the_read_back() {
        let db = db_with(5).await;
        let w = scripted(vec![], Some(9));
        let r = db
            .write_from(&w, Start::Lost((), sqlx::Error::PoolClosed))
            .await;
        assert_eq!(r.ok(), Some(9));
        assert_eq!(counts(&w), (0, 1));
    }
}
