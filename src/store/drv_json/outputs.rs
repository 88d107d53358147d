//! One output of a derivation in each format, told apart by its set of keys as Nix does:
//!
//! | kind | unversioned (Nix 2.8–2.22) | unversioned (2.23–2.31) | version 3 (2.32) | version 4 (2.33 on) |
//! |---|---|---|---|---|
//! | input-addressed | `path` | `path` | `path` (base name) | `path` (base name) |
//! | fixed | `path`, `hashAlgo` (`r:sha256`), `hash` (hex) | `path`, `method`, `hashAlgo`, `hash` | `method`, `hashAlgo`, `hash` (hex) | `method`, `hash` (SRI) |
//! | floating | `hashAlgo` (`r:sha256`) | `method`, `hashAlgo` | `method`, `hashAlgo` | `method`, `hashAlgo` |
//! | deferred | (none) | (none) | (none) | (none) |
//! | impure | `hashAlgo`, `impure` | `method`, `hashAlgo`, `impure` | same | same |
//!
//! `method` is `flat`, `nar`, `text` or `git`; the model keeps the ATerm's `hashAlgo` spelling
//! (`sha256`, `r:sha256`, `text:sha256`).

use base64::Engine as _;
use serde_json::Value;

use super::fields::{Obj, PathForm, store_path};
use super::{Format, JsonError};
use crate::store::clip;
use crate::store::derivation::{is_valid_fixed_hash, split_method_algo};
use crate::store::hash::to_hex;
use crate::store::path::StoreDir;

/// An output as the document gives it, before the derivation's name gives a fixed output its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawOutput {
    InputAddressed(String),
    Fixed {
        method_algo: String,
        hash: String,
        path: Option<String>,
    },
    Floating {
        method_algo: String,
    },
    Deferred,
}

/// Reads output `name` of a derivation in `format`.
pub fn parse(format: Format, sd: &StoreDir, name: &str, v: &Value) -> Result<RawOutput, JsonError> {
    let o = Obj::new(v, "output")?;
    let bad = || JsonError::BadOutput(clip(name));
    if o.get("impure").is_some() {
        return Err(JsonError::Impure(clip(name)));
    }
    match format {
        Format::Unversioned => {
            // Older tools wrote empty strings or null for absent fields; they mean absent here.
            let path = o.opt_string("path")?;
            let method = o.opt_string("method")?;
            let algo = o.opt_string("hashAlgo")?;
            let hash = o.opt_string("hash")?;
            let path = path
                .map(|p| store_path(sd, PathForm::Full, "path", &p, false))
                .transpose()?;
            let method_algo = match (method, algo) {
                (None, None) => None,
                (None, Some(a)) => Some(legacy_method_algo(name, &a)?),
                (Some(m), Some(a)) => Some(method_algo(name, &m, &a)?),
                (Some(_), None) => return Err(bad()),
            };
            match (method_algo, hash, path) {
                (Some(method_algo), Some(hash), path) => fixed(name, method_algo, hash, path),
                (Some(method_algo), None, None) => Ok(RawOutput::Floating { method_algo }),
                (None, None, Some(p)) => Ok(RawOutput::InputAddressed(p)),
                (None, None, None) => Ok(RawOutput::Deferred),
                _ => Err(bad()),
            }
        }
        Format::V3 | Format::V4 => {
            let keys = o.keys();
            let keys: Vec<&str> = keys.into_iter().collect();
            match (format, keys.as_slice()) {
                (_, ["path"]) => Ok(RawOutput::InputAddressed(store_path(
                    sd,
                    PathForm::BaseName,
                    "path",
                    &o.string("path")?,
                    false,
                )?)),
                (Format::V3, ["hash", "hashAlgo", "method"]) => {
                    let ma = method_algo(name, &o.string("method")?, &o.string("hashAlgo")?)?;
                    fixed(name, ma, o.string("hash")?, None)
                }
                (Format::V4, ["hash", "method"]) => {
                    let (algo, hex) = parse_sri(name, &o.string("hash")?)?;
                    let ma = method_algo(name, &o.string("method")?, &algo)?;
                    fixed(name, ma, hex, None)
                }
                (_, ["hashAlgo", "method"]) => Ok(RawOutput::Floating {
                    method_algo: method_algo(name, &o.string("method")?, &o.string("hashAlgo")?)?,
                }),
                (_, []) => Ok(RawOutput::Deferred),
                _ => Err(bad()),
            }
        }
    }
}

fn fixed(
    name: &str,
    method_algo: String,
    hash: String,
    path: Option<String>,
) -> Result<RawOutput, JsonError> {
    if !is_valid_fixed_hash(&method_algo, &hash) {
        return Err(JsonError::BadHash {
            output: clip(name),
            hash: clip(&hash),
            why: "expected lower-case hex of the algorithm's length",
        });
    }
    Ok(RawOutput::Fixed {
        method_algo,
        hash,
        path,
    })
}

/// The unversioned format before Nix 2.23: `hashAlgo` carries the method (`r:sha256`).
fn legacy_method_algo(name: &str, a: &str) -> Result<String, JsonError> {
    if split_method_algo(a).is_none() {
        return Err(JsonError::UnsupportedHash {
            output: clip(name),
            what: clip(a),
        });
    }
    Ok(a.to_string())
}

/// `method` and `hashAlgo` (Nix 2.23 on) in the ATerm's spelling.
fn method_algo(name: &str, method: &str, algo: &str) -> Result<String, JsonError> {
    let prefix = match method {
        "flat" => "",
        "nar" => "r:",
        "text" => "text:",
        _ => {
            return Err(JsonError::UnsupportedMethod {
                output: clip(name),
                method: clip(method),
            });
        }
    };
    let ma = format!("{prefix}{algo}");
    if split_method_algo(&ma).is_none() {
        return Err(JsonError::UnsupportedHash {
            output: clip(name),
            what: clip(algo),
        });
    }
    Ok(ma)
}

/// An SRI hash (`sha256-<base64>`) as its algorithm and lower-case hex.
fn parse_sri(name: &str, s: &str) -> Result<(String, String), JsonError> {
    let bad = |why| JsonError::BadHash {
        output: clip(name),
        hash: clip(s),
        why,
    };
    let (algo, b64) = s
        .split_once('-')
        .ok_or_else(|| bad("expected an SRI hash `<algorithm>-<base64>`"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| bad("its digest is not base64"))?;
    let hex = to_hex(&bytes);
    if split_method_algo(algo).is_none_or(|(m, _)| !m.is_empty()) {
        return Err(JsonError::UnsupportedHash {
            output: clip(name),
            what: clip(algo),
        });
    }
    if !is_valid_fixed_hash(algo, &hex) {
        return Err(bad("its digest has the wrong length for the algorithm"));
    }
    Ok((algo.to_string(), hex))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const HEX: &str = "894517c9163c896ec31a2adbd33c0681fd5f45b2c0ef08a64c92a03fb97f390f";
    const SRI: &str = "sha256-iUUXyRY8iW7DGirb0zwGgf1fRbLA7wimTJKgP7l/OQ8=";

    fn p(f: Format, v: Value) -> Result<RawOutput, JsonError> {
        parse(f, &StoreDir::default(), "out", &v)
    }

    fn fixed(ma: &str) -> RawOutput {
        RawOutput::Fixed {
            method_algo: ma.into(),
            hash: HEX.into(),
            path: None,
        }
    }

    #[test]
    fn nix_test_data_outputs_in_v3_and_v4() {
        // Nix's libstore-tests output-*.json (2.32: version 3; 2.33 on: version 4).
        assert_eq!(
            p(
                Format::V3,
                json!({"hash": HEX, "hashAlgo": "sha256", "method": "nar"})
            ),
            Ok(fixed("r:sha256"))
        );
        assert_eq!(
            p(
                Format::V3,
                json!({"hash": HEX, "hashAlgo": "sha256", "method": "flat"})
            ),
            Ok(fixed("sha256"))
        );
        assert_eq!(
            p(Format::V4, json!({"hash": SRI, "method": "nar"})),
            Ok(fixed("r:sha256"))
        );
        assert_eq!(
            p(Format::V4, json!({"hash": SRI, "method": "flat"})),
            Ok(fixed("sha256"))
        );
        assert_eq!(
            p(Format::V4, json!({"hash": SRI, "method": "text"})),
            Ok(fixed("text:sha256"))
        );
        for f in [Format::V3, Format::V4] {
            assert_eq!(
                p(f, json!({"hashAlgo": "sha256", "method": "nar"})),
                Ok(RawOutput::Floating {
                    method_algo: "r:sha256".into()
                })
            );
            assert_eq!(p(f, json!({})), Ok(RawOutput::Deferred));
            assert_eq!(
                p(
                    f,
                    json!({"path": "c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-drv-name-output-name"})
                ),
                Ok(RawOutput::InputAddressed(
                    "/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-drv-name-output-name".into()
                ))
            );
            assert_eq!(
                p(
                    f,
                    json!({"hashAlgo": "sha256", "impure": true, "method": "nar"})
                ),
                Err(JsonError::Impure("out".into()))
            );
        }
    }

    #[test]
    fn unversioned_outputs_of_both_eras() {
        let u = Format::Unversioned;
        assert_eq!(
            p(u, json!({"hashAlgo": "r:sha256", "hash": HEX})),
            Ok(fixed("r:sha256"))
        );
        assert_eq!(
            p(
                u,
                json!({"method": "nar", "hashAlgo": "sha256", "hash": HEX})
            ),
            Ok(fixed("r:sha256"))
        );
        assert_eq!(
            p(u, json!({"method": "nar", "hashAlgo": "sha256"})),
            p(u, json!({"hashAlgo": "r:sha256"}))
        );
        assert_eq!(
            p(u, json!({"path": "", "hashAlgo": "", "hash": ""})),
            Ok(RawOutput::Deferred)
        );
    }

    #[test]
    fn malformed_outputs_say_what_is_wrong() {
        let err = |f, v| p(f, v).unwrap_err().to_string();
        // A v3 fixed output in a v4 document (hex and hashAlgo, not SRI) is not v4.
        assert!(
            err(
                Format::V4,
                json!({"hash": HEX, "hashAlgo": "sha256", "method": "nar"})
            )
            .contains("output \"out\"")
        );
        assert!(err(Format::V4, json!({"hash": HEX, "method": "nar"})).contains("SRI"));
        assert!(
            err(Format::V4, json!({"hash": "sha256-AAAA", "method": "nar"}))
                .contains("wrong length")
        );
        assert!(err(Format::V4, json!({"hash": SRI, "method": "git"})).contains("\"git\""));
        assert!(err(Format::V3, json!({"method": "nar", "hashAlgo": "blake3"})).contains("blake3"));
        assert!(
            err(
                Format::V3,
                json!({"path": "/nix/store/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-x"})
            )
            .contains("not a valid store path")
        );
        assert!(
            err(
                Format::Unversioned,
                json!({"path": "/elsewhere/c015dhfh5l0lp6wxyvdn7bmwhbbr6hr9-x"})
            )
            .contains("/elsewhere")
        );
        assert!(
            err(
                Format::Unversioned,
                json!({"hashAlgo": "r:sha256", "hash": "abc"})
            )
            .contains("hex")
        );
        assert!(err(Format::Unversioned, json!({"hash": HEX})).contains("needs either"));
        assert!(matches!(
            p(Format::V3, json!(["path"])),
            Err(JsonError::NotAnObject("output"))
        ));
    }
}
