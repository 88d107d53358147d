//! `qr bench` runs a tiny workload end to end and reports every figure (no timing is asserted:
//! the real runs are manual, in BENCHMARKS.md).

use std::process::Command;

use serde_json::Value;

fn num(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} is missing or not a number in {v:#}"))
}

#[test]
fn bench_reports_every_figure_on_sqlite() {
    let state = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_qr"))
        .arg("--state-dir")
        .arg(state.path())
        .args([
            "bench",
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
        ])
        .output()
        .expect("running qr bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qr bench failed: {stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");

    assert!(num(&doc, "/machine/nproc") >= 1.0);
    let l = &doc["layered"][0];
    assert_eq!(l["backend"], "sqlite");
    assert_eq!(num(l, "/setup/steps"), 200.0);
    // load: every step actor made, the leaves queued, memory read
    assert_eq!(num(l, "/load/live_steps"), 200.0);
    assert_eq!(num(l, "/load/runnable"), 50.0);
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
    let state = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_qr"))
        .arg("--state-dir")
        .arg(state.path())
        .args([
            "bench",
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
        ])
        .output()
        .expect("running qr bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qr bench failed: {stderr}");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");

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
