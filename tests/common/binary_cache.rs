//! Helpers for the binary cache tests: the fixture graphs (and one whose builds print to their
//! logs) as Nix expressions, instantiated by real Nix and imported into a runner, and the check
//! that a fresh Nix store substitutes every output from a cache.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::nix::NixStore;
use super::qr::Qr;

/// A graph of our own whose builds print to their logs: an IA drv, and a CA drv on it (resolved).
pub const LOGS_NIX: &str = r#"with import ./lib.nix;
rec {
  ia_log = ia "cache-log-ia" "echo qr-cache-log-ia-line; echo ia > $out" {};
  ca_log = ca "cache-log-ca" "echo qr-cache-log-ca-line; echo ${ia_log} > $out" {};
}
"#;

/// The expressions: every fixture's `nix_expr` and [`LOGS_NIX`], beside the fixtures' lib.nix.
pub fn write_exprs(dir: &Path, fixtures: &[(String, Value)]) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nix/lib.nix");
    std::fs::copy(lib, dir.join("lib.nix")).unwrap();
    let mut files = Vec::new();
    for (name, fx) in fixtures {
        let f = dir.join(format!("{name}.nix"));
        std::fs::write(&f, super::s(fx, "/nix_expr")).unwrap();
        files.push(f);
    }
    let f = dir.join("logs.nix");
    std::fs::write(&f, LOGS_NIX).unwrap();
    files.push(f);
    files
}

/// Every fixture drv's outputs as Nix realised them: drv path → output paths.
pub fn fixture_outputs(fixtures: &[(String, Value)]) -> BTreeMap<String, BTreeSet<String>> {
    let mut m = BTreeMap::new();
    for (_, fx) in fixtures {
        for (drv, v) in super::derivations(fx) {
            let outs = v["realisations"]
                .as_object()
                .expect("realisations")
                .values()
                .map(|r| super::s(r, "/out_path").to_string())
                .collect();
            m.insert(drv.to_string(), outs);
        }
    }
    m
}

pub fn text(o: &std::process::Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Realises `drvs` from `substituter` in `nix` with nothing built locally; the printed paths.
pub fn realise(
    nix: &NixStore,
    drvs: &[String],
    substituter: &str,
    pk: &str,
) -> std::process::Output {
    let mut args = vec![
        "--realise",
        "--max-jobs",
        "0",
        "--option",
        "substituters",
        substituter,
        "--option",
        "trusted-public-keys",
        pk,
    ];
    args.extend(drvs.iter().map(String::as_str));
    nix.run("nix-store", &args)
}

/// A fresh Nix store with only the instantiated drvs substitutes every output from `substituter`.
pub fn check_substitution(
    label: &str,
    exprs: &[PathBuf],
    substituter: &str,
    pk: &str,
    want: &BTreeMap<String, BTreeSet<String>>,
) -> NixStore {
    let nix = NixStore::new();
    let mut drvs = Vec::new();
    for f in exprs {
        drvs.extend(nix.instantiate(f));
    }
    // Only the drvs (and the one `builtins.toFile` source) are in the store.
    let out = realise(&nix, &drvs, substituter, pk);
    assert!(
        out.status.success(),
        "{label}: nix-store --realise\n{}",
        text(&out)
    );
    let got: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let mut expected = BTreeSet::new();
    for d in &drvs {
        if let Some(outs) = want.get(d) {
            expected.extend(outs.iter().cloned());
        }
    }
    let all: BTreeSet<String> = want.values().flatten().cloned().collect();
    assert_eq!(expected, all, "{label}: every fixture drv was instantiated");
    let missing: Vec<&String> = expected.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "{label}: not realised to Nix's paths: {missing:?}\n{}",
        text(&out)
    );
    for p in &expected {
        assert!(
            nix.is_valid(p),
            "{label}: {p} is not valid in the Nix store"
        );
    }
    nix
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

/// Instantiates `exprs` in a scratch Nix store and imports the drvs (with their sources) into
/// `qr`'s store with `qr import`; returns the drv paths.
pub fn import_instantiated(qr: &Qr, exprs: &[PathBuf]) -> Vec<String> {
    let scratch = NixStore::new();
    let mut drvs = Vec::new();
    for f in exprs {
        drvs.extend(scratch.instantiate(f));
    }
    let mut args = vec![
        "import".to_string(),
        "--from".into(),
        scratch.physical_store().display().to_string(),
    ];
    args.extend(drvs.iter().cloned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = qr.run(&argv, &[]);
    assert!(out.status.success(), "qr import: {}", text(&out));
    drvs
}
