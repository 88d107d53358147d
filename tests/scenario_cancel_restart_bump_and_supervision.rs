//! Operators' actions through the database, seen by a running scheduler (real actors, native
//! executor, in-process): cancelling a build kills its running builder and closes it Cancelled;
//! restarting a failed build builds it again; bumping a build's priority lets it overtake; and the
//! queue monitor, restarted by its supervisor, goes on serving the queue. On SQLite and PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::instantiate::{Gen, Kind};
use common::qr::{Backend, Qr};
use qr::actors::dispatcher::MachineInfo;
use qr::actors::dispatcher::actor::GetStatus;
use qr::actors::env::{Env, SchedEvent, Stats, SystemClock};
use qr::actors::machine::Executor;
use qr::actors::queue_monitor::Restart;
use qr::actors::scheduler::Scheduler;
use qr::actors::step::RetryPolicy;
use qr::builder::executor::{ExecutorConfig, NativeExecutor};
use qr::db::Db;
use qr::db::types::{BuildId, BuildStatus, NewBuild};
use qr::store::{LocalStore, Store, StoreDir};
use tokio::sync::broadcast;

struct Rig {
    qr: Qr,
    db: Db,
    store: Arc<LocalStore>,
    env: Arc<Env>,
    sched: Scheduler,
    events: broadcast::Receiver<SchedEvent>,
}

async fn rig(backend: Backend, max_jobs: u32) -> Option<Rig> {
    if let Ok(f) = tracing_subscriber::EnvFilter::try_from_env("QR_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(f)
            .with_test_writer()
            .try_init();
    }
    let qr = Qr::new(backend, false)?;
    let db = Db::connect(&qr.db_url, 4).await.expect("database");
    let dir = qr.state_dir().join("store");
    let store = Arc::new(
        LocalStore::open(StoreDir::new(dir.display().to_string()).expect("dir"), &dir)
            .await
            .expect("store"),
    );
    let env = Arc::new(Env::new(
        db.clone(),
        store.clone(),
        Arc::new(SystemClock),
        RetryPolicy::default(),
    ));
    let events = env.events.subscribe();
    let executor: Arc<dyn Executor> = Arc::new(NativeExecutor::new(
        store.clone(),
        ExecutorConfig::new(qr.state_dir()),
    ));
    let info = MachineInfo {
        id: "local".into(),
        systems: [qr::config::this_system()].into(),
        supported_features: Default::default(),
        mandatory_features: Default::default(),
        max_jobs,
        speed_factor: 1.0,
    };
    let (sched, _) = Scheduler::start(env.clone(), vec![(info, executor)], Duration::from_secs(60))
        .await
        .expect("scheduler");
    Some(Rig {
        qr,
        db,
        store,
        env,
        sched,
        events,
    })
}

impl Rig {
    fn instantiator(&self) -> Gen {
        Gen::in_store_dir(self.store.store_dir().clone())
    }

    async fn queue(&self, g: &Gen, drv_path: &str) -> BuildId {
        for (p, d) in &g.drvs {
            assert_eq!(&self.store.add_derivation(d).await.expect("add drv"), p);
        }
        self.db.create_jobset("ops", 100).await.expect("jobset");
        let drv = &g.drvs[drv_path];
        self.db
            .create_build(&NewBuild {
                jobset: "ops".into(),
                job: drv.name.clone(),
                drv_path: drv_path.into(),
                system: drv.system.clone(),
                priority: 0,
                global_priority: 0,
                max_silent: 0,
                timeout: 0,
                timestamp: 0,
                outputs: vec![("out".into(), None)],
            })
            .await
            .expect("build")
    }

    /// Waits (bounded) for an event matching `f`.
    async fn wait_for(&mut self, what: &str, mut f: impl FnMut(&SchedEvent) -> bool) -> SchedEvent {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Ok(ev)) if f(&ev) => return ev,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{what}: event stream: {e}"),
                Err(_) => panic!("{what}: timed out"),
            }
        }
    }

    /// Waits (bounded) until the build's row is finished; returns its status.
    async fn finished(&mut self, id: BuildId) -> BuildStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let b = self.db.get_build(id).await.expect("build");
            if b.finished {
                return b.build_status.expect("finished build has a status");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "build {id} did not finish"
            );
            let _ = tokio::time::timeout(Duration::from_millis(200), self.events.recv()).await;
        }
    }
}

fn system() -> String {
    qr::config::this_system()
}

/// A floating CA drv for this machine's system (so the local builder takes it).
fn ca(g: &mut Gen, name: &str, script: &str) -> String {
    g.system = system();
    g.add(Kind::Ca, name, script, &[], &[])
}

fn in_actix<F: std::future::Future<Output = ()>>(f: F) {
    actix_rt::System::new().block_on(f);
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
