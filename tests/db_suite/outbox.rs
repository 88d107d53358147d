//! The notification outbox (`[notify]`): rows written by the writes that make the changes they
//! announce, in the two-backend suite of `db_suite.rs`.

use anyhow::{Result, ensure};
use futures::future::join_all;
use qr::db::types::*;
use qr::db::*;

use super::{Ctx, SYSTEM, drv, new_build};

/// The same database with webhooks `a` (every event) and `b` (build_finished only).
async fn with_targets(ctx: &Ctx) -> Result<Db> {
    let mut t = NotifyTargets::default();
    for k in EventKind::ALL {
        t.add(k, "a");
    }
    t.add(EventKind::BuildFinished, "b");
    let opts = DbOptions {
        notify: t,
        ..DbOptions::default()
    };
    Ok(Db::connect_with(&ctx.url, opts).await?)
}

fn of(rows: &[OutboxRow], webhook: &str, kind: EventKind, build: BuildId) -> Vec<String> {
    rows.iter()
        .filter(|r| r.webhook == webhook && r.kind == kind && r.build == Some(build))
        .map(|r| r.key.clone())
        .collect()
}

fn done(build: BuildId, status: BuildStatus) -> FinishBuild {
    FinishBuild {
        build,
        status,
        start_time: Some(1_700_000_010),
        stop_time: 1_700_000_020,
        is_cached: false,
        outputs: vec![],
    }
}

/// Creates `n` step rows of `build`; their numbers.
async fn steps(db: &Db, build: BuildId, tag: &str, n: usize) -> Result<Vec<StepNr>> {
    let mut nrs = Vec::new();
    for i in 0..n {
        let s = NewStep::build(drv(&format!("{tag}-{i}")), SYSTEM);
        nrs.push(db.create_step(build, &s).await?);
    }
    Ok(nrs)
}

async fn start_all(db: &Db, build: BuildId, nrs: &[StepNr]) -> Result<()> {
    let started = join_all(
        nrs.iter()
            .map(|nr| db.start_step(build, *nr, "m", BusyPhase::Building, 1_700_000_005)),
    )
    .await;
    for r in started {
        r?;
    }
    Ok(())
}

pub async fn outbox_rows_come_with_the_changes_they_announce(ctx: Ctx) -> Result<()> {
    // Without webhooks: no rows.
    ctx.db.create_jobset("main", 100).await?;
    let quiet = ctx.db.create_build(&new_build("quiet", 0, 0)).await?;
    let nrs = steps(&ctx.db, quiet, "quiet", 2).await?;
    start_all(&ctx.db, quiet, &nrs).await?;
    ctx.db
        .finish_build(&done(quiet, BuildStatus::Success))
        .await?;
    ensure!(ctx.db.outbox().await?.is_empty());

    let db = with_targets(&ctx).await?;
    let b = db.create_build(&new_build("loud", 0, 0)).await?;
    ensure!(db.outbox().await?.is_empty(), "queueing is no event");
    // Eight steps starting together (one statement on PostgreSQL): one build_started.
    let nrs = steps(&db, b, "loud", 8).await?;
    start_all(&db, b, &nrs).await?;
    start_all(&db, b, &nrs[..2]).await?;
    let rows = db.outbox().await?;
    let started = of(&rows, "a", EventKind::BuildStarted, b);
    ensure!(started.len() == 1, "{rows:#?}");
    ensure!(
        nrs.iter()
            .any(|nr| started[0] == format!("qr-build_started-{}-{nr}", b.0)),
        "{started:?}"
    );
    ensure!(of(&rows, "b", EventKind::BuildStarted, b).is_empty());
    let row = rows.iter().find(|r| r.key == started[0]).unwrap();
    ensure!(row.payload["machine"] == "m" && row.delivered_at.is_none() && row.attempts == 0);

    // Finished: one row per webhook; then restarted, started and finished again: new keys.
    ensure!(db.finish_build(&done(b, BuildStatus::Failed)).await?);
    ensure!(!db.finish_build(&done(b, BuildStatus::Failed)).await?);
    ensure!(db.restart_build(b).await?);
    let again = steps(&db, b, "loud-again", 1).await?;
    start_all(&db, b, &again).await?;
    ensure!(db.finish_build(&done(b, BuildStatus::Success)).await?);
    let rows = db.outbox().await?;
    let started = of(&rows, "a", EventKind::BuildStarted, b);
    ensure!(
        started.len() == 2 && started[1] == format!("qr-build_started-{}-{}", b.0, again[0]),
        "{started:?}"
    );
    for w in ["a", "b"] {
        let keys = of(&rows, w, EventKind::BuildFinished, b);
        let want = vec![
            format!("qr-build_finished-{}-1", b.0),
            format!("qr-build_finished-{}-2", b.0),
        ];
        ensure!(keys == want, "{w}: {keys:?}");
    }
    let statuses: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r.webhook == "a" && r.kind == EventKind::BuildFinished)
        .map(|r| &r.payload["statusName"])
        .collect();
    ensure!(statuses == ["Failed", "Success"], "{statuses:?}");

    // Cancelled is finished too.
    let c = db.create_build(&new_build("cancelled", 0, 0)).await?;
    ensure!(db.cancel_build(c, 1_700_000_030).await?);
    let rows = db.outbox().await?;
    let cancelled: Vec<&OutboxRow> = rows.iter().filter(|r| r.build == Some(c)).collect();
    ensure!(cancelled.len() == 2, "{cancelled:#?}");
    ensure!(cancelled.iter().all(|r| r.payload["status"] == 4));

    // An evaluation: one row for `a`, named by its id, listing its builds.
    let e = NewEval {
        jobset: "main".into(),
        timestamp: 1_700_000_040,
        source: "-".into(),
        jobs: vec![NewEvalJob {
            job: "j".into(),
            drv_path: drv("evaljob"),
            system: SYSTEM.into(),
            outputs: vec![],
            constituents: vec![],
            max_silent: 7200,
            timeout: 36000,
            repo: Some("o/r".into()),
            rev: Some("abc".into()),
        }],
        errors: vec![],
    };
    let rec = db.record_eval(&e).await?;
    let rows = db.outbox().await?;
    let ev: Vec<&OutboxRow> = rows
        .iter()
        .filter(|r| r.kind == EventKind::EvalCompleted)
        .collect();
    ensure!(ev.len() == 1 && ev[0].webhook == "a", "{ev:#?}");
    ensure!(ev[0].key == format!("qr-eval_completed-{}", rec.id) && ev[0].eval == Some(rec.id));
    ensure!(ev[0].payload["builds"][0]["build"] == rec.members[0].build.0);
    let rr = db.build_repo_rev(rec.members[0].build).await?;
    ensure!(rr == Some(("o/r".into(), "abc".into())), "{rr:?}");
    ensure!(db.build_repo_rev(b).await?.is_none());

    // Delivery bookkeeping: due rows by webhook, retried later, then delivered.
    let now = now_ms();
    let due = db.outbox_due("b", now, 100).await?;
    ensure!(
        due.len() == 3 && due.iter().all(|r| r.webhook == "b"),
        "{due:#?}"
    );
    db.outbox_retry(due[0].id, now + 60_000, "HTTP 500").await?;
    let due2 = db.outbox_due("b", now, 100).await?;
    ensure!(due2.len() == 2 && due2.iter().all(|r| r.id != due[0].id));
    db.outbox_delivered(due[1].id, now, None).await?;
    let pending_before = db.outbox_pending("b").await?;
    db.outbox_delivered(due[1].id, now + 1, None).await?;
    ensure!(
        db.outbox_pending("b").await? == pending_before,
        "delivered once"
    );
    let rows = db.outbox().await?;
    let r0 = rows.iter().find(|r| r.id == due[0].id).unwrap();
    ensure!(r0.attempts == 1 && r0.last_error.as_deref() == Some("HTTP 500"));
    let r1 = rows.iter().find(|r| r.id == due[1].id).unwrap();
    ensure!(r1.delivered_at == Some(now) && r1.attempts == 1);
    Ok(())
}

/// A finish that fails half-way leaves no event; a lost commit reply leaves exactly one.
#[cfg(feature = "test-hooks")]
pub async fn an_event_commits_with_its_change_or_not_at_all(ctx: Ctx) -> Result<()> {
    let db = with_targets(&ctx).await?;
    db.create_jobset("main", 100).await?;
    let b = db.create_build(&new_build("faulty", 0, 0)).await?;
    db.arm_fault(FaultPoint::FinishBuildAfterBuildRow);
    let r = db.finish_build(&done(b, BuildStatus::Success)).await;
    ensure!(r.is_err(), "{r:?}");
    ensure!(!db.get_build(b).await?.finished);
    ensure!(
        db.outbox().await?.is_empty(),
        "an event for a change rolled back"
    );
    for lost in [FaultPoint::CommitLostBefore, FaultPoint::CommitLostAfter] {
        let b = db
            .create_build(&new_build(&format!("lost-{lost:?}"), 0, 0))
            .await?;
        let nrs = steps(&db, b, &format!("lost-{lost:?}"), 1).await?;
        db.arm_fault(lost);
        start_all(&db, b, &nrs).await?;
        db.arm_fault(lost);
        ensure!(db.finish_build(&done(b, BuildStatus::Success)).await?);
        let rows = db.outbox().await?;
        for (w, kind) in [
            ("a", EventKind::BuildStarted),
            ("a", EventKind::BuildFinished),
            ("b", EventKind::BuildFinished),
        ] {
            let keys = of(&rows, w, kind, b);
            ensure!(keys.len() == 1, "{lost:?} {w} {kind:?}: {keys:?}");
        }
    }
    db.disarm_faults();
    Ok(())
}
