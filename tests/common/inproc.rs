//! A scheduler in this process (real actors, the real database and store) with executors the
//! test chooses: for tests that look at the runner's own state (its gauges and counters) or
//! inject faults into its database handle.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qr::actors::dispatcher::MachineInfo;
use qr::actors::env::{Env, SchedEvent, Scheduling, Stats, SystemClock};
use qr::actors::machine::Executor;
use qr::actors::scheduler::Scheduler;
use qr::actors::step::RetryPolicy;
use qr::builder::executor::{ExecutorConfig, NativeExecutor};
use qr::db::Db;
use qr::db::types::{BuildId, BuildStatus, NewBuild, Step};
use qr::store::{LocalStore, Store, StoreDir};
use tokio::sync::broadcast;

use super::instantiate::{Gen, Kind};
use super::qr::{Backend, Qr};

pub struct Rig {
    pub qr: Qr,
    pub db: Db,
    pub store: Arc<LocalStore>,
    pub env: Arc<Env>,
    pub sched: Scheduler,
    pub events: broadcast::Receiver<SchedEvent>,
}

/// Runs `f` in an actix system (the actors need one).
pub fn in_actix<F: std::future::Future<Output = ()>>(f: F) {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("QR_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    actix_rt::System::new().block_on(f);
}

/// This machine's system (what the local builder takes).
pub fn system() -> String {
    qr::config::this_system()
}

/// The native executor over the rig's store.
pub fn native(qr: &Qr, store: &Arc<LocalStore>) -> Arc<dyn Executor> {
    Arc::new(NativeExecutor::new(
        store.clone(),
        ExecutorConfig::new(qr.state_dir()),
    ))
}

/// A rig on `backend` with one machine of `max_jobs` slots for this system, running jobs on the
/// executor `exec` makes; `None` when PostgreSQL is wanted and unreachable outside CI.
pub async fn rig(
    backend: Backend,
    max_jobs: u32,
    retry: RetryPolicy,
    exec: impl FnOnce(&Qr, &Arc<LocalStore>) -> Arc<dyn Executor>,
) -> Option<Rig> {
    rig_with(
        backend,
        Setup {
            machines: vec![local_machine(max_jobs)],
            retry,
            scheduling: Scheduling::default(),
            before_start: vec![],
        },
        exec,
    )
    .await
}

/// The one in-process machine [`rig`] starts: `max_jobs` slots for this system, no features.
pub fn local_machine(max_jobs: u32) -> MachineInfo {
    MachineInfo {
        id: "local".into(),
        systems: [system()].into(),
        supported_features: Default::default(),
        mandatory_features: Default::default(),
        max_jobs,
        speed_factor: 1.0,
    }
}

/// What a rig starts with, besides its executor.
pub struct Setup {
    /// The in-process machines, all running jobs on the one executor.
    pub machines: Vec<MachineInfo>,
    pub retry: RetryPolicy,
    /// The queue's order and expected durations (`[scheduler]`).
    pub scheduling: Scheduling,
    /// SQL statements run on the database before the scheduler starts (history rows, say).
    pub before_start: Vec<String>,
}

/// A rig as [`rig`] makes it, with `setup`.
pub async fn rig_with(
    backend: Backend,
    setup: Setup,
    exec: impl FnOnce(&Qr, &Arc<LocalStore>) -> Arc<dyn Executor>,
) -> Option<Rig> {
    let Setup {
        machines,
        retry,
        scheduling,
        before_start,
    } = setup;
    let qr = Qr::new(backend, false)?;
    let db = Db::connect(&qr.db_url, 4).await.expect("database");
    for st in &before_start {
        db.execute_unchecked(st).await.expect(st);
    }
    let dir = qr.state_dir().join("store");
    let store = Arc::new(
        LocalStore::open(StoreDir::new(dir.display().to_string()).expect("dir"), &dir)
            .await
            .expect("store"),
    );
    let mut env = Env::new(db.clone(), store.clone(), Arc::new(SystemClock), retry);
    env.scheduling = scheduling;
    let env = Arc::new(env);
    let events = env.events.subscribe();
    let executor = exec(&qr, &store);
    let machines = machines
        .into_iter()
        .map(|m| (m, executor.clone()))
        .collect();
    let (sched, _) = Scheduler::start(env.clone(), machines, Duration::from_secs(60))
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
    /// An instantiator over the rig's store dir, for this machine's system.
    pub fn instantiator(&self) -> Gen {
        let mut g = Gen::in_store_dir(self.store.store_dir().clone());
        g.system = system();
        g
    }

    /// A floating CA drv for this machine's system.
    pub fn ca(g: &mut Gen, name: &str, script: &str, inputs: &[&str]) -> String {
        g.add(Kind::Ca, name, script, &[], inputs)
    }

    /// Writes `g`'s drvs to the store and queues a build of `drv_path`.
    pub async fn queue(&self, g: &Gen, drv_path: &str) -> BuildId {
        // Inputs first: the store takes a drv only once its input drvs are valid.
        let mut added = std::collections::HashSet::new();
        while added.len() < g.drvs.len() {
            let before = added.len();
            for (p, d) in &g.drvs {
                if !added.contains(p) && d.input_drvs.keys().all(|i| added.contains(i)) {
                    assert_eq!(&self.store.add_derivation(d).await.expect("add drv"), p);
                    added.insert(p.clone());
                }
            }
            assert!(added.len() > before, "the drvs' inputs form a cycle");
        }
        self.db.create_jobset("tests", 100).await.expect("jobset");
        let drv = &g.drvs[drv_path];
        self.db
            .create_build(&NewBuild {
                jobset: "tests".into(),
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
    pub async fn wait_for(
        &mut self,
        what: &str,
        mut f: impl FnMut(&SchedEvent) -> bool,
    ) -> SchedEvent {
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
    pub async fn finished(&mut self, id: BuildId) -> BuildStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let b = self.db.get_build(id).await.expect("build");
            if b.finished {
                return b.build_status.expect("a finished build has a status");
            }
            assert!(Instant::now() < deadline, "build {id} did not finish");
            let _ = tokio::time::timeout(Duration::from_millis(200), self.events.recv()).await;
        }
    }

    /// Waits (bounded) until every step row of the build is closed; returns them.
    pub async fn closed_steps(&self, id: BuildId) -> Vec<Step> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let steps = self.db.steps_of_build(id).await.expect("steps");
            if steps
                .iter()
                .all(|s| s.status.is_some() && !s.busy.is_busy())
            {
                return steps;
            }
            assert!(
                Instant::now() < deadline,
                "build {id}: step rows left open: {steps:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) until `gauge` reads `want`; panics with `what` otherwise.
    pub async fn gauge_settles(&self, what: &str, gauge: impl Fn(&Stats) -> u64, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = gauge(&self.env.stats);
            if v == want {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {v}, expected {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Checks the step gauges are back at 0 and no gauge went below 0.
    pub async fn gauges_at_zero(&self, what: &str) {
        self.gauge_settles(
            &format!("{what}: steps_runnable"),
            |s| Stats::get(&s.steps_runnable),
            0,
        )
        .await;
        self.gauge_settles(
            &format!("{what}: steps_running"),
            |s| Stats::get(&s.steps_running),
            0,
        )
        .await;
        assert_eq!(
            Stats::get(&self.env.stats.gauge_underflows),
            0,
            "{what}: a gauge was decremented below 0"
        );
    }
}
