//! `qr bench` runs a tiny workload end to end and reports every figure (no timing is asserted:
//! the real runs are manual, in BENCHMARKS.md).

use std::process::Command;

use serde_json::Value;

/// Runs `qr bench ARGS` in a fresh state dir; the dir (removed when dropped) and the bench's one
/// JSON document.
fn run_bench(args: &[&str]) -> (tempfile::TempDir, Value) {
    let state = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_qr"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("bench")
        .args(args)
        .output()
        .expect("running qr bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qr bench failed: {stderr}");
    let doc = serde_json::from_slice(&out.stdout).expect("one JSON document");
    (state, doc)
}

fn num(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} is missing or not a number in {v:#}"))
}

#[test]
fn bench_reports_every_figure_on_sqlite() {
    let (_state, doc) = run_bench(&[
        "--steps",
        "200",
        "--depth",
        "4",
        "--dispatch-steps",
        "200",
        "--pickup",
        "5",
        "--backend",
        "sqlite",
        "--json",
    ]);

    assert!(num(&doc, "/machine/nproc") >= 1.0);
    let l = &doc["layered"][0];
    assert_eq!(l["backend"], "sqlite");
    assert_eq!(num(l, "/setup/steps"), 200.0);
    // load: every step actor made, the leaves queued, memory read
    assert_eq!(num(l, "/load/live_steps"), 200.0);
    assert_eq!(num(l, "/load/runnable"), 50.0);
    // the 150 steps above the leaves only wait for their inputs: plain state, no actor
    assert_eq!(num(l, "/load/dormant_steps"), 150.0);
    assert!(num(l, "/load/steps_per_s") > 0.0);
    assert!(num(l, "/load/rss_after_bytes") > 0.0);
    num(l, "/load/rss_per_step_bytes");
    // build: every step finished, transactions counted, latencies sampled
    let b = &l["build"];
    assert!(num(b, "/steps_built") >= 200.0);
    assert_eq!(
        num(b, "/steps_finished"),
        num(b, "/steps_built") + num(b, "/resolutions")
    );
    assert!(num(b, "/steps_per_s") > 0.0);
    assert!(num(b, "/write_transactions") > 0.0);
    assert!(num(b, "/tx_per_finished_step") > 0.0);
    assert!(num(b, "/dispatch_us/count") > 0.0);
    num(b, "/dispatch_us/p99");
    assert!(num(b, "/resolution_ms/count") > 0.0);
    num(b, "/resolution_ms/p50");
    num(b, "/resolution_ms/p99");

    let d = &doc["dispatch"][0];
    assert_eq!(num(d, "/runnable_at_join"), 200.0);
    assert!(num(d, "/decisions_us/count") > 0.0);
    num(d, "/decisions_us/p50");
    num(d, "/decisions_us/p99");
    num(d, "/load/rss_per_step_bytes");
    assert!(num(&doc, "/dispatch_pure/decisions_us/count") > 0.0);

    // pick-up: every build queued from the other pool started, each timed
    let p = &doc["pickup"][0];
    assert_eq!(p["backend"], "sqlite");
    assert_eq!(num(p, "/submissions"), 5.0);
    assert_eq!(num(p, "/latency_ms/count"), 5.0);
    assert!(num(p, "/latency_ms/p50") > 0.0);
    num(p, "/latency_ms/p99");

    let summary = doc["summary"].as_array().expect("summary rows");
    assert!(summary.iter().any(|r| r["met"].is_boolean()));
}

/// The processes whose command line mentions `needle` (for the builders the bench spawned).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn bench_with_remote_builders_reports_and_leaves_no_builder_behind() {
    let (state, doc) = run_bench(&[
        "--steps",
        "120",
        "--depth",
        "4",
        "--no-layered",
        "--dispatch-steps",
        "0",
        "--pickup",
        "0",
        "--remote-builders",
        "3",
        "--remote-jobs",
        "2",
        "--backend",
        "sqlite",
        "--json",
    ]);

    let r = &doc["remote"][0];
    assert_eq!(r["backend"], "sqlite");
    assert_eq!(num(r, "/builders"), 3.0);
    assert_eq!(num(r, "/jobs_per_builder"), 2.0);
    assert_eq!(num(r, "/setup/steps"), 120.0);
    let b = &r["build"];
    // Every step was built by the builders (and its output uploaded, checked, registered).
    assert!(num(b, "/steps_built") >= 120.0, "{b:#}");
    assert_eq!(
        num(b, "/steps_finished"),
        num(b, "/steps_built") + num(b, "/resolutions")
    );
    assert!(
        num(b, "/resolutions") > 0.0,
        "the CA steps were resolved: {b:#}"
    );
    assert!(num(b, "/steps_per_s_from_spawn") > 0.0);
    num(b, "/steps_per_s");
    assert!(num(b, "/join_s") > 0.0);
    assert!(num(b, "/step_ms/count") >= 120.0, "{b:#}");
    num(b, "/step_ms/p50");
    num(b, "/step_ms/p99");
    assert!(num(b, "/write_transactions") > 0.0);
    let cpu = &r["cpu"];
    assert!(num(cpu, "/builders_s") > 0.0, "{cpu:#}");
    assert!(num(cpu, "/runner_s") > 0.0, "{cpu:#}");
    num(cpu, "/postgres_s");
    num(cpu, "/machine_busy_share");
    assert!(!r["bound"].as_str().unwrap_or_default().is_empty());
    let summary = doc["summary"].as_array().expect("summary rows");
    assert!(summary.iter().any(|row| {
        row["metric"]
            .as_str()
            .unwrap_or_default()
            .starts_with("remote:")
            && row["met"].is_boolean()
    }));
    // The builders ran under the bench's state dir, and none is left running.
    let here = state.path().display().to_string();
    assert!(
        processes_mentioning(&here).is_empty(),
        "builders left running: {:?}",
        processes_mentioning(&here)
    );
}

/// Whether PostgreSQL answers at `url` (through `psql`).
fn postgres_answers(url: &str) -> bool {
    Command::new("psql")
        .args([url, "-q", "-c", "select 1"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn restart_scale_reports_fill_recovery_and_plans() {
    let url = std::env::var("QR_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    if !postgres_answers(&url) {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL is not reachable at {url} in CI"
        );
        eprintln!("restart_scale_reports_fill_recovery_and_plans: no PostgreSQL at {url}: skipped");
        return;
    }
    let (_state, doc) = run_bench(&[
        "--restart-scale",
        "--backend",
        "postgres",
        "--postgres-url",
        &url,
        "--history-builds",
        "200",
        "--history-steps",
        "1000",
        "--queued-builds",
        "60",
        "--queued-steps",
        "150",
        "--queued-depth",
        "3",
        "--busy-rows",
        "5",
        "--resolved-rows",
        "5",
        "--slots",
        "4",
        "--json",
    ]);
    let r = &doc["restart"];
    assert_eq!(r["backend"], "postgres");
    // the history: 200 builds of 5 steps, every other one's first step Resolved
    assert_eq!(num(r, "/fill/history_builds"), 200.0);
    assert_eq!(num(r, "/fill/history_steps"), 1000.0);
    assert_eq!(num(r, "/fill/history_resolved"), 100.0);
    assert_eq!(num(r, "/fill/queued_builds"), 60.0);
    assert_eq!(num(r, "/fill/busy_rows"), 5.0);
    assert!(num(r, "/fill/resolved_rows") >= 1.0);
    // history rows, the busy rows, two rows per Resolved pair
    assert_eq!(
        num(r, "/fill/buildsteps_rows"),
        1005.0 + 2.0 * num(r, "/fill/resolved_rows")
    );
    num(r, "/fill/total_s");
    // recovery: the busy rows aborted, the resolutions re-attached, everything loaded
    let rec = &r["recovery"];
    assert_eq!(num(rec, "/aborted_busy"), 5.0);
    assert_eq!(
        num(rec, "/resolutions_reattached"),
        num(r, "/fill/resolved_rows")
    );
    assert_eq!(num(rec, "/orphaned"), 0.0);
    assert_eq!(num(rec, "/build_actors"), 60.0);
    assert!(num(rec, "/steps_created") >= num(rec, "/expected_steps"));
    assert!(num(rec, "/runnable_or_running") >= num(rec, "/expected_runnable"));
    assert!(num(rec, "/jobs_started") >= 1.0);
    assert!(num(rec, "/first_dispatch_s") > 0.0);
    assert!(num(rec, "/full_recovery_s") >= num(rec, "/recover_s"));
    // every recovery query explained (at this size the planner may well scan the tiny tables:
    // the plans that matter are those of the full-size run, in docs/schema.md)
    let plans = r["plans"].as_array().expect("plans");
    for name in [
        "abort_busy_steps",
        "resolved_steps",
        "pending_targets_of_finished",
        "unfinished_builds",
    ] {
        let p = plans
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no plan for {name}"));
        assert!(!p["plan"].as_array().expect("plan lines").is_empty());
        assert!(p["full_scans"].is_array(), "{name}: {p:#}");
        num(p, "/execution_ms");
    }
    let summary = doc["summary"].as_array().expect("summary rows");
    assert!(summary.iter().any(|r| r["met"].is_boolean()));
}
