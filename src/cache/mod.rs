//! The signed Nix binary cache: what `qr serve` answers on `[http] listen` (`web::cache`) and what
//! the publisher writes into a `file://` cache (`[cache] upload`).
//!
//! - `key`: signing keys in Nix's format; `narinfo`: narinfo text and its fingerprint;
//!   `compression`: streaming NAR encoders; `realisation`: the realisation documents (Nix ≤ 2.34
//!   and the build trace of ≥ 2.35); `files`: atomic file writes and compressed NAR files;
//!   `source`: [`Cache`], everything a cache serves, read from the local store; `publish`: the
//!   follower that fills a `file://` cache.
//!
//! Only valid store paths are ever served or published: every answer starts from the store's
//! metadata, which holds a path only once its contents are complete and in place.

pub mod compression;
pub mod files;
pub mod key;
pub mod narinfo;
pub mod publish;
pub mod realisation;
pub mod setup;
pub mod source;
pub mod warm;

use std::path::PathBuf;

use thiserror::Error;

pub use compression::Compression;
pub use key::{PublicKey, SecretKey};
pub use source::Cache;

use crate::store::StoreError;

/// Why a cache answer or a publication failed.
#[derive(Debug, Error)]
pub enum CacheError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("modulo hash of {drv}: {message}")]
    HashModulo { drv: String, message: String },
    #[error("a blocking task failed: {0}")]
    Task(String),
}

impl CacheError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| CacheError::Io { op, path, source }
    }
}
