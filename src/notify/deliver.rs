//! The delivery task: one loop per webhook reads its due outbox rows (oldest first), POSTs each
//! and marks it delivered (any 2xx answer) or due again after a capped exponential backoff
//! (anything else, or no answer). A row is marked only after its POST answered, so a runner
//! killed mid-delivery sends it again from its next start — with the same key, fixed in the row:
//! at least once, and every duplicate recognisable.

use std::sync::Arc;
use std::time::Duration;

use super::config::{NotifySettings, Webhook};
use super::http::{Client, PostError};
use super::payload::{Context, Rendered, render};
use super::sign::signature;
use crate::db::{Db, DbError, OutboxRow, now_ms};

/// Rows read per look.
const BATCH: i64 = 64;

/// How long after its `attempts`-th failed attempt a row is due again: `base`, doubled per
/// attempt, at most `max`.
pub fn backoff(attempts: i32, base: Duration, max: Duration) -> Duration {
    let n = attempts.clamp(1, 31) as u32 - 1;
    base.checked_mul(1u32 << n.min(30)).unwrap_or(max).min(max)
}

/// What became of one attempt.
#[derive(Debug)]
enum Attempt {
    Delivered,
    Skipped(String),
    Failed(String),
}

/// Starts a delivery loop per webhook on `rt` (none without webhooks).
pub fn spawn(
    rt: &tokio::runtime::Handle,
    db: Db,
    settings: &NotifySettings,
) -> Result<Vec<tokio::task::JoinHandle<()>>, PostError> {
    let https = settings
        .webhooks
        .iter()
        .any(|w| w.url.starts_with("https://"));
    let client = Client::new(&settings.ca_file, settings.timeout, https)?;
    let mut tasks = Vec::new();
    for w in &settings.webhooks {
        let (db, client, w) = (db.clone(), client.clone(), Arc::new(w.clone()));
        let s = settings.clone();
        tasks.push(rt.spawn(async move { run(db, client, w, s).await }));
    }
    Ok(tasks)
}

/// Waits until no row of the configured webhooks is undelivered, at most `drain_timeout`; the
/// number still undelivered.
pub async fn drain(db: &Db, settings: &NotifySettings) -> Result<i64, DbError> {
    let until = tokio::time::Instant::now() + settings.drain_timeout;
    let poll = settings.poll_interval;
    loop {
        let mut left = 0;
        for w in &settings.webhooks {
            left += db.outbox_pending(&w.name).await?;
        }
        if left == 0 || tokio::time::Instant::now() >= until {
            return Ok(left);
        }
        tokio::time::sleep(poll.min(Duration::from_millis(100))).await;
    }
}

async fn run(db: Db, client: Client, wh: Arc<Webhook>, s: NotifySettings) {
    tracing::info!(webhook = %wh.name, url = %wh.url, "delivering notifications");
    loop {
        let due = match db.outbox_due(&wh.name, now_ms(), BATCH).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(webhook = %wh.name, error = %e, "cannot read the outbox; trying again");
                tokio::time::sleep(s.poll_interval).await;
                continue;
            }
        };
        if due.is_empty() {
            tokio::time::sleep(s.poll_interval).await;
            continue;
        }
        for row in &due {
            if let Err(e) = deliver_one(&db, &client, &wh, &s, row).await {
                // The row stays due: it is sent again (same key) at the next look.
                tracing::warn!(webhook = %wh.name, id = row.id, key = %row.key, error = %e,
                    "cannot record a delivery's outcome; it will be attempted again");
                tokio::time::sleep(s.poll_interval).await;
                break;
            }
        }
    }
}

/// What the row needs from the database to be rendered.
async fn render_row(db: &Db, wh: &Webhook, row: &OutboxRow) -> Result<Rendered, DbError> {
    let Some(id) = row.build else {
        return Ok(render(wh, row, &Context::default()));
    };
    let build = match db.get_build(id).await {
        Ok(b) => Some(b),
        Err(DbError::BuildNotFound(_)) => None,
        Err(e) => return Err(e),
    };
    let rr = db.build_repo_rev(id).await?;
    let cx = Context {
        build: build.as_ref(),
        repo_rev: rr.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
    };
    Ok(render(wh, row, &cx))
}

async fn deliver_one(
    db: &Db,
    client: &Client,
    wh: &Webhook,
    s: &NotifySettings,
    row: &OutboxRow,
) -> Result<(), DbError> {
    let outcome = match render_row(db, wh, row).await? {
        Rendered::Skip(why) => Attempt::Skipped(why),
        Rendered::Send { url, body } => {
            let mut headers = vec![
                ("X-Qr-Event", row.kind.as_str().to_string()),
                ("X-Qr-Delivery", row.key.clone()),
            ];
            if !wh.secret.is_empty() {
                headers.push(("X-Qr-Signature-256", signature(&wh.secret, &body)));
            }
            if let Some(t) = &wh.token {
                headers.push(("Authorization", format!("Bearer {t}")));
            }
            match client.post(&url, &headers, body).await {
                Ok(code) if (200..300).contains(&code) => Attempt::Delivered,
                Ok(code) => Attempt::Failed(format!("HTTP {code}")),
                Err(e) => Attempt::Failed(e.to_string()),
            }
        }
    };
    let now = now_ms();
    match outcome {
        Attempt::Delivered => {
            tracing::debug!(webhook = %wh.name, id = row.id, key = %row.key, build = ?row.build,
                event = row.kind.as_str(), "notification delivered");
            db.outbox_delivered(row.id, now, None).await
        }
        Attempt::Skipped(why) => {
            tracing::debug!(webhook = %wh.name, id = row.id, key = %row.key, build = ?row.build,
                reason = %why, "notification skipped");
            db.outbox_delivered(row.id, now, Some(&format!("skipped: {why}")))
                .await
        }
        Attempt::Failed(why) => {
            let wait = backoff(row.attempts + 1, s.retry_base, s.retry_max);
            tracing::warn!(webhook = %wh.name, id = row.id, key = %row.key, build = ?row.build,
                event = row.kind.as_str(), attempts = row.attempts + 1, retry_in = ?wait,
                error = %why, "notification not delivered; retrying later");
            let next = now.saturating_add(wait.as_millis() as i64);
            db.outbox_retry(row.id, next, &why).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (b, m) = (Duration::from_secs(2), Duration::from_secs(60));
        let got: Vec<u64> = (1..=7).map(|n| backoff(n, b, m).as_secs()).collect();
        assert_eq!(got, vec![2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(1000, b, m), m);
        assert_eq!(backoff(0, b, m), b);
    }
}
