//! Resolution: turning a CA floating or deferred derivation into the derivation that is actually
//! built, once its inputs' real output paths (realisations) are known.
//!
//! 1. Every input `(drv, output)` must have a realisation, else resolution fails.
//! 2. Each input's downstream placeholder is replaced by its real path (plain substring
//!    replacement over builder, args, env names and values, in the order Nix applies them), every
//!    real input path is added to `inputSrcs`, and `inputDrvs` becomes empty.
//! 3. Deferred outputs become input-addressed: `makeOutputPath(o, hashModulo(resolved, mask))`,
//!    with `env[o]` set to the path. CA outputs stay floating.
//!
//! Dynamic inputs (`p^a.drv^…^o`: output `o` of the derivation held by output `a.drv` of `p`)
//! resolve through the same lookup, one link at a time (`lookup(p, a.drv)` is the produced drv's
//! path, then `lookup(that, o)`); their placeholder is [`dynamic_placeholder`], and only the last
//! link's path joins `inputSrcs`, as in Nix. A missing link is reported as the first unknown
//! `(drv, output)` of the chain.
//!
//! The resolved derivation's path is its [`Derivation::drv_path`] (references = `inputSrcs`).

use std::collections::BTreeMap;

use thiserror::Error;

use super::derivation::{Derivation, DerivationOutput};
use super::hash_modulo::{ModuloError, hash_derivation_modulo};
use super::path::{StoreDir, StorePathError, output_path_name, validate_name};
use super::placeholder::{downstream_placeholder, dynamic_placeholder};
use super::realisation::DrvOutput;

/// Why a derivation could not be resolved.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ResolveError {
    /// Some input outputs have no known real path; nothing may be built from a half-resolved drv.
    #[error("no realisation for {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    MissingRealisations(Vec<DrvOutput>),
    #[error("input derivation {path}: {error}")]
    BadInputPath { path: String, error: StorePathError },
    #[error("resolving: {0}")]
    Modulo(#[from] ModuloError),
    #[error("output path name {name:?} is invalid: {why}")]
    BadName { name: String, why: &'static str },
}

impl ResolveError {
    /// The missing input outputs, if that is why resolution failed.
    pub fn missing(&self) -> &[DrvOutput] {
        match self {
            ResolveError::MissingRealisations(m) => m,
            _ => &[],
        }
    }
}

/// Nix's `rewriteStrings`: each rewrite in key order, replacing every occurrence.
fn rewrite(s: &str, rewrites: &BTreeMap<String, String>) -> String {
    let mut s = s.to_string();
    for (from, to) in rewrites {
        if from != to && s.contains(from.as_str()) {
            s = s.replace(from.as_str(), to);
        }
    }
    s
}

/// Resolves `drv` with `lookup(input drv path, output) → real output path`. All missing
/// realisations are reported together (sorted by drv path, then output).
pub fn try_resolve(
    drv: &Derivation,
    store_dir: &StoreDir,
    mut lookup: impl FnMut(&str, &str) -> Option<String>,
) -> Result<Derivation, ResolveError> {
    let mut resolved = drv.clone();
    resolved.input_drvs.clear();
    resolved.dynamic_inputs.clear();
    let mut rewrites = BTreeMap::new();
    let mut missing = Vec::new();
    for (input, outs) in &drv.input_drvs {
        let sp = store_dir
            .parse(input)
            .map_err(|error| ResolveError::BadInputPath {
                path: input.clone(),
                error,
            })?;
        for o in outs {
            match lookup(input, o) {
                Some(real) => {
                    rewrites.insert(downstream_placeholder(&sp, o), real.clone());
                    resolved.input_srcs.insert(real);
                }
                None => missing.push(DrvOutput::new(input.clone(), o.clone())),
            }
        }
    }
    for (input, chain, o) in drv.dynamic_wants() {
        let sp = store_dir
            .parse(input)
            .map_err(|error| ResolveError::BadInputPath {
                path: input.to_string(),
                error,
            })?;
        let mut at = input.to_string();
        let mut found = true;
        for link in chain.iter().map(String::as_str).chain([o]) {
            match lookup(&at, link) {
                Some(p) => at = p,
                None => {
                    missing.push(DrvOutput::new(at.clone(), link.to_string()));
                    found = false;
                    break;
                }
            }
        }
        if found {
            rewrites.insert(dynamic_placeholder(&sp, &chain, o), at.clone());
            resolved.input_srcs.insert(at);
        }
    }
    if !missing.is_empty() {
        missing.sort();
        missing.dedup();
        return Err(ResolveError::MissingRealisations(missing));
    }

    resolved.builder = rewrite(&drv.builder, &rewrites);
    resolved.args = drv.args.iter().map(|a| rewrite(a, &rewrites)).collect();
    resolved.env = BTreeMap::new();
    for (k, v) in &drv.env {
        // Like Nix's `emplace`: on a name collision after rewriting, the first one wins.
        resolved
            .env
            .entry(rewrite(k, &rewrites))
            .or_insert_with(|| rewrite(v, &rewrites));
    }

    if resolved.has_deferred_outputs() {
        let label = format!("resolved derivation {:?}", drv.name);
        let h = hash_derivation_modulo(&resolved, true, &label, |_| None)?;
        let deferred: Vec<String> = resolved
            .outputs
            .iter()
            .filter(|(_, o)| matches!(o, DerivationOutput::Deferred))
            .map(|(n, _)| n.clone())
            .collect();
        for o in deferred {
            if let Some(hash) = h.output(&o) {
                let name = output_path_name(&resolved.name, &o);
                validate_name(&name).map_err(|why| ResolveError::BadName {
                    name: super::clip(&name),
                    why,
                })?;
                let path = store_dir.print(&store_dir.make_output_path(&o, hash, &resolved.name));
                resolved.env.insert(o.clone(), path.clone());
                resolved
                    .outputs
                    .insert(o, DerivationOutput::InputAddressed { path });
            }
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::aterm;

    // mixed.json: mx-ia-on-ca (deferred IA on a CA input) and its resolved form.
    const IA_ON_CA: &str = r#"Derive([("out","","","")],[("/nix/store/kgl69vyd5yssfkn9a7jvb6s21zfah5ja-mx-ca1.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo /16gdi2w38brm0ig1mrqvag7sa1csd24vjnkqzlqj2xnzfc3ik738 > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("dep","/16gdi2w38brm0ig1mrqvag7sa1csd24vjnkqzlqj2xnzfc3ik738"),("name","mx-ia-on-ca"),("out",""),("system","x86_64-linux")])"#;
    const RESOLVED: &str = r#"Derive([("out","/nix/store/sxsm21f0zb51cf6dl0s4jqkp2377n73a-mx-ia-on-ca","","")],[],["/nix/store/56z494m8h9l3rb9cql2pdiv40jv80zzi-mx-ca1"],"x86_64-linux","/bin/sh",["-c","echo /nix/store/56z494m8h9l3rb9cql2pdiv40jv80zzi-mx-ca1 > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("dep","/nix/store/56z494m8h9l3rb9cql2pdiv40jv80zzi-mx-ca1"),("name","mx-ia-on-ca"),("out","/nix/store/sxsm21f0zb51cf6dl0s4jqkp2377n73a-mx-ia-on-ca"),("system","x86_64-linux")])"#;

    #[test]
    fn resolves_deferred_ia() {
        let sd = StoreDir::default();
        let d = aterm::parse(IA_ON_CA.as_bytes()).unwrap();
        assert!(d.needs_resolution());
        let r = try_resolve(&d, &sd, |p, o| {
            (p == "/nix/store/kgl69vyd5yssfkn9a7jvb6s21zfah5ja-mx-ca1.drv" && o == "out")
                .then(|| "/nix/store/56z494m8h9l3rb9cql2pdiv40jv80zzi-mx-ca1".to_string())
        })
        .unwrap();
        assert_eq!(r.to_aterm(), RESOLVED);
        assert_eq!(
            sd.print(&r.drv_path(&sd).unwrap()),
            "/nix/store/0bvjrvhd66049z18hbsjbmp5lcd2i48m-mx-ia-on-ca.drv"
        );
        assert!(!r.needs_resolution());
    }

    #[test]
    fn missing_realisation_names_the_input() {
        let d = aterm::parse(IA_ON_CA.as_bytes()).unwrap();
        let e = try_resolve(&d, &StoreDir::default(), |_, _| None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no realisation for /nix/store/kgl69vyd5yssfkn9a7jvb6s21zfah5ja-mx-ca1.drv^out"
        );
        assert_eq!(e.missing().len(), 1);
    }

    #[test]
    fn rewrite_applies_every_occurrence() {
        let mut r = BTreeMap::new();
        r.insert("/aa".to_string(), "/nix/store/x".to_string());
        assert_eq!(rewrite("/aa:/aa/b", &r), "/nix/store/x:/nix/store/x/b");
    }
}
