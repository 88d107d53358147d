//! The pick-up scenario: how long a build queued by *another process* (`qr submit`) waits before
//! its step starts on an idle runner. The runner (actors, one machine with the zero-time simulated
//! builder) runs on one `Db`; the submitter is a second `Db` on the same database, as `qr submit`
//! is, so nothing reaches the runner in-process: on PostgreSQL it learns of the build by NOTIFY,
//! on SQLite by its watch on the highest build id (`[database] sqlite_poll_interval_s`). Each
//! sample is the time from just before the submitter's insert to the executor starting the job.
//! Submissions go one at a time, spread over the poll interval so they do not phase-lock to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use async_trait::async_trait;
use serde::Serialize;

use super::graph::{self, GraphSpec};
use super::measure::{Percentiles, wait_until};
use super::scenario::{DbTarget, FreshDb, Params, leave, machine_info, runner_env};
use crate::actors::machine::executor::{Built, ExecFailure, Executor, Job};
use crate::actors::machine::local::LocalMachine;
use crate::actors::machine::simulated::SimulatedExecutor;
use crate::actors::scheduler::Scheduler;
use crate::db::Db;
use crate::store::{LocalStore, Store, StoreDir};

/// What the pick-up scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct Pickup {
    pub backend: &'static str,
    pub submissions: usize,
    /// SQLite's poll interval in this run (PostgreSQL: NOTIFY, no poll).
    pub poll_interval_ms: Option<u64>,
    /// Submit (insert by another connection pool) to step start, ms.
    pub latency_ms: Percentiles,
}

/// The simulated builder, noting when each job started.
struct Stamping {
    inner: SimulatedExecutor,
    started: Arc<Mutex<HashMap<String, Instant>>>,
}

#[async_trait]
impl Executor for Stamping {
    async fn execute(&self, job: Job) -> Result<Built, ExecFailure> {
        self.started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.drv_path.clone(), Instant::now());
        self.inner.execute(job).await
    }
}

/// Runs the scenario: `n` builds of independent derivations, submitted one after another.
pub async fn pickup(n: usize, p: Params, target: DbTarget) -> anyhow::Result<Pickup> {
    let dir = tempfile::tempdir_in(&p.work_dir).context("scratch directory")?;
    let root = dir.path().join("store");
    let store =
        Arc::new(LocalStore::open(StoreDir::new(root.display().to_string())?, &root).await?);
    let fresh = FreshDb::open(&target, dir.path(), &p).await?;
    let result = async {
        let spec = GraphSpec {
            steps: n,
            ca_fraction: 0.0,
            fan_in: 0,
            depth: 1,
            seed: 1,
            tag: format!("pickup{}", std::process::id()),
        };
        let graph = graph::generate(&spec, store.store_dir(), &crate::config::this_system())?;
        graph::add_to_store(&*store, &graph, p.setup_parallel).await?;
        let db = fresh.db.clone();
        let poll = db.options().sqlite_poll_interval;
        // Another pool on the same database: what `qr submit` in another process is.
        let submitter = Db::connect(db.url(), 2)
            .await
            .context("the submitter's connection")?;
        submitter.create_jobset("pickup", 100).await?;

        let env = runner_env(&db, &store, p.order)?;
        let (sched, _) = Scheduler::start(env.clone(), vec![], Duration::from_secs(86400)).await?;
        let started = Arc::new(Mutex::new(HashMap::new()));
        let exec = Arc::new(Stamping {
            inner: SimulatedExecutor::new(store.clone()),
            started: started.clone(),
        });
        let _machine = LocalMachine::new(
            env.clone(),
            machine_info(p.slots),
            exec,
            sched.dispatcher.clone(),
        )
        .start();

        let spread_ms = (poll.as_millis() as u64).max(100);
        let mut samples = Vec::with_capacity(n);
        for (i, (path, drv)) in graph.drvs.iter().enumerate() {
            // Spread the submissions over the poll interval (deterministically).
            tokio::time::sleep(Duration::from_millis((i as u64 * 37) % spread_ms)).await;
            let nb = graph::new_build("pickup", path, drv, 0);
            let t0 = Instant::now();
            submitter.create_build(&nb).await?;
            let path = path.clone();
            let started = started.clone();
            wait_until("the submitted build's step to start", p.timeout, || {
                Ok(started
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&path))
            })
            .await?;
            let t1 = started
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&path)
                .copied()
                .context("the start time")?;
            samples.push(t1.saturating_duration_since(t0).as_secs_f64() * 1000.0);
        }
        // Let the last step's rows be written before the database goes.
        let _ = wait_until("the I/O in flight", Duration::from_secs(60), || {
            Ok(env.io_in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0)
        })
        .await;
        Ok::<_, anyhow::Error>(Pickup {
            backend: target.name(),
            submissions: samples.len(),
            poll_interval_ms: match target {
                DbTarget::Sqlite => Some(poll.as_millis() as u64),
                DbTarget::Postgres { .. } => None,
            },
            latency_ms: Percentiles::of(samples),
        })
    }
    .await;
    leave(dir, &fresh);
    result
}
