//! Starting the actors: restart recovery from the database, then the dispatcher, the machines and the
//! queue monitor. Must run inside an actix system.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::actors::build::expand::{Recorded, RecordedLookup};
use crate::actors::build::expander::Expander;
use crate::actors::dispatcher::MachineInfo;
use crate::actors::dispatcher::actor::DispatcherActor;
use crate::actors::env::{Env, persist};
use crate::actors::machine::Executor;
use crate::actors::machine::local::LocalMachine;
use crate::actors::queue_monitor::QueueMonitor;
use crate::db::DbError;
use crate::db::types::BuildStatus;

/// The running scheduler.
pub struct Scheduler {
    pub env: Arc<Env>,
    pub dispatcher: Addr<DispatcherActor>,
    pub monitor: Addr<QueueMonitor>,
    pub machines: Vec<Addr<LocalMachine>>,
}

/// What restart recovery found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Rows left busy by a crash, now closed as Aborted.
    pub aborted: usize,
    /// Resolutions recorded before the restart, re-attached instead of redone.
    pub resolutions: usize,
    /// The aborted rows' (drv path, machine): a remote builder may still hold those builds.
    pub busy: Vec<(String, String)>,
}

/// Restart recovery: closes rows left busy as Aborted (they are retried as new attempts) and loads
/// the Resolved rows of unfinished builds so their steps attach straight to their resolved step.
pub async fn recover(env: &Env) -> Result<(Recovery, HashMap<String, Recorded>), DbError> {
    // Through `persist`: a database that is away for a while at start is waited for, and a read
    // that failed is never taken for an answer.
    let aborted = persist("abort busy steps", || {
        env.db.abort_busy_steps(
            env.now(),
            "aborted: the runner stopped while this step was busy",
        )
    })
    .await?;
    for s in &aborted {
        tracing::warn!(build = s.build.0, step = s.stepnr, drv = ?s.drv_path, "step was busy at restart: aborted, will retry");
    }
    let mut recorded = HashMap::new();
    let mut finished: HashMap<i64, bool> = HashMap::new();
    for pair in persist("read resolved steps", || env.db.resolved_steps()).await? {
        let b = pair.original.build.0;
        let done = match finished.get(&b) {
            Some(d) => *d,
            None => {
                // A failed read taken as "finished" would skip the recorded resolution, and the
                // step would resolve again: a second Resolved row for the drv in this build.
                let d = match persist("read build", || env.db.get_build(pair.original.build)).await
                {
                    Ok(b) => b.finished,
                    Err(DbError::BuildNotFound(_)) => true,
                    Err(e) => return Err(e),
                };
                finished.insert(b, d);
                d
            }
        };
        if done {
            continue;
        }
        let (orig, res) = (
            pair.original.drv_path.clone(),
            pair.resolved.drv_path.clone(),
        );
        // A pending or successful target is re-attached; the row is adopted only while pending.
        let child_pending = pair.resolved.status.is_none();
        let failed = pair
            .resolved
            .status
            .is_some_and(|s| s != BuildStatus::Success && s != BuildStatus::Aborted);
        if failed {
            continue;
        }
        let rec = Recorded {
            resolved: res,
            own: (b, pair.original.stepnr),
            child: child_pending.then_some((b, pair.resolved.stepnr)),
        };
        recorded.entry(orig).or_insert(rec);
    }
    let rec = Recovery {
        busy: aborted
            .iter()
            .map(|s| (s.drv_path.clone(), s.machine.clone()))
            .collect(),
        aborted: aborted.len(),
        resolutions: recorded.len(),
    };
    Ok((rec, recorded))
}

impl Scheduler {
    /// Recovers, then starts the actors with these machines.
    pub async fn start(
        env: Arc<Env>,
        machines: Vec<(MachineInfo, Arc<dyn Executor>)>,
        unsupported_wait: Duration,
    ) -> Result<(Self, Recovery), DbError> {
        let (recovery, recorded) = recover(&env).await?;
        let recorded = Arc::new(std::sync::Mutex::new(recorded));
        let lookup: RecordedLookup =
            Arc::new(move |drv: &str| recorded.lock().ok().and_then(|mut m| m.remove(drv)));
        let dispatcher = DispatcherActor::new(env.clone(), unsupported_wait).start();
        let machines = machines
            .into_iter()
            .map(|(info, ex)| LocalMachine::new(env.clone(), info, ex, dispatcher.clone()).start())
            .collect();
        let expander = Expander::new(env.clone(), dispatcher.clone(), lookup).start();
        let (e, d) = (env.clone(), dispatcher.clone());
        let monitor = actix::Supervisor::start(move |_| QueueMonitor::new(e, d, expander.clone()));
        Ok((
            Scheduler {
                env,
                dispatcher,
                monitor,
                machines,
            },
            recovery,
        ))
    }
}
