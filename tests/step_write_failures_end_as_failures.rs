//! A database write the runner needs that fails for good (injected with `Db::arm_fault`, feature
//! `test-hooks`) is never dropped: the step and its build fail as Aborted, with the write's error
//! in the step's row, and no row is left open — whether the write recorded a step's start, its
//! success, its resolution, or the build's own finish. Real actors, in-process, on SQLite and
//! PostgreSQL.

mod common;

use common::inproc::{Rig, in_actix, native, rig};
use common::qr::Backend;
use qr::actors::env::Stats;
use qr::actors::step::RetryPolicy;
use qr::db::FaultPoint;
use qr::db::types::BuildStatus;

/// A build of one CA drv (`with_input`: with an upstream, so the drv resolves) with `fault`
/// armed (nothing when PostgreSQL is wanted and unreachable outside CI: `Qr::new` says so).
async fn build_with_fault(backend: Backend, fault: FaultPoint, with_input: bool) {
    let Some(mut r) = rig(backend, 2, RetryPolicy::default(), native).await else {
        return;
    };
    let mut g = r.instantiator();
    let name = format!("wf-{fault:?}").to_lowercase();
    let top = if with_input {
        let up = Rig::ca(&mut g, &format!("{name}-up"), "echo up > $out", &[]);
        let script = format!("cat {} > $out", g.out(&up));
        Rig::ca(&mut g, &name, &script, &[&up])
    } else {
        Rig::ca(&mut g, &name, "echo hi > $out", &[])
    };
    r.db.arm_fault(fault);
    let id = r.queue(&g, &top).await;
    let status = r.finished(id).await;
    let steps = r.closed_steps(id).await;
    assert_eq!(status, BuildStatus::Aborted, "{fault:?}: {steps:?}");
    if fault != FaultPoint::FinishBuildAfterBuildRow {
        // The step that could not be recorded failed with the write's error in its row.
        let failed: Vec<_> = steps
            .iter()
            .filter(|s| s.status == Some(BuildStatus::Aborted))
            .collect();
        assert_eq!(failed.len(), 1, "{fault:?}: {steps:?}");
        let msg = failed[0].error_msg.as_deref().unwrap_or_default();
        assert!(
            msg.contains("in the database") && msg.contains("fault injected"),
            "{fault:?}: {msg}"
        );
        assert!(
            !r.db
                .is_failed_path(&failed[0].drv_path)
                .await
                .expect("read"),
            "{fault:?}: a database error is no cached failure of the drv"
        );
    }
    assert!(
        Stats::get(&r.env.stats.db_write_failures) >= 1,
        "{fault:?}: counted"
    );
    r.gauges_at_zero(&format!("{fault:?}")).await;
}

fn run(backend: Backend, fault: FaultPoint, with_input: bool) {
    in_actix(async {
        build_with_fault(backend, fault, with_input).await;
    });
}

// The step's row created as it starts (no job is sent).
#[test]
fn failed_start_row_sqlite() {
    run(Backend::Sqlite, FaultPoint::CreateStepAfterAlloc, false);
}

#[test]
fn failed_start_row_postgres() {
    run(Backend::Postgres, FaultPoint::CreateStepAfterAlloc, false);
}

// The step's success (its outputs) recorded after it built.
#[test]
fn failed_success_record_sqlite() {
    run(Backend::Sqlite, FaultPoint::FinishStepAfterStepRow, false);
}

#[test]
fn failed_success_record_postgres() {
    run(Backend::Postgres, FaultPoint::FinishStepAfterStepRow, false);
}

// The resolution's transaction.
#[test]
fn failed_resolution_record_sqlite() {
    run(Backend::Sqlite, FaultPoint::ResolveAfterInsert, true);
}

#[test]
fn failed_resolution_record_postgres() {
    run(Backend::Postgres, FaultPoint::ResolveAfterInsert, true);
}

// The build's own finish: finished again as Aborted, not left unfinished.
#[test]
fn failed_build_finish_sqlite() {
    run(Backend::Sqlite, FaultPoint::FinishBuildAfterBuildRow, false);
}

#[test]
fn failed_build_finish_postgres() {
    run(
        Backend::Postgres,
        FaultPoint::FinishBuildAfterBuildRow,
        false,
    );
}
