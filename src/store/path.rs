//! Store paths: the logical store dir, path parsing and Nix's `makeStorePath` family.

use std::fmt;

use thiserror::Error;

use super::hash::{compress20, sha256, to_hex};
use super::{clip, nix32};

/// Length of a store path's hash part (20 bytes in nix32).
pub const HASH_PART_LEN: usize = 32;
/// Nix refuses store path names longer than this.
pub const MAX_NAME_LEN: usize = 211;

/// Why a string is not a store path.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("path {path:?} is not in the store dir {store_dir:?}")]
    NotInStore { path: String, store_dir: String },
    #[error("store path {0:?} has no valid 32-character nix32 hash part")]
    BadHashPart(String),
    #[error("store path {path:?} has an invalid name: {why}")]
    BadName { path: String, why: &'static str },
}

/// The logical store directory (e.g. `/nix/store`), without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir("/nix/store".to_string())
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A store path relative to its store dir: `<hash part>-<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    hash_part: String,
    name: String,
}

impl StorePath {
    /// Parses a base name `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        let (hash_part, rest) = base
            .split_at_checked(HASH_PART_LEN)
            .ok_or_else(|| StorePathError::BadHashPart(clip(base)))?;
        if !nix32::is_nix32(hash_part) {
            return Err(StorePathError::BadHashPart(clip(base)));
        }
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::BadHashPart(clip(base)))?;
        validate_name(name).map_err(|why| StorePathError::BadName {
            path: clip(base),
            why,
        })?;
        Ok(StorePath {
            hash_part: hash_part.to_string(),
            name: name.to_string(),
        })
    }

    /// The 32-character nix32 hash part.
    pub fn hash_part(&self) -> &str {
        &self.hash_part
    }

    /// The name after the hash part (for a `.drv`, includes the `.drv` suffix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash_part, self.name)
    }

    /// True for `.drv` files.
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }

    /// For a `.drv`, its derivation name (the store name without `.drv`).
    pub fn drv_name(&self) -> &str {
        self.name.strip_suffix(".drv").unwrap_or(&self.name)
    }
}

/// Checks a store path name as Nix does: `[A-Za-z0-9+\-._?=]+`, not starting with `.`, at most 211.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("name longer than 211 characters");
    }
    if name.starts_with('.') {
        return Err("name starts with a period");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
    {
        return Err("name contains a character outside [A-Za-z0-9+-._?=]");
    }
    Ok(())
}

/// `outputPathName(name, o)`: `name` for `out`, `name-o` otherwise.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_string()
    } else {
        format!("{drv_name}-{output}")
    }
}

impl StoreDir {
    /// A store dir; trailing slashes are removed. Must be absolute.
    pub fn new(dir: impl Into<String>) -> Result<Self, StorePathError> {
        let mut d: String = dir.into();
        while d.len() > 1 && d.ends_with('/') {
            d.pop();
        }
        if !d.starts_with('/') {
            return Err(StorePathError::NotInStore {
                path: d.clone(),
                store_dir: d,
            });
        }
        Ok(StoreDir(d))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The full path of `p` in this store dir.
    pub fn print(&self, p: &StorePath) -> String {
        format!("{}/{}-{}", self.0, p.hash_part, p.name)
    }

    /// Parses a full store path (`<dir>/<hash>-<name>`, nothing after it).
    pub fn parse(&self, path: &str) -> Result<StorePath, StorePathError> {
        let base = path
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .filter(|b| !b.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: clip(path),
                store_dir: self.0.clone(),
            })?;
        StorePath::from_base_name(base)
    }

    /// Parses a path that is in the store or below a store path; returns the store path.
    pub fn to_store_path(&self, path: &str) -> Result<StorePath, StorePathError> {
        let rest = path
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: clip(path),
                store_dir: self.0.clone(),
            })?;
        StorePath::from_base_name(rest.split('/').next().unwrap_or(rest))
    }

    /// `makeStorePath(type, hash, name)`: fingerprint `<type>:sha256:<hex>:<dir>:<name>`.
    pub fn make_store_path(&self, ty: &str, hash: &[u8; 32], name: &str) -> StorePath {
        let fp = format!("{ty}:sha256:{}:{}:{name}", to_hex(hash), self.0);
        StorePath {
            hash_part: nix32::encode(&compress20(&sha256(fp.as_bytes()))),
            name: name.to_string(),
        }
    }

    /// The `type` of a text or source path: the kind, then `:<ref>` per sorted reference, then
    /// `:self` when the path refers to itself.
    fn type_with_refs<'a>(
        kind: &str,
        refs: impl IntoIterator<Item = &'a str>,
        self_ref: bool,
    ) -> String {
        let mut sorted: Vec<&str> = refs.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut ty = kind.to_string();
        for r in sorted {
            ty.push(':');
            ty.push_str(r);
        }
        if self_ref {
            ty.push_str(":self");
        }
        ty
    }

    /// A text path (e.g. a `.drv`): `text` with references, hashed over its contents.
    pub fn make_text_path<'a>(
        &self,
        name: &str,
        contents: &[u8],
        refs: impl IntoIterator<Item = &'a str>,
    ) -> StorePath {
        let ty = Self::type_with_refs("text", refs, false);
        self.make_store_path(&ty, &sha256(contents), name)
    }

    /// A source (recursive sha256 content-addressed) path with its NAR hash (modulo self-refs).
    pub fn make_source_path<'a>(
        &self,
        name: &str,
        nar_hash: &[u8; 32],
        refs: impl IntoIterator<Item = &'a str>,
        self_ref: bool,
    ) -> StorePath {
        let ty = Self::type_with_refs("source", refs, self_ref);
        self.make_store_path(&ty, nar_hash, name)
    }

    /// An input-addressed output path: `output:<o>` over the derivation's modulo hash.
    pub fn make_output_path(
        &self,
        output: &str,
        hash_modulo: &[u8; 32],
        drv_name: &str,
    ) -> StorePath {
        self.make_store_path(
            &format!("output:{output}"),
            hash_modulo,
            &output_path_name(drv_name, output),
        )
    }

    /// A fixed-output path that is not recursive sha256: `output:out` over
    /// `sha256("fixed:out:<algo>:<hex>:")`; `method_algo` is e.g. `sha256` (flat) or `r:sha1`.
    pub fn make_fixed_output_path(
        &self,
        method_algo: &str,
        hash_hex: &str,
        name: &str,
    ) -> StorePath {
        let inner = sha256(format!("fixed:out:{method_algo}:{hash_hex}:").as_bytes());
        self.make_store_path("output:out", &inner, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let sd = StoreDir::default();
        let p = sd
            .parse("/nix/store/bb2hv5vpc898gbqnr314h9367m8ambvj-chain-a.drv")
            .unwrap();
        assert_eq!(p.hash_part(), "bb2hv5vpc898gbqnr314h9367m8ambvj");
        assert!(p.is_derivation());
        assert_eq!(p.drv_name(), "chain-a");
        assert_eq!(
            sd.print(&p),
            "/nix/store/bb2hv5vpc898gbqnr314h9367m8ambvj-chain-a.drv"
        );
        let below = sd
            .to_store_path("/nix/store/bb2hv5vpc898gbqnr314h9367m8ambvj-x/bin/sh")
            .unwrap();
        assert_eq!(below.name(), "x");
    }

    #[test]
    fn rejects_bad_paths() {
        let sd = StoreDir::default();
        assert!(matches!(
            sd.parse("/tmp/x"),
            Err(StorePathError::NotInStore { .. })
        ));
        assert!(matches!(
            sd.parse("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x"),
            Err(StorePathError::BadHashPart(_))
        ));
        assert!(matches!(
            sd.parse("/nix/store/bb2hv5vpc898gbqnr314h9367m8ambvj-.x"),
            Err(StorePathError::BadName { .. })
        ));
        assert!(matches!(
            sd.parse("/nix/store/bb2hv5vpc898gbqnr314h9367m8ambvj-a b"),
            Err(StorePathError::BadName { .. })
        ));
        assert!(sd.parse("/nix/store/short").is_err());
    }

    #[test]
    fn output_names() {
        assert_eq!(output_path_name("mo-lib", "out"), "mo-lib");
        assert_eq!(output_path_name("mo-lib", "dev"), "mo-lib-dev");
    }

    #[test]
    fn store_dir_is_part_of_the_fingerprint() {
        let a = StoreDir::default().make_text_path("x", b"hi", []);
        let b = StoreDir::new("/other/store")
            .unwrap()
            .make_text_path("x", b"hi", []);
        assert_ne!(a.hash_part(), b.hash_part());
    }
}

#[cfg(test)]
mod fixture_smoke {
    use super::*;

    #[test]
    fn chain_a_drv_path_from_its_aterm() {
        // From ../shared/fixtures/nix-oracle/chain.json: a drv with no inputs is a text path with no refs.
        let aterm = r#"Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hello > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","chain-a"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])"#;
        let sd = StoreDir::default();
        let p = sd.make_text_path("chain-a.drv", aterm.as_bytes(), []);
        assert_eq!(
            sd.print(&p),
            "/nix/store/bb2hv5vpc898gbqnr314h9367m8ambvj-chain-a.drv"
        );
    }
}
