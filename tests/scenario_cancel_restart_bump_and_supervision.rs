//! Operators' actions through the database, seen by a running scheduler (real actors, native
//! executor, in-process): cancelling a build kills its running builder and closes it Cancelled;
//! restarting a failed build builds it again; bumping a build's priority lets it overtake; and the
//! queue monitor, restarted by its supervisor, goes on serving the queue. On SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::inproc::{self, Rig, in_actix};
use common::instantiate::Gen;
use common::qr::Backend;
use qr::actors::dispatcher::actor::GetStatus;
use qr::actors::env::{SchedEvent, Stats};
use qr::actors::queue_monitor::Restart;
use qr::actors::step::RetryPolicy;
use qr::db::types::BuildStatus;

async fn rig(backend: Backend, max_jobs: u32) -> Option<Rig> {
    inproc::rig(backend, max_jobs, RetryPolicy::default(), inproc::native).await
}

/// A floating CA drv with no inputs, for this machine's system (so the local builder takes it).
fn ca(g: &mut Gen, name: &str, script: &str) -> String {
    Rig::ca(g, name, script, &[])
}

fn cancel_kills_the_running_build(backend: Backend) {
    in_actix(async {
        let Some(mut r) = rig(backend, 2).await else {
            return;
        };
        let mut g = r.instantiator();
        // A sleep only this test runs (the two backends run in parallel).
        let secs = if backend == Backend::Sqlite { 37 } else { 39 };
        let slow = ca(
            &mut g,
            "ops-slow",
            &format!("sleep {secs}; echo done > $out"),
        );
        let id = r.queue(&g, &slow).await;
        r.wait_for(
            "slow step started",
            |e| matches!(e, SchedEvent::StepStarted { drv, .. } if *drv == slow),
        )
        .await;
        assert!(r.db.cancel_build(id, 1).await.expect("cancel"));
        assert_eq!(r.finished(id).await, BuildStatus::Cancelled);
        // The builder process is gone (killed with its process group), not left running.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            // Fails the test if it cannot look (never "gone" for want of a tool).
            let alive = common::procs::running(&format!("sleep {secs}"));
            if !alive {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the cancelled builder is still running"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // No step row is left open: a row the step had is closed as Cancelled as it stops.
        loop {
            let steps = r.db.steps_of_build(id).await.expect("steps");
            if steps
                .iter()
                .all(|s| s.status.is_some() && !s.busy.is_busy())
            {
                assert!(
                    steps
                        .iter()
                        .all(|s| s.status == Some(BuildStatus::Cancelled)),
                    "{steps:?}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "step rows left open: {steps:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

fn restart_builds_a_failed_build_again(backend: Backend) {
    in_actix(async {
        let Some(mut r) = rig(backend, 2).await else {
            return;
        };
        let marker = r.qr.state_dir().join("marker");
        let mut g = r.instantiator();
        let flaky = ca(
            &mut g,
            "ops-flaky",
            &format!(
                "test -e {} || {{ echo no marker; exit 1; }}; echo ok > $out",
                marker.display()
            ),
        );
        let id = r.queue(&g, &flaky).await;
        assert_eq!(r.finished(id).await, BuildStatus::Failed);
        std::fs::write(&marker, "").expect("marker");
        assert!(r.db.restart_build(id).await.expect("restart"));
        assert_eq!(
            r.finished(id).await,
            BuildStatus::Success,
            "the restarted build is built again, not a cached failure"
        );
        assert_eq!(Stats::get(&r.env.stats.steps_built), 1);
    });
}

fn bump_lets_a_build_overtake(backend: Backend) {
    in_actix(async {
        let Some(mut r) = rig(backend, 1).await else {
            return;
        };
        let mut g = r.instantiator();
        let blocker = ca(&mut g, "ops-blocker", "sleep 1; echo b > $out");
        let first = ca(&mut g, "ops-first", "echo first > $out");
        let second = ca(&mut g, "ops-second", "echo second > $out");
        let b = r.queue(&g, &blocker).await;
        r.wait_for(
            "blocker started",
            |e| matches!(e, SchedEvent::StepStarted { drv, .. } if *drv == blocker),
        )
        .await;
        let f = r.queue(&g, &first).await;
        let s = r.queue(&g, &second).await;
        // both wait in the queue behind the blocker (one slot)
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while r
            .sched
            .dispatcher
            .send(GetStatus)
            .await
            .expect("status")
            .runnable
            < 2
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the two builds never became runnable"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(r.db.bump_build(s, 10).await.expect("bump"));
        let started = r
            .wait_for("a queued step started", |e| matches!(e, SchedEvent::StepStarted { drv, .. } if *drv == first || *drv == second))
            .await;
        assert_eq!(
            started,
            SchedEvent::StepStarted {
                drv: second.clone(),
                machine: "local".into()
            },
            "the bumped build goes first"
        );
        for id in [b, f, s] {
            assert_eq!(r.finished(id).await, BuildStatus::Success);
        }
    });
}

fn supervisor_restarts_the_queue_monitor(backend: Backend) {
    in_actix(async {
        let Some(mut r) = rig(backend, 2).await else {
            return;
        };
        r.sched.monitor.do_send(Restart("test".into()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Stats::get(&r.env.stats.actor_restarts) < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the monitor was not restarted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut g = r.instantiator();
        let after = ca(&mut g, "ops-after-restart", "echo fine > $out");
        let id = r.queue(&g, &after).await;
        assert_eq!(
            r.finished(id).await,
            BuildStatus::Success,
            "the restarted monitor still picks up new builds"
        );
        assert_eq!(Stats::get(&r.env.stats.actor_restarts), 1);
    });
}

#[test]
fn cancel_kills_the_running_build_on_sqlite() {
    cancel_kills_the_running_build(Backend::Sqlite);
}
#[test]
fn cancel_kills_the_running_build_on_postgres() {
    cancel_kills_the_running_build(Backend::Postgres);
}
#[test]
fn restart_builds_a_failed_build_again_on_sqlite() {
    restart_builds_a_failed_build_again(Backend::Sqlite);
}
#[test]
fn restart_builds_a_failed_build_again_on_postgres() {
    restart_builds_a_failed_build_again(Backend::Postgres);
}
#[test]
fn bump_lets_a_build_overtake_on_sqlite() {
    bump_lets_a_build_overtake(Backend::Sqlite);
}
#[test]
fn bump_lets_a_build_overtake_on_postgres() {
    bump_lets_a_build_overtake(Backend::Postgres);
}
#[test]
fn supervisor_restarts_the_queue_monitor_on_sqlite() {
    supervisor_restarts_the_queue_monitor(Backend::Sqlite);
}
#[test]
fn supervisor_restarts_the_queue_monitor_on_postgres() {
    supervisor_restarts_the_queue_monitor(Backend::Postgres);
}
