//! The options a derivation gives its scheduler, read as Nix 2.8's `ParsedDerivation` reads them:
//! from the structured attributes (`__json`) when the drv has them, else from its env.
//!
//! - `requiredSystemFeatures`: a list of strings in `__json`, else the env value split on
//!   whitespace;
//! - `preferLocalBuild` (default false) and `allowSubstitutes` (default true): a Boolean in
//!   `__json` (anything else is an error, as in Nix), else true exactly when the env value is `1`.
//!
//! Unlike Nix's `getRequiredFeatures`, `ca-derivations` is not added for a drv whose output paths
//! are not known: qr builds those itself, so it asks nothing of the machine.

use std::collections::BTreeSet;

use serde_json::{Map, Value};
use thiserror::Error;

use crate::builder::executor::structured_attrs::{self, StructuredAttrsError};
use crate::store::Derivation;

/// Why a derivation's options cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DrvOptionsError {
    #[error(transparent)]
    Attrs(#[from] StructuredAttrsError),
    #[error("attribute '{name}' must be a Boolean")]
    NotBool { name: String },
}

/// What a derivation asks of the machine that builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvOptions {
    pub required_features: BTreeSet<String>,
    /// `preferLocalBuild`: the drv is cheap to build, so build it where it is (Hydra: on a
    /// machine with the `local` mandatory feature, if the runner could build it itself).
    pub prefer_local_build: bool,
    /// `allowSubstitutes`: false when fetching its outputs costs more than building them. qr
    /// never substitutes a step's outputs, so nothing reads it yet (see `docs/builders.md`).
    pub allow_substitutes: bool,
}

impl Default for DrvOptions {
    fn default() -> Self {
        DrvOptions {
            required_features: BTreeSet::new(),
            prefer_local_build: false,
            allow_substitutes: true,
        }
    }
}

impl DrvOptions {
    /// The options of `drv`, parsing its `__json` if it has one.
    pub fn of(drv: &Derivation) -> Result<DrvOptions, DrvOptionsError> {
        match drv.env.get("__json") {
            Some(j) => Self::of_structured(&structured_attrs::parse(j)?),
            None => Ok(Self::of_env(drv)),
        }
    }

    /// The options of a drv whose structured attributes are `attrs` (already parsed).
    pub fn of_structured(attrs: &Map<String, Value>) -> Result<DrvOptions, DrvOptionsError> {
        let bool_attr = |name: &str, default: bool| match attrs.get(name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(DrvOptionsError::NotBool {
                name: name.to_string(),
            }),
        };
        Ok(DrvOptions {
            required_features: structured_attrs::strings_attr(attrs, "requiredSystemFeatures")?
                .unwrap_or_default()
                .into_iter()
                .collect(),
            prefer_local_build: bool_attr("preferLocalBuild", false)?,
            allow_substitutes: bool_attr("allowSubstitutes", true)?,
        })
    }

    /// The options of a drv without structured attributes.
    fn of_env(drv: &Derivation) -> DrvOptions {
        let bool_attr = |name: &str, default: bool| match drv.env.get(name) {
            None => default,
            Some(v) => v == "1",
        };
        DrvOptions {
            required_features: drv
                .env
                .get("requiredSystemFeatures")
                .map(|s| s.split_ascii_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
            prefer_local_build: bool_attr("preferLocalBuild", false),
            allow_substitutes: bool_attr("allowSubstitutes", true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv(env: &[(&str, &str)]) -> Derivation {
        Derivation {
            name: "x".into(),
            outputs: Default::default(),
            input_drvs: Default::default(),
            dynamic_inputs: Default::default(),
            input_srcs: Default::default(),
            system: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: vec![],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn set(xs: &[&str]) -> BTreeSet<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn env_attrs_are_read_as_nix_reads_them() {
        assert_eq!(DrvOptions::of(&drv(&[])), Ok(DrvOptions::default()));
        let o = DrvOptions::of(&drv(&[
            ("requiredSystemFeatures", " kvm\tbig-parallel\n kvm "),
            ("preferLocalBuild", "1"),
            ("allowSubstitutes", ""),
        ]))
        .unwrap();
        assert_eq!(o.required_features, set(&["big-parallel", "kvm"]));
        assert!(o.prefer_local_build);
        assert!(!o.allow_substitutes);
        // Only "1" is true (Nix's `getBoolAttr` on the env).
        let o = DrvOptions::of(&drv(&[
            ("preferLocalBuild", "true"),
            ("allowSubstitutes", "1"),
        ]))
        .unwrap();
        assert!(!o.prefer_local_build);
        assert!(o.allow_substitutes);
    }

    #[test]
    fn structured_attrs_are_read_from_json_and_env_ignored() {
        let o = DrvOptions::of(&drv(&[
            (
                "__json",
                r#"{"preferLocalBuild":true,"allowSubstitutes":false,"requiredSystemFeatures":["rainbow","uid-range"]}"#,
            ),
            // Not read: with `__json`, the env is not the attributes.
            ("requiredSystemFeatures", "kvm"),
        ]))
        .unwrap();
        assert_eq!(o.required_features, set(&["rainbow", "uid-range"]));
        assert!(o.prefer_local_build);
        assert!(!o.allow_substitutes);
        let o = DrvOptions::of(&drv(&[("__json", "{}"), ("preferLocalBuild", "1")])).unwrap();
        assert_eq!(o, DrvOptions::default());
    }

    #[test]
    fn structured_attrs_of_the_wrong_type_are_errors() {
        let of = |j: &str| DrvOptions::of(&drv(&[("__json", j)]));
        assert_eq!(
            of(r#"{"preferLocalBuild":1}"#),
            Err(DrvOptionsError::NotBool {
                name: "preferLocalBuild".into()
            })
        );
        assert_eq!(
            of(r#"{"allowSubstitutes":"false"}"#),
            Err(DrvOptionsError::NotBool {
                name: "allowSubstitutes".into()
            })
        );
        assert!(matches!(
            of(r#"{"requiredSystemFeatures":"kvm"}"#),
            Err(DrvOptionsError::Attrs(
                StructuredAttrsError::NotStrings { .. }
            ))
        ));
        assert!(matches!(of("[]"), Err(DrvOptionsError::Attrs(_))));
    }

    #[test]
    fn nix_fixture_of_advanced_attributes_structured() {
        // The `__json` of Nix's own `advanced-attributes-structured-attrs` test derivation.
        let j = r#"{"allowSubstitutes":false,"builder":"/bin/bash","name":"advanced-attributes-structured-attrs","outputs":["out","bin","dev"],"preferLocalBuild":true,"requiredSystemFeatures":["rainbow","uid-range"],"system":"my-system"}"#;
        let o = DrvOptions::of(&drv(&[("__json", j)])).unwrap();
        assert!(o.prefer_local_build && !o.allow_substitutes);
        assert_eq!(o.required_features, set(&["rainbow", "uid-range"]));
    }
}
