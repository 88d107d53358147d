//! Nix 2.8's `checkOutputs`: what a derivation allows its outputs to refer to, and how large they
//! may be, checked once every output is built and hashed (final paths) and before any is
//! registered. A violation fails the build permanently (Nix's `OutputRejected`).
//!
//! - Without structured attributes, `allowedReferences`, `allowedRequisites`,
//!   `disallowedReferences` and `disallowedRequisites` (whitespace-separated) apply to every
//!   output; an output's own path is left out of its requisites (not of its references).
//! - With structured attributes only `outputChecks.<output>` counts: `maxSize`,
//!   `maxClosureSize` (NAR bytes) and the four lists; an output's requisites include itself.
//! - A list item is a store path or the name of one of the derivation's outputs; anything else
//!   is an illegal reference specifier.
//! - Checks run output by output (by name), each in the order: maxSize, maxClosureSize,
//!   allowedReferences, allowedRequisites, disallowedReferences, disallowedRequisites; the first
//!   violation is the error.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::{Map, Value};
use thiserror::Error;

use super::structured_attrs;
use crate::store::api::PathInfo;
use crate::store::derivation::Derivation;
use crate::store::path::StoreDir;

/// A violation (or checks that cannot be read); the messages are Nix's.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OutputCheckError {
    #[error("attribute '{name}' of derivation '{drv}' must be a list of strings")]
    NotStrings { name: String, drv: String },
    #[error("attribute '{name}' of derivation '{drv}' must be a number")]
    NotANumber { name: String, drv: String },
    #[error("cannot process __json attribute of '{drv}': {message}")]
    BadJson { drv: String, message: String },
    #[error("derivation contains an illegal reference specifier '{0}'")]
    IllegalSpecifier(String),
    #[error("path '{path}' is too large at {size} bytes; limit is {limit} bytes")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("closure of path '{path}' is too large at {size} bytes; limit is {limit} bytes")]
    ClosureTooLarge { path: String, size: u64, limit: u64 },
    #[error("output '{path}' is not allowed to refer to the following paths:{}", list(.paths))]
    NotAllowed { path: String, paths: Vec<String> },
    #[error("path '{0}' is not valid")]
    NotValid(String),
}

fn list(paths: &[String]) -> String {
    paths.iter().map(|p| format!("\n  {p}")).collect()
}

/// The checks of one output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checks {
    pub ignore_self_refs: bool,
    pub max_size: Option<u64>,
    pub max_closure_size: Option<u64>,
    pub allowed_references: Option<Vec<String>>,
    pub allowed_requisites: Option<Vec<String>>,
    pub disallowed_references: Option<Vec<String>>,
    pub disallowed_requisites: Option<Vec<String>>,
}

impl Checks {
    /// Whether any check needs the closure of an output (and so the inputs' path infos).
    pub fn needs_closure(&self) -> bool {
        self.max_closure_size.is_some()
            || self.allowed_requisites.is_some()
            || self.disallowed_requisites.is_some()
    }
}

/// Nix's tokenizer: separated by spaces, tabs, newlines, carriage returns.
fn tokens(s: &str) -> Vec<String> {
    s.split([' ', '\t', '\n', '\r'])
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// An `outputChecks` list as nlohmann iterates it: an array's or object's members, `null` as
/// nothing, a single string as itself; every member must be a string.
fn json_strings(v: &Value, name: &str, drv: &str) -> Result<Vec<String>, OutputCheckError> {
    let members: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(m) => m.values().collect(),
        Value::Null => vec![],
        other => vec![other],
    };
    members
        .into_iter()
        .map(|m| {
            m.as_str()
                .map(str::to_string)
                .ok_or_else(|| OutputCheckError::NotStrings {
                    name: name.to_string(),
                    drv: drv.to_string(),
                })
        })
        .collect()
}

/// A size as nlohmann's `get<uint64_t>()` reads it (negative integers wrap, floats truncate).
fn json_u64(v: &Value, name: &str, drv: &str) -> Result<u64, OutputCheckError> {
    let n = v.as_number().ok_or_else(|| OutputCheckError::NotANumber {
        name: name.to_string(),
        drv: drv.to_string(),
    })?;
    Ok(if let Some(u) = n.as_u64() {
        u
    } else if let Some(i) = n.as_i64() {
        i as u64
    } else {
        n.as_f64().unwrap_or(0.0) as u64
    })
}

/// The checks of each output of `drv` (named by `drv_path` in errors), by output name; outputs
/// without checks are left out. `parsed`: its structured attributes when the caller has parsed
/// its `__json` already (else it is parsed here).
pub fn checks_of(
    drv: &Derivation,
    parsed: Option<&Map<String, Value>>,
    drv_path: &str,
) -> Result<BTreeMap<String, Checks>, OutputCheckError> {
    let mut out = BTreeMap::new();
    match drv.env.get("__json") {
        None => {
            let get = |n: &str| drv.env.get(n).map(|v| tokens(v));
            let c = Checks {
                ignore_self_refs: true,
                allowed_references: get("allowedReferences"),
                allowed_requisites: get("allowedRequisites"),
                disallowed_references: get("disallowedReferences"),
                disallowed_requisites: get("disallowedRequisites"),
                ..Checks::default()
            };
            if c != (Checks {
                ignore_self_refs: true,
                ..Checks::default()
            }) {
                for o in drv.outputs.keys() {
                    out.insert(o.clone(), c.clone());
                }
            }
        }
        Some(json) => {
            let owned;
            let attrs = match parsed {
                Some(a) => a,
                None => {
                    owned =
                        structured_attrs::parse(json).map_err(|e| OutputCheckError::BadJson {
                            drv: drv_path.to_string(),
                            message: e.to_string(),
                        })?;
                    &owned
                }
            };
            let Some(Value::Object(per_output)) = attrs.get("outputChecks") else {
                return Ok(out);
            };
            for o in drv.outputs.keys() {
                let Some(spec) = per_output.get(o) else {
                    continue;
                };
                let Value::Object(spec) = spec else {
                    out.insert(o.clone(), Checks::default());
                    continue;
                };
                let size = |n: &str| spec.get(n).map(|v| json_u64(v, n, drv_path)).transpose();
                let strings = |n: &str| {
                    spec.get(n)
                        .map(|v| json_strings(v, n, drv_path))
                        .transpose()
                };
                out.insert(
                    o.clone(),
                    Checks {
                        ignore_self_refs: false,
                        max_size: size("maxSize")?,
                        max_closure_size: size("maxClosureSize")?,
                        allowed_references: strings("allowedReferences")?,
                        allowed_requisites: strings("allowedRequisites")?,
                        disallowed_references: strings("disallowedReferences")?,
                        disallowed_requisites: strings("disallowedRequisites")?,
                    },
                );
            }
        }
    }
    Ok(out)
}

/// The NAR size and references of a path that is not one of the outputs, if known.
pub type OtherPath<'a> = &'a dyn Fn(&str) -> Option<(u64, BTreeSet<String>)>;

/// Applies `checks` to the built `outputs` (by output name; final paths). `other(path)` gives
/// the NAR size and references of any other path a closure reaches (the inputs' closure).
pub fn check_outputs(
    sd: &StoreDir,
    checks: &BTreeMap<String, Checks>,
    outputs: &BTreeMap<String, PathInfo>,
    other: OtherPath<'_>,
) -> Result<(), OutputCheckError> {
    let by_path: BTreeMap<&str, &PathInfo> =
        outputs.values().map(|i| (i.path.as_str(), i)).collect();
    let closure = |start: &str| -> Result<(BTreeSet<String>, u64), OutputCheckError> {
        let mut done = BTreeSet::new();
        let mut size = 0u64;
        let mut left = VecDeque::from([start.to_string()]);
        while let Some(p) = left.pop_front() {
            if !done.insert(p.clone()) {
                continue;
            }
            let (nar_size, refs) = match by_path.get(p.as_str()) {
                Some(i) => (i.nar_size, i.references.clone()),
                None => other(&p).ok_or_else(|| OutputCheckError::NotValid(p.clone()))?,
            };
            size = size.saturating_add(nar_size);
            left.extend(refs);
        }
        Ok((done, size))
    };
    for (name, info) in outputs {
        let Some(c) = checks.get(name) else { continue };
        if let Some(limit) = c.max_size {
            if info.nar_size > limit {
                return Err(OutputCheckError::TooLarge {
                    path: info.path.clone(),
                    size: info.nar_size,
                    limit,
                });
            }
        }
        if let Some(limit) = c.max_closure_size {
            let (_, size) = closure(&info.path)?;
            if size > limit {
                return Err(OutputCheckError::ClosureTooLarge {
                    path: info.path.clone(),
                    size,
                    limit,
                });
            }
        }
        let check_refs = |value: &Option<Vec<String>>, allowed: bool, recursive: bool| {
            let Some(value) = value else { return Ok(()) };
            let mut spec = BTreeSet::new();
            for i in value {
                if sd.parse(i).is_ok() {
                    spec.insert(i.clone());
                } else if let Some(o) = outputs.get(i) {
                    spec.insert(o.path.clone());
                } else {
                    return Err(OutputCheckError::IllegalSpecifier(i.clone()));
                }
            }
            let mut used = if recursive {
                closure(&info.path)?.0
            } else {
                info.references.clone()
            };
            if recursive && c.ignore_self_refs {
                used.remove(&info.path);
            }
            let bad: Vec<String> = used
                .into_iter()
                .filter(|p| spec.contains(p) != allowed)
                .collect();
            if bad.is_empty() {
                Ok(())
            } else {
                Err(OutputCheckError::NotAllowed {
                    path: info.path.clone(),
                    paths: bad,
                })
            }
        };
        check_refs(&c.allowed_references, true, false)?;
        check_refs(&c.allowed_requisites, true, true)?;
        check_refs(&c.disallowed_references, false, false)?;
        check_refs(&c.disallowed_requisites, false, true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::derivation::DerivationOutput;

    const OUT: &str = "/s/00000000000000000000000000000000-x";
    const DEV: &str = "/s/11111111111111111111111111111111-x-dev";
    const DEP: &str = "/s/22222222222222222222222222222222-dep";
    const DEP2: &str = "/s/33333333333333333333333333333333-dep2";

    fn sd() -> StoreDir {
        StoreDir::new("/s").unwrap()
    }

    fn drv(env: &[(&str, &str)]) -> Derivation {
        Derivation {
            name: "x".into(),
            outputs: [
                (
                    "out".to_string(),
                    DerivationOutput::InputAddressed { path: OUT.into() },
                ),
                (
                    "dev".to_string(),
                    DerivationOutput::InputAddressed { path: DEV.into() },
                ),
            ]
            .into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn info(path: &str, size: u64, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: path.into(),
            nar_hash: [0; 32],
            nar_size: size,
            references: refs.iter().map(|r| r.to_string()).collect(),
            ca: None,
            deriver: None,
        }
    }

    /// out → {out, dep}, dev → {out}; dep → dep2 (100 + 10 + 1 bytes).
    fn outputs() -> BTreeMap<String, PathInfo> {
        [
            ("out".to_string(), info(OUT, 100, &[OUT, DEP])),
            ("dev".to_string(), info(DEV, 5, &[OUT])),
        ]
        .into()
    }

    fn other(p: &str) -> Option<(u64, BTreeSet<String>)> {
        match p {
            DEP => Some((10, [DEP2.to_string()].into())),
            DEP2 => Some((1, BTreeSet::new())),
            _ => None,
        }
    }

    fn run(env: &[(&str, &str)]) -> Result<(), OutputCheckError> {
        let d = drv(env);
        let checks = checks_of(&d, None, "/s/d.drv")?;
        check_outputs(&sd(), &checks, &outputs(), &other)
    }

    fn not_allowed(path: &str, paths: &[&str]) -> Result<(), OutputCheckError> {
        Err(OutputCheckError::NotAllowed {
            path: path.into(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
        })
    }

    #[test]
    fn legacy_lists_apply_to_every_output() {
        assert_eq!(run(&[]), Ok(()));
        // Outputs are checked by name (dev first); self-references count as references…
        assert_eq!(
            run(&[("allowedReferences", &format!("{DEP} dev"))]),
            not_allowed(DEV, &[OUT])
        );
        assert_eq!(
            run(&[("allowedReferences", &format!("{DEP} dev\n"))]),
            not_allowed(DEV, &[OUT])
        );
        assert_eq!(
            run(&[("allowedReferences", &format!("{DEP} dev {OUT}"))]),
            Ok(())
        );
        assert_eq!(
            run(&[("allowedReferences", &format!("out\t{DEP}"))]),
            Ok(())
        );
        // … but not as requisites; dev's closure has out's references.
        assert_eq!(
            run(&[("allowedRequisites", &format!("out {DEP}"))]),
            not_allowed(DEV, &[DEP2])
        );
        assert_eq!(
            run(&[("allowedRequisites", &format!("out {DEP} {DEP2}"))]),
            Ok(())
        );
        assert_eq!(run(&[("allowedReferences", "")]), not_allowed(DEV, &[OUT]));
        assert_eq!(
            run(&[("disallowedReferences", DEP)]),
            not_allowed(OUT, &[DEP])
        );
        assert_eq!(run(&[("disallowedReferences", DEP2)]), Ok(()));
        assert_eq!(
            run(&[("disallowedRequisites", DEP2)]),
            not_allowed(DEV, &[DEP2])
        );
        let e = run(&[("disallowedReferences", "lib")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "derivation contains an illegal reference specifier 'lib'"
        );
    }

    #[test]
    fn structured_output_checks_are_per_output_and_count_the_output_itself() {
        let j = |s: &str| run(&[("__json", s)]);
        assert_eq!(j(r#"{"allowedReferences":[]}"#), Ok(()));
        assert_eq!(
            j(r#"{"outputChecks":{"out":{"allowedRequisites":["out"]}}}"#),
            not_allowed(OUT, &[DEP, DEP2])
        );
        assert_eq!(
            j(&format!(
                r#"{{"outputChecks":{{"dev":{{"allowedRequisites":["{DEP}","{DEP2}"]}}}}}}"#
            )),
            not_allowed(DEV, &[OUT, DEV])
        );
        assert_eq!(
            j(r#"{"outputChecks":{"dev":{"allowedReferences":"out"}}}"#),
            Ok(())
        );
        let e = j(r#"{"outputChecks":{"out":{"maxSize":99}}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("path '{OUT}' is too large at 100 bytes; limit is 99 bytes")
        );
        assert_eq!(j(r#"{"outputChecks":{"out":{"maxSize":100}}}"#), Ok(()));
        let e = j(r#"{"outputChecks":{"dev":{"maxClosureSize":115}}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("closure of path '{DEV}' is too large at 116 bytes; limit is 115 bytes")
        );
        assert_eq!(
            j(r#"{"outputChecks":{"dev":{"maxClosureSize":116}}}"#),
            Ok(())
        );
        let e = j(r#"{"outputChecks":{"out":{"maxSize":"1"}}}"#).unwrap_err();
        assert!(matches!(e, OutputCheckError::NotANumber { .. }), "{e}");
        let e = j(r#"{"outputChecks":{"out":{"allowedReferences":[1]}}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "attribute 'allowedReferences' of derivation '/s/d.drv' must be a list of strings"
        );
        assert!(matches!(j("{"), Err(OutputCheckError::BadJson { .. })));
    }

    #[test]
    fn a_closure_reaching_an_unknown_path_is_an_error() {
        let d = drv(&[("allowedRequisites", "out")]);
        let checks = checks_of(&d, None, "/s/d.drv").unwrap();
        let e = check_outputs(&sd(), &checks, &outputs(), &|_| None).unwrap_err();
        assert_eq!(e, OutputCheckError::NotValid(DEP.into()));
    }

    #[test]
    fn the_message_lists_each_path_on_its_own_line() {
        let e = OutputCheckError::NotAllowed {
            path: OUT.into(),
            paths: vec![DEP.into(), DEP2.into()],
        };
        assert_eq!(
            e.to_string(),
            format!(
                "output '{OUT}' is not allowed to refer to the following paths:\n  {DEP}\n  {DEP2}"
            )
        );
    }
}
