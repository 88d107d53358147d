//! The nix executor: builds by calling a real Nix (`nix-store --realise`), into a Nix store of its
//! own (local, a chroot store, or the daemon: `--store`), and brings the outputs Nix produced into
//! the builder's store.
//!
//! 1. The input closure (in the builder's store, fetched from the runner) and the resolved drv are
//!    added to Nix's store with `nix-store --import` (Nix's export format, written here), only the
//!    paths Nix does not have yet.
//! 2. `nix-store --realise <drv>` builds it; its stderr is the build log.
//! 3. Each output Nix produced is described by `nix path-info --json` (narHash, narSize,
//!    references, ca) and copied with `nix store dump-path` into the builder's store, which checks the
//!    NAR hash. The runner checks everything again when the outputs are uploaded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use crate::actors::machine::{Built, ExecFailure, Executor, Job};
use crate::actors::types::Status;
use crate::store::hash::parse_sha256;
use crate::store::path::output_path_name;
use crate::store::{LocalStore, PathInfo, Store};

/// How the nix executor calls Nix.
#[derive(Debug, Clone)]
pub struct NixConfig {
    /// `--store` for every Nix command (e.g. `daemon`, `/some/root`); `None`: Nix's configuration.
    pub store_uri: Option<String>,
    pub systems: Vec<String>,
    /// Where build logs are written (`<drv base name>.nix-….log`).
    pub log_dir: PathBuf,
}

pub struct NixExecutor {
    store: Arc<LocalStore>,
    cfg: NixConfig,
}

const EXPORT_MAGIC: u64 = 0x4558_494e;

fn write_u64(w: &mut Vec<u8>, n: u64) {
    w.extend_from_slice(&n.to_le_bytes());
}

fn write_str(w: &mut Vec<u8>, s: &[u8]) {
    write_u64(w, s.len() as u64);
    w.extend_from_slice(s);
    let pad = (8 - s.len() % 8) % 8;
    w.extend_from_slice(&[0u8; 8][..pad]);
}

/// One path in Nix's export format (`nix-store --export`): 1, the NAR, the magic, the path, its
/// references, its deriver, no signature.
pub fn export_entry(out: &mut Vec<u8>, info: &PathInfo, nar: &[u8]) {
    write_u64(out, 1);
    out.extend_from_slice(nar);
    write_u64(out, EXPORT_MAGIC);
    write_str(out, info.path.as_bytes());
    write_u64(out, info.references.len() as u64);
    for r in &info.references {
        write_str(out, r.as_bytes());
    }
    write_str(out, info.deriver.as_deref().unwrap_or("").as_bytes());
    write_u64(out, 0);
}

fn fail(message: impl Into<String>) -> ExecFailure {
    ExecFailure {
        status: Status::Aborted,
        message: message.into(),
        transient: true,
    }
}

impl NixExecutor {
    pub fn new(store: Arc<LocalStore>, cfg: NixConfig) -> Self {
        NixExecutor { store, cfg }
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(program);
        if program == "nix" {
            c.args([
                "--extra-experimental-features",
                "nix-command ca-derivations",
            ]);
        }
        if let Some(s) = &self.cfg.store_uri {
            c.args(["--store", s]);
        }
        c.stdin(Stdio::null());
        c.kill_on_drop(true);
        c
    }

    /// Runs a command; stdout on success.
    async fn output(
        &self,
        mut c: tokio::process::Command,
        what: &str,
    ) -> Result<Vec<u8>, ExecFailure> {
        let out = c
            .output()
            .await
            .map_err(|e| fail(format!("running {what}: {e}")))?;
        if !out.status.success() {
            return Err(fail(format!(
                "{what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out.stdout)
    }

    /// The paths among `paths` that Nix's store does not have.
    async fn invalid_in_nix(&self, paths: &[String]) -> Result<BTreeSet<String>, ExecFailure> {
        if paths.is_empty() {
            return Ok(BTreeSet::new());
        }
        let mut c = self.command("nix-store");
        c.args(["--check-validity", "--print-invalid"]).args(paths);
        let out = self.output(c, "nix-store --check-validity").await?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Adds paths of the builder's store (references first) to Nix's store.
    async fn import_into_nix(&self, infos: &[PathInfo]) -> Result<(), ExecFailure> {
        if infos.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let infos2 = infos.to_vec();
        let data = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for i in &infos2 {
                let mut nar = Vec::new();
                store
                    .export_nar(&i.path, &mut nar)
                    .map_err(|e| fail(format!("exporting {}: {e}", i.path)))?;
                export_entry(&mut out, i, &nar);
            }
            write_u64(&mut out, 0);
            Ok::<_, ExecFailure>(out)
        })
        .await
        .map_err(|e| fail(e.to_string()))??;
        let mut c = self.command("nix-store");
        c.arg("--import")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .map_err(|e| fail(format!("running nix-store --import: {e}")))?;
        let mut stdin = child.stdin.take().ok_or_else(|| fail("no stdin"))?;
        let writer = tokio::spawn(async move {
            let r = stdin.write_all(&data).await;
            drop(stdin);
            r
        });
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| fail(format!("nix-store --import: {e}")))?;
        let _ = writer.await;
        if !out.status.success() {
            return Err(fail(format!(
                "nix-store --import failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// What Nix knows about a valid path.
    async fn nix_path_info(&self, path: &str) -> Result<PathInfo, ExecFailure> {
        let mut c = self.command("nix");
        c.args(["path-info", "--json", path]);
        let out = self.output(c, "nix path-info").await?;
        let v: serde_json::Value =
            serde_json::from_slice(&out).map_err(|e| fail(format!("nix path-info --json: {e}")))?;
        let o = v
            .as_array()
            .and_then(|a| a.first())
            .or_else(|| v.as_object().and_then(|m| m.values().next()))
            .ok_or_else(|| fail(format!("nix path-info --json: nothing for {path}")))?;
        let s = |k: &str| o.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let nar_hash = parse_sha256(&s("narHash").unwrap_or_default())
            .map_err(|e| fail(format!("{path}: narHash: {e}")))?;
        Ok(PathInfo {
            path: path.to_string(),
            nar_hash,
            nar_size: o.get("narSize").and_then(|x| x.as_u64()).unwrap_or(0),
            references: o
                .get("references")
                .and_then(|x| x.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            ca: s("ca"),
            deriver: s("deriver"),
        })
    }

    /// Copies a path from Nix's store into the builder's (NAR hash checked).
    async fn copy_from_nix(&self, info: PathInfo) -> Result<(), ExecFailure> {
        if self.store.is_valid_path(&info.path).await.unwrap_or(false) {
            return Ok(());
        }
        // Through the store (`nix-store --dump` would read the logical path from the file system,
        // which is wrong for a store whose files are elsewhere).
        let mut c = self.command("nix");
        c.args(["store", "dump-path", &info.path]);
        let nar = self.output(c, "nix store dump-path").await?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.import_nar(&info, &mut nar.as_slice()))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(format!("importing Nix's output: {e}")))
    }
}

fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[async_trait]
impl Executor for NixExecutor {
    async fn execute(&self, job: Job) -> Result<Built, ExecFailure> {
        let drv = &job.drv;
        if !self.cfg.systems.contains(&drv.system) {
            return Err(ExecFailure {
                status: Status::Unsupported,
                message: format!(
                    "{} is for {}; this builder builds for {}",
                    job.drv_path,
                    drv.system,
                    self.cfg.systems.join(", ")
                ),
                transient: false,
            });
        }
        // The drv into the builder's store (checks that its contents give its path).
        let added = self
            .store
            .add_derivation(drv)
            .await
            .map_err(|e| fail(format!("adding {}: {e}", job.drv_path)))?;
        if added != job.drv_path {
            return Err(ExecFailure {
                status: Status::Failed,
                message: format!("{} has contents of {added}", job.drv_path),
                transient: false,
            });
        }
        // Its closure, and the outputs of its input drvs (built already), into Nix's store.
        let mut roots = vec![job.drv_path.clone()];
        for (input, wanted) in &drv.input_drvs {
            let idrv = self
                .store
                .read_derivation(input)
                .await
                .map_err(|e| fail(format!("{input}: {e}")))?;
            for o in wanted {
                match idrv.outputs.get(o).and_then(|x| x.path()) {
                    Some(p) => roots.push(p.to_string()),
                    None => {
                        return Err(ExecFailure {
                            status: Status::Failed,
                            message: format!(
                                "{} must be resolved before it is built",
                                job.drv_path
                            ),
                            transient: false,
                        });
                    }
                }
            }
        }
        let closure = self
            .store
            .closure(roots.iter().map(String::as_str))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let all: Vec<String> = closure.into_iter().collect();
        let missing = self.invalid_in_nix(&all).await?;
        let mut infos = Vec::new();
        for p in &missing {
            match self.store.query_path_info(p).await {
                Ok(Some(i)) => infos.push(i),
                _ => return Err(fail(format!("{p} is not valid in the builder's store"))),
            }
        }
        self.import_into_nix(&crate::grpc::references_first(infos))
            .await?;

        // Build.
        std::fs::create_dir_all(&self.cfg.log_dir)
            .map_err(|e| fail(format!("{}: {e}", self.cfg.log_dir.display())))?;
        let base = job.drv_path.rsplit('/').next().unwrap_or("drv").to_string();
        let (log, log_path) = tempfile::Builder::new()
            .prefix(&format!("{base}.nix-"))
            .suffix(".log")
            .tempfile_in(&self.cfg.log_dir)
            .map_err(|e| fail(format!("creating a log file: {e}")))?
            .keep()
            .map_err(|e| fail(e.to_string()))?;
        let mut c = self.command("nix-store");
        c.args(["--realise", &job.drv_path]);
        let limit = Duration::from_secs(10 * 365 * 86400);
        if job.max_silent < limit {
            c.args([
                "--option",
                "max-silent-time",
                &job.max_silent.as_secs().to_string(),
            ]);
        }
        if job.timeout < limit {
            c.args(["--option", "timeout", &job.timeout.as_secs().to_string()]);
        }
        c.stdout(Stdio::piped()).stderr(Stdio::from(log));
        // (`output()` would capture stderr instead of writing it to the log)
        let out = c
            .spawn()
            .map_err(|e| fail(format!("running nix-store --realise: {e}")))?
            .wait_with_output()
            .await
            .map_err(|e| fail(format!("running nix-store --realise: {e}")))?;
        let tail = log_tail(&log_path, 25);
        if !out.status.success() {
            let status = if tail.contains("timed out") {
                Status::TimedOut
            } else {
                Status::Failed
            };
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&log_path)
                .ok();
            if let Some(f) = &mut f {
                let _ = writeln!(f, "nix-store --realise exited with {}", out.status);
            }
            return Err(ExecFailure {
                status,
                message: format!("nix-store --realise {} failed:\n{tail}", job.drv_path),
                transient: false,
            });
        }
        let ran = std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("building '");

        // Outputs: by name, from the paths Nix printed.
        let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        let sd = self.store.store_dir().clone();
        let mut outputs = BTreeMap::new();
        for name in drv.outputs.keys() {
            let want = output_path_name(&drv.name, name);
            let path = match drv.outputs[name].path() {
                Some(p) => p.to_string(),
                None => printed
                    .iter()
                    .find(|p| sd.parse(p).is_ok_and(|sp| sp.name() == want))
                    .cloned()
                    .ok_or_else(|| fail(format!("Nix printed no path for output {name}")))?,
            };
            outputs.insert(name.clone(), path);
        }
        let mut infos = Vec::new();
        for p in outputs.values() {
            infos.push(self.nix_path_info(p).await?);
        }
        for i in crate::grpc::references_first(infos) {
            self.copy_from_nix(i).await?;
        }
        Ok(Built { outputs, ran })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_format() {
        let info = PathInfo {
            path: "/nix/store/abc-x".into(),
            nar_hash: [0; 32],
            nar_size: 8,
            references: ["/nix/store/def-y".to_string()].into(),
            ca: None,
            deriver: None,
        };
        let mut out = Vec::new();
        export_entry(&mut out, &info, b"NARBYTES");
        let mut want = Vec::new();
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(b"NARBYTES");
        want.extend_from_slice(&EXPORT_MAGIC.to_le_bytes());
        want.extend_from_slice(&16u64.to_le_bytes());
        want.extend_from_slice(b"/nix/store/abc-x");
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&16u64.to_le_bytes());
        want.extend_from_slice(b"/nix/store/def-y");
        want.extend_from_slice(&0u64.to_le_bytes()); // empty deriver
        want.extend_from_slice(&0u64.to_le_bytes()); // no signature
        assert_eq!(out, want);
    }
}
