//! The expander: expands builds' drv closures into steps for every build actor, a batch at a time
//! (at most [`MAX_BATCH`] builds, oldest first). Requests that arrive while a batch does its I/O
//! wait for the next batch; each batch reads its closures level by level with batched queries
//! ([`expand::plan_many`]), then attaches the builds one after the other in one synchronous pass,
//! so a drv shared by many builds is read once and its step created once (as Hydra's queue runner
//! expands one build at a time, without its one-query-per-drv cost).

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::expand::{self, PlanFor, RecordedLookup};
use crate::actors::env::Env;
use crate::actors::graph::Graph;
use crate::actors::graph::attach::{self, Top};
use crate::actors::messages::BuildPrio;
use crate::actors::step::actor::ExpandProduced;
use crate::actors::step::core::Produced;
use crate::actors::types::{Failure, Status};

/// Expand the closure of `top` for `build`.
pub struct Expand {
    pub build: i64,
    pub top: String,
    pub prio: BuildPrio,
}

/// How the build's top-level drv stands, and the cached failures met (each gets a step row).
pub struct Expanded {
    pub top: Result<Top, String>,
    pub cached: Vec<String>,
}

impl Message for Expand {
    type Result = Expanded;
}

#[derive(Message)]
#[rtype(result = "()")]
struct RunBatch;

/// The most builds one batch plans.
pub const MAX_BATCH: usize = 2_048;

pub struct Expander {
    env: Arc<Env>,
    /// Shared by every step actor (an `Addr` clone allocates twice).
    graph: Arc<Graph>,
    recorded: RecordedLookup,
    pending: Vec<(Expand, oneshot::Sender<Expanded>)>,
    /// A batch is running or about to.
    busy: bool,
}

impl Expander {
    pub fn new(env: Arc<Env>, graph: Arc<Graph>, recorded: RecordedLookup) -> Self {
        Expander {
            env,
            graph,
            recorded,
            pending: Vec::new(),
            busy: false,
        }
    }

    /// Starts a batch after the messages already queued (so they join it).
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if !self.busy && !self.pending.is_empty() {
            self.busy = true;
            ctx.notify(RunBatch);
        }
    }

    fn run_batch(&mut self, ctx: &mut Context<Self>) {
        // At most MAX_BATCH builds (the oldest requests first): after a restart with 100,000
        // queued builds, the first steps are attached (and dispatched) once the first batch's
        // closures are read, not once every closure is.
        let n = self.pending.len().min(MAX_BATCH);
        let batch: Vec<_> = self.pending.drain(..n).collect();
        if batch.is_empty() {
            self.busy = false;
            return;
        }
        let tops: Vec<String> = batch.iter().map(|(r, _)| r.top.clone()).collect();
        let env = self.env.clone();
        let recorded = self.recorded.clone();
        let graph = self.graph.clone();
        ctx.spawn(
            async move { expand::plan_many(&env, &graph, &tops, &*recorded).await }
                .into_actor(self)
                .map(move |planned, act, ctx| {
                    for (req, reply) in batch {
                        let planned = match &planned {
                            Ok(p) => p,
                            Err(msg) => {
                                let _ = reply.send(Expanded {
                                    top: Err(msg.clone()),
                                    cached: vec![],
                                });
                                continue;
                            }
                        };
                        match planned.plan_for(&act.graph, &req.top) {
                            PlanFor::Replan => act.pending.push((req, reply)),
                            PlanFor::Failed(msg) => {
                                let _ = reply.send(Expanded {
                                    top: Err(msg),
                                    cached: vec![],
                                });
                            }
                            PlanFor::Plan(plan) => {
                                let cached = attach::cached_failures(&plan);
                                match attach::attach(&act.graph, plan, req.build, req.prio.clone())
                                {
                                    Top::Replan => act.pending.push((req, reply)),
                                    top => {
                                        let _ = reply.send(Expanded {
                                            top: Ok(top),
                                            cached,
                                        });
                                    }
                                }
                            }
                        }
                    }
                    act.busy = false;
                    act.schedule(ctx);
                }),
        );
    }
}

impl Actor for Expander {
    type Context = Context<Self>;
}

impl Handler<Expand> for Expander {
    type Result = ResponseFuture<Expanded>;

    fn handle(&mut self, msg: Expand, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.pending.push((msg, tx));
        self.schedule(ctx);
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| Expanded {
                top: Err("the expander stopped".into()),
                cached: vec![],
            })
        })
    }
}

/// A derivation a step's input produced: expanded like a build's top-level drv, for the step's
/// owner build, and answered with its step (from the registry) or how it stands.
impl Handler<ExpandProduced> for Expander {
    type Result = ResponseFuture<Produced<crate::actors::graph::StepRef>>;

    fn handle(&mut self, msg: ExpandProduced, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let drv = msg.drv.clone();
        self.pending.push((
            Expand {
                build: msg.build,
                top: msg.drv,
                prio: msg.prio,
            },
            tx,
        ));
        self.schedule(ctx);
        let graph = self.graph.clone();
        Box::pin(async move {
            let failed = |m: String| Produced::Failed(Failure::new(Status::Failed, m));
            match rx.await {
                Err(_) => failed("the expander stopped".into()),
                Ok(Expanded { top: Err(m), .. }) => failed(m),
                Ok(Expanded { top: Ok(top), .. }) => match top {
                    Top::Built(outputs) => Produced::Built(outputs),
                    Top::Failed(f) => Produced::Failed(f),
                    Top::Step(_) | Top::Replan => match graph.live(&drv) {
                        Some((key, dep)) => Produced::Step { key, dep },
                        None => failed(format!("the step for {drv} vanished while attaching")),
                    },
                },
            }
        })
    }
}

impl Handler<RunBatch> for Expander {
    type Result = ();

    fn handle(&mut self, _: RunBatch, ctx: &mut Context<Self>) {
        self.run_batch(ctx);
    }
}
