//! The builder hub: the one actor that admits builders (version, store dir, quarantine), starts a
//! [`RemoteMachine`] per session, and tells the dispatcher about machines joining and leaving (one
//! sender, so a builder that reconnects is always seen to leave before it joins again).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::mpsc;
use tonic::Status;

use super::remote_machine::{RemoteMachine, Superseded};
use super::runner_v1::{self, RunnerMessage, runner_message};
use super::{PROTOCOL_VERSION, compatible};
use crate::actors::dispatcher::MachineInfo;
use crate::actors::dispatcher::actor::{DispatcherActor, MachineHolds, MachineJoined, MachineLeft};
use crate::actors::env::Env;
use crate::store::{LocalStore, StoreDir};

/// Where the runner sends a session's messages.
pub type Outbound = mpsc::Sender<Result<RunnerMessage, Status>>;

/// How the runner treats its builders (from `[grpc]`).
#[derive(Debug, Clone)]
pub struct RemoteSettings {
    pub store_dir: StoreDir,
    /// Builders send a heartbeat this often, and the runner sends one to each builder.
    pub heartbeat: Duration,
    /// A builder that sends nothing for this long is lost (its jobs are retried elsewhere).
    pub silent_timeout: Duration,
    /// Largest NAR sent or accepted.
    pub max_nar_bytes: u64,
    pub max_log_bytes: u64,
    /// How long a builder that broke the protocol is refused.
    pub quarantine: Duration,
    /// How long after a builder joins the builds it held may still be adopted; then the runner
    /// tells it to drop the others.
    pub adopt_grace: Duration,
    /// Where uploads are spooled while they are checked.
    pub spool_dir: PathBuf,
    /// Where builders' logs are written.
    pub log_dir: PathBuf,
}

impl RemoteSettings {
    pub fn config_update(&self) -> runner_v1::ConfigUpdate {
        runner_v1::ConfigUpdate {
            heartbeat_interval_s: self.heartbeat.as_secs_f64(),
            max_nar_bytes: self.max_nar_bytes,
            max_log_bytes: self.max_log_bytes,
            silent_timeout_s: self.silent_timeout.as_secs_f64(),
        }
    }
}

/// A session, as the service sees it.
#[derive(Clone)]
pub struct Session {
    pub id: String,
    pub addr: Addr<RemoteMachine>,
}

/// A builder asks to join.
#[derive(Message)]
#[rtype(result = "Result<Session, Status>")]
pub struct Join {
    pub join: runner_v1::Join,
    pub tx: Outbound,
    pub peer: String,
}

/// The session with this id, if it is live.
#[derive(Message)]
#[rtype(result = "Option<Addr<RemoteMachine>>")]
pub struct Lookup(pub String);

/// The machine id of the live session with this id (for its metrics), and the session.
#[derive(Message)]
#[rtype(result = "Option<(String, Addr<RemoteMachine>)>")]
pub struct LookupMachine(pub String);

/// A session ended (its stream closed, or it was closed by the runner).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionEnded {
    pub machine: String,
    pub session: String,
}

/// A builder broke the protocol: refuse it for a while.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Quarantine {
    pub machine: String,
    pub reason: String,
}

/// The connected builders (for status pages and tests).
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct Connected;

pub struct BuilderHub {
    env: Arc<Env>,
    store: Arc<LocalStore>,
    dispatcher: Addr<DispatcherActor>,
    settings: Arc<RemoteSettings>,
    /// Makes session and job ids unique across runner restarts.
    incarnation: String,
    next: u64,
    sessions: HashMap<String, Session>,
    quarantined: HashMap<String, Instant>,
}

impl BuilderHub {
    pub fn new(
        env: Arc<Env>,
        store: Arc<LocalStore>,
        dispatcher: Addr<DispatcherActor>,
        settings: RemoteSettings,
    ) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        BuilderHub {
            env,
            store,
            dispatcher,
            settings: Arc::new(settings),
            incarnation: format!("{:x}{:x}", nanos as u64, std::process::id()),
            next: 0,
            sessions: HashMap::new(),
            quarantined: HashMap::new(),
        }
    }
}

/// The most job slots a builder may declare (sums of slots over machines stay far from `u32`).
pub const MAX_JOBS: u32 = 4096;
/// The most systems (and features of each kind) a builder may name, and their longest name.
pub const MAX_NAMES: usize = 64;
pub const MAX_NAME_BYTES: usize = 255;

/// Checks a join; returns the dispatcher's view of the machine.
pub fn admit(j: &runner_v1::Join, store_dir: &StoreDir) -> Result<MachineInfo, Status> {
    compatible(j.version.as_ref()).map_err(Status::failed_precondition)?;
    if j.store_dir != store_dir.as_str() {
        return Err(Status::failed_precondition(format!(
            "the builder's store dir {:?} is not the runner's {:?}",
            j.store_dir,
            store_dir.as_str()
        )));
    }
    let id_ok = !j.machine_id.is_empty()
        && j.machine_id.len() <= 200
        && j.machine_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c));
    if !id_ok {
        return Err(Status::invalid_argument(format!(
            "machine id {:?}: use 1-200 letters, digits and -_.:@",
            j.machine_id
        )));
    }
    if j.systems.is_empty() {
        return Err(Status::invalid_argument("the builder names no system"));
    }
    for (what, names) in [
        ("systems", &j.systems),
        ("supported features", &j.supported_features),
        ("mandatory features", &j.mandatory_features),
    ] {
        if names.len() > MAX_NAMES || names.iter().any(|n| n.len() > MAX_NAME_BYTES) {
            return Err(Status::invalid_argument(format!(
                "{what}: at most {MAX_NAMES} names of at most {MAX_NAME_BYTES} bytes each"
            )));
        }
    }
    if j.max_jobs > MAX_JOBS {
        return Err(Status::invalid_argument(format!(
            "max_jobs {}: at most {MAX_JOBS}",
            j.max_jobs
        )));
    }
    if !j.speed_factor.is_finite() || j.speed_factor < 0.0 {
        return Err(Status::invalid_argument(format!(
            "speed factor {}: a positive number, or 0 for the default",
            j.speed_factor
        )));
    }
    Ok(MachineInfo {
        id: j.machine_id.clone(),
        systems: j.systems.iter().cloned().collect(),
        supported_features: j.supported_features.iter().cloned().collect(),
        mandatory_features: j.mandatory_features.iter().cloned().collect(),
        max_jobs: j.max_jobs.max(1),
        speed_factor: if j.speed_factor > 0.0 {
            j.speed_factor
        } else {
            1.0
        },
    })
}

impl Actor for BuilderHub {
    type Context = Context<Self>;
}

impl Handler<Join> for BuilderHub {
    type Result = Result<Session, Status>;

    fn handle(&mut self, msg: Join, ctx: &mut Context<Self>) -> Self::Result {
        let j = msg.join;
        let info = match admit(&j, &self.settings.store_dir) {
            Ok(i) => i,
            Err(s) => {
                tracing::warn!(machine = %crate::store::clip(&j.machine_id), peer = %msg.peer,
                    reason = %super::clip::clip_message(s.message()), "refused a builder");
                return Err(s);
            }
        };
        if let Some(until) = self.quarantined.get(&info.id) {
            if *until > Instant::now() {
                tracing::warn!(machine = %info.id, peer = %msg.peer, "refused a quarantined builder");
                return Err(Status::permission_denied(
                    "this builder broke the protocol and is refused for a while",
                ));
            }
            self.quarantined.remove(&info.id);
        }
        if let Some(old) = self.sessions.remove(&info.id) {
            tracing::info!(machine = %info.id, "the builder reconnected: its old session ends");
            old.addr.do_send(Superseded);
            self.dispatcher.do_send(MachineLeft(info.id.clone()));
        }
        self.next += 1;
        let id = format!("{}-{}", self.incarnation, self.next);
        let welcome = RunnerMessage {
            msg: Some(runner_message::Msg::Welcome(runner_v1::Welcome {
                version: Some(PROTOCOL_VERSION),
                session_id: id.clone(),
                config: Some(self.settings.config_update()),
            })),
        };
        if msg.tx.try_send(Ok(welcome)).is_err() {
            return Err(Status::unavailable("the session closed while joining"));
        }
        let held: BTreeSet<String> = j.held.iter().map(|h| h.drv_path.clone()).collect();
        let addr = RemoteMachine::new(
            self.env.clone(),
            self.store.clone(),
            self.dispatcher.clone(),
            ctx.address(),
            self.settings.clone(),
            info.clone(),
            id.clone(),
            msg.tx,
            j.held
                .iter()
                .map(|h| (h.drv_path.clone(), h.job_id.clone()))
                .collect(),
        )
        .start();
        tracing::info!(machine = %info.id, hostname = %crate::store::clip(&j.hostname), peer = %msg.peer,
            systems = ?info.systems, max_jobs = info.max_jobs, held = held.len(), "builder joined");
        self.dispatcher.do_send(MachineHolds {
            machine: info.id.clone(),
            drvs: held,
        });
        self.dispatcher.do_send(MachineJoined {
            info: info.clone(),
            runner: addr.clone().recipient(),
            abort: Some(addr.clone().recipient()),
        });
        let s = Session { id, addr };
        self.sessions.insert(info.id, s.clone());
        Ok(s)
    }
}

impl Handler<Lookup> for BuilderHub {
    type Result = Option<Addr<RemoteMachine>>;
    fn handle(&mut self, msg: Lookup, _: &mut Context<Self>) -> Self::Result {
        self.sessions
            .values()
            .find(|s| s.id == msg.0)
            .map(|s| s.addr.clone())
    }
}

impl Handler<LookupMachine> for BuilderHub {
    type Result = Option<(String, Addr<RemoteMachine>)>;
    fn handle(&mut self, msg: LookupMachine, _: &mut Context<Self>) -> Self::Result {
        self.sessions
            .iter()
            .find(|(_, s)| s.id == msg.0)
            .map(|(m, s)| (m.clone(), s.addr.clone()))
    }
}

impl Handler<SessionEnded> for BuilderHub {
    type Result = ();
    fn handle(&mut self, msg: SessionEnded, _: &mut Context<Self>) {
        if self
            .sessions
            .get(&msg.machine)
            .is_some_and(|s| s.id == msg.session)
        {
            self.sessions.remove(&msg.machine);
            tracing::info!(machine = %msg.machine, "builder left");
            self.dispatcher.do_send(MachineLeft(msg.machine));
        }
    }
}

impl Handler<Quarantine> for BuilderHub {
    type Result = ();
    fn handle(&mut self, msg: Quarantine, _: &mut Context<Self>) {
        tracing::error!(machine = %msg.machine, reason = %msg.reason,
            for_s = self.settings.quarantine.as_secs_f64(), "builder refused and quarantined");
        // Forget the quarantines that have run out (each refused machine id leaves one).
        let now = Instant::now();
        self.quarantined.retain(|_, until| *until > now);
        self.quarantined
            .insert(msg.machine, now + self.settings.quarantine);
    }
}

impl Handler<Connected> for BuilderHub {
    type Result = Vec<String>;
    fn handle(&mut self, _: Connected, _: &mut Context<Self>) -> Vec<String> {
        let mut v: Vec<String> = self.sessions.keys().cloned().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join() -> runner_v1::Join {
        runner_v1::Join {
            version: Some(PROTOCOL_VERSION),
            machine_id: "b1".into(),
            hostname: "h".into(),
            systems: vec!["x86_64-linux".into()],
            supported_features: vec!["kvm".into()],
            mandatory_features: vec![],
            max_jobs: 0,
            speed_factor: 0.0,
            store_dir: "/nix/store".into(),
            held: vec![],
        }
    }

    #[test]
    fn admission() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let info = admit(&join(), &sd).unwrap();
        assert_eq!(info.max_jobs, 1);
        assert_eq!(info.speed_factor, 1.0);
        assert!(info.supported_features.contains("kvm"));
        let mut j = join();
        j.version = Some(runner_v1::ProtocolVersion { major: 2, minor: 0 });
        assert_eq!(
            admit(&j, &sd).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        let mut j = join();
        j.store_dir = "/other".into();
        assert_eq!(
            admit(&j, &sd).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        let mut j = join();
        j.machine_id = "../x y".into();
        assert_eq!(
            admit(&j, &sd).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let mut j = join();
        j.systems.clear();
        assert!(admit(&j, &sd).is_err());
        // Absurd claims are refused, not believed.
        let mut j = join();
        j.max_jobs = u32::MAX;
        assert_eq!(
            admit(&j, &sd).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        j.max_jobs = MAX_JOBS;
        assert_eq!(admit(&j, &sd).unwrap().max_jobs, MAX_JOBS);
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let mut j = join();
            j.speed_factor = bad;
            assert!(admit(&j, &sd).is_err(), "{bad}");
        }
        let mut j = join();
        j.systems.push("x".repeat(MAX_NAME_BYTES + 1));
        assert!(admit(&j, &sd).is_err());
        let mut j = join();
        j.supported_features = (0..=MAX_NAMES).map(|i| i.to_string()).collect();
        assert!(admit(&j, &sd).is_err());
    }
}
