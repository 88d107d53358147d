//! `[notify]` webhooks end to end: a receiver in the test (a std `TcpListener` speaking just
//! enough HTTP/1.1), `qr serve` with the local builder, `qr submit` queueing a graph and an
//! evaluation. Checks that
//! - every build started / finished and the evaluation's completion arrive, signed (HMAC-SHA256
//!   of the body, checked here with the `hmac` crate), each event under one key;
//! - the github-status format posts `{state, target_url, description, context}` to the URL of
//!   the job's `meta.repo` / `meta.rev`;
//! - a receiver that refuses connections for a while gets every event once it is back, under the
//!   keys the outbox holds;
//! - `kill -9` of the runner while the receiver stalls an answer loses nothing: after a restart
//!   every event is delivered, and a duplicate carries the same key (and body) as the first.
//!
//! Deadlines are only how long a wait may take before the test gives up, never what it checks.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{Proc, free_port};
use common::qr::{Backend, Qr};
use hmac::{Hmac, Mac};
use serde_json::Value;

const SECRET: &str = "s3cret-for-the-test";
const WAIT: Duration = Duration::from_secs(120);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
    fn header(&self, h: &str) -> &str {
        self.headers.get(h).map_or("", String::as_str)
    }
}

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Answer(u16),
    /// Records the request and never answers (until the mode changes).
    Stall,
}

/// A webhook receiver on a reserved port; not listening until [`Receiver::listen`] (before
/// that, connections are refused).
#[derive(Clone)]
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Got>>>,
    mode: Arc<Mutex<Mode>>,
}

impl Receiver {
    fn new() -> Receiver {
        Receiver {
            port: free_port(),
            got: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Answer(200))),
        }
    }

    fn listen(&self) {
        let l = TcpListener::bind(("127.0.0.1", self.port)).expect("bind the receiver");
        let me = self.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let me = me.clone();
                std::thread::spawn(move || me.handle(s));
            }
        });
    }

    fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap()
    }

    fn handle(&self, mut s: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
        let headers: BTreeMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
        body.truncate(len);
        self.got.lock().unwrap().push(Got {
            path,
            headers,
            body,
        });
        loop {
            match self.mode() {
                Mode::Stall => std::thread::sleep(Duration::from_millis(50)),
                Mode::Answer(code) => {
                    let resp = format!(
                        "HTTP/1.1 {code} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                    );
                    let _ = s.write_all(resp.as_bytes());
                    return;
                }
            }
        }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn wait_for(&self, what: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let t = Instant::now();
        loop {
            let g = self.got();
            if done(&g) {
                return g;
            }
            assert!(
                t.elapsed() < WAIT,
                "the receiver did not get {what}; it got:\n{}",
                g.iter()
                    .map(|x| format!("{} {}", x.path, String::from_utf8_lossy(&x.body)))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn hmac_hex(body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// A runner with the test's `[notify]`: the qr-format `hook` and the github-status `gh`.
struct Setup {
    qr: Qr,
    rx: Receiver,
    config: PathBuf,
    grpc: u16,
    serves: usize,
}

impl Setup {
    fn new(backend: Backend, timeout_s: f64) -> Option<Setup> {
        let qr = Qr::new(backend, false)?;
        let rx = Receiver::new();
        let token = qr.state_dir().join("gh-token");
        std::fs::write(&token, "tok-123\n").unwrap();
        let config = qr.state_dir().join("notify.toml");
        std::fs::write(
            &config,
            format!(
                r#"[notify]
poll_interval_s = 0.1
retry_base_s = 0.2
retry_max_s = 1.0
timeout_s = {timeout_s}
drain_timeout_s = 1.0

[[notify.webhooks]]
name = "hook"
url = "http://127.0.0.1:{port}/hook"
secret = "{SECRET}"

[[notify.webhooks]]
name = "gh"
url = "http://127.0.0.1:{port}/repos/{{repo}}/statuses/{{rev}}"
format = "github-status"
token_file = "{token}"
target_url = "http://qr.example/build/{{build}}"
"#,
                port = rx.port,
                token = token.display()
            ),
        )
        .unwrap();
        Some(Setup {
            qr,
            rx,
            config,
            grpc: free_port(),
            serves: 0,
        })
    }

    fn command(&self) -> std::process::Command {
        let mut c = self.qr.command();
        c.env("QR_CONFIG", &self.config).env("QR_HTTP_LISTEN", "");
        c
    }

    fn serve(&mut self) -> Proc {
        self.serves += 1;
        let mut c = self.command();
        c.args(["serve", "--listen", &format!("127.0.0.1:{}", self.grpc)]);
        let log = self
            .qr
            .state_dir()
            .join(format!("serve-{}.log", self.serves));
        let p = Proc::spawn("serve", c, log);
        assert!(
            p.wait_log("listening on", WAIT),
            "qr serve did not start:\n{}",
            p.log_text()
        );
        p
    }

    /// `qr submit ARGS… --wait --json`: the builds it printed.
    fn submit(&self, args: &[&str]) -> Vec<Value> {
        let out = self
            .command()
            .arg("submit")
            .args(args)
            .args(["--wait", "--json", "--timeout", "120"])
            .output()
            .expect("qr submit");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "qr submit {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// The diamond graph, queued and built.
    fn submit_graph(&self) -> Vec<Value> {
        let graph = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/diamond.json");
        self.submit(&[graph.to_str().unwrap()])
    }

    /// One evaluation of the top drv with `meta.repo`/`rev`, in jobset `ev` (a new build).
    fn submit_eval(&self, drv: &str) -> Vec<Value> {
        let line = serde_json::json!({"attr": "top", "drvPath": drv,
            "meta": {"repo": "o/r", "rev": "abc123"}});
        let f = self.qr.state_dir().join("jobs.jsonl");
        std::fs::write(&f, format!("{line}\n")).unwrap();
        self.submit(&["--eval-jobs", f.to_str().unwrap(), "--jobset", "ev"])
    }

    /// The outbox, or nothing when the database was never created.
    fn outbox_if_any(&self) -> Vec<qr::db::OutboxRow> {
        match self.qr.db_url.strip_prefix("sqlite://") {
            Some(p) if !Path::new(p).exists() => vec![],
            _ => self.outbox(),
        }
    }

    fn outbox(&self) -> Vec<qr::db::OutboxRow> {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let db = qr::db::Db::connect(&self.qr.db_url, 2).await.expect("db");
            db.outbox().await.expect("outbox")
        })
    }

    /// Waits until every outbox row is delivered; the rows.
    fn wait_all_delivered(&self) -> Vec<qr::db::OutboxRow> {
        let t = Instant::now();
        loop {
            let rows = self.outbox();
            if !rows.is_empty() && rows.iter().all(|r| r.delivered_at.is_some()) {
                return rows;
            }
            assert!(t.elapsed() < WAIT, "undelivered rows left: {rows:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The qr-format requests: each signed, its headers agreeing with its body.
fn hook_requests(got: &[Got]) -> Vec<(String, Value)> {
    got.iter()
        .filter(|g| g.path == "/hook")
        .map(|g| {
            assert_eq!(
                g.header("x-qr-signature-256"),
                hmac_hex(&g.body),
                "bad signature on {}",
                String::from_utf8_lossy(&g.body)
            );
            let v = g.json();
            assert_eq!(g.header("x-qr-delivery"), v["delivery"], "{v}");
            assert_eq!(g.header("x-qr-event"), v["event"], "{v}");
            assert_eq!(g.header("content-type"), "application/json");
            (g.header("x-qr-delivery").to_string(), v)
        })
        .collect()
}

/// (event, build or eval id) of a qr body.
fn subject(v: &Value) -> (String, i64) {
    let id = match v["event"].as_str() {
        Some("eval_completed") => v["eval"]["eval"].as_i64(),
        _ => v["build"]["id"].as_i64(),
    };
    (
        v["event"].as_str().unwrap_or("").to_string(),
        id.unwrap_or(-1),
    )
}

/// Every key names one subject and is always sent (to one webhook: the key names the event, so
/// two webhooks get the same one) with the same body; one key per subject.
fn check_keys_stable(got: &[Got]) -> BTreeMap<(String, i64), String> {
    let mut by_key: BTreeMap<(bool, String), Vec<u8>> = BTreeMap::new();
    for g in got {
        let key = (g.path == "/hook", g.header("x-qr-delivery").to_string());
        assert!(!key.1.is_empty(), "a request without X-Qr-Delivery: {g:?}");
        if let Some(first) = by_key.get(&key) {
            assert_eq!(
                String::from_utf8_lossy(first),
                String::from_utf8_lossy(&g.body),
                "key {key:?} was sent again with another body"
            );
        }
        by_key.insert(key, g.body.clone());
    }
    let mut by_subject: BTreeMap<(String, i64), String> = BTreeMap::new();
    for (key, v) in hook_requests(got) {
        let s = subject(&v);
        if let Some(k) = by_subject.get(&s) {
            assert_eq!(k, &key, "{s:?} was announced under two keys");
        }
        by_subject.insert(s, key);
    }
    by_subject
}

fn ids(builds: &[Value]) -> Vec<i64> {
    builds.iter().filter_map(|b| b["id"].as_i64()).collect()
}

fn every_event_arrives_signed(backend: Backend) {
    let Some(mut s) = Setup::new(backend, 10.0) else {
        return;
    };
    s.rx.listen();
    let _serve = s.serve();
    let graph = s.submit_graph();
    let built = ids(&graph);
    assert!(!built.is_empty());
    let drv = graph[0]["drvPath"].as_str().expect("drvPath").to_string();
    let eval = s.submit_eval(&drv);
    let eval_build = ids(&eval)[0];
    assert!(
        !built.contains(&eval_build),
        "the evaluation queued a new build"
    );

    let got = s.rx.wait_for("every event", |g| {
        let subjects: BTreeSet<(String, i64)> = g
            .iter()
            .filter(|x| x.path == "/hook")
            .map(|x| subject(&x.json()))
            .collect();
        built.iter().all(|b| {
            subjects.contains(&("build_started".into(), *b))
                && subjects.contains(&("build_finished".into(), *b))
        }) && subjects.contains(&("build_finished".into(), eval_build))
            && subjects.iter().any(|(e, _)| e == "eval_completed")
            && g.iter()
                .any(|x| x.path.starts_with("/repos/") && x.json()["state"] == "success")
    });
    let subjects = check_keys_stable(&got);
    // The evaluation's event names its job and new build.
    let ev = hook_requests(&got)
        .into_iter()
        .find(|(_, v)| v["event"] == "eval_completed")
        .map(|(_, v)| v)
        .expect("eval_completed");
    assert_eq!(ev["eval"]["jobset"], "ev");
    assert_eq!(ev["eval"]["builds"][0]["build"], eval_build);
    assert_eq!(ev["eval"]["builds"][0]["isNew"], true);
    // A finished build's event carries its status.
    for (_, v) in hook_requests(&got) {
        if v["event"] == "build_finished" {
            assert_eq!(v["build"]["status"], 0, "{v}");
            assert_eq!(v["build"]["statusName"], "Success", "{v}");
        }
    }
    // The github-status body, for the job with meta.repo/rev only (the graph's builds have none).
    let gh: Vec<&Got> = got
        .iter()
        .filter(|g| g.path.starts_with("/repos/"))
        .collect();
    for g in &gh {
        assert_eq!(g.path, "/repos/o/r/statuses/abc123");
        assert_eq!(g.header("authorization"), "Bearer tok-123");
    }
    let finished = gh
        .iter()
        .map(|g| g.json())
        .find(|v| v["state"] == "success")
        .expect("a success status");
    assert_eq!(
        finished,
        serde_json::json!({
            "state": "success",
            "description": format!("build {eval_build}: Success"),
            "context": "qr/top",
            "target_url": format!("http://qr.example/build/{eval_build}"),
        })
    );
    // Every outbox row is delivered (the graph's builds were skipped by `gh`: no meta), under the
    // keys received.
    let rows = s.wait_all_delivered();
    let received: BTreeSet<String> = got
        .iter()
        .map(|g| g.header("x-qr-delivery").to_string())
        .collect();
    for r in &rows {
        let skipped = r
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("skipped:"));
        match r.webhook.as_str() {
            "gh" if r.build != Some(qr::db::types::BuildId(eval_build)) => {
                assert!(
                    skipped,
                    "a github-status row without meta was not skipped: {r:?}"
                )
            }
            _ => assert!(
                received.contains(&r.key) && !skipped,
                "row {r:?} was not received"
            ),
        }
    }
    assert_eq!(
        rows.iter().filter(|r| r.webhook == "hook").count(),
        subjects.len(),
        "one row per event for the qr webhook"
    );
}

#[test]
fn every_event_arrives_signed_sqlite() {
    every_event_arrives_signed(Backend::Sqlite);
}

#[test]
fn every_event_arrives_signed_postgres() {
    every_event_arrives_signed(Backend::Postgres);
}

#[test]
fn a_receiver_down_for_a_while_gets_every_event_when_it_is_back() {
    let Some(mut s) = Setup::new(Backend::Sqlite, 10.0) else {
        return;
    };
    let _serve = s.serve();
    // Nothing listens on the receiver's port: every attempt is refused.
    let built = ids(&s.submit_graph());
    let t = Instant::now();
    loop {
        let rows = s.outbox();
        let hook: Vec<_> = rows.iter().filter(|r| r.webhook == "hook").collect();
        if hook.len() >= 2 * built.len() && hook.iter().all(|r| r.attempts >= 2) {
            assert!(hook.iter().all(|r| r.delivered_at.is_none()));
            assert!(hook.iter().all(|r| r.last_error.is_some()), "{hook:#?}");
            break;
        }
        assert!(t.elapsed() < WAIT, "no retries recorded: {rows:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.rx.listen();
    let rows = s.wait_all_delivered();
    let got = s.rx.got();
    check_keys_stable(&got);
    let received: BTreeSet<&str> = got.iter().map(|g| g.header("x-qr-delivery")).collect();
    for r in rows.iter().filter(|r| r.webhook == "hook") {
        assert!(received.contains(r.key.as_str()), "{r:?} not received");
    }
    for b in built {
        for e in ["build_started", "build_finished"] {
            assert!(
                hook_requests(&got)
                    .iter()
                    .any(|(_, v)| subject(v) == (e.to_string(), b)),
                "{e} of build {b} missing"
            );
        }
    }
}

fn kill9_during_delivery_loses_nothing(backend: Backend) {
    // A long timeout: the stalled delivery is still waiting for its answer when the runner dies.
    let Some(mut s) = Setup::new(backend, 300.0) else {
        return;
    };
    s.rx.set_mode(Mode::Stall);
    s.rx.listen();
    let mut serve = s.serve();
    let built = ids(&s.submit_graph());
    let stalled = s.rx.wait_for("a delivery to stall", |g| !g.is_empty());
    let first_key = stalled[0].header("x-qr-delivery").to_string();
    serve.kill(); // SIGKILL
    assert!(
        s.outbox()
            .iter()
            .any(|r| r.key == first_key && r.delivered_at.is_none()),
        "the stalled delivery is still undelivered after the kill"
    );
    s.rx.set_mode(Mode::Answer(200));
    let _serve = s.serve();
    let rows = s.wait_all_delivered();
    let got = s.rx.got();
    check_keys_stable(&got);
    let sent: Vec<&str> = got.iter().map(|g| g.header("x-qr-delivery")).collect();
    assert!(
        sent.iter().filter(|k| **k == first_key).count() >= 2,
        "the delivery cut by the kill was sent again, with its key {first_key}"
    );
    for r in rows.iter().filter(|r| r.webhook == "hook") {
        assert!(sent.contains(&r.key.as_str()), "{r:?} not received");
    }
    for b in built {
        assert!(
            hook_requests(&got)
                .iter()
                .any(|(_, v)| subject(v) == ("build_finished".to_string(), b)),
            "build_finished of {b} missing"
        );
    }
}

#[test]
fn kill9_during_delivery_loses_nothing_sqlite() {
    kill9_during_delivery_loses_nothing(Backend::Sqlite);
}

#[test]
fn kill9_during_delivery_loses_nothing_postgres() {
    kill9_during_delivery_loses_nothing(Backend::Postgres);
}

#[test]
fn qr_run_delivers_its_events_before_it_exits() {
    let Some(s) = Setup::new(Backend::Sqlite, 10.0) else {
        return;
    };
    s.rx.listen();
    let graph = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/diamond.json");
    let out = s
        .command()
        .args(["run", "--json", graph.to_str().unwrap()])
        .output()
        .expect("qr run");
    assert!(
        out.status.success(),
        "qr run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let builds: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    // Already there when it exited: no waiting.
    let got = s.rx.got();
    check_keys_stable(&got);
    for b in ids(&builds) {
        for e in ["build_started", "build_finished"] {
            assert!(
                hook_requests(&got)
                    .iter()
                    .any(|(_, v)| subject(v) == (e.to_string(), b)),
                "{e} of build {b} not delivered before qr run exited"
            );
        }
    }
    assert_eq!(
        s.outbox()
            .iter()
            .filter(|r| r.delivered_at.is_none())
            .count(),
        0
    );
}

#[test]
fn a_bad_webhook_stops_the_runner_at_start_with_a_clear_message() {
    let Some(s) = Setup::new(Backend::Sqlite, 10.0) else {
        return;
    };
    std::fs::write(
        &s.config,
        "[[notify.webhooks]]\nurl = \"http://127.0.0.1:9/h\"\nevents = [\"build_done\"]\n",
    )
    .unwrap();
    for cmd in [&["serve"][..], &["run", "/nonexistent.drv"][..]] {
        let out = s.command().args(cmd).output().expect("qr");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} started");
        assert!(
            err.contains("[[notify.webhooks]] #1") && err.contains("build_done"),
            "{cmd:?}: {err}"
        );
    }
    assert!(s.outbox_if_any().is_empty());
}
