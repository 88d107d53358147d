//! The build agent (`qr builder`): dials the runner, joins, builds what it is sent and sends the
//! results back; reconnects with backoff when the runner goes away.
//!
//! - A job's inputs (the closure the runner lists, references first) that are missing from the
//!   builder's own store are fetched from the runner and imported with their hash checked.
//! - The executor (native or nix) builds into the builder's store; the outputs are uploaded
//!   (references first) and then the result is sent.
//! - Builds outlive sessions: a build keeps running when the runner goes away, and its result is
//!   kept until it is delivered. On rejoining, the builder lists the builds it holds; the runner
//!   sends a job for a held drv again (adoption) and the builder attaches to the running (or
//!   finished) build instead of starting another, so nothing is built twice.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::actors::machine::{Executor, Job};
use crate::actors::types::Status as BuildStatus;
use crate::grpc::auth::ClientAuth;
use crate::grpc::nar::{Chunk, export};
use crate::grpc::runner_v1::runner_service_client::RunnerServiceClient;
use crate::grpc::runner_v1::{
    self, BuilderMessage, builder_message, job_result, runner_message, upload_nar_request,
};
use crate::grpc::{PROTOCOL_VERSION, info_from_proto, info_to_proto, references_first};
use crate::store::{LocalStore, PathInfo, Store};

type Client = RunnerServiceClient<InterceptedService<Channel, ClientAuth>>;

/// Test hooks that make a builder lie (`QR_BUILDER_FAULT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Uploads outputs whose bytes differ from the hash it reports.
    CorruptNar,
    /// Reports its results under a job id it was not given.
    UnknownJob,
}

impl Fault {
    /// The fault `QR_BUILDER_FAULT` names (feature `test-hooks` only; otherwise never one).
    #[cfg(feature = "test-hooks")]
    pub fn from_env() -> Option<Fault> {
        match std::env::var("QR_BUILDER_FAULT").ok()?.as_str() {
            "corrupt-nar" => Some(Fault::CorruptNar),
            "unknown-job" => Some(Fault::UnknownJob),
            _ => None,
        }
    }

    /// Without the `test-hooks` feature a builder never lies.
    #[cfg(not(feature = "test-hooks"))]
    pub fn from_env() -> Option<Fault> {
        None
    }
}

/// How the agent runs.
pub struct AgentConfig {
    pub runner: String,
    pub token: String,
    pub tls: Option<ClientTlsConfig>,
    pub machine_id: String,
    pub hostname: String,
    pub systems: Vec<String>,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub max_jobs: u32,
    pub speed_factor: f64,
    pub store: Arc<LocalStore>,
    pub executor: Arc<dyn Executor>,
    /// Where the executor writes build logs (`<drv base name>.*.log`), streamed to the runner.
    pub log_dir: Option<PathBuf>,
    /// Each build the executor really ran is appended here (drv path per line).
    pub runs_ledger: Option<PathBuf>,
    pub fault: Option<Fault>,
    /// HTTP/2 PINGs on the connection to the runner (`[grpc] keepalive_*`).
    pub keepalive: Keepalive,
}

/// HTTP/2 keepalive of a connection: a PING every `interval` (none when `None`), and the
/// connection closed when one is unanswered for `timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Option<Duration>,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval: Some(Duration::from_secs(10)),
            timeout: Duration::from_secs(10),
        }
    }
}

/// How a build ended, kept until delivered.
#[derive(Debug, Clone)]
enum Outcome {
    Built {
        outputs: BTreeMap<String, PathInfo>,
        ran: bool,
    },
    Failed {
        status: i32,
        message: String,
        transient: bool,
    },
}

#[derive(Debug)]
enum HeldState {
    Running,
    Done(Outcome),
    /// Being uploaded; back to `Done` if that fails.
    Delivering,
}

#[derive(Debug)]
struct Held {
    job_id: String,
    /// The session that gave `job_id`.
    session_gen: u64,
    state: HeldState,
    task: Option<tokio::task::AbortHandle>,
}

/// The live session, for tasks that talk to the runner.
#[derive(Clone)]
struct Live {
    generation: u64,
    session_id: String,
    client: Client,
    out: mpsc::Sender<BuilderMessage>,
    max_nar_bytes: u64,
    max_log_bytes: u64,
    /// Closed when the session ends (its sender is dropped with the session), so a transfer on
    /// its connection stops instead of waiting on a connection that went silent.
    ended: tokio::sync::watch::Receiver<()>,
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, Held>,
    /// Successful builds delivered lately: a job for one of them is answered from here.
    delivered: HashMap<String, (Instant, Outcome)>,
    live: Option<Live>,
    generation: u64,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a session ended.
enum End {
    /// Retrying will not help (bad token, incompatible version, bad configuration).
    Fatal(anyhow::Error),
    Retry(String),
    /// Refused for a while (quarantine): wait longer.
    Refused(String),
}

const DELIVERED_TTL: Duration = Duration::from_secs(600);

/// Runs the agent until a fatal error.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let state: Shared = Arc::new(Mutex::new(State::default()));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        match session(&cfg, &state, &done_tx, &mut done_rx).await {
            Err(End::Fatal(e)) => return Err(e),
            Err(End::Retry(why)) => {
                tracing::warn!(runner = %cfg.runner, reason = %why, retry_in_ms = backoff.as_millis() as u64, "not connected to the runner")
            }
            Err(End::Refused(why)) => {
                tracing::warn!(runner = %cfg.runner, reason = %why, "the runner refuses this builder for now");
                backoff = backoff.max(Duration::from_secs(5));
            }
            Ok(()) => tracing::warn!(runner = %cfg.runner, "the runner ended the session"),
        }
        lock(&state).live = None;
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        // Jitter of up to a quarter, so builders do not all reconnect at once.
        let jitter = (std::process::id() as u64 + started.elapsed().subsec_nanos() as u64)
            % (backoff.as_millis() as u64 / 4 + 1);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn connect(cfg: &AgentConfig) -> Result<Client, End> {
    dial(&cfg.runner, &cfg.token, cfg.tls.as_ref(), cfg.keepalive).await
}

async fn dial(
    runner: &str,
    token: &str,
    tls: Option<&ClientTlsConfig>,
    keepalive: Keepalive,
) -> Result<Client, End> {
    let mut ep = Endpoint::from_shared(runner.to_string())
        .map_err(|e| End::Fatal(anyhow::anyhow!("--runner {runner}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if let Some(every) = keepalive.interval {
        ep = ep
            .http2_keep_alive_interval(every)
            .keep_alive_timeout(keepalive.timeout)
            .keep_alive_while_idle(true);
    }
    if let Some(tls) = tls {
        ep = ep
            .tls_config(tls.clone())
            .map_err(|e| End::Fatal(anyhow::anyhow!("TLS: {e}")))?;
    }
    let channel = ep
        .connect()
        .await
        .map_err(|e| End::Retry(format!("connecting: {e}")))?;
    let auth = ClientAuth::new(token).map_err(End::Fatal)?;
    Ok(RunnerServiceClient::with_interceptor(channel, auth)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// How long the runner may stay silent: its `silent_timeout_s`, else three heartbeats; never
/// less than one heartbeat.
fn silent_timeout(conf: &runner_v1::ConfigUpdate, heartbeat: Duration) -> Duration {
    let s = if conf.silent_timeout_s > 0.0 {
        Duration::from_secs_f64(conf.silent_timeout_s)
    } else {
        heartbeat * 3
    };
    s.max(heartbeat)
}

/// The runner's logical store dir, asked before the builder opens its store (for a builder whose
/// configuration does not pin `[store] dir`). Waits, with backoff, for a runner that is not up
/// yet; a bad token or an incompatible protocol version is an error at once.
pub async fn runner_store_dir(
    runner: &str,
    token: &str,
    tls: Option<&ClientTlsConfig>,
    keepalive: Keepalive,
) -> anyhow::Result<String> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let asked = async {
            let mut client = dial(runner, token, tls, keepalive).await?;
            let d = client
                .describe(runner_v1::DescribeRequest {})
                .await
                .map_err(classify)?
                .into_inner();
            crate::grpc::compatible(d.version.as_ref())
                .map_err(|e| End::Fatal(anyhow::anyhow!("the runner at {runner}: {e}")))?;
            Ok::<_, End>(d.store_dir)
        };
        match asked.await {
            Ok(dir) => return Ok(dir),
            Err(End::Fatal(e)) => return Err(e),
            Err(End::Retry(why) | End::Refused(why)) => {
                tracing::warn!(runner = %runner, reason = %why, retry_in_ms = backoff.as_millis() as u64, "cannot ask the runner for its store dir yet");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn classify(s: Status) -> End {
    match s.code() {
        Code::Unauthenticated | Code::FailedPrecondition | Code::InvalidArgument => End::Fatal(
            anyhow::anyhow!("the runner refused this builder: {}", s.message()),
        ),
        Code::PermissionDenied => End::Refused(s.message().to_string()),
        _ => End::Retry(format!("{}: {}", s.code(), s.message())),
    }
}

async fn session(
    cfg: &Arc<AgentConfig>,
    state: &Shared,
    done_tx: &mpsc::UnboundedSender<String>,
    done_rx: &mut mpsc::UnboundedReceiver<String>,
) -> Result<(), End> {
    let mut client = connect(cfg).await?;
    let (out_tx, out_rx) = mpsc::channel::<BuilderMessage>(256);
    let held: Vec<runner_v1::HeldJob> = {
        let st = lock(state);
        st.jobs
            .iter()
            .map(|(drv, h)| runner_v1::HeldJob {
                drv_path: drv.clone(),
                job_id: h.job_id.clone(),
                finished: !matches!(h.state, HeldState::Running),
            })
            .collect()
    };
    let join = runner_v1::Join {
        version: Some(PROTOCOL_VERSION),
        machine_id: cfg.machine_id.clone(),
        hostname: cfg.hostname.clone(),
        systems: cfg.systems.clone(),
        supported_features: cfg.supported_features.clone(),
        mandatory_features: cfg.mandatory_features.clone(),
        max_jobs: cfg.max_jobs,
        speed_factor: cfg.speed_factor,
        store_dir: cfg.store.store_dir().as_str().to_string(),
        held: held.clone(),
    };
    let _ = out_tx
        .send(BuilderMessage {
            msg: Some(builder_message::Msg::Join(join)),
        })
        .await;
    let mut inbound = client
        .session(ReceiverStream::new(out_rx))
        .await
        .map_err(classify)?
        .into_inner();
    let welcome = match inbound.message().await.map_err(classify)? {
        Some(runner_v1::RunnerMessage {
            msg: Some(runner_message::Msg::Welcome(w)),
        }) => w,
        _ => return Err(End::Retry("no welcome from the runner".into())),
    };
    let conf = welcome.config.unwrap_or_default();
    let mut heartbeat = Duration::from_secs_f64(if conf.heartbeat_interval_s > 0.0 {
        conf.heartbeat_interval_s
    } else {
        10.0
    });
    // Dropped when this function returns: transfers of this session then stop.
    let session_alive = tokio::sync::watch::Sender::new(());
    let generation = {
        let mut st = lock(state);
        st.generation += 1;
        st.live = Some(Live {
            generation: st.generation,
            session_id: welcome.session_id.clone(),
            client: client.clone(),
            out: out_tx.clone(),
            ended: session_alive.subscribe(),
            max_nar_bytes: if conf.max_nar_bytes > 0 {
                conf.max_nar_bytes
            } else {
                u64::MAX
            },
            max_log_bytes: if conf.max_log_bytes > 0 {
                conf.max_log_bytes
            } else {
                u64::MAX
            },
        });
        st.generation
    };
    tracing::info!(runner = %cfg.runner, machine = %cfg.machine_id, session = %welcome.session_id, held = held.len(), "joined the runner");
    // A runner that speaks 1.1 or later sends heartbeats; one heard from for none of
    // `silent_timeout_s` is lost (a connection that went silent), so the session ends and the
    // builder reconnects. Older runners send nothing while idle: only HTTP/2 PINGs watch them.
    let runner_beats = welcome.version.as_ref().is_some_and(|v| v.minor >= 1);
    let mut silent = silent_timeout(&conf, heartbeat);
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    let mut watch = tokio::time::interval(heartbeat / 4);
    watch.tick().await;
    loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => { last_heard = Instant::now(); match m.msg {
                    Some(runner_message::Msg::Heartbeat(_)) => {}
                    Some(runner_message::Msg::Build(job)) => on_build(cfg, state, done_tx, generation, job),
                    Some(runner_message::Msg::Abort(a)) => on_abort(state, a),
                    Some(runner_message::Msg::Config(c)) => {
                        if c.heartbeat_interval_s > 0.0 {
                            heartbeat = Duration::from_secs_f64(c.heartbeat_interval_s);
                            tick = tokio::time::interval(heartbeat);
                            watch = tokio::time::interval(heartbeat / 4);
                        }
                        if c.silent_timeout_s > 0.0 {
                            silent = silent_timeout(&c, heartbeat);
                        }
                        let mut st = lock(state);
                        if let Some(l) = &mut st.live {
                            if c.max_nar_bytes > 0 { l.max_nar_bytes = c.max_nar_bytes; }
                            if c.max_log_bytes > 0 { l.max_log_bytes = c.max_log_bytes; }
                        }
                    }
                    Some(runner_message::Msg::Welcome(_)) | None => {}
                }},
                Ok(None) => return Ok(()),
                Err(s) => return Err(match classify(s) { End::Fatal(e) => End::Retry(e.to_string()), e => e }),
            },
            _ = tick.tick() => {
                let running = lock(state).jobs.values().filter(|h| matches!(h.state, HeldState::Running)).count();
                let hb = runner_v1::Heartbeat {
                    load: load_average(),
                    free_disk_bytes: free_disk(cfg.store.root()),
                    running_jobs: running as u32,
                };
                if out_tx.send(BuilderMessage { msg: Some(builder_message::Msg::Heartbeat(hb)) }).await.is_err() {
                    return Err(End::Retry("the session stream closed".into()));
                }
            }
            _ = watch.tick(), if runner_beats => {
                if last_heard.elapsed() > silent {
                    return Err(End::Retry(format!(
                        "nothing heard from the runner for {:.1} s: the connection went silent",
                        silent.as_secs_f64()
                    )));
                }
            }
            Some(drv) = done_rx.recv() => deliver(cfg, state, done_tx, drv),
        }
        // keep `client` alive for the session (tasks hold clones)
        let _ = &mut client;
    }
}

fn on_build(
    cfg: &Arc<AgentConfig>,
    state: &Shared,
    done_tx: &mpsc::UnboundedSender<String>,
    generation: u64,
    job: runner_v1::BuildJob,
) {
    let drv_path = job.drv_path.clone();
    let mut st = lock(state);
    st.delivered.retain(|_, (t, _)| t.elapsed() < DELIVERED_TTL);
    if let Some(h) = st.jobs.get_mut(&drv_path) {
        tracing::info!(drv = %drv_path, job = %job.job_id, "the runner adopts a build this builder holds");
        h.job_id = job.job_id;
        h.session_gen = generation;
        if matches!(h.state, HeldState::Done(_)) {
            let _ = done_tx.send(drv_path);
        }
        return;
    }
    if let Some((_, outcome)) = st.delivered.get(&drv_path) {
        tracing::info!(drv = %drv_path, "built lately: sending the result again");
        let outcome = outcome.clone();
        st.jobs.insert(
            drv_path.clone(),
            Held {
                job_id: job.job_id,
                session_gen: generation,
                state: HeldState::Done(outcome),
                task: None,
            },
        );
        let _ = done_tx.send(drv_path);
        return;
    }
    tracing::info!(drv = %drv_path, job = %job.job_id, "build started");
    let (cfg2, state2, done2) = (cfg.clone(), state.clone(), done_tx.clone());
    let d2 = drv_path.clone();
    let job_id = job.job_id.clone();
    let task = tokio::spawn(async move {
        let outcome = build(&cfg2, &state2, job).await;
        if let Outcome::Failed { message, .. } = &outcome {
            tracing::info!(drv = %d2, message = %message, "build failed");
        } else {
            tracing::info!(drv = %d2, "build done");
        }
        if let Some(h) = lock(&state2).jobs.get_mut(&d2) {
            h.state = HeldState::Done(outcome);
            h.task = None;
        }
        let _ = done2.send(d2);
    });
    st.jobs.insert(
        drv_path,
        Held {
            job_id,
            session_gen: generation,
            state: HeldState::Running,
            task: Some(task.abort_handle()),
        },
    );
}

fn on_abort(state: &Shared, a: runner_v1::AbortJob) {
    let mut st = lock(state);
    let matches = st
        .jobs
        .get(&a.drv_path)
        .is_some_and(|h| h.job_id == a.job_id);
    if matches {
        if let Some(h) = st.jobs.remove(&a.drv_path) {
            tracing::info!(drv = %a.drv_path, reason = %a.reason, "build aborted by the runner");
            if let Some(t) = h.task {
                t.abort();
            }
        }
    }
}

fn transient(message: String) -> Outcome {
    Outcome::Failed {
        status: BuildStatus::Aborted.code(),
        message,
        transient: true,
    }
}

/// Fetches the inputs, runs the executor, describes the outputs.
async fn build(cfg: &Arc<AgentConfig>, state: &Shared, job: runner_v1::BuildJob) -> Outcome {
    let store = &cfg.store;
    let sd = store.store_dir().clone();
    let drv = match sd
        .parse(&job.drv_path)
        .map_err(|e| e.to_string())
        .and_then(|sp| {
            crate::store::aterm::parse_named(job.drv.as_bytes(), sp.drv_name())
                .map_err(|e| e.to_string())
        }) {
        Ok(d) => d,
        Err(e) => {
            return Outcome::Failed {
                status: BuildStatus::Failed.code(),
                message: format!("{}: {e}", job.drv_path),
                transient: false,
            };
        }
    };
    // Inputs, references first.
    let mut inputs = Vec::new();
    for i in &job.inputs {
        match info_from_proto(i) {
            Ok(i) => inputs.push(i),
            Err(e) => return transient(format!("bad input info: {e}")),
        }
    }
    for info in references_first(inputs) {
        match store.is_valid_path(&info.path).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => return transient(format!("{}: {e}", info.path)),
        }
        if let Err(e) = fetch(state, store.clone(), info).await {
            return transient(e);
        }
    }
    // Tests that kill the runner mid-build wait for this line: before it, the job still needs
    // the runner (its inputs come from it).
    tracing::info!(drv = %job.drv_path, job = %job.job_id, "inputs in place; the build runs");
    let tailer = cfg.log_dir.clone().map(|dir| {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let t = tokio::spawn(tail_log(
            state.clone(),
            dir,
            job.job_id.clone(),
            job.drv_path.clone(),
            stop_rx,
        ));
        (stop_tx, t)
    });
    let secs = |s: u64| {
        if s == 0 {
            Duration::from_secs(u64::MAX / 4)
        } else {
            Duration::from_secs(s)
        }
    };
    let res = cfg
        .executor
        .execute(Job {
            drv_path: job.drv_path.clone(),
            drv: Arc::new(drv),
            max_silent: secs(job.max_silent_s),
            timeout: secs(job.timeout_s),
            // The runner names the log it receives for the step attempt.
            attempt: None,
        })
        .await;
    if let Some((stop, t)) = tailer {
        let _ = stop.send(true);
        let _ = t.await;
    }
    match res {
        Err(f) => Outcome::Failed {
            status: f.status.code(),
            message: f.message,
            transient: f.transient,
        },
        Ok(built) => {
            if built.ran {
                record_run(cfg, &job.drv_path);
            }
            let mut outputs = BTreeMap::new();
            for (name, path) in built.outputs {
                match store.query_path_info(&path).await {
                    Ok(Some(i)) => {
                        outputs.insert(name, i);
                    }
                    Ok(None) => return transient(format!("output {path} is not valid here")),
                    Err(e) => return transient(format!("{path}: {e}")),
                }
            }
            Outcome::Built {
                outputs,
                ran: built.ran,
            }
        }
    }
}

fn record_run(cfg: &AgentConfig, drv_path: &str) {
    if let Some(p) = &cfg.runs_ledger {
        use std::io::Write;
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .and_then(|mut f| f.write_all(format!("{drv_path}\n").as_bytes()));
        if let Err(e) = r {
            tracing::warn!(path = %p.display(), error = %e, "cannot append to the runs ledger");
        }
    }
}

/// Fetches one path from the runner into the builder's store (hash checked on import).
async fn fetch(state: &Shared, store: Arc<LocalStore>, info: PathInfo) -> Result<(), String> {
    let live = lock(state)
        .live
        .clone()
        .ok_or("not connected to the runner")?;
    if info.nar_size > live.max_nar_bytes {
        return Err(format!(
            "{}: input of {} bytes exceeds the limit",
            info.path, info.nar_size
        ));
    }
    let mut client = live.client.clone();
    let mut ended = live.ended.clone();
    let gone = || format!("fetching {}: the session ended", info.path);
    let mut s = tokio::select! {
        r = client.fetch_nar(runner_v1::FetchNarRequest {
            session_id: live.session_id.clone(),
            path: info.path.clone(),
        }) => r.map_err(|e| format!("fetching {}: {}", info.path, e.message()))?.into_inner(),
        _ = ended.changed() => return Err(gone()),
    };
    tracing::debug!(path = %info.path, "fetching an input");
    let path = info.path.clone();
    let (tx, task) = crate::grpc::nar::import(store, info, live.max_nar_bytes);
    loop {
        let next = tokio::select! {
            m = s.message() => m,
            _ = ended.changed() => {
                let _ = tx.send(Err("the session ended".into())).await;
                break;
            }
        };
        match next {
            Ok(Some(c)) => {
                if tx.send(Ok(c.data)).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(e.message().to_string())).await;
                break;
            }
        }
    }
    drop(tx);
    task.await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("importing {path}: {e}"))
}

/// Uploads (if its session still lives) and reports a finished build.
fn deliver(
    cfg: &Arc<AgentConfig>,
    state: &Shared,
    done_tx: &mpsc::UnboundedSender<String>,
    drv: String,
) {
    let (live, job_id, outcome) = {
        let mut st = lock(state);
        let Some(live) = st.live.clone() else { return };
        let Some(h) = st.jobs.get_mut(&drv) else {
            return;
        };
        if h.session_gen != live.generation {
            return; // given by an earlier session: wait for the runner to ask again
        }
        let outcome = match std::mem::replace(&mut h.state, HeldState::Running) {
            HeldState::Done(o) => o,
            other => {
                h.state = other;
                return;
            }
        };
        h.state = HeldState::Delivering;
        (live, h.job_id.clone(), outcome)
    };
    let (cfg, state, done_tx) = (cfg.clone(), state.clone(), done_tx.clone());
    tokio::spawn(async move {
        let res = send_result(&cfg, &live, &drv, &job_id, &outcome).await;
        let mut st = lock(&state);
        match res {
            Ok(()) => {
                st.jobs.remove(&drv);
                if matches!(outcome, Outcome::Built { .. }) {
                    st.delivered.insert(drv, (Instant::now(), outcome));
                }
            }
            Err(e) => {
                tracing::warn!(drv = %drv, error = %e, "cannot deliver a result: kept for the next session");
                if let Some(h) = st.jobs.get_mut(&drv) {
                    h.state = HeldState::Done(outcome);
                    // A newer session asked for it meanwhile: deliver there.
                    if h.session_gen != live.generation {
                        let _ = done_tx.send(drv);
                    }
                }
            }
        }
    });
}

async fn send_result(
    cfg: &AgentConfig,
    live: &Live,
    drv: &str,
    job_id: &str,
    outcome: &Outcome,
) -> Result<(), String> {
    let job_id = match cfg.fault {
        Some(Fault::UnknownJob) => format!("{job_id}-forged"),
        _ => job_id.to_string(),
    };
    let outcome_msg = match outcome {
        Outcome::Failed {
            status,
            message,
            transient,
        } => job_result::Outcome::Failure(runner_v1::JobFailure {
            status: *status,
            message: message.clone(),
            transient: *transient,
        }),
        Outcome::Built { outputs, ran } => {
            let by_path: BTreeMap<String, String> = outputs
                .iter()
                .map(|(n, i)| (i.path.clone(), n.clone()))
                .collect();
            for info in references_first(outputs.values().cloned().collect()) {
                let name = by_path.get(&info.path).cloned().unwrap_or_default();
                upload(cfg, live, &job_id, &name, &info).await?;
            }
            job_result::Outcome::Success(runner_v1::JobSuccess {
                outputs: outputs
                    .iter()
                    .map(|(n, i)| runner_v1::BuiltOutput {
                        name: n.clone(),
                        info: Some(info_to_proto(i)),
                    })
                    .collect(),
                ran: *ran,
            })
        }
    };
    live.out
        .send(BuilderMessage {
            msg: Some(builder_message::Msg::Result(runner_v1::JobResult {
                job_id,
                drv_path: drv.to_string(),
                outcome: Some(outcome_msg),
            })),
        })
        .await
        .map_err(|_| "the session closed".to_string())
}

async fn upload(
    cfg: &AgentConfig,
    live: &Live,
    job_id: &str,
    output: &str,
    info: &PathInfo,
) -> Result<(), String> {
    let store: Arc<dyn Store> = cfg.store.clone();
    let mut rx = export(store, info.path.clone());
    let header = runner_v1::UploadNarRequest {
        msg: Some(upload_nar_request::Msg::Header(runner_v1::UploadHeader {
            session_id: live.session_id.clone(),
            job_id: job_id.to_string(),
            output_name: output.to_string(),
            info: Some(info_to_proto(info)),
        })),
    };
    let corrupt = cfg.fault == Some(Fault::CorruptNar);
    let (tx, req_rx) = mpsc::channel(4);
    let _ = tx.send(header).await;
    let pump = tokio::spawn(async move {
        let mut first = true;
        while let Some(c) = rx.recv().await {
            let c: Chunk = c;
            match c {
                Ok(mut data) => {
                    if corrupt && first && data.len() > 16 {
                        let i = data.len() - 16;
                        data[i] ^= 0x20;
                    }
                    first = false;
                    let m = runner_v1::UploadNarRequest {
                        msg: Some(upload_nar_request::Msg::Data(data)),
                    };
                    if tx.send(m).await.is_err() {
                        return Err("the upload closed".to_string());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    let mut client = live.client.clone();
    let r = client.upload_nar(ReceiverStream::new(req_rx)).await;
    let pumped = pump.await.map_err(|e| e.to_string())?;
    r.map_err(|e| format!("uploading {}: {}", info.path, e.message()))?;
    pumped.map_err(|e| format!("exporting {}: {e}", info.path))?;
    tracing::debug!(path = %info.path, "output uploaded");
    Ok(())
}

/// Streams the log the executor writes for this build (`<dir>/<drv base name>.*.log`) to the
/// runner while it grows.
async fn tail_log(
    state: Shared,
    dir: PathBuf,
    job_id: String,
    drv_path: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Some(base) = drv_path.rsplit('/').next().map(str::to_string) else {
        return;
    };
    let prefix = format!("{base}.");
    let start = std::time::SystemTime::now() - Duration::from_secs(1);
    let mut file: Option<(PathBuf, u64)> = None;
    // The stream of the session it was opened on: a newer session (the builder rejoined, the
    // job was adopted under a new id) gets a stream of its own, and a stream that stops taking
    // chunks (its connection went silent) is given up rather than waited on forever.
    let mut sender: Option<LogStream> = None;
    let mut sent = 0u64;
    loop {
        let stopping = *stop.borrow();
        if file.is_none() {
            file = std::fs::read_dir(&dir).ok().and_then(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with(&prefix) && n.ends_with(".log")
                    })
                    .filter_map(|e| {
                        let m = e.metadata().ok()?.modified().ok()?;
                        (m >= start).then_some((m, e.path()))
                    })
                    .max()
                    .map(|(_, p)| (p, 0))
            });
        }
        if let Some((p, off)) = &mut file {
            let data = std::fs::read(&*p).unwrap_or_default();
            if (data.len() as u64) > *off {
                let new = data[*off as usize..].to_vec();
                *off = data.len() as u64;
                let (live, current_job) = {
                    let st = lock(&state);
                    let job = st.jobs.get(&drv_path).map(|h| h.job_id.clone());
                    (st.live.clone(), job)
                };
                if let Some(live) = live {
                    if sent + new.len() as u64 <= live.max_log_bytes {
                        sent += new.len() as u64;
                        if sender
                            .as_ref()
                            .is_some_and(|s| s.generation != live.generation)
                        {
                            if let Some(old) = sender.take() {
                                old.task.abort();
                            }
                        }
                        let s = sender.get_or_insert_with(|| {
                            LogStream::open(&live, current_job.unwrap_or_else(|| job_id.clone()))
                        });
                        let chunk = runner_v1::LogChunk {
                            session_id: live.session_id.clone(),
                            job_id: s.job_id.clone(),
                            drv_path: drv_path.clone(),
                            data: new,
                        };
                        match tokio::time::timeout(LOG_SEND_PATIENCE, s.tx.send(chunk)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) | Err(_) => {
                                tracing::warn!(drv = %drv_path, "the log stream to the runner stopped taking data: a part of the log is missing there (it is kept here)");
                                if let Some(old) = sender.take() {
                                    old.task.abort();
                                }
                            }
                        }
                    }
                }
            }
        }
        if stopping {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => {}
        }
    }
    if let Some(LogStream { tx, mut task, .. }) = sender {
        drop(tx);
        if tokio::time::timeout(LOG_SEND_PATIENCE, &mut task)
            .await
            .is_err()
        {
            tracing::warn!(drv = %drv_path, "the runner did not acknowledge the log: given up");
            task.abort();
        }
    }
}

/// How long a log chunk (or the stream's end) may wait on the runner.
const LOG_SEND_PATIENCE: Duration = Duration::from_secs(10);

/// A `StreamLog` call on one session.
struct LogStream {
    generation: u64,
    job_id: String,
    tx: mpsc::Sender<runner_v1::LogChunk>,
    task: tokio::task::JoinHandle<()>,
}

impl LogStream {
    fn open(live: &Live, job_id: String) -> LogStream {
        let (tx, rx) = mpsc::channel(16);
        let mut client = live.client.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = client.stream_log(ReceiverStream::new(rx)).await {
                tracing::debug!(error = %e.message(), "log stream ended");
            }
        });
        LogStream {
            generation: live.generation,
            job_id,
            tx,
            task,
        }
    }
}

/// The 1-minute load average.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Free bytes on the filesystem holding `path`.
fn free_disk(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs writes into the zeroed struct we pass; `c` is a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) == 0 {
            s.f_bavail as u64 * s.f_frsize as u64
        } else {
            0
        }
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into `buf`.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let n = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}
