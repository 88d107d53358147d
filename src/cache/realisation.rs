//! The realisation documents a binary cache serves for content-addressed outputs:
//!
//! - Nix ≤ 2.34 (`realisations/<id>.doi`, `id` = `sha256:<hashModulo hex>!<output>`):
//!   `{"dependentRealisations":{"<id>":"<out base>",…},"id":"<id>","outPath":"<out base>",
//!   "signatures":["<key>:<sig>",…]}`, keys sorted, signed over the same JSON without
//!   `signatures`.
//! - Nix ≥ 2.35's build trace (`build-trace-v2/<drv base>/<output>.doi`): the entry's value
//!   `{"outPath":"<out base>","signatures":[{"keyName":…,"sig":…}]}`, signed over the whole entry
//!   without signatures: `{"key":{"drvPath":"<drv base>","outputName":…},"value":{"outPath":…}}`.
//!
//! Store paths appear as base names (without the store dir) in both.

use std::collections::BTreeMap;

use serde::Serialize;

use super::key::SecretKey;
use crate::store::realisation::LegacyDrvOutput;

fn base(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A Nix ≤ 2.34 realisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyRealisation {
    pub id: LegacyDrvOutput,
    /// Full output path.
    pub out_path: String,
    /// `id` → full output path of the realisations this one depends on.
    pub dependents: BTreeMap<String, String>,
}

// Field order is the JSON's key order: sorted, as Nix's JSON objects are.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LegacyUnsigned<'a> {
    dependent_realisations: BTreeMap<&'a str, &'a str>,
    id: String,
    out_path: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LegacySigned<'a> {
    dependent_realisations: BTreeMap<&'a str, &'a str>,
    id: String,
    out_path: &'a str,
    signatures: Vec<String>,
}

impl LegacyRealisation {
    fn unsigned(&self) -> LegacyUnsigned<'_> {
        LegacyUnsigned {
            dependent_realisations: self
                .dependents
                .iter()
                .map(|(k, v)| (k.as_str(), base(v)))
                .collect(),
            id: self.id.to_string(),
            out_path: base(&self.out_path),
        }
    }

    /// What Nix signs: the JSON without `signatures`.
    pub fn fingerprint(&self) -> String {
        // Serialising strings and maps of strings cannot fail.
        serde_json::to_string(&self.unsigned()).unwrap_or_default()
    }

    /// The `.doi` file's contents, signed with `key` if given.
    pub fn to_json(&self, key: Option<&SecretKey>) -> String {
        let u = self.unsigned();
        let signatures = key
            .map(|k| k.sign(&self.fingerprint()))
            .into_iter()
            .collect();
        serde_json::to_string(&LegacySigned {
            dependent_realisations: u.dependent_realisations,
            id: u.id,
            out_path: u.out_path,
            signatures,
        })
        .unwrap_or_default()
    }
}

/// A Nix ≥ 2.35 build trace entry: `<drv path>^<output>` → output path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildTraceEntry {
    /// Full drv path.
    pub drv_path: String,
    pub output: String,
    /// Full output path.
    pub out_path: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TraceKey<'a> {
    drv_path: &'a str,
    output_name: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TraceValueUnsigned<'a> {
    out_path: &'a str,
}

#[derive(Serialize)]
struct TraceUnsigned<'a> {
    key: TraceKey<'a>,
    value: TraceValueUnsigned<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TraceSig {
    key_name: String,
    sig: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TraceValue<'a> {
    out_path: &'a str,
    signatures: Vec<TraceSig>,
}

impl BuildTraceEntry {
    /// The path of its file in a cache: `build-trace-v2/<drv base>/<output>.doi`.
    pub fn file(&self) -> String {
        format!(
            "build-trace-v2/{}/{}.doi",
            base(&self.drv_path),
            self.output
        )
    }

    /// What Nix signs: the entry (key and value) without signatures.
    pub fn fingerprint(&self) -> String {
        serde_json::to_string(&TraceUnsigned {
            key: TraceKey {
                drv_path: base(&self.drv_path),
                output_name: &self.output,
            },
            value: TraceValueUnsigned {
                out_path: base(&self.out_path),
            },
        })
        .unwrap_or_default()
    }

    /// The file's contents (the entry's value), signed with `key` if given.
    pub fn to_json(&self, key: Option<&SecretKey>) -> String {
        let signatures = key
            .map(|k| TraceSig {
                key_name: k.name.clone(),
                sig: k.sign_raw(&self.fingerprint()),
            })
            .into_iter()
            .collect();
        serde_json::to_string(&TraceValue {
            out_path: base(&self.out_path),
            signatures,
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_json_is_sorted_and_signed_over_the_unsigned_json() {
        let id: LegacyDrvOutput =
            "sha256:4cd545f40bbfdbb72885c975264313932da749bec515729f3569e4a3eeb0368c!out"
                .parse()
                .unwrap();
        let r = LegacyRealisation {
            id,
            out_path: "/nix/store/i5ypy73hffqhy85x5yn0k88yjym4brb5-chain-c".into(),
            dependents: [(
                "sha256:28097c5122d801ed8cc4dffe710395d2721fad3205eb24379038562fcd3f571c!out"
                    .to_string(),
                "/nix/store/nscyc94rf5cvmf5i5xpbbgd4wscv2z9d-chain-a".to_string(),
            )]
            .into(),
        };
        let fp = r.fingerprint();
        assert_eq!(
            fp,
            "{\"dependentRealisations\":{\"sha256:28097c5122d801ed8cc4dffe710395d2721fad3205eb24379038562fcd3f571c!out\":\
             \"nscyc94rf5cvmf5i5xpbbgd4wscv2z9d-chain-a\"},\
             \"id\":\"sha256:4cd545f40bbfdbb72885c975264313932da749bec515729f3569e4a3eeb0368c!out\",\
             \"outPath\":\"i5ypy73hffqhy85x5yn0k88yjym4brb5-chain-c\"}"
        );
        let key = SecretKey::from_seed("k", [5; 32]);
        let doc: serde_json::Value = serde_json::from_str(&r.to_json(Some(&key))).unwrap();
        let sigs = doc["signatures"].as_array().unwrap();
        assert_eq!(sigs.len(), 1);
        assert!(key.public().verify(&fp, sigs[0].as_str().unwrap()));
        let unsigned = r.to_json(None);
        assert_eq!(
            unsigned,
            format!("{},\"signatures\":[]}}", &fp[..fp.len() - 1])
        );
    }

    /// The fingerprint of Nix's own test vector (libstore-tests data/realisation/simple).
    #[test]
    fn build_trace_fingerprint_matches_nix_s_vector() {
        let e = BuildTraceEntry {
            drv_path: "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv".into(),
            output: "foo".into(),
            out_path: "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo".into(),
        };
        assert_eq!(
            e.fingerprint(),
            "{\"key\":{\"drvPath\":\"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv\",\"outputName\":\"foo\"},\
             \"value\":{\"outPath\":\"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo\"}}"
        );
        assert_eq!(
            e.file(),
            "build-trace-v2/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv/foo.doi"
        );
        let key = SecretKey::from_seed("k", [6; 32]);
        let v: serde_json::Value = serde_json::from_str(&e.to_json(Some(&key))).unwrap();
        assert_eq!(v["outPath"], "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo");
        assert_eq!(v["signatures"][0]["keyName"], "k");
        let sig = format!("k:{}", v["signatures"][0]["sig"].as_str().unwrap());
        assert!(key.public().verify(&e.fingerprint(), &sig));
    }
}
