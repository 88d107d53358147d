//! The runner's step gauges and counters tell the truth (real actors, in-process): a step
//! retried after a transient failure leaves `steps_running` when its attempt ends; a Runnable
//! step abandoned by its cancelled build leaves `steps_runnable`; no gauge goes below 0; and a
//! resolution whose drv another step built counts as an early cutoff exactly when its row is
//! shown as "cached (already built)". On SQLite and PostgreSQL.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::inproc::{Rig, in_actix, native, rig};
use common::instantiate::Kind;
use common::qr::Backend;
use qr::actors::env::Stats;
use qr::actors::machine::Executor;
use qr::actors::machine::executor::{Built, ExecFailure, Job};
use qr::actors::step::RetryPolicy;
use qr::actors::types::Status;
use qr::db::types::BuildStatus;

/// Fails each drv's first attempt as transient (a lost machine, say), then runs it for real.
struct FlakyOnce {
    inner: Arc<dyn Executor>,
    tried: Mutex<HashSet<String>>,
}

#[async_trait]
impl Executor for FlakyOnce {
    async fn execute(&self, job: Job) -> Result<Built, ExecFailure> {
        let first = self
            .tried
            .lock()
            .expect("lock")
            .insert(job.drv_path.clone());
        if first {
            return Err(ExecFailure {
                status: Status::Aborted,
                message: "the machine went away (simulated)".into(),
                transient: true,
            });
        }
        self.inner.execute(job).await
    }
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_tries: 3,
        interval: Duration::from_millis(50),
        backoff: 1.0,
    }
}

fn transient_retry_leaves_running(backend: Backend) {
    in_actix(async {
        let Some(mut r) = rig(backend, 2, quick_retries(), |qr, store| {
            Arc::new(FlakyOnce {
                inner: native(qr, store),
                tried: Mutex::new(HashSet::new()),
            })
        })
        .await
        else {
            return;
        };
        let mut g = r.instantiator();
        let a = Rig::ca(&mut g, "gauge-a", "echo a > $out", &[]);
        let script = format!("cat {} > $out", g.out(&a));
        let b = Rig::ca(&mut g, "gauge-b", &script, &[&a]);
        let id = r.queue(&g, &b).await;
        assert_eq!(r.finished(id).await, BuildStatus::Success);
        // Each built drv (a, which resolves to itself, and b's resolved drv) failed once and was
        // retried.
        let steps = r.closed_steps(id).await;
        let retried = steps
            .iter()
            .filter(|s| s.status == Some(BuildStatus::Aborted))
            .count();
        assert_eq!(retried, 2, "one failed attempt per built drv: {steps:?}");
        r.gauges_at_zero("after transient retries").await;
    });
}

fn abandoned_runnable_step_leaves_runnable(backend: Backend) {
    in_actix(async {
        let Some(mut r) = rig(backend, 1, RetryPolicy::default(), native).await else {
            return;
        };
        // A drv for a system no machine has: it waits Runnable (the unsupported wait is 60 s).
        let mut g = r.instantiator();
        g.system = "nosuch-system".into();
        let stuck = g.add(Kind::Ca, "gauge-stuck", "echo x > $out", &[], &[]);
        let id = r.queue(&g, &stuck).await;
        r.gauge_settles("queued", |s| Stats::get(&s.steps_runnable), 1)
            .await;
        assert!(r.db.cancel_build(id, 1).await.expect("cancel"));
        assert_eq!(r.finished(id).await, BuildStatus::Cancelled);
        r.gauges_at_zero("after abandoning a runnable step").await;
    });
}

fn early_cutoffs_count_cached_rows(backend: Backend) {
    in_actix(async {
        let Some(mut r) = rig(backend, 4, RetryPolicy::default(), native).await else {
            return;
        };
        // Two CA upstreams with the same output feed two CA downstreams, which therefore resolve
        // to one drv: built once, its other row cached. The downstreams' build sleeps, so the
        // second resolution meets the resolved step while it is still building.
        let mut g = r.instantiator();
        let up_a = g.add(
            Kind::Ca,
            "cutoff-up",
            "echo same > $out",
            &[("variant", "a")],
            &[],
        );
        let up_b = g.add(
            Kind::Ca,
            "cutoff-up",
            "echo same > $out",
            &[("variant", "b")],
            &[],
        );
        let down = |g: &mut common::instantiate::Gen, up: &str| {
            let script = format!("sleep 2; cat {} > $out", g.out(up));
            Rig::ca(g, "cutoff-down", &script, &[up])
        };
        let down_a = down(&mut g, &up_a);
        let down_b = down(&mut g, &up_b);
        let script = format!("cat {} {} > $out", g.out(&down_a), g.out(&down_b));
        let top = Rig::ca(&mut g, "cutoff-top", &script, &[&down_a, &down_b]);
        let id = r.queue(&g, &top).await;
        assert_eq!(r.finished(id).await, BuildStatus::Success);
        let steps = r.closed_steps(id).await;
        // As `qr run` shows them: Success rows not built here are "cached (already built)".
        let cached = steps
            .iter()
            .filter(|s| s.status == Some(BuildStatus::Success) && s.times_built == Some(0))
            .count();
        assert_eq!(cached, 1, "one resolved row is cached: {steps:?}");
        assert_eq!(
            Stats::get(&r.env.stats.early_cutoffs),
            cached as u64,
            "every cached row is an early cutoff: {steps:?}"
        );
        r.gauges_at_zero("after an early cutoff").await;
    });
}

#[test]
fn transient_retry_leaves_the_running_gauge_sqlite() {
    transient_retry_leaves_running(Backend::Sqlite);
}

#[test]
fn transient_retry_leaves_the_running_gauge_postgres() {
    transient_retry_leaves_running(Backend::Postgres);
}

#[test]
fn abandoned_runnable_step_leaves_the_runnable_gauge_sqlite() {
    abandoned_runnable_step_leaves_runnable(Backend::Sqlite);
}

#[test]
fn abandoned_runnable_step_leaves_the_runnable_gauge_postgres() {
    abandoned_runnable_step_leaves_runnable(Backend::Postgres);
}

#[test]
fn early_cutoffs_count_every_cached_row_sqlite() {
    early_cutoffs_count_cached_rows(Backend::Sqlite);
}

#[test]
fn early_cutoffs_count_every_cached_row_postgres() {
    early_cutoffs_count_cached_rows(Backend::Postgres);
}
