//! What a step's commands tell others: its waiters, the child it joins, the steps below it, the
//! machine running its job, and the stats and events watchers see.

use super::core::{Counter, Note, Notice, Row};
use super::machine::Gauge;
use super::wiring::{AddWaiter, JobRoute, StepActor, StepRef, WaiterAddr};
use crate::actors::env::{Env, SchedEvent, Stats};
use crate::actors::limits::BuildLimits;
use crate::actors::messages::{
    AbortJob, AddBuilds, AdoptRow, BuildPrio, OutputsLanded, RunJob, StepFailed,
};
use crate::actors::types::Drv;

/// Tells one waiter (if it still lives).
pub fn notify(w: &WaiterAddr, from: &Drv, notice: &Notice) {
    match notice {
        Notice::Landed(outputs) => {
            let msg = OutputsLanded {
                from: from.clone(),
                outputs: outputs.clone(),
            };
            match w {
                WaiterAddr::Step(_, a) => a.upgrade().map(|a| a.send(msg)),
                WaiterAddr::Build(_, a, _) => a.upgrade().map(|a| a.do_send(msg)),
            };
        }
        Notice::Failed(failure) => {
            let msg = StepFailed {
                from: from.clone(),
                failure: failure.clone(),
            };
            match w {
                WaiterAddr::Step(_, a) => a.upgrade().map(|a| a.send(msg)),
                WaiterAddr::Build(_, _, a) => a.upgrade().map(|a| a.do_send(msg)),
            };
        }
    }
}

/// Joins the resolved drv's step: our pending row for it, our builds (when it did not get them
/// at its creation), and us as its waiter.
pub fn join_child(
    env: &Env,
    dep: &StepRef,
    me: WaiterAddr,
    adopt: Option<Row>,
    builds: Option<Vec<(i64, BuildPrio)>>,
) {
    if let Some((build, stepnr)) = adopt {
        dep.send(AdoptRow { build, stepnr });
    }
    if let Some(b) = builds {
        env.stats.membership();
        dep.send(AddBuilds(b));
    }
    dep.send(AddWaiter(me));
}

pub fn pass_builds(env: &Env, to: Vec<StepRef>, builds: Vec<(i64, BuildPrio)>) {
    for d in to {
        env.stats.membership();
        d.send(AddBuilds(builds.clone()));
    }
}

/// What sends the step's job to its machine, named for the row it is recorded in, with the
/// chosen build's limits (`None`: the runner's defaults).
pub fn job_sender(
    env: &Env,
    drv: &Drv,
    to: JobRoute,
    limits: Option<BuildLimits>,
    me: actix::WeakAddr<StepActor>,
) -> impl FnOnce(Option<Row>) + Send + 'static {
    let (max_silent, timeout) = match limits {
        Some(l) => (l.max_silent(), l.timeout()),
        None => (env.max_silent, env.timeout),
    };
    tracing::debug!(drv = %drv, max_silent_s = max_silent.as_secs(), timeout_s = timeout.as_secs(), "job limits");
    let job = RunJob {
        drv_path: drv.to_string(),
        drv: None,
        step: me.recipient(),
        max_silent,
        timeout,
        attempt: None,
    };
    move |attempt| {
        to.runner.do_send(RunJob {
            attempt: attempt.map(|(build, stepnr)| crate::builder::logs::Attempt { build, stepnr }),
            ..job
        })
    }
}

pub fn abort_job(drv: &Drv, job: JobRoute) {
    if let Some(abort) = job.abort {
        abort.do_send(AbortJob {
            drv_path: drv.to_string(),
        });
    }
}

/// The one place gauges change: from the gauge of the phase left to that of the phase entered
/// (see [`Gauge`]).
pub fn account(stats: &Stats, left: Option<Gauge>, entered: Option<Gauge>) {
    let counter = |g: Gauge| match g {
        Gauge::Runnable => &stats.steps_runnable,
        Gauge::Running => &stats.steps_running,
    };
    if let Some(g) = left {
        stats.dec(counter(g));
    }
    if let Some(g) = entered {
        Stats::inc(counter(g));
    }
}

pub fn count(stats: &Stats, c: Counter) {
    match c {
        Counter::StepsBuilt => Stats::inc(&stats.steps_built),
        Counter::StepsFailed => Stats::inc(&stats.steps_failed),
        Counter::EarlyCutoffs => Stats::inc(&stats.early_cutoffs),
        Counter::DbWriteFailures => Stats::inc(&stats.db_write_failures),
        Counter::MembershipHandled => stats.dec(&stats.membership_in_flight),
    }
}

/// The watchers' event for a note (`Dispatched` is the adapter's, for the latency).
pub fn note(env: &Env, drv: &Drv, n: Note) {
    crate::metrics::global().steps.noted(&n);
    let ev = match n {
        Note::Dispatched => return,
        Note::Started { machine } => SchedEvent::StepStarted {
            drv: drv.to_string(),
            machine,
        },
        Note::Finished { status, built } => SchedEvent::StepFinished {
            drv: drv.to_string(),
            status: status.code(),
            built,
        },
        Note::EarlyCutoff { drv } => SchedEvent::EarlyCutoff {
            drv: drv.to_string(),
        },
    };
    env.emit(ev);
}
