//! What `/metrics` reads of the database: the pool's use, and the evaluations recorded (by `qr
//! submit --eval-jobs`, which writes them itself, so the runner learns of them here).

use super::error::DbError;
use super::{Db, Pool};

/// The connection pool at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections open (idle or in use).
    pub open: u32,
    pub idle: u32,
    pub max: u32,
}

impl PoolStats {
    pub fn in_use(&self) -> u32 {
        self.open.saturating_sub(self.idle)
    }
}

/// Evaluations recorded so far (rows are never deleted by the runner, so these only grow).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvalCounts {
    pub evals: u64,
    /// Lines that queued nothing (`jobsetevalerrors`).
    pub errors: u64,
    /// Jobs of all evaluations (`jobsetevalmembers`), and those whose build an evaluation queued.
    pub jobs: u64,
    pub new_builds: u64,
}

const EVAL_COUNTS: &str = "select \
     (select count(*) from jobsetevals) as evals, \
     (select count(*) from jobsetevalerrors) as errors, \
     (select count(*) from jobsetevalmembers) as jobs, \
     (select count(*) from jobsetevalmembers where isnew = 1) as newbuilds";

impl Db {
    /// The pool's connections (the main pool; on PostgreSQL the one-statement write lanes and the
    /// listener have their own).
    pub fn pool_stats(&self) -> PoolStats {
        let (open, idle) = match &self.inner.pool {
            Pool::Sqlite(p) => (p.size(), p.num_idle()),
            Pool::Postgres(p, _) => (p.size(), p.num_idle()),
        };
        PoolStats {
            open,
            idle: u32::try_from(idle).unwrap_or(u32::MAX),
            max: self.inner.options.max_connections,
        }
    }

    pub async fn eval_counts(&self) -> Result<EvalCounts, DbError> {
        self.reading("eval_counts", || async move {
            let r = self
                .exec()
                .fetch_optional(EVAL_COUNTS, &[])
                .await?
                .ok_or_else(|| DbError::Invalid("no row of eval counts".into()))?;
            let n = |k: &str| -> Result<u64, DbError> {
                Ok(u64::try_from(r.get::<i64>(k)?).unwrap_or(0))
            };
            Ok(EvalCounts {
                evals: n("evals")?,
                errors: n("errors")?,
                jobs: n("jobs")?,
                new_builds: n("newbuilds")?,
            })
        })
        .await
    }
}
