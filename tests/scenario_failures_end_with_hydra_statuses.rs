//! Failures end with Hydra's statuses through `qr run`: a step for a system no machine has ends
//! Unsupported after the configured wait; a build exceeding its time limit ends TimedOut; an output
//! holding `nix-support/failed` ends FailedWithOutput (also when queued again with the output valid); a drv that failed before is a CachedFailure
//! the next time, without running. On SQLite and on PostgreSQL.

mod common;

use common::instantiate::{Gen, Kind};
use common::qr::{Backend, Qr, all_steps};
use serde_json::Value;

fn one(qr: &Qr, g: &Gen, envs: &[(&str, &str)]) -> Value {
    let file = qr.write_json("g.json", &g.doc());
    let (out, builds) = qr.run_json(&[&file], envs);
    assert_eq!(builds.len(), 1, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(if builds[0]["status"] == 0 { 0 } else { 1 })
    );
    builds.into_iter().next().expect("a build")
}

/// The graph queued again through `qr run --json` in another jobset (so new builds): the builds,
/// one JSON object per stdout line.
fn queue_again(qr: &Qr, g: &Gen, name: &str) -> Vec<Value> {
    let file = qr.write_json(name, &g.doc());
    let out = qr.run(
        &[
            "run",
            "--json",
            "--jobset",
            "again",
            &file.display().to_string(),
        ],
        &[],
    );
    let builds: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON build line"))
        .collect();
    assert!(
        !builds.is_empty(),
        "no build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    builds
}

fn unsupported(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let mut g = Gen::in_store_dir(
        qr::store::StoreDir::new(qr.state_dir().join("store").display().to_string()).expect("dir"),
    );
    g.system = "riscv64-linux".into();
    g.add(Kind::Ca, "st-riscv", "echo hi > $out", &[], &[]);
    let b = one(&qr, &g, &[("QR_SCHEDULER_UNSUPPORTED_WAIT_S", "1")]);
    assert_eq!(b["status"], 9, "Unsupported: {b}");
    let steps = all_steps(&[b]);
    assert!(
        steps.iter().any(|(_, s)| s["status"] == 9),
        "an Unsupported step row: {steps:?}"
    );
    assert!(qr.runs().is_empty());
}

fn timed_out(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let mut g = Gen::new();
    g.add(
        Kind::Ca,
        "st-slow",
        "echo started; sleep 30; echo late > $out",
        &[],
        &[],
    );
    let b = one(&qr, &g, &[("QR_SCHEDULER_BUILD_TIMEOUT_S", "1")]);
    assert_eq!(b["status"], 7, "TimedOut: {b}");
    let steps = all_steps(&[b]);
    let msg = steps
        .iter()
        .find(|(_, s)| s["status"] == 7)
        .map(|(_, s)| s["errorMsg"].to_string())
        .expect("a TimedOut step");
    assert!(msg.contains("started"), "the log tail is kept: {msg}");
}

fn failed_with_output(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let mut g = Gen::new();
    g.add(
        Kind::Ca,
        "st-failed-output",
        "mkdir -p $out/nix-support; echo report > $out/log; touch $out/nix-support/failed",
        &[],
        &[],
    );
    let b = one(&qr, &g, &[]);
    assert_eq!(b["status"], 6, "FailedWithOutput: {b}");
    assert!(
        b["outputs"]["out"]
            .as_str()
            .is_some_and(|p| p.ends_with("-st-failed-output")),
        "{b}"
    );
    // Queued again (another jobset, so a new build) with its output valid: the status it would
    // have had if built now, not Success.
    let again = queue_again(&qr, &g, "g.json").swap_remove(0);
    assert_eq!(again["status"], 6, "FailedWithOutput, cached: {again}");
    assert_eq!(again["outputs"], b["outputs"], "{again}");
}

fn cached_failure(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let mut g = Gen::new();
    let bad = g.add(Kind::Ca, "st-bad", "echo broken; exit 1", &[], &[]);
    let first = one(&qr, &g, &[]);
    assert_eq!(first["status"], 1);
    // The same drv queued again (another jobset, so a new build): not run again.
    let second = queue_again(&qr, &g, "g.json").swap_remove(0);
    assert_eq!(second["status"], 8, "CachedFailure: {second}");
    let steps = all_steps(&[second]);
    assert!(
        steps.iter().any(|(_, s)| s["status"] == 8
            && s["drvPath"]
                .as_str()
                .is_some_and(|d| d.ends_with(bad.rsplit('-').next().unwrap_or("")))),
        "a CachedFailure step row: {steps:?}"
    );
}

/// A drv whose input failed before waits on nothing to build: it ends DepFailed at once, its input
/// a CachedFailure, and it is not run (it used to ignore the failure and try to build without the
/// input; the simulation's seed 347892352648 found it).
fn input_cached_failure(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let mut g = Gen::new();
    let bad = g.add(Kind::Ca, "in-bad", "echo broken; exit 1", &[], &[]);
    let first = one(&qr, &g, &[]);
    assert_eq!(first["status"], 1);
    g.add(
        Kind::Ia,
        "needs-bad",
        "echo built > $out",
        &[],
        &[bad.as_str()],
    );
    let builds = queue_again(&qr, &g, "g2.json");
    let b = builds
        .iter()
        .find(|b| b["job"] == "needs-bad")
        .unwrap_or_else(|| panic!("no build of needs-bad: {builds:?}"));
    assert_eq!(b["status"], 2, "DepFailed: {b}");
    let steps = all_steps(std::slice::from_ref(b));
    assert!(
        steps.iter().all(|(_, s)| !s["drvPath"]
            .as_str()
            .unwrap_or("")
            .ends_with("-needs-bad.drv")
            || s["machine"].as_str().unwrap_or("").is_empty()),
        "needs-bad was not run: {steps:?}"
    );
}

#[test]
fn input_cached_failure_on_sqlite() {
    input_cached_failure(Backend::Sqlite);
}

#[test]
fn input_cached_failure_on_postgres() {
    input_cached_failure(Backend::Postgres);
}

#[test]
fn unsupported_on_sqlite() {
    unsupported(Backend::Sqlite);
}
#[test]
fn unsupported_on_postgres() {
    unsupported(Backend::Postgres);
}
#[test]
fn timed_out_on_sqlite() {
    timed_out(Backend::Sqlite);
}
#[test]
fn timed_out_on_postgres() {
    timed_out(Backend::Postgres);
}
#[test]
fn failed_with_output_on_sqlite() {
    failed_with_output(Backend::Sqlite);
}
#[test]
fn failed_with_output_on_postgres() {
    failed_with_output(Backend::Postgres);
}
#[test]
fn cached_failure_on_sqlite() {
    cached_failure(Backend::Sqlite);
}
#[test]
fn cached_failure_on_postgres() {
    cached_failure(Backend::Postgres);
}
