//! One actor per connected builder: a machine to the dispatcher (it handles `RunJob` and
//! `AbortJob` like the local machine), the runner's end of the builder's session. It keeps the
//! session's [`JobTable`] and refuses what does not fit it; a refusal ends the session and
//! quarantines the builder, and every job in flight is answered `Aborted` (transient), so its step
//! is retried elsewhere. Nothing a builder sends enters the store unchecked (see [`super::verify`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tonic::Status;

use super::clip::clip_message;
use super::hub::{BuilderHub, Outbound, Quarantine, RemoteSettings, SessionEnded};
use super::jobs::{Expected, JobTable, OutputCheck};
use super::runner_v1::{self, RunnerMessage, builder_message, job_result, runner_message};
use super::{info_from_proto, info_to_proto, references_first};
use crate::actors::dispatcher::MachineInfo;
use crate::actors::dispatcher::actor::{DispatcherActor, MachineHolds, SlotFreed};
use crate::actors::env::Env;
use crate::actors::messages::{AbortJob, JobDone, RunJob};
use crate::actors::step::BuildOutcome;
use crate::actors::types::{Outputs, Status as BuildStatus};
use crate::store::{LocalStore, PathInfo, Store};

/// A message the builder sent on its session stream.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromBuilder(pub runner_v1::BuilderMessage);

/// The session stream ended (or broke).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected(pub String);

/// The builder opened a new session: this one ends (its jobs may be adopted by the new one).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Superseded;

/// What an upload must satisfy.
#[derive(Debug, Clone)]
pub struct UploadPermit {
    pub expected: Expected,
    /// The paths the output may refer to besides itself and its siblings.
    pub inputs: BTreeSet<String>,
}

/// May this session upload `info` as `output` of `job_id`?
#[derive(Message)]
#[rtype(result = "Result<UploadPermit, String>")]
pub struct CheckUpload {
    pub job_id: String,
    pub output: String,
    pub info: PathInfo,
}

/// An upload was checked and registered (or the path was valid already).
#[derive(Message)]
#[rtype(result = "()")]
pub struct UploadDone {
    pub job_id: String,
    pub output: String,
    pub info: PathInfo,
}

/// Something the builder sent broke the protocol (seen by the service): refuse the builder.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Refuse(pub String);

/// The step a job is for, and the step row (attempt) it is recorded in.
#[derive(Clone)]
pub struct StepRef {
    step: actix::WeakRecipient<JobDone>,
    attempt: Option<crate::builder::logs::Attempt>,
}

/// The step attempt job `0` of this session is for (names the log the builder streams up).
#[derive(Message)]
#[rtype(result = "Option<crate::builder::logs::Attempt>")]
pub struct JobAttempt(pub String);

pub struct RemoteMachine {
    env: Arc<Env>,
    store: Arc<LocalStore>,
    dispatcher: Addr<DispatcherActor>,
    hub: Addr<BuilderHub>,
    settings: Arc<RemoteSettings>,
    info: MachineInfo,
    session: String,
    tx: Option<Outbound>,
    jobs: JobTable<StepRef>,
    /// Builds the builder held when it joined: drv → its old job id.
    held: BTreeMap<String, String>,
    /// Jobs the runner aborted lately: a result for one of them is dropped, not refused.
    aborted: VecDeque<String>,
    last_seen: Instant,
    closed: bool,
    load: f64,
    free_disk: u64,
    /// This machine's metrics, and the jobs in flight timed by phase (by job id).
    counters: Arc<crate::metrics::MachineCounters>,
    timers: HashMap<String, crate::metrics::JobTimer>,
}

impl RemoteMachine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        env: Arc<Env>,
        store: Arc<LocalStore>,
        dispatcher: Addr<DispatcherActor>,
        hub: Addr<BuilderHub>,
        settings: Arc<RemoteSettings>,
        info: MachineInfo,
        session: String,
        tx: Outbound,
        held: BTreeMap<String, String>,
    ) -> Self {
        let counters = crate::metrics::global().machine(&info.id);
        counters.sessions.inc();
        RemoteMachine {
            counters,
            timers: HashMap::new(),
            jobs: JobTable::new(settings.store_dir.clone(), session.clone()),
            env,
            store,
            dispatcher,
            hub,
            settings,
            info,
            session,
            tx: Some(tx),
            held,
            aborted: VecDeque::new(),
            last_seen: Instant::now(),
            closed: false,
            load: 0.0,
            free_disk: 0,
        }
    }

    fn send(&mut self, msg: runner_message::Msg, ctx: &mut Context<Self>) {
        let ok = match &self.tx {
            Some(tx) => tx.try_send(Ok(RunnerMessage { msg: Some(msg) })).is_ok(),
            None => false,
        };
        if !ok {
            self.close(ctx, None, "the session stream is closed or not reading");
        }
    }

    /// Ends the session: every job in flight is answered Aborted (transient) so its step is
    /// retried, and the hub (which tells the dispatcher) is told. The actor lingers a little to
    /// answer late `RunJob`s the same way.
    fn close(&mut self, ctx: &mut Context<Self>, status: Option<Status>, why: &str) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let (Some(tx), Some(s)) = (&self.tx, status) {
            let _ = tx.try_send(Err(s));
        }
        self.tx = None;
        let jobs = self.jobs.drain();
        // Jobs lost with the session count as the machine's failures.
        for (_, t) in self.timers.drain() {
            t.finish(false);
        }
        if !jobs.is_empty() {
            tracing::warn!(machine = %self.info.id, jobs = jobs.len(), reason = why, "builder session ended with jobs in flight: they will be retried");
        } else {
            tracing::info!(machine = %self.info.id, reason = why, "builder session ended");
        }
        for j in jobs {
            if let Some(step) = j.payload.step.upgrade() {
                step.do_send(JobDone(BuildOutcome::Failed {
                    status: BuildStatus::Aborted,
                    message: format!("lost builder {}: {why}", self.info.id),
                    transient: true,
                }));
            }
        }
        self.hub.do_send(SessionEnded {
            machine: self.info.id.clone(),
            session: self.session.clone(),
        });
        ctx.run_later(Duration::from_secs(30), |_, ctx| ctx.stop());
    }

    /// The builder broke the protocol.
    fn refuse(&mut self, ctx: &mut Context<Self>, reason: String) {
        // The reason quotes what the builder sent, which may be huge.
        let reason = clip_message(&reason);
        tracing::error!(machine = %self.info.id, reason = %reason, "refusing what the builder sent");
        self.counters.refusals.inc();
        self.hub.do_send(Quarantine {
            machine: self.info.id.clone(),
            reason: reason.clone(),
        });
        self.close(
            ctx,
            Some(Status::permission_denied(format!("refused: {reason}"))),
            &reason,
        );
    }

    /// A job ended: its step hears the outcome, the dispatcher gets the slot back.
    fn finish(&mut self, job_id: &str, outcome: BuildOutcome) {
        if let Some(t) = self.timers.remove(job_id) {
            t.finish(matches!(outcome, BuildOutcome::Built(_)));
        }
        if let Some(j) = self.jobs.take(job_id) {
            if let Some(step) = j.payload.step.upgrade() {
                step.do_send(JobDone(outcome));
            }
            self.dispatcher.do_send(SlotFreed(self.info.id.clone()));
        }
    }

    fn remember_aborted(&mut self, job_id: String) {
        self.aborted.push_back(job_id);
        if self.aborted.len() > 1000 {
            self.aborted.pop_front();
        }
    }

    fn on_result(&mut self, r: runner_v1::JobResult, ctx: &mut Context<Self>) {
        if self.jobs.get(&r.job_id).is_none() {
            if self.aborted.contains(&r.job_id) {
                tracing::debug!(job = %r.job_id, "result for an aborted job dropped");
                return;
            }
            let reason = format!(
                "result for job {} ({}), which it was not given",
                r.job_id, r.drv_path
            );
            return self.refuse(ctx, reason);
        }
        match r.outcome {
            Some(job_result::Outcome::Failure(f)) => {
                let status = BuildStatus::from_code(f.status).unwrap_or(BuildStatus::Failed);
                tracing::info!(machine = %self.info.id, drv = %r.drv_path, status = f.status, "remote build failed");
                self.finish(
                    &r.job_id,
                    BuildOutcome::Failed {
                        status,
                        message: f.message,
                        transient: f.transient,
                    },
                );
            }
            Some(job_result::Outcome::Success(s)) => {
                let mut outputs = BTreeMap::new();
                for o in &s.outputs {
                    let info = match o.info.as_ref().map(info_from_proto) {
                        Some(Ok(i)) => i,
                        Some(Err(e)) => return self.refuse(ctx, e),
                        None => return self.refuse(ctx, format!("output {} without info", o.name)),
                    };
                    outputs.insert(o.name.clone(), info);
                }
                let checks = match self.jobs.check_result(&r.job_id, &outputs) {
                    Ok(c) => c,
                    Err(v) => return self.refuse(ctx, v.to_string()),
                };
                let store = self.store.clone();
                let job_id = r.job_id.clone();
                let drv_path = r.drv_path.clone();
                let ran = s.ran;
                let fut = async move {
                    for (name, c) in &checks {
                        if let OutputCheck::InStore(claimed) = c {
                            match store.query_path_info(&claimed.path).await {
                                Ok(Some(have))
                                    if have.nar_hash == claimed.nar_hash
                                        && have.nar_size == claimed.nar_size => {}
                                Ok(Some(_)) => {
                                    return Err(format!(
                                        "output {name} ({}) differs from the runner's copy",
                                        claimed.path
                                    ));
                                }
                                Ok(None) => {
                                    return Err(format!(
                                        "output {name} ({}) was neither uploaded nor valid on the runner",
                                        claimed.path
                                    ));
                                }
                                Err(e) => return Err(format!("checking {}: {e}", claimed.path)),
                            }
                        }
                    }
                    Ok(())
                };
                ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
                    if act.jobs.get(&job_id).is_none() {
                        return; // closed meanwhile
                    }
                    match res {
                        Err(reason) => act.refuse(ctx, format!("job {job_id}: {reason}")),
                        Ok(()) => {
                            if ran {
                                act.env.record_run(&drv_path);
                            }
                            let outs: Outputs = outputs
                                .into_iter()
                                .map(|(n, i)| (n, i.path))
                                .collect();
                            tracing::info!(machine = %act.info.id, drv = %drv_path, ran, "remote build done");
                            act.finish(&job_id, BuildOutcome::Built(outs));
                        }
                    }
                }));
            }
            None => self.refuse(
                ctx,
                format!("result for job {} without an outcome", r.job_id),
            ),
        }
    }
}

impl Actor for RemoteMachine {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Joining is its first sign of life.
        self.env.heartbeat(&self.info.id, None, false);
        let hb = self.settings.heartbeat.max(Duration::from_millis(100));
        let silent = self.settings.silent_timeout.max(hb);
        // Looked at four times per heartbeat, so a silent builder is lost at most a quarter
        // interval after the timeout.
        ctx.run_interval(hb / 4, move |act, ctx| {
            if !act.closed && act.last_seen.elapsed() > silent {
                act.close(
                    ctx,
                    Some(Status::deadline_exceeded("no heartbeat")),
                    &format!(
                        "nothing heard from the builder for {:.1} s",
                        silent.as_secs_f64()
                    ),
                );
            }
        });
        // The runner's own sign of life, so the builder notices a silent connection too.
        ctx.run_interval(hb, |act, ctx| {
            if !act.closed {
                act.send(
                    runner_message::Msg::Heartbeat(runner_v1::RunnerHeartbeat {}),
                    ctx,
                );
            }
        });
        if !self.held.is_empty() {
            ctx.run_later(self.settings.adopt_grace, |act, ctx| {
                // Builds it held and nobody asked for again: tell it to drop them.
                let adopted = act.jobs.drvs();
                let orphans: Vec<(String, String)> = std::mem::take(&mut act.held)
                    .into_iter()
                    .filter(|(d, _)| !adopted.contains(d))
                    .collect();
                act.dispatcher.do_send(MachineHolds {
                    machine: act.info.id.clone(),
                    drvs: BTreeSet::new(),
                });
                for (drv, job) in orphans {
                    if act.closed {
                        break;
                    }
                    tracing::info!(machine = %act.info.id, drv = %drv, "dropping a held build nobody adopted");
                    act.send(
                        runner_message::Msg::Abort(runner_v1::AbortJob {
                            job_id: job,
                            drv_path: drv,
                            reason: "not adopted".into(),
                        }),
                        ctx,
                    );
                }
            });
        }
    }
}

impl Handler<RunJob> for RemoteMachine {
    type Result = ();
    fn handle(&mut self, msg: RunJob, ctx: &mut Context<Self>) {
        if self.closed {
            if let Some(step) = msg.step.upgrade() {
                step.do_send(JobDone(BuildOutcome::Failed {
                    status: BuildStatus::Aborted,
                    message: format!("builder {} went away", self.info.id),
                    transient: true,
                }));
            }
            return;
        }
        match msg.drv.clone() {
            Some(drv) => self.start_job(msg, drv, ctx),
            None => {
                // The step does not hold its derivation: read it from the store first.
                let store = self.store.clone();
                let path = msg.drv_path.clone();
                ctx.wait(
                    async move { store.read_derivation(&path).await }
                        .into_actor(self)
                        .map(move |res, act, ctx| match res {
                            Ok(drv) => act.start_job(msg, Arc::new(drv), ctx),
                            Err(e) => {
                                if let Some(step) = msg.step.upgrade() {
                                    step.do_send(JobDone(BuildOutcome::Failed {
                                        status: BuildStatus::Aborted,
                                        message: format!("cannot read {}: {e}", msg.drv_path),
                                        transient: true,
                                    }));
                                }
                                act.dispatcher.do_send(SlotFreed(act.info.id.clone()));
                            }
                        }),
                );
            }
        }
    }
}

impl RemoteMachine {
    /// Sends the job (with its derivation) to the builder.
    fn start_job(
        &mut self,
        msg: RunJob,
        drv: Arc<crate::store::Derivation>,
        ctx: &mut Context<Self>,
    ) {
        let adopting = self.held.remove(&msg.drv_path).is_some();
        let job_id = self.jobs.add(
            &msg.drv_path,
            &drv,
            BTreeSet::new(),
            StepRef {
                step: msg.step.clone(),
                attempt: msg.attempt,
            },
        );
        tracing::info!(machine = %self.info.id, drv = %msg.drv_path, job = %job_id, adopting, "sending a build");
        self.timers.insert(job_id.clone(), self.counters.job());
        let machine_type = crate::metrics::steps::machine_type_of(&drv);
        let store = self.store.clone();
        let drv_aterm = drv.to_aterm();
        let drv_path = msg.drv_path.clone();
        let fut = async move {
            // What the builder needs: the drv's closure (its sources, and for a drv with input
            // drvs those drvs, so the builder can read their output paths) and the input drvs'
            // outputs.
            let mut roots: Vec<String> = drv.input_srcs.iter().cloned().collect();
            if store.is_valid_path(&drv_path).await? {
                roots.push(drv_path.clone());
            }
            for (input, wanted) in &drv.input_drvs {
                let idrv = store.read_derivation(input).await?;
                for o in wanted {
                    if let Some(p) = idrv.outputs.get(o).and_then(|x| x.path()) {
                        roots.push(p.to_string());
                    }
                }
            }
            let closure = store.closure(roots.iter().map(String::as_str)).await?;
            let mut infos = Vec::with_capacity(closure.len());
            for p in &closure {
                match store.query_path_info(p).await? {
                    Some(i) => infos.push(i),
                    None => return Err(crate::store::StoreError::NotValid(p.to_string())),
                }
            }
            Ok::<_, crate::store::StoreError>(references_first(infos))
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            if act.jobs.get(&job_id).is_none() {
                return;
            }
            match res {
                Err(e) => {
                    tracing::error!(drv = %msg.drv_path, error = %e, "cannot list the inputs of a build");
                    act.finish(
                        &job_id,
                        BuildOutcome::Failed {
                            status: BuildStatus::Aborted,
                            message: format!("cannot list the inputs: {e}"),
                            transient: true,
                        },
                    );
                }
                Ok(infos) => {
                    if let Some(t) = act.timers.get_mut(&job_id) {
                        t.phase(crate::metrics::Phase::Building);
                    }
                    crate::metrics::global()
                        .steps
                        .input_closure_bytes
                        .with(&[("machine_type", &machine_type)])
                        .observe(infos.iter().map(|i| i.nar_size as f64).sum());
                    act.jobs
                        .set_inputs(&job_id, infos.iter().map(|i| i.path.clone()).collect());
                    let job = runner_v1::BuildJob {
                        job_id: job_id.clone(),
                        drv_path: msg.drv_path.clone(),
                        drv: drv_aterm,
                        inputs: infos.iter().map(info_to_proto).collect(),
                        max_silent_s: msg.max_silent.as_secs(),
                        timeout_s: msg.timeout.as_secs(),
                    };
                    act.send(runner_message::Msg::Build(job), ctx);
                }
            }
        }));
    }
}

impl Handler<AbortJob> for RemoteMachine {
    type Result = ();
    fn handle(&mut self, msg: AbortJob, ctx: &mut Context<Self>) {
        let Some(id) = self.jobs.by_drv(&msg.drv_path).map(|j| j.id.clone()) else {
            return;
        };
        tracing::info!(machine = %self.info.id, drv = %msg.drv_path, "aborting a remote build: no longer wanted");
        // Dropped unfinished: counted as aborted.
        self.timers.remove(&id);
        self.jobs.take(&id);
        self.remember_aborted(id.clone());
        self.dispatcher.do_send(SlotFreed(self.info.id.clone()));
        self.send(
            runner_message::Msg::Abort(runner_v1::AbortJob {
                job_id: id,
                drv_path: msg.drv_path,
                reason: "no longer wanted".into(),
            }),
            ctx,
        );
    }
}

impl Handler<FromBuilder> for RemoteMachine {
    type Result = ();
    fn handle(&mut self, msg: FromBuilder, ctx: &mut Context<Self>) {
        if self.closed {
            return;
        }
        self.last_seen = Instant::now();
        let load = match &msg.0.msg {
            Some(builder_message::Msg::Heartbeat(h)) => Some((h.load, h.free_disk_bytes)),
            _ => None,
        };
        self.env.heartbeat(&self.info.id, load, false);
        match msg.0.msg {
            Some(builder_message::Msg::Heartbeat(h)) => {
                self.load = h.load;
                self.free_disk = h.free_disk_bytes;
                tracing::trace!(machine = %self.info.id, load = self.load, free_disk = self.free_disk, "heartbeat");
            }
            Some(builder_message::Msg::Result(r)) => self.on_result(r, ctx),
            Some(builder_message::Msg::Join(_)) => {
                self.refuse(ctx, "joined twice on one session".into())
            }
            None => {}
        }
    }
}

impl Handler<Disconnected> for RemoteMachine {
    type Result = ();
    fn handle(&mut self, msg: Disconnected, ctx: &mut Context<Self>) {
        self.close(ctx, None, &msg.0);
    }
}

impl Handler<Superseded> for RemoteMachine {
    type Result = ();
    fn handle(&mut self, _: Superseded, ctx: &mut Context<Self>) {
        self.close(
            ctx,
            Some(Status::aborted(
                "replaced by a newer session of this builder",
            )),
            "replaced by a newer session",
        );
    }
}

impl Handler<CheckUpload> for RemoteMachine {
    type Result = Result<UploadPermit, String>;
    fn handle(&mut self, msg: CheckUpload, ctx: &mut Context<Self>) -> Self::Result {
        if self.closed {
            return Err("the session is closed".into());
        }
        match self.jobs.check_upload(&msg.job_id, &msg.output, &msg.info) {
            Ok(expected) => {
                if let Some(t) = self.timers.get_mut(&msg.job_id) {
                    t.phase(crate::metrics::Phase::ReceivingOutputs);
                }
                Ok(UploadPermit {
                    expected,
                    inputs: self
                        .jobs
                        .get(&msg.job_id)
                        .map(|j| j.inputs.clone())
                        .unwrap_or_default(),
                })
            }
            Err(v) => {
                let reason = format!("upload of {}: {v}", msg.info.path);
                if self.aborted.contains(&msg.job_id) {
                    return Err(reason);
                }
                self.refuse(ctx, reason.clone());
                Err(reason)
            }
        }
    }
}

impl Handler<UploadDone> for RemoteMachine {
    type Result = ();
    fn handle(&mut self, msg: UploadDone, _: &mut Context<Self>) {
        tracing::debug!(machine = %self.info.id, path = %msg.info.path, "output received");
        self.jobs.uploaded(&msg.job_id, &msg.output, msg.info);
    }
}

impl Handler<JobAttempt> for RemoteMachine {
    type Result = Option<crate::builder::logs::Attempt>;
    fn handle(&mut self, msg: JobAttempt, _: &mut Context<Self>) -> Self::Result {
        self.jobs.get(&msg.0).and_then(|j| j.payload.attempt)
    }
}

impl Handler<Refuse> for RemoteMachine {
    type Result = ();
    fn handle(&mut self, msg: Refuse, ctx: &mut Context<Self>) {
        self.refuse(ctx, msg.0);
    }
}
