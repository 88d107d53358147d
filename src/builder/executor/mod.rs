//! Executors: what actually runs a derivation's builder.
//!
//! [`NativeExecutor`] builds a derivation into a [`crate::store::LocalStore`] the way Nix does,
//! with no Nix installed (see `native.rs`).

pub mod builtins;
pub mod env;
pub mod export_refs;
pub mod log;
mod native;
pub mod nix;
pub mod output_checks;
pub mod sandbox;
mod spawn;
pub mod structured_attrs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::store::{PathInfo, StoreError};

pub use native::NativeExecutor;

/// Static configuration of a [`NativeExecutor`].
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Where build directories are created (one per build, removed afterwards).
    pub build_dir_base: PathBuf,
    /// Where build logs are written (`<drv base name>.<random>.log`).
    pub log_dir: PathBuf,
    /// Largest log a build may write (the build fails as LogLimitExceeded beyond it).
    pub max_log_bytes: u64,
    /// Kill a build that writes nothing for this long.
    pub max_silent: Option<Duration>,
    /// Kill a build that runs longer than this.
    pub timeout: Option<Duration>,
    /// `NIX_BUILD_CORES`.
    pub cores: usize,
    /// Systems this executor builds for (e.g. `x86_64-linux`).
    pub systems: Vec<String>,
    /// Host directories visible read-only in the sandbox: (path inside, path here). Missing
    /// ones are skipped. Only used when the store needs a namespace.
    pub sandbox_paths: Vec<(String, PathBuf)>,
}

impl ExecutorConfig {
    /// Defaults under `state_dir` (`builds/`, `logs/`), 64 MiB logs, no time limits, all cores,
    /// this machine's system, and `/bin`, `/usr`, `/lib`, `/lib64` in the sandbox.
    pub fn new(state_dir: &Path) -> Self {
        ExecutorConfig {
            build_dir_base: state_dir.join("builds"),
            log_dir: state_dir.join("logs"),
            max_log_bytes: 64 << 20,
            max_silent: None,
            timeout: None,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            systems: vec![crate::config::this_system()],
            sandbox_paths: ["/bin", "/usr", "/lib", "/lib64"]
                .iter()
                .map(|p| (p.to_string(), PathBuf::from(p)))
                .collect(),
        }
    }

    /// From the configuration: `[store] max_log_bytes`, `[scheduler] max_silent_time_s` and
    /// `build_timeout_s` (0 = no limit), `[local_builder] systems`.
    pub fn from_config(cfg: &crate::config::Config, state_dir: &Path) -> Self {
        let mut c = Self::new(state_dir);
        c.max_log_bytes = cfg.store.max_log_bytes;
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        c.max_silent = secs(cfg.scheduler.max_silent_time_s);
        c.timeout = secs(cfg.scheduler.build_timeout_s);
        if !cfg.local_builder.systems.is_empty() {
            c.systems = cfg.local_builder.systems.clone();
        }
        c
    }
}

/// Per-build limits; each overrides the executor's configuration when set (e.g. from the
/// derivation's `meta.maxSilent`/`meta.timeout` or the jobset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_silent: Option<Duration>,
    pub timeout: Option<Duration>,
    pub max_log_bytes: Option<u64>,
}

/// A successful build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    /// Output name → the registered path's info (deriver = the built drv).
    pub outputs: BTreeMap<String, PathInfo>,
    /// The build log (`None` if nothing ran because every output was already valid).
    pub log_path: Option<PathBuf>,
    pub duration: Duration,
    /// False if every output was already valid, so the builder did not run.
    pub ran: bool,
}

/// A failed build. [`ExecError::status`] gives Hydra's build status code and
/// [`ExecError::is_transient`] tells machine trouble (retry elsewhere/later) from the builder's
/// own failure.
#[derive(Debug, Error)]
pub enum ExecError {
    /// The builder exited non-zero or was killed by a signal (the message ends with the log tail).
    #[error("{message}")]
    Failed {
        message: String,
        log_tail: Vec<String>,
    },
    /// Build timeout or max-silent-time.
    #[error("{message}")]
    TimedOut {
        message: String,
        log_tail: Vec<String>,
    },
    #[error("{message}")]
    LogLimitExceeded { message: String },
    /// The builder exited 0 but its outputs are unacceptable: missing, a fixed-output hash
    /// mismatch, references from a fixed output, writes outside its outputs, a cycle, a
    /// violated reference or size check (`allowedReferences`, `outputChecks`, …).
    #[error("{message}")]
    OutputRejected { message: String },
    /// A system or builder this executor cannot run.
    #[error("{message}")]
    Unsupported { message: String },
    /// The derivation cannot be built as given (unresolved inputs, a path mismatch, …).
    #[error("{message}")]
    BadDerivation { message: String },
    /// The private mount namespace could not be set up.
    #[error("{message}")]
    Sandbox { message: String },
    #[error("{message}")]
    Cancelled { message: String },
    /// Local I/O trouble (disk full, missing input, …).
    #[error("{message}")]
    Io { message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ExecError {
    /// Hydra's build status: 1 Failed, 3 Aborted, 4 Cancelled, 7 TimedOut, 9 Unsupported,
    /// 10 LogLimitExceeded.
    pub fn status(&self) -> i32 {
        match self {
            ExecError::Failed { .. }
            | ExecError::OutputRejected { .. }
            | ExecError::BadDerivation { .. } => 1,
            ExecError::TimedOut { .. } => 7,
            ExecError::LogLimitExceeded { .. } => 10,
            ExecError::Unsupported { .. } => 9,
            ExecError::Cancelled { .. } => 4,
            ExecError::Sandbox { .. } | ExecError::Io { .. } | ExecError::Store(_) => 3,
        }
    }

    /// True for trouble of this machine rather than of the build (worth retrying).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ExecError::Sandbox { .. } | ExecError::Io { .. } | ExecError::Store(_)
        )
    }

    /// The last log lines, for failures that have them.
    pub fn log_tail(&self) -> &[String] {
        match self {
            ExecError::Failed { log_tail, .. } | ExecError::TimedOut { log_tail, .. } => log_tail,
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_and_status_codes() {
        let mut cfg = crate::config::Config::default();
        cfg.scheduler.max_silent_time_s = 0;
        cfg.scheduler.build_timeout_s = 5;
        cfg.store.max_log_bytes = 10;
        let c = ExecutorConfig::from_config(&cfg, Path::new("/state"));
        assert_eq!(c.max_silent, None);
        assert_eq!(c.timeout, Some(Duration::from_secs(5)));
        assert_eq!(c.max_log_bytes, 10);
        assert_eq!(c.build_dir_base, Path::new("/state/builds"));
        assert_eq!(c.systems, vec![crate::config::this_system()]);
        let m = |message: &str| message.to_string();
        let cases = [
            (
                ExecError::Failed {
                    message: m("x"),
                    log_tail: vec![],
                },
                1,
                false,
            ),
            (
                ExecError::TimedOut {
                    message: m("x"),
                    log_tail: vec![],
                },
                7,
                false,
            ),
            (ExecError::LogLimitExceeded { message: m("x") }, 10, false),
            (ExecError::OutputRejected { message: m("x") }, 1, false),
            (ExecError::Unsupported { message: m("x") }, 9, false),
            (ExecError::Cancelled { message: m("x") }, 4, false),
            (ExecError::Sandbox { message: m("x") }, 3, true),
            (ExecError::Io { message: m("x") }, 3, true),
        ];
        for (e, status, transient) in cases {
            assert_eq!((e.status(), e.is_transient()), (status, transient), "{e:?}");
        }
    }
}
