//! Queue notifications behind one interface: PostgreSQL LISTEN/NOTIFY (fed by triggers on
//! `builds`, so writers in other processes are seen too) or, for SQLite, an in-process broadcast
//! fed by the `Db` methods after they commit, plus a watch on the highest build id
//! ([`ForeignWatch`]) that sees builds other processes (`qr submit`) queued within its poll
//! interval. Either way a periodic `Rescan` is the safety net for anything missed (a lost LISTEN
//! connection, a lagging receiver).

use std::time::Duration;

use sqlx::postgres::{PgListener, PgNotification, PgPool};
use sqlx::sqlite::SqlitePool;
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::error::DbError;
use super::types::BuildId;

/// The PostgreSQL channels (Hydra's names).
pub const CHANNELS: [&str; 4] = [
    "builds_added",
    "builds_cancelled",
    "builds_restarted",
    "builds_bumped",
];

/// Something in the queue changed. The build id is `None` when the source did not say which
/// (e.g. a foreign writer's statement-level trigger).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueEvent {
    BuildsAdded(Option<BuildId>),
    BuildsCancelled(Option<BuildId>),
    BuildsRestarted(Option<BuildId>),
    BuildsBumped(Option<BuildId>),
    /// Re-read the queue: the periodic safety net, or notifications may have been missed.
    Rescan,
}

impl QueueEvent {
    /// The event for a notification on `channel` with `payload` (a build id or empty).
    pub fn from_notification(channel: &str, payload: &str) -> Option<QueueEvent> {
        let id = payload.trim().parse::<i64>().ok().map(BuildId);
        Some(match channel {
            "builds_added" => QueueEvent::BuildsAdded(id),
            "builds_cancelled" => QueueEvent::BuildsCancelled(id),
            "builds_restarted" => QueueEvent::BuildsRestarted(id),
            "builds_bumped" => QueueEvent::BuildsBumped(id),
            _ => return None,
        })
    }
}

/// SQLite: builds queued by another process (`qr submit`) reach no in-process broadcast. This
/// polls the highest build id, one indexed read per interval, and reports a growth as
/// `BuildsAdded(None)`, so such a build is picked up within the interval instead of at the next
/// rescan.
pub(crate) struct ForeignWatch {
    pool: SqlitePool,
    tick: Interval,
    last: i64,
}

impl ForeignWatch {
    /// Reads the current highest id first, so every build queued after this returns is seen.
    pub(crate) async fn start(pool: SqlitePool, every: Duration) -> Result<Self, DbError> {
        let last = max_build_id(&pool).await?;
        Ok(ForeignWatch {
            pool,
            tick: rescan_timer(every),
            last,
        })
    }

    /// `BuildsAdded(None)` when the highest id grew since the last look. A failed read is only
    /// logged: the next tick looks again, and the rescan stays the safety net.
    async fn check(&mut self) -> Option<QueueEvent> {
        match max_build_id(&self.pool).await {
            Ok(id) if id > self.last => {
                self.last = id;
                Some(QueueEvent::BuildsAdded(None))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the highest build id; looking again at the next tick");
                None
            }
        }
    }
}

async fn max_build_id(pool: &SqlitePool) -> Result<i64, DbError> {
    let (id,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(id), 0) FROM builds")
        .fetch_one(pool)
        .await?;
    Ok(id)
}

/// The watch's next tick, or never when there is none.
async fn foreign_tick(watch: &mut Option<ForeignWatch>) {
    match watch {
        Some(w) => {
            w.tick.tick().await;
        }
        None => std::future::pending().await,
    }
}

enum Source {
    Local {
        rx: broadcast::Receiver<QueueEvent>,
        watch: Option<ForeignWatch>,
    },
    Postgres {
        rx: mpsc::Receiver<QueueEvent>,
        task: tokio::task::JoinHandle<()>,
    },
}

/// Waits for queue changes; see `Db::listen`.
pub struct QueueListener {
    source: Source,
    timer: Interval,
}

impl Drop for QueueListener {
    fn drop(&mut self) {
        if let Source::Postgres { task, .. } = &self.source {
            task.abort();
        }
    }
}

fn rescan_timer(every: Duration) -> Interval {
    let every = every.max(Duration::from_millis(1));
    let mut t = tokio::time::interval_at(Instant::now() + every, every);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

impl QueueListener {
    pub(crate) fn local(
        rx: broadcast::Receiver<QueueEvent>,
        watch: Option<ForeignWatch>,
        rescan: Duration,
    ) -> Self {
        QueueListener {
            source: Source::Local { rx, watch },
            timer: rescan_timer(rescan),
        }
    }

    /// LISTENs on all channels before returning, so no notification after this is missed.
    pub(crate) async fn postgres(
        pool: PgPool,
        rescan: Duration,
        max_backoff: Duration,
    ) -> Result<Self, DbError> {
        let listener = connect_listener(&pool).await?;
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(pg_task(pool, listener, tx, max_backoff));
        Ok(QueueListener {
            source: Source::Postgres { rx, task },
            timer: rescan_timer(rescan),
        })
    }

    /// The next queue change, or `Rescan` when the rescan interval passes first.
    pub async fn next(&mut self) -> Result<QueueEvent, DbError> {
        match &mut self.source {
            Source::Local { rx, watch } => loop {
                tokio::select! {
                    biased;
                    r = rx.recv() => return match r {
                        Ok(ev) => Ok(ev),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "queue listener lagged; rescanning");
                            Ok(QueueEvent::Rescan)
                        }
                        Err(broadcast::error::RecvError::Closed) => Err(DbError::ListenerClosed),
                    },
                    _ = self.timer.tick() => return Ok(QueueEvent::Rescan),
                    _ = foreign_tick(watch) => {}
                }
                if let Some(w) = watch
                    && let Some(ev) = w.check().await
                {
                    return Ok(ev);
                }
            },
            Source::Postgres { rx, .. } => {
                tokio::select! {
                    biased;
                    r = rx.recv() => r.ok_or(DbError::ListenerClosed),
                    _ = self.timer.tick() => Ok(QueueEvent::Rescan),
                }
            }
        }
    }

    /// An event that is already waiting, without waiting (never `Rescan` from the timer).
    pub fn try_next(&mut self) -> Option<QueueEvent> {
        match &mut self.source {
            Source::Local { rx, .. } => match rx.try_recv() {
                Ok(ev) => Some(ev),
                Err(broadcast::error::TryRecvError::Lagged(_)) => Some(QueueEvent::Rescan),
                Err(_) => None,
            },
            Source::Postgres { rx, .. } => rx.try_recv().ok(),
        }
    }
}

async fn connect_listener(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen_all(CHANNELS).await?;
    Ok(l)
}

fn event_of(n: &PgNotification) -> Option<QueueEvent> {
    QueueEvent::from_notification(n.channel(), n.payload())
}

/// Forwards notifications; on any failure, logs, backs off, builds a fresh listener and sends
/// `Rescan` (notifications sent while it was gone are lost). Ends when the receiver is dropped
/// or the pool is closed.
async fn pg_task(
    pool: PgPool,
    first: PgListener,
    tx: mpsc::Sender<QueueEvent>,
    max_backoff: Duration,
) {
    let min_backoff = Duration::from_millis(100);
    let mut backoff = min_backoff;
    let mut listener = Some(first);
    loop {
        let mut l = match listener.take() {
            Some(l) => l,
            None => match connect_listener(&pool).await {
                Ok(l) => {
                    tracing::info!("LISTEN connection re-established; rescanning the queue");
                    backoff = min_backoff;
                    if tx.send(QueueEvent::Rescan).await.is_err() {
                        return;
                    }
                    l
                }
                Err(sqlx::Error::PoolClosed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "cannot re-establish the LISTEN connection; retrying");
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max_backoff.max(min_backoff));
                    continue;
                }
            },
        };
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                r = l.try_recv() => match r {
                    Ok(Some(n)) => {
                        if let Some(ev) = event_of(&n)
                            && tx.send(ev).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(None) => {
                        tracing::warn!("LISTEN connection lost and reconnected; rescanning the queue");
                        if tx.send(QueueEvent::Rescan).await.is_err() {
                            return;
                        }
                    }
                    Err(sqlx::Error::PoolClosed) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_notifications() {
        assert_eq!(
            QueueEvent::from_notification("builds_added", "17"),
            Some(QueueEvent::BuildsAdded(Some(BuildId(17))))
        );
        assert_eq!(
            QueueEvent::from_notification("builds_bumped", ""),
            Some(QueueEvent::BuildsBumped(None))
        );
        assert_eq!(QueueEvent::from_notification("other", "1"), None);
    }

    #[tokio::test]
    async fn local_listener_rescans_on_timer_and_lag() {
        let (tx, rx) = broadcast::channel(2);
        let mut l = QueueListener::local(rx, None, Duration::from_millis(50));
        assert_eq!(l.try_next(), None);
        tx.send(QueueEvent::BuildsAdded(Some(BuildId(1)))).ok();
        assert_eq!(
            l.next().await.ok(),
            Some(QueueEvent::BuildsAdded(Some(BuildId(1))))
        );
        // Nothing sent: the timer fires.
        assert_eq!(l.next().await.ok(), Some(QueueEvent::Rescan));
        for i in 0..5 {
            tx.send(QueueEvent::BuildsAdded(Some(BuildId(i)))).ok();
        }
        assert_eq!(l.next().await.ok(), Some(QueueEvent::Rescan));
        drop(tx);
        // The two retained events, then closed.
        assert!(l.next().await.is_ok());
        assert!(l.next().await.is_ok());
        assert!(matches!(l.next().await, Err(DbError::ListenerClosed)));
    }
}
