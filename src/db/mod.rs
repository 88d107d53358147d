//! The database: the runner's journal. Every state the actors reach that must survive a crash is
//! committed here (and nothing else is), in Hydra's tables, on SQLite (the embedded default) or
//! PostgreSQL (production). `docs/schema.md` shows the schema, the query plans and where it
//! differs from Hydra's.
//!
//! - [`Db`] is one cheap, cloneable handle over either backend. [`Db::connect`] opens the database
//!   named by a `sqlite://…` or `postgres://…` URL (creating an SQLite file and its directory if
//!   missing) and applies the embedded migrations (`migrations/{sqlite,postgres}`); running them
//!   again on restart is a no-op. A database that cannot be reached at start is one clear
//!   [`DbError::Unreachable`] line.
//! - Every operation is typed (rows in [`types`]) and is one transaction where it writes more than
//!   one row: creating a step allocates its number and inserts it with its outputs; finishing a
//!   step writes the step row, its outputs and its realisations; resolving a step inserts the
//!   resolved step row and then marks the original `Resolved` pointing at it.
//! - Step numbers come from a per-build counter (`builds.laststepnr`) bumped with
//!   `UPDATE … RETURNING` inside the inserting transaction: the row lock (PostgreSQL) or the write
//!   lock (SQLite, whose write transactions start with `BEGIN IMMEDIATE`) serialises allocation
//!   per build, so concurrent writers never collide.
//! - Every write is a value with its parameters, how it is applied on each backend and how it is
//!   read back (`write::Write`), run by one retry layer: transient failures (PostgreSQL
//!   40001/40P01, SQLite `SQLITE_BUSY`/`SQLITE_LOCKED`, a lost connection or a pool timeout)
//!   re-run the whole write, bounded by [`RetryPolicy`], logging each retry; the last error is
//!   returned after the last attempt. A connection lost during `COMMIT` leaves the outcome
//!   unknown ([`DbError::CommitOutcomeUnknown`]): the write then reads back whether it happened
//!   (the row it inserted under the number or id it got, the status it set) and returns that
//!   result, or runs again if it did not, so a lost reply neither duplicates rows nor loses a
//!   write. On PostgreSQL the hot step writes of many actors share one statement per kind
//!   (`batch`); a write the statement did not do goes through the same retry layer alone.
//!   Reads are retried by [`retry`].
//! - Queue changes arrive through [`Db::listen`] as [`QueueEvent`]s: LISTEN/NOTIFY with triggers
//!   on PostgreSQL, an in-process broadcast on SQLite, and a periodic `Rescan` on both.
//! - Timestamps are unix seconds passed in by the caller (the clock is injected).
//! - [`FaultPoint`]s let tests fail a write inside the path production runs (between the
//!   statements of a transaction; before a one-statement write or a batch's numbers); they can
//!   be armed only in a build with the `test-hooks` feature (without it a check is a constant
//!   `Ok`).

mod batch;
mod builds;
mod error;
mod evals;
mod exec;
mod fault;
mod lanes;
mod notify;
mod ops;
mod outbox;
mod plans;
mod retry;
mod rows;
mod sql;
mod stats;
mod steps;
mod timing;
pub mod types;
mod write;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::broadcast;

pub use error::{DbError, Transient, classify, classify_code, redact_url};
pub use evals::{
    ConstituentState, EvalDetail, EvalError, EvalMember, EvalSummary, NewEval, NewEvalJob,
    RecordedEval,
};
pub use fault::FaultPoint;
pub use notify::{CHANNELS, QueueEvent, QueueListener};
pub use outbox::{EventKind, NotifyTargets, OutboxRow, now_ms, status_name};
pub use plans::{AnalyzedPlan, QueryPlan};
pub use retry::{RetryPolicy, retry};
pub use stats::{EvalCounts, PoolStats};
pub use timing::{BUCKETS as TX_BUCKETS, Histogram, HistogramSnapshot, TxKind, TxTimings};
pub use types::{
    Build, BuildId, BuildStatus, BusyPhase, FinishBuild, FinishStep, Jobset, JobsetSeconds,
    NewBuild, NewStep, Output, OutputRow, ProducedLink, Realisation, RealisationConflict,
    ResolvedPair, Step, StepNr, StepType, UnknownCode,
};

use fault::Faults;

/// The embedded migrations.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
/// The embedded migrations.
pub static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The database file under a state directory: `sqlite://<state_dir>/qr.db`.
pub fn default_url(state_dir: &Path) -> String {
    let path = state_dir.join("qr.db");
    let mut url = String::from("sqlite://");
    // sqlx percent-decodes the path; keep '%', '?' and '#' literal.
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => url.push_str("%25"),
            '?' => url.push_str("%3F"),
            '#' => url.push_str("%23"),
            c => url.push(c),
        }
    }
    url
}

/// Which database is behind a [`Db`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Tuning for [`Db::connect_with`]; [`Db::connect`] uses the defaults.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub max_connections: u32,
    /// How long an operation waits for a pooled connection (including reconnecting) before it
    /// fails with a (retryable) pool timeout.
    pub acquire_timeout: Duration,
    /// How long the first connection at start may take.
    pub connect_timeout: Duration,
    /// SQLite's `busy_timeout`: how long a statement waits for another writer's lock.
    pub sqlite_busy_timeout: Duration,
    pub retry: RetryPolicy,
    /// How often [`QueueListener::next`] yields [`QueueEvent::Rescan`] as a safety net.
    pub rescan_interval: Duration,
    /// SQLite: how often the listener looks for builds that other processes queued (`qr
    /// submit`); zero turns the watch off (they are then seen at the next rescan).
    pub sqlite_poll_interval: Duration,
    /// PostgreSQL: step rows created and steps finished by many actors at once are written by
    /// one statement (one round trip, one commit) instead of one each.
    pub batch_writes: bool,
    /// The webhooks that want each event (`[notify]`): the writes that make those changes insert
    /// their outbox rows (`outbox.rs`); empty, they insert none.
    pub notify: NotifyTargets,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            sqlite_busy_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            rescan_interval: Duration::from_secs(30),
            sqlite_poll_interval: Duration::from_millis(200),
            batch_writes: true,
            notify: NotifyTargets::default(),
        }
    }
}

pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool, Box<PgConnectOptions>),
}

struct Inner {
    pool: Pool,
    url: String,
    options: DbOptions,
    events: broadcast::Sender<QueueEvent>,
    faults: Faults,
    /// PostgreSQL: connections for the one-statement writes (no ping when handed back).
    lanes: Option<lanes::Lanes>,
    /// PostgreSQL: the writes coalesced into one statement ([`DbOptions::batch_writes`]).
    batcher: batch::Batcher,
    /// Write transactions committed through this handle (benchmarks: transactions per step).
    writes: std::sync::atomic::AtomicU64,
    /// Latency of every attempt of every operation, by kind.
    timings: TxTimings,
}

/// The handle every actor holds: cheap to clone, shared pool inside.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

/// Shows the backend and the URL without its password (the connect options hold it).
impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend())
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Opens (creating if needed) and migrates the database at `url` with default options.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        Db::connect_with(
            url,
            DbOptions {
                max_connections,
                ..DbOptions::default()
            },
        )
        .await
    }

    /// Opens (creating if needed) and migrates the database at `url`.
    pub async fn connect_with(url: &str, options: DbOptions) -> Result<Db, DbError> {
        let shown = redact_url(url);
        let pool = if url.starts_with("sqlite:") {
            Pool::Sqlite(open_sqlite(url, &shown, &options).await?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (pool, opts) = open_postgres(url, &shown, &options).await?;
            Pool::Postgres(pool, Box::new(opts))
        } else {
            return Err(DbError::UnsupportedUrl { url: shown });
        };
        let lanes = match &pool {
            Pool::Postgres(_, opts) => Some(lanes::Lanes::new(
                (**opts).clone(),
                options.max_connections,
                options.acquire_timeout,
            )),
            Pool::Sqlite(_) => None,
        };
        let (events, _) = broadcast::channel(1024);
        let db = Db {
            inner: Arc::new(Inner {
                pool,
                url: shown,
                options,
                events,
                faults: Faults::default(),
                lanes,
                batcher: Default::default(),
                writes: Default::default(),
                timings: TxTimings::default(),
            }),
        };
        tracing::info!(url = %db.inner.url, backend = ?db.backend(), "database ready");
        Ok(db)
    }

    pub fn backend(&self) -> Backend {
        match self.inner.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(..) => Backend::Postgres,
        }
    }

    /// The URL, without any password.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    pub fn options(&self) -> &DbOptions {
        &self.inner.options
    }

    /// The SQLite pool, for tooling and tests.
    pub fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.inner.pool {
            Pool::Sqlite(p) => Some(p),
            Pool::Postgres(..) => None,
        }
    }

    /// The PostgreSQL pool, for tooling and tests.
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.inner.pool {
            Pool::Postgres(p, _) => Some(p),
            Pool::Sqlite(_) => None,
        }
    }

    /// Closes the pool (all clones of this handle); later operations fail.
    pub async fn close(&self) {
        if let Some(l) = &self.inner.lanes {
            l.close();
        }
        match &self.inner.pool {
            Pool::Sqlite(p) => p.close().await,
            Pool::Postgres(p, _) => p.close().await,
        }
    }

    /// Write transactions committed so far through this handle and its clones: each multi-row
    /// transaction and each single-statement write counts once (reads are not counted).
    pub fn write_transactions(&self) -> u64 {
        self.inner.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The transaction latency histograms (`qr_db_transaction_seconds`).
    pub fn transaction_timings(&self) -> &TxTimings {
        &self.inner.timings
    }

    pub(crate) fn count_write(&self) {
        self.inner
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Arms a one-shot fault: the next operation reaching `point` fails with
    /// [`DbError::FaultInjected`] and rolls back. For tests (feature `test-hooks`).
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn arm_fault(&self, point: FaultPoint) {
        self.inner.faults.arm(point);
    }

    #[cfg(any(test, feature = "test-hooks"))]
    pub fn disarm_faults(&self) {
        self.inner.faults.disarm_all();
    }

    pub(crate) fn fault(&self, point: FaultPoint) -> Result<(), DbError> {
        self.inner.faults.check(point)
    }

    /// Runs the write batch's tasks ([`DbOptions::batch_writes`]) on `rt` — the runner's I/O
    /// runtime, not the thread of the actors — instead of on the runtime of its first writer.
    pub fn run_batches_on(&self, rt: tokio::runtime::Handle) {
        self.inner.batcher.run_on(rt);
    }

    /// Waits for queue changes; `Rescan` every [`DbOptions::rescan_interval`].
    pub async fn listen(&self) -> Result<QueueListener, DbError> {
        self.listen_every(self.inner.options.rescan_interval).await
    }

    /// Like [`Db::listen`] with its own rescan interval. On PostgreSQL the LISTEN is in place
    /// when this returns.
    pub async fn listen_every(&self, rescan: Duration) -> Result<QueueListener, DbError> {
        match &self.inner.pool {
            Pool::Sqlite(pool) => {
                // Subscribed before the watch reads the highest id: nothing falls in between.
                let rx = self.inner.events.subscribe();
                let every = self.inner.options.sqlite_poll_interval;
                let watch = if every.is_zero() {
                    None
                } else {
                    Some(notify::ForeignWatch::start(pool.clone(), every).await?)
                };
                Ok(QueueListener::local(rx, watch, rescan))
            }
            Pool::Postgres(_, opts) => {
                // Its own small pool, so LISTEN never holds one of the workers' connections.
                let pool = PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(self.inner.options.acquire_timeout)
                    .connect_lazy_with((**opts).clone());
                QueueListener::postgres(pool, rescan, Duration::from_secs(30)).await
            }
        }
    }

    /// Delivers `ev` to in-process listeners (SQLite; PostgreSQL's triggers do it there).
    pub(crate) fn emit(&self, ev: QueueEvent) {
        if self.backend() == Backend::Sqlite {
            // No receivers is fine.
            let _ = self.inner.events.send(ev);
        }
    }

    /// Runs a read-only operation under the retry policy, timing each attempt.
    pub(crate) async fn reading<T, F, Fut>(&self, what: &str, op: F) -> Result<T, DbError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, DbError>>,
    {
        self.timed(TxKind::Read, what, op).await
    }

    /// Each attempt is observed in the histogram of `kind`, failed ones included: the time from
    /// asking the pool for a connection to the commit (or the error), as the caller waits for it.
    async fn timed<T, F, Fut>(&self, kind: TxKind, what: &str, mut op: F) -> Result<T, DbError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, DbError>>,
    {
        let hist = self.inner.timings.of(kind);
        let r = retry(&self.inner.options.retry, what, || observed(hist, op())).await;
        if r.is_err() {
            self.inner.timings.failed(kind);
        }
        r
    }
}

/// Awaits one attempt and observes how long it took in `hist` (failed attempts included).
async fn observed<T>(hist: &Histogram, attempt: impl std::future::Future<Output = T>) -> T {
    let start = std::time::Instant::now();
    let r = attempt.await;
    hist.observe(start.elapsed());
    r
}

/// Applies the migrations (`run`), retrying the whole run (each migration is its own
/// transaction, so an interrupted one left nothing) when it failed for a transient reason — a
/// lost connection, a busy database — under [`DbOptions::retry`]. Without it a connection dropped
/// while a runner starts (a PostgreSQL restart, a failover, `pg_terminate_backend`) would stop
/// the runner; the torture test `torture_db_connections_dropped_during_ca_graph` found that.
async fn migrate<F, Fut>(shown: &str, o: &DbOptions, mut run: F) -> Result<(), DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), sqlx::migrate::MigrateError>>,
{
    let mut attempt = 1;
    loop {
        let source = match run().await {
            Ok(()) => return Ok(()),
            Err(source) => source,
        };
        let transient = match &source {
            sqlx::migrate::MigrateError::Execute(e)
            | sqlx::migrate::MigrateError::ExecuteMigration(e, _) => classify(e).is_some(),
            _ => false,
        };
        if !transient || attempt >= o.retry.max_attempts.max(1) {
            return Err(DbError::Migrate {
                url: shown.to_string(),
                source,
            });
        }
        let delay = o.retry.delay(attempt);
        tracing::warn!(attempt, ?delay, error = %source, "migrating the database failed; retrying");
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

fn io_timeout(what: &str, after: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} timed out after {after:?}"),
    ))
}

async fn open_sqlite(url: &str, shown: &str, o: &DbOptions) -> Result<SqlitePool, DbError> {
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(|source| DbError::InvalidUrl {
            url: shown.to_string(),
            source,
        })?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(o.sqlite_busy_timeout)
        .foreign_keys(true);
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    if !in_memory
        && let Some(dir) = opts.get_filename().parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|source| DbError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let mut pool_opts = SqlitePoolOptions::new()
        .max_connections(o.max_connections.max(1))
        .acquire_timeout(o.acquire_timeout)
        // An in-process file cannot go away: no round trip to the connection's worker thread
        // before every operation.
        .test_before_acquire(false);
    if in_memory {
        // The database lives as long as one connection does.
        pool_opts = pool_opts
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None);
    }
    let unreachable = |source| DbError::Unreachable {
        url: shown.to_string(),
        source,
    };
    let pool = tokio::time::timeout(o.connect_timeout, pool_opts.connect_with(opts))
        .await
        .map_err(|_| unreachable(io_timeout("opening the database", o.connect_timeout)))?
        .map_err(unreachable)?;
    migrate(shown, o, || SQLITE_MIGRATOR.run(&pool)).await?;
    Ok(pool)
}

async fn open_postgres(
    url: &str,
    shown: &str,
    o: &DbOptions,
) -> Result<(PgPool, PgConnectOptions), DbError> {
    let opts = PgConnectOptions::from_str(url).map_err(|source| DbError::InvalidUrl {
        url: shown.to_string(),
        source,
    })?;
    let unreachable = |source| DbError::Unreachable {
        url: shown.to_string(),
        source,
    };
    // One direct connection first: the pool would retry a refused connection until its acquire
    // timeout and then report only "pool timed out"; this reports the cause, at once.
    let probe = tokio::time::timeout(o.connect_timeout, opts.connect())
        .await
        .map_err(|_| unreachable(io_timeout("connecting", o.connect_timeout)))?
        .map_err(unreachable)?;
    let _ = sqlx::Connection::close(probe).await;
    // Lazy: the probe showed the server is there; the migrations (retried on a lost
    // connection) open the first pooled connection.
    let pool = PgPoolOptions::new()
        .max_connections(o.max_connections.max(1))
        .acquire_timeout(o.acquire_timeout)
        // No ping before every operation (one round trip each): a connection that died while
        // idle fails its next statement, which is retried like any lost connection (and a lost
        // COMMIT reply is read back), so the ping only narrowed a window the retries cover.
        .test_before_acquire(false)
        .connect_lazy_with(opts.clone());
    migrate(shown, o, || POSTGRES_MIGRATOR.run(&pool)).await?;
    Ok((pool, opts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_url_is_under_the_state_dir() {
        assert_eq!(
            default_url(Path::new("/var/lib/qr")),
            "sqlite:///var/lib/qr/qr.db"
        );
        assert_eq!(
            default_url(Path::new("/tmp/a?b#c%d")),
            "sqlite:///tmp/a%3Fb%23c%25d/qr.db"
        );
        let opts = SqliteConnectOptions::from_str(&default_url(Path::new("/tmp/a?b#c%d")));
        assert_eq!(
            opts.ok().map(|o| o.get_filename().to_path_buf()),
            Some(Path::new("/tmp/a?b#c%d/qr.db").to_path_buf())
        );
    }

    /// `qr submit` is another process with its own `Db`: its insert reaches no broadcast of the
    /// runner's, and the rescan is an hour away, so only the watch can report it.
    #[tokio::test]
    async fn sqlite_listener_sees_builds_another_process_queued() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = default_url(dir.path());
        let opts = DbOptions {
            rescan_interval: Duration::from_secs(3600),
            ..DbOptions::default()
        };
        let runner = Db::connect_with(&url, opts.clone())
            .await
            .expect("runner db");
        let submit = Db::connect_with(&url, opts).await.expect("submit db");
        let mut listener = runner.listen().await.expect("listen");
        submit.create_jobset("j", 100).await.expect("jobset");
        submit
            .create_build(&types::NewBuild {
                jobset: "j".into(),
                job: "a".into(),
                drv_path: "/nix/store/00000000000000000000000000000000-a.drv".into(),
                system: "x86_64-linux".into(),
                priority: 0,
                global_priority: 0,
                max_silent: 3600,
                timeout: 36000,
                timestamp: 1_700_000_000,
                outputs: vec![("out".into(), None)],
            })
            .await
            .expect("build");
        // The timeout only keeps a broken watch from hanging the test.
        let ev = tokio::time::timeout(Duration::from_secs(120), listener.next())
            .await
            .expect("an event long before the rescan")
            .expect("listener");
        assert_eq!(ev, QueueEvent::BuildsAdded(None));
    }
}
