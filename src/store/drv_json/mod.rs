//! Derivations as JSON, in every shape `nix show-derivation` / `nix derivation show` has written
//! from Nix 2.8 to 2.35, read into the one [`Derivation`] model (the ATerm's contents).
//!
//! One derivation object comes in three formats, told apart by its `version` field
//! ([`Format`]):
//!
//! - **unversioned** (Nix 2.8–2.31, Nix's informal versions 1 and 2): full store paths,
//!   `inputSrcs` and `inputDrvs`; outputs with `hashAlgo` like `r:sha256` (before 2.23) or
//!   `method` + `hashAlgo` (2.23 on); `name` since 2.15; `inputDrvs` values are output lists, or
//!   `{"outputs", "dynamicOutputs"}` since 2.18. See [`unversioned`].
//! - **version 3** (Nix 2.32): store paths are base names (no store dir), fixed outputs have no
//!   `path`, `structuredAttrs` holds what the ATerm keeps as `env.__json`. See [`v3`].
//! - **version 4** (Nix 2.33 on): like 3, with `inputs: {srcs, drvs}` and fixed outputs as a
//!   content address `{"method", "hash": "<SRI>"}`. See [`v4`].
//!
//! Whole documents (what the command prints: a map keyed by drv path, or since 2.33
//! `{"version": 4, "derivations": {…}}`) are read by [`document`]. Outputs: [`outputs`].

pub mod document;
pub mod fields;
pub mod outputs;
pub mod unversioned;
pub mod v3;
pub mod v4;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};
use thiserror::Error;

pub use document::{
    DocumentShape, ShowDocument, ShowJsonError, derivations_from_show_json, parse_show_document,
};

use crate::store::derivation::{Derivation, DerivationError, DerivationOutput, DynamicNode};
use crate::store::path::{StoreDir, StorePathError};
use crate::store::placeholder::hash_placeholder;
use fields::{Obj, nlohmann_dump};
use outputs::RawOutput;

/// The format of one derivation object, from its `version` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// No `version`: Nix 2.8–2.31.
    Unversioned,
    /// `"version": 3`: Nix 2.32.
    V3,
    /// `"version": 4`: Nix 2.33 and later.
    V4,
}

impl Format {
    /// The format of a derivation object, or why it is none qr reads.
    pub fn detect(obj: &Map<String, Value>) -> Result<Format, JsonError> {
        match obj.get("version") {
            None => Ok(Format::Unversioned),
            Some(v) => Format::from_version(v),
        }
    }

    /// A `version` value as a format.
    pub fn from_version(v: &Value) -> Result<Format, JsonError> {
        match v.as_u64() {
            Some(3) => Ok(Format::V3),
            Some(4) => Ok(Format::V4),
            _ if v.is_number() => Err(JsonError::UnknownVersion(v.to_string())),
            _ => Err(JsonError::Field("version", "a number")),
        }
    }
}

/// Why a derivation JSON object could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum JsonError {
    #[error("expected a JSON object for the {0}")]
    NotAnObject(&'static str),
    #[error("field {0:?} is missing")]
    Missing(&'static str),
    #[error("field {0:?} must be {1}")]
    Field(&'static str, &'static str),
    #[error(
        "derivation JSON format version {0} is not one qr reads (it reads Nix 2.8–2.31's \
         unversioned format, version 3 of Nix 2.32 and version 4 of Nix 2.33 and later)"
    )]
    UnknownVersion(String),
    #[error("{field:?}: {path:?} is not a valid store path here: {error}")]
    BadStorePath {
        field: &'static str,
        path: String,
        error: StorePathError,
    },
    #[error("{field:?}: {path:?} is not a derivation (.drv)")]
    NotADerivation { field: &'static str, path: String },
    #[error(
        "output {0:?}: needs either `path`, or `hashAlgo` (floating), or `hashAlgo` and `hash` \
         (fixed), in the keys of the document's format"
    )]
    BadOutput(String),
    #[error("output {0:?} is impure: impure derivations are not supported")]
    Impure(String),
    #[error("output {output:?}: content-addressing method {method:?} is not supported")]
    UnsupportedMethod { output: String, method: String },
    #[error("output {output:?}: hash algorithm {what:?} is not supported")]
    UnsupportedHash { output: String, what: String },
    #[error("output {output:?}: bad hash {hash:?}: {why}")]
    BadHash {
        output: String,
        hash: String,
        why: &'static str,
    },
    #[error("output {output:?}: the given path {given} is not the fixed output's path {computed}")]
    FixedPathMismatch {
        output: String,
        given: String,
        computed: String,
    },
    #[error("input derivation {0}: dynamicOutputs nested too deeply")]
    DynamicTooDeep(String),
    #[error("both `structuredAttrs` and `env.__json` are given")]
    StructuredAttrsTwice,
    #[error(transparent)]
    Derivation(#[from] DerivationError),
}

/// What a format's reader gives back: everything but the outputs, which need the name.
pub(crate) struct Parts {
    pub name: Option<String>,
    pub input_srcs: BTreeSet<String>,
    pub input_drvs: BTreeMap<String, BTreeSet<String>>,
    pub dynamic_inputs: BTreeMap<String, BTreeMap<String, DynamicNode>>,
}

impl Derivation {
    /// Nix 2.8's `show-derivation` JSON object for this derivation (without the drv path key).
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
            "inputDrvs": self.input_drvs_json(),
            "system": self.system,
            "builder": self.builder,
            "args": self.args,
            "env": self.env,
        })
    }

    /// `inputDrvs` as Nix 2.8 writes it (`path: [outputs]`), except that an input with dynamic
    /// outputs is written as Nix 2.18 on write every input:
    /// `{"outputs": [...], "dynamicOutputs": {name: node}}` (2.8 has no such inputs).
    fn input_drvs_json(&self) -> Value {
        fn node(outs: &BTreeSet<String>, dynamic: &BTreeMap<String, DynamicNode>) -> Value {
            let d: Map<String, Value> = dynamic
                .iter()
                .map(|(k, n)| (k.clone(), node(&n.outputs, &n.dynamic_outputs)))
                .collect();
            json!({"dynamicOutputs": d, "outputs": outs})
        }
        let mut m = Map::new();
        for (p, outs) in &self.input_drvs {
            let v = match self.dynamic_inputs.get(p) {
                Some(d) if !d.is_empty() => node(outs, d),
                _ => json!(outs),
            };
            m.insert(p.clone(), v);
        }
        Value::Object(m)
    }

    /// Reads one derivation object in any [`Format`] (detected from its `version`); store paths
    /// written as base names are taken to be in `store_dir`, full ones must be in it.
    ///
    /// A fixed output's `path` may be absent (versions 3 and 4 never write it): it is computed
    /// from the hash (and `env[o]` set to it when absent); when given it must be that path. An
    /// output with no path and no `hashAlgo` comes back as [`DerivationOutput::Deferred`] — use
    /// [`crate::store::hash_modulo::DrvHashes::fill_input_addressed_paths`] to turn it into an
    /// input-addressed output when none of its inputs is deferred. A floating output's `env[o]`
    /// defaults to its hash placeholder. The name comes from `name`, else the `name` argument
    /// (the drv path's), else `env["name"]`.
    pub fn from_show_json(
        v: &Value,
        name: Option<&str>,
        store_dir: &StoreDir,
    ) -> Result<Derivation, JsonError> {
        let obj = Obj::new(v, "derivation")?;
        let format = Format::detect(obj.map)?;
        let parts = match format {
            Format::Unversioned => unversioned::parts(&obj, store_dir)?,
            Format::V3 => v3::parts(&obj, store_dir)?,
            Format::V4 => v4::parts(&obj, store_dir)?,
        };
        let system = obj.string("system")?;
        let builder = obj.string("builder")?;
        let args = match (format, obj.get("args")) {
            (Format::Unversioned, None) => Vec::new(),
            _ => fields::string_list(obj.required("args")?, "args")?,
        };
        let mut env = match (format, obj.get("env")) {
            (Format::Unversioned, None) => BTreeMap::new(),
            _ => fields::env(obj.required("env")?)?,
        };
        if format != Format::Unversioned
            && let Some(sa) = obj.get("structuredAttrs")
        {
            if !sa.is_object() {
                return Err(JsonError::Field("structuredAttrs", "an object"));
            }
            if env.contains_key("__json") {
                return Err(JsonError::StructuredAttrsTwice);
            }
            env.insert("__json".into(), nlohmann_dump(sa));
        }
        let name = match parts.name.as_deref().or(name) {
            Some(n) => n.to_string(),
            None => env
                .get("name")
                .cloned()
                .ok_or(JsonError::Field("env.name", "a string"))?,
        };
        let mut drv = Derivation {
            name,
            outputs: BTreeMap::new(),
            input_drvs: parts.input_drvs,
            dynamic_inputs: parts.dynamic_inputs,
            input_srcs: parts.input_srcs,
            system,
            builder,
            args,
            env,
        };
        let outs = obj
            .required("outputs")?
            .as_object()
            .ok_or(JsonError::Field("outputs", "an object"))?;
        for (oname, o) in outs {
            let out = match outputs::parse(format, store_dir, oname, o)? {
                RawOutput::InputAddressed(path) => DerivationOutput::InputAddressed { path },
                RawOutput::Fixed {
                    method_algo,
                    hash,
                    path,
                } => {
                    let computed = drv.fixed_output_path(store_dir, oname, &method_algo, &hash)?;
                    let computed = store_dir.print(&computed);
                    if let Some(given) = path
                        && given != computed
                    {
                        return Err(JsonError::FixedPathMismatch {
                            output: oname.clone(),
                            given,
                            computed,
                        });
                    }
                    drv.env
                        .entry(oname.clone())
                        .or_insert_with(|| computed.clone());
                    DerivationOutput::CaFixed {
                        method_algo,
                        hash,
                        path: computed,
                    }
                }
                RawOutput::Floating { method_algo } => {
                    drv.env
                        .entry(oname.clone())
                        .or_insert_with(|| hash_placeholder(oname));
                    DerivationOutput::CaFloating { method_algo }
                }
                RawOutput::Deferred => DerivationOutput::Deferred,
            };
            drv.outputs.insert(oname.clone(), out);
        }
        Ok(drv)
    }
}

/// Input derivations (drv path → outputs) and dynamic inputs of `inputDrvs` / `inputs.drvs`.
pub(crate) type InputDrvs = (
    BTreeMap<String, BTreeSet<String>>,
    BTreeMap<String, BTreeMap<String, DynamicNode>>,
);

/// `inputDrvs` / `inputs.drvs`: drv path → outputs (and dynamic outputs), paths in `form`.
pub(crate) fn input_drvs(
    v: &Value,
    field: &'static str,
    form: fields::PathForm,
    sd: &StoreDir,
) -> Result<InputDrvs, JsonError> {
    let mut res = BTreeMap::new();
    let mut dynamic = BTreeMap::new();
    for (k, outs) in v.as_object().ok_or(JsonError::Field(field, "an object"))? {
        let path = fields::store_path(sd, form, field, k, true)?;
        let (outs, dyn_outs) = fields::input_drv_outputs(k, outs)?;
        if !dyn_outs.is_empty() {
            dynamic.insert(path.clone(), dyn_outs);
        }
        res.insert(path, outs);
    }
    Ok((res, dynamic))
}

/// `inputSrcs` / `inputs.srcs`: store paths in `form`.
pub(crate) fn input_srcs(
    v: &Value,
    field: &'static str,
    form: fields::PathForm,
    sd: &StoreDir,
) -> Result<BTreeSet<String>, JsonError> {
    fields::string_list(v, field)?
        .iter()
        .map(|s| fields::store_path(sd, form, field, s, false))
        .collect()
}
