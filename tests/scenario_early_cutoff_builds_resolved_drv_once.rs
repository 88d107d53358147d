//! Two CA upstreams with identical outputs feed two CA downstreams: both downstreams resolve to one
//! drv, which is built exactly once (counted in the executor's ledger) while the other resolution is
//! recorded as cached — in one build, across two builds queued together, and across two builds
//! queued one after the other. On SQLite and on PostgreSQL.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::qr::{Backend, Qr, all_steps};
use serde_json::Value;

fn converge() -> serde_json::Map<String, Value> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/converge.json");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(p).expect("examples/converge.json"))
            .expect("json");
    v.as_object().expect("object").clone()
}

/// The sub-document holding `down` and its input drvs.
fn half(doc: &serde_json::Map<String, Value>, down: &str) -> Value {
    let mut out = serde_json::Map::new();
    out.insert(down.to_string(), doc[down].clone());
    for input in doc[down]["inputDrvs"]
        .as_object()
        .expect("inputDrvs")
        .keys()
    {
        out.insert(input.clone(), doc[input].clone());
    }
    Value::Object(out)
}

fn downs(doc: &serde_json::Map<String, Value>) -> Vec<String> {
    doc.keys()
        .filter(|k| k.ends_with("-converge-down.drv"))
        .cloned()
        .collect()
}

/// Checks the steps: both downstreams Resolved to the same drv; that drv built once in all.
fn check(qr: &Qr, builds: &[Value], what: &str) {
    for b in builds {
        assert_eq!(b["status"], 0, "{what}: {b}");
    }
    let steps = all_steps(builds);
    let rows: BTreeMap<(i64, i64), &Value> = steps
        .iter()
        .map(|(b, s)| ((*b, s["stepnr"].as_i64().unwrap_or(0)), s))
        .collect();
    let mut targets = Vec::new();
    for (b, s) in &steps {
        let drv = s["drvPath"].as_str().unwrap_or_default();
        if drv.ends_with("-converge-down.drv") && s["status"] == 13 {
            let t = rows[&(*b, s["resolvedToStep"].as_i64().expect("resolvedToStep"))];
            targets.push(t);
        }
    }
    assert_eq!(
        targets.len(),
        2,
        "{what}: both downstreams are Resolved rows: {steps:?}"
    );
    let resolved = targets[0]["drvPath"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        targets[1]["drvPath"], targets[0]["drvPath"],
        "{what}: both resolve to one drv"
    );
    let built: Vec<bool> = targets
        .iter()
        .map(|t| t["built"].as_bool().unwrap_or(false))
        .collect();
    assert!(
        targets.iter().all(|t| t["status"] == 0),
        "{what}: {targets:?}"
    );
    assert_eq!(
        built.iter().filter(|b| **b).count(),
        1,
        "{what}: exactly one built, the other cached: {targets:?}"
    );
    let runs = qr.runs();
    assert_eq!(
        runs.iter().filter(|r| **r == resolved).count(),
        1,
        "{what}: executor runs {runs:?}"
    );
    let mut seen = std::collections::BTreeSet::new();
    for r in &runs {
        assert!(seen.insert(r), "{what}: {r} built twice");
    }
}

fn in_one_build(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/converge.json");
    let (out, builds) = qr.run_json(&[&file], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(builds.len(), 1);
    check(&qr, &builds, "one build");
}

fn two_builds_together(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let doc = converge();
    let d = downs(&doc);
    let a = qr.write_json("a.json", &half(&doc, &d[0]));
    let b = qr.write_json("b.json", &half(&doc, &d[1]));
    let (out, builds) = qr.run_json(&[&a, &b], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(builds.len(), 2);
    check(&qr, &builds, "two builds queued together");
}

fn two_builds_one_after_the_other(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let doc = converge();
    let d = downs(&doc);
    let a = qr.write_json("a.json", &half(&doc, &d[0]));
    let b = qr.write_json("b.json", &half(&doc, &d[1]));
    let (out, first) = qr.run_json(&[&a], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, second) = qr.run_json(&[&b], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Vec<Value> = first.into_iter().chain(second).collect();
    check(&qr, &all, "two builds one after the other");
}

#[test]
fn early_cutoff_in_one_build_on_sqlite() {
    in_one_build(Backend::Sqlite);
}

#[test]
fn early_cutoff_in_one_build_on_postgres() {
    in_one_build(Backend::Postgres);
}

#[test]
fn early_cutoff_across_two_builds_queued_together_on_sqlite() {
    two_builds_together(Backend::Sqlite);
}

#[test]
fn early_cutoff_across_two_builds_queued_together_on_postgres() {
    two_builds_together(Backend::Postgres);
}

#[test]
fn early_cutoff_across_builds_queued_one_after_the_other_on_sqlite() {
    two_builds_one_after_the_other(Backend::Sqlite);
}

#[test]
fn early_cutoff_across_builds_queued_one_after_the_other_on_postgres() {
    two_builds_one_after_the_other(Backend::Postgres);
}
