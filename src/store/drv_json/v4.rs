//! Version 4 (`"version": 4`, Nix 2.33 on): version 3 with the inputs nested as
//! `inputs: {"srcs": [...], "drvs": {...}}` and fixed outputs written as their content address
//! `{"method": "nar", "hash": "sha256-<base64>"}`. `nix derivation show` wraps these in
//! `{"version": 4, "derivations": {"<drv base name>": {…}}}` (see [`super::document`]).

use super::fields::{Obj, PathForm};
use super::{JsonError, Parts, input_drvs, input_srcs};
use crate::store::path::StoreDir;

pub(crate) fn parts(obj: &Obj<'_>, sd: &StoreDir) -> Result<Parts, JsonError> {
    let inputs = Obj::new(obj.required("inputs")?, "inputs")?;
    // In this order: a missing field is reported as before (name, srcs, drvs).
    let name = Some(obj.string("name")?);
    let input_srcs = input_srcs(inputs.required("srcs")?, "srcs", PathForm::BaseName, sd)?;
    let (input_drvs, dynamic_inputs) =
        input_drvs(inputs.required("drvs")?, "drvs", PathForm::BaseName, sd)?;
    Ok(Parts {
        name,
        input_srcs,
        input_drvs,
        dynamic_inputs,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::JsonError;
    use crate::store::derivation::{Derivation, DerivationOutput};
    use crate::store::path::StoreDir;

    /// Nix 2.33's libstore-tests `ia/advanced-attributes-structured-attrs.json`, and the
    /// `__json` of the ATerm Nix wrote for it (tests/functional/derivation/ia/…).
    fn structured() -> Value {
        json!({
          "args": ["-c", "echo hello > $out"],
          "builder": "/bin/bash",
          "env": {
            "bin": "/nix/store/cnpasdljgkhnwaf78cf3qygcp4qbki1c-advanced-attributes-structured-attrs-bin",
            "dev": "/nix/store/ijq6mwpa9jbnpnl33qldfqihrr38kprx-advanced-attributes-structured-attrs-dev",
            "out": "/nix/store/h1vh648d3p088kdimy0r8ngpfx7c3nzw-advanced-attributes-structured-attrs"
          },
          "inputs": {
            "drvs": {
              "afc3vbjbzql750v2lp8gxgaxsajphzih-foo.drv": {"dynamicOutputs": {}, "outputs": ["dev", "out"]},
              "vj2i49jm2868j2fmqvxm70vlzmzvgv14-bar.drv": {"dynamicOutputs": {}, "outputs": ["dev", "out"]}
            },
            "srcs": ["vj2i49jm2868j2fmqvxm70vlzmzvgv14-bar.drv"]
          },
          "name": "advanced-attributes-structured-attrs",
          "outputs": {
            "bin": {"path": "cnpasdljgkhnwaf78cf3qygcp4qbki1c-advanced-attributes-structured-attrs-bin"},
            "dev": {"path": "ijq6mwpa9jbnpnl33qldfqihrr38kprx-advanced-attributes-structured-attrs-dev"},
            "out": {"path": "h1vh648d3p088kdimy0r8ngpfx7c3nzw-advanced-attributes-structured-attrs"}
          },
          "structuredAttrs": {
            "__darwinAllowLocalNetworking": true,
            "__impureHostDeps": ["/usr/bin/ditto"],
            "__noChroot": true,
            "__sandboxProfile": "sandcastle",
            "allowSubstitutes": false,
            "builder": "/bin/bash",
            "exportReferencesGraph": {
              "refs1": ["/nix/store/p0hax2lzvjpfc2gwkk62xdglz0fcqfzn-foo"],
              "refs2": ["/nix/store/vj2i49jm2868j2fmqvxm70vlzmzvgv14-bar.drv"]
            },
            "impureEnvVars": ["UNICORN"],
            "name": "advanced-attributes-structured-attrs",
            "outputChecks": {
              "bin": {
                "disallowedReferences": ["/nix/store/r5cff30838majxk5mp3ip2diffi8vpaj-bar", "dev"],
                "disallowedRequisites": ["/nix/store/9b61w26b4avv870dw0ymb6rw4r1hzpws-bar-dev"]
              },
              "dev": {"maxClosureSize": 5909, "maxSize": 789},
              "out": {
                "allowedReferences": ["/nix/store/p0hax2lzvjpfc2gwkk62xdglz0fcqfzn-foo"],
                "allowedRequisites": ["/nix/store/z0rjzy29v9k5qa4nqpykrbzirj7sd43v-foo-dev", "bin"]
              }
            },
            "outputs": ["out", "bin", "dev"],
            "preferLocalBuild": true,
            "requiredSystemFeatures": ["rainbow", "uid-range"],
            "system": "my-system"
          },
          "system": "my-system",
          "version": 4
        })
    }

    const NIX_JSON_ENV: &str = r#"{"__darwinAllowLocalNetworking":true,"__impureHostDeps":["/usr/bin/ditto"],"__noChroot":true,"__sandboxProfile":"sandcastle","allowSubstitutes":false,"builder":"/bin/bash","exportReferencesGraph":{"refs1":["/nix/store/p0hax2lzvjpfc2gwkk62xdglz0fcqfzn-foo"],"refs2":["/nix/store/vj2i49jm2868j2fmqvxm70vlzmzvgv14-bar.drv"]},"impureEnvVars":["UNICORN"],"name":"advanced-attributes-structured-attrs","outputChecks":{"bin":{"disallowedReferences":["/nix/store/r5cff30838majxk5mp3ip2diffi8vpaj-bar","dev"],"disallowedRequisites":["/nix/store/9b61w26b4avv870dw0ymb6rw4r1hzpws-bar-dev"]},"dev":{"maxClosureSize":5909,"maxSize":789},"out":{"allowedReferences":["/nix/store/p0hax2lzvjpfc2gwkk62xdglz0fcqfzn-foo"],"allowedRequisites":["/nix/store/z0rjzy29v9k5qa4nqpykrbzirj7sd43v-foo-dev","bin"]}},"outputs":["out","bin","dev"],"preferLocalBuild":true,"requiredSystemFeatures":["rainbow","uid-range"],"system":"my-system"}"#;

    #[test]
    fn nix_structured_attrs_derivation_gives_nixs_aterm_env() {
        let sd = StoreDir::default();
        let d = Derivation::from_show_json(&structured(), None, &sd).unwrap();
        assert_eq!(d.env["__json"], NIX_JSON_ENV);
        assert_eq!(d.input_drvs.len(), 2);
        assert!(
            d.input_srcs
                .contains("/nix/store/vj2i49jm2868j2fmqvxm70vlzmzvgv14-bar.drv")
        );
        assert_eq!(
            d.outputs["bin"],
            DerivationOutput::InputAddressed {
                path: "/nix/store/cnpasdljgkhnwaf78cf3qygcp4qbki1c-advanced-attributes-structured-attrs-bin".into()
            }
        );
        // The key order of the document does not matter: Nix's dump sorts.
        let mut v = structured();
        let sa = v["structuredAttrs"].as_object().unwrap().clone();
        let reversed: serde_json::Map<String, Value> = sa.into_iter().rev().collect();
        v["structuredAttrs"] = Value::Object(reversed);
        assert_eq!(
            Derivation::from_show_json(&v, None, &sd).unwrap().env["__json"],
            NIX_JSON_ENV
        );
    }

    #[test]
    fn malformed_v4_documents() {
        let sd = StoreDir::default();
        let err = |f: &dyn Fn(&mut Value)| {
            let mut v = structured();
            f(&mut v);
            Derivation::from_show_json(&v, None, &sd).unwrap_err()
        };
        assert_eq!(
            err(&|v| {
                v.as_object_mut().unwrap().remove("inputs");
            }),
            JsonError::Missing("inputs")
        );
        // Version 3's input fields are not version 4's.
        assert_eq!(
            err(&|v| {
                let i = v.as_object_mut().unwrap().remove("inputs").unwrap();
                v["inputSrcs"] = i["srcs"].clone();
                v["inputDrvs"] = i["drvs"].clone();
            }),
            JsonError::Missing("inputs")
        );
        assert_eq!(
            err(&|v| v["env"]["__json"] = json!("{}")),
            JsonError::StructuredAttrsTwice
        );
        assert_eq!(
            err(
                &|v| v["inputs"]["drvs"]["afc3vbjbzql750v2lp8gxgaxsajphzih-foo.drv"] =
                    json!({"outputs": ["out"], "dynamicOutputs": {"out": {}}})
            ),
            JsonError::Missing("outputs")
        );
        assert!(matches!(
            err(&|v| v["outputs"]["out"]["path"] = json!("not-a-store-path")),
            JsonError::BadStorePath { field: "path", .. }
        ));
        assert!(matches!(
            err(&|v| v["version"] = json!(7)),
            JsonError::UnknownVersion(n) if n == "7"
        ));
        assert_eq!(
            err(&|v| v["version"] = json!("4")),
            JsonError::Field("version", "a number")
        );
    }
}
