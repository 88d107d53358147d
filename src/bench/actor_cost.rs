//! What one actix actor costs in resident memory, apart from what it holds (`qr bench
//! --actor-cost N`): N actors that hold nothing, then N that hold as many bytes as a step actor
//! (`StepActor`, inline), each started and alive, against the same bytes held as plain state in
//! a `Vec` (what a dormant step kept as state, not as an actor, would cost at least).

use actix::prelude::*;
use serde::Serialize;

use super::measure::{rss_bytes, trim_heap};
use super::scenario::in_system;
use crate::actors::step::actor::StepActor;

/// The figures, bytes per item.
#[derive(Debug, Clone, Serialize)]
pub struct ActorCost {
    pub actors: usize,
    /// `size_of::<StepActor>()`: the step actor's inline size (its heap parts come on top).
    pub step_actor_inline_bytes: usize,
    /// RSS per started actor holding nothing (the tokio task, actix's context and mailbox, the
    /// address kept).
    pub idle_actor_rss_bytes: f64,
    /// RSS per started actor holding `step_actor_inline_bytes` bytes inline.
    pub step_sized_actor_rss_bytes: f64,
    /// RSS per `step_actor_inline_bytes` bytes held in a `Vec` (no actor).
    pub plain_state_rss_bytes: f64,
}

const STEP: usize = std::mem::size_of::<StepActor>();

struct Idle;

impl Actor for Idle {
    type Context = Context<Self>;
}

struct StepSized(#[allow(dead_code)] [u8; STEP]);

impl Actor for StepSized {
    type Context = Context<Self>;
}

/// Starts `n` actors made by `make`, waits until each has been polled once, and returns the RSS
/// growth per actor (the addresses kept, as the graph keeps its steps').
async fn per_actor<A, F>(n: usize, make: F) -> anyhow::Result<f64>
where
    A: Actor<Context = Context<A>>,
    F: Fn() -> A,
{
    trim_heap();
    let before = rss_bytes();
    let addrs: Vec<Addr<A>> = (0..n).map(|_| make().start()).collect();
    // Let every actor's task run once (started, mailbox registered).
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    trim_heap();
    let after = rss_bytes();
    let alive = addrs.iter().filter(|a| a.connected()).count();
    anyhow::ensure!(alive == n, "{alive} of {n} actors alive");
    let per = after.saturating_sub(before) as f64 / n.max(1) as f64;
    drop(addrs);
    Ok(per)
}

/// Measures (each kind in an actix system of its own).
pub fn actor_cost(n: usize) -> anyhow::Result<ActorCost> {
    let idle = in_system(move || async move { per_actor(n, || Idle).await })?;
    let sized = in_system(move || async move { per_actor(n, || StepSized([1u8; STEP])).await })?;
    trim_heap();
    let before = rss_bytes();
    let plain: Vec<Box<[u8; STEP]>> = (0..n).map(|_| Box::new([1u8; STEP])).collect();
    let after = rss_bytes();
    let plain_per = after.saturating_sub(before) as f64 / n.max(1) as f64;
    drop(plain);
    Ok(ActorCost {
        actors: n,
        step_actor_inline_bytes: STEP,
        idle_actor_rss_bytes: idle,
        step_sized_actor_rss_bytes: sized,
        plain_state_rss_bytes: plain_per,
    })
}
