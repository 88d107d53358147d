//! A runner (`qr serve`) and builders (`qr builder`) as separate processes on loopback, for the
//! end-to-end tests of the builder protocol. Everything started is killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::qr::{Backend, Qr};

/// A loopback port reserved for this test process (see [`super::ports`]): no other test takes it
/// between now and the child binding it, nor when a restarted child binds it again.
pub fn free_port() -> u16 {
    super::ports::port()
}

/// A child process whose stderr goes to a file; killed (SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(f));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (true) or `timeout` passes (false).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Number of lines of the log containing every one of `needles`.
    pub fn count_lines(&self, needles: &[&str]) -> usize {
        self.log_text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Some(c) = &mut self.child {
                if let Ok(Some(s)) = c.try_wait() {
                    return Some(s);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The process id, while it has not been killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A builder process and its own state dir (store, runs ledger).
pub struct Builder {
    pub id: String,
    pub state: tempfile::TempDir,
    pub proc: Proc,
}

impl Builder {
    /// Drv paths its executor ran, one per run.
    pub fn runs(&self) -> Vec<String> {
        std::fs::read_to_string(self.state.path().join("runs.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// A runner and the builders dialling it.
pub struct Cluster {
    pub qr: Qr,
    pub port: u16,
    pub token: PathBuf,
    pub serve: Option<Proc>,
    pub serve_env: Vec<(String, String)>,
    /// The dashboard's port (`[http] listen`).
    pub http_port: u16,
    serves: usize,
}

pub const TOKEN: &str = "test-token-9f3c";

impl Cluster {
    /// A runner state (store dir `/nix/store` over a temp root) on `backend`; `None` when
    /// PostgreSQL is wanted and unreachable outside CI.
    pub fn new(backend: Backend) -> Option<Cluster> {
        let qr = Qr::new(backend, true)?;
        let token = qr.state_dir().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
        Some(Cluster {
            qr,
            port: free_port(),
            token,
            serve: None,
            serve_env: vec![],
            http_port: free_port(),
            serves: 0,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `GET path` on the dashboard's port: (status code, content type, body).
    pub fn http_get(&self, path: &str) -> (u16, String, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read");
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let ctype = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type: ")
                    .map(str::to_string)
            })
            .unwrap_or_default();
        (code, ctype, body.to_string())
    }

    /// Starts `qr serve` (no local builder) and waits until it listens.
    pub fn start_serve(&mut self) {
        let mut c = self.qr.command();
        c.args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)]);
        c.env("QR_LOG", "info,h2=warn,tower=warn,hyper=warn")
            .env("QR_GRPC_TOKEN_FILE", &self.token)
            .env("QR_HTTP_LISTEN", format!("127.0.0.1:{}", self.http_port))
            .env("QR_LOCAL_BUILDER_ENABLED", "false")
            .env("QR_DATABASE_RESCAN_INTERVAL_S", "0.2")
            .env("QR_GRPC_HEARTBEAT_INTERVAL_S", "1")
            .env("QR_GRPC_REJOIN_GRACE_S", "20")
            .env("QR_SCHEDULER_UNSUPPORTED_WAIT_S", "120");
        for (k, v) in &self.serve_env {
            c.env(k, v);
        }
        self.serves += 1;
        let log = self
            .qr
            .state_dir()
            .join(format!("serve-{}.log", self.serves));
        let p = Proc::spawn("serve", c, log);
        assert!(
            p.wait_log("listening on", Duration::from_secs(30)),
            "qr serve did not start:\n{}",
            p.log_text()
        );
        self.serve = Some(p);
    }

    pub fn serve(&self) -> &Proc {
        self.serve.as_ref().expect("serve started")
    }

    /// Every serve log so far (a restarted runner writes a new one).
    pub fn serve_logs(&self) -> String {
        (1..=self.serves)
            .map(|i| {
                std::fs::read_to_string(self.qr.state_dir().join(format!("serve-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts `qr builder` with its own state dir and store (`/nix/store` over a temp root).
    pub fn builder(&self, id: &str, args: &[&str], env: &[(&str, &str)]) -> Builder {
        self.builder_with_token(id, &self.token, args, env)
    }

    pub fn builder_with_token(
        &self,
        id: &str,
        token: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Builder {
        self.builder_at(id, &self.url(), token, args, env)
    }

    /// A builder dialling `url`.
    pub fn builder_at(
        &self,
        id: &str,
        url: &str,
        token: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Builder {
        let state = tempfile::tempdir().expect("temp dir");
        let mut c = Command::new(env!("CARGO_BIN_EXE_qr"));
        c.arg("--state-dir").arg(state.path());
        c.env("QR_STORE_DIR", "/nix/store")
            .env("QR_STORE_ROOT", state.path().join("nix-store"))
            .env("QR_LOG", "info,h2=warn,tower=warn,hyper=warn")
            .env_remove("QR_DATABASE_URL")
            .env_remove("QR_BUILDER_FAULT");
        c.args(["builder", "--runner", url, "--token-file"])
            .arg(token)
            .args(["--machine-id", id]);
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let log = state.path().join("builder.log");
        Builder {
            id: id.into(),
            proc: Proc::spawn(id, c, log),
            state,
        }
    }

    /// Waits until the runner says `id` joined (counting joins, so a rejoin can be awaited).
    pub fn wait_joined(&self, id: &str, times: usize, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            let n = self
                .serve_logs()
                .lines()
                .filter(|l| l.contains("builder joined") && l.contains(&format!("machine={id} ")))
                .count();
            if n >= times {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// `qr submit --wait --json` as a child process (the runner may be restarted meanwhile).
    pub fn submit(&self, targets: &[&Path], timeout_s: u64) -> Child {
        let mut c = self.qr.command();
        c.args([
            "submit",
            "--wait",
            "--json",
            "--timeout",
            &timeout_s.to_string(),
        ]);
        c.args(targets);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn().expect("qr submit")
    }

    /// Waits for a submit child; its builds as JSON.
    pub fn finish(&self, child: Child) -> (Output, Vec<Value>) {
        let out = child.wait_with_output().expect("qr submit");
        let builds = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("a JSON build line"))
            .collect();
        (out, builds)
    }

    /// Context for assertion messages: every log.
    pub fn logs(&self, builders: &[&Builder]) -> String {
        let mut s = format!("--- serve ---\n{}", self.serve_logs());
        for b in builders {
            s.push_str(&format!("\n--- {} ---\n{}", b.id, b.proc.log_text()));
        }
        s
    }
}
