//! `qr serve` and `qr builder` on one machine, each with its own state dir and no configuration:
//! the builder's configuration does not pin `[store] dir`, so it takes the runner's logical dir
//! at start (its files stay under its own state dir) and builds the runner's graphs. A builder
//! that pins another dir is still refused, with the message that names both dirs.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::cluster::{Proc, TOKEN, free_port};
use common::qr::{Backend, Qr};
use serde_json::Value;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// A builder with its own state dir (removed with the returned guard); `store_dir` pins
/// `[store] dir` when given.
fn builder(
    url: &str,
    token: &std::path::Path,
    id: &str,
    store_dir: Option<&str>,
) -> (Proc, tempfile::TempDir) {
    let state = tempfile::tempdir().expect("temp dir");
    let mut c = Command::new(env!("CARGO_BIN_EXE_qr"));
    c.arg("--state-dir").arg(state.path());
    c.env_remove("QR_STORE_DIR")
        .env_remove("QR_STORE_ROOT")
        .env_remove("QR_DATABASE_URL")
        .env("QR_LOG", "info,h2=warn,tower=warn,hyper=warn");
    if let Some(d) = store_dir {
        c.env("QR_STORE_DIR", d);
    }
    c.args(["builder", "--runner", url, "--token-file"])
        .arg(token)
        .args(["--machine-id", id, "--max-jobs", "2"]);
    let log = state.path().join("builder.log");
    (Proc::spawn(id, c, log), state)
}

#[test]
fn builder_without_store_config_takes_the_runners_dir_and_builds() {
    let qr = Qr::new(Backend::Sqlite, false).expect("sqlite runner");
    let token = qr.state_dir().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut serve = qr.command();
    serve
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env_remove("QR_STORE_DIR")
        .env_remove("QR_STORE_ROOT")
        .env("QR_LOG", "info,h2=warn,tower=warn,hyper=warn")
        .env("QR_GRPC_TOKEN_FILE", &token)
        .env("QR_HTTP_LISTEN", "")
        .env("QR_LOCAL_BUILDER_ENABLED", "false");
    let serve = Proc::spawn("serve", serve, qr.state_dir().join("serve.log"));
    assert!(
        serve.wait_log("listening on", Duration::from_secs(30)),
        "qr serve did not start:\n{}",
        serve.log_text()
    );
    let runner_dir = qr.state_dir().join("store");

    let (b, _b_state) = builder(&url, &token, "plain", None);
    assert!(
        b.wait_log("taking the runner's", Duration::from_secs(30)),
        "the builder did not take the runner's store dir:\n{}",
        b.log_text()
    );
    assert!(
        b.log_text().contains(&runner_dir.display().to_string()),
        "the builder's log does not name the runner's dir {}:\n{}",
        runner_dir.display(),
        b.log_text()
    );
    assert!(
        serve.wait_log("machine=plain", Duration::from_secs(30)),
        "the builder did not join:\n{}\n{}",
        serve.log_text(),
        b.log_text()
    );

    let out = qr.run(
        &[
            "submit",
            "--wait",
            "--json",
            "--timeout",
            "300",
            example("ca-chain.json").to_str().expect("utf-8 path"),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "submit failed: {}\n{stdout}\n{}\nbuilder:\n{}",
        String::from_utf8_lossy(&out.stderr),
        serve.log_text(),
        b.log_text()
    );
    let builds: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(builds.len(), 1, "{stdout}");
    assert_eq!(builds[0]["status"], 0, "{stdout}");
    let out_path = builds[0]["outputs"]["out"]
        .as_str()
        .expect("an output path");
    assert!(
        out_path.starts_with(&format!("{}/", runner_dir.display())),
        "{out_path} is not under the runner's store dir"
    );
    assert!(
        std::path::Path::new(out_path).exists(),
        "{out_path} is not in the runner's store"
    );

    // An explicit, different dir is a configuration error: refused, and the builder stops.
    let (mut pinned, _pinned_state) = builder(&url, &token, "pinned", Some("/other/store"));
    let status = pinned.wait_exit(Duration::from_secs(60));
    let log = pinned.log_text();
    assert!(
        status.is_some_and(|s| !s.success()),
        "a builder pinned to another dir should stop with an error:\n{log}"
    );
    assert!(
        log.contains("/other/store") && log.contains("is not the runner's"),
        "the refusal does not say why:\n{log}"
    );
}
