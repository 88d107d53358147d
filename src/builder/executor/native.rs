//! The native executor: builds one derivation into a [`LocalStore`] exactly as Nix (2.8 … 2.34)
//! would, with no Nix installed.
//!
//! - Accepted: any derivation that needs no resolution (input-addressed or fixed-output with
//!   input drvs whose outputs are statically known, CA floating without input drvs, resolved
//!   drvs). Inputs are `inputSrcs` plus the input drvs' outputs; all must be valid.
//! - A fresh build dir, Nix's environment ([`super::env`]), CA floating outputs built at their
//!   scratch paths (each `hashPlaceholder(o)` rewritten to it in builder, args and env) and then
//!   finalised with [`finalize_ca_outputs`]; input-addressed and fixed outputs built at their
//!   paths. References are scanned against the input closure and the drv's own outputs, then
//!   checked against the drv's reference and size constraints ([`super::output_checks`]).
//! - Structured attributes ([`super::structured_attrs`]) and `passAsFile` as Nix 2.8 passes them;
//!   `builtin:fetchurl` and `builtin:buildenv` run in this process ([`super::builtins`]);
//!   `builtin:unpack-channel` too; `exportReferencesGraph` as Nix 2.8 provides it
//!   ([`super::export_refs`]).
//! - When the store's physical root differs from its logical dir, the builder runs in a private
//!   mount namespace ([`super::sandbox`]); otherwise directly in the store (no namespace).
//! - The log goes to a file; timeouts, max-silent-time and the log limit kill the whole process
//!   group ([`super::log`]).
//! - Outputs are registered with deriver = the built drv, and a realisation
//!   `DrvOutput{built drv, output}` is recorded for every output (as Nix does with
//!   `ca-derivations`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256, Sha512};

use super::builtins::{Builtin, BuiltinCtx, StoreFs};
use super::env::{builder_env, rewrite};
use super::export_refs::{self, ExportError, Exported};
use super::log::{Outcome, SuperviseLimits, TimeLimit, kill_group, supervise};
use super::output_checks::{OutputCheckError, check_outputs, checks_of};
use super::sandbox::{SANDBOX_BUILD_DIR, Sandbox, SandboxSpec, cloexec_pipe, read_failed_step};
use super::spawn::{Setup, Spawn, spawn};
use super::{BuildResult, ExecError, ExecutorConfig, Limits};
use crate::store::api::{PathInfo, Store};
use crate::store::ca_output::{CaOutputError, ScratchOutput, finalize_ca_outputs, scratch_path};
use crate::store::derivation::{Derivation, DerivationOutput, DerivationType, split_method_algo};
use crate::store::hash::{render_sri, to_hex};
use crate::store::local::{LocalStore, StagedPath, StagingDir, move_tree, remove_tree};
use crate::store::nar::dump_path;
use crate::store::nix32;
use crate::store::path::{StoreDir, StorePath};
use crate::store::placeholder::hash_placeholder;
use crate::store::realisation::DrvOutput;
use crate::store::refscan::hash_and_scan_path;

#[derive(Debug, Default)]
struct Counters {
    total: AtomicU64,
    by_drv: Mutex<HashMap<String, u64>>,
}

impl Counters {
    fn count(&self, drv_path: &str) {
        self.total.fetch_add(1, Ordering::SeqCst);
        *self
            .by_drv
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(drv_path.to_string())
            .or_insert(0) += 1;
    }
}

/// Builds derivations into a [`LocalStore`] (see the module doc).
#[derive(Debug)]
pub struct NativeExecutor {
    store: Arc<LocalStore>,
    cfg: ExecutorConfig,
    counters: Arc<Counters>,
}

#[derive(Debug, Clone)]
enum OutKind {
    InputAddressed,
    Fixed {
        method_algo: String,
        hash: String,
    },
    Floating,
    /// Floating and text-hashed (`text:sha256`, dynamic derivations: an output that is a `.drv`):
    /// one regular file, its path `makeTextPath` over its contents and references.
    Text,
}

/// One output: where the builder writes it (its path, or its scratch path if CA floating).
#[derive(Debug, Clone)]
struct OutPlan {
    name: String,
    kind: OutKind,
    build_path: StorePath,
}

/// Everything the blocking part of a build needs.
#[derive(Debug, Clone)]
struct Job {
    store: Arc<LocalStore>,
    drv_path: String,
    drv: Derivation,
    drv_sp: StorePath,
    store_dir: StoreDir,
    root: PathBuf,
    namespace: bool,
    plans: Vec<OutPlan>,
    inputs: Vec<StorePath>,
    /// The drv's structured attributes (its `__json`, parsed once); `None` without them, and
    /// for a builtin (which Nix runs without them).
    structured: Option<Map<String, Value>>,
    /// `exportReferencesGraph`'s files and structured attributes.
    exported: Exported,
    cfg: ExecutorConfig,
    limits: SuperviseLimits,
    /// The step attempt the log is named for.
    attempt: Option<crate::builder::logs::Attempt>,
}

/// A directory removed (even if read-only) on drop.
#[derive(Debug)]
struct OwnedDir(PathBuf);

impl Drop for OwnedDir {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove a build directory");
        }
    }
}

/// What the builder left.
#[derive(Debug)]
struct Ran {
    _build_dir: OwnedDir,
    /// Keeps the chroot (and the outputs in it) until the outputs are processed.
    _sandbox: Option<Arc<Sandbox>>,
    log_path: PathBuf,
    /// Output name → where the builder's output is on disk.
    locations: BTreeMap<String, PathBuf>,
}

/// Removes this build's unregistered outputs from the root (no-namespace mode) unless disarmed.
struct OutputCleanup {
    paths: Vec<PathBuf>,
    armed: bool,
}

impl Drop for OutputCleanup {
    fn drop(&mut self) {
        if self.armed {
            for p in &self.paths {
                let _ = remove_tree(p);
            }
        }
    }
}

fn io_msg(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ExecError {
    move |e| ExecError::Io {
        message: format!("{what}: {e}"),
    }
}

fn secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        let s = format!("{:.3}", d.as_secs_f64());
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn with_tail(message: String, tail: &[String]) -> String {
    if tail.is_empty() {
        return message;
    }
    let mut m = format!("{message}; last {} log lines:", tail.len());
    for l in tail {
        m.push_str("\n> ");
        m.push_str(l);
    }
    m
}

impl NativeExecutor {
    pub fn new(store: Arc<LocalStore>, cfg: ExecutorConfig) -> Self {
        NativeExecutor {
            store,
            cfg,
            counters: Arc::new(Counters::default()),
        }
    }

    pub fn store(&self) -> &Arc<LocalStore> {
        &self.store
    }

    pub fn config(&self) -> &ExecutorConfig {
        &self.cfg
    }

    /// How many builders this executor has started (cached results do not count).
    pub fn runs(&self) -> u64 {
        self.counters.total.load(Ordering::SeqCst)
    }

    /// How many times the builder of `drv_path` was started.
    pub fn runs_of(&self, drv_path: &str) -> u64 {
        self.counters
            .by_drv
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(drv_path)
            .copied()
            .unwrap_or(0)
    }

    /// Builds `drv` (whose store path is `drv_path`) and registers its outputs.
    pub async fn build(
        &self,
        drv_path: &str,
        drv: &Derivation,
        limits: Limits,
    ) -> Result<BuildResult, ExecError> {
        self.build_logged(drv_path, drv, limits, None).await
    }

    /// Like [`NativeExecutor::build`], the log named for `attempt` (the step row this build is
    /// for: `<drv>.attempt-<build>-<stepnr>.<random>.log`, see [`crate::builder::logs`]).
    pub async fn build_logged(
        &self,
        drv_path: &str,
        drv: &Derivation,
        limits: Limits,
        attempt: Option<crate::builder::logs::Attempt>,
    ) -> Result<BuildResult, ExecError> {
        let start = Instant::now();
        let store = &self.store;
        let sd = store.store_dir().clone();
        let bad = |m: String| ExecError::BadDerivation { message: m };
        let drv_sp = sd.parse(drv_path).map_err(|e| bad(e.to_string()))?;
        let computed = drv
            .drv_path(&sd)
            .map_err(|e| bad(format!("derivation {drv_path}: {e}")))?;
        if computed != drv_sp {
            return Err(bad(format!(
                "derivation {drv_path} does not match its path (its contents give {})",
                sd.print(&computed)
            )));
        }
        let ty = drv
            .drv_type()
            .map_err(|e| bad(format!("derivation {drv_path}: {e}")))?;
        if drv.needs_resolution() || ty == DerivationType::DeferredInputAddressed {
            return Err(bad(format!(
                "derivation {drv_path} must be resolved before it is built (it is CA floating with input derivations, or has deferred outputs)"
            )));
        }
        let builtin = match Builtin::of_builder(&drv.builder) {
            Some(Err(_)) => {
                return Err(ExecError::Unsupported {
                    message: format!(
                        "derivation {drv_path} uses the built-in builder {:?}, which the native executor does not provide",
                        drv.builder
                    ),
                });
            }
            Some(Ok(b)) => Some(b),
            None => None,
        };
        // As in Nix, a builtin builder runs whatever the derivation's system (`builtin`).
        if builtin.is_none() && !self.cfg.systems.contains(&drv.system) {
            return Err(ExecError::Unsupported {
                message: format!(
                    "derivation {drv_path} is for system {:?}; this executor builds for {}",
                    drv.system,
                    self.cfg.systems.join(", ")
                ),
            });
        }

        // Outputs: where the builder writes each.
        let mut plans = Vec::new();
        for (name, out) in &drv.outputs {
            let (kind, build_path) = match out {
                DerivationOutput::InputAddressed { path } => (
                    OutKind::InputAddressed,
                    sd.parse(path).map_err(|e| bad(e.to_string()))?,
                ),
                DerivationOutput::CaFixed {
                    method_algo,
                    hash,
                    path,
                } => (
                    OutKind::Fixed {
                        method_algo: method_algo.clone(),
                        hash: hash.clone(),
                    },
                    sd.parse(path).map_err(|e| bad(e.to_string()))?,
                ),
                DerivationOutput::CaFloating { method_algo } => match method_algo.as_str() {
                    "r:sha256" => (OutKind::Floating, scratch_path(&sd, &drv_sp, name)),
                    "text:sha256" => (OutKind::Text, scratch_path(&sd, &drv_sp, name)),
                    _ => {
                        return Err(ExecError::Unsupported {
                            message: format!(
                                "derivation {drv_path}: floating output {name:?} uses {method_algo:?}; only r:sha256 and text:sha256 are supported"
                            ),
                        });
                    }
                },
                DerivationOutput::Deferred => {
                    return Err(bad(format!(
                        "derivation {drv_path} has a deferred output {name:?}"
                    )));
                }
            };
            plans.push(OutPlan {
                name: name.clone(),
                kind,
                build_path,
            });
        }

        // Every output statically known and valid: nothing to do.
        let static_paths: Vec<String> = drv
            .outputs
            .values()
            .filter_map(|o| o.path().map(str::to_string))
            .collect();
        if static_paths.len() == drv.outputs.len() {
            let mut outputs = BTreeMap::new();
            for (name, out) in &drv.outputs {
                if let Some(p) = out.path() {
                    if let Some(info) = store.query_path_info(p).await? {
                        outputs.insert(name.clone(), info);
                    }
                }
            }
            if outputs.len() == drv.outputs.len() {
                return Ok(BuildResult {
                    outputs,
                    log_path: None,
                    duration: start.elapsed(),
                    ran: false,
                });
            }
        }

        // Inputs: sources plus the input drvs' (static) outputs; all must be valid.
        let mut input_paths: BTreeSet<String> = drv.input_srcs.clone();
        for (input, wanted) in &drv.input_drvs {
            let idrv = store.read_derivation(input).await?;
            for o in wanted {
                match idrv.outputs.get(o).and_then(|x| x.path()) {
                    Some(p) => {
                        input_paths.insert(p.to_string());
                    }
                    None => {
                        return Err(bad(format!(
                            "derivation {drv_path} must be resolved before it is built: output {o:?} of its input {input} has no static path"
                        )));
                    }
                }
            }
        }
        for p in &input_paths {
            if !store.is_valid_path(p).await? {
                return Err(ExecError::Io {
                    message: format!("input path {p} of {drv_path} is not valid in the store"),
                });
            }
        }
        let closure = store
            .closure(input_paths.iter().map(String::as_str))
            .await?;
        let inputs: Vec<StorePath> = closure
            .iter()
            .map(|p| sd.parse(p))
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let structured = match drv.env.get("__json") {
            Some(j) if builtin.is_none() => Some(super::structured_attrs::parse(j).map_err(
                |e| ExecError::BadDerivation {
                    message: format!("derivation '{drv_path}': {e}"),
                },
            )?),
            _ => None,
        };
        let exported = exported_graphs(
            store,
            drv_path,
            drv,
            structured.as_ref(),
            &closure,
            builtin.is_some(),
        )
        .await?;

        let namespace = store.needs_namespace();
        let root = store.root().to_path_buf();
        if !namespace {
            for p in &plans {
                let logical = sd.print(&p.build_path);
                if store.is_valid_path(&logical).await? {
                    return Err(ExecError::Unsupported {
                        message: format!(
                            "output {:?} of {drv_path} ({logical}) is already valid but others are not; rebuilding beside a valid output needs a store whose dir differs from its root",
                            p.name
                        ),
                    });
                }
            }
        }
        let _reservation = store.reserve(
            plans
                .iter()
                .map(|p| p.build_path.base_name())
                .chain(inputs.iter().map(StorePath::base_name)),
        );
        let mut cleanup = OutputCleanup {
            paths: if namespace {
                vec![]
            } else {
                plans
                    .iter()
                    .map(|p| root.join(p.build_path.base_name()))
                    .collect()
            },
            armed: true,
        };

        let job = Arc::new(Job {
            store: store.clone(),
            drv_path: drv_path.to_string(),
            drv: drv.clone(),
            drv_sp: drv_sp.clone(),
            store_dir: sd.clone(),
            root: root.clone(),
            namespace,
            plans,
            inputs,
            structured,
            exported,
            cfg: self.cfg.clone(),
            attempt,
            // 0 is no limit, as in Nix (`timeout`, `max-silent-time`, `max-build-log-size`).
            limits: SuperviseLimits {
                timeout: limits.timeout.or(self.cfg.timeout).filter(|d| !d.is_zero()),
                max_silent: limits
                    .max_silent
                    .or(self.cfg.max_silent)
                    .filter(|d| !d.is_zero()),
                max_log_bytes: Some(limits.max_log_bytes.unwrap_or(self.cfg.max_log_bytes))
                    .filter(|&n| n > 0),
            },
        });

        // The build is cancelled (its process group killed) if this future is dropped: the
        // supervisor watches the read end of this pipe, whose write end lives here.
        let (cancel_r, cancel_w) = cloexec_pipe().map_err(io_msg("creating a pipe"))?;
        let ran = {
            let (job, counters) = (job.clone(), self.counters.clone());
            tokio::task::spawn_blocking(move || run_builder(&job, &counters, cancel_r))
                .await
                .map_err(|e| ExecError::Io {
                    message: format!("the build task failed: {e}"),
                })??
        };
        drop(cancel_w);

        let (staged, realisations, _staging) = {
            let job = job.clone();
            tokio::task::spawn_blocking(move || process_outputs(&job, ran))
                .await
                .map_err(|e| ExecError::Io {
                    message: format!("the output processing task failed: {e}"),
                })??
        };
        let names: Vec<String> = job.plans.iter().map(|p| p.name.clone()).collect();
        check_references(&job, &names, &staged).await?;
        let infos = store.register_staged(staged, realisations).await?;
        cleanup.armed = false;
        drop(cleanup);
        Ok(BuildResult {
            outputs: names.into_iter().zip(infos).collect(),
            log_path: Some(_staging.log_path.clone()),
            duration: start.elapsed(),
            ran: true,
        })
    }
}

/// What `exportReferencesGraph` gives the builder ([`super::export_refs`]); nothing for a
/// builtin, which Nix runs without it.
async fn exported_graphs(
    store: &LocalStore,
    drv_path: &str,
    drv: &Derivation,
    structured: Option<&Map<String, Value>>,
    closure: &BTreeSet<String>,
    builtin: bool,
) -> Result<Exported, ExecError> {
    let bad = |e: &dyn std::fmt::Display| ExecError::BadDerivation {
        message: format!("derivation '{drv_path}': {e}"),
    };
    if builtin {
        return Ok(Exported::default());
    }
    let request = export_refs::request(&drv.env, structured, store.store_dir().as_str())
        .map_err(|e| bad(&e))?;
    match request {
        None => Ok(Exported::default()),
        Some(r) => export_refs::export(store, &r, closure)
            .await
            .map_err(|e| match e {
                ExportError::Store(e) => ExecError::from(e),
                e => bad(&e),
            }),
    }
}

/// Nix's `checkOutputs` on the built outputs (see [`super::output_checks`]): a violation
/// rejects them all.
async fn check_references(
    job: &Job,
    names: &[String],
    staged: &[StagedPath],
) -> Result<(), ExecError> {
    let checks = checks_of(&job.drv, job.structured.as_ref(), &job.drv_path).map_err(|e| {
        ExecError::OutputRejected {
            message: e.to_string(),
        }
    })?;
    if checks.is_empty() {
        return Ok(());
    }
    let outputs: BTreeMap<String, PathInfo> = names
        .iter()
        .cloned()
        .zip(staged.iter().map(|s| s.info.clone()))
        .collect();
    // Closures reach the inputs' closure at most (outputs refer to inputs and outputs only).
    let mut others: HashMap<String, (u64, BTreeSet<String>)> = HashMap::new();
    if checks.values().any(|c| c.needs_closure()) {
        for p in &job.inputs {
            let p = job.store_dir.print(p);
            if let Some(i) = job.store.query_path_info(&p).await? {
                others.insert(p, (i.nar_size, i.references));
            }
        }
    }
    check_outputs(&job.store_dir, &checks, &outputs, &|p| {
        others.get(p).cloned()
    })
    .map_err(|e| {
        match e {
            // An input's info went missing: trouble of this store, not of the build.
            OutputCheckError::NotValid(_) => ExecError::Io {
                message: format!("checking the outputs of '{}': {e}", job.drv_path),
            },
            _ => ExecError::OutputRejected {
                message: e.to_string(),
            },
        }
    })
}

/// Directories kept alive until registration, and the log path.
#[derive(Debug)]
struct ProcessedDirs {
    _staging: StagingDir,
    _ran: Ran,
    log_path: PathBuf,
}

/// Runs the builder (blocking).
fn run_builder(job: &Job, counters: &Counters, cancel_r: OwnedFd) -> Result<Ran, ExecError> {
    let cfg = &job.cfg;
    let sd = &job.store_dir;
    let drv_path = &job.drv_path;
    for d in [&cfg.build_dir_base, &cfg.log_dir] {
        fs::create_dir_all(d).map_err(io_msg(format!("creating {}", d.display())))?;
    }
    let build_dir = tempfile::Builder::new()
        .prefix(&format!("qr-build-{}-", job.drv.name))
        .tempdir_in(&cfg.build_dir_base)
        .map_err(io_msg(format!(
            "creating a build directory in {}",
            cfg.build_dir_base.display()
        )))?
        .keep();
    let build_dir = OwnedDir(build_dir);
    fs::set_permissions(&build_dir.0, fs::Permissions::from_mode(0o700))
        .map_err(io_msg("chmod of the build directory"))?;
    let (mut log, log_path) = tempfile::Builder::new()
        .prefix(&crate::builder::logs::prefix(
            &job.drv_sp.base_name(),
            job.attempt,
        ))
        .suffix(".log")
        .tempfile_in(&cfg.log_dir)
        .map_err(io_msg(format!(
            "creating a log file in {}",
            cfg.log_dir.display()
        )))?
        .keep()
        .map_err(|e| ExecError::Io {
            message: format!("keeping the log file: {e}"),
        })?;

    // As Nix's `inputRewrites`: every output's hash placeholder becomes where it is built.
    let rewrites: BTreeMap<String, String> = job
        .plans
        .iter()
        .map(|p| (hash_placeholder(&p.name), sd.print(&p.build_path)))
        .collect();
    if let Some(Ok(b)) = Builtin::of_builder(&job.drv.builder) {
        return run_builtin(job, counters, b, build_dir, log, log_path, &rewrites);
    }
    let build_top = if job.namespace {
        SANDBOX_BUILD_DIR.to_string()
    } else {
        build_dir.0.to_string_lossy().into_owned()
    };
    let env = builder_env(
        &job.drv,
        job.structured.as_ref(),
        &job.exported.attrs,
        sd.as_str(),
        &build_top,
        cfg.cores,
        &rewrites,
        |n| std::env::var(n).ok(),
    )
    .map_err(|e| ExecError::BadDerivation {
        message: format!("derivation '{drv_path}': {e}"),
    })?;
    for (name, contents) in env.files.iter().chain(&job.exported.files) {
        let p = build_dir.0.join(name);
        fs::write(&p, contents).map_err(io_msg(format!("writing {}", p.display())))?;
    }

    let plan_bases: HashSet<String> = job.plans.iter().map(|p| p.build_path.base_name()).collect();
    let (sandbox, before) = if job.namespace {
        let spec = SandboxSpec {
            root: &job.root,
            store_dir: sd.as_str(),
            build_dir: &build_dir.0,
            inputs: job
                .inputs
                .iter()
                .map(|p| (p.base_name(), job.root.join(p.base_name())))
                .collect(),
            system_paths: &cfg.sandbox_paths,
            private_network: !job.drv.is_fixed_output(),
        };
        let sb = Sandbox::prepare(&spec).map_err(|e| ExecError::Sandbox {
            message: format!("preparing the build sandbox for '{drv_path}': {e}"),
        })?;
        (Some(Arc::new(sb)), HashSet::new())
    } else {
        // Leftovers of an earlier attempt at our (reserved, not valid) output paths.
        for b in &plan_bases {
            let p = job.root.join(b);
            remove_tree(&p).map_err(io_msg(format!("removing {}", p.display())))?;
        }
        (None, list_dir(&job.root)?)
    };

    let builder = rewrite(&job.drv.builder, &rewrites);
    let args: Vec<String> = job.drv.args.iter().map(|a| rewrite(a, &rewrites)).collect();
    let (out_r, out_w) = cloexec_pipe().map_err(io_msg("creating a pipe"))?;
    let (err_r, err_w) = cloexec_pipe().map_err(io_msg("creating a pipe"))?;
    // SAFETY: O_NONBLOCK on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(err_r.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(err_r.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let nul = |what: &str| ExecError::BadDerivation {
        message: format!("derivation '{drv_path}': its {what} contains a NUL byte"),
    };
    let arg0 = Path::new(&builder)
        .file_name()
        .map(|f| f.as_bytes().to_vec())
        .unwrap_or_else(|| builder.clone().into_bytes());
    let setup_sandbox = sandbox
        .as_ref()
        .map(|sb| move || sb.child_setup(err_w.as_raw_fd()));
    let spawned = spawn(&Spawn {
        program: CString::new(builder.as_bytes()).map_err(|_| nul("builder"))?,
        argv: std::iter::once(arg0)
            .chain(args.iter().map(|a| a.as_bytes().to_vec()))
            .map(CString::new)
            .collect::<Result<_, _>>()
            .map_err(|_| nul("arguments"))?,
        env: env
            .vars
            .iter()
            .map(|(k, v)| CString::new(format!("{k}={v}")))
            .collect::<Result<_, _>>()
            .map_err(|_| nul("environment"))?,
        // In the sandbox, its set-up changes to `/build`.
        cwd: if job.namespace {
            None
        } else {
            Some(CString::new(build_dir.0.as_os_str().as_bytes()).map_err(|_| nul("build dir"))?)
        },
        stdout: &out_w,
        stderr: &out_w,
        setup: setup_sandbox.as_ref().map(|f| f as Setup<'_>),
    });
    // Our copies of the pipes' write ends: the builder holds its own.
    drop(setup_sandbox);
    drop(out_w);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            if let (Some(sb), Some((step, idx))) = (&sandbox, read_failed_step(&err_r)) {
                let hint = if e.raw_os_error() == Some(libc::EPERM) {
                    " (this needs root, or unprivileged user namespaces: check kernel.unprivileged_userns_clone / user.max_user_namespaces and the container's seccomp profile)"
                } else {
                    ""
                };
                return Err(ExecError::Sandbox {
                    message: format!(
                        "cannot set up the private mount namespace for '{drv_path}' (the store dir {sd} differs from its physical root {}): {} failed: {e}{hint}",
                        job.root.display(),
                        sb.describe_step(step, idx)
                    ),
                });
            }
            return Err(match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => ExecError::Failed {
                    message: format!(
                        "builder for '{drv_path}' could not be executed: {builder}: {e}"
                    ),
                    log_tail: vec![],
                },
                _ => ExecError::Io {
                    message: format!("starting the builder {builder} for '{drv_path}': {e}"),
                },
            });
        }
    };
    counters.count(drv_path);
    let pgid = child.id() as i32;
    let sup = supervise(&mut child, out_r, Some(&cancel_r), &mut log, job.limits);
    kill_group(pgid);
    let sup = sup.map_err(io_msg(format!("supervising the builder of '{drv_path}'")))?;
    let failure = match sup.outcome {
        Outcome::Exited(status) if status.success() => None,
        Outcome::Exited(status) => {
            let what = match (status.code(), status.signal()) {
                (Some(c), _) => format!("failed with exit code {c}"),
                (None, Some(s)) => format!("was killed by signal {s}"),
                _ => "failed".to_string(),
            };
            Some(ExecError::Failed {
                message: with_tail(format!("builder for '{drv_path}' {what}"), &sup.tail),
                log_tail: sup.tail,
            })
        }
        Outcome::TimedOut(limit) => {
            let message = match limit {
                TimeLimit::Timeout(d) => format!(
                    "building '{drv_path}' timed out after {} seconds (build timeout)",
                    secs(d)
                ),
                TimeLimit::MaxSilent(d) => format!(
                    "building '{drv_path}' timed out after {} seconds of silence (max-silent-time)",
                    secs(d)
                ),
            };
            Some(ExecError::TimedOut {
                message,
                log_tail: sup.tail,
            })
        }
        Outcome::LogLimitExceeded(max) => Some(ExecError::LogLimitExceeded {
            message: format!(
                "building '{drv_path}' was killed after writing more than {max} bytes of log output"
            ),
        }),
        Outcome::Cancelled => Some(ExecError::Cancelled {
            message: format!("building '{drv_path}' was cancelled"),
        }),
    };
    let out_dir: PathBuf = match &sandbox {
        Some(sb) => sb.store_in_chroot().to_path_buf(),
        None => job.root.clone(),
    };
    if let Some(e) = failure {
        if !job.namespace {
            // Whatever the builder left in the store (the group is dead by now).
            for b in &plan_bases {
                let _ = remove_tree(&job.root.join(b));
            }
            match remove_strays(job, &before, &out_dir, &plan_bases) {
                Ok(s) if !s.is_empty() => {
                    tracing::warn!(drv = %drv_path, strays = ?s, "a failed builder wrote outside its outputs: removed");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(drv = %drv_path, error = %e, "cannot check for writes outside the outputs")
                }
            }
        }
        return Err(e);
    }
    let strays = remove_strays(job, &before, &out_dir, &plan_bases)?;
    if !strays.is_empty() {
        return Err(ExecError::OutputRejected {
            message: format!(
                "builder for '{drv_path}' wrote outside its outputs: {} (removed)",
                strays.join(", ")
            ),
        });
    }
    let locations = job
        .plans
        .iter()
        .map(|p| (p.name.clone(), out_dir.join(p.build_path.base_name())))
        .collect();
    Ok(Ran {
        _build_dir: build_dir,
        _sandbox: sandbox,
        log_path,
        locations,
    })
}

/// Runs a builtin builder in this thread ([`super::builtins`]): its outputs are written at their
/// place in the root (no namespace) or in the build dir (namespace; moved out as a chroot's are).
fn run_builtin(
    job: &Job,
    counters: &Counters,
    builtin: Builtin,
    build_dir: OwnedDir,
    mut log: fs::File,
    log_path: PathBuf,
    rewrites: &BTreeMap<String, String>,
) -> Result<Ran, ExecError> {
    let out_dir = if job.namespace {
        let d = build_dir.0.join(".qr-builtin-outputs");
        fs::create_dir(&d).map_err(io_msg(format!("creating {}", d.display())))?;
        d
    } else {
        job.root.clone()
    };
    let locations: BTreeMap<String, PathBuf> = job
        .plans
        .iter()
        .map(|p| (p.name.clone(), out_dir.join(p.build_path.base_name())))
        .collect();
    for l in locations.values() {
        remove_tree(l).map_err(io_msg(format!("removing {}", l.display())))?;
    }
    let ctx = BuiltinCtx {
        env: job
            .drv
            .env
            .iter()
            .map(|(k, v)| (k.clone(), rewrite(v, rewrites)))
            .collect(),
        fs: StoreFs {
            store_dir: job.store_dir.as_str().to_string(),
            root: job.root.clone(),
            elsewhere: job
                .plans
                .iter()
                .map(|p| (p.build_path.base_name(), locations[&p.name].clone()))
                .collect(),
        },
        fixed_output: job.drv.is_fixed_output(),
        timeout: job.limits.timeout,
        max_silent: job.limits.max_silent,
    };
    counters.count(&job.drv_path);
    if let Err(e) = super::builtins::execute(&job.drv_path, builtin, &ctx, &mut log) {
        for l in locations.values() {
            let _ = remove_tree(l);
        }
        return Err(e);
    }
    Ok(Ran {
        _build_dir: build_dir,
        _sandbox: None,
        log_path,
        locations,
    })
}

fn list_dir(dir: &Path) -> Result<HashSet<OsString>, ExecError> {
    let mut s = HashSet::new();
    for e in fs::read_dir(dir).map_err(io_msg(format!("listing {}", dir.display())))? {
        s.insert(
            e.map_err(io_msg(format!("listing {}", dir.display())))?
                .file_name(),
        );
    }
    Ok(s)
}

/// Finds the entries a builder added to the store dir besides its outputs (`out_dir` is the root,
/// or the store dir in the chroot), removes them (from the root; a chroot goes as a whole), and
/// returns their logical paths. Without a namespace, entries another operation of this process
/// expects (reserved) or registered meanwhile are not the builder's.
fn remove_strays(
    job: &Job,
    before: &HashSet<OsString>,
    out_dir: &Path,
    plan_bases: &HashSet<String>,
) -> Result<Vec<String>, ExecError> {
    let sd = &job.store_dir;
    let input_bases: HashSet<String> = job.inputs.iter().map(StorePath::base_name).collect();
    let mut strays = Vec::new();
    for n in list_dir(out_dir)? {
        if before.contains(&n) {
            continue;
        }
        let n = n.to_string_lossy().into_owned();
        if plan_bases.contains(&n) || input_bases.contains(&n) {
            continue;
        }
        let logical = format!("{sd}/{n}");
        if !job.namespace {
            // The store's own temporary entries (staging, chroots) are `.qr-*`.
            if n.starts_with(".qr-")
                || job.store.is_reserved(&n)
                || (sd.parse(&logical).is_ok() && job.store.is_valid_path_blocking(&logical)?)
            {
                continue;
            }
            let p = out_dir.join(&n);
            remove_tree(&p).map_err(io_msg(format!("removing {}", p.display())))?;
        }
        strays.push(logical);
    }
    strays.sort();
    Ok(strays)
}

/// Hashes a fixed output as its derivation says: (hash bytes, `ca` string), or why not.
fn fixed_output_hash(
    job: &Job,
    location: &Path,
    method_algo: &str,
    nar_sha256: &[u8; 32],
) -> Result<(Vec<u8>, String), ExecError> {
    let unsupported = || ExecError::Unsupported {
        message: format!(
            "derivation {}: fixed-output hash {method_algo:?} is not supported by the native executor (sha256 and sha512, flat or recursive)",
            job.drv_path
        ),
    };
    let (method, algo) = split_method_algo(method_algo).ok_or_else(unsupported)?;
    let hash: Vec<u8> = match (method, algo) {
        ("r:", "sha256") => nar_sha256.to_vec(),
        ("r:", "sha512") => {
            let mut h = Sha512::new();
            dump_path(location, DigestWriter(&mut h)).map_err(|e| ExecError::Io {
                message: format!("hashing {}: {e}", location.display()),
            })?;
            h.finalize().to_vec()
        }
        ("", "sha256" | "sha512") => {
            let m = fs::symlink_metadata(location).map_err(io_msg(location.display()))?;
            if !m.is_file() {
                return Err(ExecError::OutputRejected {
                    message: format!(
                        "output of fixed-output derivation '{}' must be a regular file (flat hash)",
                        job.drv_path
                    ),
                });
            }
            let mut f = fs::File::open(location).map_err(io_msg(location.display()))?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut h256 = Sha256::new();
            let mut h512 = Sha512::new();
            loop {
                let n = f.read(&mut buf).map_err(io_msg(location.display()))?;
                if n == 0 {
                    break;
                }
                if algo == "sha256" {
                    h256.update(&buf[..n]);
                } else {
                    h512.update(&buf[..n]);
                }
            }
            if algo == "sha256" {
                h256.finalize().to_vec()
            } else {
                h512.finalize().to_vec()
            }
        }
        _ => return Err(unsupported()),
    };
    let ca = format!("fixed:{method}{algo}:{}", nix32::encode(&hash));
    Ok((hash, ca))
}

struct DigestWriter<'a, D: Digest>(&'a mut D);

impl<D: Digest> io::Write for DigestWriter<'_, D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn sri(algo: &str, hash: &[u8]) -> String {
    use base64::Engine;
    if algo == "sha256" {
        if let Ok(h) = <[u8; 32]>::try_from(hash) {
            return render_sri(&h);
        }
    }
    format!(
        "{algo}-{}",
        base64::engine::general_purpose::STANDARD.encode(hash)
    )
}

type Processed = (Vec<StagedPath>, Vec<(DrvOutput, String)>, ProcessedDirs);

/// A text-hashed output's final path and `ca`: it must be one regular, non-executable file
/// that does not refer to itself (as Nix requires of `text` outputs).
fn text_output(
    job: &Job,
    p: &OutPlan,
    loc: &Path,
    refs: &BTreeSet<StorePath>,
) -> Result<(StorePath, String), ExecError> {
    let sd = &job.store_dir;
    let reject = |why: &str| ExecError::OutputRejected {
        message: format!(
            "output '{}' of '{}' is text-hashed and {why}",
            p.name, job.drv_path
        ),
    };
    let meta = fs::symlink_metadata(loc).map_err(|e| ExecError::Io {
        message: format!("reading output '{}' of '{}': {e}", p.name, job.drv_path),
    })?;
    if !meta.is_file() {
        return Err(reject("must be a regular file"));
    }
    if meta.permissions().mode() & 0o111 != 0 {
        return Err(reject("must not be executable"));
    }
    if refs.contains(&p.build_path) {
        return Err(reject("must not refer to itself"));
    }
    let contents = fs::read(loc).map_err(|e| ExecError::Io {
        message: format!("reading output '{}' of '{}': {e}", p.name, job.drv_path),
    })?;
    let printed: Vec<String> = refs.iter().map(|r| sd.print(r)).collect();
    let sp = sd.make_text_path(
        p.build_path.name(),
        &contents,
        printed.iter().map(String::as_str),
    );
    let ca = format!(
        "text:sha256:{}",
        nix32::encode(&crate::store::hash::sha256(&contents))
    );
    Ok((sp, ca))
}

/// Checks and hashes the outputs (blocking): CA floating ones are finalised, the others scanned.
fn process_outputs(job: &Job, ran: Ran) -> Result<Processed, ExecError> {
    let sd = &job.store_dir;
    let drv_path = &job.drv_path;
    for p in &job.plans {
        let loc = &ran.locations[&p.name];
        if fs::symlink_metadata(loc).is_err() {
            return Err(ExecError::OutputRejected {
                message: format!(
                    "builder for '{drv_path}' did not produce output '{}' (expected at {})",
                    p.name,
                    sd.print(&p.build_path)
                ),
            });
        }
    }
    let staging = StagingDir::new(&job.root, "tmp")?;
    let mut staged = Vec::new();
    let mut realisations = Vec::new();

    let floating: Vec<ScratchOutput> = job
        .plans
        .iter()
        .filter(|p| matches!(p.kind, OutKind::Floating))
        .map(|p| ScratchOutput {
            name: p.name.clone(),
            physical: ran.locations[&p.name].clone(),
        })
        .collect();
    if !floating.is_empty() {
        let finals = finalize_ca_outputs(sd, staging.path(), &job.drv_sp, &floating, &job.inputs)
            .map_err(|e| match e {
            CaOutputError::Cycle { .. } | CaOutputError::MissingOutput { .. } => {
                ExecError::OutputRejected {
                    message: e.to_string(),
                }
            }
            other => ExecError::Io {
                message: format!("finalising the outputs of '{drv_path}': {other}"),
            },
        })?;
        for f in finals {
            let path = sd.print(&f.path);
            realisations.push((
                DrvOutput::new(drv_path.clone(), f.name.clone()),
                path.clone(),
            ));
            staged.push((
                f.name.clone(),
                StagedPath {
                    info: PathInfo {
                        path,
                        nar_hash: f.nar_hash,
                        nar_size: f.nar_size,
                        references: f.references.iter().map(|r| sd.print(r)).collect(),
                        ca: Some(f.ca),
                        deriver: Some(drv_path.clone()),
                    },
                    staged: f.physical,
                },
            ));
        }
    }

    // Input-addressed and fixed outputs may refer to the inputs and to the drv's own outputs.
    let mut candidates: Vec<StorePath> = job.inputs.clone();
    candidates.extend(
        job.plans
            .iter()
            .filter(|p| !matches!(p.kind, OutKind::Floating))
            .map(|p| p.build_path.clone()),
    );
    let mut text_ca: Option<String> = None;
    for p in &job.plans {
        if matches!(p.kind, OutKind::Floating) {
            continue;
        }
        let loc = &ran.locations[&p.name];
        let (nar_hash, nar_size, refs) = hash_and_scan_path(loc, candidates.iter().cloned())
            .map_err(|e| ExecError::Io {
                message: format!("hashing output '{}' of '{drv_path}': {e}", p.name),
            })?;
        let mut final_sp = p.build_path.clone();
        if matches!(p.kind, OutKind::Text) {
            let (sp, ca) = text_output(job, p, loc, &refs)?;
            final_sp = sp;
            text_ca = Some(ca);
        }
        let path = sd.print(&final_sp);
        let ca = match &p.kind {
            OutKind::Fixed { method_algo, hash } => {
                let (got, ca) = fixed_output_hash(job, loc, method_algo, &nar_hash)?;
                let algo = split_method_algo(method_algo).map_or("sha256", |(_, a)| a);
                if to_hex(&got) != *hash {
                    let wanted = crate::store::hash::from_hex(hash)
                        .map(|h| sri(algo, &h))
                        .unwrap_or_else(|| format!("{algo}:{hash}"));
                    return Err(ExecError::OutputRejected {
                        message: format!(
                            "hash mismatch in fixed-output derivation '{drv_path}':\n  specified: {wanted}\n     got:    {}",
                            sri(algo, &got)
                        ),
                    });
                }
                if !refs.is_empty() {
                    let list: Vec<String> = refs.iter().map(|r| sd.print(r)).collect();
                    return Err(ExecError::OutputRejected {
                        message: format!(
                            "fixed-output derivation '{drv_path}' must not refer to store paths, but its output refers to {}",
                            list.join(", ")
                        ),
                    });
                }
                Some(ca)
            }
            OutKind::Text => text_ca.take(),
            _ => None,
        };
        let staged_at = if job.namespace || final_sp != p.build_path {
            let dest = staging.path().join(final_sp.base_name());
            move_tree(loc, &dest).map_err(io_msg(format!(
                "moving output '{}' out of the sandbox",
                p.name
            )))?;
            dest
        } else {
            loc.clone()
        };
        realisations.push((
            DrvOutput::new(drv_path.clone(), p.name.clone()),
            path.clone(),
        ));
        staged.push((
            p.name.clone(),
            StagedPath {
                info: PathInfo {
                    path,
                    nar_hash,
                    nar_size,
                    references: refs.iter().map(|r| sd.print(r)).collect(),
                    ca,
                    deriver: Some(drv_path.clone()),
                },
                staged: staged_at,
            },
        ));
    }
    // In the order of the plans (output names).
    staged.sort_by(|a, b| a.0.cmp(&b.0));
    let staged = staged.into_iter().map(|(_, s)| s).collect();
    let log_path = ran.log_path.clone();
    Ok((
        staged,
        realisations,
        ProcessedDirs {
            _staging: staging,
            _ran: ran,
            log_path,
        },
    ))
}
