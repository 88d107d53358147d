//! The admin service (`proto/qr/admin/v1/admin.proto`): status, builds, steps (with their Resolved
//! chains), the actor tree, machines, actions on builds and machines, and an event stream.
//!
//! [`Admin`] holds the plain async functions; the tonic service and the HTTP dashboard's JSON
//! endpoints both call them, so the dashboard renders only what the admin API provides.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use actix::Addr;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::actors::dispatcher::actor::{
    DispatcherActor, GetMachines, GetStatus, SetMachineEnabled,
};
use crate::actors::env::{Env, SchedEvent};
use crate::actors::history::SharedHistory;
use crate::actors::introspect::ActorKind;
use crate::builder::logs::{self, Attempt, LogFile};
use crate::db::DbError;
use crate::db::types::{Build, BuildId, Step};

/// Generated code for `proto/qr/admin/v1/admin.proto`.
pub mod admin_v1 {
    tonic::include_proto!("qr.admin.v1");
}

use admin_v1::admin_service_server::AdminService;
use admin_v1::*;

/// A database error as a gRPC status: what the request named does not exist (NOT_FOUND), is
/// malformed (INVALID_ARGUMENT) or is finished (FAILED_PRECONDITION); the database could not
/// answer — unreachable, its connection lost, the database gone or refusing connections, a pool
/// timeout — UNAVAILABLE (worth retrying later); anything else INTERNAL.
pub fn db_status(e: DbError) -> Status {
    match &e {
        DbError::BuildNotFound(_)
        | DbError::StepNotFound { .. }
        | DbError::JobsetNotFound(_)
        | DbError::EvalNotFound(_) => Status::not_found(e.to_string()),
        DbError::Invalid(_) => Status::invalid_argument(e.to_string()),
        DbError::StepFinished { .. } => Status::failed_precondition(e.to_string()),
        e if e.is_retryable() || db_unavailable(e) => {
            Status::unavailable(format!("the database is unavailable: {}", one_line(e)))
        }
        _ => Status::internal(one_line(&e)),
    }
}

/// The database cannot answer (as opposed to answering with an error about the request).
fn db_unavailable(e: &DbError) -> bool {
    match e {
        DbError::Unreachable { .. }
        | DbError::CommitOutcomeUnknown(_)
        | DbError::ListenerClosed => true,
        DbError::Sql(sqlx::Error::Database(d)) => d.code().as_deref().is_some_and(unavailable_code),
        DbError::Sql(
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_),
        ) => true,
        _ => false,
    }
}

/// Database error codes that say the database cannot serve at all: PostgreSQL classes 08
/// (connection), 28 (authorization), 3D (the database does not exist), 53 (out of resources), 55
/// (e.g. not accepting connections), 57 (shut down, cannot connect now), 58 (system I/O); SQLite's
/// CANTOPEN, IOERR, CORRUPT, FULL, READONLY, NOTADB (primary codes in the low byte).
fn unavailable_code(code: &str) -> bool {
    if code.len() == 5 {
        return ["08", "28", "3D", "53", "55", "57", "58"]
            .iter()
            .any(|class| code.starts_with(class));
    }
    code.parse::<i32>()
        .is_ok_and(|n| matches!(n & 0xff, 8 | 10 | 11 | 13 | 14 | 26))
}

/// `e` and its sources on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s.replace('\n', " ")
}

/// How long an admin request waits for the database before it answers UNAVAILABLE (the database
/// layer would otherwise retry a lost server for up to its pool timeout per attempt).
pub const DB_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

fn actor_gone<E: std::fmt::Display>(e: E) -> Status {
    Status::unavailable(format!("the dispatcher did not answer: {e}"))
}

fn check_id(id: i64) -> Result<BuildId, Status> {
    if id <= 0 {
        return Err(Status::invalid_argument(format!("invalid build id {id}")));
    }
    Ok(BuildId(id))
}

pub fn build_to_proto(b: &Build) -> admin_v1::Build {
    admin_v1::Build {
        id: b.id.0,
        jobset: b.jobset.clone(),
        job: b.job.clone(),
        drv_path: b.drv_path.clone(),
        system: b.system.clone(),
        priority: b.priority,
        global_priority: b.global_priority,
        timestamp: b.timestamp,
        finished: b.finished,
        status: b.build_status.map(|s| s.code()).unwrap_or(-1),
        status_name: b
            .build_status
            .map(|s| format!("{s:?}"))
            .unwrap_or_else(|| if b.finished { "?" } else { "Queued" }.into()),
        start_time: b.start_time.unwrap_or(0),
        stop_time: b.stop_time.unwrap_or(0),
        is_cached: b.is_cached_build,
    }
}

pub fn eval_to_proto(e: &crate::db::EvalSummary) -> admin_v1::Eval {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    admin_v1::Eval {
        id: e.id,
        jobset: e.jobset.clone(),
        timestamp: e.timestamp,
        source: e.source.clone(),
        jobs: n(e.jobs),
        new_builds: n(e.new_builds),
        existing_builds: n(e.jobs - e.new_builds),
        errors: n(e.errors),
        succeeded: n(e.succeeded),
        failed: n(e.failed),
        queued: n(e.queued),
    }
}

pub fn step_to_proto(s: &Step) -> admin_v1::Step {
    admin_v1::Step {
        build: s.build.0,
        stepnr: s.stepnr,
        drv_path: s.drv_path.clone(),
        status: s.status.map(|s| s.code()).unwrap_or(-1),
        status_name: match s.status {
            Some(st) => format!("{st:?}"),
            None if s.busy.is_busy() => format!("{:?}", s.busy),
            None => "Pending".into(),
        },
        busy: s.busy.code(),
        error_msg: s.error_msg.clone().unwrap_or_default(),
        start_time: s.start_time.unwrap_or(0),
        stop_time: s.stop_time.unwrap_or(0),
        machine: s.machine.clone(),
        system: s.system.clone().unwrap_or_default(),
        propagated_from: s.propagated_from.map(|b| b.0).unwrap_or(0),
        times_built: s.times_built.unwrap_or(0),
        resolved_to_step: s.resolved_to_step.unwrap_or(0),
    }
}

pub fn event_to_proto(time: i64, e: &SchedEvent) -> admin_v1::Event {
    let mut ev = admin_v1::Event {
        time,
        ..Default::default()
    };
    match e {
        SchedEvent::BuildStarted { build } => {
            ev.kind = "build_started".into();
            ev.build = *build;
        }
        SchedEvent::BuildFinished { build, status } => {
            ev.kind = "build_finished".into();
            ev.build = *build;
            ev.status = *status;
        }
        SchedEvent::StepStarted { drv, machine } => {
            ev.kind = "step_started".into();
            ev.drv_path = drv.clone();
            ev.machine = machine.clone();
        }
        SchedEvent::StepFinished { drv, status, built } => {
            ev.kind = "step_finished".into();
            ev.drv_path = drv.clone();
            ev.status = *status;
            ev.built = *built;
        }
        SchedEvent::StepResolved { drv, resolved } => {
            ev.kind = "step_resolved".into();
            ev.drv_path = drv.clone();
            ev.resolved = resolved.clone();
        }
        SchedEvent::EarlyCutoff { drv } => {
            ev.kind = "early_cutoff".into();
            ev.drv_path = drv.clone();
        }
        SchedEvent::MachineJoined { machine } => {
            ev.kind = "machine_joined".into();
            ev.machine = machine.clone();
        }
        SchedEvent::MachineLeft { machine } => {
            ev.kind = "machine_left".into();
            ev.machine = machine.clone();
        }
    }
    ev
}

/// The admin functions over the running actors and the database.
#[derive(Clone)]
pub struct Admin {
    env: Arc<Env>,
    dispatcher: Addr<DispatcherActor>,
    /// Machines an operator asked to drain (as opposed to disable).
    draining: Arc<Mutex<BTreeSet<String>>>,
    /// Where build logs are (`<drv base name>.<suffix>.log`).
    log_dirs: Vec<std::path::PathBuf>,
    /// The sampled history (`qr serve` feeds it; `None`: no history kept).
    history: Option<SharedHistory>,
    db_deadline: std::time::Duration,
}

impl Admin {
    pub fn new(env: Arc<Env>, dispatcher: Addr<DispatcherActor>) -> Self {
        Admin {
            env,
            dispatcher,
            draining: Arc::default(),
            log_dirs: vec![],
            history: None,
            db_deadline: DB_DEADLINE,
        }
    }

    /// How long requests wait for the database (default [`DB_DEADLINE`]).
    pub fn with_db_deadline(mut self, d: std::time::Duration) -> Self {
        self.db_deadline = d;
        self
    }

    /// Runs a database operation for a request: its error as a status, and UNAVAILABLE when the
    /// database has not answered within the deadline.
    async fn db<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, DbError>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(self.db_deadline, op).await {
            Ok(r) => r.map_err(db_status),
            Err(_) => {
                tracing::warn!(deadline = ?self.db_deadline, "admin request: the database did not answer in time");
                Err(Status::unavailable(format!(
                    "the database is unavailable: no answer within {:?}",
                    self.db_deadline
                )))
            }
        }
    }

    /// Answers `GetHistory` from `history`.
    pub fn with_history(mut self, history: SharedHistory) -> Self {
        self.history = Some(history);
        self
    }

    pub fn history(&self, after_ms: i64) -> HistoryResponse {
        let Some(h) = &self.history else {
            return HistoryResponse::default();
        };
        let h = h.lock().unwrap_or_else(|p| p.into_inner());
        HistoryResponse {
            interval_s: h.interval().as_secs_f64(),
            window_s: h.window().as_secs_f64(),
            samples: h
                .since(after_ms)
                .into_iter()
                .map(|s| HistorySample {
                    t_ms: s.t_ms,
                    builds_queued: s.builds_queued,
                    runnable: s.runnable,
                    running: s.running,
                    built: s.built,
                    failed: s.failed,
                    finished: s.finished,
                })
                .collect(),
        }
    }

    /// Serves logs found in these directories.
    pub fn with_log_dirs(mut self, dirs: Vec<std::path::PathBuf>) -> Self {
        self.log_dirs = dirs;
        self
    }

    /// The log of `step`: the one written for its own attempt, else the newest of its drv (the
    /// row ran nothing itself — a cached or propagated row — or its log predates per-attempt
    /// names). `true` when it is the step's own.
    fn step_log(
        by_drv: &std::collections::HashMap<String, Vec<LogFile>>,
        step: &Step,
    ) -> Option<(LogFile, bool)> {
        let base = step.drv_path.rsplit('/').next()?;
        let all = by_drv.get(base)?;
        let me = Attempt {
            build: step.build.0,
            stepnr: step.stepnr,
        };
        if let Some(l) = all.iter().rev().find(|l| l.attempt == Some(me)) {
            return Some((l.clone(), true));
        }
        all.last().map(|l| (l.clone(), false))
    }

    pub async fn log(&self, r: GetLogRequest) -> Result<LogResponse, Status> {
        let id = check_id(r.build)?;
        if r.stepnr < 0 {
            return Err(Status::invalid_argument("invalid step number"));
        }
        self.db(self.env.db.get_build(id)).await?;
        let steps = self.db(self.env.db.steps_of_build(id)).await?;
        let dirs = self.log_dirs.clone();
        let by_drv = tokio::task::spawn_blocking(move || logs::scan(&dirs))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let (step, (file, exact)) = if r.stepnr > 0 {
            let step = steps
                .iter()
                .find(|s| s.stepnr == r.stepnr)
                .ok_or_else(|| Status::not_found(format!("step {} of build {}", r.stepnr, id.0)))?;
            let log = Self::step_log(&by_drv, step).ok_or_else(|| {
                Status::not_found(format!(
                    "no log for step {} of build {} ({})",
                    step.stepnr, id.0, step.drv_path
                ))
            })?;
            (step, log)
        } else {
            let with_log = |s: &Step| Self::step_log(&by_drv, s);
            let failed = steps
                .iter()
                .rev()
                .filter(|s| {
                    s.status.is_some_and(|st| {
                        !st.is_success()
                            && st != crate::db::types::BuildStatus::Resolved
                            && s.propagated_from.is_none()
                    })
                })
                .find_map(|s| with_log(s).map(|l| (s, l)));
            failed
                .or_else(|| steps.iter().rev().find_map(|s| with_log(s).map(|l| (s, l))))
                .ok_or_else(|| {
                    Status::not_found(format!("build {} has no step with a log", id.0))
                })?
        };
        let path = file.path.clone();
        let bytes = tokio::task::spawn_blocking(move || read_log(&path))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("{}: {e}", file.path.display())))?;
        const MAX: usize = 1 << 20;
        let mut truncated = bytes.len() > MAX;
        let mut text =
            String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(MAX)..]).into_owned();
        if r.tail_lines > 0 {
            let lines: Vec<&str> = text.lines().collect();
            if lines.len() > r.tail_lines as usize {
                truncated = true;
                text = lines[lines.len() - r.tail_lines as usize..].join("\n") + "\n";
            }
        }
        let base = step.drv_path.rsplit('/').next().unwrap_or_default();
        let unix = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        };
        Ok(LogResponse {
            build: id.0,
            stepnr: step.stepnr,
            drv_path: step.drv_path.clone(),
            file: file.path.display().to_string(),
            text,
            truncated,
            log_build: file.attempt.map_or(0, |a| a.build),
            log_stepnr: file.attempt.map_or(0, |a| a.stepnr),
            exact,
            attempts: by_drv
                .get(base)
                .map(|v| {
                    v.iter()
                        .map(|l| LogAttempt {
                            build: l.attempt.map_or(0, |a| a.build),
                            stepnr: l.attempt.map_or(0, |a| a.stepnr),
                            file: l.path.display().to_string(),
                            modified: unix(l.modified),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    pub fn env(&self) -> &Arc<Env> {
        &self.env
    }

    pub async fn status(&self) -> Result<StatusResponse, Status> {
        let queued = self.db(self.env.db.count_unfinished_builds()).await?;
        self.status_with(queued).await
    }

    /// The queue's length (unfinished builds), or the database's status if it cannot answer.
    pub async fn queued(&self) -> Result<u64, Status> {
        self.db(self.env.db.count_unfinished_builds()).await
    }

    /// The status, with `queued` builds (from [`Admin::queued`]) and everything else from the
    /// actors: no database access.
    pub async fn status_with(&self, queued: u64) -> Result<StatusResponse, Status> {
        let env = &self.env;
        let d = self.dispatcher.send(GetStatus).await.map_err(actor_gone)?;
        let machines = self.machines().await?;
        let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
        let mut active = 0;
        for a in env.actors.snapshot() {
            match a.kind {
                ActorKind::Step => *by_state.entry(a.state).or_insert(0) += 1,
                ActorKind::Build => active += 1,
                _ => {}
            }
        }
        let counts = |m: BTreeMap<String, u64>| {
            m.into_iter()
                .map(|(key, count)| Count { key, count })
                .collect()
        };
        let s = &env.stats;
        use crate::actors::env::Stats;
        Ok(StatusResponse {
            started_at: env.started_at,
            uptime_s: (env.now() - env.started_at).max(0) as u64,
            builds_queued: queued,
            builds_active: active,
            builds_finished: Stats::get(&s.builds_finished),
            steps_by_state: counts(by_state),
            runnable: d.runnable as u64,
            runnable_per_system: counts(
                d.per_system
                    .into_iter()
                    .map(|(k, v)| (k, v as u64))
                    .collect(),
            ),
            machines: machines.len() as u32,
            slots_total: machines.iter().map(|m| m.max_jobs).sum(),
            slots_busy: machines.iter().map(|m| m.running).sum(),
            steps_built: Stats::get(&s.steps_built),
            steps_failed: Stats::get(&s.steps_failed),
            resolutions: Stats::get(&s.resolutions),
            early_cutoffs: Stats::get(&s.early_cutoffs),
            actor_restarts: Stats::get(&s.actor_restarts),
        })
    }

    pub async fn list_builds(&self, r: ListBuildsRequest) -> Result<ListBuildsResponse, Status> {
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(10_000)
        } as usize;
        let rows = if r.unfinished_only {
            let mut v = self.db(self.env.db.unfinished_builds()).await?;
            v.truncate(limit);
            v
        } else {
            self.db(self.env.db.recent_builds(limit as i64)).await?
        };
        Ok(ListBuildsResponse {
            builds: rows.iter().map(build_to_proto).collect(),
        })
    }

    pub async fn get_build(&self, id: i64) -> Result<BuildDetail, Status> {
        let id = check_id(id)?;
        let db = &self.env.db;
        let b = self.db(db.get_build(id)).await?;
        let outputs = self.db(db.build_outputs(id)).await?;
        let steps = self.db(db.steps_of_build(id)).await?;
        let produced = self.db(db.produced_links(id)).await?;
        Ok(BuildDetail {
            build: Some(build_to_proto(&b)),
            outputs: outputs
                .into_iter()
                .map(|o| Output {
                    name: o.name,
                    path: o.path.unwrap_or_default(),
                })
                .collect(),
            steps: steps.iter().map(step_to_proto).collect(),
            produced: produced
                .into_iter()
                .map(|l| ProducedLink {
                    build: l.build.0,
                    stepnr: l.stepnr,
                    output: l.output,
                    produced_build: l.produced_build.0,
                    produced_step: l.produced_step,
                })
                .collect(),
        })
    }

    pub async fn list_evals(&self, r: ListEvalsRequest) -> Result<ListEvalsResponse, Status> {
        let limit = if r.limit == 0 {
            50
        } else {
            r.limit.min(10_000)
        };
        let rows = self.db(self.env.db.evals(i64::from(limit))).await?;
        Ok(ListEvalsResponse {
            evals: rows.iter().map(eval_to_proto).collect(),
        })
    }

    pub async fn get_eval(&self, id: i64) -> Result<EvalDetail, Status> {
        if id <= 0 {
            return Err(Status::invalid_argument(format!(
                "invalid evaluation id {id}"
            )));
        }
        let d = self.db(self.env.db.eval(id)).await?;
        let jobs = d
            .members
            .iter()
            .map(|(m, b)| EvalJob {
                job: m.job.clone(),
                is_new: m.is_new,
                build: Some(build_to_proto(b)),
                constituents: d
                    .constituents
                    .iter()
                    .filter(|(a, _)| *a == m.build)
                    .map(|(_, c)| c.0)
                    .collect(),
            })
            .collect();
        Ok(EvalDetail {
            eval: Some(eval_to_proto(&d.summary)),
            jobs,
            errors: d
                .errors
                .iter()
                .map(|e| EvalLineError {
                    line: e.line,
                    job: e.job.clone().unwrap_or_default(),
                    message: e.message.clone(),
                })
                .collect(),
        })
    }

    pub async fn list_steps(&self, build: i64) -> Result<ListStepsResponse, Status> {
        let id = check_id(build)?;
        self.db(self.env.db.get_build(id)).await?;
        let steps = self.db(self.env.db.steps_of_build(id)).await?;
        Ok(ListStepsResponse {
            steps: steps.iter().map(step_to_proto).collect(),
        })
    }

    pub async fn get_step(&self, build: i64, stepnr: i32) -> Result<StepDetail, Status> {
        let id = check_id(build)?;
        if stepnr <= 0 {
            return Err(Status::invalid_argument(format!(
                "invalid step number {stepnr}"
            )));
        }
        let db = &self.env.db;
        let step = self.db(db.step(id, stepnr)).await?;
        let outputs = self.db(db.step_outputs(id, stepnr)).await?;
        let all = self.db(db.steps_of_build(id)).await?;
        let by_nr: BTreeMap<i32, &Step> = all.iter().map(|s| (s.stepnr, s)).collect();
        let mut chain = vec![step_to_proto(&step)];
        let mut next = step.resolved_to_step;
        while let Some(n) = next {
            let Some(s) = by_nr.get(&n) else { break };
            if chain.len() > 64 {
                break;
            }
            chain.push(step_to_proto(s));
            next = s.resolved_to_step;
        }
        let from = all
            .iter()
            .filter(|s| s.resolved_to_step == Some(stepnr))
            .map(step_to_proto)
            .collect();
        Ok(StepDetail {
            step: Some(step_to_proto(&step)),
            outputs: outputs
                .into_iter()
                .map(|o| Output {
                    name: o.name,
                    path: o.path.unwrap_or_default(),
                })
                .collect(),
            resolved_chain: chain,
            resolved_from: from,
        })
    }

    pub fn actors(&self, kind: &str) -> Result<ListActorsResponse, Status> {
        const KINDS: [&str; 5] = ["", "queue_monitor", "dispatcher", "build", "step"];
        if !KINDS.contains(&kind) {
            return Err(Status::invalid_argument(format!(
                "unknown actor kind {kind:?} (queue_monitor, dispatcher, build, step)"
            )));
        }
        let actors = self
            .env
            .actors
            .snapshot()
            .into_iter()
            .filter(|a| kind.is_empty() || a.kind.as_str() == kind)
            .map(|a| Actor {
                id: a.id,
                kind: a.kind.as_str().into(),
                state: a.state,
                started_at: a.started_at,
                handled: a.handled,
                restarts: a.restarts,
                blocked: a.blocked,
                queued_effects: a.queued_effects,
                parents: a.parents,
                children: a.children,
                waiting_on: a.waiting_on,
                detail: a.detail,
            })
            .collect();
        Ok(ListActorsResponse { actors })
    }

    pub async fn machines(&self) -> Result<Vec<Machine>, Status> {
        let views = self
            .dispatcher
            .send(GetMachines)
            .await
            .map_err(actor_gone)?;
        let mut jobs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for a in self.env.actors.snapshot() {
            if a.kind == ActorKind::Step && a.state == "building" {
                if let Some(m) = a.detail.strip_prefix("building on ") {
                    let drv = a.id.strip_prefix("step:").unwrap_or(&a.id).to_string();
                    jobs.entry(m.to_string()).or_default().push(drv);
                }
            }
        }
        let draining = self.draining.lock().map(|d| d.clone()).unwrap_or_default();
        let now_ms = self.env.now_ms();
        Ok(views
            .into_iter()
            .map(|v| {
                let id = v.info.id.clone();
                let state = match (v.enabled, draining.contains(&id), v.running) {
                    (true, _, _) => "enabled",
                    (false, true, 0) => "drained",
                    (false, true, _) => "draining",
                    (false, false, _) => "disabled",
                };
                let hb = self.env.last_heartbeat(&id);
                Machine {
                    last_heartbeat_ms: hb.map_or(0, |h| h.at_ms),
                    heartbeat_age_s: hb.map_or(0.0, |h| (now_ms - h.at_ms).max(0) as f64 / 1000.0),
                    load: hb.map_or(0.0, |h| h.load),
                    free_disk_bytes: hb.map_or(0, |h| h.free_disk_bytes),
                    local: hb.is_some_and(|h| h.local),
                    jobs: jobs.remove(&id).unwrap_or_default(),
                    id,
                    systems: v.info.systems.into_iter().collect(),
                    supported_features: v.info.supported_features.into_iter().collect(),
                    mandatory_features: v.info.mandatory_features.into_iter().collect(),
                    max_jobs: v.info.max_jobs,
                    running: v.running,
                    speed_factor: v.info.speed_factor,
                    enabled: v.enabled,
                    state: state.into(),
                }
            })
            .collect())
    }

    pub async fn cancel(&self, id: i64) -> Result<ActionResponse, Status> {
        let id = check_id(id)?;
        let done = self
            .db(self.env.db.cancel_build(id, self.env.now()))
            .await?;
        if !done {
            return Err(Status::failed_precondition(format!(
                "build {} is already finished",
                id.0
            )));
        }
        Ok(ActionResponse {
            message: format!("build {} cancelled", id.0),
        })
    }

    pub async fn restart(&self, id: i64) -> Result<ActionResponse, Status> {
        let id = check_id(id)?;
        let done = self.db(self.env.db.restart_build(id)).await?;
        if !done {
            return Err(Status::failed_precondition(format!(
                "build {} is not finished",
                id.0
            )));
        }
        Ok(ActionResponse {
            message: format!("build {} restarted", id.0),
        })
    }

    pub async fn bump(&self, id: i64, prio: i32) -> Result<ActionResponse, Status> {
        let id = check_id(id)?;
        let done = self.db(self.env.db.bump_build(id, prio)).await?;
        if !done {
            return Err(Status::failed_precondition(format!(
                "build {} is finished or already has global priority {prio}",
                id.0
            )));
        }
        Ok(ActionResponse {
            message: format!("build {} bumped to global priority {prio}", id.0),
        })
    }

    pub async fn set_machine(&self, machine: &str, action: i32) -> Result<ActionResponse, Status> {
        use set_machine_request::Action;
        let action = Action::try_from(action)
            .ok()
            .filter(|a| *a != Action::Unspecified)
            .ok_or_else(|| Status::invalid_argument("action must be ENABLE, DISABLE or DRAIN"))?;
        if machine.is_empty() {
            return Err(Status::invalid_argument("no machine given"));
        }
        let enabled = action == Action::Enable;
        let known = self
            .dispatcher
            .send(SetMachineEnabled {
                machine: machine.to_string(),
                enabled,
            })
            .await
            .map_err(actor_gone)?;
        if !known {
            return Err(Status::not_found(format!("no machine {machine:?}")));
        }
        if let Ok(mut d) = self.draining.lock() {
            if action == Action::Drain {
                d.insert(machine.to_string());
            } else {
                d.remove(machine);
            }
        }
        let what = match action {
            Action::Enable => "enabled",
            Action::Disable => "disabled",
            _ => "draining",
        };
        Ok(ActionResponse {
            message: format!("machine {machine} {what}"),
        })
    }

    /// The event stream: every scheduler event from now on (a slow watcher skips what it missed).
    pub fn events(&self) -> impl Stream<Item = admin_v1::Event> + Send + 'static + use<> {
        let env = self.env.clone();
        let rx = env.events.subscribe();
        futures::stream::unfold((rx, env), |(mut rx, env)| async move {
            loop {
                match rx.recv().await {
                    Ok(e) => {
                        let ev = event_to_proto(env.now(), &e);
                        return Some((ev, (rx, env)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "event watcher lagged");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }
}

/// A log file's contents (gunzipped for `.log.gz`).
pub fn read_log(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let raw = std::fs::read(path)?;
    if path.extension().is_some_and(|e| e == "gz") {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Compresses `<dir>/<drv base>.*.log` files that have not changed for `quiet` into `.log.gz`
/// (then removes the plain file). Returns how many were compressed.
pub fn compress_logs(
    dirs: &[std::path::PathBuf],
    drv_path: &str,
    quiet: std::time::Duration,
) -> usize {
    let Some(base) = drv_path.rsplit('/').next() else {
        return 0;
    };
    let prefix = format!("{base}.");
    let mut n = 0;
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(&prefix) && name.ends_with(".log")) {
                continue;
            }
            let fresh = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < quiet);
            if fresh {
                continue;
            }
            let src = e.path();
            let dst = src.with_extension("log.gz");
            let res = (|| -> std::io::Result<()> {
                let data = std::fs::read(&src)?;
                let written = std::fs::metadata(&src)?.modified()?;
                let tmp = src.with_extension("log.gz.tmp");
                let f = std::fs::File::create(&tmp)?;
                let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
                std::io::Write::write_all(&mut gz, &data)?;
                let f = gz.finish()?;
                // The log keeps the time it was last written: attempts are ordered by it.
                f.set_modified(written)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &dst)?;
                std::fs::remove_file(&src)
            })();
            match res {
                Ok(()) => n += 1,
                Err(err) => {
                    tracing::warn!(log = %src.display(), error = %err, "cannot compress a build log")
                }
            }
        }
    }
    n
}

/// Compresses each step's logs a few seconds after it finished (so a remote builder's log stream
/// has ended), for as long as the runner runs.
pub fn spawn_log_compressor(env: Arc<Env>, dirs: Vec<std::path::PathBuf>) {
    let mut rx = env.events.subscribe();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(SchedEvent::StepFinished { drv, built: _, .. }) => {
                    let dirs = dirs.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                        let _ = tokio::task::spawn_blocking(move || {
                            compress_logs(&dirs, &drv, std::time::Duration::from_secs(2))
                        })
                        .await;
                    });
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// The tonic service.
pub struct AdminServiceImpl {
    admin: Admin,
}

impl AdminServiceImpl {
    pub fn new(admin: Admin) -> Self {
        AdminServiceImpl { admin }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<admin_v1::Event, Status>> + Send>>;

#[tonic::async_trait]
impl AdminService for AdminServiceImpl {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.admin.status().await.map(Response::new)
    }

    async fn list_builds(
        &self,
        r: Request<ListBuildsRequest>,
    ) -> Result<Response<ListBuildsResponse>, Status> {
        self.admin
            .list_builds(r.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_build(
        &self,
        r: Request<GetBuildRequest>,
    ) -> Result<Response<BuildDetail>, Status> {
        self.admin
            .get_build(r.into_inner().id)
            .await
            .map(Response::new)
    }

    async fn list_steps(
        &self,
        r: Request<ListStepsRequest>,
    ) -> Result<Response<ListStepsResponse>, Status> {
        self.admin
            .list_steps(r.into_inner().build)
            .await
            .map(Response::new)
    }

    async fn get_step(&self, r: Request<GetStepRequest>) -> Result<Response<StepDetail>, Status> {
        let r = r.into_inner();
        self.admin
            .get_step(r.build, r.stepnr)
            .await
            .map(Response::new)
    }

    async fn list_actors(
        &self,
        r: Request<ListActorsRequest>,
    ) -> Result<Response<ListActorsResponse>, Status> {
        self.admin.actors(&r.into_inner().kind).map(Response::new)
    }

    async fn list_machines(
        &self,
        _: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        let machines = self.admin.machines().await?;
        Ok(Response::new(ListMachinesResponse { machines }))
    }

    async fn cancel_build(
        &self,
        r: Request<BuildAction>,
    ) -> Result<Response<ActionResponse>, Status> {
        self.admin
            .cancel(r.into_inner().id)
            .await
            .map(Response::new)
    }

    async fn restart_build(
        &self,
        r: Request<BuildAction>,
    ) -> Result<Response<ActionResponse>, Status> {
        self.admin
            .restart(r.into_inner().id)
            .await
            .map(Response::new)
    }

    async fn bump_build(
        &self,
        r: Request<BumpBuildRequest>,
    ) -> Result<Response<ActionResponse>, Status> {
        let r = r.into_inner();
        self.admin
            .bump(r.id, r.global_priority)
            .await
            .map(Response::new)
    }

    async fn set_machine(
        &self,
        r: Request<SetMachineRequest>,
    ) -> Result<Response<ActionResponse>, Status> {
        let r = r.into_inner();
        self.admin
            .set_machine(&r.machine, r.action)
            .await
            .map(Response::new)
    }

    async fn list_evals(
        &self,
        r: Request<ListEvalsRequest>,
    ) -> Result<Response<ListEvalsResponse>, Status> {
        self.admin
            .list_evals(r.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_eval(&self, r: Request<GetEvalRequest>) -> Result<Response<EvalDetail>, Status> {
        self.admin
            .get_eval(r.into_inner().id)
            .await
            .map(Response::new)
    }

    async fn get_log(&self, r: Request<GetLogRequest>) -> Result<Response<LogResponse>, Status> {
        self.admin.log(r.into_inner()).await.map(Response::new)
    }

    async fn get_history(
        &self,
        r: Request<GetHistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        Ok(Response::new(self.admin.history(r.into_inner().after_ms)))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        use futures::StreamExt;
        let s = self.admin.events().map(Ok);
        Ok(Response::new(Box::pin(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_errors_map_to_codes() {
        for code in [
            "08006", "57P01", "3D000", "55000", "28P01", "53300", "14", "522", "13",
        ] {
            assert!(unavailable_code(code), "{code}");
        }
        for code in ["23505", "42601", "40001", "1", "19", "2067", ""] {
            assert!(!unavailable_code(code), "{code}");
        }
        let code = |e: DbError| db_status(e).code();
        use tonic::Code;
        assert_eq!(
            code(DbError::Sql(sqlx::Error::PoolTimedOut)),
            Code::Unavailable
        );
        assert_eq!(
            code(DbError::Sql(sqlx::Error::PoolClosed)),
            Code::Unavailable
        );
        assert_eq!(
            code(DbError::Sql(sqlx::Error::Io(std::io::Error::other(
                "reset"
            )))),
            Code::Unavailable
        );
        assert_eq!(code(DbError::ListenerClosed), Code::Unavailable);
        assert_eq!(code(DbError::BuildNotFound(BuildId(3))), Code::NotFound);
        assert_eq!(code(DbError::Invalid("x".into())), Code::InvalidArgument);
        assert_eq!(
            code(DbError::StepFinished {
                build: BuildId(1),
                stepnr: 2
            }),
            Code::FailedPrecondition
        );
        assert_eq!(code(DbError::Sql(sqlx::Error::RowNotFound)), Code::Internal);
        let s = db_status(DbError::Sql(sqlx::Error::PoolTimedOut));
        assert!(
            s.message().starts_with("the database is unavailable: "),
            "{s:?}"
        );
    }

    #[test]
    fn logs_are_compressed_once_quiet_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let drv = "/nix/store/aaaa-x.drv";
        let log = d.path().join("aaaa-x.drv.123.log");
        std::fs::write(&log, "line 1\nline 2\n").unwrap();
        let written = std::fs::metadata(&log).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let dirs = vec![d.path().to_path_buf()];
        // too fresh
        assert_eq!(
            super::compress_logs(&dirs, drv, std::time::Duration::from_secs(60)),
            0
        );
        assert_eq!(
            super::compress_logs(&dirs, drv, std::time::Duration::ZERO),
            1
        );
        assert!(!log.exists());
        let gz = d.path().join("aaaa-x.drv.123.log.gz");
        assert_eq!(super::read_log(&gz).unwrap(), b"line 1\nline 2\n");
        // It keeps the time the log was written.
        let t = std::fs::metadata(&gz).unwrap().modified().unwrap();
        assert!(t <= written, "{t:?} > {written:?}");
    }
}
