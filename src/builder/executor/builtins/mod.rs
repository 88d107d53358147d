//! Nix's built-in builders (`builder = "builtin:…"`), run inside the native executor's process
//! rather than as a program, as Nix 2.8's local builder runs them in its forked child:
//!
//! - `builtin:fetchurl` ([`fetchurl`]): downloads `url` into `out` (a NAR restored when
//!   `unpack = "1"`, made executable when `executable = "1"`); the executor then checks the
//!   fixed output's hash as for any fixed output.
//! - `builtin:buildenv` ([`buildenv`]): the symlink tree of a user environment from
//!   `derivations` and `manifest`, with Nix's priorities and collisions.
//!
//! A builtin sees the derivation's own environment (`drv.env`, hash placeholders rewritten),
//! not the builder environment, and reads and writes store paths by their logical names: a
//! [`StoreFs`] maps them to where they are on disk (the store's root, or the output's location
//! when the outputs are built outside the root), following symlinks as the sandboxed builder
//! would see them.
//! - `builtin:unpack-channel` ([`unpack_channel`]): a channel tarball unpacked into `out`, its
//!   one top-level entry renamed to `channelName`.

pub mod buildenv;
pub mod fetchurl;
mod http;
pub mod unpack_channel;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Why a builtin failed. Its text is what Nix's builtin writes to the log before it exits 1.
#[derive(Debug, Error)]
pub enum BuiltinError {
    #[error("attribute '{0}' missing")]
    MissingAttr(String),
    #[error("unsupported builtin builder '{0}'")]
    Unsupported(String),
    #[error("{0}")]
    Build(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// The download took longer than the build timeout, or was silent longer than
    /// max-silent-time.
    #[error("{0}")]
    TimedOut(TimeLimitHit),
}

/// Which limit a builtin ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeLimitHit {
    Timeout(Duration),
    MaxSilent(Duration),
}

impl std::fmt::Display for TimeLimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimeLimitHit::Timeout(d) => write!(f, "timed out after {d:?} (build timeout)"),
            TimeLimitHit::MaxSilent(d) => write!(f, "no data for {d:?} (max-silent-time)"),
        }
    }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BuiltinError {
    let what = what.into();
    move |source| BuiltinError::Io { what, source }
}

/// The builtins Nix 2.8 knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Fetchurl,
    Buildenv,
    UnpackChannel,
}

impl Builtin {
    /// The builtin a `builder` names (`builtin:NAME`), or `None` for another builder. An
    /// unknown `builtin:` name is an error, as in Nix.
    pub fn of_builder(builder: &str) -> Option<Result<Builtin, BuiltinError>> {
        let name = builder.strip_prefix("builtin:")?;
        Some(match name {
            "fetchurl" => Ok(Builtin::Fetchurl),
            "buildenv" => Ok(Builtin::Buildenv),
            "unpack-channel" => Ok(Builtin::UnpackChannel),
            other => Err(BuiltinError::Unsupported(other.to_string())),
        })
    }
}

/// Logical store paths → files on disk.
#[derive(Debug, Clone)]
pub struct StoreFs {
    /// The logical store dir, e.g. `/nix/store`.
    pub store_dir: String,
    /// Where store objects are on disk (`<root>/<base name>`).
    pub root: PathBuf,
    /// Objects that are elsewhere (the outputs being built): base name → location.
    pub elsewhere: HashMap<String, PathBuf>,
}

/// Most symlinks followed while resolving one path (Linux's `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

impl StoreFs {
    /// Where the logical `path` is on disk, not following symlinks. Paths outside the store dir
    /// are the host's.
    pub fn physical(&self, path: &str) -> PathBuf {
        if let Some(rest) = path
            .strip_prefix(self.store_dir.as_str())
            .and_then(|r| r.strip_prefix('/'))
        {
            let (base, tail) = rest.split_once('/').unwrap_or((rest, ""));
            let at = match self.elsewhere.get(base) {
                Some(p) => p.clone(),
                None => self.root.join(base),
            };
            return if tail.is_empty() { at } else { at.join(tail) };
        }
        PathBuf::from(path)
    }

    /// Whether `path` is the store dir or one of its ancestors (directories the sandboxed
    /// builder sees whatever the host has there).
    fn is_store_ancestor(&self, path: &str) -> bool {
        path == self.store_dir
            || self
                .store_dir
                .strip_prefix(path)
                .is_some_and(|r| r.starts_with('/'))
    }

    /// `path` with every symlink resolved (Nix's `canonPath(path, true)`), as a logical path.
    pub fn canonical(&self, path: &str) -> io::Result<String> {
        let mut todo: VecDeque<String> = path
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        let mut cur = String::new();
        let mut followed = 0;
        while let Some(c) = todo.pop_front() {
            if c == "." {
                continue;
            }
            if c == ".." {
                if let Some(i) = cur.rfind('/') {
                    cur.truncate(i);
                }
                continue;
            }
            let next = format!("{cur}/{c}");
            if self.is_store_ancestor(&next) {
                cur = next;
                continue;
            }
            let phys = self.physical(&next);
            let m = fs::symlink_metadata(&phys)?;
            if m.file_type().is_symlink() {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&phys)?;
                let target = target.to_str().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "symlink target is not UTF-8")
                })?;
                for t in target.split('/').filter(|c| !c.is_empty()).rev() {
                    todo.push_front(t.to_string());
                }
                if target.starts_with('/') {
                    cur.clear();
                }
            } else {
                cur = next;
            }
        }
        Ok(if cur.is_empty() { "/".to_string() } else { cur })
    }

    /// `stat(path)`: the metadata of what `path` leads to, symlinks followed.
    pub fn stat(&self, path: &str) -> io::Result<fs::Metadata> {
        let c = self.canonical(path)?;
        if self.is_store_ancestor(&c) {
            return fs::metadata(&self.root);
        }
        fs::symlink_metadata(self.physical(&c))
    }

    /// `lstat(path)`: the last component not followed.
    pub fn lstat(&self, path: &str) -> io::Result<fs::Metadata> {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        let parent = if parent.is_empty() {
            "/".to_string()
        } else {
            self.canonical(parent)?
        };
        let full = format!("{}/{name}", parent.trim_end_matches('/'));
        fs::symlink_metadata(self.physical(&full))
    }

    /// The names in the directory `path` leads to (sorted; `.` and `..` left out).
    pub fn read_dir(&self, path: &str) -> io::Result<Vec<String>> {
        let c = self.canonical(path)?;
        let mut names = Vec::new();
        for e in fs::read_dir(self.physical(&c))? {
            let n = e?.file_name();
            names.push(n.to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    /// The contents of the file `path` leads to.
    pub fn read_to_string(&self, path: &str) -> io::Result<String> {
        let c = self.canonical(path)?;
        fs::read_to_string(self.physical(&c))
    }
}

/// What a builtin runs with.
#[derive(Debug, Clone)]
pub struct BuiltinCtx {
    /// The derivation's environment, hash placeholders rewritten to the output paths.
    pub env: BTreeMap<String, String>,
    pub fs: StoreFs,
    /// Whether the derivation is fixed-output (only those may download).
    pub fixed_output: bool,
    pub timeout: Option<Duration>,
    pub max_silent: Option<Duration>,
}

impl BuiltinCtx {
    pub fn attr(&self, name: &str) -> Result<&str, BuiltinError> {
        self.env
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| BuiltinError::MissingAttr(name.to_string()))
    }
}

/// Runs `builtin`; warnings go to `log` (one line each, as Nix prints them).
pub fn run(
    builtin: Builtin,
    ctx: &BuiltinCtx,
    log: &mut dyn FnMut(&str),
) -> Result<(), BuiltinError> {
    match builtin {
        Builtin::Fetchurl => fetchurl::fetchurl(ctx, log),
        Builtin::Buildenv => buildenv::buildenv(ctx, log),
        Builtin::UnpackChannel => unpack_channel::unpack_channel(ctx, log),
    }
}

/// Runs `builtin` for the derivation `drv_path` as the native executor's builder: the error
/// text and warnings go to `log`, and a failure is reported as Nix reports a builtin's (the
/// builder "failed with exit code 1", the log's last lines appended).
pub fn execute(
    drv_path: &str,
    builtin: Builtin,
    ctx: &BuiltinCtx,
    log: &mut dyn io::Write,
) -> Result<(), super::ExecError> {
    let mut lines: Vec<String> = Vec::new();
    let r = run(builtin, ctx, &mut |l| lines.push(l.to_string()));
    let timed_out = match &r {
        Err(BuiltinError::TimedOut(t)) => Some(*t),
        _ => None,
    };
    if let Err(e) = &r {
        lines.extend(format!("error: {e}").lines().map(str::to_string));
    }
    for l in &lines {
        // The log is best effort; the result is what counts.
        let _ = writeln!(log, "{l}");
    }
    let _ = log.flush();
    let tail: Vec<String> = lines.iter().rev().take(25).rev().cloned().collect();
    match (r, timed_out) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(t)) => Err(super::ExecError::TimedOut {
            message: match t {
                TimeLimitHit::Timeout(d) => format!(
                    "building '{drv_path}' timed out after {} seconds (build timeout)",
                    d.as_secs_f64()
                ),
                TimeLimitHit::MaxSilent(d) => format!(
                    "building '{drv_path}' timed out after {} seconds of silence (max-silent-time)",
                    d.as_secs_f64()
                ),
            },
            log_tail: tail,
        }),
        (Err(_), None) => {
            let mut message = format!("builder for '{drv_path}' failed with exit code 1");
            if !tail.is_empty() {
                message.push_str(&format!("; last {} log lines:", tail.len()));
                for l in &tail {
                    message.push_str("\n> ");
                    message.push_str(l);
                }
            }
            Err(super::ExecError::Failed {
                message,
                log_tail: tail,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn builder_names() {
        assert_eq!(
            Builtin::of_builder("builtin:fetchurl").map(|r| r.ok()),
            Some(Some(Builtin::Fetchurl))
        );
        assert!(Builtin::of_builder("/bin/sh").is_none());
        let e = Builtin::of_builder("builtin:nope").unwrap().unwrap_err();
        assert_eq!(e.to_string(), "unsupported builtin builder 'nope'");
    }

    #[test]
    fn logical_paths_resolve_through_the_root_and_outputs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let elsewhere = tmp.path().join("out-loc");
        fs::create_dir_all(root.join("aaa-pkg/share")).unwrap();
        fs::write(root.join("aaa-pkg/share/f"), "x").unwrap();
        // Absolute links into the store dir, relative links, a link chain, a loop.
        symlink("/nix/store/aaa-pkg/share", root.join("bbb-link")).unwrap();
        symlink("aaa-pkg/share/f", root.join("ccc-rel")).unwrap();
        symlink("/nix/store/bbb-link/f", root.join("ddd-chain")).unwrap();
        symlink("/nix/store/eee-loop", root.join("eee-loop")).unwrap();
        fs::create_dir_all(&elsewhere).unwrap();
        let mut m = HashMap::new();
        m.insert("zzz-out".to_string(), elsewhere.clone());
        let sfs = StoreFs {
            store_dir: "/nix/store".into(),
            root: root.clone(),
            elsewhere: m,
        };
        assert_eq!(sfs.physical("/nix/store/zzz-out/x"), elsewhere.join("x"));
        assert_eq!(sfs.physical("/nix/store/aaa-pkg"), root.join("aaa-pkg"));
        assert_eq!(sfs.physical("/etc/x"), PathBuf::from("/etc/x"));
        assert_eq!(
            sfs.canonical("/nix/store/bbb-link/f").unwrap(),
            "/nix/store/aaa-pkg/share/f"
        );
        assert_eq!(
            sfs.canonical("/nix/store/ccc-rel").unwrap(),
            "/nix/store/aaa-pkg/share/f"
        );
        assert_eq!(
            sfs.canonical("/nix/store/ddd-chain").unwrap(),
            "/nix/store/aaa-pkg/share/f"
        );
        assert_eq!(
            sfs.canonical("/nix/store/eee-loop")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ELOOP)
        );
        assert!(sfs.stat("/nix/store/bbb-link").unwrap().is_dir());
        assert!(
            sfs.lstat("/nix/store/bbb-link")
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(sfs.read_dir("/nix/store/bbb-link").unwrap(), vec!["f"]);
        assert_eq!(sfs.read_to_string("/nix/store/ddd-chain").unwrap(), "x");
        let e = sfs.stat("/nix/store/ccc-rel/below").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(
            sfs.stat("/nix/store/missing").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
