//! The `Store` trait: everything the scheduler needs from a Nix store. Nothing in the scheduler reads
//! store files directly, so a store whose physical location differs from its logical store dir
//! (like Nix's `local?root=X`) works everywhere.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::PathBuf;

use async_trait::async_trait;
use thiserror::Error;

use super::derivation::Derivation;
use super::hash::Sha256Hash;
use super::path::{StoreDir, StorePathError};
use super::realisation::DrvOutput;

/// What the store knows about a valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// Full logical path (`<store dir>/<hash>-<name>`).
    pub path: String,
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    /// Full logical paths this path refers to (itself included when self-referential).
    pub references: BTreeSet<String>,
    /// Content address, e.g. `fixed:r:sha256:<nix32>` or `text:sha256:<nix32>`.
    pub ca: Option<String>,
    /// The drv that built it, if known.
    pub deriver: Option<String>,
}

/// Typed store errors.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    BadPath(#[from] StorePathError),
    #[error("path {0} is not valid in the store")]
    NotValid(String),
    #[error("malformed derivation {path}: {message}")]
    BadDerivation { path: String, message: String },
    #[error("derivation file {path} does not hash to its own path (recomputed {recomputed})")]
    DrvPathMismatch { path: String, recomputed: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store metadata: {0}")]
    Metadata(String),
    #[error("NAR of {path}: {message}")]
    Nar { path: String, message: String },
    #[error("{path}: NAR hash or size mismatch (expected {expected}, got {got})")]
    HashMismatch {
        path: String,
        expected: String,
        got: String,
    },
    #[error("realisation {key} already points to {existing}, not {new}")]
    RealisationConflict {
        key: String,
        existing: String,
        new: String,
    },
}

/// A Nix store as the runner uses it.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The logical store dir (the prefix of every path it holds).
    fn store_dir(&self) -> &StoreDir;

    /// Reads and parses a `.drv` that is valid in the store.
    async fn read_derivation(&self, drv_path: &str) -> Result<Derivation, StoreError>;

    async fn is_valid_path(&self, path: &str) -> Result<bool, StoreError>;

    /// Reads many derivations, each one's result in order (queue expansion reads a level of a
    /// closure at once). The default reads them one by one.
    async fn read_derivations(&self, drv_paths: &[String]) -> Vec<Result<Derivation, StoreError>> {
        let mut out = Vec::with_capacity(drv_paths.len());
        for p in drv_paths {
            out.push(self.read_derivation(p).await);
        }
        out
    }

    /// The valid paths among `paths`. The default asks one by one.
    async fn valid_among(
        &self,
        paths: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut out = std::collections::HashSet::new();
        for p in paths {
            if self.is_valid_path(p).await? {
                out.insert(p.clone());
            }
        }
        Ok(out)
    }

    /// The known realisations among `keys`. The default asks one by one.
    async fn query_realisations(
        &self,
        keys: &[DrvOutput],
    ) -> Result<Vec<(DrvOutput, String)>, StoreError> {
        let mut out = Vec::new();
        for k in keys {
            if let Some(p) = self.query_realisation(k).await? {
                out.push((k.clone(), p));
            }
        }
        Ok(out)
    }

    async fn query_path_info(&self, path: &str) -> Result<Option<PathInfo>, StoreError>;

    /// Adds a text path (e.g. a `.drv`): returns its full logical path. Idempotent.
    async fn add_text(
        &self,
        name: &str,
        contents: &str,
        references: &BTreeSet<String>,
    ) -> Result<String, StoreError>;

    /// Adds a derivation as its ATerm text; returns the drv path.
    async fn add_derivation(&self, drv: &Derivation) -> Result<String, StoreError> {
        let refs: BTreeSet<String> = drv.references().into_iter().map(str::to_string).collect();
        self.add_text(&format!("{}.drv", drv.name), &drv.to_aterm(), &refs)
            .await
    }

    /// Adds a derivation and keeps it alive under the GC root `<root_prefix><base name of the
    /// drv>`; returns the drv path. Stores that can do so commit both together.
    async fn add_derivation_rooted(
        &self,
        drv: &Derivation,
        root_prefix: &str,
    ) -> Result<String, StoreError> {
        let path = self.add_derivation(drv).await?;
        let base = path.rsplit('/').next().unwrap_or(&path).to_string();
        self.add_gc_root(&format!("{root_prefix}{base}"), &path)
            .await?;
        Ok(path)
    }

    /// The output path a drv output was realised to, if known.
    async fn query_realisation(&self, key: &DrvOutput) -> Result<Option<String>, StoreError>;

    /// Records a realisation; an existing different one is a `RealisationConflict`.
    async fn register_realisation(&self, key: &DrvOutput, out_path: &str)
    -> Result<(), StoreError>;

    /// Keeps `path` alive under the root `name` (e.g. a resolved `.drv` or a build output).
    async fn add_gc_root(&self, name: &str, path: &str) -> Result<(), StoreError>;

    async fn remove_gc_root(&self, name: &str) -> Result<(), StoreError>;

    /// Writes the NAR of a valid path to `out` (blocking I/O: call from a blocking context).
    fn export_nar(&self, path: &str, out: &mut dyn Write) -> Result<u64, StoreError>;

    /// Imports a path from its NAR, verifying narHash and narSize against `info` before it becomes
    /// valid (blocking I/O: call from a blocking context).
    fn import_nar(&self, info: &PathInfo, nar: &mut dyn Read) -> Result<(), StoreError>;

    /// Where a logical path lives on this machine, for a store whose files are local (the native
    /// executor builds there); `None` for a store without local files.
    fn physical_path(&self, path: &str) -> Option<PathBuf>;
}
