//! Whole `derivation show` documents, in the three shapes Nix has printed ([`DocumentShape`]),
//! and importing their derivations in dependency order.
//!
//! Versions 3 and 4 write store paths without the store dir, and the document does not say which
//! it was. The store dir is the one under which a derivation's contents give the path it is keyed
//! by (the store dir is part of every store path's hash): the candidates are the caller's hints
//! (the configured store), `/nix/store`, and every directory the document's strings hold a store
//! path under; the first that makes some key match wins.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;

use serde_json::{Map, Value};
use thiserror::Error;

use super::{Format, JsonError};
use crate::store::clip;
use crate::store::derivation::Derivation;
use crate::store::hash_modulo::{DrvHashes, HashModuloError};
use crate::store::nix32;
use crate::store::path::{StoreDir, StorePath, StorePathError};

/// How a document is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentShape {
    /// `{"/nix/store/<hash>-<name>.drv": {…}}`: Nix 2.8–2.31 (and qr's own documents).
    KeyedByPath,
    /// `{"<hash>-<name>.drv": {"version": 3, …}}`: Nix 2.32.
    KeyedByBaseName,
    /// `{"version": 4, "derivations": {"<hash>-<name>.drv": {"version": 4, …}}}`: Nix 2.33 on.
    Wrapped,
}

/// A document read: its shape, the store dir its paths are in, and its derivations by full drv
/// path (output paths not yet filled in; see [`ShowDocument::import`]).
#[derive(Debug, Clone)]
pub struct ShowDocument {
    pub shape: DocumentShape,
    pub store_dir: StoreDir,
    pub derivations: BTreeMap<String, Derivation>,
}

/// Why a `derivation show` document could not be imported.
#[derive(Debug, Error)]
pub enum ShowJsonError<E> {
    #[error(
        "expected a JSON object mapping derivation paths to derivations, or \
         {{\"version\": 4, \"derivations\": {{…}}}}"
    )]
    NotAnObject,
    #[error("the document holds no derivations")]
    Empty,
    #[error(transparent)]
    Version(JsonError),
    #[error("{key:?} is not a derivation path: {error}")]
    BadKey { key: String, error: StorePathError },
    #[error(
        "no store dir makes the derivations' contents give their keys (tried {tried}); the \
         document's derivations do not match their paths"
    )]
    NoStoreDir { tried: String },
    #[error("the document is in store dir {found}, not {wanted}")]
    WrongStoreDir { found: String, wanted: String },
    #[error("{key}: {error}")]
    Entry { key: String, error: JsonError },
    #[error("{key}: {error}")]
    Hash {
        key: String,
        error: HashModuloError<E>,
    },
    #[error("{key}: the derivation's contents give the path {computed}")]
    KeyMismatch { key: String, computed: String },
    #[error("the derivations have a dependency cycle through {0}")]
    Cycle(String),
}

impl ShowJsonError<Infallible> {
    /// The same error for a loader's error type (reading a document loads nothing).
    fn widen<E>(self) -> ShowJsonError<E> {
        match self {
            ShowJsonError::NotAnObject => ShowJsonError::NotAnObject,
            ShowJsonError::Empty => ShowJsonError::Empty,
            ShowJsonError::Version(e) => ShowJsonError::Version(e),
            ShowJsonError::BadKey { key, error } => ShowJsonError::BadKey { key, error },
            ShowJsonError::NoStoreDir { tried } => ShowJsonError::NoStoreDir { tried },
            ShowJsonError::WrongStoreDir { found, wanted } => {
                ShowJsonError::WrongStoreDir { found, wanted }
            }
            ShowJsonError::Entry { key, error } => ShowJsonError::Entry { key, error },
            ShowJsonError::KeyMismatch { key, computed } => {
                ShowJsonError::KeyMismatch { key, computed }
            }
            ShowJsonError::Cycle(c) => ShowJsonError::Cycle(c),
            ShowJsonError::Hash { key, error } => ShowJsonError::Hash {
                key,
                error: match error {
                    HashModuloError::Cycle(c) => HashModuloError::Cycle(c),
                    HashModuloError::Modulo(m) => HashModuloError::Modulo(m),
                    HashModuloError::Derivation(d) => HashModuloError::Derivation(d),
                    HashModuloError::Load { error, .. } => match error {},
                },
            },
        }
    }
}

/// Reads a document in any shape. `store_dir_hints` are tried first for documents whose paths
/// carry no store dir (versions 3 and 4).
pub fn parse_show_document(
    doc: &Value,
    store_dir_hints: &[StoreDir],
) -> Result<ShowDocument, ShowJsonError<Infallible>> {
    let obj = doc.as_object().ok_or(ShowJsonError::NotAnObject)?;
    let (shape, entries) = if let Some(version) = obj.get("version") {
        // Nix 2.33 on: the version of the whole document, then the derivations.
        let f = Format::from_version(version).map_err(ShowJsonError::Version)?;
        if f != Format::V4 {
            return Err(ShowJsonError::Version(JsonError::UnknownVersion(
                version.to_string(),
            )));
        }
        let ds = obj
            .get("derivations")
            .ok_or(ShowJsonError::Version(JsonError::Missing("derivations")))?
            .as_object()
            .ok_or(ShowJsonError::Version(JsonError::Field(
                "derivations",
                "an object",
            )))?;
        (DocumentShape::Wrapped, ds)
    } else if obj.keys().next().is_some_and(|k| k.starts_with('/')) {
        (DocumentShape::KeyedByPath, obj)
    } else {
        (DocumentShape::KeyedByBaseName, obj)
    };
    if entries.is_empty() {
        return Err(ShowJsonError::Empty);
    }
    match shape {
        DocumentShape::KeyedByPath => {
            let first = entries.keys().next().map(String::as_str).unwrap_or("/");
            let dir = first.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            let sd = StoreDir::new(if dir.is_empty() { "/" } else { dir }).map_err(|error| {
                ShowJsonError::BadKey {
                    key: clip(first),
                    error,
                }
            })?;
            let derivations = parse_entries(entries, &sd, true)?;
            Ok(ShowDocument {
                shape,
                store_dir: sd,
                derivations,
            })
        }
        DocumentShape::KeyedByBaseName | DocumentShape::Wrapped => {
            let candidates = candidate_store_dirs(entries, store_dir_hints);
            let mut first_error = None;
            for sd in &candidates {
                match parse_entries(entries, sd, false) {
                    Ok(derivations) => {
                        let matches = derivations
                            .iter()
                            .any(|(k, d)| d.drv_path(sd).is_ok_and(|p| sd.print(&p) == *k));
                        if matches {
                            return Ok(ShowDocument {
                                shape,
                                store_dir: sd.clone(),
                                derivations,
                            });
                        }
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            Err(first_error.unwrap_or_else(|| ShowJsonError::NoStoreDir {
                tried: candidates
                    .iter()
                    .map(StoreDir::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            }))
        }
    }
}

/// Every entry as a derivation, keyed by its full drv path in `sd`.
fn parse_entries(
    entries: &Map<String, Value>,
    sd: &StoreDir,
    full_keys: bool,
) -> Result<BTreeMap<String, Derivation>, ShowJsonError<Infallible>> {
    let mut res = BTreeMap::new();
    for (key, v) in entries {
        let bad_key = |error| ShowJsonError::BadKey {
            key: clip(key),
            error,
        };
        let sp = if full_keys {
            sd.parse(key).map_err(bad_key)?
        } else {
            StorePath::from_base_name(key).map_err(bad_key)?
        };
        let full = sd.print(&sp);
        if !sp.is_derivation() {
            return Err(ShowJsonError::Entry {
                key: full,
                error: JsonError::NotADerivation {
                    field: "key",
                    path: clip(key),
                },
            });
        }
        let drv = Derivation::from_show_json(v, Some(sp.drv_name()), sd).map_err(|error| {
            ShowJsonError::Entry {
                key: full.clone(),
                error,
            }
        })?;
        res.insert(full, drv);
    }
    Ok(res)
}

/// The store dirs a document in base names may be for: the hints, `/nix/store`, then every
/// directory some string of the document holds a store path under, each once.
fn candidate_store_dirs(entries: &Map<String, Value>, hints: &[StoreDir]) -> Vec<StoreDir> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut add = |sd: StoreDir| {
        if seen.insert(sd.as_str().to_string()) {
            out.push(sd);
        }
    };
    for h in hints {
        add(h.clone());
    }
    add(StoreDir::default());
    let mut strings = Vec::new();
    for v in entries.values() {
        collect_strings(v, &mut strings);
    }
    for s in strings {
        for dir in store_dirs_in(s) {
            if let Ok(sd) = StoreDir::new(dir) {
                add(sd);
            }
        }
    }
    out
}

fn collect_strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

/// The directories `D` of every `D/<32 nix32 chars>-…` in `s` (D absolute, no separators).
fn store_dirs_in(s: &str) -> Vec<&str> {
    let b = s.as_bytes();
    let mut dirs = Vec::new();
    for (i, _) in s.match_indices('/') {
        let hash_end = i + 1 + 32;
        if i == 0 || b.get(hash_end) != Some(&b'-') {
            continue;
        }
        let Some(hash) = s.get(i + 1..hash_end) else {
            continue;
        };
        if !nix32::is_nix32(hash) {
            continue;
        }
        let start = s[..i]
            .rfind(|c: char| c.is_whitespace() || "\"'`:=;,()[]{}$".contains(c))
            .map_or(0, |p| p + 1);
        let dir = &s[start..i];
        if dir.starts_with('/') {
            dirs.push(dir);
        }
    }
    dirs
}

impl ShowDocument {
    /// The derivations in dependency order (inputs before dependents), each with its store path,
    /// computing missing output paths (inputs first; inputs not in the document are read with
    /// `load_external`). Each one's path must equal its key.
    pub fn import<E, F>(
        self,
        hashes: &mut DrvHashes,
        load_external: &mut F,
    ) -> Result<Vec<(StorePath, Derivation)>, ShowJsonError<E>>
    where
        F: FnMut(&str) -> Result<Derivation, E>,
    {
        let sd = self.store_dir;
        if *hashes.store_dir() != sd {
            return Err(ShowJsonError::WrongStoreDir {
                found: sd.as_str().to_string(),
                wanted: hashes.store_dir().as_str().to_string(),
            });
        }
        let mut raw = self.derivations;
        let order = topological_order(&raw)?;
        let mut done: HashMap<String, Derivation> = HashMap::new();
        let mut result = Vec::with_capacity(order.len());
        for key in order {
            let Some(mut drv) = raw.remove(&key) else {
                continue;
            };
            {
                let mut load = |p: &str| match done.get(p) {
                    Some(d) => Ok(d.clone()),
                    None => load_external(p),
                };
                hashes
                    .fill_input_addressed_paths(&mut drv, &mut load)
                    .map_err(|error| ShowJsonError::Hash {
                        key: key.clone(),
                        error,
                    })?;
            }
            let path = drv.drv_path(&sd).map_err(|error| ShowJsonError::Entry {
                key: key.clone(),
                error: error.into(),
            })?;
            let computed = sd.print(&path);
            if computed != key {
                return Err(ShowJsonError::KeyMismatch { key, computed });
            }
            done.insert(key, drv.clone());
            result.push((path, drv));
        }
        Ok(result)
    }
}

/// The document's own derivations, inputs first (iterative DFS).
fn topological_order<E>(
    raw: &BTreeMap<String, Derivation>,
) -> Result<Vec<String>, ShowJsonError<E>> {
    let mut order: Vec<String> = Vec::with_capacity(raw.len());
    let mut state: HashMap<&str, bool> = HashMap::new(); // false = on the path, true = done
    for root in raw.keys() {
        if state.contains_key(root.as_str()) {
            continue;
        }
        let mut stack: Vec<(&str, bool)> = vec![(root, false)];
        while let Some((key, expanded)) = stack.pop() {
            if expanded {
                state.insert(key, true);
                order.push(key.to_string());
                continue;
            }
            match state.get(key) {
                Some(true) => continue,
                Some(false) => return Err(ShowJsonError::Cycle(key.to_string())),
                None => {}
            }
            state.insert(key, false);
            stack.push((key, true));
            if let Some(d) = raw.get(key) {
                for input in d.input_drvs.keys() {
                    if let Some((k, _)) = raw.get_key_value(input.as_str()) {
                        match state.get(k.as_str()) {
                            Some(true) => {}
                            Some(false) => return Err(ShowJsonError::Cycle(k.clone())),
                            None => stack.push((k, false)),
                        }
                    }
                }
            }
        }
    }
    Ok(order)
}

/// Imports a document of any shape whose paths are in `hashes`' store dir (see
/// [`parse_show_document`] and [`ShowDocument::import`]).
pub fn derivations_from_show_json<E, F>(
    doc: &Value,
    hashes: &mut DrvHashes,
    load_external: &mut F,
) -> Result<Vec<(StorePath, Derivation)>, ShowJsonError<E>>
where
    F: FnMut(&str) -> Result<Derivation, E>,
{
    let parsed = parse_show_document(doc, std::slice::from_ref(hashes.store_dir()))
        .map_err(ShowJsonError::widen)?;
    parsed.import(hashes, load_external)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fod() -> Value {
        json!({
            "outputs": {"out": {"hashAlgo": "sha256", "hash": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}},
            "inputSrcs": [], "inputDrvs": {}, "system": "x86_64-linux", "builder": "/bin/sh",
            "args": ["-c", "printf hello > $out"],
            "env": {"PATH": "/usr/bin:/bin", "builder": "/bin/sh", "name": "mx-fod",
                    "outputHash": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
                    "outputHashAlgo": "sha256", "outputHashMode": "flat", "system": "x86_64-linux"}
        })
    }

    /// mixed.json's mx-fod as Nix 2.33 prints it.
    fn fod_v4() -> Value {
        let mut v = fod();
        let o = v.as_object_mut().unwrap();
        o.remove("inputSrcs");
        o.remove("inputDrvs");
        o.insert("inputs".into(), json!({"srcs": [], "drvs": {}}));
        o.insert("name".into(), json!("mx-fod"));
        o.insert("version".into(), json!(4));
        o.insert(
            "outputs".into(),
            json!({"out": {"method": "flat", "hash": "sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ="}}),
        );
        o["env"]["out"] = json!("/nix/store/ys815iw6x4amdbmrqjzficz815kkixhy-mx-fod");
        v
    }

    const KEY: &str = "/nix/store/jxkwkrwv1n4dzis261s21aj8aavxw98c-mx-fod.drv";
    const BASE: &str = "jxkwkrwv1n4dzis261s21aj8aavxw98c-mx-fod.drv";

    fn no_ext(p: &str) -> Result<Derivation, String> {
        Err(p.to_string())
    }

    #[test]
    fn keyed_by_path_documents() {
        let sd = StoreDir::default();
        let mut hs = DrvHashes::new(sd.clone());
        let mut fod_env = fod();
        fod_env["env"]["out"] = json!("/nix/store/ys815iw6x4amdbmrqjzficz815kkixhy-mx-fod");
        let doc = json!({ KEY: fod_env });
        let list = derivations_from_show_json(&doc, &mut hs, &mut no_ext).unwrap();
        assert_eq!(sd.print(&list[0].0), KEY);
        let wrong = "/nix/store/00000000000000000000000000000000-mx-fod.drv";
        let doc = json!({ wrong: fod() });
        assert!(matches!(
            derivations_from_show_json(&doc, &mut hs, &mut no_ext),
            Err(ShowJsonError::KeyMismatch { .. })
        ));
        // Two derivations depending on each other.
        let a = "/nix/store/00000000000000000000000000000000-a.drv";
        let b = "/nix/store/11111111111111111111111111111111-b.drv";
        let mut da = fod();
        da["inputDrvs"] = json!({ b: ["out"] });
        let mut db = fod();
        db["inputDrvs"] = json!({ a: ["out"] });
        let doc = json!({ a: da, b: db });
        assert!(matches!(
            derivations_from_show_json(&doc, &mut hs, &mut no_ext),
            Err(ShowJsonError::Cycle(_))
        ));
        // A document in another store dir than the caller's.
        let doc = json!({ KEY.replace("/nix/store", "/other"): fod() });
        assert!(matches!(
            derivations_from_show_json(&doc, &mut hs, &mut no_ext),
            Err(ShowJsonError::WrongStoreDir { .. })
        ));
        assert!(matches!(
            derivations_from_show_json(&json!({}), &mut hs, &mut no_ext),
            Err(ShowJsonError::Empty)
        ));
        assert!(matches!(
            derivations_from_show_json(&json!([]), &mut hs, &mut no_ext),
            Err(ShowJsonError::NotAnObject)
        ));
    }

    #[test]
    fn wrapped_and_base_name_documents_find_their_store_dir() {
        let doc = json!({"version": 4, "derivations": { BASE: fod_v4() }});
        // The caller's store dir is tried first, but only /nix/store gives the key.
        let qr_dir = StoreDir::new("/var/lib/qr/store").unwrap();
        let parsed = parse_show_document(&doc, std::slice::from_ref(&qr_dir)).unwrap();
        assert_eq!(parsed.shape, DocumentShape::Wrapped);
        assert_eq!(parsed.store_dir, StoreDir::default());
        let mut hs = DrvHashes::new(StoreDir::default());
        let list = parsed.import(&mut hs, &mut no_ext).unwrap();
        assert_eq!(StoreDir::default().print(&list[0].0), KEY);
        assert_eq!(
            list[0].1.outputs["out"].path(),
            Some("/nix/store/ys815iw6x4amdbmrqjzficz815kkixhy-mx-fod")
        );

        // A version 3 document keyed by base name.
        let mut v3 = fod_v4();
        let o = v3.as_object_mut().unwrap();
        let inputs = o.remove("inputs").unwrap();
        o.insert("inputSrcs".into(), inputs["srcs"].clone());
        o.insert("inputDrvs".into(), inputs["drvs"].clone());
        o.insert("version".into(), json!(3));
        o.insert(
            "outputs".into(),
            json!({"out": {"method": "flat", "hashAlgo": "sha256", "hash": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}}),
        );
        let parsed = parse_show_document(&json!({ BASE: v3 }), &[]).unwrap();
        assert_eq!(parsed.shape, DocumentShape::KeyedByBaseName);
        assert!(parsed.derivations.contains_key(KEY));

        // The same derivation relocated to another store dir is found there from its strings.
        let sd = StoreDir::new("/tmp/qr-test/store").unwrap();
        let mut moved = fod_v4();
        moved["env"].as_object_mut().unwrap().remove("out");
        let d = Derivation::from_show_json(&moved, None, &sd).unwrap();
        moved["env"]["out"] = json!(d.env["out"]);
        let key = sd.print(&d.drv_path(&sd).unwrap());
        let base = key.rsplit_once('/').unwrap().1;
        let parsed =
            parse_show_document(&json!({"version": 4, "derivations": { base: moved }}), &[])
                .unwrap();
        assert_eq!(parsed.store_dir, sd);

        // Nothing matches.
        let wrong = "00000000000000000000000000000000-mx-fod.drv";
        let e = parse_show_document(
            &json!({"version": 4, "derivations": { wrong: fod_v4() }}),
            &[],
        )
        .unwrap_err();
        assert!(matches!(e, ShowJsonError::NoStoreDir { .. }), "{e}");
        assert!(e.to_string().contains("/nix/store"));
    }

    #[test]
    fn malformed_documents() {
        let e = |doc: Value| parse_show_document(&doc, &[]).unwrap_err().to_string();
        assert!(e(json!({"version": 3, "derivations": {}})).contains("version 3"));
        assert!(e(json!({"version": 5, "derivations": {}})).contains("version 5"));
        assert!(e(json!({"version": 4})).contains("\"derivations\" is missing"));
        assert!(e(json!({"version": 4, "derivations": []})).contains("an object"));
        assert!(e(json!({"version": 4, "derivations": {}})).contains("no derivations"));
        assert!(e(json!({"version": 4, "derivations": {"x.drv": fod_v4()}})).contains("\"x.drv\""));
        let not_drv = "jxkwkrwv1n4dzis261s21aj8aavxw98c-mx-fod";
        assert!(
            e(json!({"version": 4, "derivations": { not_drv: fod_v4() }}))
                .contains("not a derivation")
        );
        // An entry of another version inside a version 4 document.
        let mut v5 = fod_v4();
        v5["version"] = json!(5);
        assert!(e(json!({"version": 4, "derivations": { BASE: v5 }})).contains("version 5"));
    }

    #[test]
    fn store_dirs_in_strings() {
        assert_eq!(
            store_dirs_in(
                "PATH=/a/b/00000000000000000000000000000000-x/bin:/nix/store/11111111111111111111111111111111-y"
            ),
            vec!["/a/b", "/nix/store"]
        );
        assert!(store_dirs_in("/00000000000000000000000000000000-x").is_empty());
        assert!(store_dirs_in("/a/0000000000000000000000000000000e-x").is_empty());
    }
}
