//! The derivation model (what a `.drv` holds), its type rules and its store path. Its JSON forms
//! (`derivation show` of every Nix) are in [`super::drv_json`].
//!
//! Paths are kept as full printed store paths (`/nix/store/…`), exactly as the ATerm holds them, so
//! that printing gives back the bytes Nix wrote.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use super::hash::from_hex;
use super::path::{StoreDir, StorePath, StorePathError, output_path_name, validate_name};

// The JSON readers lived here; their paths stay valid.
pub use super::drv_json::{JsonError, ShowJsonError, derivations_from_show_json};

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

/// One level of a dynamic input (Nix's `DerivedPathMap` child node): the output named by the key
/// that holds this node is itself a `.drv`; `outputs` are the outputs wanted of that produced
/// derivation, `dynamic_outputs` the outputs of it that are derivations again (deeper levels).
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct DynamicNode {
    pub outputs: BTreeSet<String>,
    pub dynamic_outputs: BTreeMap<String, DynamicNode>,
}

impl DynamicNode {
    /// Depth of the deepest level below this node (1 for a node with no dynamic outputs).
    pub fn depth(&self) -> usize {
        1 + self
            .dynamic_outputs
            .values()
            .map(DynamicNode::depth)
            .max()
            .unwrap_or(0)
    }
}

/// One step of a path into the dynamic-input tree: "output `output` of the derivation named
/// by the previous step" (the first step's derivation is an input drv path).
pub type DynamicChain = Vec<String>;

/// A derivation: the contents of a `.drv` plus its name.
///
/// The input derivations form Nix's tree (`DerivedPathMap<StringSet>`), kept in two maps so that
/// the common, static case stays a plain map: `input_drvs[p]` is the set of outputs wanted of `p`
/// (the root level; possibly empty when only dynamic outputs of `p` are used), and
/// `dynamic_inputs[p]` maps an output of `p` that is a `.drv` to what is wanted of the
/// derivation it holds, to any depth. Every key of `dynamic_inputs` is a key of `input_drvs`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// The derivation name (the drv file's name without hash part and `.drv`).
    pub name: String,
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivation paths → the outputs used from each.
    pub input_drvs: BTreeMap<String, BTreeSet<String>>,
    /// Input derivation paths → output name → the produced derivation's wanted outputs (dynamic
    /// derivations); empty for every derivation Nix 2.8 can write.
    pub dynamic_inputs: BTreeMap<String, BTreeMap<String, DynamicNode>>,
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
    /// A derivation with dynamic inputs always needs it (its placeholders name outputs of
    /// derivations that are not known yet).
    pub fn needs_resolution(&self) -> bool {
        self.has_deferred_outputs()
            || self.has_dynamic_inputs()
            || (self.is_ca_floating() && !self.input_drvs.is_empty())
    }

    /// True if some input is an output of a derivation that is itself built (dynamic
    /// derivations: the ATerm is `DrvWithVersion("xp-dyn-drv", …)`).
    pub fn has_dynamic_inputs(&self) -> bool {
        self.dynamic_inputs.values().any(|m| !m.is_empty())
    }

    /// Every wanted dynamic output, as (input drv path, chain of `.drv` outputs, wanted output):
    /// `(p, [a.drv, b.drv], out)` is `p^a.drv^b.drv^out` (the output `out` of the derivation in
    /// output `b.drv` of the derivation in output `a.drv` of `p`). Sorted.
    pub fn dynamic_wants(&self) -> Vec<(&str, DynamicChain, &str)> {
        fn walk<'a>(
            p: &'a str,
            chain: &mut Vec<String>,
            node: &'a DynamicNode,
            out: &mut Vec<(&'a str, DynamicChain, &'a str)>,
        ) {
            for o in &node.outputs {
                out.push((p, chain.clone(), o));
            }
            for (name, child) in &node.dynamic_outputs {
                chain.push(name.clone());
                walk(p, chain, child, out);
                chain.pop();
            }
        }
        let mut out = Vec::new();
        for (p, children) in &self.dynamic_inputs {
            for (name, node) in children {
                let mut chain = vec![name.clone()];
                walk(p, &mut chain, node, &mut out);
            }
        }
        out
    }

    /// The outputs a builder of this derivation needs of input `input`: those it uses, and
    /// those that hold derivations whose outputs it uses (dynamic inputs).
    pub fn wanted_of_input(&self, input: &str) -> BTreeSet<String> {
        let mut wanted = self.input_drvs.get(input).cloned().unwrap_or_default();
        if let Some(d) = self.dynamic_inputs.get(input) {
            wanted.extend(d.keys().cloned());
        }
        wanted
    }

    /// Every level of the dynamic inputs, as (input drv path, chain of `.drv` outputs, the
    /// outputs wanted of the derivation at the chain's end): for `p^a.drv^b.drv^out`, the levels
    /// `(p, [a.drv], {b.drv})` and `(p, [a.drv, b.drv], {out})`. Shallower levels first.
    pub fn dynamic_levels(&self) -> Vec<(&str, DynamicChain, BTreeSet<String>)> {
        let mut out = Vec::new();
        let mut frontier: Vec<(&str, DynamicChain, &DynamicNode)> = Vec::new();
        for (p, children) in &self.dynamic_inputs {
            for (name, node) in children {
                frontier.push((p, vec![name.clone()], node));
            }
        }
        while !frontier.is_empty() {
            let mut next = Vec::new();
            for (p, chain, node) in frontier {
                let mut wanted = node.outputs.clone();
                wanted.extend(node.dynamic_outputs.keys().cloned());
                for (name, child) in &node.dynamic_outputs {
                    let mut c = chain.clone();
                    c.push(name.clone());
                    next.push((p, c, child));
                }
                out.push((p, chain, wanted));
            }
            frontier = next;
        }
        out
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
            // A text-hashed output (Nix's dynamic derivations): `makeTextPath`, no references.
            ("text:", "sha256") => {
                let h = from_hex(hash_hex).ok_or_else(bad)?;
                Ok(store_dir.make_store_path("text", &h, &name))
            }
            _ => Err(bad()),
        }
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
}
