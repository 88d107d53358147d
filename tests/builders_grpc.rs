//! End to end over real gRPC on loopback: `qr serve` (no local builder) and `qr builder` processes,
//! each with its own store. The fixture graphs build to Nix's output paths with one builder per
//! system (the other system's builder gets nothing); a builder killed mid-build has its step
//! retried on the other; a runner killed mid-build has the builder's job adopted, not rebuilt; a
//! wrong token is refused; lying builders are refused and nothing they sent enters the store.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use common::cluster::{Cluster, Proc};
use common::instantiate::{Gen, Kind};
use common::qr::{Backend, all_steps};
use serde_json::Value;

const X86: &str = "x86_64-linux";
const I686: &str = "i686-linux";

/// The `derivation show` document of a fixture (its drvs keyed by path).
#[cfg(feature = "test-hooks")]
fn fixture_doc(fixture: &Value) -> Value {
    let mut doc = serde_json::Map::new();
    for (path, d) in fixture["derivations"].as_object().expect("derivations") {
        doc.insert(path.clone(), d["show_derivation"].clone());
    }
    Value::Object(doc)
}

fn outputs_of(b: &Value) -> BTreeMap<String, String> {
    b["outputs"]
        .as_object()
        .expect("outputs")
        .iter()
        .map(|(o, p)| (o.clone(), p.as_str().unwrap_or_default().to_string()))
        .collect()
}

/// The top-level builds of a fixture succeeded with Nix's output paths.
fn check_fixture_builds(name: &str, fixture: &Value, builds: &[Value], logs: &dyn Fn() -> String) {
    assert!(!builds.is_empty(), "{name}: no builds\n{}", logs());
    let drvs = fixture["derivations"].as_object().expect("derivations");
    for b in builds {
        let drv = b["drvPath"].as_str().expect("drvPath");
        assert_eq!(b["status"], 0, "{name}: {b}\n{}", logs());
        let want: BTreeMap<String, String> = drvs[drv]["realisations"]
            .as_object()
            .expect("realisations")
            .iter()
            .map(|(o, r)| (o.clone(), r["out_path"].as_str().unwrap_or_default().into()))
            .collect();
        assert_eq!(outputs_of(b), want, "{name}: outputs of {drv}");
    }
}

/// Nix's own list of the drvs it built for a fixture.
fn nix_built(fixture: &Value) -> BTreeSet<String> {
    fixture["build_order_log"]
        .as_array()
        .expect("log")
        .iter()
        .filter_map(|l| {
            l.as_str()?
                .strip_prefix("building '")?
                .strip_suffix("'...")
                .map(str::to_string)
        })
        .collect()
}

/// Imports every fixture's drvs (and mixed.json's `builtins.toFile` source) into the runner's
/// store with `qr import`, as an operator would; returns the top-level drv paths.
fn import_fixtures(c: &Cluster) -> Vec<PathBuf> {
    let dir = c.qr.state_dir().join("fixture-store");
    std::fs::create_dir_all(&dir).unwrap();
    let mut all = Vec::new();
    let mut used = BTreeSet::new();
    for (_, fx) in common::load_fixtures() {
        for (p, v) in common::derivations(&fx) {
            std::fs::write(
                dir.join(p.rsplit('/').next().unwrap()),
                common::s(v, "/aterm"),
            )
            .unwrap();
            all.push(p.to_string());
            if let Some(inputs) = v["show_derivation"]["inputDrvs"].as_object() {
                used.extend(inputs.keys().cloned());
            }
        }
    }
    let sd = qr::store::StoreDir::default();
    let src = sd.print(&sd.make_text_path("mx-src.txt", b"some source\n", []));
    std::fs::write(dir.join(src.rsplit('/').next().unwrap()), "some source\n").unwrap();
    let mut args = vec![
        "import".to_string(),
        "--from".to_string(),
        dir.display().to_string(),
    ];
    args.extend(all.iter().cloned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.qr.run(&argv, &[]);
    assert!(
        out.status.success(),
        "qr import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    all.into_iter()
        .filter(|p| !used.contains(p))
        .map(PathBuf::from)
        .collect()
}

/// A graph over two systems: x86 `base` → i686 `mid` → x86 `top`, plus an i686 leaf.
fn two_system_graph() -> (Value, BTreeMap<String, String>) {
    let mut g = Gen::new();
    let base = g.add(Kind::Ca, "ts-base", "echo base > $out", &[], &[]);
    let ob = g.out(&base);
    g.system = I686.into();
    let mid = g.add(
        Kind::Ca,
        "ts-mid",
        &format!("cat {ob} > $out; echo mid >> $out"),
        &[],
        &[&base],
    );
    let leaf = g.add(Kind::Ia, "ts-leaf", "echo leaf > $out", &[], &[]);
    let om = g.out(&mid);
    g.system = X86.into();
    let top = g.add(
        Kind::Ca,
        "ts-top",
        &format!("cat {om} > $out; echo top >> $out"),
        &[],
        &[&mid],
    );
    let systems = [(base, X86), (mid, I686), (leaf, I686), (top, X86)]
        .into_iter()
        .map(|(d, s)| (d, s.to_string()))
        .collect();
    (g.doc(), systems)
}

fn graph_builds_one_builder_per_system(backend: Backend) {
    let Some(mut c) = Cluster::new(backend) else {
        return;
    };
    c.start_serve();
    let x = c.builder("bx", &["--systems", X86, "--max-jobs", "2"], &[]);
    let i = c.builder("bi", &["--systems", I686, "--max-jobs", "2"], &[]);
    let logs = || c.logs(&[&x, &i]);
    assert!(
        c.wait_joined("bx", 1, Duration::from_secs(20)),
        "{}",
        logs()
    );
    assert!(
        c.wait_joined("bi", 1, Duration::from_secs(20)),
        "{}",
        logs()
    );

    // The fixture graphs (all x86_64-linux): built by bx only, to Nix's paths.
    let fixtures = common::load_fixtures();
    let tops = import_fixtures(&c);
    let refs: Vec<&std::path::Path> = tops.iter().map(PathBuf::as_path).collect();
    let (out, builds) = c.finish(c.submit(&refs, 120));
    assert!(
        out.status.success(),
        "submit: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    let mut expected_runs = BTreeSet::new();
    for (name, f) in &fixtures {
        let drvs: BTreeSet<&str> = f["derivations"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mine: Vec<Value> = builds
            .iter()
            .filter(|b| drvs.contains(b["drvPath"].as_str().unwrap_or_default()))
            .cloned()
            .collect();
        check_fixture_builds(name, f, &mine, &logs);
        expected_runs.extend(nix_built(f));
    }
    let runs = x.runs();
    let ran: BTreeSet<String> = runs.iter().cloned().collect();
    assert_eq!(ran.len(), runs.len(), "a drv was built twice: {runs:?}");
    assert_eq!(ran, expected_runs, "bx built exactly what Nix built");
    assert!(
        i.runs().is_empty(),
        "the i686 builder got x86_64 work: {:?}",
        i.runs()
    );
    assert_eq!(
        i.proc.count_lines(&["build started"]),
        0,
        "the i686 builder was sent a build\n{}",
        logs()
    );
    // Steps record the machine that built them.
    for (_, s) in all_steps(&builds) {
        if s["built"] == true {
            assert_eq!(s["machine"], "bx", "{s}");
        }
    }

    // A two-system graph: each step on its system's builder.
    let (doc, systems) = two_system_graph();
    let file = c.qr.write_json("two-systems.json", &doc);
    let (out, builds) = c.finish(c.submit(&[&file], 120));
    assert!(
        out.status.success(),
        "submit: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    assert_eq!(
        builds.len(),
        2,
        "ts-top and ts-leaf are the top-level builds"
    );
    for b in &builds {
        assert_eq!(b["status"], 0, "{b}\n{}", logs());
    }
    let mut on_machine: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, s) in all_steps(&builds) {
        if s["built"] == true {
            on_machine
                .entry(s["machine"].as_str().unwrap_or_default().to_string())
                .or_default()
                .insert(s["drvPath"].as_str().unwrap_or_default().to_string());
        }
    }
    let by_system = |sys: &str| -> usize { systems.values().filter(|s| *s == sys).count() };
    assert_eq!(
        on_machine.get("bx").map(BTreeSet::len),
        Some(by_system(X86)),
        "{on_machine:?}"
    );
    assert_eq!(
        on_machine.get("bi").map(BTreeSet::len),
        Some(by_system(I686)),
        "{on_machine:?}"
    );
    assert_eq!(i.runs().len(), by_system(I686), "{:?}", i.runs());
}

#[test]
fn fixture_graphs_build_on_remote_builders_one_per_system_on_sqlite() {
    graph_builds_one_builder_per_system(Backend::Sqlite);
}

#[test]
fn fixture_graphs_build_on_remote_builders_one_per_system_on_postgres() {
    graph_builds_one_builder_per_system(Backend::Postgres);
}

/// a → b → c, floating CA; b's builder sleeps so a kill lands while it builds.
fn slow_chain(tag: &str, sleep_s: u32) -> Value {
    let mut g = Gen::new();
    let a = g.add(Kind::Ca, &format!("{tag}-a"), "echo a > $out", &[], &[]);
    let oa = g.out(&a);
    let b = g.add(
        Kind::Ca,
        &format!("{tag}-b"),
        &format!("sleep {sleep_s}; cat {oa} > $out; echo b >> $out"),
        &[],
        &[&a],
    );
    let ob = g.out(&b);
    g.add(
        Kind::Ca,
        &format!("{tag}-c"),
        &format!("cat {ob} > $out; echo c >> $out"),
        &[],
        &[&b],
    );
    g.doc()
}

/// Waits until the builder runs the build of `name_part` (its inputs fetched from the runner:
/// a runner killed earlier would fail the fetch, and the job with it).
fn wait_started(p: &Proc, name_part: &str) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if p.count_lines(&["inputs in place; the build runs", name_part]) > 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn a_builder_killed_mid_build_has_its_step_retried_on_the_other() {
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    c.start_serve();
    let mut first = c.builder("first", &["--systems", X86], &[]);
    assert!(
        c.wait_joined("first", 1, Duration::from_secs(20)),
        "{}",
        c.logs(&[&first])
    );
    let file = c.qr.write_json("g.json", &slow_chain("kb", 3));
    let submit = c.submit(&[&file], 90);
    assert!(wait_started(&first.proc, "kb-b"), "{}", c.logs(&[&first]));
    let second = c.builder("second", &["--systems", X86], &[]);
    assert!(
        c.wait_joined("second", 1, Duration::from_secs(20)),
        "{}",
        c.logs(&[&first, &second])
    );
    first.proc.kill();
    let (out, builds) = c.finish(submit);
    let logs = c.logs(&[&first, &second]);
    assert!(
        out.status.success(),
        "{}\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0]["status"], 0, "{}", builds[0]);
    assert_eq!(outputs_of(&builds[0]).len(), 1, "one output");
    // b was aborted on `first` and built on `second`, once.
    let steps = all_steps(&builds);
    let b_rows: Vec<&Value> = steps
        .iter()
        .map(|(_, s)| s)
        .filter(|s| {
            s["drvPath"]
                .as_str()
                .unwrap_or_default()
                .ends_with("-kb-b.drv")
        })
        .collect();
    assert!(
        b_rows.iter().any(|s| s["status"] == 3),
        "an aborted attempt: {b_rows:?}"
    );
    let b_success: Vec<&&Value> = b_rows
        .iter()
        .filter(|s| s["status"] == 0 && s["built"] == true)
        .collect();
    assert_eq!(b_success.len(), 1, "{b_rows:?}");
    assert_eq!(b_success[0]["machine"], "second");
    assert!(
        !first.runs().iter().any(|d| d.ends_with("-kb-b.drv")),
        "first never finished b"
    );
    assert_eq!(
        second
            .runs()
            .iter()
            .filter(|d| d.ends_with("-kb-b.drv"))
            .count(),
        1,
        "{:?}",
        second.runs()
    );
}

/// The step rows of a build as the database holds them (the JSON report has no times).
fn db_steps(c: &Cluster, build: i64) -> Vec<qr::db::types::Step> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let db = qr::db::Db::connect(&c.qr.db_url, 1)
            .await
            .expect("database");
        db.steps_of_build(qr::db::types::BuildId(build))
            .await
            .expect("steps")
    })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The rows of a build for the drvs named `*-<name>.drv` that are no resolution (the attempts).
fn attempts<'a>(steps: &'a [qr::db::types::Step], name: &str) -> Vec<&'a qr::db::types::Step> {
    let suffix = format!("-{name}.drv");
    steps
        .iter()
        .filter(|s| {
            s.drv_path.ends_with(&suffix) && s.status != Some(qr::db::types::BuildStatus::Resolved)
        })
        .collect()
}

fn a_runner_restarted_mid_build_adopts_the_builders_job(backend: Backend) {
    use qr::db::types::{BuildStatus, BusyPhase};
    let Some(mut c) = Cluster::new(backend) else {
        return;
    };
    c.start_serve();
    let b = c.builder("keeper", &["--systems", X86], &[]);
    assert!(
        c.wait_joined("keeper", 1, Duration::from_secs(20)),
        "{}",
        c.logs(&[&b])
    );
    let file = c.qr.write_json("g.json", &slow_chain("rr", 4));
    let submit = c.submit(&[&file], 90);
    assert!(wait_started(&b.proc, "rr-b"), "{}", c.logs(&[&b]));
    // Kill the runner (SIGKILL) while b builds, and start it again.
    let killed_at = unix_now();
    c.serve.as_mut().expect("serve").kill();
    c.start_serve();
    let (out, builds) = c.finish(submit);
    let logs = c.logs(&[&b]);
    assert!(
        out.status.success(),
        "{}\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0]["status"], 0, "{}\n{logs}", builds[0]);
    assert!(
        c.wait_joined("keeper", 2, Duration::from_secs(1)),
        "rejoined\n{logs}"
    );
    assert!(
        b.proc
            .count_lines(&["the runner adopts a build this builder holds", "rr-b"])
            >= 1,
        "the held build was adopted\n{logs}"
    );
    // Executed once each: a, resolved b (across the restart), resolved c.
    let runs = b.runs();
    let uniq: BTreeSet<&String> = runs.iter().collect();
    assert_eq!(
        uniq.len(),
        runs.len(),
        "a drv was built twice: {runs:?}\n{logs}"
    );
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert_eq!(b.proc.count_lines(&["build started", "rr-b"]), 1, "{logs}");
    // ONE row for b's attempt: the row that was running before the restart carried on (same
    // step number, same start time, on the same builder) and the builder's report finished it.
    let id = builds[0]["id"].as_i64().expect("build id");
    let steps = db_steps(&c, id);
    assert!(
        steps.iter().all(|s| s.status != Some(BuildStatus::Aborted)),
        "no aborted row: {steps:#?}\n{logs}"
    );
    let rows = attempts(&steps, "rr-b");
    assert_eq!(rows.len(), 1, "{steps:#?}\n{logs}");
    let row = rows[0];
    assert_eq!(row.status, Some(BuildStatus::Success), "{row:?}");
    assert_eq!(row.times_built, Some(1), "{row:?}");
    assert_eq!(row.machine, "keeper", "{row:?}");
    assert_eq!(row.busy, BusyPhase::NotBusy, "{row:?}");
    let (start, stop) = (
        row.start_time.unwrap_or(i64::MAX),
        row.stop_time.unwrap_or(0),
    );
    assert!(
        start <= killed_at,
        "started before the kill: {row:?}, kill at {killed_at}"
    );
    assert!(stop >= killed_at, "finished after the restart: {row:?}");
    // b's Resolved row points at it.
    let resolved = steps
        .iter()
        .find(|s| s.status == Some(BuildStatus::Resolved) && s.drv_path.ends_with("-rr-b.drv"))
        .expect("b resolved");
    assert_eq!(resolved.resolved_to_step, Some(row.stepnr), "{steps:#?}");
    assert!(
        c.serve_logs()
            .contains("the builder goes on with the attempt it ran before the restart"),
        "{logs}"
    );
}

#[test]
fn a_runner_restarted_mid_build_adopts_the_builders_job_in_the_same_row_on_sqlite() {
    a_runner_restarted_mid_build_adopts_the_builders_job(Backend::Sqlite);
}

#[test]
fn a_runner_restarted_mid_build_adopts_the_builders_job_in_the_same_row_on_postgres() {
    a_runner_restarted_mid_build_adopts_the_builders_job(Backend::Postgres);
}

/// The runner is killed while b builds on `gone`, and `gone` never comes back (`rejoins` false):
/// after the rejoin grace the row that was running is closed Aborted (it really stopped), and a new
/// attempt builds b on `other`. With `rejoins`, `gone` comes back at once under its id but without
/// the build (a fresh state dir): the row is closed Aborted and a new attempt (a new row) builds b
/// there.
fn a_stopped_attempt_ends_aborted_and_a_new_one_builds(rejoins: bool) {
    use qr::db::types::BuildStatus;
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    c.start_serve();
    let mut gone = c.builder("gone", &["--systems", X86], &[]);
    assert!(
        c.wait_joined("gone", 1, Duration::from_secs(20)),
        "{}",
        c.logs(&[&gone])
    );
    let file = c.qr.write_json("g.json", &slow_chain("ng", 3));
    let submit = c.submit(&[&file], 120);
    assert!(wait_started(&gone.proc, "ng-b"), "{}", c.logs(&[&gone]));
    let killed_at = unix_now();
    // The runner first (so it does not see the builder go), then the builder, for good.
    c.serve.as_mut().expect("serve").kill();
    gone.proc.kill();
    c.serve_env = vec![("QR_GRPC_REJOIN_GRACE_S".into(), "2".into())];
    c.start_serve();
    let builder = if rejoins { "gone" } else { "other" };
    let other = c.builder(builder, &["--systems", X86], &[]);
    let (out, builds) = c.finish(submit);
    let logs = c.logs(&[&gone, &other]);
    assert!(
        out.status.success(),
        "{}\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0]["status"], 0, "{}\n{logs}", builds[0]);
    let id = builds[0]["id"].as_i64().expect("build id");
    let steps = db_steps(&c, id);
    let rows = attempts(&steps, "ng-b");
    assert_eq!(
        rows.len(),
        2,
        "the stopped attempt and the new one: {steps:#?}\n{logs}"
    );
    let (old, new) = (rows[0], rows[1]);
    assert_eq!(old.status, Some(BuildStatus::Aborted), "{old:?}");
    assert_eq!(old.machine, "gone", "{old:?}");
    assert!(old.start_time.unwrap_or(i64::MAX) <= killed_at, "{old:?}");
    assert!(
        old.stop_time.unwrap_or(0) >= killed_at,
        "closed after the restart: {old:?}"
    );
    assert_eq!(new.status, Some(BuildStatus::Success), "{new:?}");
    assert_eq!(new.times_built, Some(1), "{new:?}");
    assert_eq!(new.machine, builder, "{new:?}");
    assert!(new.stepnr > old.stepnr, "{steps:#?}");
    assert!(
        new.start_time.unwrap_or(0) >= old.stop_time.unwrap_or(i64::MAX),
        "the new attempt started after the old one was closed: {steps:#?}"
    );
    assert_eq!(
        other
            .runs()
            .iter()
            .filter(|d| d.ends_with("-ng-b.drv"))
            .count(),
        1,
        "{:?}",
        other.runs()
    );
    assert!(
        steps
            .iter()
            .all(|s| s.status.is_some() && !s.busy.is_busy()),
        "every row finished: {steps:#?}"
    );
    assert!(
        c.serve_logs()
            .contains("closing the attempt carried over the restart"),
        "the step closed the row it had carried\n{logs}"
    );
}

#[test]
fn a_builder_that_does_not_rejoin_within_the_grace_has_its_row_aborted_and_the_step_built_elsewhere()
 {
    a_stopped_attempt_ends_aborted_and_a_new_one_builds(false);
}

#[test]
fn a_builder_that_rejoins_without_the_build_has_its_row_aborted_and_builds_it_in_a_new_row() {
    a_stopped_attempt_ends_aborted_and_a_new_one_builds(true);
}

#[test]
fn a_wrong_or_missing_token_is_refused_and_logged() {
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    c.start_serve();
    let bad = c.qr.state_dir().join("bad-token");
    std::fs::write(&bad, "not-the-token\n").unwrap();
    let mut b = c.builder_with_token("intruder", &bad, &["--systems", X86], &[]);
    let status = b.proc.wait_exit(Duration::from_secs(20));
    let logs = c.logs(&[&b]);
    assert!(
        status.is_some_and(|s| !s.success()),
        "the builder gives up\n{logs}"
    );
    assert!(b.proc.log_text().contains("refused"), "{logs}");
    assert!(
        c.serve().log_text().contains("bad token"),
        "the refusal is logged\n{logs}"
    );
    assert!(!c.serve_logs().contains("builder joined"), "{logs}");
}

/// Reads a runner store path's NAR hash from its files.
#[cfg(feature = "test-hooks")]
fn nar_hash_of(c: &Cluster, path: &str) -> String {
    let base = path.rsplit('/').next().unwrap();
    let phys = c.qr.state_dir().join("nix-store").join(base);
    let (h, _) = qr::store::nar::nar_hash_and_size(&phys).expect("output on the runner");
    qr::store::hash::render_nix32(&h)
}

/// The builders lie through `QR_BUILDER_FAULT`, a hook of the `test-hooks` feature.
#[cfg(feature = "test-hooks")]
#[test]
fn lying_builders_are_refused_and_their_steps_retried() {
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    let fixtures = common::load_fixtures();
    let (_, chain) = fixtures
        .iter()
        .find(|(n, _)| n == "chain")
        .expect("chain fixture");
    c.start_serve();
    let corrupt = c.builder(
        "liar-nar",
        &["--systems", X86],
        &[("QR_BUILDER_FAULT", "corrupt-nar")],
    );
    assert!(
        c.wait_joined("liar-nar", 1, Duration::from_secs(20)),
        "{}",
        c.logs(&[&corrupt])
    );
    let file = c.qr.write_json("chain.json", &fixture_doc(chain));
    let submit = c.submit(&[&file], 90);
    assert!(
        c.serve()
            .wait_log("builder refused and quarantined", Duration::from_secs(30)),
        "the corrupt NAR is refused\n{}",
        c.logs(&[&corrupt])
    );
    let forger = c.builder(
        "liar-job",
        &["--systems", X86],
        &[("QR_BUILDER_FAULT", "unknown-job")],
    );
    let t = std::time::Instant::now();
    while c.serve().count_lines(&["builder refused and quarantined"]) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the forged job id is refused\n{}",
            c.logs(&[&corrupt, &forger])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let honest = c.builder("honest", &["--systems", X86], &[]);
    let (out, builds) = c.finish(submit);
    let logs = c.logs(&[&corrupt, &forger, &honest]);
    assert!(
        out.status.success(),
        "{}\n{logs}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_fixture_builds("chain", chain, &builds, &|| logs.clone());
    let serve_log = c.serve_logs();
    assert!(serve_log.contains("NAR hash or size mismatch"), "{logs}");
    assert!(serve_log.contains("was not given"), "{logs}");
    // The quarantined liars are refused when they come back (they retry after a few seconds).
    assert!(
        c.serve()
            .wait_log("refused a quarantined builder", Duration::from_secs(15)),
        "{logs}"
    );
    // Every successful built step ran on the honest builder, and the runner's copies are true.
    for (_, s) in all_steps(&builds) {
        if s["built"] == true {
            assert_eq!(s["machine"], "honest", "{s}");
        }
    }
    let infos = chain["output_path_infos"]
        .as_object()
        .expect("output_path_infos");
    let mut checked = 0;
    for b in &builds {
        for p in outputs_of(b).values() {
            let want = infos[p.as_str()]["narHash"].as_str().unwrap().to_string();
            let want =
                qr::store::hash::render_nix32(&qr::store::hash::parse_sha256(&want).unwrap());
            assert_eq!(nar_hash_of(&c, p), want, "{p}");
            checked += 1;
        }
    }
    assert!(checked > 0);
}

/// A CA and a certificate for `localhost` signed by it (openssl), in `dir`: (ca, cert, key).
fn make_certs(dir: &std::path::Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let ok = run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=qr test CA",
    ]) && run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "req.csr",
        "-subj",
        "/CN=localhost",
    ]) && {
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\n").unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ])
    };
    ok.then(|| {
        (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        )
    })
}

#[test]
fn builders_reach_the_runner_over_tls() {
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    let certs = c.qr.state_dir().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let Some((ca, cert, key)) = make_certs(&certs) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl could not make certificates"
        );
        eprintln!("openssl unavailable: skipped");
        return;
    };
    c.serve_env = vec![
        ("QR_GRPC_TLS_CERT".into(), cert.display().to_string()),
        ("QR_GRPC_TLS_KEY".into(), key.display().to_string()),
    ];
    c.start_serve();
    let url = format!("https://localhost:{}", c.port);
    let ca_s = ca.display().to_string();
    let b = c.builder_at(
        "tls",
        &url,
        &c.token,
        &["--systems", X86, "--tls-ca", &ca_s],
        &[],
    );
    assert!(
        c.wait_joined("tls", 1, Duration::from_secs(20)),
        "{}",
        c.logs(&[&b])
    );
    let mut g = Gen::new();
    g.add(Kind::Ca, "tls-one", "echo over tls > $out", &[], &[]);
    let file = c.qr.write_json("one.json", &g.doc());
    let (out, builds) = c.finish(c.submit(&[&file], 60));
    assert!(out.status.success(), "{}", c.logs(&[&b]));
    assert_eq!(builds[0]["status"], 0);
    // A plain-text client is not served.
    let plain = c.builder("plain", &["--systems", X86], &[]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !c.wait_joined("plain", 1, Duration::from_millis(100)),
        "{}",
        c.logs(&[&plain])
    );
}
