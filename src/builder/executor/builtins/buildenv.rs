//! `builtin:buildenv`: a user environment as Nix 2.8 builds it (`src/libstore/builtins/
//! buildenv.cc`). `derivations` is a list of words: for each package `ACTIVE PRIORITY N` then
//! its N output paths. Active packages are linked into `out` lowest priority number first (ties
//! by path); a package's `nix-support/propagated-user-env-packages` are linked afterwards at
//! priorities 1000, 1001, …. Where two packages have a directory, the symlink to the first is
//! replaced by a directory of links to both; two files at one place are a collision unless their
//! priorities differ (the lower number wins). Finally `out/manifest.nix` links to `manifest`.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, symlink};

use super::{BuiltinCtx, BuiltinError, StoreFs, io_err};

/// One package of the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub path: String,
    pub active: bool,
    pub priority: i32,
}

/// Entries Nix leaves out of every profile (useless there, or colliding needlessly).
const IGNORED_SUFFIXES: &[&str] = &[
    "/propagated-build-inputs",
    "/nix-support",
    "/perllocal.pod",
    "/info/dir",
    "/log",
    "/manifest.nix",
    "/manifest.json",
];

/// Parses `derivations` (see the module doc).
pub fn parse_derivations(s: &str) -> Result<Vec<Package>, BuiltinError> {
    let bad = |m: String| BuiltinError::Build(format!("invalid 'derivations' attribute: {m}"));
    let mut words = s.split([' ', '\t', '\n', '\r']).filter(|w| !w.is_empty());
    let mut pkgs = Vec::new();
    while let Some(active) = words.next() {
        let mut int = |what: &str| -> Result<i32, BuiltinError> {
            let w = words
                .next()
                .ok_or_else(|| bad(format!("the list ends before a package's {what}")))?;
            w.parse::<i32>()
                .map_err(|_| bad(format!("{what} {w:?} is not a number")))
        };
        let priority = int("priority")?;
        let n = int("number of outputs")?;
        for _ in 0..n.max(0) {
            let path = words
                .next()
                .ok_or_else(|| bad("the list ends before a package's outputs".to_string()))?;
            pkgs.push(Package {
                path: path.to_string(),
                active: active != "false",
                priority,
            });
        }
    }
    Ok(pkgs)
}

struct State<'a> {
    fs: &'a StoreFs,
    priorities: HashMap<String, i32>,
    log: &'a mut dyn FnMut(&str),
}

fn is_not_found(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

fn create_symlink(fs_: &StoreFs, target: &str, link: &str) -> Result<(), BuiltinError> {
    symlink(target, fs_.physical(link)).map_err(io_err(format!(
        "creating symlink from '{link}' to '{target}'"
    )))
}

impl State<'_> {
    fn create_links(
        &mut self,
        src_dir: &str,
        dst_dir: &str,
        priority: i32,
    ) -> Result<(), BuiltinError> {
        let names = match self.fs.read_dir(src_dir) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                (self.log)(&format!(
                    "warning: not including '{src_dir}' in the user environment because it's not a directory"
                ));
                return Ok(());
            }
            Err(e) => {
                return Err(BuiltinError::Io {
                    what: format!("reading directory '{src_dir}'"),
                    source: e,
                });
            }
        };
        for name in names {
            if name.starts_with('.') {
                continue;
            }
            let src = format!("{src_dir}/{name}");
            let dst = format!("{dst_dir}/{name}");
            let src_st = match self.fs.stat(&src) {
                Ok(m) => m,
                Err(e) if is_not_found(&e) => {
                    (self.log)(&format!("warning: skipping dangling symlink '{dst}'"));
                    continue;
                }
                Err(e) => return Err(io_err(format!("getting status of '{src}'"))(e)),
            };
            if IGNORED_SUFFIXES.iter().any(|s| src.ends_with(s)) {
                continue;
            }
            let dst_phys = self.fs.physical(&dst);
            let dst_st = match fs::symlink_metadata(&dst_phys) {
                Ok(m) => Some(m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err(format!("getting status of '{dst}'"))(e)),
            };
            if src_st.is_dir() {
                if let Some(d) = &dst_st {
                    if d.is_dir() {
                        self.create_links(&src, &dst, priority)?;
                        continue;
                    }
                    if d.file_type().is_symlink() {
                        let target = self
                            .fs
                            .canonical(&dst)
                            .map_err(io_err(format!("getting the target of '{dst}'")))?;
                        let t_is_dir = self
                            .fs
                            .lstat(&target)
                            .map_err(io_err(format!("getting status of '{target}'")))?
                            .is_dir();
                        if !t_is_dir {
                            return Err(BuiltinError::Build(format!(
                                "collision between '{src}' and non-directory '{target}'"
                            )));
                        }
                        fs::remove_file(&dst_phys).map_err(io_err(format!("unlinking '{dst}'")))?;
                        fs::DirBuilder::new()
                            .mode(0o755)
                            .create(&dst_phys)
                            .map_err(io_err(format!("creating directory '{dst}'")))?;
                        let prev = *self.priorities.entry(dst.clone()).or_insert(0);
                        self.create_links(&target, &dst, prev)?;
                        self.create_links(&src, &dst, priority)?;
                        continue;
                    }
                }
            } else if let Some(d) = &dst_st {
                if d.file_type().is_symlink() {
                    let prev = *self.priorities.entry(dst.clone()).or_insert(0);
                    if prev == priority {
                        let existing = fs::read_link(&dst_phys)
                            .map_err(io_err(format!("reading symbolic link '{dst}'")))?;
                        return Err(BuiltinError::Build(format!(
                            "packages '{src}' and '{}' have the same priority {priority}; \
                             use 'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME' \
                             to change the priority of one of the conflicting packages \
                             (0 being the highest priority)",
                            existing.display()
                        )));
                    }
                    if prev < priority {
                        continue;
                    }
                    fs::remove_file(&dst_phys).map_err(io_err(format!("unlinking '{dst}'")))?;
                } else if d.is_dir() {
                    return Err(BuiltinError::Build(format!(
                        "collision between non-directory '{src}' and directory '{dst}'"
                    )));
                }
            }
            create_symlink(self.fs, &src, &dst)?;
            self.priorities.insert(dst, priority);
        }
        Ok(())
    }
}

/// Links `pkgs` into `out` (Nix's `buildProfile`).
pub fn build_profile(
    fs_: &StoreFs,
    out: &str,
    mut pkgs: Vec<Package>,
    log: &mut dyn FnMut(&str),
) -> Result<(), BuiltinError> {
    let mut state = State {
        fs: fs_,
        priorities: HashMap::new(),
        log,
    };
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut postponed: BTreeSet<String> = BTreeSet::new();
    let mut add =
        |state: &mut State, dir: &str, priority: i32, postponed: &mut BTreeSet<String>| {
            if !done.insert(dir.to_string()) {
                return Ok(());
            }
            state.create_links(dir, out, priority)?;
            let f = format!("{dir}/nix-support/propagated-user-env-packages");
            match state.fs.read_to_string(&f) {
                Ok(s) => {
                    for p in s.split([' ', '\n']).filter(|p| !p.is_empty()) {
                        if !done.contains(p) {
                            postponed.insert(p.to_string());
                        }
                    }
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(io_err(format!("reading file '{f}'"))(e)),
            }
            Ok::<(), BuiltinError>(())
        };
    pkgs.sort_by(|a, b| (a.priority, &a.path).cmp(&(b.priority, &b.path)));
    for p in pkgs.iter().filter(|p| p.active) {
        add(&mut state, &p.path, p.priority, &mut postponed)?;
    }
    let mut counter = 1000;
    while !postponed.is_empty() {
        let dirs = std::mem::take(&mut postponed);
        for d in dirs {
            add(&mut state, &d, counter, &mut postponed)?;
            counter += 1;
        }
    }
    Ok(())
}

/// The builtin: `out`, `derivations`, `manifest` from the environment.
pub fn buildenv(ctx: &BuiltinCtx, log: &mut dyn FnMut(&str)) -> Result<(), BuiltinError> {
    let out = ctx.attr("out")?.to_string();
    fs::create_dir_all(ctx.fs.physical(&out))
        .map_err(io_err(format!("creating directory '{out}'")))?;
    let pkgs = parse_derivations(ctx.attr("derivations")?)?;
    build_profile(&ctx.fs, &out, pkgs, log)?;
    create_symlink(
        &ctx.fs,
        ctx.attr("manifest")?,
        &format!("{out}/manifest.nix"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn sfs(root: &Path) -> StoreFs {
        StoreFs {
            store_dir: "/s".into(),
            root: root.to_path_buf(),
            elsewhere: HashMap::new(),
        }
    }

    fn mk(root: &Path, rel: &str, contents: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, contents).unwrap();
    }

    fn link(root: &Path, rel: &str) -> String {
        fs::read_link(root.join(rel))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn derivations_words() {
        let p = parse_derivations("true 5 2 /s/a /s/b\nfalse -1 1 /s/c").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[1].path.as_str(), p[1].active, p[1].priority),
            ("/s/b", true, 5)
        );
        assert_eq!((p[2].active, p[2].priority), (false, -1));
        assert!(parse_derivations("true x 1 /s/a").is_err());
        assert!(parse_derivations("true 1 2 /s/a").is_err());
        assert!(parse_derivations("").unwrap().is_empty());
    }

    #[test]
    fn directories_merge_priorities_decide_and_equal_priorities_collide() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        mk(r, "a/bin/x", "a");
        mk(r, "a/share/doc", "a");
        mk(r, "b/bin/x", "b");
        mk(r, "b/bin/y", "b");
        mk(r, "b/nix-support/propagated-user-env-packages", "/s/c\n");
        mk(r, "b/.hidden", "b");
        mk(r, "c/lib/z", "c");
        mk(r, "d/bin/y", "d");
        fs::create_dir_all(r.join("out")).unwrap();
        let pkgs = vec![
            Package {
                path: "/s/b".into(),
                active: true,
                priority: 5,
            },
            Package {
                path: "/s/a".into(),
                active: true,
                priority: 3,
            },
            Package {
                path: "/s/d".into(),
                active: false,
                priority: 0,
            },
        ];
        let mut warnings = Vec::new();
        build_profile(&sfs(r), "/s/out", pkgs, &mut |w| {
            warnings.push(w.to_string())
        })
        .unwrap();
        // bin is in a and b: a directory of links; x from a (priority 3 beats 5).
        assert!(fs::symlink_metadata(r.join("out/bin")).unwrap().is_dir());
        assert_eq!(link(r, "out/bin/x"), "/s/a/bin/x");
        assert_eq!(link(r, "out/bin/y"), "/s/b/bin/y");
        assert_eq!(link(r, "out/share"), "/s/a/share");
        assert_eq!(link(r, "out/lib"), "/s/c/lib");
        assert!(fs::symlink_metadata(r.join("out/nix-support")).is_err());
        assert!(fs::symlink_metadata(r.join("out/.hidden")).is_err());
        assert!(warnings.is_empty(), "{warnings:?}");

        fs::create_dir_all(r.join("out2")).unwrap();
        let same = vec![
            Package {
                path: "/s/a".into(),
                active: true,
                priority: 5,
            },
            Package {
                path: "/s/b".into(),
                active: true,
                priority: 5,
            },
        ];
        let e = build_profile(&sfs(r), "/s/out2", same, &mut |_| {}).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("packages '/s/b/bin/x' and '/s/a/bin/x' have the same priority 5;"),
            "{e}"
        );
    }

    #[test]
    fn file_against_directory_collides_and_files_are_skipped_with_a_warning() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        mk(r, "a/bin/x", "a");
        mk(r, "b/bin", "a file");
        mk(r, "f", "not a dir");
        fs::create_dir_all(r.join("out")).unwrap();
        let pkgs = vec![
            Package {
                path: "/s/f".into(),
                active: true,
                priority: 1,
            },
            Package {
                path: "/s/b".into(),
                active: true,
                priority: 2,
            },
            Package {
                path: "/s/a".into(),
                active: true,
                priority: 3,
            },
        ];
        let mut warnings = Vec::new();
        let e = build_profile(&sfs(r), "/s/out", pkgs, &mut |w| {
            warnings.push(w.to_string())
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "collision between '/s/a/bin' and non-directory '/s/b/bin'"
        );
        assert_eq!(
            warnings,
            vec![
                "warning: not including '/s/f' in the user environment because it's not a directory"
            ]
        );
    }
}
