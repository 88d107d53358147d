//! `hashDerivationModulo`: the hash that input-addressed output paths are made from, and (in
//! Nix ≤ 2.34) the key of realisations.
//!
//! - A fixed-output derivation gets one hash per output: `sha256("fixed:out:<algo>:<hex>:<path>")`
//!   (`<path>` is the output path recorded in the derivation; [`DrvHashes::output_paths`]
//!   recomputes it from the hash, so a mismatch can be detected).
//! - Any other derivation is hashed as its ATerm with every input derivation replaced by the hex of
//!   that input's own (unmasked, memoised) modulo hash; inputs with equal hashes merge their output
//!   sets. With `mask`, output paths and output env vars are printed blank. One hash serves every
//!   output.
//! - The result is *deferred* when the derivation is CA floating or any input is deferred.
//!
//! Input addressed output paths and realisation ids use the **masked** hash of the derivation
//! itself (`staticOutputHashes` in Nix); dependents use the **unmasked** hash of their inputs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use thiserror::Error;

use super::aterm;
use super::derivation::{
    Derivation, DerivationError, DerivationOutput, DerivationType, DerivationTypeError,
};
use super::hash::{Sha256Hash, sha256, to_hex};
use super::path::{StoreDir, StorePath, output_path_name, validate_name};

/// Whether a modulo hash is final or stands for a derivation whose outputs are not yet known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrvHashKind {
    /// Statically known output paths all the way down.
    Regular,
    /// CA floating, or depends on something that is: outputs are known only after building.
    Deferred,
}

/// The modulo hash of a derivation: per output (fixed-output derivations have one per output;
/// every other derivation has the same hash for all outputs) plus its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvHash {
    pub hashes: BTreeMap<String, Sha256Hash>,
    pub kind: DrvHashKind,
}

impl DrvHash {
    pub fn is_deferred(&self) -> bool {
        self.kind == DrvHashKind::Deferred
    }

    /// The hash of one output.
    pub fn output(&self, output: &str) -> Option<&Sha256Hash> {
        self.hashes.get(output)
    }

    /// The hash shared by all outputs, if they share one (always true except for fixed-output
    /// derivations with several outputs, which Nix forbids anyway).
    pub fn common(&self) -> Option<&Sha256Hash> {
        let mut it = self.hashes.values();
        let first = it.next()?;
        it.all(|h| h == first).then_some(first)
    }
}

/// Why a modulo hash could not be computed from a derivation and its inputs' hashes.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModuloError {
    #[error("{drv}: {error}")]
    Type {
        drv: String,
        error: DerivationTypeError,
    },
    #[error("{drv}: input derivation {input} has no output {output:?}")]
    MissingOutput {
        drv: String,
        input: String,
        output: String,
    },
    #[error("{drv}: the modulo hash of input derivation {input} is not known")]
    UnknownInput { drv: String, input: String },
}

/// Why a modulo hash over a store (with a derivation loader) could not be computed.
#[derive(Debug, Error)]
pub enum HashModuloError<E> {
    #[error("cannot load derivation {drv_path}: {error}")]
    Load { drv_path: String, error: E },
    #[error("the derivation graph has a cycle through {0}")]
    Cycle(String),
    #[error(transparent)]
    Modulo(#[from] ModuloError),
    #[error(transparent)]
    Derivation(#[from] DerivationError),
}

/// `hashDerivationModulo` of one derivation, given a way to look up the (unmasked) modulo hashes
/// of its input derivations. `label` names the derivation in errors.
pub fn hash_derivation_modulo<'h>(
    drv: &Derivation,
    mask: bool,
    label: &str,
    input_hash: impl Fn(&str) -> Option<&'h DrvHash>,
) -> Result<DrvHash, ModuloError> {
    let ty = drv.drv_type().map_err(|error| ModuloError::Type {
        drv: label.to_string(),
        error,
    })?;
    if ty == DerivationType::CaFixed {
        let hashes = drv
            .outputs
            .iter()
            .filter_map(|(name, o)| match o {
                DerivationOutput::CaFixed {
                    method_algo,
                    hash,
                    path,
                } => Some((
                    name.clone(),
                    sha256(format!("fixed:out:{method_algo}:{hash}:{path}").as_bytes()),
                )),
                _ => None,
            })
            .collect();
        return Ok(DrvHash {
            hashes,
            kind: DrvHashKind::Regular,
        });
    }
    let mut kind = if ty == DerivationType::CaFloating {
        DrvHashKind::Deferred
    } else {
        DrvHashKind::Regular
    };
    // Outputs of derivations that are themselves built (dynamic inputs) are not known yet:
    // like an input on a CA derivation, they defer this one. Only the root level of each input
    // is hashed in (Nix never hashes a derivation with dynamic inputs before resolving it).
    if drv.has_dynamic_inputs() {
        kind = DrvHashKind::Deferred;
    }
    let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (input, outs) in &drv.input_drvs {
        let h = input_hash(input).ok_or_else(|| ModuloError::UnknownInput {
            drv: label.to_string(),
            input: input.clone(),
        })?;
        if h.is_deferred() {
            kind = DrvHashKind::Deferred;
        }
        for o in outs {
            let oh = h.output(o).ok_or_else(|| ModuloError::MissingOutput {
                drv: label.to_string(),
                input: input.clone(),
                output: o.clone(),
            })?;
            inputs.entry(to_hex(oh)).or_default().insert(o.clone());
        }
    }
    let hash = sha256(aterm::print_modulo(drv, mask, &inputs).as_bytes());
    Ok(DrvHash {
        hashes: drv.outputs.keys().map(|o| (o.clone(), hash)).collect(),
        kind,
    })
}

/// Memoised modulo hashes of derivations in a store, keyed by drv path (Nix's `drvHashes`).
///
/// Every method that needs input derivations takes a loader `FnMut(&str) -> Result<Derivation, E>`
/// that reads a derivation by its store path; the loaded derivation's `name` must be set (e.g. by
/// [`crate::store::aterm::parse_named`] with the path's drv name).
#[derive(Debug, Clone)]
pub struct DrvHashes {
    store_dir: StoreDir,
    cache: HashMap<String, DrvHash>,
}

impl DrvHashes {
    pub fn new(store_dir: StoreDir) -> Self {
        DrvHashes {
            store_dir,
            cache: HashMap::new(),
        }
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// The memoised (unmasked) hash of `drv_path`, if already computed.
    pub fn cached(&self, drv_path: &str) -> Option<&DrvHash> {
        self.cache.get(drv_path)
    }

    /// Number of memoised derivations.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The unmasked modulo hash of the derivation at `drv_path` (what dependents hash in),
    /// computing and memoising it and every input below it. Iterative: deep graphs do not grow
    /// the call stack; cycles are reported as errors.
    pub fn path_hash<E, F>(
        &mut self,
        drv_path: &str,
        load: &mut F,
    ) -> Result<&DrvHash, HashModuloError<E>>
    where
        F: FnMut(&str) -> Result<Derivation, E>,
    {
        if !self.cache.contains_key(drv_path) {
            self.compute_closure(drv_path, load)?;
        }
        self.cache.get(drv_path).ok_or_else(|| {
            ModuloError::UnknownInput {
                drv: drv_path.to_string(),
                input: drv_path.to_string(),
            }
            .into()
        })
    }

    fn compute_closure<E, F>(&mut self, root: &str, load: &mut F) -> Result<(), HashModuloError<E>>
    where
        F: FnMut(&str) -> Result<Derivation, E>,
    {
        struct Frame {
            path: String,
            drv: Option<Derivation>,
        }
        let mut stack = vec![Frame {
            path: root.to_string(),
            drv: None,
        }];
        // Expanded but unfinished derivations: exactly the current DFS path.
        let mut on_path: HashSet<String> = HashSet::new();
        while let Some(top) = stack.last_mut() {
            if top.drv.is_none() {
                if self.cache.contains_key(&top.path) {
                    stack.pop();
                    continue;
                }
                if on_path.contains(&top.path) {
                    return Err(HashModuloError::Cycle(top.path.clone()));
                }
                let drv = load(&top.path).map_err(|error| HashModuloError::Load {
                    drv_path: top.path.clone(),
                    error,
                })?;
                let children: Vec<String> = drv
                    .input_drvs
                    .keys()
                    .filter(|p| !self.cache.contains_key(*p))
                    .cloned()
                    .collect();
                on_path.insert(top.path.clone());
                top.drv = Some(drv);
                stack.extend(children.into_iter().map(|path| Frame { path, drv: None }));
            } else if let Some(Frame {
                path,
                drv: Some(drv),
            }) = stack.pop()
            {
                let h = hash_derivation_modulo(&drv, false, &path, |p| self.cache.get(p))?;
                on_path.remove(&path);
                self.cache.insert(path, h);
            }
        }
        Ok(())
    }

    /// The modulo hash of an in-memory derivation (its inputs are loaded and memoised).
    pub fn hash_derivation<E, F>(
        &mut self,
        drv: &Derivation,
        mask: bool,
        load: &mut F,
    ) -> Result<DrvHash, HashModuloError<E>>
    where
        F: FnMut(&str) -> Result<Derivation, E>,
    {
        for input in drv.input_drvs.keys() {
            self.path_hash(input, load)?;
        }
        let label = format!("derivation {:?}", drv.name);
        Ok(hash_derivation_modulo(drv, mask, &label, |p| {
            self.cache.get(p)
        })?)
    }

    /// The masked hashes Nix ≤ 2.34 keys realisations by and makes input-addressed output paths
    /// from (`staticOutputHashes`).
    pub fn static_output_hashes<E, F>(
        &mut self,
        drv: &Derivation,
        load: &mut F,
    ) -> Result<DrvHash, HashModuloError<E>>
    where
        F: FnMut(&str) -> Result<Derivation, E>,
    {
        self.hash_derivation(drv, true, load)
    }

    /// Every output's path as Nix computes it: input-addressed from the masked modulo hash,
    /// fixed from the fixed hash, `None` for floating and deferred outputs.
    pub fn output_paths<E, F>(
        &mut self,
        drv: &Derivation,
        load: &mut F,
    ) -> Result<BTreeMap<String, Option<StorePath>>, HashModuloError<E>>
    where
        F: FnMut(&str) -> Result<Derivation, E>,
    {
        let label = format!("derivation {:?}", drv.name);
        let ty = drv
            .drv_type()
            .map_err(|error| ModuloError::Type { drv: label, error })?;
        let mut paths = BTreeMap::new();
        match ty {
            DerivationType::CaFixed => {
                for (o, out) in &drv.outputs {
                    if let DerivationOutput::CaFixed {
                        method_algo, hash, ..
                    } = out
                    {
                        let p = drv.fixed_output_path(&self.store_dir, o, method_algo, hash)?;
                        paths.insert(o.clone(), Some(p));
                    }
                }
            }
            DerivationType::CaFloating => {
                paths.extend(drv.outputs.keys().map(|o| (o.clone(), None)));
            }
            DerivationType::InputAddressed | DerivationType::DeferredInputAddressed => {
                valid_output_names(drv)?;
                let h = self.static_output_hashes(drv, load)?;
                for (o, hash) in &h.hashes {
                    let p = (!h.is_deferred())
                        .then(|| self.store_dir.make_output_path(o, hash, &drv.name));
                    paths.insert(o.clone(), p);
                }
            }
        }
        Ok(paths)
    }

    /// For a derivation whose input-addressed output paths are not filled in (outputs
    /// [`DerivationOutput::Deferred`], as read from JSON without paths): computes them as Nix's
    /// `derivation` primop does — the output env vars are set to `""`, the masked modulo hash is
    /// taken, and unless it is deferred each output becomes input-addressed with
    /// `makeOutputPath` and `env[o]` set to its path. Other derivations are left untouched.
    pub fn fill_input_addressed_paths<E, F>(
        &mut self,
        drv: &mut Derivation,
        load: &mut F,
    ) -> Result<(), HashModuloError<E>>
    where
        F: FnMut(&str) -> Result<Derivation, E>,
    {
        if drv.drv_type() != Ok(DerivationType::DeferredInputAddressed) {
            return Ok(());
        }
        valid_output_names(drv)?;
        for o in drv.outputs.keys() {
            drv.env.insert(o.clone(), String::new());
        }
        let h = self.static_output_hashes(drv, load)?;
        if h.is_deferred() {
            return Ok(());
        }
        for (o, hash) in &h.hashes {
            let p = self
                .store_dir
                .print(&self.store_dir.make_output_path(o, hash, &drv.name));
            drv.env.insert(o.clone(), p.clone());
            drv.outputs
                .insert(o.clone(), DerivationOutput::InputAddressed { path: p });
        }
        Ok(())
    }
}

/// Every output's path name (`name`, `name-<output>`) is a valid store path name, so the paths
/// made from them are store paths (a derivation read without a name, or with a bad one, has none).
fn valid_output_names(drv: &Derivation) -> Result<(), DerivationError> {
    for o in drv.outputs.keys() {
        let name = output_path_name(&drv.name, o);
        validate_name(&name).map_err(|why| DerivationError::BadName {
            name: crate::store::clip(&name),
            why,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::aterm;

    const A: &str = r#"Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hello > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","chain-a"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])"#;

    #[test]
    fn chain_a_realisation_hash_is_masked() {
        // chain.json: chain-a's realisation id.
        let d = aterm::parse(A.as_bytes()).unwrap();
        let mut hs = DrvHashes::new(StoreDir::default());
        let mut load = |p: &str| -> Result<Derivation, String> { Err(p.to_string()) };
        let h = hs.static_output_hashes(&d, &mut load).unwrap();
        assert!(h.is_deferred());
        assert_eq!(
            to_hex(h.common().unwrap()),
            "28097c5122d801ed8cc4dffe710395d2721fad3205eb24379038562fcd3f571c"
        );
    }

    #[test]
    fn loader_errors_and_cycles() {
        let a = aterm::parse(A.as_bytes()).unwrap();
        let mut b = a.clone();
        b.input_drvs
            .insert("/s/b.drv".into(), BTreeSet::from(["out".to_string()]));
        let mut hs = DrvHashes::new(StoreDir::default());
        // b depends on itself.
        let mut load = |_: &str| -> Result<Derivation, String> { Ok(b.clone()) };
        assert!(matches!(
            hs.path_hash("/s/b.drv", &mut load),
            Err(HashModuloError::Cycle(p)) if p == "/s/b.drv"
        ));
        let mut load = |p: &str| -> Result<Derivation, String> { Err(format!("no {p}")) };
        let e = hs.hash_derivation(&b, true, &mut load).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot load derivation /s/b.drv: no /s/b.drv"
        );
        // Asking for an output the input does not have.
        let mut c = a.clone();
        c.input_drvs
            .insert("/s/a.drv".into(), BTreeSet::from(["dev".to_string()]));
        let mut load = |_: &str| -> Result<Derivation, String> { Ok(a.clone()) };
        assert!(matches!(
            hs.hash_derivation(&c, true, &mut load),
            Err(HashModuloError::Modulo(ModuloError::MissingOutput { .. }))
        ));
    }

    #[test]
    fn deep_chains_do_not_overflow() {
        let base = aterm::parse(A.as_bytes()).unwrap();
        let n = 20_000;
        let mut load = |p: &str| -> Result<Derivation, String> {
            let i: usize = p
                .trim_start_matches("/s/")
                .trim_end_matches(".drv")
                .parse()
                .unwrap();
            let mut d = base.clone();
            if i > 0 {
                d.input_drvs
                    .insert(format!("/s/{}.drv", i - 1), BTreeSet::from(["out".into()]));
            }
            Ok(d)
        };
        let mut hs = DrvHashes::new(StoreDir::default());
        let h = hs
            .path_hash(&format!("/s/{}.drv", n - 1), &mut load)
            .unwrap();
        assert!(h.is_deferred());
        assert_eq!(hs.len(), n);
    }
}
