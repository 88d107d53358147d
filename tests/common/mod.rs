//! Shared helpers for tests that read the Nix oracle fixtures.
#![allow(dead_code)]

pub mod binary_cache;
pub mod cluster;
pub mod fuzz;
pub mod inproc;
pub mod instantiate;
pub mod nix;
pub mod nix_vs_native;
pub mod ports;
pub mod procs;
pub mod qr;
pub mod sources;

use std::path::PathBuf;

use serde_json::Value;

/// The fixture directory: `$QR_FIXTURES`, else `$CARGO_MANIFEST_DIR/../shared/fixtures/nix-oracle`.
/// Panics (fails the test) if it is missing or holds no fixture.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("QR_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/nix-oracle"),
    };
    assert!(
        dir.is_dir(),
        "fixture directory {} is missing (set QR_FIXTURES)",
        dir.display()
    );
    dir
}

/// Every `*.json` fixture, sorted by file name: (file stem, parsed JSON). At least one.
pub fn load_fixtures() -> Vec<(String, Value)> {
    let dir = fixtures_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read fixture dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.json fixtures in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read fixture");
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", p.display()));
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            (stem, v)
        })
        .collect()
}

/// A fixture's `derivations` object as (drv path, entry) pairs.
pub fn derivations(fixture: &Value) -> Vec<(&str, &Value)> {
    fixture["derivations"]
        .as_object()
        .expect("fixture has a `derivations` object")
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect()
}

/// `str` accessor that fails the test with the JSON pointer on a type mismatch.
pub fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("fixture: {pointer} is not a string"))
}
