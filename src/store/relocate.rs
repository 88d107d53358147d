//! Re-instantiating derivations into another logical store dir.
//!
//! A derivation is bound to its store dir: its own path, its inputs' paths, its input-addressed
//! and fixed output paths and the downstream placeholders of its CA inputs all hash the store dir
//! in. [`relocate`] turns a graph of derivations instantiated under one store dir (e.g. a
//! `derivation show` JSON file written for `/nix/store`) into the graph Nix would have written had
//! it instantiated the same expression under another one:
//!
//! - derivations are handled inputs first; the old → new maps of drv paths, static output paths
//!   (input-addressed and fixed) and downstream placeholders grow as they go;
//! - `inputDrvs` keys are mapped; builder, args, env names and values get every old drv path,
//!   output path, placeholder (and relocated input source) replaced by the new one, in one
//!   simultaneous left-to-right pass;
//! - input-addressed and deferred outputs are recomputed as the `derivation` primop does (output
//!   env vars blank, masked modulo hash against the relocated inputs), so an IA drv with a CA
//!   input stays deferred; fixed outputs get the fixed-output path under the new dir; floating
//!   outputs stay floating (their `env[o]` is `hashPlaceholder(o)`, which has no store dir in it);
//! - `inputSrcs` would have to be imported into the new store (their paths depend on their
//!   contents *and* the store dir), so [`relocate`] refuses them; [`relocate_with_sources`] takes
//!   the already imported sources' new paths from the caller.
//!
//! Relocating to the same store dir is the identity.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use thiserror::Error;

use super::derivation::{Derivation, DerivationError, DerivationOutput};
use super::hash_modulo::{DrvHashes, HashModuloError};
use super::path::{StoreDir, StorePathError};
use super::placeholder::{downstream_placeholder, dynamic_placeholder};

/// Why a derivation graph could not be relocated.
#[derive(Debug, Error)]
pub enum RelocateError {
    #[error("{path:?} is not a derivation path in the store dir being relocated from: {error}")]
    BadDrvPath { path: String, error: StorePathError },
    #[error("{drv} is listed twice")]
    Duplicate { drv: String },
    #[error("{drv}: input derivation {input} is not among the derivations being relocated")]
    MissingInput { drv: String, input: String },
    #[error("{drv}: input derivation {input} must come before the derivations that use it")]
    NotInputsFirst { drv: String, input: String },
    #[error(
        "{drv} has input sources ({}) whose paths depend on the store dir: they would have to be \
         imported into the store at {to} first, which relocating derivations cannot do (use \
         `qr import` to copy the closure with its sources instead)",
        .srcs.join(", ")
    )]
    InputSources {
        drv: String,
        srcs: Vec<String>,
        to: String,
    },
    #[error("{drv}: {error}")]
    Derivation { drv: String, error: DerivationError },
    #[error("{drv}: {error}")]
    Hash {
        drv: String,
        error: HashModuloError<String>,
    },
}

/// Simultaneous replacement of many strings that all start with `/` (store paths and
/// placeholders): at each `/`, the longest known old string starting there is replaced, and
/// scanning goes on after it (replacements are never rescanned).
#[derive(Debug, Default)]
struct Rewriter {
    /// Old string length → (old → new); lengths kept sorted longest first in `lengths`.
    by_len: HashMap<usize, HashMap<String, String>>,
    lengths: Vec<usize>,
}

impl Rewriter {
    fn insert(&mut self, old: String, new: String) {
        debug_assert!(old.starts_with('/'), "{old:?}");
        if old == new {
            return;
        }
        let len = old.len();
        if !self.by_len.contains_key(&len) {
            self.lengths.push(len);
            self.lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
        self.by_len.entry(len).or_default().insert(old, new);
    }

    fn get(&self, old: &str) -> Option<&str> {
        self.by_len.get(&old.len())?.get(old).map(String::as_str)
    }

    fn rewrite(&self, s: &str) -> String {
        if self.lengths.is_empty() || !s.contains('/') {
            return s.to_string();
        }
        let mut out = String::with_capacity(s.len());
        let (mut i, mut copied) = (0, 0);
        'scan: while let Some(off) = s[i..].find('/') {
            i += off;
            for len in &self.lengths {
                // `i` is at `/`, a char boundary; `get` fails (no panic) if `i + len` is not one.
                if let Some(new) = s.get(i..i + len).and_then(|old| self.by_len[len].get(old)) {
                    out.push_str(&s[copied..i]);
                    out.push_str(new);
                    i += len;
                    copied = i;
                    continue 'scan;
                }
            }
            i += 1;
        }
        out.push_str(&s[copied..]);
        out
    }
}

/// Relocates `drvs` (drv path under `from` → derivation, inputs before the derivations that use
/// them; e.g. what [`crate::store::drv_json::derivations_from_show_json`] returns) into the store
/// dir `to`. Returns the relocated derivations with their new drv paths, in the same order.
///
/// Every input derivation must be in `drvs`. Derivations with input sources are refused (see
/// [`relocate_with_sources`]) unless `from == to`, in which case the input is returned unchanged.
pub fn relocate(
    drvs: &[(String, Derivation)],
    from: &StoreDir,
    to: &StoreDir,
) -> Result<Vec<(String, Derivation)>, RelocateError> {
    relocate_with_sources(drvs, from, to, &BTreeMap::new())
}

/// [`relocate`], with the new paths of input sources that the caller has already imported into
/// the store at `to` (old source path → new source path). Every input source of every derivation
/// must be in `sources`.
pub fn relocate_with_sources(
    drvs: &[(String, Derivation)],
    from: &StoreDir,
    to: &StoreDir,
    sources: &BTreeMap<String, String>,
) -> Result<Vec<(String, Derivation)>, RelocateError> {
    if from == to {
        return Ok(drvs.to_vec());
    }
    let mut all = BTreeSet::new();
    for (path, _) in drvs {
        if !all.insert(path.as_str()) {
            return Err(RelocateError::Duplicate { drv: path.clone() });
        }
    }

    let mut rw = Rewriter::default();
    for (old, new) in sources {
        rw.insert(old.clone(), new.clone());
    }
    // New drv path → relocated derivation, for the modulo hashes of dependents.
    let mut done: HashMap<String, Derivation> = HashMap::with_capacity(drvs.len());
    let mut hashes = DrvHashes::new(to.clone());
    let mut result = Vec::with_capacity(drvs.len());

    for (old_path, old) in drvs {
        let old_sp = from
            .parse(old_path)
            .map_err(|error| RelocateError::BadDrvPath {
                path: old_path.clone(),
                error,
            })?;
        let derr = |error: DerivationError| RelocateError::Derivation {
            drv: old_path.clone(),
            error,
        };

        let mut drv = old.clone();
        drv.input_drvs = BTreeMap::new();
        drv.dynamic_inputs = BTreeMap::new();
        for (input, outs) in &old.input_drvs {
            let new_input = match rw.get(input) {
                Some(n) if done.contains_key(n) => n.to_string(),
                _ if all.contains(input.as_str()) => {
                    return Err(RelocateError::NotInputsFirst {
                        drv: old_path.clone(),
                        input: input.clone(),
                    });
                }
                _ => {
                    return Err(RelocateError::MissingInput {
                        drv: old_path.clone(),
                        input: input.clone(),
                    });
                }
            };
            if let Some(d) = old.dynamic_inputs.get(input) {
                drv.dynamic_inputs.insert(new_input.clone(), d.clone());
            }
            drv.input_drvs.insert(new_input, outs.clone());
        }
        let missing: Vec<String> = old
            .input_srcs
            .iter()
            .filter(|s| !sources.contains_key(*s))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(RelocateError::InputSources {
                drv: old_path.clone(),
                srcs: missing,
                to: to.to_string(),
            });
        }
        drv.input_srcs = old.input_srcs.iter().map(|s| sources[s].clone()).collect();

        // Fixed outputs: the path follows from the hash (and the new store dir).
        for (o, out) in &mut drv.outputs {
            if let DerivationOutput::CaFixed {
                method_algo,
                hash,
                path,
            } = out
            {
                let new = drv_fixed_path(old, to, o, method_algo, hash).map_err(derr)?;
                rw.insert(std::mem::replace(path, new.clone()), new);
            }
        }

        // Dynamic inputs' placeholders hash the input drv path, which has moved.
        for (input, chain, o) in old.dynamic_wants() {
            let old_in = from
                .parse(input)
                .map_err(|error| RelocateError::BadDrvPath {
                    path: input.to_string(),
                    error,
                })?;
            let new_in = rw
                .get(input)
                .and_then(|n| to.parse(n).ok())
                .ok_or_else(|| RelocateError::MissingInput {
                    drv: old_path.clone(),
                    input: input.to_string(),
                })?;
            rw.insert(
                dynamic_placeholder(&old_in, &chain, o),
                dynamic_placeholder(&new_in, &chain, o),
            );
        }

        drv.builder = rw.rewrite(&old.builder);
        drv.args = old.args.iter().map(|a| rw.rewrite(a)).collect();
        drv.env = BTreeMap::new();
        for (k, v) in &old.env {
            drv.env.insert(rw.rewrite(k), rw.rewrite(v));
        }

        // Input-addressed and deferred outputs: recomputed as the `derivation` primop does.
        let ia: Vec<(String, Option<String>)> = drv
            .outputs
            .iter()
            .filter(|(_, o)| {
                matches!(
                    o,
                    DerivationOutput::InputAddressed { .. } | DerivationOutput::Deferred
                )
            })
            .map(|(n, o)| (n.clone(), o.path().map(str::to_string)))
            .collect();
        if !ia.is_empty() {
            for (o, _) in &ia {
                drv.outputs.insert(o.clone(), DerivationOutput::Deferred);
            }
            let mut load = |p: &str| {
                done.get(p)
                    .cloned()
                    .ok_or_else(|| format!("{p} is not relocated yet"))
            };
            hashes
                .fill_input_addressed_paths(&mut drv, &mut load)
                .map_err(|error| RelocateError::Hash {
                    drv: old_path.clone(),
                    error,
                })?;
            for (o, old_out) in ia {
                if let (Some(old_out), Some(new_out)) = (old_out, drv.outputs[&o].path()) {
                    rw.insert(old_out, new_out.to_string());
                }
            }
        }

        let new_sp = drv.drv_path(to).map_err(derr)?;
        let new_path = to.print(&new_sp);
        for o in drv.outputs.keys() {
            rw.insert(
                downstream_placeholder(&old_sp, o),
                downstream_placeholder(&new_sp, o),
            );
        }
        rw.insert(old_path.clone(), new_path.clone());
        done.insert(new_path.clone(), drv.clone());
        result.push((new_path, drv));
    }
    Ok(result)
}

/// The printed fixed-output path of output `o` of `drv` in `store_dir`.
fn drv_fixed_path(
    drv: &Derivation,
    store_dir: &StoreDir,
    o: &str,
    method_algo: &str,
    hash: &str,
) -> Result<String, DerivationError> {
    let p = drv.fixed_output_path(store_dir, o, method_algo, hash)?;
    Ok(store_dir.print(&p))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::{Map, Value};

    use super::*;
    use crate::store::drv_json::derivations_from_show_json;

    const NEW: &str = "/tmp/qr-x/store";

    fn fixtures() -> Vec<(String, Value)> {
        let dir = match std::env::var_os("QR_FIXTURES") {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/nix-oracle"),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("fixture dir {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no fixtures in {}", dir.display());
        files
            .into_iter()
            .map(|p| {
                let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                (p.file_stem().unwrap().to_string_lossy().into_owned(), v)
            })
            .collect()
    }

    /// A fixture's derivations, inputs first, as Nix wrote them (keys checked against contents).
    fn graph(fixture: &Value) -> Vec<(String, Derivation)> {
        let mut doc = Map::new();
        for (k, v) in fixture["derivations"].as_object().unwrap() {
            doc.insert(k.clone(), v["show_derivation"].clone());
        }
        let mut hs = DrvHashes::new(StoreDir::default());
        let mut ext = |p: &str| -> Result<Derivation, String> { Err(p.to_string()) };
        derivations_from_show_json(&Value::Object(doc), &mut hs, &mut ext)
            .unwrap()
            .into_iter()
            .map(|(p, d)| (StoreDir::default().print(&p), d))
            .collect()
    }

    /// The fixtures' input sources are `builtins.toFile` text files with no references; their
    /// contents are in the fixture's `nix_expr`. Returns old → new path for `to`.
    fn imported_sources(
        drvs: &[(String, Derivation)],
        from: &StoreDir,
        to: &StoreDir,
    ) -> BTreeMap<String, String> {
        let known: &[(&str, &[u8])] = &[("mx-src.txt", b"some source\n")];
        let mut m = BTreeMap::new();
        for src in drvs.iter().flat_map(|(_, d)| &d.input_srcs) {
            let sp = from.parse(src).unwrap();
            let (name, contents) = known
                .iter()
                .find(|(n, _)| *n == sp.name())
                .unwrap_or_else(|| panic!("unknown source {src}"));
            assert_eq!(from.print(&from.make_text_path(name, contents, [])), *src);
            m.insert(
                src.clone(),
                to.print(&to.make_text_path(name, contents, [])),
            );
        }
        m
    }

    /// The old → new strings a dependent may mention: drv paths, static output paths and
    /// downstream placeholders of every output.
    fn correspondence(
        old: &[(String, Derivation)],
        new: &[(String, Derivation)],
        from: &StoreDir,
        to: &StoreDir,
    ) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        for ((op, od), (np, nd)) in old.iter().zip(new) {
            pairs.push((op.clone(), np.clone()));
            let (osp, nsp) = (from.parse(op).unwrap(), to.parse(np).unwrap());
            for (o, out) in &od.outputs {
                pairs.push((
                    downstream_placeholder(&osp, o),
                    downstream_placeholder(&nsp, o),
                ));
                match (out.path(), nd.outputs[o].path()) {
                    (Some(a), Some(b)) => pairs.push((a.into(), b.into())),
                    (None, None) => {}
                    _ => panic!("{op}: output {o} changed kind"),
                }
            }
        }
        pairs
    }

    /// Loads a graph again from its `derivation show` JSON with input-addressed output paths
    /// removed, so that every path is recomputed independently under `sd`.
    fn reload_recomputing(drvs: &[(String, Derivation)], sd: &StoreDir) {
        let mut doc = Map::new();
        for (p, d) in drvs {
            let mut v = d.to_show_json();
            for (o, out) in &d.outputs {
                if matches!(out, DerivationOutput::InputAddressed { .. }) {
                    v["outputs"][o].as_object_mut().unwrap().remove("path");
                }
            }
            doc.insert(p.clone(), v);
        }
        let mut hs = DrvHashes::new(sd.clone());
        let mut ext = |p: &str| -> Result<Derivation, String> { Err(p.to_string()) };
        let back = derivations_from_show_json(&Value::Object(doc), &mut hs, &mut ext)
            .unwrap_or_else(|e| panic!("relocated graph does not reload: {e}"));
        let by_path: HashMap<&str, &Derivation> =
            drvs.iter().map(|(p, d)| (p.as_str(), d)).collect();
        for (p, d) in back {
            assert_eq!(by_path[sd.print(&p).as_str()], &d);
        }
    }

    fn count(hay: &str, needle: &str) -> usize {
        hay.matches(needle).count()
    }

    #[test]
    fn fixtures_round_trip_through_another_store_dir() {
        let (from, to) = (StoreDir::default(), StoreDir::new(NEW).unwrap());
        for (name, fixture) in fixtures() {
            let old = graph(&fixture);
            // The loaded graph is exactly what Nix wrote.
            for (p, d) in &old {
                assert_eq!(
                    d.to_aterm(),
                    fixture["derivations"][p]["aterm"].as_str().unwrap(),
                    "{name}: {p}"
                );
            }
            let there_srcs = imported_sources(&old, &from, &to);
            let new = relocate_with_sources(&old, &from, &to, &there_srcs).unwrap();
            assert_eq!(new.len(), old.len());

            // Self-consistency of the relocated graph.
            let pairs = correspondence(&old, &new, &from, &to);
            let mut all_pairs = pairs.clone();
            all_pairs.extend(there_srcs.clone());
            for ((op, od), (np, nd)) in old.iter().zip(&new) {
                assert_eq!(to.print(&nd.drv_path(&to).unwrap()), *np, "{name}: {op}");
                assert_eq!(nd.name, od.name);
                assert_eq!(nd.drv_type(), od.drv_type(), "{name}: {op}");
                let (oa, na) = (od.to_aterm(), nd.to_aterm());
                assert!(!na.contains("/nix/store"), "{name}: {np}: {na}");
                for (o, n) in &all_pairs {
                    assert_eq!(count(&oa, o), count(&na, n), "{name}: {op}: {o} → {n}");
                }
                for (input, outs) in &od.input_drvs {
                    let ni = &pairs.iter().find(|(o, _)| o == input).unwrap().1;
                    assert_eq!(nd.input_drvs.get(ni), Some(outs), "{name}: {op}");
                }
            }
            reload_recomputing(&new, &to);

            // And back: byte-identical to what Nix wrote.
            let back_srcs: BTreeMap<String, String> = there_srcs
                .iter()
                .map(|(a, b)| (b.clone(), a.clone()))
                .collect();
            let back = relocate_with_sources(&new, &to, &from, &back_srcs).unwrap();
            for ((op, od), (bp, bd)) in old.iter().zip(&back) {
                assert_eq!(bp, op, "{name}");
                assert_eq!(bd.to_aterm(), od.to_aterm(), "{name}: {op}");
                assert_eq!(bd, od);
            }
        }
    }

    /// Real Nix 2.8 instantiated the fixture expressions under `/tmp/qr-x/store`
    /// (`scripts/nix-relocation-oracle`): relocation must give exactly its drv paths (which hash
    /// the whole ATerm and its references).
    #[test]
    fn matches_nix_instantiating_under_another_store_dir() {
        let oracle: Value =
            serde_json::from_str(include_str!("../../tests/data/nix-relocated.json")).unwrap();
        let from = StoreDir::new(oracle["from"].as_str().unwrap()).unwrap();
        let to = StoreDir::new(oracle["to"].as_str().unwrap()).unwrap();
        assert_eq!(to.as_str(), NEW);
        let mut checked = 0;
        for (name, fixture) in fixtures() {
            let old = graph(&fixture);
            let srcs = imported_sources(&old, &from, &to);
            for (o, n) in &srcs {
                assert_eq!(oracle["input_srcs"][o], *n, "{name}: {o}");
            }
            for ((op, _), (np, _)) in old
                .iter()
                .zip(relocate_with_sources(&old, &from, &to, &srcs).unwrap())
            {
                assert_eq!(oracle["drv_paths"][op], np, "{name}: {op}");
                checked += 1;
            }
        }
        assert_eq!(checked, oracle["drv_paths"].as_object().unwrap().len());
    }

    #[test]
    fn relocation_composes() {
        let from = StoreDir::default();
        let (a, b) = (
            StoreDir::new("/tmp/a/store").unwrap(),
            StoreDir::new("/var/lib/qr/store").unwrap(),
        );
        for (name, fixture) in fixtures() {
            let old = graph(&fixture);
            let (sa, sb) = (
                imported_sources(&old, &from, &a),
                imported_sources(&old, &from, &b),
            );
            let sab: BTreeMap<String, String> =
                sa.iter().map(|(o, n)| (n.clone(), sb[o].clone())).collect();
            let via_a = relocate_with_sources(&old, &from, &a, &sa).unwrap();
            let via_a = relocate_with_sources(&via_a, &a, &b, &sab).unwrap();
            let direct = relocate_with_sources(&old, &from, &b, &sb).unwrap();
            assert_eq!(via_a, direct, "{name}");
        }
    }

    #[test]
    fn same_store_dir_is_the_identity() {
        let sd = StoreDir::default();
        for (_, fixture) in fixtures() {
            let old = graph(&fixture);
            // Even with input sources and no source map: nothing has to move.
            assert_eq!(relocate(&old, &sd, &sd).unwrap(), old);
            // The identity also holds for a relocated graph relocated in place.
            let to = StoreDir::new(NEW).unwrap();
            let srcs = imported_sources(&old, &sd, &to);
            let new = relocate_with_sources(&old, &sd, &to, &srcs).unwrap();
            assert_eq!(relocate(&new, &to, &to).unwrap(), new);
        }
    }

    #[test]
    fn errors() {
        let (from, to) = (StoreDir::default(), StoreDir::new(NEW).unwrap());
        let fixtures = fixtures();
        let fx = |n: &str| graph(&fixtures.iter().find(|(s, _)| s == n).unwrap().1);

        // Input sources without their new paths.
        let mixed = fx("mixed");
        let e = relocate(&mixed, &from, &to).unwrap_err();
        assert!(matches!(&e, RelocateError::InputSources { drv, srcs, .. }
            if drv.ends_with("-mx-ca-on-fod.drv") && srcs[0].ends_with("-mx-src.txt")));
        let msg = e.to_string();
        assert!(msg.contains("imported") && msg.contains(NEW), "{msg}");

        // An input missing from the set, and inputs out of order.
        let chain = fx("chain");
        let e = relocate(&chain[1..], &from, &to).unwrap_err();
        assert!(
            matches!(&e, RelocateError::MissingInput { input, .. } if *input == chain[0].0),
            "{e}"
        );
        let mut reversed = chain.clone();
        reversed.reverse();
        assert!(matches!(
            relocate(&reversed, &from, &to),
            Err(RelocateError::NotInputsFirst { .. })
        ));
        let twice = [chain[0].clone(), chain[0].clone()];
        assert!(matches!(
            relocate(&twice, &from, &to),
            Err(RelocateError::Duplicate { .. })
        ));
        // A path outside the store dir being relocated from.
        assert!(matches!(
            relocate(&chain, &to, &from),
            Err(RelocateError::BadDrvPath { .. })
        ));
    }

    #[test]
    fn rewriter_is_simultaneous_and_longest_first() {
        let mut rw = Rewriter::default();
        rw.insert("/a".into(), "/b".into());
        rw.insert("/b".into(), "/a".into());
        rw.insert("/ab".into(), "/X".into());
        assert_eq!(rw.rewrite("/a /b /ab/a é/b"), "/b /a /X/b é/a");
        assert_eq!(rw.rewrite("no slash"), "no slash");
        assert_eq!(rw.rewrite("/é"), "/é");
    }
}
