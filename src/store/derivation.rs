//! The derivation model (what a `.drv` holds), its type rules, its store path, and conversion to and
//! from the JSON shape of Nix's `derivation show`.
//!
//! Paths are kept as full printed store paths (`/nix/store/…`), exactly as the ATerm holds them, so
//! that printing gives back the bytes Nix wrote.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value, json};
use thiserror::Error;

use super::hash::from_hex;
use super::hash_modulo::{DrvHashes, HashModuloError};
use super::path::{StoreDir, StorePath, StorePathError, output_path_name, validate_name};
use super::placeholder::hash_placeholder;

/// One output of a derivation, as Nix 2.8 distinguishes them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DerivationOutput {
    /// Input-addressed: the path is known at instantiation time.
    InputAddressed { path: String },
    /// Fixed-output (content-addressed with a known hash). `method_algo` is e.g. `r:sha256` or
    /// `sha256`; `hash` is lower-case hex; `path` is the fixed output path.
    CaFixed {
        method_algo: String,
        hash: String,
        path: String,
    },
    /// Floating content-addressed: path known only after the build. `method_algo` e.g. `r:sha256`.
    CaFloating { method_algo: String },
    /// Input-addressed but depending on a floating CA output: path known only after resolution.
    Deferred,
}

impl DerivationOutput {
    /// The output path, if it is known statically.
    pub fn path(&self) -> Option<&str> {
        match self {
            DerivationOutput::InputAddressed { path } | DerivationOutput::CaFixed { path, .. } => {
                Some(path)
            }
            DerivationOutput::CaFloating { .. } | DerivationOutput::Deferred => None,
        }
    }

    /// The `hashAlgo` field of the ATerm tuple and the JSON (`r:sha256`, `sha256`), if any.
    pub fn hash_algo(&self) -> Option<&str> {
        match self {
            DerivationOutput::CaFixed { method_algo, .. }
            | DerivationOutput::CaFloating { method_algo } => Some(method_algo),
            _ => None,
        }
    }

    /// The fixed hash (hex), if any.
    pub fn hash(&self) -> Option<&str> {
        match self {
            DerivationOutput::CaFixed { hash, .. } => Some(hash),
            _ => None,
        }
    }
}

/// What kind of derivation this is, from its outputs (Nix's `BasicDerivation::type()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DerivationType {
    InputAddressed,
    DeferredInputAddressed,
    CaFixed,
    CaFloating,
}

/// A derivation whose outputs break Nix's typing rules.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DerivationTypeError {
    #[error("derivation must have at least one output")]
    NoOutputs,
    #[error("only one fixed output is allowed, and it must be named \"out\"")]
    BadFixedOutputs,
    #[error("all floating outputs must use the same hash method and algorithm")]
    MixedFloatingAlgos,
    #[error("can't mix derivation output types")]
    MixedOutputTypes,
}

/// A derivation: the contents of a `.drv` plus its name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// The derivation name (the drv file's name without hash part and `.drv`).
    pub name: String,
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivation paths → the outputs used from each.
    pub input_drvs: BTreeMap<String, BTreeSet<String>>,
    pub input_srcs: BTreeSet<String>,
    pub system: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// Errors of the store-path level operations on a derivation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DerivationError {
    #[error("derivation name {name:?} is invalid: {why}")]
    BadName { name: String, why: &'static str },
    #[error(transparent)]
    Type(#[from] DerivationTypeError),
    #[error(transparent)]
    StorePath(#[from] StorePathError),
    #[error("fixed output {output:?} has unsupported hash {method_algo:?}:{hash:?}")]
    BadFixedHash {
        output: String,
        method_algo: String,
        hash: String,
    },
}

impl Derivation {
    /// Nix's derivation type, or why the outputs are inconsistent.
    pub fn drv_type(&self) -> Result<DerivationType, DerivationTypeError> {
        let (mut ia, mut fixed, mut floating, mut deferred) = (0usize, 0usize, 0usize, 0usize);
        let mut floating_algo: Option<&str> = None;
        for out in self.outputs.values() {
            match out {
                DerivationOutput::InputAddressed { .. } => ia += 1,
                DerivationOutput::CaFixed { .. } => fixed += 1,
                DerivationOutput::CaFloating { method_algo } => {
                    floating += 1;
                    match floating_algo {
                        None => floating_algo = Some(method_algo),
                        Some(a) if a != method_algo => {
                            return Err(DerivationTypeError::MixedFloatingAlgos);
                        }
                        Some(_) => {}
                    }
                }
                DerivationOutput::Deferred => deferred += 1,
            }
        }
        match (ia, fixed, floating, deferred) {
            (0, 0, 0, 0) => Err(DerivationTypeError::NoOutputs),
            (_, 0, 0, 0) => Ok(DerivationType::InputAddressed),
            (0, _, 0, 0) => {
                if fixed == 1 && self.outputs.contains_key("out") {
                    Ok(DerivationType::CaFixed)
                } else {
                    Err(DerivationTypeError::BadFixedOutputs)
                }
            }
            (0, 0, _, 0) => Ok(DerivationType::CaFloating),
            (0, 0, 0, _) => Ok(DerivationType::DeferredInputAddressed),
            _ => Err(DerivationTypeError::MixedOutputTypes),
        }
    }

    /// True if any output is floating content-addressed.
    pub fn is_ca_floating(&self) -> bool {
        self.outputs
            .values()
            .any(|o| matches!(o, DerivationOutput::CaFloating { .. }))
    }

    /// True if this is a fixed-output derivation (any output has a fixed hash).
    pub fn is_fixed_output(&self) -> bool {
        self.outputs
            .values()
            .any(|o| matches!(o, DerivationOutput::CaFixed { .. }))
    }

    /// True if any output is deferred (an IA derivation with a CA input somewhere below).
    pub fn has_deferred_outputs(&self) -> bool {
        self.outputs
            .values()
            .any(|o| matches!(o, DerivationOutput::Deferred))
    }

    /// Whether Nix resolves this derivation before building it: deferred IA, or CA floating with
    /// at least one input derivation.
    pub fn needs_resolution(&self) -> bool {
        self.has_deferred_outputs() || (self.is_ca_floating() && !self.input_drvs.is_empty())
    }

    /// Output names, sorted.
    pub fn output_names(&self) -> impl Iterator<Item = &str> {
        self.outputs.keys().map(String::as_str)
    }

    /// The statically known output paths (IA and fixed outputs).
    pub fn static_output_paths(&self) -> BTreeMap<&str, &str> {
        self.outputs
            .iter()
            .filter_map(|(n, o)| o.path().map(|p| (n.as_str(), p)))
            .collect()
    }

    /// The references of the `.drv` file: `inputSrcs` ∪ the input drv paths.
    pub fn references(&self) -> BTreeSet<&str> {
        self.input_srcs
            .iter()
            .chain(self.input_drvs.keys())
            .map(String::as_str)
            .collect()
    }

    /// The ATerm text (`Derive(…)`).
    pub fn to_aterm(&self) -> String {
        super::aterm::print(self)
    }

    /// The store path of this derivation's `.drv` file: a text path named `<name>.drv` over the
    /// ATerm, with references `inputSrcs` ∪ input drv paths.
    pub fn drv_path(&self, store_dir: &StoreDir) -> Result<StorePath, DerivationError> {
        let file_name = format!("{}.drv", self.name);
        validate_name(&file_name).map_err(|why| DerivationError::BadName {
            name: self.name.clone(),
            why,
        })?;
        Ok(store_dir.make_text_path(&file_name, self.to_aterm().as_bytes(), self.references()))
    }

    /// The path of a fixed output as Nix computes it from its hash (`makeFixedOutputPath`).
    pub fn fixed_output_path(
        &self,
        store_dir: &StoreDir,
        output: &str,
        method_algo: &str,
        hash_hex: &str,
    ) -> Result<StorePath, DerivationError> {
        let name = output_path_name(&self.name, output);
        validate_name(&name).map_err(|why| DerivationError::BadName {
            name: name.clone(),
            why,
        })?;
        let bad = || DerivationError::BadFixedHash {
            output: output.to_string(),
            method_algo: method_algo.to_string(),
            hash: hash_hex.to_string(),
        };
        let (method, algo) = split_method_algo(method_algo).ok_or_else(bad)?;
        if hex_len(algo) != Some(hash_hex.len())
            || !hash_hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad());
        }
        match (method, algo) {
            ("r:", "sha256") => {
                let h = from_hex(hash_hex).ok_or_else(bad)?;
                Ok(store_dir.make_source_path(&name, &h, [], false))
            }
            ("" | "r:", _) => Ok(store_dir.make_fixed_output_path(method_algo, hash_hex, &name)),
            _ => Err(bad()),
        }
    }

    /// Nix's `derivation show` JSON object for this derivation (without the drv path key).
    pub fn to_show_json(&self) -> Value {
        let mut outputs = Map::new();
        for (name, out) in &self.outputs {
            let mut o = Map::new();
            if let Some(p) = out.path() {
                o.insert("path".into(), json!(p));
            }
            if let Some(a) = out.hash_algo() {
                o.insert("hashAlgo".into(), json!(a));
            }
            if let Some(h) = out.hash() {
                o.insert("hash".into(), json!(h));
            }
            outputs.insert(name.clone(), Value::Object(o));
        }
        json!({
            "outputs": outputs,
            "inputSrcs": self.input_srcs,
            "inputDrvs": self.input_drvs,
            "system": self.system,
            "builder": self.builder,
            "args": self.args,
            "env": self.env,
        })
    }

    /// Reads Nix's `derivation show` JSON shape. Output `path`s may be absent: a fixed output's
    /// path is then computed from its hash (and `env[o]` set to it when absent); an output with no
    /// path and no `hashAlgo` comes back as [`DerivationOutput::Deferred`] — use
    /// [`crate::store::hash_modulo::DrvHashes::fill_input_addressed_paths`] to turn it into an
    /// input-addressed output when none of its inputs is deferred. A floating output's `env[o]`
    /// defaults to its hash placeholder. The name comes from `name`, else `env["name"]`.
    pub fn from_show_json(
        v: &Value,
        name: Option<&str>,
        store_dir: &StoreDir,
    ) -> Result<Derivation, JsonError> {
        let obj = v.as_object().ok_or(JsonError::NotAnObject("derivation"))?;
        let str_field = |k: &'static str| -> Result<String, JsonError> {
            obj.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or(JsonError::Field(k, "a string"))
        };
        let str_list = |v: &Value, k: &'static str| -> Result<Vec<String>, JsonError> {
            v.as_array()
                .ok_or(JsonError::Field(k, "an array of strings"))?
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or(JsonError::Field(k, "an array of strings"))
                })
                .collect()
        };
        let system = str_field("system")?;
        let builder = str_field("builder")?;
        let args = str_list(obj.get("args").unwrap_or(&Value::Null), "args")?;
        let mut env = BTreeMap::new();
        if let Some(e) = obj.get("env") {
            for (k, v) in e.as_object().ok_or(JsonError::Field("env", "an object"))? {
                let v = v
                    .as_str()
                    .ok_or(JsonError::Field("env", "an object of strings"))?;
                env.insert(k.clone(), v.to_string());
            }
        }
        let input_srcs: BTreeSet<String> = match obj.get("inputSrcs") {
            Some(v) => str_list(v, "inputSrcs")?.into_iter().collect(),
            None => BTreeSet::new(),
        };
        let mut input_drvs = BTreeMap::new();
        if let Some(d) = obj.get("inputDrvs") {
            for (k, v) in d
                .as_object()
                .ok_or(JsonError::Field("inputDrvs", "an object"))?
            {
                // Newer Nix writes `{"outputs": [...], "dynamicOutputs": {}}`.
                let outs = match v.get("outputs") {
                    Some(o) => o,
                    None => v,
                };
                input_drvs.insert(
                    k.clone(),
                    str_list(outs, "inputDrvs")?.into_iter().collect(),
                );
            }
        }
        let name = match name {
            Some(n) => n.to_string(),
            None => env
                .get("name")
                .cloned()
                .ok_or(JsonError::Field("env.name", "a string"))?,
        };
        let mut drv = Derivation {
            name,
            outputs: BTreeMap::new(),
            input_drvs,
            input_srcs,
            system,
            builder,
            args,
            env,
        };
        let outs = obj
            .get("outputs")
            .and_then(Value::as_object)
            .ok_or(JsonError::Field("outputs", "an object"))?;
        for (oname, o) in outs {
            let o = o.as_object().ok_or(JsonError::NotAnObject("output"))?;
            let get = |k: &'static str| -> Result<Option<String>, JsonError> {
                match o.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) if s.is_empty() => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(JsonError::Field(k, "a string")),
                }
            };
            let (path, algo, hash) = (get("path")?, get("hashAlgo")?, get("hash")?);
            let out = match (algo, hash, path) {
                (Some(method_algo), Some(hash), path) => {
                    let path = match path {
                        Some(p) => p,
                        None => {
                            let p = drv.fixed_output_path(store_dir, oname, &method_algo, &hash)?;
                            let p = store_dir.print(&p);
                            drv.env.entry(oname.clone()).or_insert_with(|| p.clone());
                            p
                        }
                    };
                    DerivationOutput::CaFixed {
                        method_algo,
                        hash,
                        path,
                    }
                }
                (Some(method_algo), None, None) => {
                    drv.env
                        .entry(oname.clone())
                        .or_insert_with(|| hash_placeholder(oname));
                    DerivationOutput::CaFloating { method_algo }
                }
                (None, None, Some(path)) => DerivationOutput::InputAddressed { path },
                (None, None, None) => DerivationOutput::Deferred,
                _ => return Err(JsonError::BadOutput(oname.clone())),
            };
            drv.outputs.insert(oname.clone(), out);
        }
        Ok(drv)
    }
}

/// Splits `r:sha256` into (`r:`, `sha256`); `text:` and no prefix are also accepted.
pub fn split_method_algo(method_algo: &str) -> Option<(&str, &str)> {
    let (method, algo) = if let Some(a) = method_algo.strip_prefix("r:") {
        ("r:", a)
    } else if let Some(a) = method_algo.strip_prefix("text:") {
        ("text:", a)
    } else {
        ("", method_algo)
    };
    hex_len(algo).map(|_| (method, algo))
}

/// Length of the hex rendering of a hash of this algorithm.
fn hex_len(algo: &str) -> Option<usize> {
    match algo {
        "md5" => Some(32),
        "sha1" => Some(40),
        "sha256" => Some(64),
        "sha512" => Some(128),
        _ => None,
    }
}

/// True for a lower-case hex hash of the right length for `method_algo`.
pub fn is_valid_fixed_hash(method_algo: &str, hash: &str) -> bool {
    split_method_algo(method_algo).and_then(|(_, a)| hex_len(a)) == Some(hash.len())
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why a `derivation show` JSON object could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum JsonError {
    #[error("expected a JSON object for the {0}")]
    NotAnObject(&'static str),
    #[error("field {0:?} must be {1}")]
    Field(&'static str, &'static str),
    #[error(
        "output {0:?}: needs either `path`, or `hashAlgo` (floating), or `hashAlgo` and `hash` (fixed)"
    )]
    BadOutput(String),
    #[error(transparent)]
    Derivation(#[from] DerivationError),
}

/// Why a `derivation show` document (drv path → derivation) could not be imported.
#[derive(Debug, Error)]
pub enum ShowJsonError<E> {
    #[error("expected a JSON object mapping derivation paths to derivations")]
    NotAnObject,
    #[error("{key:?} is not a derivation path: {error}")]
    BadKey { key: String, error: StorePathError },
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

/// Imports a `derivation show` document (`{"<drv path>": {…}, …}`), computing missing output
/// paths (inputs first; inputs not in the document are read with `load_external`). Returns the
/// derivations in dependency order (inputs before dependents), each with its store path, which
/// must equal its key.
pub fn derivations_from_show_json<E, F>(
    doc: &Value,
    hashes: &mut DrvHashes,
    load_external: &mut F,
) -> Result<Vec<(StorePath, Derivation)>, ShowJsonError<E>>
where
    F: FnMut(&str) -> Result<Derivation, E>,
{
    let sd = hashes.store_dir().clone();
    let obj = doc.as_object().ok_or(ShowJsonError::NotAnObject)?;
    let mut raw: BTreeMap<&str, Derivation> = BTreeMap::new();
    for (key, v) in obj {
        let sp = sd.parse(key).map_err(|error| ShowJsonError::BadKey {
            key: key.clone(),
            error,
        })?;
        let drv = Derivation::from_show_json(v, Some(sp.drv_name()), &sd).map_err(|error| {
            ShowJsonError::Entry {
                key: key.clone(),
                error,
            }
        })?;
        raw.insert(key.as_str(), drv);
    }
    // Topological order over the document's own derivations (iterative DFS).
    let mut order: Vec<&str> = Vec::with_capacity(raw.len());
    let mut state: HashMap<&str, bool> = HashMap::new(); // false = on the path, true = done
    for &root in raw.keys() {
        if state.contains_key(root) {
            continue;
        }
        let mut stack: Vec<(&str, bool)> = vec![(root, false)];
        while let Some((key, expanded)) = stack.pop() {
            if expanded {
                state.insert(key, true);
                order.push(key);
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
                    if let Some((&k, _)) = raw.get_key_value(input.as_str()) {
                        match state.get(k) {
                            Some(true) => {}
                            Some(false) => return Err(ShowJsonError::Cycle(k.to_string())),
                            None => stack.push((k, false)),
                        }
                    }
                }
            }
        }
    }
    let mut done: HashMap<String, Derivation> = HashMap::new();
    let mut result = Vec::with_capacity(order.len());
    for key in order {
        let Some(mut drv) = raw.remove(key) else {
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
                    key: key.to_string(),
                    error,
                })?;
        }
        let path = drv.drv_path(&sd).map_err(|error| ShowJsonError::Entry {
            key: key.to_string(),
            error: error.into(),
        })?;
        let computed = sd.print(&path);
        if computed != key {
            return Err(ShowJsonError::KeyMismatch {
                key: key.to_string(),
                computed,
            });
        }
        done.insert(key.to_string(), drv.clone());
        result.push((path, drv));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(path: &str) -> DerivationOutput {
        DerivationOutput::InputAddressed { path: path.into() }
    }

    #[test]
    fn types() {
        let mut d = Derivation::default();
        assert_eq!(d.drv_type(), Err(DerivationTypeError::NoOutputs));
        d.outputs.insert("out".into(), out("/nix/store/x"));
        assert_eq!(d.drv_type(), Ok(DerivationType::InputAddressed));
        d.outputs.insert("dev".into(), DerivationOutput::Deferred);
        assert_eq!(d.drv_type(), Err(DerivationTypeError::MixedOutputTypes));
        d.outputs.clear();
        d.outputs.insert(
            "dev".into(),
            DerivationOutput::CaFixed {
                method_algo: "sha256".into(),
                hash: "00".repeat(32),
                path: "/nix/store/x".into(),
            },
        );
        assert_eq!(d.drv_type(), Err(DerivationTypeError::BadFixedOutputs));
        d.outputs.clear();
        for (n, a) in [("a", "r:sha256"), ("b", "sha256")] {
            d.outputs.insert(
                n.into(),
                DerivationOutput::CaFloating {
                    method_algo: a.into(),
                },
            );
        }
        assert_eq!(d.drv_type(), Err(DerivationTypeError::MixedFloatingAlgos));
    }

    #[test]
    fn resolution_predicate() {
        let mut d = Derivation::default();
        d.outputs.insert(
            "out".into(),
            DerivationOutput::CaFloating {
                method_algo: "r:sha256".into(),
            },
        );
        assert!(!d.needs_resolution());
        d.input_drvs
            .insert("/nix/store/a.drv".into(), ["out".to_string()].into());
        assert!(d.needs_resolution());
        d.outputs.insert("out".into(), out("/nix/store/x"));
        assert!(!d.needs_resolution());
        d.outputs.insert("out".into(), DerivationOutput::Deferred);
        assert!(d.needs_resolution());
    }

    #[test]
    fn fixed_output_path_of_fixture_fod() {
        // mixed.json: mx-fod, flat sha256 of "hello".
        let d = Derivation {
            name: "mx-fod".into(),
            ..Default::default()
        };
        let sd = StoreDir::default();
        let p = d
            .fixed_output_path(
                &sd,
                "out",
                "sha256",
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            )
            .unwrap();
        assert_eq!(
            sd.print(&p),
            "/nix/store/ys815iw6x4amdbmrqjzficz815kkixhy-mx-fod"
        );
        assert!(d.fixed_output_path(&sd, "out", "sha256", "abc").is_err());
        assert!(d.fixed_output_path(&sd, "out", "crc32", "00").is_err());
    }

    #[test]
    fn json_round_trip_and_missing_paths() {
        let sd = StoreDir::default();
        let v = json!({
            "outputs": {"out": {"hashAlgo": "sha256", "hash": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}},
            "inputSrcs": [], "inputDrvs": {}, "system": "x86_64-linux", "builder": "/bin/sh",
            "args": ["-c", "printf hello > $out"],
            "env": {"name": "mx-fod"}
        });
        let d = Derivation::from_show_json(&v, None, &sd).unwrap();
        assert_eq!(
            d.outputs["out"].path(),
            Some("/nix/store/ys815iw6x4amdbmrqjzficz815kkixhy-mx-fod")
        );
        assert_eq!(
            d.env["out"],
            "/nix/store/ys815iw6x4amdbmrqjzficz815kkixhy-mx-fod"
        );
        let back = Derivation::from_show_json(&d.to_show_json(), None, &sd).unwrap();
        assert_eq!(back, d);
        let bad = json!({"outputs": {"out": {"hash": "00"}}, "system": "s", "builder": "b",
            "args": [], "env": {"name": "x"}});
        assert!(matches!(
            Derivation::from_show_json(&bad, None, &sd),
            Err(JsonError::BadOutput(_))
        ));
        assert!(Derivation::from_show_json(&json!([]), None, &sd).is_err());
    }

    #[test]
    fn show_json_documents() {
        let sd = StoreDir::default();
        let fod = json!({
            "outputs": {"out": {"hashAlgo": "sha256", "hash": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}},
            "inputSrcs": [], "inputDrvs": {}, "system": "x86_64-linux", "builder": "/bin/sh",
            "args": ["-c", "printf hello > $out"],
            "env": {"PATH": "/usr/bin:/bin", "builder": "/bin/sh", "name": "mx-fod",
                    "outputHash": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
                    "outputHashAlgo": "sha256", "outputHashMode": "flat", "system": "x86_64-linux"}
        });
        let key = "/nix/store/jxkwkrwv1n4dzis261s21aj8aavxw98c-mx-fod.drv";
        let mut ext = |p: &str| -> Result<Derivation, String> { Err(p.to_string()) };
        let mut hs = DrvHashes::new(sd.clone());
        let doc = json!({ key: fod.clone() });
        let list = derivations_from_show_json(&doc, &mut hs, &mut ext).unwrap();
        assert_eq!(sd.print(&list[0].0), key);
        let wrong = "/nix/store/00000000000000000000000000000000-mx-fod.drv";
        let doc = json!({ wrong: fod.clone() });
        assert!(matches!(
            derivations_from_show_json(&doc, &mut hs, &mut ext),
            Err(ShowJsonError::KeyMismatch { .. })
        ));
        // Two derivations depending on each other.
        let a = "/nix/store/00000000000000000000000000000000-a.drv";
        let b = "/nix/store/11111111111111111111111111111111-b.drv";
        let mut da = fod.clone();
        da["inputDrvs"] = json!({ b: ["out"] });
        let mut db = fod;
        db["inputDrvs"] = json!({ a: ["out"] });
        let doc = json!({ a: da, b: db });
        assert!(matches!(
            derivations_from_show_json(&doc, &mut hs, &mut ext),
            Err(ShowJsonError::Cycle(_))
        ));
    }
}
