//! Running the real `qr` binary against a fresh state dir, on SQLite or a fresh PostgreSQL database.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One runner's state: a temp state dir (store, SQLite file, ledger) and its database.
pub struct Qr {
    pub state: tempfile::TempDir,
    pub db_url: String,
    pub nix_paths: bool,
    pg: Option<(String, String)>,
}

fn pg_base() -> String {
    std::env::var("QR_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn psql(url: &str, sql: &str) -> Result<(), String> {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Qr {
    /// A fresh runner; `None` (saying why) when PostgreSQL is wanted but unreachable outside CI.
    /// `nix_paths`: logical store dir `/nix/store` over a temp root (builds run in a mount namespace).
    pub fn new(backend: Backend, nix_paths: bool) -> Option<Qr> {
        let state = tempfile::tempdir().expect("temp dir");
        let (db_url, pg) = match backend {
            Backend::Sqlite => (format!("sqlite://{}/qr.db", state.path().display()), None),
            Backend::Postgres => {
                let base = pg_base();
                let name = format!("qr_scn_{}_{}", std::process::id(), rand_suffix());
                if let Err(e) = psql(&base, &format!("create database {name}")) {
                    if std::env::var_os("CI").is_some() {
                        panic!("PostgreSQL not reachable at {base} ({e}), and CI is set");
                    }
                    eprintln!("PostgreSQL not reachable at {base}: PostgreSQL half skipped ({e})");
                    return None;
                }
                let url = match base.rsplit_once('/') {
                    Some((prefix, _)) => format!("{prefix}/{name}"),
                    None => base.clone(),
                };
                (url, Some((base, name)))
            }
        };
        Some(Qr {
            state,
            db_url,
            nix_paths,
            pg,
        })
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qr"));
        c.arg("--state-dir").arg(self.state.path());
        c.env("QR_DATABASE_URL", &self.db_url);
        c.env("QR_SCHEDULER_RETRY_INTERVAL_S", "0.2");
        c.env_remove("QR_CRASH_AT");
        if self.nix_paths {
            c.env("QR_STORE_DIR", "/nix/store");
            c.env("QR_STORE_ROOT", self.state.path().join("nix-store"));
        }
        c
    }

    pub fn run(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut c = self.command();
        c.args(args);
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().expect("running qr")
    }

    /// `qr run --json TARGETS…`: the exit status and one JSON object per build.
    pub fn run_json(&self, targets: &[&Path], envs: &[(&str, &str)]) -> (Output, Vec<Value>) {
        let mut args = vec!["run".to_string(), "--json".to_string()];
        args.extend(targets.iter().map(|p| p.display().to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.run(&argv, envs);
        let builds = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("a JSON build line"))
            .collect();
        (out, builds)
    }

    /// Drv paths the executor completed, one per run, across every process of this runner.
    pub fn runs(&self) -> Vec<String> {
        std::fs::read_to_string(self.state.path().join("runs.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn write_json(&self, name: &str, v: &Value) -> PathBuf {
        let p = self.state.path().join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).expect("json")).expect("write json");
        p
    }
}

impl Drop for Qr {
    fn drop(&mut self) {
        if let Some((base, name)) = &self.pg {
            let _ = psql(
                base,
                &format!("drop database if exists {name} with (force)"),
            );
        }
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() % 1_000_000_000
}

/// Every step of every build.
pub fn all_steps(builds: &[Value]) -> Vec<(i64, Value)> {
    builds
        .iter()
        .flat_map(|b| {
            let id = b["id"].as_i64().unwrap_or(0);
            b["steps"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |s| (id, s))
        })
        .collect()
}
