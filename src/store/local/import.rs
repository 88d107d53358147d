//! Copying `.drv` closures from a directory laid out as a store (a physical store root, or
//! `/nix/store` itself) into a [`LocalStore`].
//!
//! Each drv's file must parse and hash to its own path (a text path over its bytes with references
//! `inputSrcs` ∪ input drvs). Input drvs are imported first, recursively. Input sources are copied
//! and registered with the NAR hash of the copy; their references are found by scanning them for
//! the hash parts of the other entries of the directory. A source whose path is a source path
//! (`builtins.path`, `./file`) or a text path (`builtins.toFile`) over its contents gets that
//! content address; otherwise it is registered without one (a warning says so).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use super::{LocalStore, StagedPath, StagingDir, blocking, io_err};
use crate::store::api::{PathInfo, Store, StoreError};
use crate::store::aterm;
use crate::store::fsutil::copy_tree;
use crate::store::hash::sha256;
use crate::store::nix32;
use crate::store::path::StorePath;
use crate::store::refscan::hash_and_scan_path;

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Paths added, inputs before the paths that refer to them.
    pub added: Vec<String>,
    /// Paths that were already valid (their closures too, then).
    pub already_valid: Vec<String>,
}

enum Prepared {
    Drv {
        name: String,
        text: String,
        refs: BTreeSet<String>,
    },
    Source {
        info: PathInfo,
        staged: PathBuf,
        _staging: StagingDir,
    },
}

impl Prepared {
    fn children(&self) -> Vec<String> {
        match self {
            Prepared::Drv { refs, .. } => refs.iter().cloned().collect(),
            Prepared::Source { info, .. } => info
                .references
                .iter()
                .filter(|r| **r != info.path)
                .cloned()
                .collect(),
        }
    }
}

struct Importer<'a> {
    store: &'a LocalStore,
    dir: &'a Path,
    candidates: Option<Vec<StorePath>>,
}

impl Importer<'_> {
    fn source_file(&self, sp: &StorePath) -> PathBuf {
        self.dir.join(sp.base_name())
    }

    fn candidates(&mut self) -> Result<Vec<StorePath>, StoreError> {
        if let Some(c) = &self.candidates {
            return Ok(c.clone());
        }
        let mut c = Vec::new();
        for e in fs::read_dir(self.dir).map_err(io_err("listing", self.dir))? {
            let e = e.map_err(io_err("listing", self.dir))?;
            if let Some(sp) = e
                .file_name()
                .to_str()
                .and_then(|n| StorePath::from_base_name(n).ok())
            {
                c.push(sp);
            }
        }
        self.candidates = Some(c.clone());
        Ok(c)
    }

    async fn prepare(&mut self, path: &str) -> Result<Prepared, StoreError> {
        let sd = self.store.store_dir().clone();
        let sp = sd.parse(path)?;
        let file = self.source_file(&sp);
        if sp.is_derivation() {
            let bytes = fs::read(&file).map_err(io_err("reading", &file))?;
            let drv = aterm::parse_named(&bytes, sp.drv_name()).map_err(|e| {
                StoreError::BadDerivation {
                    path: path.to_string(),
                    message: format!("{}: {e}", file.display()),
                }
            })?;
            let refs: BTreeSet<String> = drv.references().into_iter().map(String::from).collect();
            for r in &refs {
                sd.parse(r)?;
            }
            let recomputed =
                sd.print(&sd.make_text_path(sp.name(), &bytes, refs.iter().map(String::as_str)));
            if recomputed != path {
                return Err(StoreError::DrvPathMismatch {
                    path: path.to_string(),
                    recomputed,
                });
            }
            let text = String::from_utf8(bytes).map_err(|_| StoreError::BadDerivation {
                path: path.to_string(),
                message: "not valid UTF-8".into(),
            })?;
            return Ok(Prepared::Drv {
                name: sp.name().to_string(),
                text,
                refs,
            });
        }
        let candidates = self.candidates()?;
        let staging = StagingDir::new(self.store.root(), "tmp")?;
        let staged = staging.path().join(sp.base_name());
        let (src, st) = (file.clone(), staged.clone());
        let (hash, size, found) = blocking(move || {
            copy_tree(&src, &st).map_err(io_err("copying", &src))?;
            hash_and_scan_path(&st, candidates).map_err(|e| StoreError::Nar {
                path: st.display().to_string(),
                message: e.to_string(),
            })
        })
        .await?;
        let self_ref = found.contains(&sp);
        let others: BTreeSet<String> = found
            .iter()
            .filter(|p| **p != sp)
            .map(|p| sd.print(p))
            .collect();
        let mut references = others.clone();
        if self_ref {
            references.insert(path.to_string());
        }
        let as_source = sd.print(&sd.make_source_path(
            sp.name(),
            &hash,
            others.iter().map(String::as_str),
            self_ref,
        ));
        let ca = if as_source == path {
            Some(format!("fixed:r:sha256:{}", nix32::encode(&hash)))
        } else {
            let meta = fs::symlink_metadata(&staged).map_err(io_err("reading", &staged))?;
            let text_hash = if meta.is_file() && !self_ref {
                let contents = fs::read(&staged).map_err(io_err("reading", &staged))?;
                let h = sha256(&contents);
                let as_text = sd.print(&sd.make_text_path(
                    sp.name(),
                    &contents,
                    others.iter().map(String::as_str),
                ));
                (as_text == path).then_some(h)
            } else {
                None
            };
            match text_hash {
                Some(h) => Some(format!("text:sha256:{}", nix32::encode(&h))),
                None => {
                    tracing::warn!(%path, "imported source is neither a source nor a text path over its contents: registering it without a content address");
                    None
                }
            }
        };
        Ok(Prepared::Source {
            info: PathInfo {
                path: path.to_string(),
                nar_hash: hash,
                nar_size: size,
                references,
                ca,
                deriver: None,
            },
            staged,
            _staging: staging,
        })
    }
}

/// Imports `drv_paths` (full logical paths) and their closures from `dir`.
pub(crate) async fn import_from_dir(
    store: &LocalStore,
    dir: &Path,
    drv_paths: &[String],
) -> Result<ImportReport, StoreError> {
    let mut imp = Importer {
        store,
        dir,
        candidates: None,
    };
    let mut report = ImportReport::default();
    let mut done: HashSet<String> = HashSet::new();
    let mut on_stack: HashSet<String> = HashSet::new();
    let mut prepared: HashMap<String, Prepared> = HashMap::new();
    for root in drv_paths {
        let sp = store.store_dir().parse(root)?;
        if !sp.is_derivation() {
            return Err(StoreError::BadDerivation {
                path: root.clone(),
                message: "not a .drv path".into(),
            });
        }
        let mut stack: Vec<(String, bool)> = vec![(root.clone(), false)];
        while let Some((p, expanded)) = stack.pop() {
            if done.contains(&p) {
                continue;
            }
            if !expanded {
                if on_stack.contains(&p) {
                    return Err(StoreError::Metadata(format!(
                        "reference cycle through {p} in {}",
                        dir.display()
                    )));
                }
                if store.is_valid_path(&p).await? {
                    report.already_valid.push(p.clone());
                    done.insert(p);
                    continue;
                }
                let node = imp.prepare(&p).await?;
                on_stack.insert(p.clone());
                stack.push((p.clone(), true));
                for c in node.children() {
                    if !done.contains(&c) {
                        stack.push((c, false));
                    }
                }
                prepared.insert(p, node);
                continue;
            }
            match prepared.remove(&p) {
                Some(Prepared::Drv { name, text, refs }) => {
                    let added = store.add_text(&name, &text, &refs).await?;
                    debug_assert_eq!(added, p);
                }
                Some(Prepared::Source {
                    info,
                    staged,
                    _staging,
                }) => {
                    store
                        .register_staged(vec![StagedPath { info, staged }], vec![])
                        .await?;
                }
                None => {}
            }
            on_stack.remove(&p);
            report.added.push(p.clone());
            done.insert(p);
        }
    }
    Ok(report)
}
