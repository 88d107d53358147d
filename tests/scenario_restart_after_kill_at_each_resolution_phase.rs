//! The runner is killed (SIGKILL, the process itself) at each phase of a resolution — before the
//! resolve transaction, after it, and while the resolved step builds — and started again with the
//! same command: every build finishes with the outputs of an uninterrupted run, no drv is built
//! twice, and no step row is duplicated. On SQLite and on PostgreSQL.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;

use common::instantiate::{Gen, Kind};
use common::qr::{Backend, Qr, all_steps};
use serde_json::Value;

/// a → b → c, all floating CA; b's builder takes over three seconds (so a kill lands while it builds),
/// sleeping `nap` seconds (a value only this test uses, to find its process).
fn graph(nap: &str) -> Value {
    let mut g = Gen::new();
    let a = g.add(Kind::Ca, "rs-a", "echo a > $out", &[], &[]);
    let oa = g.out(&a);
    let b = g.add(
        Kind::Ca,
        "rs-b",
        &format!("sleep {nap}; cat {oa} > $out; echo b >> $out"),
        &[],
        &[&a],
    );
    let ob = g.out(&b);
    g.add(
        Kind::Ca,
        "rs-c",
        &format!("cat {ob} > $out; echo c >> $out"),
        &[],
        &[&b],
    );
    g.doc()
}

fn outputs(builds: &[Value]) -> BTreeMap<String, Value> {
    builds
        .iter()
        .map(|b| {
            (
                b["drvPath"].as_str().unwrap_or_default().to_string(),
                b["outputs"].clone(),
            )
        })
        .collect()
}

fn check_rows(builds: &[Value], what: &str) {
    let steps = all_steps(builds);
    // At most one Resolved row per drv, and at most one successful row per (build, drv).
    let mut resolved = BTreeSet::new();
    let mut succeeded = BTreeSet::new();
    for (b, s) in &steps {
        let drv = s["drvPath"].as_str().unwrap_or_default().to_string();
        if s["status"] == 13 {
            assert!(
                resolved.insert(drv.clone()),
                "{what}: two Resolved rows for {drv}: {steps:?}"
            );
        }
        if s["status"] == 0 {
            assert!(
                succeeded.insert((*b, drv.clone())),
                "{what}: two successful rows for {drv}: {steps:?}"
            );
        }
        assert!(
            s["status"] != Value::Null,
            "{what}: a row left unfinished: {s}"
        );
    }
    assert_eq!(
        resolved.len(),
        2,
        "{what}: rs-b and rs-c are Resolved once each: {steps:?}"
    );
}

fn kill_at_each_phase(backend: Backend) {
    let nap = if backend == Backend::Sqlite {
        "3.11"
    } else {
        "3.12"
    };
    let doc = graph(nap);
    // Logical store dir /nix/store for every runner, so output paths compare across runners.
    let Some(clean) = Qr::new(backend, true) else {
        return;
    };
    let file = clean.write_json("g.json", &doc);
    let (out, reference) = clean.run_json(&[&file], &[]);
    assert!(
        out.status.success(),
        "uninterrupted run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_rows(&reference, "uninterrupted");
    let want = outputs(&reference);

    for point in ["before-resolve-tx", "after-resolve-tx", "building-resolved"] {
        let Some(qr) = Qr::new(backend, true) else {
            return;
        };
        let file = qr.write_json("g.json", &doc);
        let (out, _) = qr.run_json(&[&file], &[("QR_CRASH_AT", point)]);
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{point}: the runner was killed there\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if point == "building-resolved" {
            // The builder's main process died with the runner (parent-death signal), so the
            // interrupted build cannot go on to write its output (a `sleep` it had forked may
            // linger until it ends; it writes nothing). The death signal is delivered as the
            // runner dies, but the builder may take a moment to exit on a loaded machine: it
            // must be gone within 1.5 s, well before its own 3 s `sleep` would have ended (a
            // surviving builder is still there when we look).
            // Fails the test if it cannot look (never "gone" for want of a tool).
            let running = || common::procs::running(&format!("sleep {nap}; cat"));
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
            while running() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            assert!(!running(), "the killed runner's builder is still running");
        }
        let (out, builds) = qr.run_json(&[&file], &[]);
        assert!(
            out.status.success(),
            "{point}: restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            builds.len(),
            1,
            "{point}: the restart resumed the build instead of queueing another"
        );
        assert_eq!(builds[0]["status"], 0, "{point}: {:?}", builds[0]);
        assert_eq!(
            outputs(&builds),
            want,
            "{point}: the outputs of an uninterrupted run"
        );
        let runs = qr.runs();
        let uniq: BTreeSet<&String> = runs.iter().collect();
        assert_eq!(
            uniq.len(),
            runs.len(),
            "{point}: a drv was built twice: {runs:?}"
        );
        assert_eq!(
            runs.len(),
            3,
            "{point}: a, resolved b and resolved c each built once: {runs:?}"
        );
        check_rows(&builds, point);
    }
}

#[test]
fn restart_after_kill_at_each_resolution_phase_on_sqlite() {
    kill_at_each_phase(Backend::Sqlite);
}

#[test]
fn restart_after_kill_at_each_resolution_phase_on_postgres() {
    kill_at_each_phase(Backend::Postgres);
}
