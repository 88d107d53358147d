//! Where build logs live and how they are named: one file per step attempt.
//!
//! A log is `<log dir>/<drv base name>.<key>.log` (gzipped later to `.log.gz`). The key of a
//! step attempt — one `BuildSteps` row, as Hydra keys its logs by build and step number — is
//! `attempt-<build>-<stepnr>`, followed by a random part for logs the local builder writes
//! (`<drv>.attempt-7-3.Xy12ab.log`) and by nothing for logs a remote builder streams up
//! (`<drv>.attempt-7-3.log`). Logs written without a known attempt (by `qr run` before the row
//! existed, or by older versions) have no key (`<drv>.<random>.log`, `<drv>.<job id>.log`): they
//! belong to the drv only. The random parts are alphanumeric and job ids carry no `attempt-`
//! prefix, so a name never parses as the wrong attempt.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// One step attempt: a `BuildSteps` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attempt {
    pub build: i64,
    pub stepnr: i32,
}

impl Attempt {
    /// The part of a log's file name naming the attempt.
    pub fn key(&self) -> String {
        format!("attempt-{}-{}", self.build, self.stepnr)
    }

    /// Parses [`Attempt::key`].
    pub fn parse_key(s: &str) -> Option<Attempt> {
        let rest = s.strip_prefix("attempt-")?;
        let (b, n) = rest.split_once('-')?;
        let all_digits = |x: &str| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit());
        if !all_digits(b) || !all_digits(n) {
            return None;
        }
        Some(Attempt {
            build: b.parse().ok()?,
            stepnr: n.parse().ok()?,
        })
    }
}

/// The file-name prefix of `drv_path`'s logs for `attempt` (`<drv base>.<key>.`), or of every
/// log of the drv (`<drv base>.`).
pub fn prefix(drv_path: &str, attempt: Option<Attempt>) -> String {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    match attempt {
        Some(a) => format!("{base}.{}.", a.key()),
        None => format!("{base}."),
    }
}

/// One log file found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    pub path: PathBuf,
    /// The attempt it belongs to, when its name says so.
    pub attempt: Option<Attempt>,
    pub modified: SystemTime,
    pub compressed: bool,
}

/// If `name` is a log of the drv whose base name is `base`: its attempt (if named) and whether it
/// is compressed.
pub fn parse_name(name: &str, base: &str) -> Option<(Option<Attempt>, bool)> {
    let rest = name.strip_prefix(base)?.strip_prefix('.')?;
    let (stem, compressed) = if let Some(s) = rest.strip_suffix(".log.gz") {
        (s, true)
    } else {
        (rest.strip_suffix(".log")?, false)
    };
    let key = stem.split('.').next().unwrap_or("");
    Some((Attempt::parse_key(key), compressed))
}

/// Every log of `drv_path` in `dirs`, oldest first (by modification time, then name).
pub fn find(dirs: &[PathBuf], drv_path: &str) -> Vec<LogFile> {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    let mut out = Vec::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some((attempt, compressed)) = parse_name(&name.to_string_lossy(), base) else {
                continue;
            };
            let Ok(modified) = e.metadata().and_then(|m| m.modified()) else {
                continue;
            };
            out.push(LogFile {
                path: e.path(),
                attempt,
                modified,
                compressed,
            });
        }
    }
    out.sort_by(|a, b| a.modified.cmp(&b.modified).then(a.path.cmp(&b.path)));
    out
}

/// Every log in `dirs`, by drv base name, each list oldest first: one directory scan for many
/// lookups. (A drv base name ends in `.drv`; what follows it in a log's name never contains
/// `.drv.`, so the last `.drv.` ends the base name.)
pub fn scan(dirs: &[PathBuf]) -> std::collections::HashMap<String, Vec<LogFile>> {
    let mut out: std::collections::HashMap<String, Vec<LogFile>> = Default::default();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(i) = name.rfind(".drv.") else {
                continue;
            };
            let base = &name[..i + 4];
            let Some((attempt, compressed)) = parse_name(&name, base) else {
                continue;
            };
            let Ok(modified) = e.metadata().and_then(|m| m.modified()) else {
                continue;
            };
            out.entry(base.to_string()).or_default().push(LogFile {
                path: e.path(),
                attempt,
                modified,
                compressed,
            });
        }
    }
    for v in out.values_mut() {
        v.sort_by(|a, b| a.modified.cmp(&b.modified).then(a.path.cmp(&b.path)));
    }
    out
}

/// The log of `attempt` of `drv_path`: the newest file named for it.
pub fn of_attempt(dirs: &[PathBuf], drv_path: &str, attempt: Attempt) -> Option<LogFile> {
    find(dirs, drv_path)
        .into_iter()
        .rev()
        .find(|l| l.attempt == Some(attempt))
}

/// The newest log of `drv_path`, whatever its attempt.
pub fn latest(dirs: &[PathBuf], drv_path: &str) -> Option<LogFile> {
    find(dirs, drv_path).pop()
}

/// `<dir>/<drv base>.<key>.log` for a remote builder's stream of `attempt`.
pub fn remote_path(dir: &Path, drv_base: &str, attempt: Attempt) -> PathBuf {
    dir.join(format!("{drv_base}.{}.log", attempt.key()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Attempt = Attempt {
        build: 7,
        stepnr: 3,
    };

    #[test]
    fn names_parse_to_their_attempt() {
        let base = "aaaa-x.drv";
        assert_eq!(A.key(), "attempt-7-3");
        assert_eq!(Attempt::parse_key("attempt-7-3"), Some(A));
        for bad in [
            "attempt-7",
            "attempt--3",
            "attempt-7-x",
            "attempt-7-3-1",
            "7-3",
            "",
        ] {
            assert_eq!(Attempt::parse_key(bad), None, "{bad}");
        }
        assert_eq!(
            parse_name("aaaa-x.drv.attempt-7-3.Xy12ab.log", base),
            Some((Some(A), false))
        );
        assert_eq!(
            parse_name("aaaa-x.drv.attempt-7-3.log.gz", base),
            Some((Some(A), true))
        );
        // Unkeyed logs (a random part, a remote job id) belong to the drv only.
        assert_eq!(
            parse_name("aaaa-x.drv.Xy12ab.log", base),
            Some((None, false))
        );
        assert_eq!(
            parse_name("aaaa-x.drv.18f3c2-4-12.log", base),
            Some((None, false))
        );
        assert_eq!(
            parse_name("aaaa-x.drv.nix-Ab12.log", base),
            Some((None, false))
        );
        // Not this drv's, or not a log.
        assert_eq!(parse_name("aaaa-xy.drv.attempt-7-3.log", base), None);
        assert_eq!(parse_name("aaaa-x.drv.attempt-7-3.log.gz.tmp", base), None);
        assert_eq!(parse_name("aaaa-x.drv", base), None);
        assert_eq!(
            prefix("/nix/store/aaaa-x.drv", Some(A)),
            "aaaa-x.drv.attempt-7-3."
        );
        assert_eq!(prefix("/nix/store/aaaa-x.drv", None), "aaaa-x.drv.");
    }

    #[test]
    fn attempts_are_found_apart() {
        let d = tempfile::tempdir().unwrap();
        let dirs = vec![d.path().to_path_buf(), d.path().join("remote")];
        std::fs::create_dir_all(&dirs[1]).unwrap();
        let drv = "/nix/store/aaaa-x.drv";
        let b = Attempt {
            build: 7,
            stepnr: 30,
        };
        std::fs::write(d.path().join("aaaa-x.drv.attempt-7-3.Ab.log"), "first").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(remote_path(&dirs[1], "aaaa-x.drv", b), "second").unwrap();
        std::fs::write(d.path().join("other.drv.attempt-7-3.log"), "other").unwrap();
        let all = find(&dirs, drv);
        assert_eq!(all.len(), 2);
        assert_eq!(
            all.iter().map(|l| l.attempt).collect::<Vec<_>>(),
            [Some(A), Some(b)]
        );
        assert_eq!(
            std::fs::read_to_string(of_attempt(&dirs, drv, A).unwrap().path).unwrap(),
            "first"
        );
        assert_eq!(latest(&dirs, drv).unwrap().attempt, Some(b));
        let by_drv = scan(&dirs);
        assert_eq!(by_drv.len(), 2);
        assert_eq!(by_drv["aaaa-x.drv"], all);
        assert_eq!(by_drv["other.drv"].len(), 1);
        assert_eq!(
            of_attempt(
                &dirs,
                drv,
                Attempt {
                    build: 7,
                    stepnr: 4
                }
            ),
            None
        );
    }
}
