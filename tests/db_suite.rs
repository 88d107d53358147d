//! The database test suite: every test body runs against SQLite (a fresh file per test) and
//! against PostgreSQL (a fresh database per test, dropped after; URL from `QR_TEST_DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`). If PostgreSQL is unreachable, the
//! PostgreSQL half fails when `CI` is set and is skipped, saying so, otherwise.
//!
//! `cargo test --test db_suite -- --nocapture query_plans` prints the query plans.

use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use qr::db::*;
use sqlx::Connection;

const PG_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// What a test body gets: the handle, and the URL to reopen the same database.
struct Ctx {
    db: Db,
    url: String,
}

impl Ctx {
    fn backend(&self) -> Backend {
        self.db.backend()
    }
}

// ------------------------------------------------------------------------------------ harness

/// Logs (retries, reconnects) go to the test's captured output; `RUST_LOG` filters (default
/// `qr=warn`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("qr=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

async fn run_body<F, Fut>(ctx: Ctx, body: F) -> Result<(), String>
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    // Spawned: a panic is caught (so the database is dropped after), and the futures of the
    // `Db` API are proven `Send`.
    match tokio::spawn(body(ctx)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(e.to_string()),
    }
}

async fn with_sqlite<F, Fut>(body: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    // A directory that does not exist yet: connect creates it.
    let url = format!("sqlite://{}/state/qr.db", dir.path().display());
    let db = Db::connect(&url, 8).await.expect("open SQLite");
    if let Err(e) = run_body(Ctx { db, url }, body).await {
        panic!("SQLite: {e}");
    }
}

fn pg_base_url() -> String {
    std::env::var("QR_TEST_DATABASE_URL").unwrap_or_else(|_| PG_DEFAULT.to_string())
}

fn url_with_database(base: &str, db: &str) -> String {
    let (main, query) = match base.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (base, None),
    };
    let after_scheme = main.find("://").map_or(0, |i| i + 3);
    let path = main[after_scheme..]
        .find('/')
        .map_or(main.len(), |i| i + after_scheme);
    match query {
        Some(q) => format!("{}/{db}?{q}", &main[..path]),
        None => format!("{}/{db}", &main[..path]),
    }
}

/// Says, once per test binary and visibly (past libtest's output capture), that the
/// PostgreSQL half was skipped.
fn say_skipped(base: &str, why: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::SeqCst) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "PostgreSQL not reachable at {}: PostgreSQL half skipped ({why})",
            redact_url(base)
        );
    }
}

async fn pg_admin(base: &str) -> Option<sqlx::PgConnection> {
    let attempt = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(base));
    let why = match attempt.await {
        Ok(Ok(c)) => return Some(c),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_string(),
    };
    if std::env::var_os("CI").is_some() {
        panic!(
            "PostgreSQL not reachable at {} ({why}), and CI is set: the PostgreSQL half must run",
            redact_url(base)
        );
    }
    say_skipped(base, &why);
    None
}

async fn with_postgres<F, Fut>(name: &str, body: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    static SEQ: AtomicU32 = AtomicU32::new(0);
    init_tracing();
    let base = pg_base_url();
    let Some(mut admin) = pg_admin(&base).await else {
        return;
    };
    let short: String = name.chars().take(32).collect();
    let dbname = format!(
        "qr_t_{short}_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    );
    sqlx::query(&format!(
        r#"drop database if exists "{dbname}" with (force)"#
    ))
    .execute(&mut admin)
    .await
    .expect("drop stale test database");
    sqlx::query(&format!(r#"create database "{dbname}""#))
        .execute(&mut admin)
        .await
        .expect("create test database");
    let url = url_with_database(&base, &dbname);
    let result = match Db::connect(&url, 8).await {
        Ok(db) => run_body(Ctx { db, url }, body).await,
        Err(e) => Err(format!("connect: {e}")),
    };
    let dropped = sqlx::query(&format!(
        r#"drop database if exists "{dbname}" with (force)"#
    ))
    .execute(&mut admin)
    .await;
    if let Err(e) = result {
        panic!("PostgreSQL: {e}");
    }
    dropped.expect("drop test database");
}

/// Each name is an `async fn(Ctx) -> Result<()>` below, run once per backend.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    crate::with_sqlite(crate::$name).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    crate::with_postgres(stringify!($name), crate::$name).await
                }
            )*
        }
    };
}

suite!(
    migrations_apply_and_are_idempotent,
    check_constraint_ties_status_13_to_resolvedtostep,
    concurrent_step_numbers_never_collide,
    writes_arriving_together_are_answered_one_by_one,
    repeated_output_names_end_as_upserts_leave_them,
    notifications_wake_a_listener,
    rescan_timer_fires,
    listener_survives_a_lost_connection,
    queue_order_and_incremental_reads,
    build_lifecycle,
    step_lifecycle,
    restart_recovery,
    restart_recovery_aborts_only_the_rows_it_names,
    failed_paths,
    realisations,
    jobsets_and_shares,
    retries_transient_failures,
    query_plans_use_indexes,
    evals_record_members_errors_and_constituents,
    a_drv_with_a_build_in_the_jobset_is_not_queued_again,
    outbox_rows_come_with_the_changes_they_announce,
    produced_rows_link_to_their_producers_row,
);

#[path = "db_suite/evals.rs"]
mod evals;
#[path = "db_suite/outbox.rs"]
mod outbox;
#[path = "db_suite/produced.rs"]
mod produced;
#[cfg(feature = "test-hooks")]
use evals::record_eval_is_one_transaction;
use evals::{
    a_drv_with_a_build_in_the_jobset_is_not_queued_again,
    evals_record_members_errors_and_constituents,
};
#[cfg(feature = "test-hooks")]
use outbox::an_event_commits_with_its_change_or_not_at_all;
use outbox::outbox_rows_come_with_the_changes_they_announce;
#[cfg(feature = "test-hooks")]
use produced::a_produced_row_and_its_links_commit_together;
use produced::produced_rows_link_to_their_producers_row;

/// The tests that arm database faults: only with the `test-hooks` feature (scripts/test enables
/// it), the only build in which `Db::arm_fault` exists.
#[cfg(feature = "test-hooks")]
mod faults {
    suite!(
        resolve_transaction_is_all_or_nothing,
        create_and_resolve_is_one_transaction,
        lost_commit_replies_are_read_back,
        finish_step_transaction_is_all_or_nothing,
        record_eval_is_one_transaction,
        an_event_commits_with_its_change_or_not_at_all,
        a_produced_row_and_its_links_commit_together,
    );
}

// ------------------------------------------------------------------------------------ helpers

const SYSTEM: &str = "x86_64-linux";

fn drv(name: &str) -> String {
    format!("/nix/store/{:0>32}-{name}.drv", name.len())
}

fn new_build(job: &str, priority: i32, global_priority: i32) -> NewBuild {
    NewBuild {
        jobset: "main".into(),
        job: job.into(),
        drv_path: drv(job),
        system: SYSTEM.into(),
        priority,
        global_priority,
        max_silent: 3600,
        timeout: 36000,
        timestamp: 1_700_000_000,
        outputs: vec![("out".into(), None)],
    }
}

async fn setup_build(db: &Db, job: &str) -> Result<BuildId> {
    db.create_jobset("main", 100).await?;
    Ok(db.create_build(&new_build(job, 0, 0)).await?)
}

fn finish(build: BuildId, stepnr: StepNr, status: BuildStatus) -> FinishStep {
    FinishStep {
        build,
        stepnr,
        status,
        error_msg: None,
        stop_time: 1_700_000_100,
        times_built: Some(1),
        outputs: vec![],
        realisations: vec![],
        machine: None,
    }
}

async fn next_event(l: &mut QueueListener) -> Result<QueueEvent> {
    tokio::time::timeout(Duration::from_secs(10), l.next())
        .await
        .context("no queue event within 10 s")?
        .context("listener failed")
}

/// The next event that is not a `Rescan` (a reconnecting listener may interleave those).
async fn next_change(l: &mut QueueListener) -> Result<QueueEvent> {
    loop {
        match next_event(l).await? {
            QueueEvent::Rescan => continue,
            ev => return Ok(ev),
        }
    }
}

// ------------------------------------------------------------------------------------ tests

async fn migrations_apply_and_are_idempotent(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    for table in [
        "jobsets",
        "builds",
        "buildoutputs",
        "buildsteps",
        "buildstepoutputs",
        "failedpaths",
        "realisations",
    ] {
        db.execute_unchecked(&format!("delete from {table} where 1 = 0"))
            .await
            .with_context(|| format!("table {table}"))?;
    }
    let id = setup_build(db, "hello").await?;
    // Reopening (a restart) re-runs the migrator: nothing to do, nothing lost.
    for _ in 0..2 {
        let again = Db::connect(&ctx.url, 2).await?;
        ensure!(again.get_build(id).await?.job == "hello");
        again.close().await;
    }
    let applied = db
        .execute_unchecked("update _sqlx_migrations set success = success")
        .await?;
    let expected = match ctx.backend() {
        Backend::Sqlite => SQLITE_MIGRATOR.iter().count(),
        Backend::Postgres => POSTGRES_MIGRATOR.iter().count(),
    };
    ensure!(
        applied as usize == expected,
        "{applied} migrations recorded, {expected} embedded"
    );
    Ok(())
}

async fn check_constraint_ties_status_13_to_resolvedtostep(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let b = setup_build(db, "check").await?;
    let one = db.create_step(b, &NewStep::build(drv("a"), SYSTEM)).await?;
    ensure!(one == 1);
    let insert = |nr: i32, status: &str, resolved: &str| {
        format!(
            "insert into buildsteps (build, stepnr, type, drvpath, busy, status, resolvedtostep) \
             values ({b}, {nr}, 0, '/nix/store/x.drv', 0, {status}, {resolved})"
        )
    };
    // Status 13 without resolvedtostep.
    let e = db.execute_unchecked(&insert(2, "13", "null")).await;
    ensure!(
        e.as_ref().is_err_and(|e| e.is_check_violation()),
        "13 without target: {e:?}"
    );
    // resolvedtostep without status 13: another status, and no status at all.
    let e = db.execute_unchecked(&insert(3, "1", "1")).await;
    ensure!(
        e.as_ref().is_err_and(|e| e.is_check_violation()),
        "target with status 1: {e:?}"
    );
    let e = db.execute_unchecked(&insert(4, "null", "1")).await;
    ensure!(
        e.as_ref().is_err_and(|e| e.is_check_violation()),
        "target with NULL status: {e:?}"
    );
    // Both together: accepted.
    ensure!(db.execute_unchecked(&insert(5, "13", "1")).await? == 1);
    // ... and neither can be taken away alone.
    let e = db
        .execute_unchecked(&format!(
            "update buildsteps set resolvedtostep = null where build = {b} and stepnr = 5"
        ))
        .await;
    ensure!(e.as_ref().is_err_and(|e| e.is_check_violation()), "{e:?}");
    let e = db
        .execute_unchecked(&format!(
            "update buildsteps set status = 13 where build = {b} and stepnr = 1"
        ))
        .await;
    ensure!(e.as_ref().is_err_and(|e| e.is_check_violation()), "{e:?}");
    // The target must exist in the same build (foreign key).
    let e = db.execute_unchecked(&insert(6, "13", "99")).await;
    ensure!(
        e.as_ref().is_err_and(|e| e.is_foreign_key_violation()),
        "{e:?}"
    );
    // The typed API refuses to write Resolved outside resolve_step.
    let mut s = NewStep::build(drv("b"), SYSTEM);
    s.status = Some(BuildStatus::Resolved);
    ensure!(matches!(
        db.create_step(b, &s).await,
        Err(DbError::Invalid(_))
    ));
    let mut f = finish(b, 1, BuildStatus::Resolved);
    f.error_msg = Some("x".into());
    ensure!(matches!(db.finish_step(&f).await, Err(DbError::Invalid(_))));
    Ok(())
}

#[cfg(feature = "test-hooks")]
async fn resolve_transaction_is_all_or_nothing(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let b = setup_build(db, "ca").await?;
    let mut original = NewStep::build(drv("ca"), SYSTEM);
    original.outputs = vec![("out".into(), None)];
    let s1 = db.create_step(b, &original).await?;
    db.start_step(b, s1, "localhost", BusyPhase::Preparing, 1_700_000_010)
        .await?;
    let before_steps = db.steps_of_build(b).await?;
    let before_build = db.get_build(b).await?;

    let mut resolved = NewStep::build(drv("ca-resolved"), SYSTEM);
    resolved.outputs = vec![("out".into(), None)];

    // A fault between "insert the resolved row" and "mark the original".
    db.arm_fault(FaultPoint::ResolveAfterInsert);
    let r = db.resolve_step(b, s1, &resolved, 1_700_000_020).await;
    ensure!(
        matches!(
            r,
            Err(DbError::FaultInjected(FaultPoint::ResolveAfterInsert))
        ),
        "{r:?}"
    );
    ensure!(
        db.steps_of_build(b).await? == before_steps,
        "rollback left rows changed"
    );
    ensure!(
        db.get_build(b).await? == before_build,
        "counter not rolled back"
    );
    ensure!(db.step_outputs(b, 2).await?.is_empty());
    ensure!(db.resolved_steps().await?.is_empty());

    // Unarmed: both rows, the resolved one first (it gets the next number).
    let s2 = db.resolve_step(b, s1, &resolved, 1_700_000_020).await?;
    ensure!(s2 == 2);
    let orig = db.step(b, s1).await?;
    ensure!(orig.status == Some(BuildStatus::Resolved));
    ensure!(orig.resolved_to_step == Some(s2));
    ensure!(orig.busy == BusyPhase::NotBusy);
    ensure!(orig.stop_time == Some(1_700_000_020));
    let new = db.step(b, s2).await?;
    ensure!(new.drv_path == drv("ca-resolved"));
    ensure!(new.status.is_none() && new.resolved_to_step.is_none());
    ensure!(
        db.step_outputs(b, s2).await?
            == [OutputRow {
                name: "out".into(),
                path: None
            }]
    );
    let pairs = db.resolved_steps().await?;
    ensure!(pairs.len() == 1 && pairs[0].original == orig && pairs[0].resolved == new);
    ensure!(db.steps_resolved_to(b, s2).await? == std::slice::from_ref(&orig));

    // Resolving a finished step fails and inserts nothing.
    let r = db.resolve_step(b, s1, &resolved, 1_700_000_030).await;
    ensure!(matches!(r, Err(DbError::StepFinished { .. })), "{r:?}");
    ensure!(db.steps_of_build(b).await?.len() == 2);
    ensure!(db.get_build(b).await?.last_step_nr == 2);
    let r = db.resolve_step(b, 77, &resolved, 1_700_000_030).await;
    ensure!(matches!(r, Err(DbError::StepNotFound { .. })), "{r:?}");
    let r = db.resolve_step(BuildId(9999), 1, &resolved, 0).await;
    ensure!(matches!(r, Err(DbError::BuildNotFound(_))), "{r:?}");
    ensure!(db.steps_of_build(b).await?.len() == 2);
    Ok(())
}

/// A step with no row yet gets it and its resolution in one transaction: a failure between the
/// statements leaves no pending row behind (found by the kill -9 torture test: the restarted
/// step made a new row and the first stayed pending after the build succeeded).
#[cfg(feature = "test-hooks")]
async fn create_and_resolve_is_one_transaction(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let b = setup_build(db, "car").await?;
    let mut original = NewStep::build(drv("car"), SYSTEM);
    original.outputs = vec![("out".into(), None)];
    let mut resolved = NewStep::build(drv("car-resolved"), SYSTEM);
    resolved.outputs = vec![("out".into(), None)];
    db.arm_fault(FaultPoint::ResolveAfterInsert);
    let r = db
        .create_and_resolve_step(b, &original, &resolved, 1_700_000_020)
        .await;
    ensure!(
        matches!(
            r,
            Err(DbError::FaultInjected(FaultPoint::ResolveAfterInsert))
        ),
        "{r:?}"
    );
    ensure!(db.steps_of_build(b).await?.is_empty(), "rollback left rows");
    ensure!(db.get_build(b).await?.last_step_nr == 0);
    let (own, child) = db
        .create_and_resolve_step(b, &original, &resolved, 1_700_000_020)
        .await?;
    ensure!((own, child) == (1, 2), "{own} {child}");
    let orig = db.step(b, own).await?;
    ensure!(orig.status == Some(BuildStatus::Resolved) && orig.resolved_to_step == Some(child));
    ensure!(orig.drv_path == drv("car") && orig.stop_time == Some(1_700_000_020));
    let new = db.step(b, child).await?;
    ensure!(new.drv_path == drv("car-resolved") && new.status.is_none());
    ensure!(db.step_outputs(b, own).await?.len() == 1);
    ensure!(db.step_outputs(b, child).await?.len() == 1);
    let pairs = db.resolved_steps().await?;
    ensure!(pairs.len() == 1 && pairs[0].original == orig && pairs[0].resolved == new);
    // The original must be unfinished.
    let mut done = original.clone();
    done.status = Some(BuildStatus::Success);
    ensure!(matches!(
        db.create_and_resolve_step(b, &done, &resolved, 1).await,
        Err(DbError::Invalid(_))
    ));
    ensure!(db.steps_of_build(b).await?.len() == 2);
    Ok(())
}

/// A connection lost during COMMIT, before it reached the server (nothing committed) or after
/// (committed, reply lost): every write transaction ends with its effect exactly once and the
/// result it would have had (found by the database-drop torture test, where a lost reply made
/// `qr run` give up a build or exit).
#[cfg(feature = "test-hooks")]
async fn lost_commit_replies_are_read_back(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    db.create_jobset("main", 100).await?;
    for lost in [FaultPoint::CommitLostBefore, FaultPoint::CommitLostAfter] {
        let tag = format!("{lost:?}");
        let job = format!("lost-{tag}");
        let before = db.unfinished_builds().await?.len();
        db.arm_fault(lost);
        let b = db.create_build(&new_build(&job, 0, 0)).await?;
        ensure!(
            db.unfinished_builds().await?.len() == before + 1,
            "{tag}: create_build made one build"
        );
        ensure!(db.get_build(b).await?.drv_path == drv(&job), "{tag}");

        let mut s = NewStep::build(drv(&format!("{job}-a")), SYSTEM);
        s.busy = BusyPhase::Building;
        s.start_time = Some(1_700_000_010);
        s.machine = "m".into();
        db.arm_fault(lost);
        let a = db.create_step(b, &s).await?;
        ensure!(
            db.steps_of_build(b).await?.len() == 1 && a == 1,
            "{tag}: create_step made one row: {:?}",
            db.steps_of_build(b).await?
        );

        let mut f = finish(b, a, BuildStatus::Success);
        f.outputs = vec![("out".into(), Some("/nix/store/o-a".into()))];
        db.arm_fault(lost);
        ensure!(db.finish_step(&f).await?.is_empty(), "{tag}: finish_step");
        ensure!(db.step(b, a).await?.status == Some(BuildStatus::Success));

        let own = NewStep::build(drv(&format!("{job}-ca")), SYSTEM);
        let res = NewStep::build(drv(&format!("{job}-ca-resolved")), SYSTEM);
        db.arm_fault(lost);
        let (o, r) = db
            .create_and_resolve_step(b, &own, &res, 1_700_000_020)
            .await?;
        let steps = db.steps_of_build(b).await?;
        ensure!(
            steps.len() == 3 && (o, r) == (2, 3),
            "{tag}: create_and_resolve_step made one pair: {steps:?}"
        );
        ensure!(db.step(b, o).await?.resolved_to_step == Some(r));

        let own2 = db
            .create_step(b, &NewStep::build(drv(&format!("{job}-ca2")), SYSTEM))
            .await?;
        db.arm_fault(lost);
        let r2 = db.resolve_step(b, own2, &res, 1_700_000_030).await?;
        let steps = db.steps_of_build(b).await?;
        ensure!(
            steps.len() == 5 && r2 == 5,
            "{tag}: resolve_step made one row: {steps:?}"
        );
        ensure!(db.step(b, own2).await?.resolved_to_step == Some(r2));

        let fb = FinishBuild {
            build: b,
            status: BuildStatus::Failed,
            start_time: Some(1_700_000_010),
            stop_time: 1_700_000_100,
            is_cached: false,
            outputs: vec![],
        };
        db.arm_fault(lost);
        ensure!(
            db.finish_build(&fb).await?,
            "{tag}: finish_build reports it finished"
        );
        ensure!(db.get_build(b).await?.build_status == Some(BuildStatus::Failed));
        db.arm_fault(lost);
        ensure!(
            db.restart_build(b).await?,
            "{tag}: restart_build reports it restarted"
        );
        ensure!(!db.get_build(b).await?.finished);

        let mut busy = NewStep::build(drv(&format!("{job}-busy")), SYSTEM);
        busy.busy = BusyPhase::Building;
        db.create_step(b, &busy).await?;
        db.arm_fault(lost);
        db.abort_busy_steps(1_700_000_200, "lost").await?;
        ensure!(db.busy_steps().await?.is_empty(), "{tag}: abort_busy_steps");
        db.disarm_faults();
    }
    Ok(())
}

#[cfg(feature = "test-hooks")]
async fn finish_step_transaction_is_all_or_nothing(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let b = setup_build(db, "fin").await?;
    let mut s = NewStep::build(drv("fin"), SYSTEM);
    s.outputs = vec![("out".into(), None), ("dev".into(), None)];
    let nr = db.create_step(b, &s).await?;
    db.start_step(b, nr, "m1", BusyPhase::Building, 1_700_000_010)
        .await?;
    let before = db.step(b, nr).await?;
    let mut f = finish(b, nr, BuildStatus::Success);
    f.outputs = vec![
        ("out".into(), Some("/nix/store/o-fin".into())),
        ("dev".into(), Some("/nix/store/d-fin".into())),
    ];
    f.realisations = vec![Realisation {
        drv_path: drv("fin"),
        output_name: "out".into(),
        out_path: "/nix/store/o-fin".into(),
        build: Some(b),
        stepnr: Some(nr),
    }];

    db.arm_fault(FaultPoint::FinishStepAfterStepRow);
    let r = db.finish_step(&f).await;
    ensure!(matches!(r, Err(DbError::FaultInjected(_))), "{r:?}");
    ensure!(db.step(b, nr).await? == before);
    ensure!(
        db.step_outputs(b, nr)
            .await?
            .iter()
            .all(|o| o.path.is_none())
    );
    ensure!(db.realisations_for_drv(&drv("fin")).await?.is_empty());

    ensure!(db.finish_step(&f).await?.is_empty());
    let after = db.step(b, nr).await?;
    ensure!(after.status == Some(BuildStatus::Success) && after.busy == BusyPhase::NotBusy);
    ensure!(
        db.step_outputs(b, nr).await?
            == [
                OutputRow {
                    name: "dev".into(),
                    path: Some("/nix/store/d-fin".into())
                },
                OutputRow {
                    name: "out".into(),
                    path: Some("/nix/store/o-fin".into())
                },
            ]
    );
    ensure!(db.realisations_for_drv(&drv("fin")).await? == f.realisations);

    // Same for finish_build.
    db.arm_fault(FaultPoint::FinishBuildAfterBuildRow);
    let fb = FinishBuild {
        build: b,
        status: BuildStatus::Success,
        start_time: Some(1_700_000_010),
        stop_time: 1_700_000_100,
        is_cached: false,
        outputs: vec![("out".into(), Some("/nix/store/o-fin".into()))],
    };
    ensure!(matches!(
        db.finish_build(&fb).await,
        Err(DbError::FaultInjected(_))
    ));
    ensure!(!db.get_build(b).await?.finished);
    ensure!(db.build_outputs(b).await?[0].path.is_none());
    ensure!(db.finish_build(&fb).await?);
    ensure!(db.build_outputs(b).await?[0].path.as_deref() == Some("/nix/store/o-fin"));

    // And for create_step: the allocated number is rolled back with the row.
    db.arm_fault(FaultPoint::CreateStepAfterAlloc);
    ensure!(db.create_step(b, &s).await.is_err());
    ensure!(db.get_build(b).await?.last_step_nr == 1);
    ensure!(db.create_step(b, &s).await? == 2);
    Ok(())
}

/// Many writers at once (on PostgreSQL they share one statement per kind): each gets its own
/// answer — its numbers, its error, its realisation conflict — and each row is as written
/// alone; on PostgreSQL far fewer transactions are committed than writes were made.
async fn writes_arriving_together_are_answered_one_by_one(ctx: Ctx) -> Result<()> {
    use futures::future::join_all;
    const N: usize = 40;
    let db = &ctx.db;
    let b = setup_build(db, "together").await?;
    let other = db.create_build(&new_build("together-2", 0, 0)).await?;
    let builds = [b, other];
    let steps: Vec<(BuildId, NewStep)> = (0..N)
        .map(|i| {
            let mut s = NewStep::build(drv(&format!("tg-{i}")), SYSTEM);
            s.busy = BusyPhase::Building;
            s.machine = format!("m{i}");
            s.outputs = vec![("out".into(), None), ("dev".into(), None)];
            (builds[i % 2], s)
        })
        .collect();
    let created = join_all(steps.iter().map(|(b, s)| db.create_step(*b, s))).await;
    let created: Vec<StepNr> = created.into_iter().collect::<Result<_, _>>()?;
    for bb in builds {
        let mut nrs: Vec<StepNr> = (0..N)
            .filter(|i| builds[i % 2] == bb)
            .map(|i| created[i])
            .collect();
        nrs.sort_unstable();
        ensure!(
            nrs == (1..=(N / 2) as StepNr).collect::<Vec<_>>(),
            "build {bb}: numbers {nrs:?}"
        );
    }
    for (i, (bb, s)) in steps.iter().enumerate() {
        let row = db.step(*bb, created[i]).await?;
        ensure!(row.drv_path == s.drv_path && row.machine == s.machine && row.status.is_none());
        ensure!(db.step_outputs(*bb, created[i]).await?.len() == 2);
    }
    // A realisation recorded before, with another path: step 0 finishing disagrees with it.
    let real = |i: usize, path: &str| Realisation {
        drv_path: drv(&format!("tg-{i}")),
        output_name: "out".into(),
        out_path: path.into(),
        build: Some(builds[i % 2]),
        stepnr: Some(created[i]),
    };
    db.insert_realisation(&real(0, "/nix/store/recorded-first"))
        .await?;
    let finishes: Vec<FinishStep> = (0..N)
        .map(|i| {
            let mut f = finish(builds[i % 2], created[i], BuildStatus::Success);
            f.outputs = vec![("out".into(), Some(format!("/nix/store/o-{i}")))];
            f.realisations = vec![real(i, &format!("/nix/store/o-{i}"))];
            f
        })
        .collect();
    let before = db.write_transactions();
    // Step 1 twice: exactly one of the two finishes it.
    let answers = join_all(
        finishes
            .iter()
            .chain(std::iter::once(&finishes[1]))
            .map(|f| db.finish_step(f)),
    )
    .await;
    let writes = db.write_transactions() - before;
    let step1: Vec<_> = [&answers[1], &answers[N]].into_iter().collect();
    ensure!(
        step1.iter().filter(|a| a.is_ok()).count() == 1
            && step1
                .iter()
                .any(|a| matches!(a, Err(DbError::StepFinished { .. }))),
        "the step finished twice: {step1:?}"
    );
    match &answers[0] {
        Ok(c) if c.len() == 1 && c[0].existing == "/nix/store/recorded-first" => {}
        other => bail!("step 0's disagreement: {other:?}"),
    }
    for (i, a) in answers.iter().enumerate().take(N).skip(2) {
        ensure!(matches!(a, Ok(c) if c.is_empty()), "step {i}: {a:?}");
    }
    for (i, f) in finishes.iter().enumerate() {
        ensure!(db.step(f.build, f.stepnr).await?.status == Some(BuildStatus::Success));
        let outs = db.step_outputs(f.build, f.stepnr).await?;
        let want = format!("/nix/store/o-{i}");
        ensure!(
            outs.iter()
                .any(|o| o.name == "out" && o.path.as_deref() == Some(want.as_str())),
            "step {i}: outputs {outs:?}"
        );
        let recorded = db.realisation(&drv(&format!("tg-{i}")), "out").await?;
        let want = if i == 0 {
            "/nix/store/recorded-first".into()
        } else {
            want
        };
        ensure!(
            recorded.map(|r| r.out_path) == Some(want),
            "step {i}'s realisation"
        );
    }
    if ctx.backend() == Backend::Postgres {
        ensure!(
            writes < (N / 2) as u64,
            "{N} finishes took {writes} write transactions"
        );
    }
    // Realisations: the same one again is fine, another path for a recorded one is refused.
    let again = join_all((0..N).map(|i| {
        let path = if i == 5 {
            "/nix/store/else".into()
        } else {
            format!("/nix/store/o-{i}")
        };
        async move { db.insert_realisation(&real(i, &path)).await }
    }))
    .await;
    for (i, a) in again.iter().enumerate() {
        match (i, a) {
            (0, Err(DbError::RealisationConflict(_)))
            | (5, Err(DbError::RealisationConflict(_))) => {}
            (0 | 5, _) => bail!("realisation {i} again: {a:?}"),
            (_, Ok(())) => {}
            (_, Err(e)) => bail!("realisation {i} again: {e}"),
        }
    }
    // Steps created already Resolved, with the step they are resolved to, numbered in pairs.
    let pairs = join_all((0..10).map(|i| async move {
        let own = NewStep::build(drv(&format!("tg-ca-{i}")), SYSTEM);
        let res = NewStep::build(drv(&format!("tg-ca-{i}-resolved")), SYSTEM);
        db.create_and_resolve_step(b, &own, &res, 1_700_000_200)
            .await
    }))
    .await;
    let mut seen = Vec::new();
    for (i, p) in pairs.into_iter().enumerate() {
        let (o, r) = p?;
        ensure!(r == o + 1, "pair {i}: {o} {r}");
        let own = db.step(b, o).await?;
        ensure!(own.status == Some(BuildStatus::Resolved) && own.resolved_to_step == Some(r));
        ensure!(own.drv_path == drv(&format!("tg-ca-{i}")));
        let res = db.step(b, r).await?;
        ensure!(res.status.is_none() && res.drv_path == drv(&format!("tg-ca-{i}-resolved")));
        seen.extend([o, r]);
    }
    seen.sort_unstable();
    ensure!(seen == ((N / 2 + 1) as StepNr..=(N / 2 + 20) as StepNr).collect::<Vec<_>>());
    // Starting: each step's own machine.
    let steps = &steps;
    let started = join_all((0..N).step_by(2).map(|i| async move {
        let (bb, nr) = (builds[0], db.create_step(builds[0], &steps[i].1).await?);
        db.start_step(bb, nr, &format!("s{i}"), BusyPhase::Building, 7)
            .await?;
        Ok::<_, DbError>((nr, i))
    }))
    .await;
    for s in started {
        let (nr, i) = s?;
        let row = db.step(builds[0], nr).await?;
        ensure!(row.machine == format!("s{i}") && row.start_time == Some(7));
    }
    ensure!(matches!(
        db.start_step(b, created[0], "late", BusyPhase::Building, 8)
            .await,
        Err(DbError::StepFinished { .. })
    ));
    // Builds finishing together: each its own answer; a second finish of one is refused.
    let fb = |bb: BuildId| FinishBuild {
        build: bb,
        status: BuildStatus::Success,
        start_time: None,
        stop_time: 1_700_000_300,
        is_cached: false,
        outputs: vec![("out".into(), Some(format!("/nix/store/b-{}", bb.0)))],
    };
    let done = join_all([b, other, b].map(|bb| {
        let f = fb(bb);
        async move { db.finish_build(&f).await }
    }))
    .await;
    let done: Vec<bool> = done.into_iter().collect::<Result<_, _>>()?;
    ensure!(
        done[1] && done[0] != done[2],
        "builds finished together: {done:?}"
    );
    for bb in builds {
        let row = db.get_build(bb).await?;
        ensure!(row.finished && row.build_status == Some(BuildStatus::Success));
        let outs = db.build_outputs(bb).await?;
        let want = format!("/nix/store/b-{}", bb.0);
        ensure!(
            outs.iter()
                .any(|o| o.name == "out" && o.path.as_deref() == Some(want.as_str())),
            "build {bb}: outputs {outs:?}"
        );
    }
    ensure!(matches!(
        db.finish_build(&fb(BuildId(999_999))).await,
        Err(DbError::BuildNotFound(_))
    ));
    Ok(())
}

async fn concurrent_step_numbers_never_collide(ctx: Ctx) -> Result<()> {
    const TASKS: usize = 16;
    const PER_TASK: usize = 12;
    let db = &ctx.db;
    let b1 = setup_build(db, "c1").await?;
    let b2 = db.create_build(&new_build("c2", 0, 0)).await?;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let db = db.clone();
        handles.push(tokio::spawn(async move {
            let mut got: Vec<(BuildId, StepNr)> = Vec::new();
            for i in 0..PER_TASK {
                let b = if (t + i) % 2 == 0 { b1 } else { b2 };
                let mut s = NewStep::build(drv(&format!("t{t}-{i}")), SYSTEM);
                s.outputs = vec![("out".into(), None)];
                let nr = db.create_step(b, &s).await?;
                got.push((b, nr));
                // Resolving allocates too, in the same transaction as its two writes.
                if i % 4 == 3 {
                    let r = NewStep::build(drv(&format!("t{t}-{i}-r")), SYSTEM);
                    got.push((b, db.resolve_step(b, nr, &r, 1).await?));
                }
            }
            Ok::<_, DbError>(got)
        }));
    }
    let mut all: Vec<(BuildId, StepNr)> = Vec::new();
    for h in handles {
        all.extend(h.await??);
    }
    for b in [b1, b2] {
        let mut nrs: Vec<StepNr> = all
            .iter()
            .filter(|(x, _)| *x == b)
            .map(|(_, n)| *n)
            .collect();
        let n = nrs.len();
        nrs.sort_unstable();
        nrs.dedup();
        ensure!(nrs.len() == n, "duplicate step numbers for build {b}");
        ensure!(
            nrs == (1..=n as StepNr).collect::<Vec<_>>(),
            "gaps for build {b}: {nrs:?}"
        );
        let rows = db.steps_of_build(b).await?;
        ensure!(rows.iter().map(|s| s.stepnr).collect::<Vec<_>>() == nrs);
        ensure!(db.get_build(b).await?.last_step_nr == n as StepNr);
    }
    ensure!(all.len() == TASKS * (PER_TASK + PER_TASK / 4));
    ensure!(db.resolved_steps().await?.len() == TASKS * PER_TASK / 4);
    Ok(())
}

async fn notifications_wake_a_listener(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    db.create_jobset("main", 100).await?;
    let mut l = db.listen_every(Duration::from_secs(3600)).await?;
    let id = db.create_build(&new_build("n", 0, 0)).await?;
    ensure!(next_change(&mut l).await? == QueueEvent::BuildsAdded(Some(id)));
    // Step writes touch builds.laststepnr but announce nothing.
    db.create_step(id, &NewStep::build(drv("n"), SYSTEM))
        .await?;
    ensure!(db.bump_build(id, 10).await?);
    ensure!(next_change(&mut l).await? == QueueEvent::BuildsBumped(Some(id)));
    ensure!(db.cancel_build(id, 1_700_000_100).await?);
    ensure!(next_change(&mut l).await? == QueueEvent::BuildsCancelled(Some(id)));
    ensure!(db.restart_build(id).await?);
    ensure!(next_change(&mut l).await? == QueueEvent::BuildsRestarted(Some(id)));
    // A second listener, and (on PostgreSQL) a writer through another handle.
    let mut l2 = db.listen_every(Duration::from_secs(3600)).await?;
    let writer = if ctx.backend() == Backend::Postgres {
        Db::connect(&ctx.url, 1).await?
    } else {
        db.clone()
    };
    let id2 = writer.create_build(&new_build("n2", 0, 0)).await?;
    ensure!(next_change(&mut l).await? == QueueEvent::BuildsAdded(Some(id2)));
    ensure!(next_change(&mut l2).await? == QueueEvent::BuildsAdded(Some(id2)));
    // Nothing else was announced.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(l.try_next().is_none(), "unexpected event");
    Ok(())
}

async fn rescan_timer_fires(ctx: Ctx) -> Result<()> {
    let mut l = ctx.db.listen_every(Duration::from_millis(100)).await?;
    ensure!(next_event(&mut l).await? == QueueEvent::Rescan);
    ensure!(next_event(&mut l).await? == QueueEvent::Rescan);
    Ok(())
}

async fn listener_survives_a_lost_connection(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    db.create_jobset("main", 100).await?;
    let mut l = db.listen_every(Duration::from_secs(3600)).await?;
    let Some(pool) = db.postgres_pool() else {
        // SQLite has no connection to lose: the in-process channel lives as long as the Db.
        let id = db.create_build(&new_build("x", 0, 0)).await?;
        ensure!(next_change(&mut l).await? == QueueEvent::BuildsAdded(Some(id)));
        return Ok(());
    };
    // Kill every other session of this database: the listener's and the pool's.
    let mut admin = pool.acquire().await?;
    let killed: i64 = sqlx::query_scalar(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity \
         where datname = current_database() and pid <> pg_backend_pid()",
    )
    .fetch_one(&mut *admin)
    .await?;
    drop(admin);
    ensure!(killed >= 1, "no session killed");
    // The listener notices, reconnects, and says notifications may have been missed.
    ensure!(next_event(&mut l).await? == QueueEvent::Rescan);
    // The pool reconnects too (dead connections are replaced; transient errors retried).
    let id = db.create_build(&new_build("after", 0, 0)).await?;
    ensure!(next_change(&mut l).await? == QueueEvent::BuildsAdded(Some(id)));
    Ok(())
}

async fn queue_order_and_incremental_reads(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    db.create_jobset("main", 100).await?;
    let a = db.create_build(&new_build("a", 0, 0)).await?;
    let b = db.create_build(&new_build("b", 5, 0)).await?;
    let c = db.create_build(&new_build("c", 0, 1)).await?;
    let d = db.create_build(&new_build("d", 5, 0)).await?;
    let ids = |v: Vec<Build>| v.into_iter().map(|b| b.id).collect::<Vec<_>>();
    ensure!(ids(db.unfinished_builds().await?) == [c, b, d, a]);
    ensure!(db.cancel_build(b, 1_700_000_001).await?);
    ensure!(ids(db.unfinished_builds().await?) == [c, d, a]);
    ensure!(ids(db.unfinished_builds_since(a).await?) == [c, d]);
    ensure!(ids(db.unfinished_builds_since(d).await?).is_empty());
    ensure!(db.bump_build(a, 7).await?);
    ensure!(ids(db.unfinished_builds().await?) == [a, c, d]);
    Ok(())
}

async fn build_lifecycle(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let id = setup_build(db, "life").await?;
    let b = db.get_build(id).await?;
    ensure!(b.job == "life" && b.drv_path == drv("life") && b.system == SYSTEM);
    ensure!(!b.finished && b.build_status.is_none() && b.last_step_nr == 0);
    ensure!(b.timestamp == 1_700_000_000 && b.max_silent == 3600 && b.timeout == 36000);
    ensure!(
        db.build_outputs(id).await?
            == [OutputRow {
                name: "out".into(),
                path: None
            }]
    );

    let missing = BuildId(424242);
    ensure!(matches!(db.get_build(missing).await, Err(DbError::BuildNotFound(x)) if x == missing));
    ensure!(matches!(
        db.cancel_build(missing, 0).await,
        Err(DbError::BuildNotFound(_))
    ));
    ensure!(matches!(
        db.restart_build(missing).await,
        Err(DbError::BuildNotFound(_))
    ));
    ensure!(matches!(
        db.bump_build(missing, 1).await,
        Err(DbError::BuildNotFound(_))
    ));
    let mut nb = new_build("orphan", 0, 0);
    nb.jobset = "nope".into();
    let r = db.create_build(&nb).await;
    ensure!(
        matches!(r, Err(DbError::JobsetNotFound(ref j)) if j == "nope"),
        "{r:?}"
    );

    ensure!(
        !db.restart_build(id).await?,
        "restart of an unfinished build"
    );
    let f = FinishBuild {
        build: id,
        status: BuildStatus::Failed,
        start_time: Some(1_700_000_010),
        stop_time: 1_700_000_050,
        is_cached: true,
        outputs: vec![("out".into(), Some("/nix/store/o-life".into()))],
    };
    ensure!(db.finish_build(&f).await?);
    let done = db.get_build(id).await?;
    ensure!(
        done.finished && done.build_status == Some(BuildStatus::Failed) && done.is_cached_build
    );
    ensure!(done.start_time == Some(1_700_000_010) && done.stop_time == Some(1_700_000_050));
    // A finished build is never touched again.
    let again = FinishBuild {
        status: BuildStatus::Success,
        stop_time: 1_700_000_999,
        outputs: vec![("out".into(), Some("/nix/store/other".into()))],
        ..f.clone()
    };
    ensure!(!db.finish_build(&again).await?);
    ensure!(!db.cancel_build(id, 1_700_000_999).await?);
    ensure!(!db.bump_build(id, 100).await?);
    ensure!(db.get_build(id).await? == done);
    ensure!(db.build_outputs(id).await?[0].path.as_deref() == Some("/nix/store/o-life"));

    ensure!(db.restart_build(id).await?);
    let r = db.get_build(id).await?;
    ensure!(!r.finished && r.build_status.is_none() && r.stop_time.is_none() && !r.is_cached_build);
    ensure!(db.cancel_build(id, 1_700_001_000).await?);
    let c = db.get_build(id).await?;
    ensure!(c.finished && c.build_status == Some(BuildStatus::Cancelled));
    ensure!(c.stop_time == Some(1_700_001_000));
    ensure!(
        c.start_time == Some(1_700_001_000),
        "never started: start = stop"
    );
    // Finishing without a start time (e.g. cached) records start = stop, as Hydra requires.
    ensure!(db.restart_build(id).await?);
    let cached = FinishBuild {
        start_time: None,
        stop_time: 1_700_002_000,
        is_cached: true,
        status: BuildStatus::Success,
        ..f
    };
    ensure!(db.finish_build(&cached).await?);
    let c = db.get_build(id).await?;
    ensure!(c.start_time == Some(1_700_002_000) && c.stop_time == Some(1_700_002_000));
    // The schema refuses a finished build without times.
    let e = db
        .execute_unchecked(&format!(
            "update builds set finished = 0, starttime = null where id = {id}"
        ))
        .await;
    ensure!(e.is_ok(), "{e:?}");
    let e = db
        .execute_unchecked(&format!("update builds set finished = 1 where id = {id}"))
        .await;
    ensure!(e.as_ref().is_err_and(|e| e.is_check_violation()), "{e:?}");
    Ok(())
}

async fn step_lifecycle(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let b = setup_build(db, "steps").await?;
    let mut s = NewStep::build(drv("dep"), SYSTEM);
    s.outputs = vec![("out".into(), Some("/nix/store/o-dep".into()))];
    let nr = db.create_step(b, &s).await?;
    ensure!(nr == 1);
    let row = db.step(b, nr).await?;
    ensure!(row.step_type == StepType::Build && row.busy == BusyPhase::NotBusy);
    ensure!(
        row.status.is_none() && row.machine.is_empty() && row.system.as_deref() == Some(SYSTEM)
    );

    db.start_step(b, nr, "builder-1", BusyPhase::Preparing, 1_700_000_010)
        .await?;
    for phase in [
        BusyPhase::Connecting,
        BusyPhase::SendingInputs,
        BusyPhase::Building,
    ] {
        db.set_step_busy(b, nr, phase).await?;
        ensure!(db.step(b, nr).await?.busy == phase);
    }
    ensure!(
        db.busy_steps()
            .await?
            .iter()
            .any(|s| s.build == b && s.stepnr == nr)
    );
    let started = db.step(b, nr).await?;
    ensure!(started.machine == "builder-1" && started.start_time == Some(1_700_000_010));

    let mut f = finish(b, nr, BuildStatus::Failed);
    f.error_msg = Some("builder failed with exit code 1".into());
    f.times_built = Some(2);
    ensure!(db.finish_step(&f).await?.is_empty());
    let row = db.step(b, nr).await?;
    ensure!(row.status == Some(BuildStatus::Failed) && row.busy == BusyPhase::NotBusy);
    ensure!(row.error_msg.as_deref() == Some("builder failed with exit code 1"));
    ensure!(row.times_built == Some(2) && row.stop_time == Some(1_700_000_100));
    ensure!(row.machine == "builder-1");
    ensure!(db.busy_steps().await?.is_empty());

    // Finished steps stay finished.
    ensure!(matches!(
        db.finish_step(&f).await,
        Err(DbError::StepFinished { .. })
    ));
    ensure!(matches!(
        db.start_step(b, nr, "x", BusyPhase::Building, 0).await,
        Err(DbError::StepFinished { .. })
    ));
    ensure!(matches!(
        db.set_step_busy(b, 9, BusyPhase::Building).await,
        Err(DbError::StepNotFound { .. })
    ));
    ensure!(matches!(
        db.step(b, 9).await,
        Err(DbError::StepNotFound { .. })
    ));
    ensure!(matches!(
        db.create_step(BuildId(31337), &s).await,
        Err(DbError::BuildNotFound(_))
    ));

    // A step created already finished (e.g. a cached failure), and one propagated from another build.
    let mut cached = NewStep::build(drv("cached"), SYSTEM);
    cached.status = Some(BuildStatus::CachedFailure);
    cached.stop_time = Some(1_700_000_200);
    cached.propagated_from = Some(b);
    cached.step_type = StepType::Substitution;
    let n2 = db.create_step(b, &cached).await?;
    let r2 = db.step(b, n2).await?;
    ensure!(r2.status == Some(BuildStatus::CachedFailure) && r2.propagated_from == Some(b));
    ensure!(r2.step_type == StepType::Substitution);
    ensure!(db.steps_of_build(b).await?.len() == 2);
    Ok(())
}

async fn restart_recovery(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let b1 = setup_build(db, "r1").await?;
    let b2 = db.create_build(&new_build("r2", 0, 0)).await?;
    let busy1 = db
        .create_step(b1, &NewStep::build(drv("busy1"), SYSTEM))
        .await?;
    db.start_step(b1, busy1, "m", BusyPhase::Building, 10)
        .await?;
    let done = db
        .create_step(b1, &NewStep::build(drv("done"), SYSTEM))
        .await?;
    db.start_step(b1, done, "m", BusyPhase::Building, 10)
        .await?;
    db.finish_step(&finish(b1, done, BuildStatus::Success))
        .await?;
    let ca = db
        .create_step(b2, &NewStep::build(drv("ca"), SYSTEM))
        .await?;
    let res = db
        .resolve_step(b2, ca, &NewStep::build(drv("ca-res"), SYSTEM), 20)
        .await?;
    db.start_step(b2, res, "m", BusyPhase::ReceivingOutputs, 21)
        .await?;
    let pending = db
        .create_step(b2, &NewStep::build(drv("pending"), SYSTEM))
        .await?;

    // "Crash": the runner restarts and finds rows left busy.
    let busy: Vec<_> = db
        .busy_steps()
        .await?
        .iter()
        .map(|s| (s.build, s.stepnr))
        .collect();
    ensure!(busy == [(b1, busy1), (b2, res)], "{busy:?}");
    let aborted = db.abort_busy_steps(1_000, "aborted by restart").await?;
    ensure!(
        aborted
            .iter()
            .map(|s| (s.build, s.stepnr))
            .collect::<Vec<_>>()
            == busy
    );
    for s in &aborted {
        ensure!(s.status == Some(BuildStatus::Aborted) && s.busy == BusyPhase::NotBusy);
        ensure!(s.stop_time == Some(1_000) && s.error_msg.as_deref() == Some("aborted by restart"));
        ensure!(db.step(s.build, s.stepnr).await? == *s);
    }
    ensure!(db.busy_steps().await?.is_empty());
    ensure!(db.abort_busy_steps(2_000, "again").await?.is_empty());
    // Untouched: the finished step and the pending one.
    ensure!(db.step(b1, done).await?.status == Some(BuildStatus::Success));
    ensure!(db.step(b2, pending).await?.status.is_none());
    // Resolved rows and their targets, so step actors reattach.
    let pairs = db.resolved_steps().await?;
    ensure!(pairs.len() == 1);
    ensure!((pairs[0].original.build, pairs[0].original.stepnr) == (b2, ca));
    ensure!((pairs[0].resolved.build, pairs[0].resolved.stepnr) == (b2, res));
    ensure!(pairs[0].resolved.status == Some(BuildStatus::Aborted));
    Ok(())
}

/// `abort_steps` closes exactly the rows named (still unfinished) and leaves the other busy rows
/// busy: the rows restart recovery carries for a remote builder (`actors/carried.rs`).
async fn restart_recovery_aborts_only_the_rows_it_names(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let b = setup_build(db, "ra").await?;
    let local = db
        .create_step(b, &NewStep::build(drv("local"), SYSTEM))
        .await?;
    db.start_step(b, local, "localhost", BusyPhase::Building, 10)
        .await?;
    let remote = db
        .create_step(b, &NewStep::build(drv("remote"), SYSTEM))
        .await?;
    db.start_step(b, remote, "builder-1", BusyPhase::Building, 11)
        .await?;
    let done = db
        .create_step(b, &NewStep::build(drv("done"), SYSTEM))
        .await?;
    db.finish_step(&finish(b, done, BuildStatus::Success))
        .await?;
    // A named row that is finished already is not touched (nor returned).
    let closed = db
        .abort_steps(&[(b, local), (b, done)], 1_000, "stopped")
        .await?;
    ensure!(
        closed
            .iter()
            .map(|s| (s.build, s.stepnr))
            .collect::<Vec<_>>()
            == [(b, local)],
        "{closed:?}"
    );
    let l = db.step(b, local).await?;
    ensure!(l.status == Some(BuildStatus::Aborted) && l.busy == BusyPhase::NotBusy);
    ensure!(l.stop_time == Some(1_000) && l.error_msg.as_deref() == Some("stopped"));
    ensure!(l.machine == "localhost" && l.start_time == Some(10));
    ensure!(db.step(b, done).await?.status == Some(BuildStatus::Success));
    // The carried row: still busy, as it was.
    let r = db.step(b, remote).await?;
    ensure!(r.status.is_none() && r.busy == BusyPhase::Building, "{r:?}");
    ensure!(r.machine == "builder-1" && r.start_time == Some(11));
    let busy: Vec<_> = db.busy_steps().await?.iter().map(|s| s.stepnr).collect();
    ensure!(busy == [remote], "{busy:?}");
    // Again (a lost commit reply, a second start): nothing more is closed.
    ensure!(
        db.abort_steps(&[(b, local)], 2_000, "again")
            .await?
            .is_empty()
    );
    ensure!(db.step(b, local).await?.stop_time == Some(1_000));
    // No rows: a no-op.
    ensure!(db.abort_steps(&[], 3_000, "none").await?.is_empty());
    ensure!(db.step(b, remote).await?.busy == BusyPhase::Building);
    Ok(())
}

async fn failed_paths(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    ensure!(!db.is_failed_path("/nix/store/f1").await?);
    db.add_failed_path("/nix/store/f1").await?;
    db.add_failed_path("/nix/store/f1").await?;
    db.add_failed_path("/nix/store/f2").await?;
    ensure!(db.is_failed_path("/nix/store/f1").await?);
    let ask: Vec<String> = [
        "/nix/store/f2",
        "/nix/store/nope",
        "/nix/store/f1",
        "/nix/store/f2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ensure!(db.failed_paths_among(&ask).await? == ["/nix/store/f1", "/nix/store/f2"]);
    ensure!(db.failed_paths_among(&[]).await?.is_empty());
    // Many at once (more than one SQLite statement's worth).
    let many: Vec<String> = (0..1200).map(|i| format!("/nix/store/m{i:04}")).collect();
    for p in many.iter().step_by(300) {
        db.add_failed_path(p).await?;
    }
    ensure!(db.failed_paths_among(&many).await?.len() == 4);
    ensure!(db.remove_failed_path("/nix/store/f2").await?);
    ensure!(!db.remove_failed_path("/nix/store/f2").await?);

    // Restarting a build forgets the failures of its steps.
    let b = setup_build(db, "fp").await?;
    let mut s = NewStep::build(drv("fp-dep"), SYSTEM);
    s.outputs = vec![("out".into(), Some("/nix/store/o-fp-dep".into()))];
    let nr = db.create_step(b, &s).await?;
    db.finish_step(&finish(b, nr, BuildStatus::Failed)).await?;
    db.add_failed_path(&drv("fp-dep")).await?;
    db.add_failed_path("/nix/store/o-fp-dep").await?;
    db.cancel_build(b, 5).await?;
    ensure!(db.restart_build(b).await?);
    ensure!(!db.is_failed_path(&drv("fp-dep")).await?);
    ensure!(!db.is_failed_path("/nix/store/o-fp-dep").await?);
    ensure!(db.is_failed_path("/nix/store/f1").await?);
    Ok(())
}

/// An output named twice (a path learned late): the known path wins, a later unknown one does
/// not erase it — on create and on finish, however the backend writes them (PostgreSQL does it
/// in one statement, which must not touch a row twice).
async fn repeated_output_names_end_as_upserts_leave_them(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let b = setup_build(db, "ro").await?;
    let mut s = NewStep::build(drv("ro"), SYSTEM);
    s.outputs = vec![
        ("out".into(), None),
        ("out".into(), Some("/nix/store/ro-out".into())),
        ("dev".into(), Some("/nix/store/ro-dev".into())),
        ("dev".into(), None),
    ];
    let nr = db.create_step(b, &s).await?;
    let rows = |v: Vec<qr::db::OutputRow>| {
        v.into_iter()
            .map(|o| (o.name, o.path))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let got = rows(db.step_outputs(b, nr).await?);
    ensure!(
        got == [
            ("dev".to_string(), Some("/nix/store/ro-dev".to_string())),
            ("out".to_string(), Some("/nix/store/ro-out".to_string())),
        ]
        .into_iter()
        .collect(),
        "after create: {got:?}"
    );
    let mut f = finish(b, nr, BuildStatus::Success);
    f.outputs = vec![
        ("lib".into(), Some("/nix/store/ro-lib".into())),
        ("lib".into(), None),
        ("out".into(), None),
    ];
    ensure!(db.finish_step(&f).await?.is_empty());
    let got = rows(db.step_outputs(b, nr).await?);
    ensure!(got.len() == 3, "after finish: {got:?}");
    ensure!(got["lib"].as_deref() == Some("/nix/store/ro-lib"));
    ensure!(got["out"].as_deref() == Some("/nix/store/ro-out"));
    // A finished step cannot be finished again, and nothing of the second attempt is written.
    let mut again = finish(b, nr, BuildStatus::Failed);
    again.outputs = vec![("bin".into(), Some("/nix/store/ro-bin".into()))];
    ensure!(matches!(
        db.finish_step(&again).await,
        Err(DbError::StepFinished { .. })
    ));
    ensure!(!rows(db.step_outputs(b, nr).await?).contains_key("bin"));
    Ok(())
}

async fn realisations(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    let b = setup_build(db, "rl").await?;
    let nr = db
        .create_step(b, &NewStep::build(drv("rl"), SYSTEM))
        .await?;
    let r = |out: &str, path: &str| Realisation {
        drv_path: drv("rl"),
        output_name: out.into(),
        out_path: path.into(),
        build: Some(b),
        stepnr: Some(nr),
    };
    ensure!(db.realisation(&drv("rl"), "out").await?.is_none());
    db.insert_realisation(&r("out", "/nix/store/o1")).await?;
    db.insert_realisation(&r("out", "/nix/store/o1")).await?; // idempotent
    db.insert_realisation(&r("dev", "/nix/store/d1")).await?;
    let e = db.insert_realisation(&r("out", "/nix/store/o2")).await;
    match e {
        Err(DbError::RealisationConflict(c)) => {
            ensure!(c.existing == "/nix/store/o1" && c.attempted == "/nix/store/o2");
        }
        other => bail!("expected a conflict, got {other:?}"),
    }
    ensure!(db.realisation(&drv("rl"), "out").await? == Some(r("out", "/nix/store/o1")));
    ensure!(
        db.realisations_for_drv(&drv("rl")).await?
            == [r("dev", "/nix/store/d1"), r("out", "/nix/store/o1")]
    );
    // From elsewhere (no step).
    let foreign = Realisation {
        build: None,
        stepnr: None,
        ..r("lib", "/nix/store/l1")
    };
    db.insert_realisation(&foreign).await?;
    ensure!(db.realisation(&drv("rl"), "lib").await? == Some(foreign));

    // finish_step keeps the recorded one, reports the disagreement, commits the rest.
    let mut f = finish(b, nr, BuildStatus::Success);
    f.realisations = vec![r("out", "/nix/store/o3"), r("doc", "/nix/store/doc1")];
    let conflicts = db.finish_step(&f).await?;
    ensure!(conflicts.len() == 1 && conflicts[0].attempted == "/nix/store/o3");
    ensure!(db.step(b, nr).await?.status == Some(BuildStatus::Success));
    ensure!(db.realisation(&drv("rl"), "doc").await?.is_some());
    ensure!(
        db.realisation(&drv("rl"), "out")
            .await?
            .map(|x| x.out_path)
            .as_deref()
            == Some("/nix/store/o1")
    );

    // The build trace outlives the build: deleting it keeps the realisations, unattributed.
    db.execute_unchecked(&format!("delete from builds where id = {b}"))
        .await?;
    let left = db.realisations_for_drv(&drv("rl")).await?;
    ensure!(left.len() == 4 && left.iter().all(|x| x.build.is_none() && x.stepnr.is_none()));
    Ok(())
}

async fn jobsets_and_shares(ctx: Ctx) -> Result<()> {
    let db = &ctx.db;
    db.create_jobset("main", 100).await?;
    db.create_jobset("other", 10).await?;
    db.create_jobset("other", 20).await?;
    ensure!(matches!(
        db.create_jobset("bad", 0).await,
        Err(DbError::Invalid(_))
    ));
    let js = db.jobsets().await?;
    ensure!(
        js == [
            Jobset {
                name: "main".into(),
                scheduling_shares: 100
            },
            Jobset {
                name: "other".into(),
                scheduling_shares: 20
            },
        ]
    );
    let b = db.create_build(&new_build("js", 0, 0)).await?;
    let mut nb = new_build("js2", 0, 0);
    nb.jobset = "other".into();
    let b2 = db.create_build(&nb).await?;
    for (build, start, stop) in [(b, 100, 160), (b, 200, 230), (b2, 100, 105), (b2, 0, 50)] {
        let nr = db
            .create_step(build, &NewStep::build(drv("s"), SYSTEM))
            .await?;
        db.start_step(build, nr, "m", BusyPhase::Building, start)
            .await?;
        let mut f = finish(build, nr, BuildStatus::Success);
        f.stop_time = stop;
        db.finish_step(&f).await?;
    }
    let secs = db.jobset_seconds_since(100).await?;
    ensure!(
        secs == [
            JobsetSeconds {
                jobset: "main".into(),
                seconds: 90
            },
            JobsetSeconds {
                jobset: "other".into(),
                seconds: 5
            },
        ],
        "{secs:?}"
    );
    Ok(())
}

async fn retries_transient_failures(ctx: Ctx) -> Result<()> {
    match ctx.backend() {
        Backend::Sqlite => {
            // Another connection holds the write lock: SQLITE_BUSY after 1 ms, retried.
            let patient = DbOptions {
                sqlite_busy_timeout: Duration::from_millis(1),
                retry: RetryPolicy {
                    max_attempts: 40,
                    base_delay: Duration::from_millis(5),
                    max_delay: Duration::from_millis(20),
                },
                ..DbOptions::default()
            };
            let db = Db::connect_with(&ctx.url, patient.clone()).await?;
            let mut locker = sqlx::SqliteConnection::connect(&ctx.url).await?;
            sqlx::query("BEGIN IMMEDIATE").execute(&mut locker).await?;
            let release = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                sqlx::query("COMMIT")
                    .execute(&mut locker)
                    .await
                    .map(|_| locker)
            });
            db.create_jobset("main", 1).await?; // waits out the lock by retrying
            let mut locker = release.await??;
            // Held for good: the bounded retries give up and surface the busy error.
            let impatient = Db::connect_with(
                &ctx.url,
                DbOptions {
                    retry: RetryPolicy {
                        max_attempts: 3,
                        ..patient.retry
                    },
                    ..patient
                },
            )
            .await?;
            sqlx::query("BEGIN IMMEDIATE").execute(&mut locker).await?;
            let e = impatient.create_jobset("x", 1).await;
            ensure!(
                e.as_ref()
                    .is_err_and(|e| e.transient() == Some(Transient::Busy)),
                "{e:?}"
            );
            sqlx::query("ROLLBACK").execute(&mut locker).await?;
        }
        Backend::Postgres => {
            // Under SERIALIZABLE, concurrent step creation on one build conflicts on the builds
            // row (40001 "could not serialize access due to concurrent update"); every
            // operation still succeeds, by retrying.
            ctx.db
                .execute_unchecked(
                    "do $$ begin execute format('alter database %I set \
                     default_transaction_isolation = serializable', current_database()); end $$",
                )
                .await?;
            let db = Db::connect_with(
                &ctx.url,
                DbOptions {
                    retry: RetryPolicy {
                        max_attempts: 100,
                        base_delay: Duration::from_millis(2),
                        max_delay: Duration::from_millis(50),
                    },
                    ..DbOptions::default()
                },
            )
            .await?;
            let level: String = sqlx::query_scalar("show transaction_isolation")
                .fetch_one(db.postgres_pool().context("pool")?)
                .await?;
            ensure!(level == "serializable", "{level}");
            let b = setup_build(&db, "ser").await?;
            let mut hs = Vec::new();
            for t in 0..8 {
                let db = db.clone();
                hs.push(tokio::spawn(async move {
                    for i in 0..5 {
                        db.create_step(b, &NewStep::build(drv(&format!("{t}-{i}")), SYSTEM))
                            .await?;
                    }
                    Ok::<_, DbError>(())
                }));
            }
            for h in hs {
                h.await??;
            }
            ensure!(db.get_build(b).await?.last_step_nr == 40);
            ensure!(db.steps_of_build(b).await?.len() == 40);
        }
    }
    Ok(())
}

/// A database of some size, analysed, so the planners choose as they would in production:
/// 5000 builds (50 unfinished), 20000 steps (20 busy, 20 Resolved: 10 in unfinished builds, 10
/// in finished ones with their targets left pending), their outputs and realisations, 500
/// cached failures.
async fn populate(db: &Db) -> Result<()> {
    let series = |n: u32| match db.backend() {
        Backend::Sqlite => {
            format!("with recursive n(i) as (select 1 union all select i + 1 from n where i < {n})")
        }
        Backend::Postgres => format!("with n(i) as (select generate_series(1, {n}))"),
    };
    db.create_jobset("main", 100).await?;
    db.create_jobset("other", 50).await?;
    let statements = [
        format!(
            "{} insert into builds (jobset, job, drvpath, system, timestamp, finished, \
             buildstatus, laststepnr, priority, globalpriority, starttime, stoptime) \
             select case when i % 3 = 0 then 'other' else 'main' end, 'job' || i, \
             '/nix/store/b' || i || '.drv', 'x86_64-linux', i, \
             case when i % 100 = 0 then 0 else 1 end, case when i % 100 = 0 then null else 0 end, \
             4, i % 7, 0, case when i % 100 = 0 then null else i end, \
             case when i % 100 = 0 then null else i + 1 end from n",
            series(5000)
        ),
        format!(
            "{} insert into buildsteps (build, stepnr, type, drvpath, busy, status, starttime, \
             stoptime, machine, system) \
             select (i - 1) / 4 + 1, (i - 1) % 4 + 1, 0, '/nix/store/s' || i || '.drv', \
             case when i % 1000 = 1 then 30 else 0 end, case when i % 1000 = 1 then null else 0 end, \
             i * 10, case when i % 1000 = 1 then null else i * 10 + 5 end, 'm', 'x86_64-linux' from n",
            series(20000)
        ),
        "update buildsteps set status = 13, resolvedtostep = 4 \
         where stepnr = 3 and build % 500 = 0"
            .to_string(),
        "update buildsteps set status = 13, resolvedtostep = 4 \
         where stepnr = 3 and build % 500 = 250"
            .to_string(),
        "update buildsteps set status = null, stoptime = null \
         where stepnr = 4 and build % 500 = 250"
            .to_string(),
        "insert into buildstepoutputs (build, stepnr, name, path) \
         select build, stepnr, 'out', '/nix/store/o' || build || '-' || stepnr from buildsteps"
            .to_string(),
        "insert into buildoutputs (build, name, path) \
         select id, 'out', '/nix/store/bo' || id from builds"
            .to_string(),
        "insert into realisations (drvpath, outputname, outpath, build, stepnr) \
         select drvpath, 'out', '/nix/store/r' || build || '-' || stepnr, build, stepnr \
         from buildsteps where status = 0"
            .to_string(),
        "insert into failedpaths (path) select drvpath from buildsteps \
         where stepnr = 1 and build % 10 = 0"
            .to_string(),
        // Evaluations: 100 of 50 jobs each, every tenth build an aggregate of the three before.
        format!(
            "{} insert into jobsetevals (jobset, timestamp, source) select 'main', i, 'f' from n",
            series(100)
        ),
        "insert into jobsetevalmembers (eval, job, build, isnew) \
         select (id - 1) / 50 + 1, job, id, 1 from builds"
            .to_string(),
        "insert into jobsetevalerrors (eval, line, job, message) \
         select id, 1, null, 'bad' from jobsetevals where id % 5 = 0"
            .to_string(),
        "insert into aggregateconstituents (aggregate, constituent) \
         select b.id, c.id from builds b join builds c on c.id between b.id - 3 and b.id - 1 \
         where b.id % 10 = 0"
            .to_string(),
        "analyze".to_string(),
    ];
    for st in &statements {
        db.execute_unchecked(st).await.with_context(|| st.clone())?;
    }
    ensure!(db.unfinished_builds().await?.len() == 50);
    ensure!(db.busy_steps().await?.len() == 20);
    // Only the unfinished builds' Resolved rows; the finished builds' pending targets apart.
    ensure!(db.resolved_steps().await?.len() == 10);
    ensure!(db.pending_targets_of_finished().await?.len() == 10);
    Ok(())
}

async fn query_plans_use_indexes(ctx: Ctx) -> Result<()> {
    let backend = ctx.backend();
    populate(&ctx.db).await?;
    let plans = ctx.db.explain_hot_queries().await?;
    let version: String = match (ctx.db.sqlite_pool(), ctx.db.postgres_pool()) {
        (Some(p), _) => {
            sqlx::query_scalar("select sqlite_version()")
                .fetch_one(p)
                .await?
        }
        (_, Some(p)) => {
            sqlx::query_scalar("show server_version")
                .fetch_one(p)
                .await?
        }
        _ => bail!("no pool"),
    };
    let mut out = format!("-- {backend:?} {version}, after populate()\n");
    let mut bad = Vec::new();
    for p in &plans {
        out.push_str(&format!("-- {} ({backend:?})\n", p.name));
        for l in &p.plan {
            out.push_str(&format!("{l}\n"));
        }
        for l in p.full_scans(backend) {
            bad.push(format!("{}: {l}", p.name));
        }
    }
    println!("{out}");
    ensure!(plans.len() >= 25);
    ensure!(
        bad.is_empty(),
        "full scans on hot queries:\n{}",
        bad.join("\n")
    );
    Ok(())
}

// ------------------------------------------------------------------------------------ start-up

#[tokio::test]
async fn unreachable_database_is_one_clear_line() {
    let e = Db::connect("postgres://qr:hunter2@127.0.0.1:1/qr", 1)
        .await
        .expect_err("nothing listens on port 1");
    let msg = e.to_string();
    assert!(matches!(e, DbError::Unreachable { .. }), "{e:?}");
    assert!(!msg.contains('\n') && !msg.contains("hunter2"), "{msg}");
    assert!(
        msg.starts_with("cannot connect to database postgres://qr@127.0.0.1:1/qr: "),
        "{msg}"
    );

    let e = Db::connect("mysql://localhost/qr", 1)
        .await
        .expect_err("unsupported");
    assert!(matches!(e, DbError::UnsupportedUrl { .. }), "{e:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"").expect("write");
    let e = Db::connect(&format!("sqlite://{}/sub/qr.db", file.display()), 1)
        .await
        .expect_err("a file is not a directory");
    assert!(matches!(e, DbError::CreateDir { .. }), "{e:?}");
    assert!(!e.to_string().contains('\n'));
}

#[tokio::test]
async fn default_url_opens_under_the_state_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state dir");
    let db = Db::connect(&default_url(&state), 1).await.expect("open");
    assert_eq!(db.backend(), Backend::Sqlite);
    assert!(state.join("qr.db").exists());
    let mode: String = sqlx::query_scalar("pragma journal_mode")
        .fetch_one(db.sqlite_pool().expect("sqlite"))
        .await
        .expect("pragma");
    assert_eq!(mode, "wal");
    let fk: i64 = sqlx::query_scalar("pragma foreign_keys")
        .fetch_one(db.sqlite_pool().expect("sqlite"))
        .await
        .expect("pragma");
    assert_eq!(fk, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_sqlite_works_across_connections() {
    let db = Db::connect("sqlite::memory:", 4).await.expect("open");
    db.create_jobset("main", 1).await.expect("jobset");
    let mut hs = Vec::new();
    for i in 0..8 {
        let db = db.clone();
        hs.push(tokio::spawn(async move {
            db.create_build(&new_build(&format!("m{i}"), 0, 0)).await
        }));
    }
    for h in hs {
        h.await.expect("join").expect("create_build");
    }
    assert_eq!(db.unfinished_builds().await.expect("read").len(), 8);
}
