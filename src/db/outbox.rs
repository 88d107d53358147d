//! The notification outbox (`[notify]` webhooks): one row per (event, webhook), inserted by the
//! write that makes the change it announces — in its transaction, or in its one statement — so an
//! event is never lost nor announced for a change that did not commit. The delivery task
//! (`crate::notify`) reads the due rows, POSTs them and marks them delivered or due again later.
//!
//! Which webhooks want which event is [`NotifyTargets`] (in [`DbOptions`](super::DbOptions)):
//! with none, the writes insert nothing and run as they did before.
//!
//! Idempotency keys are fixed when the row is inserted and derived from what the row announces:
//! `qr-build_started-<build>-<first step started>`, `qr-build_finished-<build>-<n>` (the build's
//! n-th finish announced to that webhook: a restarted build finishes again) and
//! `qr-eval_completed-<eval>`. `unique (webhook, key)` keeps a write applied twice (after a lost
//! reply) from queueing an event twice.

use super::Db;
use super::error::DbError;
use super::exec::{Row, Tx};
use super::types::{BuildId, BuildStatus, FinishBuild, StepNr};
use super::write::Write;

/// An event a webhook can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The first step of a build (since it was queued or restarted) started running.
    BuildStarted,
    /// A build finished (any status, cancelled included).
    BuildFinished,
    /// An evaluation (`qr submit --eval-jobs`) was recorded with its builds.
    EvalCompleted,
}

impl EventKind {
    pub const ALL: [EventKind; 3] = [
        EventKind::BuildStarted,
        EventKind::BuildFinished,
        EventKind::EvalCompleted,
    ];

    /// The name in the configuration, the `kind` column and the `X-Qr-Event` header.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BuildStarted => "build_started",
            EventKind::BuildFinished => "build_finished",
            EventKind::EvalCompleted => "eval_completed",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The webhooks (by name) that want each event. Empty: the writes insert no outbox rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyTargets {
    pub build_started: Vec<String>,
    pub build_finished: Vec<String>,
    pub eval_completed: Vec<String>,
}

impl NotifyTargets {
    pub fn of(&self, kind: EventKind) -> &[String] {
        match kind {
            EventKind::BuildStarted => &self.build_started,
            EventKind::BuildFinished => &self.build_finished,
            EventKind::EvalCompleted => &self.eval_completed,
        }
    }

    pub fn add(&mut self, kind: EventKind, webhook: &str) {
        let v = match kind {
            EventKind::BuildStarted => &mut self.build_started,
            EventKind::BuildFinished => &mut self.build_finished,
            EventKind::EvalCompleted => &mut self.eval_completed,
        };
        if !v.iter().any(|w| w == webhook) {
            v.push(webhook.to_string());
        }
    }

    pub fn is_empty(&self) -> bool {
        EventKind::ALL.into_iter().all(|k| self.of(k).is_empty())
    }
}

/// A row of `outbox`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub webhook: String,
    pub kind: EventKind,
    pub build: Option<BuildId>,
    pub eval: Option<i64>,
    /// The idempotency key (`X-Qr-Delivery`).
    pub key: String,
    /// The event's facts, as the write recorded them.
    pub payload: serde_json::Value,
    /// Unix milliseconds.
    pub created: i64,
    pub attempts: i32,
    pub next_attempt_at: i64,
    pub delivered_at: Option<i64>,
    pub last_error: Option<String>,
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const INSERT: &str = "insert into outbox (webhook, kind, build, eval, key, payload, open_start, \
     created, next_attempt_at) values ($1, $2, $3, $4, $5, $6, $7, $8, $8) on conflict do nothing";

const CLOSE_STARTS: &str =
    "update outbox set open_start = null where build = $1 and open_start = 1";

const FINISHES_ANNOUNCED: &str = "select count(*) from outbox \
     where webhook = $1 and build = $2 and kind = 'build_finished'";

/// `START_STEP` for many steps with their `build_started` rows, in one statement: `$1`–`$5` as
/// `PG_START_STEPS_MANY`, `$6` each step's payload, `$7` the webhooks, `$8` now (ms). The first
/// started step of each build (in this statement) is offered; the open-start index keeps one
/// per build and webhook.
pub(crate) const PG_START_STEPS_MANY_NOTIFY: &str = "with u as (
       update buildsteps b
       set busy = u.busy, machine = u.machine, starttime = u.starttime
       from unnest($1::int8[], $2::int4[], $3::int4[], $4::text[], $5::int8[], $6::text[])
           as u(build, stepnr, busy, machine, starttime, payload)
       where b.build = u.build and b.stepnr = u.stepnr and b.status is null
       returning b.build, b.stepnr, u.payload),
     o as (
       insert into outbox (webhook, kind, build, key, payload, open_start, created, next_attempt_at)
       select w.name, 'build_started', s.build, 'qr-build_started-' || s.build || '-' || s.stepnr,
              s.payload, 1, $8, $8
       from (select distinct on (build) build, stepnr, payload from u order by build, stepnr) s
       cross join unnest($7::text[]) as w(name)
       on conflict do nothing)
     select build, stepnr from u";

const COLUMNS: &str = "id, webhook, kind, build, eval, key, payload, created, attempts, \
     next_attempt_at, delivered_at, last_error";

const DUE: &str = "select id, webhook, kind, build, eval, key, payload, created, attempts, \
     next_attempt_at, delivered_at, last_error from outbox \
     where webhook = $1 and delivered_at is null and next_attempt_at <= $2 order by id limit $3";

const PENDING: &str = "select count(*) from outbox where webhook = $1 and delivered_at is null";

const MARK_DELIVERED: &str = "update outbox set delivered_at = $2, attempts = attempts + 1, \
     last_error = $3 where id = $1 and delivered_at is null";

const MARK_RETRY: &str = "update outbox set attempts = attempts + 1, next_attempt_at = $2, \
     last_error = $3 where id = $1 and delivered_at is null";

const REPO_REV: &str = "select repo, rev from jobsetevalmembers \
     where build = $1 and repo is not null and rev is not null order by eval desc limit 1";

/// The payload of a `build_started` row.
pub(crate) fn started_payload(build: BuildId, stepnr: StepNr, machine: &str, time: i64) -> String {
    serde_json::json!({"build": build.0, "step": stepnr, "machine": machine, "time": time})
        .to_string()
}

/// The status's name in payloads (`Success`, `Failed`, …).
pub fn status_name(s: BuildStatus) -> String {
    format!("{s:?}")
}

fn finished_payload(
    build: BuildId,
    status: BuildStatus,
    start: Option<i64>,
    stop: i64,
    cached: bool,
) -> String {
    serde_json::json!({
        "build": build.0,
        "status": status.code(),
        "statusName": status_name(status),
        "startTime": start,
        "stopTime": stop,
        "isCached": cached,
    })
    .to_string()
}

/// In `tx`: a step of `build` started; its `build_started` rows unless the build has one open.
pub(crate) async fn insert_started(
    tx: &mut Tx,
    targets: &NotifyTargets,
    build: BuildId,
    stepnr: StepNr,
    payload: &str,
) -> Result<(), DbError> {
    let key = format!("qr-build_started-{}-{stepnr}", build.0);
    let now = now_ms();
    for w in &targets.build_started {
        let args: [&dyn super::exec::Param; 8] = [
            w,
            &EventKind::BuildStarted.as_str(),
            &Some(build.0),
            &None::<i64>,
            &key,
            &payload,
            &Some(1i32),
            &now,
        ];
        tx.exec().execute(INSERT, &args).await?;
    }
    Ok(())
}

/// In `tx`: `f`'s build finished; closes its open `build_started` rows and inserts its
/// `build_finished` rows (key: the n-th finish announced to that webhook).
pub(crate) async fn insert_finished(
    tx: &mut Tx,
    targets: &NotifyTargets,
    build: BuildId,
    status: BuildStatus,
    start: Option<i64>,
    stop: i64,
    cached: bool,
) -> Result<(), DbError> {
    if targets.is_empty() {
        return Ok(());
    }
    // Closed whatever the webhooks now want: a start left open by an earlier configuration would
    // otherwise hide the next attempt's.
    tx.exec().execute(CLOSE_STARTS, &[&build.0]).await?;
    let payload = finished_payload(build, status, start, stop, cached);
    let now = now_ms();
    for w in &targets.build_finished {
        let n: i64 = match tx
            .exec()
            .fetch_optional(FINISHES_ANNOUNCED, &[w, &build.0])
            .await?
        {
            Some(r) => r.first()?,
            None => 0,
        };
        let key = format!("qr-build_finished-{}-{}", build.0, n + 1);
        let args: [&dyn super::exec::Param; 8] = [
            w,
            &EventKind::BuildFinished.as_str(),
            &Some(build.0),
            &None::<i64>,
            &key,
            &payload,
            &None::<i32>,
            &now,
        ];
        tx.exec().execute(INSERT, &args).await?;
    }
    Ok(())
}

/// [`insert_finished`] for a [`FinishBuild`].
pub(crate) async fn insert_finish(
    tx: &mut Tx,
    targets: &NotifyTargets,
    f: &FinishBuild,
) -> Result<(), DbError> {
    let start = f.start_time.or(Some(f.stop_time));
    insert_finished(
        tx,
        targets,
        f.build,
        f.status,
        start,
        f.stop_time,
        f.is_cached,
    )
    .await
}

/// In `tx`: evaluation `eval` was recorded; its `eval_completed` rows.
pub(crate) async fn insert_eval(
    tx: &mut Tx,
    targets: &NotifyTargets,
    eval: i64,
    payload: &serde_json::Value,
) -> Result<(), DbError> {
    let key = format!("qr-eval_completed-{eval}");
    let payload = payload.to_string();
    let now = now_ms();
    for w in &targets.eval_completed {
        let args: [&dyn super::exec::Param; 8] = [
            w,
            &EventKind::EvalCompleted.as_str(),
            &None::<i64>,
            &Some(eval),
            &key,
            &payload,
            &None::<i32>,
            &now,
        ];
        tx.exec().execute(INSERT, &args).await?;
    }
    Ok(())
}

fn outbox_row(r: &Row) -> Result<OutboxRow, DbError> {
    let kind: String = r.get("kind")?;
    let kind = EventKind::parse(&kind)
        .ok_or_else(|| DbError::Invalid(format!("outbox row with unknown kind {kind:?}")))?;
    let payload: String = r.get("payload")?;
    let payload = serde_json::from_str(&payload).map_err(|e| {
        DbError::Invalid(format!("outbox row with a payload that is not JSON: {e}"))
    })?;
    Ok(OutboxRow {
        id: r.get("id")?,
        webhook: r.get("webhook")?,
        kind,
        build: r.get::<Option<i64>>("build")?.map(BuildId),
        eval: r.get("eval")?,
        key: r.get("key")?,
        payload,
        created: r.get("created")?,
        attempts: r.get("attempts")?,
        next_attempt_at: r.get("next_attempt_at")?,
        delivered_at: r.get("delivered_at")?,
        last_error: r.get("last_error")?,
    })
}

/// Marking a row delivered (`note`: why it was not sent, when it was skipped).
pub(crate) struct MarkDelivered<'a> {
    pub(crate) id: i64,
    pub(crate) at: i64,
    pub(crate) note: Option<&'a str>,
}

impl Write for MarkDelivered<'_> {
    type Answer = ();
    type Trace = ();

    fn name(&self) -> &'static str {
        "outbox_delivered"
    }

    async fn apply(&self, db: &Db, _: &mut ()) -> Result<(), DbError> {
        db.execute_write(MARK_DELIVERED, &[&self.id, &self.at, &self.note])
            .await?;
        Ok(())
    }

    /// Only an undelivered row is updated: harmless again.
    async fn verify(&self, _: &Db, _: &()) -> Result<Option<()>, DbError> {
        Ok(None)
    }
}

/// Counting a failed attempt and setting when the row is due again.
pub(crate) struct MarkRetry<'a> {
    pub(crate) id: i64,
    pub(crate) next_attempt_at: i64,
    pub(crate) error: &'a str,
}

impl Write for MarkRetry<'_> {
    type Answer = ();
    type Trace = ();

    fn name(&self) -> &'static str {
        "outbox_retry"
    }

    async fn apply(&self, db: &Db, _: &mut ()) -> Result<(), DbError> {
        db.execute_write(MARK_RETRY, &[&self.id, &self.next_attempt_at, &self.error])
            .await?;
        Ok(())
    }

    /// Applied twice counts an attempt twice and sets the same due time: harmless.
    async fn verify(&self, _: &Db, _: &()) -> Result<Option<()>, DbError> {
        Ok(None)
    }
}

impl Db {
    /// The webhooks that want each event (`DbOptions::notify`).
    pub fn notify_targets(&self) -> &NotifyTargets {
        &self.inner.options.notify
    }

    /// Up to `limit` undelivered rows of `webhook` due at `now` (ms), oldest first.
    pub async fn outbox_due(
        &self,
        webhook: &str,
        now: i64,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, DbError> {
        self.reading("outbox_due", || async move {
            let rows = self
                .exec()
                .fetch_all(DUE, &[&webhook, &now, &limit])
                .await?;
            rows.iter().map(outbox_row).collect()
        })
        .await
    }

    /// Every row of the outbox, by id (tests, `docs/ops.md`'s checks).
    pub async fn outbox(&self) -> Result<Vec<OutboxRow>, DbError> {
        self.reading("outbox", || async move {
            let q = format!("select {COLUMNS} from outbox order by id");
            let rows = self.exec().fetch_all(&q, &[]).await?;
            rows.iter().map(outbox_row).collect()
        })
        .await
    }

    /// How many rows of `webhook` are not delivered yet.
    pub async fn outbox_pending(&self, webhook: &str) -> Result<i64, DbError> {
        self.reading("outbox_pending", || async move {
            match self.exec().fetch_optional(PENDING, &[&webhook]).await? {
                Some(r) => r.first(),
                None => Ok(0),
            }
        })
        .await
    }

    /// Marks row `id` delivered at `at` (ms); `note` says why it was not sent, if it was skipped.
    pub async fn outbox_delivered(
        &self,
        id: i64,
        at: i64,
        note: Option<&str>,
    ) -> Result<(), DbError> {
        self.write(&MarkDelivered { id, at, note }).await
    }

    /// Counts a failed attempt of row `id` and makes it due again at `next` (ms).
    pub async fn outbox_retry(&self, id: i64, next: i64, error: &str) -> Result<(), DbError> {
        self.write(&MarkRetry {
            id,
            next_attempt_at: next,
            error,
        })
        .await
    }

    /// The `meta.repo` / `meta.rev` of the newest evaluation job naming `build` that carries both.
    pub async fn build_repo_rev(
        &self,
        build: BuildId,
    ) -> Result<Option<(String, String)>, DbError> {
        self.reading("build_repo_rev", || async move {
            match self.exec().fetch_optional(REPO_REV, &[&build.0]).await? {
                Some(r) => Ok(Some((r.get("repo")?, r.get("rev")?))),
                None => Ok(None),
            }
        })
        .await
    }
}
