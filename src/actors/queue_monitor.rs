//! The queue monitor: reads the queued builds at start and whenever the database says the queue
//! changed (or the periodic rescan fires), and keeps one build actor per unfinished build.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use actix::prelude::*;

use crate::actors::aggregate::{self, Gate};
use crate::actors::build::actor::{BuildActor, BuildActorDone};
use crate::actors::build::expander::Expander;
use crate::actors::dispatcher::actor::{DispatcherActor, JobsetUsage};
use crate::actors::env::{Env, Stats};
use crate::actors::introspect::{ActorCell, ActorKind};
use crate::actors::messages::{BumpBuild, CancelBuild};
use crate::db::QueueEvent;
use crate::db::types::Build;

#[derive(Message)]
#[rtype(result = "()")]
struct Queue(QueueEvent);

/// Stops the monitor; its supervisor restarts it (it then re-reads the whole queue). Sent when its
/// listener gives up, and by operators.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Restart(pub String);

/// Number of build actors alive.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ActiveBuilds;

pub struct QueueMonitor {
    env: Arc<Env>,
    dispatcher: Addr<DispatcherActor>,
    builds: HashMap<i64, Addr<BuildActor>>,
    expander: Addr<Expander>,
    last_id: i64,
    listener: Option<tokio::task::JoinHandle<()>>,
    cell: Arc<ActorCell>,
    /// Aggregate builds held back until these constituents finish (`actors::aggregate`).
    held: HashMap<i64, BTreeSet<i64>>,
    /// Aggregates being ended as DepFailed (not ended twice when a read sees them meanwhile).
    failing: BTreeSet<i64>,
}

impl QueueMonitor {
    pub fn new(env: Arc<Env>, dispatcher: Addr<DispatcherActor>, expander: Addr<Expander>) -> Self {
        let cell = env
            .actors
            .register("queue-monitor", ActorKind::QueueMonitor, env.now());
        cell.set_state("reading");
        QueueMonitor {
            env,
            cell,
            dispatcher,
            builds: HashMap::new(),
            expander,
            last_id: 0,
            listener: None,
            held: HashMap::new(),
            failing: BTreeSet::new(),
        }
    }

    fn spawn_builds(
        &mut self,
        rows: Vec<Build>,
        gates: BTreeMap<i64, Gate>,
        ctx: &mut Context<Self>,
    ) {
        for row in rows {
            let id = row.id.0;
            self.last_id = self.last_id.max(id);
            if row.finished || self.builds.get(&id).is_some_and(|a| a.connected()) {
                continue;
            }
            if !self.gate_aggregate(&row, gates.get(&id), ctx) {
                continue;
            }
            tracing::info!(build = id, drv = %row.drv_path, job = %row.job, "build queued");
            let actor = BuildActor::new(
                self.env.clone(),
                row,
                self.expander.clone(),
                Some(ctx.address().recipient()),
            )
            .start();
            crate::metrics::global().queue.builds_loaded.inc();
            self.builds.insert(id, actor);
        }
        self.describe();
    }

    fn read(&mut self, ctx: &mut Context<Self>, all: bool) {
        let env = self.env.clone();
        let since = self.last_id;
        ctx.wait(
            async move {
                let check = crate::metrics::global().queue.check();
                let shares = env.db.jobsets().await.unwrap_or_default();
                let rows = if all { env.db.unfinished_builds().await } else { env.db.unfinished_builds_since(crate::db::types::BuildId(since)).await };
                // After the rows: an aggregate among them has its constituents recorded (one
                // transaction), so it is gated, never started early.
                let gates = match rows {
                    Ok(_) => env.db.unfinished_aggregates(crate::db::types::BuildId(if all { 0 } else { since })).await.map(|s| aggregate::gates(&s)),
                    Err(_) => Ok(BTreeMap::new()),
                };
                let rows = match (rows, gates) {
                    (Ok(r), Ok(g)) => Ok((r, g)),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
                check.finish(rows.as_ref().map(|(r, _)| r.len()));
                (shares, rows)
            }
            .into_actor(self)
            .map(|(shares, rows), act, ctx| {
                for j in shares {
                    act.dispatcher.do_send(JobsetUsage {
                        jobset: j.name,
                        shares: Some(j.scheduling_shares.max(1) as u32),
                        seconds: 0.0,
                    });
                }
                match rows {
                    Ok((rows, gates)) => act.spawn_builds(rows, gates, ctx),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the queue; reading it again in a second");
                        ctx.run_later(std::time::Duration::from_secs(1), |act, ctx| act.read(ctx, true));
                    }
                }
            }),
        );
    }
}

impl QueueMonitor {
    /// Whether `row` may start now: an aggregate (it has a gate) waiting on constituents is held
    /// back, one whose constituent failed is ended as DepFailed; other builds start.
    fn gate_aggregate(
        &mut self,
        row: &Build,
        gate: Option<&Gate>,
        ctx: &mut Context<Self>,
    ) -> bool {
        let id = row.id.0;
        match gate {
            None | Some(Gate::Ready) => {
                self.held.remove(&id);
                true
            }
            Some(Gate::Waiting(on)) => {
                if self.held.insert(id, on.clone()).as_ref() != Some(on) {
                    tracing::info!(build = id, job = %row.job, waiting_on = on.len(), "aggregate held back until its constituents finish");
                }
                false
            }
            Some(Gate::Failed {
                constituent,
                status,
            }) => {
                self.held.remove(&id);
                if !self.failing.insert(id) {
                    return false;
                }
                let (env, row, c, st) = (self.env.clone(), row.clone(), *constituent, *status);
                ctx.spawn(
                    async move {
                        if let Err(e) = aggregate::fail(&env, &row, c, st).await {
                            tracing::error!(build = row.id.0, error = %e, "cannot end the aggregate as DepFailed; the next rescan tries again");
                        }
                    }
                    .into_actor(self)
                    .map(move |_, act, _| {
                        act.failing.remove(&id);
                    }),
                );
                false
            }
        }
    }

    /// A build finished: the held aggregates waiting on it are gated again.
    fn constituent_done(&mut self, id: i64, ctx: &mut Context<Self>) {
        let due: Vec<i64> = self
            .held
            .iter()
            .filter(|(_, on)| on.contains(&id))
            .map(|(a, _)| *a)
            .collect();
        for a in due {
            let env = self.env.clone();
            ctx.spawn(
                async move {
                    let agg = crate::db::types::BuildId(a);
                    let states = env.db.constituents_of(agg).await?;
                    let row = env.db.get_build(agg).await?;
                    Ok::<_, crate::db::DbError>((row, aggregate::gate(&states)))
                }
                .into_actor(self)
                .map(move |res, act, ctx| match res {
                    Ok((row, _)) if row.finished => {
                        act.held.remove(&a);
                    }
                    Ok((row, gate)) => {
                        if act.builds.get(&a).is_some_and(|x| x.connected()) {
                            return;
                        }
                        let gates = BTreeMap::from([(a, gate)]);
                        act.spawn_builds(vec![row], gates, ctx);
                    }
                    Err(e) => {
                        tracing::warn!(build = a, error = %e, "cannot gate the aggregate again; the next rescan does");
                    }
                }),
            );
        }
    }

    fn describe(&self) {
        let mut ids: Vec<i64> = self.builds.keys().copied().collect();
        ids.sort_unstable();
        self.cell.describe(|d| {
            d.state = "watching".into();
            d.children = ids
                .into_iter()
                .map(crate::actors::introspect::ActorId::Build)
                .collect();
        });
    }
}

impl Actor for QueueMonitor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // LISTEN first (on PostgreSQL it is in place when `listen` returns), then read the queue:
        // a build queued in between is seen by the read or notified, never lost.
        let env = self.env.clone();
        ctx.wait(
            async move { env.db.listen().await }
                .into_actor(self)
                .map(|res, act, ctx| {
                    let me = ctx.address();
                    match res {
                        Ok(mut listener) => {
                            act.listener = Some(actix::spawn(async move {
                                loop {
                                    match listener.next().await {
                                        Ok(ev) => {
                                            if me.try_send(Queue(ev)).is_err() && !me.connected() {
                                                return;
                                            }
                                        }
                                        Err(e) => {
                                            tracing::warn!(error = %e, "queue listener error");
                                            tokio::time::sleep(std::time::Duration::from_secs(1))
                                                .await;
                                        }
                                    }
                                }
                            }));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot listen for queue changes");
                            act.listener = Some(actix::spawn(async move {
                                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                                me.do_send(Restart(format!("cannot listen: {e}")));
                            }));
                        }
                    }
                    act.read(ctx, true);
                }),
        );
    }
}

impl actix::Supervised for QueueMonitor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        Stats::inc(&self.env.stats.actor_restarts);
        self.cell.restarted();
        self.cell.set_state("restarting");
        tracing::warn!("queue monitor restarting");
        if let Some(l) = self.listener.take() {
            l.abort();
        }
    }
}

impl Handler<Restart> for QueueMonitor {
    type Result = ();
    fn handle(&mut self, msg: Restart, ctx: &mut Context<Self>) {
        tracing::warn!(reason = %msg.0, "queue monitor stopping to be restarted");
        ctx.stop();
    }
}

impl Handler<Queue> for QueueMonitor {
    type Result = ();
    fn handle(&mut self, msg: Queue, ctx: &mut Context<Self>) {
        self.cell.handled();
        crate::metrics::global().queue.wakeups.inc();
        match msg.0 {
            QueueEvent::BuildsAdded(_) => self.read(ctx, false),
            QueueEvent::BuildsRestarted(_) | QueueEvent::Rescan => self.read(ctx, true),
            QueueEvent::BuildsCancelled(Some(id)) => {
                if let Some(a) = self.builds.get(&id.0) {
                    a.do_send(CancelBuild);
                }
            }
            QueueEvent::BuildsCancelled(None) => self.read(ctx, true),
            QueueEvent::BuildsBumped(id) => {
                let env = self.env.clone();
                let targets: Vec<(i64, Addr<BuildActor>)> = match id {
                    Some(id) => self
                        .builds
                        .get(&id.0)
                        .map(|a| vec![(id.0, a.clone())])
                        .unwrap_or_default(),
                    None => self.builds.iter().map(|(k, v)| (*k, v.clone())).collect(),
                };
                actix::spawn(async move {
                    for (id, a) in targets {
                        if let Ok(b) = env.db.get_build(crate::db::types::BuildId(id)).await {
                            a.do_send(BumpBuild(b.global_priority));
                        }
                    }
                });
            }
        }
    }
}

impl Handler<BuildActorDone> for QueueMonitor {
    type Result = ();
    fn handle(&mut self, msg: BuildActorDone, ctx: &mut Context<Self>) {
        self.cell.handled();
        self.builds.remove(&msg.0);
        self.describe();
        if !self.held.is_empty() {
            self.constituent_done(msg.0, ctx);
        }
    }
}

impl Handler<ActiveBuilds> for QueueMonitor {
    type Result = usize;
    fn handle(&mut self, _: ActiveBuilds, _: &mut Context<Self>) -> usize {
        self.builds.values().filter(|a| a.connected()).count()
    }
}
