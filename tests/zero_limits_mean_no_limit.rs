//! A limit of 0 means "no limit", as in Nix (`timeout = 0`, `max-silent-time = 0`,
//! `max-build-log-size = 0`) and Hydra: `qr run` with `build_timeout_s`, `max_silent_time_s` and
//! `max_log_bytes` all 0 builds a graph whose builders take time and write logs, on the
//! in-process builder.

mod common;

use std::path::PathBuf;

use common::qr::{Backend, Qr};
use serde_json::Value;

#[test]
fn zero_timeouts_and_log_limit_build_like_no_limit() {
    let qr = Qr::new(Backend::Sqlite, false).expect("sqlite runner");
    let graph = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/ca-chain.json");
    let out = qr.run(
        &["run", "--json", graph.to_str().expect("utf-8 path")],
        &[
            ("QR_SCHEDULER_BUILD_TIMEOUT_S", "0"),
            ("QR_SCHEDULER_MAX_SILENT_TIME_S", "0"),
            ("QR_STORE_MAX_LOG_BYTES", "0"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qr run failed:\n{stdout}\n{stderr}");
    let builds: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(builds.len(), 1, "{stdout}");
    assert_eq!(builds[0]["status"], 0, "{stdout}");
    let steps = builds[0]["steps"].as_array().expect("steps");
    assert!(
        steps.iter().any(|s| s["built"] == true),
        "nothing was built: {stdout}"
    );
}
