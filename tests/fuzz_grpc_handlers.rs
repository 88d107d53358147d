//! Fuzzing the gRPC handlers of a real `qr serve` (SQLite, no local builder) over loopback: the
//! builder-facing runner service and the operators' admin service.
//!
//! Before the fuzzing, the Nix oracle's `mixed` graph (input-addressed, fixed-output and floating
//! content-addressed drvs) is queued; no builder is connected. Then:
//! 1. every method without a token, with a wrong one and with a malformed one: UNAUTHENTICATED;
//! 2. every method with a valid token and a payload that is random bytes, a random valid message
//!    (unknown build ids, bad and absent drv paths, wrong job ids, huge and odd strings, NaN
//!    floats, claims to hold builds) or such a message mutated at the byte level;
//! 3. lying builders that join for the graph's system, take real jobs and then lie: uploads for
//!    jobs, outputs and paths they were not given, NARs that are truncated, too long, lie about
//!    their size or hash, results for outputs they never uploaded, a flood of messages before a
//!    forged result, a second join, and failures the runner must retry;
//! 4. an honest `qr builder` joins and the graph must build to Nix's output paths, with the
//!    runner's copies true to Nix's NAR hashes and nothing a liar sent in its store.
//!
//! Every bad call must end with a status that names the caller's mistake (INVALID_ARGUMENT,
//! NOT_FOUND, FAILED_PRECONDITION, PERMISSION_DENIED, UNAUTHENTICATED, RESOURCE_EXHAUSTED,
//! OUT_OF_RANGE), never UNKNOWN, INTERNAL, UNAVAILABLE or a broken connection, and within a
//! timeout (a hang is a failure). The runner must stay up (a valid call answers after every batch),
//! never log a panic, and its peak memory must stay bounded.
//!
//! Case counts: CI defaults, scaled by `QR_FUZZ_CASES`; `QR_FUZZ_SEED` replays (see
//! `docs/fuzzing.md`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use common::cluster::{Cluster, TOKEN};
use common::fuzz::{Rng, cases, seed};
use common::qr::Backend;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use qr::grpc::admin::admin_v1 as adm;
use qr::grpc::admin::admin_v1::admin_service_client::AdminServiceClient;
use qr::grpc::auth::ClientAuth;
use qr::grpc::runner_v1 as rv;
use qr::grpc::runner_v1::runner_service_client::RunnerServiceClient;
use qr::store::StoreDir;
use qr::store::hash::{render_nix32, sha256};
use qr::store::nar::NarTree;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const X86: &str = "x86_64-linux";
/// How long any single call may take before it counts as a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// The runner's limits in this test (small, so that they are reached).
const MAX_NAR: u64 = 1 << 20;
const MAX_LOG: u64 = 64 << 10;

// --- a codec for raw bytes: the fuzzer decides every byte of every message ---------------------

#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

// --- the methods -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Unary,
    ServerStream,
    ClientStream,
    Bidi,
}

const RUNNER: &str = "/qr.runner.v1.RunnerService/";
const ADMIN: &str = "/qr.admin.v1.AdminService/";

/// Every method of both services: (path, kind).
const METHODS: &[(&str, &str, Kind)] = &[
    (RUNNER, "Session", Kind::Bidi),
    (RUNNER, "FetchNar", Kind::ServerStream),
    (RUNNER, "UploadNar", Kind::ClientStream),
    (RUNNER, "StreamLog", Kind::ClientStream),
    (ADMIN, "Status", Kind::Unary),
    (ADMIN, "ListBuilds", Kind::Unary),
    (ADMIN, "GetBuild", Kind::Unary),
    (ADMIN, "ListSteps", Kind::Unary),
    (ADMIN, "GetStep", Kind::Unary),
    (ADMIN, "ListActors", Kind::Unary),
    (ADMIN, "ListMachines", Kind::Unary),
    (ADMIN, "CancelBuild", Kind::Unary),
    (ADMIN, "RestartBuild", Kind::Unary),
    (ADMIN, "BumpBuild", Kind::Unary),
    (ADMIN, "SetMachine", Kind::Unary),
    (ADMIN, "WatchEvents", Kind::ServerStream),
    (ADMIN, "GetLog", Kind::Unary),
    (ADMIN, "ListEvals", Kind::Unary),
    (ADMIN, "GetEval", Kind::Unary),
];

/// Codes that name the caller's mistake (or success).
fn acceptable(code: Code) -> bool {
    matches!(
        code,
        Code::Ok
            | Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::ResourceExhausted
            | Code::OutOfRange
            | Code::AlreadyExists
    )
}

type Runner = RunnerServiceClient<InterceptedService<Channel, ClientAuth>>;
type Admin = AdminServiceClient<InterceptedService<Channel, ClientAuth>>;

/// What the fuzzer knows about the runner: real ids and paths to aim at.
#[derive(Default)]
struct Known {
    build_ids: Vec<i64>,
    drv_paths: Vec<String>,
    /// Sessions that may still be live.
    sessions: Vec<String>,
    job_ids: Vec<String>,
}

struct Fuzzer {
    channel: Channel,
    rng: Rng,
    known: Known,
    /// (method, code) → count.
    stats: BTreeMap<(String, String), u64>,
    failures: Vec<String>,
    machines: u64,
    /// Inputs fetched by liars and found true to their path info.
    fetched: u64,
}

fn bearer(token: &str) -> MetadataValue<tonic::metadata::Ascii> {
    format!("Bearer {token}").parse().expect("ascii token")
}

impl Fuzzer {
    async fn new(url: &str, seed: u64) -> Fuzzer {
        let channel = Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .expect("connect");
        Fuzzer {
            channel,
            rng: Rng::new(seed),
            known: Known::default(),
            stats: BTreeMap::new(),
            failures: Vec::new(),
            machines: 0,
            fetched: 0,
        }
    }

    fn runner(&self) -> Runner {
        RunnerServiceClient::with_interceptor(self.channel.clone(), ClientAuth::new(TOKEN).unwrap())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn admin(&self) -> Admin {
        AdminServiceClient::with_interceptor(self.channel.clone(), ClientAuth::new(TOKEN).unwrap())
    }

    fn note(&mut self, method: &str, code: Code, what: &str, status: Option<&Status>) {
        *self
            .stats
            .entry((method.to_string(), format!("{code:?}")))
            .or_default() += 1;
        let unimplemented_ok = method == "NoSuchMethod" && code == Code::Unimplemented;
        if !acceptable(code) && !unimplemented_ok {
            let msg = status.map(|s| s.message().to_string()).unwrap_or_default();
            let msg: String = msg.chars().take(300).collect();
            self.failures
                .push(format!("{method}: {code:?} ({msg}) for {what}"));
        }
    }

    /// Sends `msgs` (raw bytes) to `method` with `auth` metadata (None: no header); returns the
    /// final code. Server streams are read to their end (or a short while, for endless ones).
    async fn raw_call(
        &mut self,
        prefix: &str,
        method: &str,
        kind: Kind,
        msgs: Vec<Vec<u8>>,
        auth: Option<MetadataValue<tonic::metadata::Ascii>>,
    ) -> Result<Code, String> {
        let what = match msgs.first() {
            Some(m) if m.len() > 64 => {
                format!("{} message(s), the first {} bytes", msgs.len(), m.len())
            }
            Some(m) => format!("{} message(s), the first {m:02x?}", msgs.len()),
            None => "no message".into(),
        };
        let what = what.as_str();
        let path = PathAndQuery::try_from(format!("{prefix}{method}")).unwrap();
        let mut grpc = tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        fn authed<T>(
            mut r: Request<T>,
            auth: &Option<MetadataValue<tonic::metadata::Ascii>>,
        ) -> Request<T> {
            if let Some(a) = auth {
                r.metadata_mut().insert("authorization", a.clone());
            }
            r
        }
        let fut = async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
            let first = msgs.first().cloned().unwrap_or_default();
            match kind {
                Kind::Unary => grpc
                    .unary(authed(Request::new(first), &auth), path, RawCodec)
                    .await
                    .map(|_| Code::Ok),
                Kind::ServerStream => {
                    let mut s = grpc
                        .server_streaming(authed(Request::new(first), &auth), path, RawCodec)
                        .await?
                        .into_inner();
                    // FetchNar ends; WatchEvents does not: read what comes within a moment.
                    for _ in 0..100 {
                        match tokio::time::timeout(Duration::from_millis(300), s.message()).await {
                            Err(_) => return Ok(Code::Ok),
                            Ok(Ok(Some(_))) => continue,
                            Ok(Ok(None)) => return Ok(Code::Ok),
                            Ok(Err(e)) => return Err(e),
                        }
                    }
                    Ok(Code::Ok)
                }
                Kind::ClientStream => grpc
                    .client_streaming(
                        authed(Request::new(tokio_stream::iter(msgs)), &auth),
                        path,
                        RawCodec,
                    )
                    .await
                    .map(|_| Code::Ok),
                Kind::Bidi => {
                    let (tx, rx) = mpsc::channel(msgs.len().max(1));
                    for m in msgs {
                        let _ = tx.try_send(m);
                    }
                    // The session stays open while the runner answers; close our side after a
                    // moment and read what it says until it ends.
                    let closer = tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        drop(tx);
                    });
                    let r = grpc
                        .streaming(
                            authed(Request::new(ReceiverStream::new(rx)), &auth),
                            path,
                            RawCodec,
                        )
                        .await;
                    let res = match r {
                        Err(e) => Err(e),
                        Ok(resp) => {
                            let mut s = resp.into_inner();
                            loop {
                                match tokio::time::timeout(Duration::from_secs(5), s.message())
                                    .await
                                {
                                    // Still open after we closed: the runner keeps a session
                                    // until it sees the end; that is fine.
                                    Err(_) => break Ok(Code::Ok),
                                    Ok(Ok(Some(_))) => continue,
                                    Ok(Ok(None)) => break Ok(Code::Ok),
                                    Ok(Err(e)) => break Err(e),
                                }
                            }
                        }
                    };
                    closer.abort();
                    res
                }
            }
        };
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Err(_) => Err(format!("{method}: no answer within {CALL_TIMEOUT:?}")),
            Ok(Ok(code)) => {
                self.note(method, code, what, None);
                Ok(code)
            }
            Ok(Err(s)) => {
                let code = s.code();
                self.note(method, code, what, Some(&s));
                Ok(code)
            }
        }
    }

    /// The runner answers a valid call (it is up and its actors respond).
    async fn alive(&mut self) {
        let r =
            tokio::time::timeout(CALL_TIMEOUT, self.admin().status(adm::StatusRequest {})).await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(s)) => self.failures.push(format!("Status after fuzzing: {s}")),
            Err(_) => self.failures.push("Status after fuzzing: no answer".into()),
        }
    }

    fn machine_id(&mut self, prefix: &str) -> String {
        self.machines += 1;
        format!("{prefix}-{}-{}", self.machines, self.rng.below(1 << 20))
    }
}

// --- random values ------------------------------------------------------------------------------

impl Fuzzer {
    /// A string that is often meaningful to the runner (a real drv path, a live session, a job),
    /// else odd: empty, huge, not UTF-8-safe looking, relative, with `..`.
    fn s(&mut self) -> String {
        let rng = &mut self.rng;
        match rng.below(14) {
            0 => String::new(),
            1 if !self.known.drv_paths.is_empty() => rng.pick(&self.known.drv_paths).clone(),
            2 if !self.known.sessions.is_empty() => rng.pick(&self.known.sessions).clone(),
            3 if !self.known.job_ids.is_empty() => rng.pick(&self.known.job_ids).clone(),
            4 => format!("/nix/store/{}-{}", "0".repeat(32), rng.string(8)),
            5 => format!(
                "/nix/store/{}-absent.drv",
                &render_nix32(&sha256(&rng.bytes(8)))[7..39]
            ),
            6 => "/nix/store/../../etc/passwd".into(),
            7 => "x".repeat(1 + rng.below(64 << 10)),
            8 => "é".repeat(1 + rng.below(2000)),
            9 => "\0".repeat(1 + rng.below(8)),
            10 => "localhost".into(),
            11 => X86.into(),
            _ => {
                let n = rng.below(40);
                rng.string(n)
            }
        }
    }

    fn int(&mut self) -> i64 {
        let rng = &mut self.rng;
        match rng.below(8) {
            0 => i64::MAX,
            1 => i64::MIN,
            2 => -1,
            3 => 0,
            4 if !self.known.build_ids.is_empty() => *rng.pick(&self.known.build_ids),
            5 => i32::MAX as i64 + 1,
            _ => rng.below(100) as i64,
        }
    }

    fn float(&mut self) -> f64 {
        *self
            .rng
            .pick(&[f64::NAN, f64::INFINITY, -1.0, 0.0, 1e308, 0.5, -0.0])
    }

    fn strings(&mut self) -> Vec<String> {
        (0..self.rng.below(4)).map(|_| self.s()).collect()
    }

    /// A join that gets past admission about half the time (else one or more fields are bad), for
    /// systems no queued step needs (`x86` false) or the graph's system.
    fn join(&mut self, x86: bool) -> rv::Join {
        let mut j = self.wild_join(x86);
        if self.rng.chance(0.5) {
            j.version = Some(rv::ProtocolVersion { major: 1, minor: 3 });
            j.machine_id = self.machine_id("fz");
            j.store_dir = "/nix/store".into();
            j.systems.retain(|s| s.len() < 200);
            j.systems.truncate(8);
            if j.systems.is_empty() {
                j.systems.push("fuzz-system".into());
            }
            j.supported_features.retain(|s| s.len() < 200);
            j.mandatory_features.clear();
            j.max_jobs = self.rng.below(5) as u32;
            j.speed_factor = *self.rng.pick(&[0.0, 0.5, 2.0, 1e300]);
        }
        j
    }

    /// A join with every field random.
    fn wild_join(&mut self, x86: bool) -> rv::Join {
        let machine_id = if self.rng.chance(0.8) {
            self.machine_id("fz")
        } else {
            self.s()
        };
        let mut systems = self.strings();
        systems.retain(|s| s != X86);
        if x86 {
            systems.push(X86.into());
        } else if self.rng.chance(0.8) {
            systems.push("fuzz-system".into());
        }
        let held = (0..self.rng.below(3))
            .map(|_| rv::HeldJob {
                drv_path: self.s(),
                job_id: self.s(),
                finished: self.rng.chance(0.5),
            })
            .collect();
        rv::Join {
            version: match self.rng.below(6) {
                0 => None,
                1 => Some(rv::ProtocolVersion {
                    major: u32::MAX,
                    minor: 0,
                }),
                2 => Some(rv::ProtocolVersion { major: 0, minor: 7 }),
                _ => Some(rv::ProtocolVersion {
                    major: 1,
                    minor: self.rng.next_u64() as u32,
                }),
            },
            machine_id,
            hostname: self.s(),
            systems,
            supported_features: self.strings(),
            mandatory_features: if self.rng.chance(0.2) {
                self.strings()
            } else {
                vec![]
            },
            max_jobs: *self.rng.pick(&[0, 1, 4, u32::MAX]),
            speed_factor: self.float(),
            store_dir: if self.rng.chance(0.85) {
                "/nix/store".into()
            } else {
                self.s()
            },
            held,
        }
    }

    fn path_info(&mut self) -> rv::PathInfo {
        rv::PathInfo {
            path: self.s(),
            nar_hash: match self.rng.below(3) {
                0 => render_nix32(&sha256(&self.rng.bytes(4))),
                1 => self.s(),
                _ => format!("sha256:{}", "0".repeat(64)),
            },
            nar_size: self.rng.wild_len(),
            references: self.strings(),
            ca: if self.rng.chance(0.5) {
                format!("fixed:r:{}", render_nix32(&sha256(b"x")))
            } else {
                self.s()
            },
            deriver: self.s(),
        }
    }

    fn builder_message(&mut self) -> rv::BuilderMessage {
        use rv::builder_message::Msg;
        let msg = match self.rng.below(8) {
            0 => None,
            1 => Some(Msg::Join(self.join(false))),
            2..=4 => Some(Msg::Heartbeat(rv::Heartbeat {
                load: self.float(),
                free_disk_bytes: self.rng.wild_len(),
                running_jobs: self.rng.next_u64() as u32,
            })),
            _ => Some(Msg::Result(rv::JobResult {
                job_id: self.s(),
                drv_path: self.s(),
                outcome: match self.rng.below(3) {
                    0 => None,
                    1 => Some(rv::job_result::Outcome::Failure(rv::JobFailure {
                        status: self.rng.next_u64() as i32,
                        message: self.s(),
                        transient: true,
                    })),
                    _ => Some(rv::job_result::Outcome::Success(rv::JobSuccess {
                        outputs: (0..self.rng.below(3))
                            .map(|_| rv::BuiltOutput {
                                name: self.s(),
                                info: self.rng.chance(0.8).then(|| self.path_info()),
                            })
                            .collect(),
                        ran: self.rng.chance(0.5),
                    })),
                },
            })),
        };
        rv::BuilderMessage { msg }
    }

    /// A random valid message (or stream of them) for `method`, encoded.
    fn valid_messages(&mut self, method: &str) -> Vec<Vec<u8>> {
        match method {
            "Session" => {
                let mut v = Vec::new();
                if self.rng.chance(0.85) {
                    let j = self.join(false);
                    v.push(
                        rv::BuilderMessage {
                            msg: Some(rv::builder_message::Msg::Join(j)),
                        }
                        .encode_to_vec(),
                    );
                }
                for _ in 0..self.rng.below(5) {
                    v.push(self.builder_message().encode_to_vec());
                }
                v
            }
            "FetchNar" => vec![
                rv::FetchNarRequest {
                    session_id: self.s(),
                    path: self.s(),
                }
                .encode_to_vec(),
            ],
            "UploadNar" => {
                use rv::upload_nar_request::Msg;
                let mut v = Vec::new();
                for i in 0..1 + self.rng.below(4) {
                    let header = i == 0 && self.rng.chance(0.8) || self.rng.chance(0.1);
                    let msg = if header {
                        Msg::Header(rv::UploadHeader {
                            session_id: self.s(),
                            job_id: self.s(),
                            output_name: self.s(),
                            info: self.rng.chance(0.9).then(|| self.path_info()),
                        })
                    } else {
                        let n = self.rng.below(70_000);
                        Msg::Data(self.rng.bytes(n))
                    };
                    v.push(rv::UploadNarRequest { msg: Some(msg) }.encode_to_vec());
                }
                v
            }
            "StreamLog" => (0..1 + self.rng.below(4))
                .map(|_| {
                    let n = if self.rng.chance(0.1) {
                        (MAX_LOG as usize) + 1
                    } else {
                        self.rng.below(2000)
                    };
                    rv::LogChunk {
                        session_id: self.s(),
                        job_id: self.s(),
                        drv_path: self.s(),
                        data: self.rng.bytes(n),
                    }
                    .encode_to_vec()
                })
                .collect(),
            "Status" => vec![adm::StatusRequest {}.encode_to_vec()],
            "ListBuilds" => vec![
                adm::ListBuildsRequest {
                    limit: self.int() as u32,
                    unfinished_only: self.rng.chance(0.5),
                }
                .encode_to_vec(),
            ],
            "GetBuild" => vec![adm::GetBuildRequest { id: self.int() }.encode_to_vec()],
            "ListSteps" => vec![adm::ListStepsRequest { build: self.int() }.encode_to_vec()],
            "GetStep" => vec![
                adm::GetStepRequest {
                    build: self.int(),
                    stepnr: self.int() as i32,
                }
                .encode_to_vec(),
            ],
            "ListActors" => vec![adm::ListActorsRequest { kind: self.s() }.encode_to_vec()],
            "ListMachines" => vec![adm::ListMachinesRequest {}.encode_to_vec()],
            // Never cancel the builds under test: the fuzzer aims at ids it does not own.
            "CancelBuild" | "RestartBuild" => vec![
                adm::BuildAction {
                    id: self.foreign_id(),
                }
                .encode_to_vec(),
            ],
            "BumpBuild" => vec![
                adm::BumpBuildRequest {
                    id: self.int(),
                    global_priority: self.int() as i32,
                }
                .encode_to_vec(),
            ],
            "SetMachine" => vec![
                adm::SetMachineRequest {
                    machine: self.s(),
                    action: self.int() as i32,
                }
                .encode_to_vec(),
            ],
            "WatchEvents" => vec![adm::WatchEventsRequest {}.encode_to_vec()],
            "GetLog" => vec![
                adm::GetLogRequest {
                    build: self.int(),
                    stepnr: self.int() as i32,
                    tail_lines: self.int() as u32,
                }
                .encode_to_vec(),
            ],
            "ListEvals" => vec![
                adm::ListEvalsRequest {
                    limit: self.int() as u32,
                }
                .encode_to_vec(),
            ],
            "GetEval" => vec![adm::GetEvalRequest { id: self.int() }.encode_to_vec()],
            other => panic!("no generator for {other}"),
        }
    }

    /// A build id that is not one of the builds under test.
    fn foreign_id(&mut self) -> i64 {
        loop {
            let id = self.int();
            if !self.known.build_ids.contains(&id) {
                return id;
            }
        }
    }

    /// Byte-level damage to an encoded message.
    fn mutate(&mut self, mut m: Vec<u8>) -> Vec<u8> {
        for _ in 0..1 + self.rng.below(4) {
            let n = m.len();
            match self.rng.below(7) {
                0 if n > 0 => {
                    let i = self.rng.below(n);
                    m[i] ^= 1 << self.rng.below(8);
                }
                1 if n > 0 => {
                    let i = self.rng.below(n);
                    m[i] = self.rng.next_u64() as u8;
                }
                2 => {
                    let i = self.rng.below(n + 1);
                    m.truncate(i);
                }
                3 => {
                    let k = self.rng.below(16);
                    let extra = self.rng.bytes(k);
                    m.extend(extra);
                }
                // A field whose declared length is huge.
                4 => {
                    let i = self.rng.below(n + 1);
                    let field = (1 + self.rng.below(12) as u8) << 3 | 2;
                    m.splice(i..i, [field, 0xff, 0xff, 0xff, 0xff, 0x0f]);
                }
                // An overlong varint.
                5 => {
                    let i = self.rng.below(n + 1);
                    m.splice(
                        i..i,
                        [0x08].into_iter().chain(std::iter::repeat_n(0xff, 11)),
                    );
                }
                // A field of an unused number and wire type 3/4 (groups).
                _ => {
                    let i = self.rng.below(n + 1);
                    let t = 3 + self.rng.below(2) as u8;
                    m.splice(i..i, [(15 << 3) | t]);
                }
            }
        }
        m
    }
}

// --- the setup: a runner with the `mixed` graph queued -------------------------------------------

/// The `mixed` fixture.
fn mixed() -> Value {
    common::load_fixtures()
        .into_iter()
        .find(|(n, _)| n == "mixed")
        .expect("mixed fixture")
        .1
}

/// Imports the fixture's drvs and its `builtins.toFile` source into the runner's store
/// (`qr import`); returns the top-level drv paths.
fn import_mixed(c: &Cluster, fx: &Value) -> Vec<PathBuf> {
    let dir = c.qr.state_dir().join("fixture-store");
    std::fs::create_dir_all(&dir).unwrap();
    let mut all = Vec::new();
    let mut used = BTreeSet::new();
    for (p, v) in common::derivations(fx) {
        std::fs::write(
            dir.join(p.rsplit('/').next().unwrap()),
            common::s(v, "/aterm"),
        )
        .unwrap();
        all.push(p.to_string());
        if let Some(inputs) = v["show_derivation"]["inputDrvs"].as_object() {
            used.extend(inputs.keys().cloned());
        }
    }
    let sd = StoreDir::default();
    let src = sd.print(&sd.make_text_path("mx-src.txt", b"some source\n", []));
    std::fs::write(dir.join(src.rsplit('/').next().unwrap()), "some source\n").unwrap();
    let mut args = vec![
        "import".to_string(),
        "--from".into(),
        dir.display().to_string(),
    ];
    args.extend(all.iter().cloned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.qr.run(&argv, &[]);
    assert!(
        out.status.success(),
        "qr import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    all.into_iter()
        .filter(|p| !used.contains(p))
        .map(PathBuf::from)
        .collect()
}

/// What may be in the runner's store at the end: the fixture's drvs, the resolved drvs Nix
/// wrote, the outputs Nix built and the source.
fn allowed_store_entries(fx: &Value) -> BTreeSet<String> {
    let base = |p: &str| p.rsplit('/').next().unwrap().to_string();
    let mut ok = BTreeSet::new();
    for (p, v) in common::derivations(fx) {
        ok.insert(base(p));
        if let Some(r) = v.get("resolved").and_then(|r| r.get("drv_path")) {
            ok.insert(base(r.as_str().unwrap()));
        }
    }
    for p in fx["output_path_infos"]
        .as_object()
        .expect("output_path_infos")
        .keys()
    {
        ok.insert(base(p));
    }
    let sd = StoreDir::default();
    ok.insert(base(&sd.print(&sd.make_text_path(
        "mx-src.txt",
        b"some source\n",
        [],
    ))));
    ok
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

// --- phase 3: lying builders ---------------------------------------------------------------------

/// A builder session driven by hand.
struct Session {
    id: String,
    tx: mpsc::Sender<rv::BuilderMessage>,
    rx: mpsc::Receiver<Result<rv::RunnerMessage, Status>>,
    _reader: tokio::task::JoinHandle<()>,
    heart: tokio::task::JoinHandle<()>,
}

impl Session {
    async fn open(runner: &mut Runner, join: rv::Join) -> Result<Session, Status> {
        let (tx, out) = mpsc::channel(4096);
        tx.send(rv::BuilderMessage {
            msg: Some(rv::builder_message::Msg::Join(join)),
        })
        .await
        .unwrap();
        let mut inbound = runner.session(ReceiverStream::new(out)).await?.into_inner();
        let (itx, mut rx) = mpsc::channel(1024);
        let reader = tokio::spawn(async move {
            loop {
                match inbound.next().await {
                    Some(m) => {
                        let end = m.is_err();
                        if itx.send(m).await.is_err() || end {
                            return;
                        }
                    }
                    None => return,
                }
            }
        });
        let welcome = tokio::time::timeout(CALL_TIMEOUT, rx.recv())
            .await
            .map_err(|_| Status::deadline_exceeded("no welcome"))?
            .ok_or_else(|| Status::aborted("the session ended before the welcome"))??;
        let Some(rv::runner_message::Msg::Welcome(w)) = welcome.msg else {
            return Err(Status::aborted("the first message was not a welcome"));
        };
        let htx = tx.clone();
        let heart = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let hb = rv::BuilderMessage {
                    msg: Some(rv::builder_message::Msg::Heartbeat(rv::Heartbeat::default())),
                };
                if htx.send(hb).await.is_err() {
                    return;
                }
            }
        });
        Ok(Session {
            id: w.session_id,
            tx,
            rx,
            _reader: reader,
            heart,
        })
    }

    /// The next job sent (skipping config updates and aborts).
    async fn next_job(&mut self, wait: Duration) -> Option<rv::BuildJob> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ok(rv::RunnerMessage {
                    msg: Some(rv::runner_message::Msg::Build(j)),
                }))) => return Some(j),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    /// How the runner ends the session: the status it ends it with (`Ok` if it just closes).
    async fn end(&mut self, wait: Duration) -> Option<Code> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return None,
                Ok(None) => return Some(Code::Ok),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(s))) => return Some(s.code()),
            }
        }
    }

    async fn send(&self, msg: rv::builder_message::Msg) {
        let _ = self.tx.send(rv::BuilderMessage { msg: Some(msg) }).await;
    }

    fn close(self) {
        self.heart.abort();
    }
}

/// The outputs a job's derivation must have: name → (expected path or a floating name).
fn job_outputs(job: &rv::BuildJob) -> BTreeMap<String, Result<String, String>> {
    let sd = StoreDir::default();
    let name = sd
        .parse(&job.drv_path)
        .map(|p| p.drv_name().to_string())
        .unwrap_or_default();
    let drv =
        qr::store::aterm::parse_named(job.drv.as_bytes(), &name).expect("the job's drv parses");
    drv.outputs
        .iter()
        .map(|(o, out)| {
            let e = match out.path() {
                Some(p) => Ok(p.to_string()),
                None => Err(qr::store::path::output_path_name(&drv.name, o)),
            };
            (o.clone(), e)
        })
        .collect()
}

/// A path for an output: the expected one, or a made-up one with the right name (floating).
fn plausible_path(e: &Result<String, String>, salt: &[u8]) -> String {
    match e {
        Ok(p) => p.clone(),
        Err(name) => {
            let sd = StoreDir::default();
            sd.print(&sd.make_source_path(name, &sha256(salt), [], false))
        }
    }
}

fn info_of(path: &str, nar: &[u8]) -> rv::PathInfo {
    let h = sha256(nar);
    rv::PathInfo {
        path: path.to_string(),
        nar_hash: render_nix32(&h),
        nar_size: nar.len() as u64,
        references: vec![],
        ca: format!("fixed:r:sha256:{}", qr::store::nix32::encode(&h)),
        deriver: String::new(),
    }
}

/// Uploads `chunks` after a header; the call's code.
async fn upload(runner: &mut Runner, header: rv::UploadHeader, chunks: Vec<Vec<u8>>) -> Code {
    use rv::upload_nar_request::Msg;
    let mut msgs = vec![rv::UploadNarRequest {
        msg: Some(Msg::Header(header)),
    }];
    msgs.extend(chunks.into_iter().map(|c| rv::UploadNarRequest {
        msg: Some(Msg::Data(c)),
    }));
    match tokio::time::timeout(CALL_TIMEOUT, runner.upload_nar(tokio_stream::iter(msgs))).await {
        Err(_) => Code::DeadlineExceeded,
        Ok(Ok(_)) => Code::Ok,
        Ok(Err(s)) => s.code(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Lie {
    UploadUnknownJob,
    UploadNotAnOutput,
    UploadWrongPath,
    UploadFloatingWithoutCa,
    UploadHashMismatch,
    UploadTruncated,
    UploadTooLong,
    UploadHugeClaim,
    UploadBadHash,
    UploadTwoHeaders,
    ResultWithoutUpload,
    ResultUnknownJob,
    ResultWrongOutputs,
    ResultNoOutcome,
    ResultBadInfo,
    SecondJoin,
    FloodThenForgedResult,
    /// Not a lie: a transient failure the runner must retry elsewhere.
    TransientFailure,
}

const LIES: &[Lie] = &[
    Lie::UploadUnknownJob,
    Lie::UploadNotAnOutput,
    Lie::UploadWrongPath,
    Lie::UploadFloatingWithoutCa,
    Lie::UploadHashMismatch,
    Lie::UploadTruncated,
    Lie::UploadTooLong,
    Lie::UploadHugeClaim,
    Lie::UploadBadHash,
    Lie::UploadTwoHeaders,
    Lie::ResultWithoutUpload,
    Lie::ResultUnknownJob,
    Lie::ResultWrongOutputs,
    Lie::ResultNoOutcome,
    Lie::ResultBadInfo,
    Lie::SecondJoin,
    Lie::FloodThenForgedResult,
    Lie::TransientFailure,
];

impl Fuzzer {
    /// One lying builder: joins for the graph's system, takes a job, checks what a builder may do
    /// (fetch its inputs, stream its log), then lies. Returns the lie told, or None when no job
    /// came.
    async fn liar(&mut self, lie: Lie) -> Option<Lie> {
        let mut runner = self.runner();
        let mut join = self.join(true);
        join.machine_id = self.machine_id("liar");
        join.version = Some(rv::ProtocolVersion { major: 1, minor: 0 });
        join.store_dir = "/nix/store".into();
        join.mandatory_features.clear();
        join.supported_features.clear();
        join.systems = vec![X86.into()];
        join.speed_factor = 1.0;
        join.held.clear();
        join.max_jobs = 1 + self.rng.below(3) as u32;
        let mut s = match Session::open(&mut runner, join).await {
            Ok(s) => s,
            Err(e) => {
                self.failures.push(format!("a liar could not join: {e}"));
                return None;
            }
        };
        let Some(job) = s.next_job(Duration::from_secs(30)).await else {
            s.close();
            return None;
        };
        self.known.job_ids.push(job.job_id.clone());
        self.known.sessions.push(s.id.clone());
        // What a builder may do: fetch an input (it must be a valid NAR of the claimed hash).
        if let Some(input) = job.inputs.first() {
            let r = runner
                .fetch_nar(rv::FetchNarRequest {
                    session_id: s.id.clone(),
                    path: input.path.clone(),
                })
                .await;
            match r {
                Ok(resp) => {
                    let mut st = resp.into_inner();
                    let mut nar = Vec::new();
                    while let Some(c) = st.next().await {
                        match c {
                            Ok(c) => nar.extend_from_slice(&c.data),
                            Err(e) => {
                                self.failures.push(format!("FetchNar {}: {e}", input.path));
                                break;
                            }
                        }
                    }
                    let tree = NarTree::from_nar(nar.as_slice(), &Default::default(), u64::MAX);
                    if tree.is_err()
                        || render_nix32(&sha256(&nar)) != input.nar_hash
                        || nar.len() as u64 != input.nar_size
                    {
                        self.failures.push(format!(
                            "FetchNar {}: the NAR does not match its info",
                            input.path
                        ));
                    } else {
                        self.fetched += 1;
                    }
                }
                Err(e) => self.failures.push(format!("FetchNar {}: {e}", input.path)),
            }
        }
        let outs = job_outputs(&job);
        let (out_name, expected) = outs
            .iter()
            .next()
            .map(|(k, v)| (k.clone(), v.clone()))
            .unwrap();
        let floating = expected.is_err();
        let size = 1 + self.rng.below(3000);
        let good_tree = NarTree::file(self.rng.bytes(size));
        let nar = good_tree.to_nar().unwrap();
        let salt = self.rng.bytes(8);
        let path = plausible_path(&expected, &salt);
        let header = |job_id: &str, output: &str, info: rv::PathInfo| rv::UploadHeader {
            session_id: s.id.clone(),
            job_id: job_id.to_string(),
            output_name: output.to_string(),
            info: Some(info),
        };
        // (code the call must end with, the session is refused)
        let (call, want_call, refused): (&str, Vec<Code>, bool) = match lie {
            Lie::UploadUnknownJob => {
                let c = upload(
                    &mut runner,
                    header(&format!("{}x", job.job_id), &out_name, info_of(&path, &nar)),
                    vec![nar.clone()],
                )
                .await;
                (
                    "upload for another job",
                    vec![c, Code::PermissionDenied],
                    true,
                )
            }
            Lie::UploadNotAnOutput => {
                let c = upload(
                    &mut runner,
                    header(&job.job_id, "not-an-output", info_of(&path, &nar)),
                    vec![nar.clone()],
                )
                .await;
                (
                    "upload of an output the drv lacks",
                    vec![c, Code::PermissionDenied],
                    true,
                )
            }
            Lie::UploadWrongPath => {
                let sd = StoreDir::default();
                let wrong = sd.print(&sd.make_source_path("other-name", &sha256(&salt), [], false));
                let c = upload(
                    &mut runner,
                    header(&job.job_id, &out_name, info_of(&wrong, &nar)),
                    vec![nar.clone()],
                )
                .await;
                (
                    "upload at a path that is not the output's",
                    vec![c, Code::PermissionDenied],
                    true,
                )
            }
            Lie::UploadFloatingWithoutCa if floating => {
                let mut info = info_of(&path, &nar);
                info.ca.clear();
                let c = upload(
                    &mut runner,
                    header(&job.job_id, &out_name, info),
                    vec![nar.clone()],
                )
                .await;
                (
                    "floating upload without its content address",
                    vec![c, Code::PermissionDenied],
                    true,
                )
            }
            Lie::UploadFloatingWithoutCa | Lie::UploadHashMismatch => {
                let mut info = info_of(&path, &nar);
                info.nar_hash = render_nix32(&sha256(&salt));
                let c = upload(
                    &mut runner,
                    header(&job.job_id, &out_name, info),
                    vec![nar.clone()],
                )
                .await;
                (
                    "upload whose NAR hash differs",
                    vec![c, Code::InvalidArgument],
                    true,
                )
            }
            Lie::UploadTruncated => {
                let cut = self.rng.below(nar.len());
                let c = upload(
                    &mut runner,
                    header(&job.job_id, &out_name, info_of(&path, &nar)),
                    vec![nar[..cut].to_vec()],
                )
                .await;
                ("truncated upload", vec![c, Code::InvalidArgument], true)
            }
            Lie::UploadTooLong => {
                let mut long = nar.clone();
                let extra = 1 + self.rng.below(100);
                long.extend(self.rng.bytes(extra));
                let c = upload(
                    &mut runner,
                    header(&job.job_id, &out_name, info_of(&path, &nar)),
                    vec![long],
                )
                .await;
                (
                    "upload longer than claimed",
                    vec![c, Code::InvalidArgument],
                    true,
                )
            }
            Lie::UploadHugeClaim => {
                let mut info = info_of(&path, &nar);
                info.nar_size = *self.rng.pick(&[MAX_NAR + 1, 1 << 40, u64::MAX]);
                // Sends more than the limit: the runner must stop reading, not buffer it.
                let chunks = (0..6).map(|_| vec![0u8; (MAX_NAR / 4) as usize]).collect();
                let c = upload(&mut runner, header(&job.job_id, &out_name, info), chunks).await;
                (
                    "upload claiming more than the limit",
                    vec![c, Code::InvalidArgument],
                    true,
                )
            }
            Lie::UploadBadHash => {
                let mut info = info_of(&path, &nar);
                info.nar_hash = self.s();
                let c = upload(
                    &mut runner,
                    header(&job.job_id, &out_name, info),
                    vec![nar.clone()],
                )
                .await;
                (
                    "upload with an unparseable hash",
                    vec![c, Code::InvalidArgument],
                    true,
                )
            }
            Lie::UploadTwoHeaders => {
                use rv::upload_nar_request::Msg;
                let h = header(&job.job_id, &out_name, info_of(&path, &nar));
                let msgs = vec![
                    rv::UploadNarRequest {
                        msg: Some(Msg::Header(h.clone())),
                    },
                    rv::UploadNarRequest {
                        msg: Some(Msg::Header(h)),
                    },
                ];
                let c = match tokio::time::timeout(
                    CALL_TIMEOUT,
                    runner.upload_nar(tokio_stream::iter(msgs)),
                )
                .await
                {
                    Err(_) => Code::DeadlineExceeded,
                    Ok(Ok(_)) => Code::Ok,
                    Ok(Err(e)) => e.code(),
                };
                (
                    "upload with two headers",
                    vec![c, Code::InvalidArgument],
                    true,
                )
            }
            Lie::ResultWithoutUpload | Lie::ResultBadInfo | Lie::ResultWrongOutputs => {
                let mut outputs: Vec<rv::BuiltOutput> = outs
                    .iter()
                    .map(|(o, e)| rv::BuiltOutput {
                        name: o.clone(),
                        info: Some(info_of(&plausible_path(e, &salt), &nar)),
                    })
                    .collect();
                match lie {
                    Lie::ResultBadInfo => {
                        outputs[0].info.as_mut().unwrap().nar_hash = "sha256:nope".into()
                    }
                    Lie::ResultWrongOutputs => {
                        if self.rng.chance(0.5) {
                            outputs.clear();
                        } else {
                            outputs.push(rv::BuiltOutput {
                                name: "extra".into(),
                                info: Some(info_of(&path, &nar)),
                            });
                        }
                    }
                    _ => {}
                }
                s.send(rv::builder_message::Msg::Result(rv::JobResult {
                    job_id: job.job_id.clone(),
                    drv_path: job.drv_path.clone(),
                    outcome: Some(rv::job_result::Outcome::Success(rv::JobSuccess {
                        outputs,
                        ran: true,
                    })),
                }))
                .await;
                ("a result for outputs never uploaded", vec![], true)
            }
            Lie::ResultUnknownJob => {
                // Any id but the job this session was given: a random string may be a known job
                // id, and the current job's failure is a result the runner rightly takes.
                let mut job_id = self.s();
                while job_id == job.job_id {
                    job_id = self.s();
                }
                s.send(rv::builder_message::Msg::Result(rv::JobResult {
                    job_id,
                    drv_path: job.drv_path.clone(),
                    outcome: Some(rv::job_result::Outcome::Failure(rv::JobFailure {
                        status: 1,
                        message: "x".into(),
                        transient: false,
                    })),
                }))
                .await;
                ("a result for a job not given", vec![], true)
            }
            Lie::ResultNoOutcome => {
                s.send(rv::builder_message::Msg::Result(rv::JobResult {
                    job_id: job.job_id.clone(),
                    drv_path: job.drv_path.clone(),
                    outcome: None,
                }))
                .await;
                ("a result without an outcome", vec![], true)
            }
            Lie::SecondJoin => {
                let j = self.join(true);
                s.send(rv::builder_message::Msg::Join(j)).await;
                ("a second join", vec![], true)
            }
            Lie::FloodThenForgedResult => {
                for _ in 0..3000 {
                    s.send(rv::builder_message::Msg::Heartbeat(rv::Heartbeat {
                        load: self.float(),
                        free_disk_bytes: 1,
                        running_jobs: 1,
                    }))
                    .await;
                }
                s.send(rv::builder_message::Msg::Result(rv::JobResult {
                    job_id: format!("{}-forged", job.job_id),
                    drv_path: job.drv_path.clone(),
                    outcome: Some(rv::job_result::Outcome::Failure(rv::JobFailure {
                        status: 1,
                        message: "forged".into(),
                        transient: false,
                    })),
                }))
                .await;
                ("a forged result after a flood of heartbeats", vec![], true)
            }
            Lie::TransientFailure => {
                // Its log first (a builder streams it), then a transient failure with an odd
                // status code: the step is retried, the session goes on.
                let log: Vec<rv::LogChunk> = (0..3)
                    .map(|i| rv::LogChunk {
                        session_id: s.id.clone(),
                        job_id: job.job_id.clone(),
                        drv_path: job.drv_path.clone(),
                        data: format!("line {i}\n").into_bytes(),
                    })
                    .collect();
                match tokio::time::timeout(CALL_TIMEOUT, runner.stream_log(tokio_stream::iter(log)))
                    .await
                {
                    Ok(Ok(r)) if r.get_ref().bytes == 21 => {}
                    other => self.failures.push(format!("StreamLog of a job: {other:?}")),
                }
                s.send(rv::builder_message::Msg::Result(rv::JobResult {
                    job_id: job.job_id.clone(),
                    drv_path: job.drv_path.clone(),
                    outcome: Some(rv::job_result::Outcome::Failure(rv::JobFailure {
                        status: *self.rng.pick(&[9999, -5, 3, 7]),
                        // Builders' messages end up in the database: a NUL byte (PostgreSQL text
                        // cannot hold one) and odd text must not keep the step from finishing.
                        message: format!("failed\0 {}", self.s()),
                        transient: true,
                    })),
                }))
                .await;
                ("a transient failure", vec![], false)
            }
        };
        if let [got, want] = want_call[..] {
            if got != want {
                self.failures.push(format!(
                    "{lie:?} ({call}): the call ended {got:?}, expected {want:?}"
                ));
            }
        }
        let end = s
            .end(Duration::from_secs(if refused { 20 } else { 1 }))
            .await;
        match (refused, end) {
            (true, Some(Code::PermissionDenied)) => {}
            (false, None) => {}
            (r, e) => self.failures.push(format!(
                "{lie:?} ({call}): the session ended {e:?} (None: still open), expected {}",
                if r {
                    "PERMISSION_DENIED"
                } else {
                    "it to stay open"
                }
            )),
        }
        *self
            .stats
            .entry(("liar".into(), format!("{lie:?}")))
            .or_default() += 1;
        s.close();
        Some(lie)
    }
}

// --- the test ------------------------------------------------------------------------------------

fn fuzz_runner(backend: Backend) {
    let Some(mut c) = Cluster::new(backend) else {
        return;
    };
    let seed = seed("fuzz_grpc_handlers");
    c.serve_env = [
        ("QR_SCHEDULER_MAX_TRIES", "1000000"),
        ("QR_SCHEDULER_RETRY_INTERVAL_S", "0.05"),
        ("QR_SCHEDULER_RETRY_BACKOFF", "1"),
        ("QR_SCHEDULER_UNSUPPORTED_WAIT_S", "100000"),
        ("QR_STORE_MAX_LOG_BYTES", &MAX_LOG.to_string()),
        ("QR_GRPC_MAX_NAR_BYTES", &MAX_NAR.to_string()),
        ("QR_GRPC_QUARANTINE_S", "3600"),
        ("QR_GRPC_REJOIN_GRACE_S", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let fx = mixed();
    let tops = import_mixed(&c, &fx);
    c.start_serve();
    let refs: Vec<&std::path::Path> = tops.iter().map(PathBuf::as_path).collect();
    // No timeout of its own: how long the fuzzing takes depends on QR_FUZZ_CASES.
    let mut submit = c.submit(&refs, 0);
    let url = c.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (stats, failures) = rt.block_on(async {
        let mut f = Fuzzer::new(&url, seed).await;
        // The builds under test are queued.
        let t = std::time::Instant::now();
        while f.known.build_ids.len() < tops.len() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the builds were not queued\n{}",
                c.serve_logs()
            );
            if let Ok(r) = f
                .admin()
                .list_builds(adm::ListBuildsRequest::default())
                .await
            {
                f.known.build_ids = r.into_inner().builds.iter().map(|b| b.id).collect();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        f.known.drv_paths = common::derivations(&fx)
            .iter()
            .map(|(p, _)| p.to_string())
            .collect();

        let phase = std::time::Instant::now();
        // 1. No token, a wrong one, a malformed one: refused, whatever the payload.
        for (prefix, method, kind) in METHODS {
            for auth in [
                None,
                Some(bearer("wrong-token")),
                Some("Basic dGVzdA==".parse().unwrap()),
                Some(format!("Bearer {TOKEN}x").parse().unwrap()),
            ] {
                let k = f.rng.below(64);
                let payload = f.rng.bytes(k);
                match f.raw_call(prefix, method, *kind, vec![payload], auth).await {
                    Ok(Code::Unauthenticated) => {}
                    other => f
                        .failures
                        .push(format!("{method} without a valid token: {other:?}")),
                }
            }
        }

        // 2. Random, valid and mutated messages to every method.
        let n = cases(1200);
        let phase2 = std::time::Instant::now();
        let mut keepers = Vec::new();
        for i in 0..n {
            // Now and then a live session the messages can name (they may get it refused).
            if i % 50 == 0 {
                let mut j = f.join(false);
                j.machine_id = f.machine_id("keeper");
                j.version = Some(rv::ProtocolVersion { major: 1, minor: 0 });
                j.store_dir = "/nix/store".into();
                j.systems = vec!["fuzz-system".into()];
                j.supported_features.clear();
                j.mandatory_features.clear();
                j.speed_factor = 0.0;
                j.max_jobs = 1;
                j.held.clear();
                match Session::open(&mut f.runner(), j).await {
                    Ok(s) => {
                        f.known.sessions.push(s.id.clone());
                        keepers.push(s);
                    }
                    Err(e) => f
                        .failures
                        .push(format!("a keeper session could not join: {e}")),
                }
            }
            let (prefix, method, kind) = *f.rng.pick(METHODS);
            let msgs = match f.rng.below(3) {
                0 => (0..1 + f.rng.below(3))
                    .map(|_| {
                        let k = f.rng.below(300);
                        f.rng.bytes(k)
                    })
                    .collect(),
                1 => f.valid_messages(method),
                _ => {
                    let v = f.valid_messages(method);
                    v.into_iter().map(|m| f.mutate(m)).collect()
                }
            };
            // Cancelling (or restarting) the builds under test is a legitimate request: bytes
            // that decode to one, random or mutated, are not sent.
            if matches!(method, "CancelBuild" | "RestartBuild")
                && msgs.iter().any(|m| {
                    adm::BuildAction::decode(m.as_slice())
                        .is_ok_and(|a| f.known.build_ids.contains(&a.id))
                })
            {
                *f.stats
                    .entry((
                        method.to_string(),
                        "not sent: names a build under test".into(),
                    ))
                    .or_default() += 1;
                continue;
            }
            if let Err(hang) = f
                .raw_call(prefix, method, kind, msgs, Some(bearer(TOKEN)))
                .await
            {
                f.failures.push(hang);
            }
            if i % 100 == 99 {
                f.alive().await;
            }
        }
        for k in keepers {
            k.close();
        }
        // An unknown method of each service.
        for prefix in [RUNNER, ADMIN] {
            match f
                .raw_call(
                    prefix,
                    "NoSuchMethod",
                    Kind::Unary,
                    vec![vec![]],
                    Some(bearer(TOKEN)),
                )
                .await
            {
                Ok(Code::Unimplemented) => {}
                other => f.failures.push(format!("an unknown method: {other:?}")),
            }
        }
        f.alive().await;

        eprintln!(
            "{n} random calls in {:.1} s",
            phase2.elapsed().as_secs_f64()
        );
        // 3. Lying builders with real jobs.
        let liars = cases(72) as usize;
        let phase3 = std::time::Instant::now();
        let mut told = BTreeSet::new();
        for i in 0..liars {
            // Every kind of lie once before repeating at random.
            let lie = match LIES.get(i) {
                Some(l) => *l,
                None => *f.rng.pick(LIES),
            };
            if let Some(l) = f.liar(lie).await {
                told.insert(l);
            } else {
                f.failures.push(format!("liar {i} got no job within 30 s"));
                break;
            }
        }
        f.alive().await;
        eprintln!(
            "{liars} liars in {:.1} s; all fuzzing {:.1} s",
            phase3.elapsed().as_secs_f64(),
            phase.elapsed().as_secs_f64()
        );
        if f.fetched == 0 {
            f.failures.push("no liar fetched an input".into());
        }
        eprintln!("{} inputs fetched and checked", f.fetched);
        if liars >= LIES.len() {
            assert_eq!(told.len(), LIES.len(), "every lie told: {told:?}");
        }
        (f.stats, f.failures)
    });

    // 4. An honest builder: the builds queued before the fuzzing finish, right.
    let honest = c.builder("honest", &["--systems", X86, "--max-jobs", "2"], &[]);
    // A hang detector, not a timing assertion: the graph takes seconds once a builder is there.
    // The output is read meanwhile (with many retried steps it outgrows a pipe's buffer).
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let stdout = drain(submit.stdout.take().map(|s| Box::new(s) as _));
    let stderr = drain(submit.stderr.take().map(|s| Box::new(s) as _));
    let t = std::time::Instant::now();
    while submit.try_wait().expect("qr submit").is_none() {
        if t.elapsed() > Duration::from_secs(300) {
            let _ = submit.kill();
            let log = c.serve_logs();
            let stuck = c_logs_lines(&log);
            panic!(
                "the builds queued before the fuzzing did not finish within 300 s of an honest \
                 builder joining; failures: {failures:?}\n--- serve log (errors) ---\n{}",
                stuck.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = submit.wait().expect("qr submit");
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let builds: Vec<Value> = String::from_utf8_lossy(&stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON build line"))
        .collect();
    let out = std::process::Output {
        status,
        stdout,
        stderr,
    };
    let logs = c.logs(&[&honest]);
    let clip = |s: &str| {
        s.chars()
            .rev()
            .take(20_000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<String>()
    };
    let mut by_method: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((m, code), n) in &stats {
        by_method.entry(m).or_default().push(format!("{code}={n}"));
    }
    for (m, codes) in by_method {
        eprintln!("{m}: {}", codes.join(" "));
    }
    if let Some(dir) = std::env::var_os("QR_FUZZ_LOG_DIR") {
        let p = PathBuf::from(dir).join(format!("serve-{backend:?}.log"));
        std::fs::write(&p, c.serve_logs()).unwrap();
        eprintln!("serve log: {}", p.display());
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}\n--- serve log (end) ---\n{}",
        failures.len(),
        failures.join("\n"),
        clip(&c.serve_logs())
    );
    assert!(
        out.status.success(),
        "submit ({}): {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        clip(&logs)
    );
    let drvs = fx["derivations"].as_object().unwrap();
    assert_eq!(builds.len(), tops.len());
    for b in &builds {
        let drv = b["drvPath"].as_str().unwrap();
        assert_eq!(b["status"], 0, "{b}");
        for (o, r) in drvs[drv]["realisations"].as_object().unwrap() {
            assert_eq!(b["outputs"][o], r["out_path"], "{drv}!{o}");
        }
    }
    // The runner's copies are Nix's, and nothing a liar sent entered its store.
    let infos = fx["output_path_infos"].as_object().unwrap();
    let store_root = c.qr.state_dir().join("nix-store");
    for (p, info) in infos {
        let phys = store_root.join(p.rsplit('/').next().unwrap());
        if phys.exists() {
            let (h, _) = qr::store::nar::nar_hash_and_size(&phys).unwrap();
            let want = qr::store::hash::parse_sha256(info["narHash"].as_str().unwrap()).unwrap();
            assert_eq!(h, want, "{p}");
        }
    }
    let allowed = allowed_store_entries(&fx);
    for e in std::fs::read_dir(&store_root).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        assert!(
            allowed.contains(&name),
            "{name} in the runner's store\n{}",
            clip(&logs)
        );
    }
    // Up, no panic, memory bounded.
    let serve_log = c.serve_logs();
    assert!(!serve_log.contains("panicked"), "{}", clip(&serve_log));
    let pid = c.serve().pid().expect("serve runs");
    assert!(c.serve.as_mut().unwrap().is_running(), "qr serve exited");
    let rss = peak_rss(pid).expect("VmHWM");
    eprintln!("qr serve peak RSS: {} MiB", rss >> 20);
    assert!(rss < 1 << 30, "qr serve held {} MiB at its peak", rss >> 20);
}

/// The last warnings and errors of a log (at most 40 lines of at most 400 bytes).
fn c_logs_lines(log: &str) -> Vec<&str> {
    let mut v: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
        .map(|l| {
            let mut cut = l.len().min(400);
            while !l.is_char_boundary(cut) {
                cut -= 1;
            }
            &l[..cut]
        })
        .collect();
    let n = v.len();
    v.drain(..n.saturating_sub(40));
    v
}

#[test]
fn fuzz_runner_and_admin_handlers_on_sqlite() {
    fuzz_runner(Backend::Sqlite);
}

#[test]
fn fuzz_runner_and_admin_handlers_on_postgres() {
    fuzz_runner(Backend::Postgres);
}
