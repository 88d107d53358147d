//! Starting the actors: restart recovery from the database, then the dispatcher, the machines and the
//! queue monitor. Must run inside an actix system.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::actors::build::expand::{Recorded, RecordedLookup};
use crate::actors::build::expander::Expander;
use crate::actors::carried::{self, CarriedRow};
use crate::actors::dispatcher::MachineInfo;
use crate::actors::dispatcher::actor::DispatcherActor;
use crate::actors::dispatcher::actor::Reserve;
use crate::actors::env::{Env, Stats, persist};
use crate::actors::machine::Executor;
use crate::actors::machine::local::LocalMachine;
use crate::actors::queue_monitor::QueueMonitor;
use crate::db::DbError;
use crate::db::types::{BuildId, BuildStatus, StepNr};

/// The running scheduler.
pub struct Scheduler {
    pub env: Arc<Env>,
    pub dispatcher: Addr<DispatcherActor>,
    /// The live steps.
    pub graph: Arc<crate::actors::graph::Graph>,
    pub monitor: Addr<QueueMonitor>,
    pub machines: Vec<Addr<LocalMachine>>,
}

/// What restart recovery found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Rows left busy by a crash that really stopped (an in-process builder's, or every row when
    /// nothing is carried), now closed as Aborted.
    pub aborted: usize,
    /// Resolutions recorded before the restart, re-attached instead of redone.
    pub resolutions: usize,
    /// Rows left busy on a remote builder, still busy: that builder may still be running them
    /// (`carried.rs`).
    pub carried: Vec<CarriedRow>,
    /// Pending targets of Resolved rows that no step will adopt (their build finished, or another
    /// resolution of the drv is the one re-attached), closed as Aborted: nothing would ever finish
    /// them.
    pub orphaned: usize,
}

/// How restart recovery treats rows left busy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Restart {
    /// Every busy row is closed as Aborted (no remote builder can come back: `qr run`).
    #[default]
    AbortAll,
    /// Rows busy on a remote builder are carried for up to `grace` (`[grpc] rejoin_grace_s`):
    /// the builder may rejoin holding the build. Rows on these in-process machines (and
    /// `localhost` or no machine) are aborted.
    CarryRemote { local: Vec<String>, grace: Duration },
}

const ABORTED_BY_RESTART: &str = "aborted: the runner stopped while this step was busy";

/// Restart recovery: closes the rows left busy that really stopped as Aborted (they are retried as
/// new attempts) and, with [`Restart::CarryRemote`], leaves those busy on a remote builder for
/// their step to resume in; loads the Resolved rows of unfinished builds so their steps attach
/// straight to their resolved step.
pub async fn recover(
    env: &Env,
    restart: &Restart,
) -> Result<(Recovery, HashMap<String, Recorded>), DbError> {
    // Through `persist`: a database that is away for a while at start is waited for, and a read
    // that failed is never taken for an answer.
    let (aborted, carried) = match restart {
        Restart::AbortAll => {
            let aborted = persist("abort busy steps", || {
                env.db.abort_busy_steps(env.now(), ABORTED_BY_RESTART)
            })
            .await?;
            (aborted, vec![])
        }
        Restart::CarryRemote { local, .. } => {
            let busy = persist("read busy steps", || env.db.busy_steps()).await?;
            let plan = carried::plan(&busy, local);
            // One transaction: a crash before it leaves every row busy, and the next start
            // decides the same again.
            let aborted = persist("abort stopped steps", || {
                env.db
                    .abort_steps(&plan.abort, env.now(), ABORTED_BY_RESTART)
            })
            .await?;
            (aborted, plan.carry)
        }
    };
    for s in &aborted {
        tracing::warn!(build = s.build.0, step = s.stepnr, drv = ?s.drv_path, machine = %s.machine, "step was busy at restart: aborted, will retry");
    }
    for c in &carried {
        tracing::info!(build = c.row.0, step = c.row.1, drv = %c.drv, machine = %c.machine, "step was busy on a builder at restart: kept busy for it to rejoin");
    }
    let mut recorded = HashMap::new();
    let mut pending_targets: Vec<(BuildId, StepNr)> = Vec::new();
    // Only the Resolved rows of unfinished builds: the history's are never read.
    for pair in persist("read resolved steps", || env.db.resolved_steps()).await? {
        let b = pair.original.build.0;
        // A pending or successful target is re-attached; the row is adopted only while pending.
        // A carried target (still busy on a builder) is not: its step takes it from the ledger.
        let child_pending = pair.resolved.status.is_none() && !pair.resolved.busy.is_busy();
        if child_pending {
            pending_targets.push((pair.resolved.build, pair.resolved.stepnr));
        }
        let failed = pair
            .resolved
            .status
            .is_some_and(|s| s != BuildStatus::Success && s != BuildStatus::Aborted);
        if failed {
            continue;
        }
        let rec = Recorded {
            resolved: pair.resolved.drv_path.clone(),
            own: (b, pair.original.stepnr),
            child: child_pending.then_some((b, pair.resolved.stepnr)),
        };
        recorded
            .entry(pair.original.drv_path.clone())
            .or_insert(rec);
    }
    // The pending targets in builds that finished meanwhile: no step will adopt them.
    pending_targets.extend(
        persist("read pending targets of finished builds", || {
            env.db.pending_targets_of_finished()
        })
        .await?,
    );
    // A pending row is only ever a resolution's target: one that no step adopts now would stay
    // unfinished for good.
    let adopted: std::collections::HashSet<(i64, i32)> = recorded
        .values()
        .filter_map(|r: &Recorded| r.child)
        .collect();
    let orphans: Vec<(BuildId, StepNr)> = pending_targets
        .into_iter()
        .filter(|(b, n)| !adopted.contains(&(b.0, *n)))
        .collect();
    let orphaned = if orphans.is_empty() {
        0
    } else {
        persist("abort orphaned steps", || {
            env.db.abort_steps(
                &orphans,
                env.now(),
                "aborted: the runner restarted and no unfinished build needs this step",
            )
        })
        .await?
        .len()
    };
    if orphaned > 0 {
        tracing::warn!(
            rows = orphaned,
            "pending steps no build needs any more: aborted"
        );
    }
    let rec = Recovery {
        aborted: aborted.len(),
        resolutions: recorded.len(),
        carried,
        orphaned,
    };
    Ok((rec, recorded))
}

impl Scheduler {
    /// Recovers (aborting every busy row), then starts the actors with these machines.
    pub async fn start(
        env: Arc<Env>,
        machines: Vec<(MachineInfo, Arc<dyn Executor>)>,
        unsupported_wait: Duration,
    ) -> Result<(Self, Recovery), DbError> {
        Self::start_with(env, machines, unsupported_wait, Restart::AbortAll).await
    }

    /// Recovers as `restart` says, then starts the actors with these machines. Carried rows are
    /// put in the ledger (`Env::carried`) for their steps, each step is kept for its builder
    /// (`Reserve`) for the grace, and rows no step took by the end of the grace are closed as
    /// Aborted.
    pub async fn start_with(
        env: Arc<Env>,
        machines: Vec<(MachineInfo, Arc<dyn Executor>)>,
        unsupported_wait: Duration,
        restart: Restart,
    ) -> Result<(Self, Recovery), DbError> {
        let (recovery, recorded) = recover(&env, &restart).await?;
        env.carried.fill(recovery.carried.iter().cloned());
        let recorded = Arc::new(std::sync::Mutex::new(recorded));
        let lookup: RecordedLookup =
            Arc::new(move |drv: &str| recorded.lock().ok().and_then(|mut m| m.remove(drv)));
        let dispatcher =
            DispatcherActor::new(env.clone(), unsupported_wait, env.scheduling.order).start();
        if let Restart::CarryRemote { grace, .. } = restart {
            // Before the queue monitor has read anything, so before any step is runnable.
            for c in &recovery.carried {
                dispatcher.do_send(Reserve {
                    drv: c.drv.clone(),
                    machine: c.machine.clone(),
                    wait: grace,
                });
            }
            if !recovery.carried.is_empty() {
                let e = env.clone();
                actix::spawn(async move {
                    tokio::time::sleep(grace).await;
                    sweep_carried(&e).await;
                });
            }
        }
        let local: Vec<MachineInfo> = machines.iter().map(|(info, _)| info.clone()).collect();
        let machines = machines
            .into_iter()
            .map(|(info, ex)| LocalMachine::new(env.clone(), info, ex, dispatcher.clone()).start())
            .collect();
        let graph = crate::actors::graph::Graph::new(env.clone(), dispatcher.clone(), local);
        learn_durations(&env, &graph).await;
        let expander = Expander::new(env.clone(), graph.clone(), lookup).start();
        graph.set_expander(expander.clone().recipient());
        let (e, d) = (env.clone(), dispatcher.clone());
        let monitor = actix::Supervisor::start(move |_| QueueMonitor::new(e, d, expander.clone()));
        Ok((
            Scheduler {
                env,
                dispatcher,
                graph,
                monitor,
                machines,
            },
            recovery,
        ))
    }
}

/// How far back, and how many of the latest successful steps, the expected durations are learnt
/// from at start.
pub const HISTORY_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);
pub const HISTORY_ROWS: i64 = 50_000;

/// Learns the expected step durations from the latest successful steps. Without them (the read
/// failed) every step is expected to take the default until steps finish here: the order is
/// worse, nothing is wrong, so the runner starts all the same.
async fn learn_durations(env: &Env, graph: &crate::actors::graph::Graph) {
    let since = env.now() - HISTORY_WINDOW.as_secs() as i64;
    match env.db.recent_step_durations(since, HISTORY_ROWS).await {
        Ok(rows) => {
            graph.learn(&rows);
            tracing::info!(
                rows = rows.len(),
                since,
                "expected step durations learnt from history"
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read step durations: every step is expected to take the default until steps finish")
        }
    }
}

/// The end of the grace: carried rows no step took (their drv needed by no step any more, or its
/// step not made yet) are closed as Aborted. A row that cannot be closed stays busy and is
/// decided again at the next start.
pub async fn sweep_carried(env: &Env) {
    let rows = env.carried.drain();
    if rows.is_empty() {
        return;
    }
    let keys: Vec<(BuildId, StepNr)> = rows.iter().map(|r| (BuildId(r.row.0), r.row.1)).collect();
    match persist("abort carried steps", || {
        env.db.abort_steps(
            &keys,
            env.now(),
            "aborted: the runner restarted while this step was busy, and no step took it back \
             within the rejoin grace",
        )
    })
    .await
    {
        Ok(closed) => {
            for s in closed {
                tracing::warn!(build = s.build.0, step = s.stepnr, drv = %s.drv_path, machine = %s.machine, "carried step not taken back within the grace: aborted");
            }
        }
        Err(e) => {
            Stats::inc(&env.stats.db_write_failures);
            tracing::error!(rows = keys.len(), error = %e, "cannot close the carried steps nobody took back: left busy for the next start");
        }
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
