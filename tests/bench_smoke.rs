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
