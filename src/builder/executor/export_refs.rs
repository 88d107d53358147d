//! `exportReferencesGraph`, as Nix 2.8's local builder provides it:
//!
//! - Without structured attributes, `exportReferencesGraph = "name1 path1 name2 path2 …"`: for
//!   each pair the build directory gets a file `nameN` holding the closure of `pathN` in the
//!   format of `nix-store --register-validity` with empty deriver fields (a path, an empty line,
//!   the number of references, then the references; paths in store order).
//! - Under structured attributes, `exportReferencesGraph = { name = [ paths ]; }`: `.attrs.json`
//!   gets a key `name` holding the closure as `nix path-info --json --closure-size` without the
//!   impure fields (`path`, `narHash` in nix32, `narSize`, `references`, `ca`, `closureSize`).
//!
//! Each exported path must be in the input closure of the derivation. The closure of a `.drv`
//! in the graph takes in its outputs' closures too (their paths must be static: Nix does not
//! implement this for CA derivations, and neither does this).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};
use thiserror::Error;

use crate::store::api::{PathInfo, Store, StoreError};
use crate::store::hash::render_nix32;
use crate::store::local::LocalStore;

/// What the derivation asks to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A file in the build directory per (name, path).
    Files(Vec<(String, String)>),
    /// A key in `.attrs.json` per name, of the closure of its paths.
    Structured(Vec<(String, Vec<String>)>),
}

/// What the builder gets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exported {
    /// Files written to the build directory: (name, contents).
    pub files: Vec<(String, String)>,
    /// Keys added to the structured attributes.
    pub attrs: Map<String, Value>,
}

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("odd number of tokens in 'exportReferencesGraph': '{0}'")]
    OddTokens(String),
    #[error("invalid file name '{0}' in 'exportReferencesGraph'")]
    BadName(String),
    #[error("'exportReferencesGraph' contains a non-store path '{0}'")]
    NotInStore(String),
    #[error("'exportReferencesGraph' must map names to lists of store paths (at '{0}')")]
    NotPaths(String),
    #[error(
        "cannot export references of path '{0}' because it is not in the input closure of the derivation"
    )]
    NotAnInput(String),
    #[error("exportReferences on CA derivations is not yet implemented")]
    CaDerivation,
    #[error("path '{0}' is not valid")]
    NotValid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether `s` is a file name Nix accepts (`[A-Za-z_][A-Za-z0-9_.-]*`).
fn valid_name(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The store path `p` names (a path inside a store object names the object), if any.
fn store_object(store_dir: &str, p: &str) -> Option<String> {
    let rest = p.strip_prefix(store_dir)?.strip_prefix('/')?;
    let base = rest.split('/').next().filter(|b| !b.is_empty())?;
    Some(format!("{store_dir}/{base}"))
}

/// The request of a derivation's environment (`structured`: its parsed `__json`), or `None`
/// when it asks for nothing.
pub fn request(
    env: &BTreeMap<String, String>,
    structured: Option<&Map<String, Value>>,
    store_dir: &str,
) -> Result<Option<Request>, ExportError> {
    if let Some(attrs) = structured {
        let Some(Value::Object(m)) = attrs.get("exportReferencesGraph") else {
            return Ok(None);
        };
        if m.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::new();
        for (name, paths) in m {
            let list = paths
                .as_array()
                .ok_or_else(|| ExportError::NotPaths(name.clone()))?;
            let mut ps = Vec::new();
            for p in list {
                let p = p
                    .as_str()
                    .ok_or_else(|| ExportError::NotPaths(name.clone()))?;
                ps.push(
                    store_object(store_dir, p).ok_or_else(|| ExportError::NotInStore(p.into()))?,
                );
            }
            out.push((name.clone(), ps));
        }
        return Ok(Some(Request::Structured(out)));
    }
    let Some(s) = env.get("exportReferencesGraph") else {
        return Ok(None);
    };
    let tokens: Vec<&str> = s.split_ascii_whitespace().collect();
    if tokens.is_empty() {
        return Ok(None);
    }
    if tokens.len() % 2 != 0 {
        return Err(ExportError::OddTokens(s.clone()));
    }
    let mut out = Vec::new();
    for pair in tokens.chunks(2) {
        let (name, path) = (pair[0], pair[1]);
        if !valid_name(name) {
            return Err(ExportError::BadName(name.into()));
        }
        let p =
            store_object(store_dir, path).ok_or_else(|| ExportError::NotInStore(path.into()))?;
        out.push((name.to_string(), p));
    }
    Ok(Some(Request::Files(out)))
}

/// The closure Nix exports for `paths` (each in `inputs`, the derivation's input closure).
async fn closure_of(
    store: &LocalStore,
    paths: &[String],
    inputs: &BTreeSet<String>,
) -> Result<BTreeSet<String>, ExportError> {
    for p in paths {
        if !inputs.contains(p) {
            return Err(ExportError::NotAnInput(p.clone()));
        }
    }
    let mut all = store.closure(paths.iter().map(String::as_str)).await?;
    let drvs: Vec<String> = all
        .iter()
        .filter(|p| p.ends_with(".drv"))
        .cloned()
        .collect();
    let mut outs = Vec::new();
    for d in drvs {
        let drv = store.read_derivation(&d).await?;
        for o in drv.outputs.values() {
            outs.push(o.path().ok_or(ExportError::CaDerivation)?.to_string());
        }
    }
    if !outs.is_empty() {
        for p in &outs {
            if !store.is_valid_path(p).await? {
                return Err(ExportError::NotValid(p.clone()));
            }
        }
        all.extend(store.closure(outs.iter().map(String::as_str)).await?);
    }
    Ok(all)
}

async fn infos(store: &LocalStore, paths: &BTreeSet<String>) -> Result<Vec<PathInfo>, ExportError> {
    let mut found = store.query_path_infos(paths).await?;
    paths
        .iter()
        .map(|p| {
            found
                .remove(p)
                .ok_or_else(|| ExportError::NotValid(p.clone()))
        })
        .collect()
}

/// `nix-store --register-validity`'s format, derivers left empty.
pub fn registration(infos: &[PathInfo]) -> String {
    let mut s = String::new();
    for i in infos {
        s.push_str(&i.path);
        s.push_str("\n\n");
        s.push_str(&format!("{}\n", i.references.len()));
        for r in &i.references {
            s.push_str(r);
            s.push('\n');
        }
    }
    s
}

/// `pathInfoToJSON` without impure fields, with closure sizes (`sizes`: path → closure size).
pub fn path_info_json(infos: &[PathInfo], sizes: &BTreeMap<String, u64>) -> Value {
    Value::Array(
        infos
            .iter()
            .map(|i| {
                let mut m = Map::new();
                if let Some(ca) = &i.ca {
                    m.insert("ca".into(), Value::String(ca.clone()));
                }
                m.insert(
                    "closureSize".into(),
                    Value::from(sizes.get(&i.path).copied().unwrap_or(i.nar_size)),
                );
                m.insert("narHash".into(), Value::String(render_nix32(&i.nar_hash)));
                m.insert("narSize".into(), Value::from(i.nar_size));
                m.insert("path".into(), Value::String(i.path.clone()));
                m.insert(
                    "references".into(),
                    Value::Array(i.references.iter().cloned().map(Value::String).collect()),
                );
                Value::Object(m)
            })
            .collect(),
    )
}

/// Serves `request` from `store` (`inputs`: the derivation's input closure).
pub async fn export(
    store: &LocalStore,
    request: &Request,
    inputs: &BTreeSet<String>,
) -> Result<Exported, ExportError> {
    let mut out = Exported::default();
    match request {
        Request::Files(pairs) => {
            for (name, path) in pairs {
                let all = closure_of(store, std::slice::from_ref(path), inputs).await?;
                out.files
                    .push((name.clone(), registration(&infos(store, &all).await?)));
            }
        }
        Request::Structured(keys) => {
            for (name, paths) in keys {
                let all = closure_of(store, paths, inputs).await?;
                let infos = infos(store, &all).await?;
                let sizes = closure_sizes(&infos);
                out.attrs
                    .insert(name.clone(), path_info_json(&infos, &sizes));
            }
        }
    }
    Ok(out)
}

/// Each path's closure size (the NAR sizes of its closure), from `infos`, which hold a whole
/// closure.
pub fn closure_sizes(infos: &[PathInfo]) -> BTreeMap<String, u64> {
    let by_path: BTreeMap<&str, &PathInfo> = infos.iter().map(|i| (i.path.as_str(), i)).collect();
    let mut sizes = BTreeMap::new();
    for i in infos {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut stack = vec![i.path.as_str()];
        let mut size = 0;
        while let Some(p) = stack.pop() {
            if !seen.insert(p) {
                continue;
            }
            if let Some(info) = by_path.get(p) {
                size += info.nar_size;
                stack.extend(info.references.iter().map(String::as_str));
            }
        }
        sizes.insert(i.path.clone(), size);
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(v: &str) -> BTreeMap<String, String> {
        [("exportReferencesGraph".to_string(), v.to_string())].into()
    }

    #[test]
    fn pairs_are_read_and_checked_as_nix_checks_them() {
        let r = request(&env(" a /s/abc-x  b.c-d /s/def-y/bin "), None, "/s").unwrap();
        assert_eq!(
            r,
            Some(Request::Files(vec![
                ("a".into(), "/s/abc-x".into()),
                ("b.c-d".into(), "/s/def-y".into())
            ]))
        );
        assert_eq!(request(&env("  "), None, "/s").unwrap(), None);
        assert!(matches!(
            request(&env("a /s/x b"), None, "/s"),
            Err(ExportError::OddTokens(_))
        ));
        assert!(matches!(
            request(&env("1a /s/x"), None, "/s"),
            Err(ExportError::BadName(_))
        ));
        assert!(matches!(
            request(&env("a /tmp/x"), None, "/s"),
            Err(ExportError::NotInStore(_))
        ));
    }

    #[test]
    fn structured_requests_name_lists_of_paths() {
        let attrs: Map<String, Value> =
            serde_json::from_str(r#"{"exportReferencesGraph":{"g":["/s/abc-x","/s/def-y/lib"]}}"#)
                .unwrap();
        assert_eq!(
            request(&BTreeMap::new(), Some(&attrs), "/s").unwrap(),
            Some(Request::Structured(vec![(
                "g".into(),
                vec!["/s/abc-x".into(), "/s/def-y".into()]
            )]))
        );
        let bad: Map<String, Value> =
            serde_json::from_str(r#"{"exportReferencesGraph":{"g":"/s/abc-x"}}"#).unwrap();
        assert!(matches!(
            request(&BTreeMap::new(), Some(&bad), "/s"),
            Err(ExportError::NotPaths(_))
        ));
    }

    #[test]
    fn registration_has_empty_derivers_and_counted_references() {
        let i = |p: &str, refs: &[&str]| PathInfo {
            path: p.into(),
            nar_hash: [0; 32],
            nar_size: 1,
            references: refs.iter().map(|r| r.to_string()).collect(),
            ca: None,
            deriver: Some("/s/ignored.drv".into()),
        };
        assert_eq!(
            registration(&[i("/s/a-x", &["/s/a-x", "/s/b-y"]), i("/s/b-y", &[])]),
            "/s/a-x\n\n2\n/s/a-x\n/s/b-y\n/s/b-y\n\n0\n"
        );
    }
}
