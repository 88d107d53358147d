//! A connected builder as a complete machine: the runner's end of one session. It keeps the
//! session's [`JobTable`] and decides what every message means: a job sent or answered at once, a
//! result accepted, dropped (its job was aborted) or refused, an upload allowed, a silent builder
//! lost, held builds nobody adopted dropped. A refusal ends the session and quarantines the
//! builder; ending the session answers every job in flight `Aborted` (transient), so its step is
//! retried elsewhere. Generic over the step's address so its tests need no actix; the actor
//! ([`super::remote_machine`]) only performs the commands, the I/O is in [`super::remote_io`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Status;

use super::clip::clip_message;
use super::jobs::{Expected, JobTable, OutputCheck};
use super::runner_v1::{self, builder_message, job_result, runner_message};
use super::{info_from_proto, info_to_proto};
use crate::actors::step::BuildOutcome;
use crate::actors::types::{Outputs, Status as BuildStatus};
use crate::builder::logs::Attempt;
use crate::store::{Derivation, PathInfo, StoreDir};

/// What an upload must satisfy.
#[derive(Debug, Clone)]
pub struct UploadPermit {
    pub expected: Expected,
    /// The paths the output may refer to besides itself and its siblings.
    pub inputs: BTreeSet<String>,
}

/// A step's job, as the machine takes it (`S`: where its outcome goes).
pub struct Order<S> {
    pub drv_path: String,
    /// `None`: read from the store first.
    pub drv: Option<Arc<Derivation>>,
    pub step: S,
    pub max_silent: Duration,
    pub timeout: Duration,
    pub attempt: Option<Attempt>,
}

/// What a job in the table carries.
#[derive(Clone)]
pub struct StepRef<S> {
    pub step: S,
    pub attempt: Option<Attempt>,
}

/// What the session takes.
pub enum In<S> {
    Start,
    /// A quarter of the heartbeat interval passed (`now`: when the check runs).
    Check {
        now: Instant,
    },
    /// Time for the runner's heartbeat.
    HeartbeatDue,
    /// The grace for adopting the builds it held is over.
    AdoptGraceOver,
    Run(Order<S>),
    /// The derivation of a job that came without one was read.
    DrvRead {
        order: Order<S>,
        drv: Result<Arc<Derivation>, String>,
    },
    /// The inputs of a job were listed (its closure, references first).
    Inputs {
        job_id: String,
        order: Order<S>,
        drv: Arc<Derivation>,
        inputs: Result<Vec<PathInfo>, String>,
    },
    /// Outputs the builder claimed were valid on the runner were looked at.
    Verified {
        job_id: String,
        drv_path: String,
        ran: bool,
        outputs: Outputs,
        result: Result<(), String>,
    },
    Abort(String),
    /// A message the builder sent, and when it arrived.
    FromBuilder {
        msg: runner_v1::BuilderMessage,
        at: Instant,
    },
    UploadDone {
        job_id: String,
        output: String,
        info: PathInfo,
    },
    /// The stream to the builder is closed or not reading.
    StreamClosed,
    Disconnected(String),
    Superseded,
    Refuse(String),
}

/// What the session does.
pub enum Cmd<S> {
    /// Start the check (every `check_every`) and heartbeat (every `heartbeat`) timers, and the
    /// adoption grace when it held builds.
    StartTimers {
        check_every: Duration,
        heartbeat: Duration,
        adopt_grace: bool,
    },
    /// The machine is alive (with its load and free disk, from a heartbeat).
    Alive(Option<(f64, u64)>),
    Send(runner_message::Msg),
    /// End the stream to the builder, with this status if any.
    CloseStream(Option<Status>),
    Report {
        to: S,
        outcome: BuildOutcome,
    },
    FreeSlot,
    /// It holds nothing more to adopt.
    HoldsNothing,
    ReadDrv(Order<S>),
    ListInputs {
        job_id: String,
        order: Order<S>,
        drv: Arc<Derivation>,
    },
    Verify {
        job_id: String,
        drv_path: String,
        ran: bool,
        outputs: Outputs,
        checks: BTreeMap<String, OutputCheck>,
    },
    RecordRun(String),
    Quarantine(String),
    SessionEnded,
    /// Linger to answer late jobs the same way, then stop.
    StopLater,
    /// For the machine's metrics: a job's phase changed, or the session's state.
    Note(Note),
}

/// What the machine's metrics hear: the session's start and refusals, and the phases of a job
/// (timed from `Taken` to `Ended`, `Dropped` or `SessionLost`).
#[derive(Debug)]
pub enum Note {
    /// The session started (a join or a rejoin).
    Opened,
    /// The runner refused what the builder sent.
    Refused,
    /// The machine took the job.
    Taken(String),
    /// Its inputs were listed: it goes to the builder.
    Sending {
        job_id: String,
        drv: Arc<Derivation>,
        closure_bytes: u64,
    },
    /// The builder uploads its outputs.
    Receiving(String),
    Ended {
        job_id: String,
        built: bool,
    },
    /// Aborted before it ended.
    Dropped(String),
    /// The session ended with its jobs in flight.
    SessionLost,
}

pub struct RemoteCore<S> {
    machine: String,
    jobs: JobTable<StepRef<S>>,
    /// Builds the builder held when it joined: drv → its old job id.
    held: BTreeMap<String, String>,
    /// Jobs the runner aborted lately: a result for one of them is dropped, not refused.
    aborted: VecDeque<String>,
    /// When the builder was last heard (joining counts).
    last_heard: Instant,
    heartbeat: Duration,
    check_every: Duration,
    silent_timeout: Duration,
    closed: bool,
    ready: VecDeque<Cmd<S>>,
}

/// How many aborted jobs are remembered.
const ABORTED_KEPT: usize = 1000;

impl<S: Clone> RemoteCore<S> {
    pub fn new(
        machine: String,
        store_dir: StoreDir,
        session: String,
        held: BTreeMap<String, String>,
        heartbeat: Duration,
        silent_timeout: Duration,
        joined: Instant,
    ) -> Self {
        let hb = heartbeat.max(Duration::from_millis(100));
        RemoteCore {
            machine,
            jobs: JobTable::new(store_dir, session),
            held,
            aborted: VecDeque::new(),
            last_heard: joined,
            heartbeat: hb,
            // Looked at four times per heartbeat, so a silent builder is lost at most a quarter
            // interval after the timeout.
            check_every: hb / 4,
            silent_timeout: silent_timeout.max(hb),
            closed: false,
            ready: VecDeque::new(),
        }
    }

    pub fn poll(&mut self) -> Option<Cmd<S>> {
        self.ready.pop_front()
    }

    pub fn closed(&self) -> bool {
        self.closed
    }

    /// The step attempt of a job (names the log the builder streams up).
    pub fn attempt(&self, job_id: &str) -> Option<Attempt> {
        self.jobs.get(job_id).and_then(|j| j.payload.attempt)
    }

    fn push(&mut self, c: Cmd<S>) {
        self.ready.push_back(c);
    }

    fn send(&mut self, m: runner_message::Msg) {
        if !self.closed {
            self.push(Cmd::Send(m));
        }
    }

    pub fn on(&mut self, ev: In<S>) {
        match ev {
            In::Start => {
                // Joining is its first sign of life.
                self.push(Cmd::Note(Note::Opened));
                self.push(Cmd::Alive(None));
                let adopt_grace = !self.held.is_empty();
                self.push(Cmd::StartTimers {
                    check_every: self.check_every,
                    heartbeat: self.heartbeat,
                    adopt_grace,
                });
            }
            In::Check { now } => {
                let quiet = now.saturating_duration_since(self.last_heard);
                if !self.closed && quiet > self.silent_timeout {
                    let why = format!(
                        "nothing heard from the builder for {:.1} s",
                        self.silent_timeout.as_secs_f64()
                    );
                    self.close(Some(Status::deadline_exceeded("no heartbeat")), &why);
                }
            }
            In::HeartbeatDue => self.send(runner_message::Msg::Heartbeat(
                runner_v1::RunnerHeartbeat {},
            )),
            In::AdoptGraceOver => self.drop_unadopted(),
            In::Run(order) => self.run(order),
            In::DrvRead { order, drv } => match drv {
                Ok(drv) => self.start_job(order, drv),
                Err(e) => {
                    let message = format!("cannot read {}: {e}", order.drv_path);
                    self.push(Cmd::Report {
                        to: order.step,
                        outcome: aborted(message),
                    });
                    self.push(Cmd::FreeSlot);
                }
            },
            In::Inputs {
                job_id,
                order,
                drv,
                inputs,
            } => self.inputs_listed(job_id, order, &drv, inputs),
            In::Verified {
                job_id,
                drv_path,
                ran,
                outputs,
                result,
            } => {
                if self.jobs.get(&job_id).is_none() {
                    return; // closed or aborted meanwhile
                }
                match result {
                    Err(reason) => self.refuse(format!("job {job_id}: {reason}")),
                    Ok(()) => {
                        if ran {
                            self.push(Cmd::RecordRun(drv_path.clone()));
                        }
                        tracing::info!(machine = %self.machine, drv = %drv_path, ran, "remote build done");
                        self.finish(&job_id, BuildOutcome::Built(outputs));
                    }
                }
            }
            In::Abort(drv) => self.abort(&drv),
            In::FromBuilder { msg, at } => self.heard(msg, at),
            In::UploadDone {
                job_id,
                output,
                info,
            } => {
                tracing::debug!(machine = %self.machine, path = %info.path, "output received");
                self.jobs.uploaded(&job_id, &output, info);
            }
            In::StreamClosed => self.close(None, "the session stream is closed or not reading"),
            In::Disconnected(why) => self.close(None, &why),
            In::Superseded => self.close(
                Some(Status::aborted(
                    "replaced by a newer session of this builder",
                )),
                "replaced by a newer session",
            ),
            In::Refuse(reason) => self.refuse(reason),
        }
    }

    /// May the session upload `info` as `output` of `job_id`? A violation refuses the builder,
    /// unless the job was aborted (its late upload is only turned away).
    pub fn check_upload(
        &mut self,
        job_id: &str,
        output: &str,
        info: &PathInfo,
    ) -> Result<UploadPermit, String> {
        if self.closed {
            return Err("the session is closed".into());
        }
        match self.jobs.check_upload(job_id, output, info) {
            Ok(expected) => {
                self.push(Cmd::Note(Note::Receiving(job_id.to_string())));
                Ok(UploadPermit {
                    expected,
                    inputs: self
                        .jobs
                        .get(job_id)
                        .map(|j| j.inputs.clone())
                        .unwrap_or_default(),
                })
            }
            Err(v) => {
                let reason = format!("upload of {}: {v}", info.path);
                if !self.aborted.iter().any(|a| a == job_id) {
                    self.refuse(reason.clone());
                }
                Err(reason)
            }
        }
    }

    fn run(&mut self, order: Order<S>) {
        if self.closed {
            let message = format!("builder {} went away", self.machine);
            self.push(Cmd::Report {
                to: order.step,
                outcome: aborted(message),
            });
            return;
        }
        match order.drv.clone() {
            Some(drv) => self.start_job(order, drv),
            None => self.push(Cmd::ReadDrv(order)),
        }
    }

    /// The job enters the table; its inputs are listed before it is sent.
    fn start_job(&mut self, order: Order<S>, drv: Arc<Derivation>) {
        if self.closed {
            return self.run(order);
        }
        let adopting = self.held.remove(&order.drv_path).is_some();
        let job_id = self.jobs.add(
            &order.drv_path,
            &drv,
            BTreeSet::new(),
            StepRef {
                step: order.step.clone(),
                attempt: order.attempt,
            },
        );
        tracing::info!(machine = %self.machine, drv = %order.drv_path, job = %job_id, adopting, "sending a build");
        self.push(Cmd::Note(Note::Taken(job_id.clone())));
        self.push(Cmd::ListInputs { job_id, order, drv });
    }

    fn inputs_listed(
        &mut self,
        job_id: String,
        order: Order<S>,
        drv: &Arc<Derivation>,
        inputs: Result<Vec<PathInfo>, String>,
    ) {
        if self.jobs.get(&job_id).is_none() {
            return;
        }
        match inputs {
            Err(e) => {
                tracing::error!(drv = %order.drv_path, error = %e, "cannot list the inputs of a build");
                let outcome = aborted(format!("cannot list the inputs: {e}"));
                self.finish(&job_id, outcome);
            }
            Ok(infos) => {
                self.push(Cmd::Note(Note::Sending {
                    job_id: job_id.clone(),
                    drv: drv.clone(),
                    closure_bytes: infos.iter().map(|i| i.nar_size).sum(),
                }));
                self.jobs
                    .set_inputs(&job_id, infos.iter().map(|i| i.path.clone()).collect());
                let job = runner_v1::BuildJob {
                    job_id,
                    drv_path: order.drv_path,
                    drv: drv.to_aterm(),
                    inputs: infos.iter().map(info_to_proto).collect(),
                    max_silent_s: order.max_silent.as_secs(),
                    timeout_s: order.timeout.as_secs(),
                };
                self.send(runner_message::Msg::Build(job));
            }
        }
    }

    fn abort(&mut self, drv: &str) {
        let Some(id) = self.jobs.by_drv(drv).map(|j| j.id.clone()) else {
            return;
        };
        tracing::info!(machine = %self.machine, drv = %drv, "aborting a remote build: no longer wanted");
        self.jobs.take(&id);
        self.push(Cmd::Note(Note::Dropped(id.clone())));
        self.remember_aborted(id.clone());
        self.push(Cmd::FreeSlot);
        self.send(runner_message::Msg::Abort(runner_v1::AbortJob {
            job_id: id,
            drv_path: drv.to_string(),
            reason: "no longer wanted".into(),
        }));
    }

    /// Builds it held that nobody asked for again: it is told to drop them.
    fn drop_unadopted(&mut self) {
        let adopted = self.jobs.drvs();
        let orphans: Vec<(String, String)> = std::mem::take(&mut self.held)
            .into_iter()
            .filter(|(d, _)| !adopted.contains(d))
            .collect();
        self.push(Cmd::HoldsNothing);
        for (drv, job) in orphans {
            tracing::info!(machine = %self.machine, drv = %drv, "dropping a held build nobody adopted");
            self.send(runner_message::Msg::Abort(runner_v1::AbortJob {
                job_id: job,
                drv_path: drv,
                reason: "not adopted".into(),
            }));
        }
    }

    fn heard(&mut self, msg: runner_v1::BuilderMessage, at: Instant) {
        if self.closed {
            return;
        }
        self.last_heard = self.last_heard.max(at);
        match msg.msg {
            Some(builder_message::Msg::Heartbeat(h)) => {
                tracing::trace!(machine = %self.machine, load = h.load, free_disk = h.free_disk_bytes, "heartbeat");
                self.push(Cmd::Alive(Some((h.load, h.free_disk_bytes))));
            }
            Some(builder_message::Msg::Result(r)) => {
                self.push(Cmd::Alive(None));
                self.on_result(r);
            }
            Some(builder_message::Msg::Join(_)) => {
                self.push(Cmd::Alive(None));
                self.refuse("joined twice on one session".into())
            }
            None => self.push(Cmd::Alive(None)),
        }
    }

    fn on_result(&mut self, r: runner_v1::JobResult) {
        if self.jobs.get(&r.job_id).is_none() {
            if self.aborted.contains(&r.job_id) {
                tracing::debug!(job = %r.job_id, "result for an aborted job dropped");
                return;
            }
            let reason = format!(
                "result for job {} ({}), which it was not given",
                r.job_id, r.drv_path
            );
            return self.refuse(reason);
        }
        match r.outcome {
            Some(job_result::Outcome::Failure(f)) => {
                let status = BuildStatus::from_code(f.status).unwrap_or(BuildStatus::Failed);
                tracing::info!(machine = %self.machine, drv = %r.drv_path, status = f.status, "remote build failed");
                let outcome = BuildOutcome::Failed {
                    status,
                    message: f.message,
                    transient: f.transient,
                };
                self.finish(&r.job_id, outcome);
            }
            Some(job_result::Outcome::Success(s)) => {
                let mut outputs = BTreeMap::new();
                for o in &s.outputs {
                    let info = match o.info.as_ref().map(info_from_proto) {
                        Some(Ok(i)) => i,
                        Some(Err(e)) => return self.refuse(e),
                        None => return self.refuse(format!("output {} without info", o.name)),
                    };
                    outputs.insert(o.name.clone(), info);
                }
                let checks = match self.jobs.check_result(&r.job_id, &outputs) {
                    Ok(c) => c,
                    Err(v) => return self.refuse(v.to_string()),
                };
                self.push(Cmd::Verify {
                    job_id: r.job_id,
                    drv_path: r.drv_path,
                    ran: s.ran,
                    outputs: outputs.into_iter().map(|(n, i)| (n, i.path)).collect(),
                    checks,
                });
            }
            None => self.refuse(format!("result for job {} without an outcome", r.job_id)),
        }
    }

    /// A job ended: its step hears the outcome, the dispatcher gets the slot back.
    fn finish(&mut self, job_id: &str, outcome: BuildOutcome) {
        if let Some(j) = self.jobs.take(job_id) {
            let built = matches!(outcome, BuildOutcome::Built(_));
            self.push(Cmd::Note(Note::Ended {
                job_id: job_id.to_string(),
                built,
            }));
            self.push(Cmd::Report {
                to: j.payload.step,
                outcome,
            });
            self.push(Cmd::FreeSlot);
        }
    }

    fn remember_aborted(&mut self, job_id: String) {
        self.aborted.push_back(job_id);
        if self.aborted.len() > ABORTED_KEPT {
            self.aborted.pop_front();
        }
    }

    /// The builder broke the protocol.
    fn refuse(&mut self, reason: String) {
        // The reason quotes what the builder sent, which may be huge.
        let reason = clip_message(&reason);
        tracing::error!(machine = %self.machine, reason = %reason, "refusing what the builder sent");
        self.push(Cmd::Note(Note::Refused));
        self.push(Cmd::Quarantine(reason.clone()));
        let status = Status::permission_denied(format!("refused: {reason}"));
        self.close(Some(status), &reason);
    }

    /// Ends the session: every job in flight is answered Aborted (transient) so its step is
    /// retried, and the hub (which tells the dispatcher) is told.
    fn close(&mut self, status: Option<Status>, why: &str) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.push(Cmd::CloseStream(status));
        let jobs = self.jobs.drain();
        self.push(Cmd::Note(Note::SessionLost));
        if jobs.is_empty() {
            tracing::info!(machine = %self.machine, reason = why, "builder session ended");
        } else {
            tracing::warn!(machine = %self.machine, jobs = jobs.len(), reason = why, "builder session ended with jobs in flight: they will be retried");
        }
        for j in jobs {
            let message = format!("lost builder {}: {why}", self.machine);
            self.push(Cmd::Report {
                to: j.payload.step,
                outcome: aborted(message),
            });
        }
        self.push(Cmd::SessionEnded);
        self.push(Cmd::StopLater);
    }
}

fn aborted(message: String) -> BuildOutcome {
    BuildOutcome::Failed {
        status: BuildStatus::Aborted,
        message,
        transient: true,
    }
}

#[cfg(test)]
#[path = "remote_core_tests.rs"]
mod tests;
