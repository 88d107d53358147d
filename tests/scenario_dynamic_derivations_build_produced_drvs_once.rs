//! Dynamic derivations: a floating text-hashed output is a `.drv` (its producer's builder wrote
//! the ATerm), and a dependent uses an output of that produced derivation
//! (`builtins.outputOf`). When the producer lands, the dependent's step gets the produced drv's
//! step (and its closure's) through the one registry, waits on it, then resolves (the
//! placeholder of `P^out^out` becomes the real path). Covered: depth 1 and 2, two producers
//! writing the same drv (built once), a produced drv that fails, a produced drv already built,
//! and a runner killed (SIGKILL) right after a producer landed. On SQLite and on PostgreSQL.
//! Each produced drv's row links to its producer's row (`producedsteps`, reported as the
//! step's `producedBy`).

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use common::instantiate::{DynInput, Gen, Kind, hide_out_placeholder, writes_drv};
use common::qr::{Backend, Qr, all_steps};
use serde_json::Value;

/// A producer (named `<leaf>.drv`) whose output is the `.drv` of `leaf` (`script`), made with
/// `variant` (producers differing only in it write the same drv); returns its drv path.
fn producer(g: &mut Gen, leaf: &str, script: &str, variant: &str) -> String {
    let (_, aterm) = g.make(Kind::Ca, leaf, script, &[]);
    g.add(
        Kind::Text,
        &format!("{leaf}.drv"),
        &writes_drv("@OUT@"),
        &[
            ("drv", &hide_out_placeholder(&aterm, "@OUT@")),
            ("variant", variant),
        ],
        &[],
    )
}

/// A dependent reading `out` of the drv in `producer`'s `out`.
fn dependent(g: &mut Gen, name: &str, producers: &[&str]) -> String {
    let ins: Vec<DynInput> = producers
        .iter()
        .map(|p| DynInput {
            producer: p,
            chain: &["out"],
            output: "out",
        })
        .collect();
    let cat: Vec<String> = ins.iter().map(|d| g.dyn_out(d)).collect();
    g.add_dyn(
        Kind::Ca,
        name,
        &format!("cat {} > $out", cat.join(" ")),
        &[],
        &[],
        &ins,
    )
}

fn run(qr: &Qr, file: &Path) -> Vec<Value> {
    let (out, builds) = qr.run_json(&[file], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    builds
}

/// The contents of a build's `out`.
fn out_of(qr: &Qr, build: &Value) -> String {
    let p = build["outputs"]["out"].as_str().expect("an out path");
    let base = p.rsplit('/').next().unwrap_or_default();
    std::fs::read_to_string(qr.state_dir().join("store").join(base))
        .or_else(|_| std::fs::read_to_string(p))
        .unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// The name of a drv path (the part after the hash).
fn name_of(drv: &str) -> &str {
    drv.rsplit('/')
        .next()
        .map_or("", |b| b.get(33..).unwrap_or(""))
}

/// For each row of the drv named `name` in `builds`: the producer rows it links to, as
/// `<producer's name>^<output>` (sorted), looked up among the rows of `builds`.
fn producers_of(builds: &[Value], name: &str) -> Vec<Vec<String>> {
    let steps = all_steps(builds);
    let row = |b: i64, n: i64| {
        steps
            .iter()
            .find(|(id, s)| *id == b && s["stepnr"] == n)
            .map(|(_, s)| name_of(s["drvPath"].as_str().unwrap_or_default()).to_string())
            .unwrap_or_else(|| format!("<no row {b}/{n}>"))
    };
    steps
        .iter()
        .filter(|(_, s)| s["drvPath"].as_str().is_some_and(|d| name_of(d) == name))
        .map(|(_, s)| {
            let mut by: Vec<String> = s["producedBy"]
                .as_array()
                .unwrap_or_else(|| panic!("a row without producedBy: {s}"))
                .iter()
                .map(|l| {
                    let (b, n) = (l["build"].as_i64(), l["stepnr"].as_i64());
                    let (Some(b), Some(n)) = (b, n) else {
                        panic!("a link without a row: {l}");
                    };
                    format!("{}^{}", row(b, n), l["output"].as_str().unwrap_or_default())
                })
                .collect();
            by.sort();
            by
        })
        .collect()
}

/// Every drv the executor ran, by name (the part after the hash), with its count; none twice.
fn runs_by_name(qr: &Qr) -> Vec<String> {
    let runs = qr.runs();
    let uniq: BTreeSet<&String> = runs.iter().collect();
    assert_eq!(uniq.len(), runs.len(), "a drv was built twice: {runs:?}");
    let mut names: Vec<String> = runs
        .iter()
        .map(|r| r.rsplit('/').next().unwrap_or_default()[33..].to_string())
        .collect();
    names.sort();
    names
}

fn depth_one(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let mut g = Gen::new();
    let p = producer(&mut g, "d1-leaf", "echo d1 > $out", "a");
    dependent(&mut g, "d1-top", &[&p]);
    let file = qr.write_json("d1.json", &g.doc());
    let builds = run(&qr, &file);
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0]["status"], 0, "{:?}", builds[0]);
    assert_eq!(out_of(&qr, &builds[0]), "d1\n");
    assert_eq!(
        runs_by_name(&qr),
        ["d1-leaf.drv", "d1-leaf.drv.drv", "d1-top.drv"],
        "producer, produced drv and the resolved top, once each"
    );
    // The top's row is Resolved, as any CA step with inputs.
    let steps = all_steps(&builds);
    assert!(
        steps.iter().any(|(_, s)| s["status"] == 13
            && s["drvPath"]
                .as_str()
                .is_some_and(|d| d.ends_with("-d1-top.drv"))),
        "{steps:?}"
    );
    // The produced drv's row links to the producer's row; nothing else is linked.
    assert_eq!(
        producers_of(&builds, "d1-leaf.drv"),
        [["d1-leaf.drv.drv^out"]]
    );
    assert!(
        producers_of(&builds, "d1-top.drv")
            .iter()
            .all(Vec::is_empty)
    );
    // Queued again: everything is built, nothing runs.
    let again = run(&qr, &file);
    assert_eq!(again[0]["status"], 0);
    assert_eq!(qr.runs().len(), 3, "{:?}", qr.runs());
    // Another dependent of the same producer: the produced drv is built already, so its step
    // finishes at once and only the new dependent runs.
    dependent(&mut g, "d1-other", &[&p]);
    let file = qr.write_json("d1-other.json", &g.doc());
    let builds = run(&qr, &file);
    let other = builds
        .iter()
        .find(|b| {
            b["drvPath"]
                .as_str()
                .is_some_and(|d| d.ends_with("-d1-other.drv"))
        })
        .expect("a build of d1-other");
    assert_eq!(other["status"], 0, "{other:?}");
    assert_eq!(out_of(&qr, other), "d1\n");
    assert_eq!(
        runs_by_name(&qr),
        [
            "d1-leaf.drv",
            "d1-leaf.drv.drv",
            "d1-other.drv",
            "d1-top.drv"
        ]
    );
}

fn depth_two(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/dynamic.json");
    let builds = run(&qr, &file);
    assert_eq!(builds.len(), 1, "one root: dyn-top");
    assert_eq!(builds[0]["status"], 0, "{:?}", builds[0]);
    assert_eq!(out_of(&qr, &builds[0]), "leaf\n");
    assert_eq!(
        runs_by_name(&qr),
        [
            "dyn-leaf.drv",
            "dyn-leaf.drv.drv",
            "dyn-leaf.drv.drv.drv",
            "dyn-top.drv"
        ]
    );
    // Each level's row links to the level above it.
    assert_eq!(
        producers_of(&builds, "dyn-leaf.drv.drv"),
        [["dyn-leaf.drv.drv.drv^out"]]
    );
    assert_eq!(
        producers_of(&builds, "dyn-leaf.drv"),
        [["dyn-leaf.drv.drv^out"]]
    );
}

fn two_producers_same_drv(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let mut g = Gen::new();
    let pa = producer(&mut g, "tw-leaf", "echo twin > $out", "a");
    let pb = producer(&mut g, "tw-leaf", "echo twin > $out", "b");
    assert_ne!(pa, pb);
    // One dependent of both, and one build per producer's own dependent.
    dependent(&mut g, "tw-both", &[&pa, &pb]);
    dependent(&mut g, "tw-a", &[&pa]);
    dependent(&mut g, "tw-b", &[&pb]);
    let file = qr.write_json("tw.json", &g.doc());
    let builds = run(&qr, &file);
    assert_eq!(builds.len(), 3);
    for b in &builds {
        assert_eq!(b["status"], 0, "{b:?}");
    }
    let runs = runs_by_name(&qr);
    assert_eq!(
        runs.iter().filter(|r| *r == "tw-leaf.drv").count(),
        1,
        "the produced drv is built once: {runs:?}"
    );
    assert_eq!(
        runs.iter().filter(|r| *r == "tw-leaf.drv.drv").count(),
        2,
        "each producer once: {runs:?}"
    );
    // One row of the produced drv, linked to the producers that had landed when it was made
    // (the second may land after it started).
    let rows = producers_of(&builds, "tw-leaf.drv");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        (1..=2).contains(&rows[0].len()) && rows[0].iter().all(|p| p == "tw-leaf.drv.drv^out"),
        "{rows:?}"
    );
}

fn produced_drv_fails(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let mut g = Gen::new();
    let p = producer(
        &mut g,
        "pf-leaf",
        "echo pf-leaf fails on purpose; exit 1",
        "a",
    );
    dependent(&mut g, "pf-top", &[&p]);
    let file = qr.write_json("pf.json", &g.doc());
    let (out, builds) = qr.run_json(&[&file], &[]);
    assert!(!out.status.success(), "a failed build fails the run");
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0]["status"], 2, "DepFailed: {:?}", builds[0]);
    let steps = all_steps(&builds);
    assert!(
        steps.iter().any(|(_, s)| s["status"] == 1
            && s["drvPath"]
                .as_str()
                .is_some_and(|d| d.ends_with("-pf-leaf.drv"))),
        "the produced drv's own row failed: {steps:?}"
    );
    assert_eq!(
        producers_of(&builds, "pf-leaf.drv"),
        [["pf-leaf.drv.drv^out"]]
    );
    assert_eq!(runs_by_name(&qr), ["pf-leaf.drv.drv"]);
}

fn killed_after_the_producer_landed(backend: Backend) {
    let Some(qr) = Qr::new(backend, false) else {
        return;
    };
    let mut g = Gen::new();
    let p = producer(&mut g, "k9-leaf", "echo k9 > $out", "a");
    dependent(&mut g, "k9-top", &[&p]);
    let file = qr.write_json("k9.json", &g.doc());
    let (out, _) = qr.run_json(&[&file], &[("QR_CRASH_AT", "attach-produced")]);
    assert_eq!(
        out.status.signal(),
        Some(9),
        "killed once the producer landed\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        runs_by_name(&qr),
        ["k9-leaf.drv.drv"],
        "only the producer ran"
    );
    let builds = run(&qr, &file);
    assert_eq!(builds.len(), 1, "the restart resumed the build");
    assert_eq!(builds[0]["status"], 0, "{:?}", builds[0]);
    assert_eq!(out_of(&qr, &builds[0]), "k9\n");
    assert_eq!(
        runs_by_name(&qr),
        ["k9-leaf.drv", "k9-leaf.drv.drv", "k9-top.drv"],
        "nothing built twice across the restart"
    );
    for (_, s) in all_steps(&builds) {
        assert!(s["status"] != Value::Null, "a row left unfinished: {s}");
    }
    // The produced drv's row, made after the restart, links to the producer's row of before.
    assert_eq!(
        producers_of(&builds, "k9-leaf.drv"),
        [["k9-leaf.drv.drv^out"]]
    );
}

#[test]
fn depth_one_on_sqlite() {
    depth_one(Backend::Sqlite);
}

#[test]
fn depth_one_on_postgres() {
    depth_one(Backend::Postgres);
}

#[test]
fn depth_two_example_on_sqlite() {
    depth_two(Backend::Sqlite);
}

#[test]
fn depth_two_example_on_postgres() {
    depth_two(Backend::Postgres);
}

#[test]
fn two_producers_of_one_drv_build_it_once_on_sqlite() {
    two_producers_same_drv(Backend::Sqlite);
}

#[test]
fn two_producers_of_one_drv_build_it_once_on_postgres() {
    two_producers_same_drv(Backend::Postgres);
}

#[test]
fn a_produced_drv_that_fails_fails_its_dependent_on_sqlite() {
    produced_drv_fails(Backend::Sqlite);
}

#[test]
fn a_produced_drv_that_fails_fails_its_dependent_on_postgres() {
    produced_drv_fails(Backend::Postgres);
}

#[test]
fn kill_9_after_the_producer_landed_on_sqlite() {
    killed_after_the_producer_landed(Backend::Sqlite);
}

#[test]
fn kill_9_after_the_producer_landed_on_postgres() {
    killed_after_the_producer_landed(Backend::Postgres);
}
