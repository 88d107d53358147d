//! Version 3 (`"version": 3`, Nix 2.32): the unversioned format's fields, all required, with
//! store paths as base names (`<hash>-<name>`, no store dir), fixed outputs as `method`,
//! `hashAlgo` and a hex `hash` without `path`, and structured attributes as a `structuredAttrs`
//! object instead of `env.__json`.

use super::fields::{Obj, PathForm};
use super::{JsonError, Parts, input_drvs, input_srcs};
use crate::store::path::StoreDir;

pub(crate) fn parts(obj: &Obj<'_>, sd: &StoreDir) -> Result<Parts, JsonError> {
    // In this order: a missing field is reported as before (name, inputSrcs, inputDrvs).
    let name = Some(obj.string("name")?);
    let input_srcs = input_srcs(
        obj.required("inputSrcs")?,
        "inputSrcs",
        PathForm::BaseName,
        sd,
    )?;
    let (input_drvs, dynamic_inputs) = input_drvs(
        obj.required("inputDrvs")?,
        "inputDrvs",
        PathForm::BaseName,
        sd,
    )?;
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
    use crate::store::aterm;
    use crate::store::derivation::Derivation;
    use crate::store::path::StoreDir;

    /// Nix 2.32's libstore-tests `simple-derivation.json` and the ATerm it stands for.
    #[test]
    fn nix_simple_derivation() {
        let v = json!({
            "args": ["bar", "baz"], "builder": "foo", "env": {"BIG_BAD": "WOLF"},
            "inputDrvs": {"c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep2.drv":
                {"dynamicOutputs": {}, "outputs": ["cat", "dog"]}},
            "inputSrcs": ["c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep1"],
            "name": "simple-derivation", "outputs": {}, "system": "wasm-sel4", "version": 3
        });
        let d = Derivation::from_show_json(&v, None, &StoreDir::default()).unwrap();
        assert_eq!(
            d.to_aterm(),
            "Derive([],[(\"/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep2.drv\",[\"cat\",\"dog\"])],\
             [\"/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep1\"],\"wasm-sel4\",\"foo\",\
             [\"bar\",\"baz\"],[(\"BIG_BAD\",\"WOLF\")])"
        );
        // The same derivation under another store dir.
        let other = StoreDir::new("/qr/store").unwrap();
        let d2 = Derivation::from_show_json(&v, None, &other).unwrap();
        assert!(
            d2.input_srcs
                .contains("/qr/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep1")
        );
        assert_eq!(
            aterm::parse_named(d.to_aterm().as_bytes(), "simple-derivation").ok(),
            Some(d.clone())
        );

        let mut no_name = v.clone();
        no_name.as_object_mut().unwrap().remove("name");
        assert_eq!(
            Derivation::from_show_json(&no_name, Some("x"), &StoreDir::default()),
            Err(JsonError::Missing("name"))
        );
        let mut v4_inputs = v.clone();
        v4_inputs.as_object_mut().unwrap().remove("inputSrcs");
        assert_eq!(
            Derivation::from_show_json(&v4_inputs, None, &StoreDir::default()),
            Err(JsonError::Missing("inputSrcs"))
        );
        let mut full = v;
        full["inputSrcs"] = json!(["/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-dep1"]);
        assert!(
            Derivation::from_show_json(&full, None, &StoreDir::default())
                .unwrap_err()
                .to_string()
                .contains("\"inputSrcs\"")
        );
    }
}
