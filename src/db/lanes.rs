//! PostgreSQL connections for the hot one-statement writes, kept outside sqlx's pool: that pool
//! pings every connection handed back to it (a `Sync` round trip), which for a write of one
//! statement doubles the round trips. A lane is handed back without a ping; a connection whose
//! statement failed for any reason but the database refusing it (it may be broken, or left
//! mid-reply by a cancelled future) is closed instead.

use std::sync::Mutex;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::{Semaphore, SemaphorePermit};

pub(crate) struct Lanes {
    opts: PgConnectOptions,
    idle: Mutex<Vec<PgConnection>>,
    permits: Semaphore,
    acquire_timeout: Duration,
}

/// One connection in use; dropped without [`Lane::release`], the connection is closed.
pub(crate) struct Lane<'a> {
    conn: Option<PgConnection>,
    lanes: &'a Lanes,
    _permit: SemaphorePermit<'a>,
}

impl Lanes {
    /// At most `max` connections, opened as needed; waiting for one (or opening it) fails with
    /// a pool timeout after `acquire_timeout`, which the operations retry like any other.
    pub(crate) fn new(opts: PgConnectOptions, max: u32, acquire_timeout: Duration) -> Self {
        Lanes {
            opts,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max.max(1) as usize),
            acquire_timeout,
        }
    }

    pub(crate) async fn get(&self) -> Result<Lane<'_>, sqlx::Error> {
        let permit = tokio::time::timeout(self.acquire_timeout, self.permits.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => tokio::time::timeout(self.acquire_timeout, self.opts.connect())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)??,
        };
        Ok(Lane {
            conn: Some(conn),
            lanes: self,
            _permit: permit,
        })
    }

    /// Runs `f` on a lane; the connection is kept for the next caller when `f` succeeded or
    /// the database answered with an error (the connection is fine), and closed otherwise.
    pub(crate) async fn run<T>(
        &self,
        f: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let mut lane = self.get().await?;
        let Some(conn) = lane.conn.as_mut() else {
            return Err(sqlx::Error::PoolClosed);
        };
        let r = f(conn).await;
        if matches!(r, Ok(_) | Err(sqlx::Error::Database(_))) {
            lane.release();
        }
        r
    }

    /// Closes the idle connections (connections in use close when dropped).
    pub(crate) fn close(&self) {
        self.permits.close();
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Lane<'_> {
    /// Hands the connection back for reuse.
    pub(crate) fn release(mut self) {
        if let Some(c) = self.conn.take()
            && !self.lanes.permits.is_closed()
        {
            self.lanes
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(c);
        }
    }
}
