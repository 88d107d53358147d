//! A job's own `meta.timeout` / `meta.maxSilent` from nix-eval-jobs' lines take precedence over
//! the configured limits, as in Hydra: `qr submit --eval-jobs` with the `[scheduler]` limits
//! large (an hour) and three jobs whose builders sleep 3 s — one with `meta.timeout = 1`, one
//! (printing, then silent) with `meta.maxSilent = 1`, one without `meta` — ends the first two
//! Timed out (Hydra's status 7) and builds the third. On SQLite through a `qr builder` (the limits
//! travel in the gRPC job), on PostgreSQL on `qr serve`'s own local builder.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::cluster::Cluster;
use common::instantiate::{Gen, Kind};
use common::qr::Backend;
use serde_json::{Value, json};

/// An hour: far above the builders' 3 s, so only a job's own limit can stop them.
const LARGE: &str = "3600";

const ENV: [(&str, &str); 2] = [
    ("QR_SCHEDULER_BUILD_TIMEOUT_S", LARGE),
    ("QR_SCHEDULER_MAX_SILENT_TIME_S", LARGE),
];

/// The three jobs' drvs written as `.drv` files into `dir` (for `--from`), and their lines.
fn lines(dir: &Path) -> (String, BTreeMap<&'static str, String>) {
    let mut g = Gen::new();
    let mut drvs = BTreeMap::new();
    let jobs: [(&str, &str, Option<Value>); 3] = [
        (
            "timeout",
            "sleep 3; echo done > $out",
            Some(json!({"timeout": 1, "description": "a job with its own timeout"})),
        ),
        (
            "silent",
            "echo starting; sleep 3; echo done > $out",
            // As a string, the way Nix's queryMetaInt also takes it.
            Some(json!({"maxSilent": "1"})),
        ),
        ("plain", "sleep 3; echo done > $out", None),
    ];
    let mut out = String::new();
    for (attr, script, meta) in jobs {
        let path = g.add(Kind::Ia, &format!("limits-{attr}"), script, &[], &[]);
        let name = path.rsplit('/').next().expect("a store path");
        std::fs::write(dir.join(name), g.drvs[&path].to_aterm()).expect("write the .drv");
        let mut line = json!({
            "attr": attr, "attrPath": [attr], "drvPath": path,
            "name": format!("limits-{attr}"), "system": common::instantiate::SYSTEM,
            "outputs": {"out": null},
        });
        if let Some(m) = meta {
            line["meta"] = m;
        }
        out.push_str(&line.to_string());
        out.push('\n');
        drvs.insert(attr, path);
    }
    (out, drvs)
}

fn meta_limits_kill_slow_builds(backend: Backend, remote: bool) {
    let Some(mut c) = Cluster::new(backend) else {
        return;
    };
    let from = c.qr.state_dir().join("drvs");
    std::fs::create_dir_all(&from).unwrap();
    let (text, drvs) = lines(&from);
    let file = c.qr.state_dir().join("jobs.jsonl");
    std::fs::write(&file, text).unwrap();
    c.serve_env = ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if !remote {
        c.serve_env
            .push(("QR_LOCAL_BUILDER_ENABLED".into(), "true".into()));
    }
    c.start_serve();
    let builders = if remote {
        let b = c.builder(
            "b1",
            &["--systems", "x86_64-linux", "--max-jobs", "3"],
            &ENV,
        );
        assert!(
            c.wait_joined("b1", 1, Duration::from_secs(20)),
            "{}",
            c.logs(&[&b])
        );
        vec![b]
    } else {
        vec![]
    };
    let out = c.qr.run(
        &[
            "submit",
            "--json",
            "--eval-jobs",
            file.to_str().unwrap(),
            "--from",
            from.to_str().unwrap(),
            "--wait",
            "--timeout",
            "300",
        ],
        &ENV,
    );
    let logs = || {
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.logs(&builders.iter().collect::<Vec<_>>())
        )
    };
    let by_job: BTreeMap<String, Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .map(|v| (v["job"].as_str().unwrap_or_default().to_string(), v))
        .collect();
    assert_eq!(by_job.len(), 3, "{by_job:?}\n{}", logs());
    for (job, want, says) in [
        ("timeout", 7, "timed out"),
        ("silent", 7, "timed out"),
        ("plain", 0, ""),
    ] {
        let b = &by_job[job];
        assert_eq!(b["drvPath"], drvs[job].as_str(), "{b}");
        assert_eq!(b["status"], want, "{job}: {b}\n{}", logs());
        let step = b["steps"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["drvPath"] == drvs[job].as_str()))
            .unwrap_or_else(|| panic!("{job}: no step of its drv: {b}"));
        assert_eq!(step["status"], want, "{job}: {b}");
        let msg = step["errorMsg"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{job}: {msg:?} lacks {says:?}: {b}");
    }
    // Which limit it was.
    let msg = |job: &str| by_job[job]["steps"][0]["errorMsg"].to_string();
    assert!(
        msg("timeout").contains("build timeout"),
        "{}",
        msg("timeout")
    );
    assert!(msg("silent").contains("silent"), "{}", msg("silent"));
    assert_eq!(out.status.code(), Some(1), "two builds failed: {}", logs());
}

#[test]
fn meta_limits_kill_slow_builds_on_a_remote_builder_sqlite() {
    meta_limits_kill_slow_builds(Backend::Sqlite, true);
}

#[test]
fn meta_limits_kill_slow_builds_on_the_local_builder_postgres() {
    meta_limits_kill_slow_builds(Backend::Postgres, false);
}
