//! With one slot, the runner (real actors, in-process) dispatches the head of a long chain before
//! short independent steps of an older build, when history in the database says the chain's
//! steps are long: the remaining critical path orders the queue (`[scheduler] order =
//! "critical-path"`, the default). With `order = "build-id"` the older build's steps go first,
//! as before. The order is the one in which the machine was handed the jobs (one slot: one at a
//! time), not a timing. Without the history both sides would tie (three steps of the default
//! each), and the older build would win. On SQLite and PostgreSQL.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::inproc::{Setup, in_actix, local_machine, native, rig_with};
use common::instantiate::Kind;
use common::qr::Backend;
use qr::actors::dispatcher::Order;
use qr::actors::env::{Scheduling, Stats};
use qr::actors::graph::durations::drv_name;
use qr::actors::machine::Executor;
use qr::actors::machine::executor::{Built, ExecFailure, Job};
use qr::actors::step::RetryPolicy;
use qr::db::types::BuildStatus;
use tokio::sync::watch;

/// Records the order jobs reach the machine (by drv name) and holds the blocker's job until the
/// test opens the gate.
struct Gate {
    inner: Arc<dyn Executor>,
    order: Arc<Mutex<Vec<String>>>,
    open: watch::Receiver<bool>,
}

#[async_trait]
impl Executor for Gate {
    async fn execute(&self, job: Job) -> Result<Built, ExecFailure> {
        let name = drv_name(&job.drv_path).to_string();
        self.order.lock().expect("lock").push(name.clone());
        if name == "cp-blocker" {
            let mut open = self.open.clone();
            open.wait_for(|o| *o)
                .await
                .expect("the gate's sender lives");
        }
        self.inner.execute(job).await
    }
}

const HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

/// A finished build of job `history` whose successful steps took these seconds (by drv name),
/// stopped an hour ago.
fn history(now: i64, steps: &[(&str, i64)]) -> Vec<String> {
    let stop = now - 3600;
    let mut sql = vec![
        "insert into jobsets (name, schedulingshares) values ('past', 100)".to_string(),
        format!(
            "insert into builds (id, jobset, job, drvpath, system, timestamp, finished, \
             buildstatus, starttime, stoptime, laststepnr) values (1000, 'past', 'history', \
             '/nix/store/{HASH}-past.drv', 'x86_64-linux', {stop}, 1, 0, {stop}, {stop}, {})",
            steps.len()
        ),
    ];
    for (i, (name, secs)) in steps.iter().enumerate() {
        sql.push(format!(
            "insert into buildsteps (build, stepnr, type, drvpath, busy, status, starttime, \
             stoptime, machine, timesbuilt) values (1000, {}, 0, '/nix/store/{HASH}-{name}.drv', \
             0, 0, {}, {stop}, 'old', 1)",
            i + 1,
            stop - secs
        ));
    }
    sql
}

/// Runs the scenario with `order`; returns the drv names in the order the machine got them.
async fn dispatch_order(backend: Backend, order: Order) -> Option<Vec<String>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let jobs = Arc::new(Mutex::new(Vec::new()));
    let (release, open) = watch::channel(false);
    let recorded = jobs.clone();
    let setup = Setup {
        machines: vec![local_machine(1)],
        retry: RetryPolicy::default(),
        scheduling: Scheduling {
            order,
            default_step_duration: Duration::from_secs(60),
        },
        // The chain's steps took 100 s each, the short ones 1 s. Without this history both
        // sides are three steps of the default deep: a tie, which the older build wins.
        before_start: history(
            now,
            &[
                ("cp-chain-1", 100),
                ("cp-chain-2", 100),
                ("cp-chain-3", 100),
                ("cp-short-a", 1),
                ("cp-short-b", 1),
                ("cp-short-mid", 1),
                ("cp-short-top", 1),
            ],
        ),
    };
    let mut r = rig_with(backend, setup, move |qr, store| {
        Arc::new(Gate {
            inner: native(qr, store),
            order: recorded,
            open,
        })
    })
    .await?;
    let mut g = r.instantiator();
    let ia = |g: &mut common::instantiate::Gen, name: &str, inputs: &[&str]| {
        let script = format!("echo {name} > $out");
        g.add(Kind::Ia, name, &script, &[], inputs)
    };
    // The blocker holds the one slot while the other builds are queued.
    let blocker = ia(&mut g, "cp-blocker", &[]);
    let short_a = ia(&mut g, "cp-short-a", &[]);
    let short_b = ia(&mut g, "cp-short-b", &[]);
    let short_mid = ia(&mut g, "cp-short-mid", &[&short_a, &short_b]);
    let short_top = ia(&mut g, "cp-short-top", &[&short_mid]);
    let c1 = ia(&mut g, "cp-chain-1", &[]);
    let c2 = ia(&mut g, "cp-chain-2", &[&c1]);
    let c3 = ia(&mut g, "cp-chain-3", &[&c2]);
    let b0 = r.queue(&g, &blocker).await;
    wait_until("the blocker runs", || {
        jobs.lock()
            .expect("lock")
            .contains(&"cp-blocker".to_string())
    })
    .await;
    // The short steps' build is older (lower id) than the chain's.
    let b1 = r.queue(&g, &short_top).await;
    let b2 = r.queue(&g, &c3).await;
    assert!(b1.0 < b2.0);
    // short-a, short-b and chain-1 wait for the slot.
    r.gauge_settles("three steps runnable", |s| Stats::get(&s.steps_runnable), 3)
        .await;
    release.send(true).expect("the gate listens");
    for id in [b0, b1, b2] {
        assert_eq!(r.finished(id).await, BuildStatus::Success, "build {id}");
    }
    // Every step left the critical paths.
    let graph = r.sched.graph.clone();
    wait_until("no step tracked", || graph.tracked() == 0).await;
    r.gauges_at_zero("after the builds").await;
    let order = jobs.lock().expect("lock").clone();
    Some(order)
}

/// Waits (bounded) until `f` holds.
async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not reached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn at(order: &[String], name: &str) -> usize {
    order
        .iter()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("{name} never ran: {order:?}"))
}

fn long_chain_first(backend: Backend) {
    in_actix(async {
        let Some(order) = dispatch_order(backend, Order::CriticalPath).await else {
            return;
        };
        assert_eq!(order.len(), 8, "each step ran once: {order:?}");
        // When the blocker's slot frees, the chain's head (300 s of path) goes before the
        // short steps (3 s), though their build is older. (A slot frees before the step that
        // waited on the finished one is queued, so later picks are not asserted.)
        assert_eq!(order[1], "cp-chain-1", "{order:?}");
        assert_eq!(order[7], "cp-short-top", "{order:?}");
    });
}

fn oldest_build_first(backend: Backend) {
    in_actix(async {
        let Some(order) = dispatch_order(backend, Order::BuildId).await else {
            return;
        };
        assert_eq!(order.len(), 8, "each step ran once: {order:?}");
        // The older build's runnable steps before the chain's head.
        let mut first: Vec<&str> = order[1..3].iter().map(|s| s.as_str()).collect();
        first.sort_unstable();
        assert_eq!(first, ["cp-short-a", "cp-short-b"], "{order:?}");
        assert!(at(&order, "cp-chain-1") > 2, "{order:?}");
    });
}

#[test]
fn a_long_chains_head_goes_before_older_short_steps_sqlite() {
    long_chain_first(Backend::Sqlite);
}

#[test]
fn a_long_chains_head_goes_before_older_short_steps_postgres() {
    long_chain_first(Backend::Postgres);
}

#[test]
fn build_id_order_keeps_the_oldest_build_first_sqlite() {
    oldest_build_first(Backend::Sqlite);
}

#[test]
fn build_id_order_keeps_the_oldest_build_first_postgres() {
    oldest_build_first(Backend::Postgres);
}
