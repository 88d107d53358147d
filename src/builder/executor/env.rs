//! The builder's environment, as Nix's `LocalDerivationGoal::initEnv` builds it (Nix 2.8 … 2.34):
//!
//! 1. `PATH=/path-not-set`, `HOME=/homeless-shelter`, `NIX_STORE=<store dir>`,
//!    `NIX_BUILD_CORES=<cores>`;
//! 2. without structured attributes, the derivation's `env` (overriding the above, e.g. its own
//!    `PATH`), except the names listed in `passAsFile`, which are written to
//!    `<build dir>/.attr-<nix32(sha256(name))>` and passed as `<name>Path`; with structured
//!    attributes (`__json`) none of the derivation's `env` (see step 6);
//! 3. `NIX_BUILD_TOP`, `TMPDIR`, `TEMPDIR`, `TMP`, `TEMP`, `PWD` = the build dir as the builder
//!    sees it (`/build` in a sandbox);
//! 4. `NIX_OUTPUT_CHECKED=1` for a fixed-output derivation, and its `impureEnvVars` from the
//!    caller's environment (a list of strings under structured attributes);
//! 5. `NIX_LOG_FD=2`, `TERM=xterm-256color`;
//! 6. with structured attributes, `.attrs.json` and `.attrs.sh` in the build dir
//!    ([`super::structured_attrs`], `outputs` mapping each output to its hash placeholder) and
//!    `NIX_ATTRS_JSON_FILE`/`NIX_ATTRS_SH_FILE` naming them as the builder sees them. (Nix 2.8 …
//!    2.14 give the build dir's path outside the sandbox there, which a sandboxed builder cannot
//!    open; 2.15 and later give `/build/.attrs.*`, as here.)
//!
//! Finally every name and value (and the files' contents) goes through the input rewrites: each
//! output's hash placeholder becomes the path the builder writes it at.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use super::structured_attrs::{self, StructuredAttrsError};
use crate::store::derivation::Derivation;
use crate::store::hash::sha256;
use crate::store::nix32;
use crate::store::placeholder::hash_placeholder;

/// Why an environment could not be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvError {
    #[error(transparent)]
    StructuredAttrs(#[from] StructuredAttrsError),
}

/// The environment and the files to create in the build dir before the builder starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderEnv {
    pub vars: BTreeMap<String, String>,
    /// (file name in the build dir, contents).
    pub files: Vec<(String, String)>,
}

/// Nix's `rewriteStrings`: each rewrite in key order, every occurrence.
pub fn rewrite(s: &str, rewrites: &BTreeMap<String, String>) -> String {
    let mut s = s.to_string();
    for (from, to) in rewrites {
        if !from.is_empty() && from != to && s.contains(from.as_str()) {
            s = s.replace(from.as_str(), to);
        }
    }
    s
}

/// Builds the environment of `drv`; `structured` is its `__json`, parsed once by the caller
/// (`None` without structured attributes), `exported` what `exportReferencesGraph` adds to them.
/// `store_dir` is the logical store dir, `build_top` the build dir
/// as the builder sees it, `impure(name)` reads the caller's environment (fixed-output only).
#[allow(clippy::too_many_arguments)]
pub fn builder_env(
    drv: &Derivation,
    structured: Option<&serde_json::Map<String, serde_json::Value>>,
    exported: &serde_json::Map<String, serde_json::Value>,
    store_dir: &str,
    build_top: &str,
    cores: usize,
    rewrites: &BTreeMap<String, String>,
    impure: impl Fn(&str) -> Option<String>,
) -> Result<BuilderEnv, EnvError> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut files = Vec::new();
    env.insert("PATH".into(), "/path-not-set".into());
    env.insert("HOME".into(), "/homeless-shelter".into());
    env.insert("NIX_STORE".into(), store_dir.into());
    env.insert("NIX_BUILD_CORES".into(), cores.to_string());
    let pass_as_file: BTreeSet<&str> = drv
        .env
        .get("passAsFile")
        .map(|s| s.split_ascii_whitespace().collect())
        .unwrap_or_default();
    for (k, v) in drv.env.iter().filter(|_| structured.is_none()) {
        if pass_as_file.contains(k.as_str()) {
            let file = format!(".attr-{}", nix32::encode(&sha256(k.as_bytes())));
            env.insert(format!("{k}Path"), format!("{build_top}/{file}"));
            files.push((file, rewrite(v, rewrites)));
        } else {
            env.insert(k.clone(), v.clone());
        }
    }
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        env.insert(k.into(), build_top.into());
    }
    if drv.is_fixed_output() {
        env.insert("NIX_OUTPUT_CHECKED".into(), "1".into());
        let vars: Vec<String> = match &structured {
            Some(attrs) => {
                structured_attrs::strings_attr(attrs, "impureEnvVars")?.unwrap_or_default()
            }
            None => drv
                .env
                .get("impureEnvVars")
                .map(|v| v.split_ascii_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
        };
        for name in vars {
            let value = impure(&name).unwrap_or_default();
            env.insert(name, value);
        }
    }
    env.insert("NIX_LOG_FD".into(), "2".into());
    env.insert("TERM".into(), "xterm-256color".into());
    if let Some(attrs) = structured {
        let mut attrs = structured_attrs::with_outputs(
            attrs,
            drv.outputs
                .keys()
                .map(|o| (o.as_str(), hash_placeholder(o))),
        );
        // `exportReferencesGraph`'s closures, as Nix adds them after `outputs`.
        for (k, v) in exported {
            attrs.insert(k.clone(), v.clone());
        }
        for (file, contents, var) in [
            (
                ".attrs.sh",
                structured_attrs::render_shell(&attrs),
                "NIX_ATTRS_SH_FILE",
            ),
            (
                ".attrs.json",
                structured_attrs::render_json(&attrs),
                "NIX_ATTRS_JSON_FILE",
            ),
        ] {
            files.push((file.to_string(), rewrite(&contents, rewrites)));
            env.insert(var.into(), format!("{build_top}/{file}"));
        }
    }
    let vars = env
        .into_iter()
        .map(|(k, v)| (rewrite(&k, rewrites), rewrite(&v, rewrites)))
        .collect();
    Ok(BuilderEnv { vars, files })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::aterm;

    const CA1: &str = r#"Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",["-c","echo ca1 > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","mx-ca1"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])"#;

    /// The drv's `__json`, parsed (as the executor does once per build).
    fn parsed(drv: &Derivation) -> Option<serde_json::Map<String, serde_json::Value>> {
        drv.env
            .get("__json")
            .map(|j| structured_attrs::parse(j).unwrap())
    }

    fn pairs(e: &BuilderEnv) -> Vec<(&str, &str)> {
        e.vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn nix_environment_with_placeholder_rewritten() {
        let drv = aterm::parse(CA1.as_bytes()).unwrap();
        let scratch = "/nix/store/ad2n5slxflrm5nvc2ykyjqk6d9x3dgr0-mx-ca1";
        let rewrites: BTreeMap<String, String> =
            [(hash_placeholder("out"), scratch.to_string())].into();
        let e = builder_env(
            &drv,
            parsed(&drv).as_ref(),
            &Default::default(),
            "/nix/store",
            "/build",
            4,
            &rewrites,
            |_| None,
        )
        .unwrap();
        assert_eq!(
            pairs(&e),
            vec![
                ("HOME", "/homeless-shelter"),
                ("NIX_BUILD_CORES", "4"),
                ("NIX_BUILD_TOP", "/build"),
                ("NIX_LOG_FD", "2"),
                ("NIX_STORE", "/nix/store"),
                ("PATH", "/usr/bin:/bin"),
                ("PWD", "/build"),
                ("TEMP", "/build"),
                ("TEMPDIR", "/build"),
                ("TERM", "xterm-256color"),
                ("TMP", "/build"),
                ("TMPDIR", "/build"),
                ("builder", "/bin/sh"),
                ("name", "mx-ca1"),
                ("out", scratch),
                ("outputHashAlgo", "sha256"),
                ("outputHashMode", "recursive"),
                ("system", "x86_64-linux"),
            ]
        );
        assert!(e.files.is_empty());
    }

    #[test]
    fn defaults_can_be_overridden_but_build_dir_vars_cannot() {
        let mut drv = aterm::parse(CA1.as_bytes()).unwrap();
        drv.env.remove("PATH");
        drv.env.insert("HOME".into(), "/h".into());
        drv.env.insert("TMPDIR".into(), "/mine".into());
        drv.env.insert("NIX_LOG_FD".into(), "7".into());
        let e = builder_env(
            &drv,
            parsed(&drv).as_ref(),
            &Default::default(),
            "/s",
            "/tmp/b",
            1,
            &BTreeMap::new(),
            |_| None,
        )
        .unwrap();
        assert_eq!(e.vars["PATH"], "/path-not-set");
        assert_eq!(e.vars["HOME"], "/h");
        assert_eq!(e.vars["TMPDIR"], "/tmp/b");
        assert_eq!(e.vars["NIX_LOG_FD"], "2");
        assert_eq!(e.vars["NIX_STORE"], "/s");
        assert!(!e.vars.contains_key("NIX_OUTPUT_CHECKED"));
    }

    #[test]
    fn pass_as_file_fixed_outputs_and_structured_attrs() {
        let mut drv = aterm::parse(CA1.as_bytes()).unwrap();
        drv.env.insert("passAsFile".into(), "big other".into());
        drv.env
            .insert("big".into(), format!("x {}", hash_placeholder("out")));
        let rewrites: BTreeMap<String, String> =
            [(hash_placeholder("out"), "/s/o".to_string())].into();
        let e = builder_env(
            &drv,
            parsed(&drv).as_ref(),
            &Default::default(),
            "/s",
            "/build",
            1,
            &rewrites,
            |_| None,
        )
        .unwrap();
        assert!(!e.vars.contains_key("big"));
        let file = format!(".attr-{}", nix32::encode(&sha256(b"big")));
        assert_eq!(e.vars["bigPath"], format!("/build/{file}"));
        assert_eq!(e.files, vec![(file, "x /s/o".to_string())]);

        let mut fod = aterm::parse(CA1.as_bytes()).unwrap();
        fod.outputs.insert(
            "out".into(),
            crate::store::DerivationOutput::CaFixed {
                method_algo: "sha256".into(),
                hash: "00".repeat(32),
                path: "/s/x".into(),
            },
        );
        fod.env
            .insert("impureEnvVars".into(), "http_proxy NOPE".into());
        let e = builder_env(
            &fod,
            parsed(&fod).as_ref(),
            &Default::default(),
            "/s",
            "/build",
            1,
            &BTreeMap::new(),
            |n| (n == "http_proxy").then(|| "p:1".to_string()),
        )
        .unwrap();
        assert_eq!(e.vars["NIX_OUTPUT_CHECKED"], "1");
        assert_eq!(e.vars["http_proxy"], "p:1");
        assert_eq!(e.vars["NOPE"], "");
    }

    #[test]
    fn structured_attrs_replace_the_env_with_files() {
        let mut drv = aterm::parse(CA1.as_bytes()).unwrap();
        drv.env.insert(
            "__json".into(),
            r#"{"name":"mx-ca1","passAsFile":["x"],"x":"in $out: ","impureEnvVars":["A"]}"#.into(),
        );
        drv.env.insert("x".into(), "not passed".into());
        let rewrites: BTreeMap<String, String> =
            [(hash_placeholder("out"), "/s/o".to_string())].into();
        let e = builder_env(
            &drv,
            parsed(&drv).as_ref(),
            &Default::default(),
            "/s",
            "/build",
            1,
            &rewrites,
            |_| None,
        )
        .unwrap();
        // None of the drv's env (not even PATH or out), no passAsFile.
        let names: Vec<&str> = e.vars.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "HOME",
                "NIX_ATTRS_JSON_FILE",
                "NIX_ATTRS_SH_FILE",
                "NIX_BUILD_CORES",
                "NIX_BUILD_TOP",
                "NIX_LOG_FD",
                "NIX_STORE",
                "PATH",
                "PWD",
                "TEMP",
                "TEMPDIR",
                "TERM",
                "TMP",
                "TMPDIR"
            ]
        );
        assert_eq!(e.vars["PATH"], "/path-not-set");
        assert_eq!(e.vars["NIX_ATTRS_SH_FILE"], "/build/.attrs.sh");
        assert_eq!(e.vars["NIX_ATTRS_JSON_FILE"], "/build/.attrs.json");
        assert_eq!(
            e.files,
            vec![
                (
                    ".attrs.sh".to_string(),
                    "declare -a impureEnvVars=('A' )\ndeclare name='mx-ca1'\n\
                     declare -A outputs=(['out']='/s/o' )\ndeclare -a passAsFile=('x' )\n\
                     declare x='in $out: '\n"
                        .to_string()
                ),
                (
                    ".attrs.json".to_string(),
                    r#"{"impureEnvVars":["A"],"name":"mx-ca1","outputs":{"out":"/s/o"},"passAsFile":["x"],"x":"in $out: "}"#
                        .to_string()
                ),
            ]
        );

        // A fixed output takes impureEnvVars from the list; a non-list is refused.
        drv.outputs.insert(
            "out".into(),
            crate::store::DerivationOutput::CaFixed {
                method_algo: "sha256".into(),
                hash: "00".repeat(32),
                path: "/s/x".into(),
            },
        );
        let e = builder_env(
            &drv,
            parsed(&drv).as_ref(),
            &Default::default(),
            "/s",
            "/build",
            1,
            &rewrites,
            |n| (n == "A").then(|| "a".to_string()),
        )
        .unwrap();
        assert_eq!(e.vars["A"], "a");
        drv.env
            .insert("__json".into(), r#"{"impureEnvVars":"A"}"#.into());
        assert_eq!(
            builder_env(
                &drv,
                parsed(&drv).as_ref(),
                &Default::default(),
                "/s",
                "/b",
                1,
                &BTreeMap::new(),
                |_| None
            )
            .unwrap_err()
            .to_string(),
            "attribute 'impureEnvVars' must be a list of strings"
        );
    }
}
