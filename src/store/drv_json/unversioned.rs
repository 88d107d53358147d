//! The unversioned format of `nix show-derivation` (Nix 2.8–2.14) and `nix derivation show`
//! (2.15–2.31): full store paths; `inputSrcs`; `inputDrvs` mapping drv paths to output lists
//! (`{"outputs": [...], "dynamicOutputs": {}}` since 2.18); `name` since 2.15. Structured
//! attributes stay in `env.__json`, as in the ATerm.
//!
//! qr's own hand-written documents use this format too, so `inputSrcs`, `inputDrvs`, `args`,
//! `env` and `name` may be left out.

use super::fields::{Obj, PathForm};
use super::{JsonError, Parts, input_drvs, input_srcs};
use crate::store::path::StoreDir;

pub(crate) fn parts(obj: &Obj<'_>, sd: &StoreDir) -> Result<Parts, JsonError> {
    // In this order: a bad field is reported as before (name, inputSrcs, inputDrvs).
    let name = match obj.get("name") {
        None => None,
        Some(_) => Some(obj.string("name")?),
    };
    let input_srcs = match obj.get("inputSrcs") {
        Some(v) => input_srcs(v, "inputSrcs", PathForm::Full, sd)?,
        None => Default::default(),
    };
    let (input_drvs, dynamic_inputs) = match obj.get("inputDrvs") {
        Some(v) => input_drvs(v, "inputDrvs", PathForm::Full, sd)?,
        None => Default::default(),
    };
    Ok(Parts {
        name,
        input_srcs,
        input_drvs,
        dynamic_inputs,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::JsonError;
    use crate::store::derivation::{Derivation, DerivationOutput};
    use crate::store::path::StoreDir;

    const FOD_HASH: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn fixed_output_path_is_computed_and_checked() {
        let sd = StoreDir::default();
        let v = json!({
            "outputs": {"out": {"hashAlgo": "sha256", "hash": FOD_HASH}},
            "inputSrcs": [], "inputDrvs": {}, "system": "x86_64-linux", "builder": "/bin/sh",
            "args": ["-c", "printf hello > $out"],
            "env": {"name": "mx-fod"}
        });
        let d = Derivation::from_show_json(&v, None, &sd).unwrap();
        let path = "/nix/store/ys815iw6x4amdbmrqjzficz815kkixhy-mx-fod";
        assert_eq!(d.outputs["out"].path(), Some(path));
        assert_eq!(d.env["out"], path);
        let back = Derivation::from_show_json(&d.to_show_json(), None, &sd).unwrap();
        assert_eq!(back, d);
        // Nix 2.23–2.31 spell the same output with `method`.
        let mut v2 = v.clone();
        v2["outputs"]["out"] = json!({"path": path, "method": "flat", "hashAlgo": "sha256",
            "hash": FOD_HASH});
        assert_eq!(Derivation::from_show_json(&v2, None, &sd).unwrap(), d);
        // A path that is not the hash's.
        let mut wrong = v;
        wrong["outputs"]["out"]["path"] =
            json!("/nix/store/00000000000000000000000000000000-mx-fod");
        assert!(matches!(
            Derivation::from_show_json(&wrong, None, &sd),
            Err(JsonError::FixedPathMismatch { .. })
        ));
    }

    /// Nix 2.23–2.31's libstore-tests `output-caFixed{Flat,NAR,Text}.json`: the fixed output
    /// `output-name` of `drv-name` with each method, and the path Nix computed for it.
    #[test]
    fn nix_fixed_output_vectors_of_every_method() {
        let sd = StoreDir::default();
        let hash = "894517c9163c896ec31a2adbd33c0681fd5f45b2c0ef08a64c92a03fb97f390f";
        for (method, ma, path) in [
            (
                "flat",
                "sha256",
                "/nix/store/rhcg9h16sqvlbpsa6dqm57sbr2al6nzg-drv-name-output-name",
            ),
            (
                "nar",
                "r:sha256",
                "/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-drv-name-output-name",
            ),
            (
                "text",
                "text:sha256",
                "/nix/store/6s1zwabh956jvhv4w9xcdb5jiyanyxg1-drv-name-output-name",
            ),
        ] {
            let v = json!({
                "name": "drv-name", "system": "s", "builder": "b",
                "outputs": {"output-name":
                    {"hash": hash, "hashAlgo": "sha256", "method": method, "path": path}}
            });
            let d = Derivation::from_show_json(&v, None, &sd)
                .unwrap_or_else(|e| panic!("{method}: {e}"));
            assert_eq!(
                d.outputs["output-name"],
                DerivationOutput::CaFixed {
                    method_algo: ma.into(),
                    hash: hash.into(),
                    path: path.into()
                },
                "{method}"
            );
        }
    }

    #[test]
    fn inputs_of_every_era_and_bad_ones() {
        let sd = StoreDir::default();
        let dep = "/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep2.drv";
        let base = json!({
            "name": "simple-derivation",
            "outputs": {"out": {"path": "/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-out"}},
            "inputSrcs": ["/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep1"],
            "inputDrvs": {dep: ["cat", "dog"]},
            "system": "wasm-sel4", "builder": "foo", "args": ["bar", "baz"],
            "env": {"BIG_BAD": "WOLF"}
        });
        let d = Derivation::from_show_json(&base, None, &sd).unwrap();
        assert_eq!(d.name, "simple-derivation");
        assert_eq!(
            d.outputs["out"],
            DerivationOutput::InputAddressed {
                path: "/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-out".into()
            }
        );
        let mut v218 = base.clone();
        v218["inputDrvs"] = json!({dep: {"outputs": ["cat", "dog"], "dynamicOutputs": {}}});
        assert_eq!(Derivation::from_show_json(&v218, None, &sd).unwrap(), d);

        let err = |patch: serde_json::Value| {
            let mut v = base.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            Derivation::from_show_json(&v, None, &sd).unwrap_err()
        };
        // Dynamic outputs are read (and printed back in the same shape).
        let mut dynv = base.clone();
        dynv["inputDrvs"] = json!({dep: {"outputs": ["out"],
            "dynamicOutputs": {"cat": {"outputs": ["kitten"], "dynamicOutputs": {}}}}});
        let dd = Derivation::from_show_json(&dynv, None, &sd).unwrap();
        assert!(dd.has_dynamic_inputs());
        assert_eq!(dd.to_show_json()["inputDrvs"], dynv["inputDrvs"]);
        assert_eq!(
            Derivation::from_show_json(&dd.to_show_json(), Some("simple-derivation"), &sd).unwrap(),
            dd
        );
        assert!(matches!(
            err(json!({"inputSrcs": ["c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep1"]})),
            JsonError::BadStorePath {
                field: "inputSrcs",
                ..
            }
        ));
        assert!(matches!(
            err(
                json!({"inputDrvs": {"/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep2": ["out"]}})
            ),
            JsonError::NotADerivation { .. }
        ));
        assert!(matches!(
            err(json!({"system": 1})),
            JsonError::Field("system", _)
        ));
        assert!(matches!(err(json!({"version": 2})), JsonError::UnknownVersion(v) if v == "2"));
        assert!(err(json!({"version": 5})).to_string().contains("version 5"));
        let mut no_builder = base.clone();
        no_builder.as_object_mut().unwrap().remove("builder");
        assert_eq!(
            Derivation::from_show_json(&no_builder, None, &sd),
            Err(JsonError::Missing("builder"))
        );
        assert!(Derivation::from_show_json(&json!([]), None, &sd).is_err());
    }
}
