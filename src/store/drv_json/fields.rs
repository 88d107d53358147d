//! Reading the fields every derivation JSON format shares: strings, string lists, `env`, store
//! paths in the document's path form, and the value of one input derivation.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::JsonError;
use crate::store::aterm::MAX_DYNAMIC_DEPTH;
use crate::store::clip;
use crate::store::derivation::DynamicNode;
use crate::store::path::{StoreDir, StorePath};

/// How a format writes store paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathForm {
    /// Full printed paths (`/nix/store/<hash>-<name>`): the unversioned format, Nix 2.8–2.31.
    Full,
    /// Base names (`<hash>-<name>`) relative to the store dir: versions 3 and 4, Nix 2.32 on.
    BaseName,
}

/// A JSON object with the name of what it is, for error messages.
pub struct Obj<'a> {
    pub map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    pub fn new(v: &'a Value, what: &'static str) -> Result<Self, JsonError> {
        v.as_object()
            .map(|map| Obj { map })
            .ok_or(JsonError::NotAnObject(what))
    }

    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.map.get(k)
    }

    /// A required field.
    pub fn required(&self, k: &'static str) -> Result<&'a Value, JsonError> {
        self.map.get(k).ok_or(JsonError::Missing(k))
    }

    pub fn string(&self, k: &'static str) -> Result<String, JsonError> {
        self.required(k)?
            .as_str()
            .map(str::to_string)
            .ok_or(JsonError::Field(k, "a string"))
    }

    /// A string field that may be absent, null or empty (the unversioned format's outputs).
    pub fn opt_string(&self, k: &'static str) -> Result<Option<String>, JsonError> {
        match self.map.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(JsonError::Field(k, "a string")),
        }
    }

    /// The set of keys, to tell output kinds apart the way Nix does.
    pub fn keys(&self) -> BTreeSet<&'a str> {
        self.map.keys().map(String::as_str).collect()
    }
}

/// An array of strings.
pub fn string_list(v: &Value, k: &'static str) -> Result<Vec<String>, JsonError> {
    v.as_array()
        .ok_or(JsonError::Field(k, "an array of strings"))?
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_string)
                .ok_or(JsonError::Field(k, "an array of strings"))
        })
        .collect()
}

/// `env`: an object of strings.
pub fn env(v: &Value) -> Result<BTreeMap<String, String>, JsonError> {
    let mut env = BTreeMap::new();
    for (k, v) in v.as_object().ok_or(JsonError::Field("env", "an object"))? {
        let v = v
            .as_str()
            .ok_or(JsonError::Field("env", "an object of strings"))?;
        env.insert(k.clone(), v.to_string());
    }
    Ok(env)
}

/// A store path as the document writes it, checked, as the full printed path the model keeps.
/// `drv`: it must name a derivation (`.drv`).
pub fn store_path(
    sd: &StoreDir,
    form: PathForm,
    field: &'static str,
    s: &str,
    drv: bool,
) -> Result<String, JsonError> {
    let bad = |error| JsonError::BadStorePath {
        field,
        path: clip(s),
        error,
    };
    let p = match form {
        PathForm::Full => sd.parse(s).map_err(bad)?,
        PathForm::BaseName => StorePath::from_base_name(s).map_err(bad)?,
    };
    if drv && !p.is_derivation() {
        return Err(JsonError::NotADerivation {
            field,
            path: clip(s),
        });
    }
    Ok(sd.print(&p))
}

/// The outputs used of one input derivation: `["out", …]` (Nix before 2.18), or
/// `{"outputs": [...], "dynamicOutputs": {…}}` (Nix 2.18 on), with the dynamic outputs (outputs
/// of the derivations that outputs of this input hold: dynamic derivations) to any depth up to
/// [`MAX_DYNAMIC_DEPTH`].
pub fn input_drv_outputs(
    input: &str,
    v: &Value,
) -> Result<(BTreeSet<String>, BTreeMap<String, DynamicNode>), JsonError> {
    input_node(input, v, 1).map(|n| (n.outputs, n.dynamic_outputs))
}

/// One node: an array of output names, or `{"outputs": [...], "dynamicOutputs": {name: node}}`.
fn input_node(input: &str, v: &Value, depth: usize) -> Result<DynamicNode, JsonError> {
    if depth > MAX_DYNAMIC_DEPTH {
        return Err(JsonError::DynamicTooDeep(clip(input)));
    }
    let (outs, dynamic) = match v {
        Value::Array(_) => (v, None),
        Value::Object(o) => (
            o.get("outputs").ok_or(JsonError::Missing("outputs"))?,
            o.get("dynamicOutputs"),
        ),
        _ => {
            return Err(JsonError::Field(
                "inputDrvs",
                "an array of output names or an object with `outputs`",
            ));
        }
    };
    let mut dynamic_outputs = BTreeMap::new();
    if let Some(d) = dynamic {
        let d = d
            .as_object()
            .ok_or(JsonError::Field("dynamicOutputs", "an object"))?;
        for (name, child) in d {
            dynamic_outputs.insert(name.clone(), input_node(input, child, depth + 1)?);
        }
    }
    Ok(DynamicNode {
        outputs: string_list(outs, "outputs")?.into_iter().collect(),
        dynamic_outputs,
    })
}

/// Nix's `dump()` of a JSON value: compact, object keys sorted (nlohmann's objects are ordered
/// maps), which is how `__json` is written into the ATerm from `structuredAttrs`.
pub fn nlohmann_dump(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), sorted(&m[k])))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}
