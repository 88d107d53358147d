//! A CA job whose input fails ends DepFailed; a failing CA job ends Failed (with its log tail); an
//! IA job depending on a CA job builds after resolution. On SQLite and on PostgreSQL.

mod common;

use std::path::{Path, PathBuf};

use common::qr::{Backend, Qr, all_steps};
use serde_json::Value;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

fn failing(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(example("ca-failing-input.json")).expect("read"),
    )
    .expect("json");
    // The failing drv alone, as a job of its own, and the dependent as another job.
    let input = doc
        .as_object()
        .expect("object")
        .iter()
        .find(|(k, _)| k.ends_with("-fail-input.drv"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .expect("fail-input");
    let only_input = qr.write_json("input.json", &Value::Object([input].into_iter().collect()));
    let (out, builds) = qr.run_json(&[&only_input, &example("ca-failing-input.json")], &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "qr run exits 1 when a build failed"
    );
    assert_eq!(builds.len(), 2);
    let by_job = |j: &str| {
        builds
            .iter()
            .find(|b| b["job"] == j)
            .unwrap_or_else(|| panic!("no build of {j}: {builds:?}"))
    };
    assert_eq!(
        by_job("fail-input")["status"],
        1,
        "the failing CA job ends Failed"
    );
    assert_eq!(
        by_job("fail-dependent")["status"],
        2,
        "its dependent ends DepFailed"
    );
    let steps = all_steps(&builds);
    let failed = steps
        .iter()
        .find(|(_, s)| {
            s["status"] == 1
                && s["drvPath"]
                    .as_str()
                    .unwrap_or_default()
                    .ends_with("-fail-input.drv")
        })
        .expect("a Failed step row for fail-input");
    let msg = failed.1["errorMsg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("fail-input fails on purpose"),
        "the log tail is in the error: {msg}"
    );
    // The dependent's build records where the failure was (propagated) and never built it.
    assert!(
        qr.runs().is_empty(),
        "nothing succeeded, so nothing is in the ledger: {:?}",
        qr.runs()
    );
}

fn ia_on_ca(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let (out, builds) = qr.run_json(&[&example("ia-on-ca.json")], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0]["status"], 0);
    let steps = all_steps(&builds);
    let resolved: Vec<&str> = steps
        .iter()
        .filter(|(_, s)| s["status"] == 13)
        .map(|(_, s)| s["drvPath"].as_str().unwrap_or_default())
        .collect();
    assert!(
        resolved.iter().any(|d| d.ends_with("-mx-ia-on-ca.drv")),
        "the deferred IA drv is resolved: {resolved:?}"
    );
    assert!(
        resolved
            .iter()
            .any(|d| d.ends_with("-mx-ia-on-ia-on-ca.drv")),
        "and the one deferred through it: {resolved:?}"
    );
    let out_path = builds[0]["outputs"]["out"]
        .as_str()
        .expect("an output path");
    assert!(out_path.ends_with("-mx-ia-on-ia-on-ca"), "{out_path}");
}

#[test]
fn ca_failures_on_sqlite() {
    failing(Backend::Sqlite);
}

#[test]
fn ca_failures_on_postgres() {
    failing(Backend::Postgres);
}

#[test]
fn ia_on_ca_builds_after_resolution_on_sqlite() {
    ia_on_ca(Backend::Sqlite);
}

#[test]
fn ia_on_ca_builds_after_resolution_on_postgres() {
    ia_on_ca(Backend::Postgres);
}
