//! The dashboard in a real browser (Debian's headless `chromium`): while a graph with CA steps
//! builds under `qr serve`, the page's supervision tree shows a step that resolved and its
//! resolved child, the live event list fills from the server-sent events, and the evaluations
//! panel lists an evaluation (`qr submit --eval-jobs`) with its counts. A screenshot taken
//! the same way is kept in `docs/dashboard.png` when `QR_SCREENSHOT` names a path.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::cluster::Cluster;
use common::instantiate::{Gen, Kind};
use common::qr::Backend;

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].iter().find_map(|b| {
        let out = Command::new("which").arg(b).output().ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
}

/// Starts headless Chromium on `url`; it dumps the DOM (or screenshots) at the load event.
fn headless(chrome: &PathBuf, url: &str, extra: &[String]) -> std::process::Child {
    let profile = tempfile::tempdir().unwrap().keep();
    Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1100",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--timeout=20000")
        .args(extra)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromium")
}

fn output(c: std::process::Child) -> String {
    String::from_utf8_lossy(&c.wait_with_output().expect("chromium").stdout).to_string()
}

#[test]
fn dashboard_shows_a_resolved_step_and_live_events() {
    let Some(chrome) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is not installed and CI is set"
        );
        eprintln!("skipping: no chromium");
        return;
    };
    let Some(mut c) = Cluster::new(Backend::Sqlite) else {
        return;
    };
    c.serve_env = vec![("QR_LOCAL_BUILDER_ENABLED".into(), "true".into())];
    // a → b (CA on CA: resolved, its resolved drv builds slowly) and c (another CA step on a).
    let mut g = Gen::new();
    g.system = qr::config::this_system();
    let a = g.add(Kind::Ca, "dash-a", "echo a > $out", &[], &[]);
    let bs = format!("sleep 12; cat {} > $out; echo b >> $out", g.out(&a));
    let b = g.add(Kind::Ca, "dash-b", &bs, &[], &[&a]);
    let cs = format!("sleep 12; cat {} > $out; echo c >> $out", g.out(&a));
    let cc = g.add(Kind::Ca, "dash-c", &cs, &[], &[&a]);
    let top = g.add(
        Kind::Ca,
        "dash-top",
        &format!("cat {} {} > $out", g.out(&b), g.out(&cc)),
        &[],
        &[&b, &cc],
    );
    let file = c.qr.write_json("dash-graph.json", &g.doc());
    c.start_serve();
    let child = c.submit(&[&file], 120);
    // Wait until b has resolved (its resolved child is building).
    let t = std::time::Instant::now();
    loop {
        let (_, _, body) = c.http_get("/api/actors");
        if body.contains("resolved to") && body.contains("\"building\"") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "b never resolved: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // An evaluation naming the top drv (already queued: it joins as the existing build) and a
    // line that queues nothing, for the evaluations panel.
    let lines = format!(
        "{}\n{{\"attr\":\"dash.broken\",\"error\":\"error: broken\"}}\n",
        serde_json::json!({"attr": "dash.top", "attrPath": ["dash", "top"], "drvPath": top})
    );
    let eval_file = c.qr.state_dir().join("dash-eval.jsonl");
    std::fs::write(&eval_file, lines).unwrap();
    let out =
        c.qr.run(&["submit", "--eval-jobs", eval_file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // `?settle=MS` holds the page's load event (when Chromium dumps or screenshots) for MS of
    // real time while the page polls and receives events.
    let url = format!("http://127.0.0.1:{}/?settle=4000", c.http_port);
    let page = headless(&chrome, &url, &["--dump-dom".into()]);
    // Something happens while the page is open: a small build of its own.
    std::thread::sleep(Duration::from_millis(1500));
    let mut g2 = Gen::new();
    g2.system = qr::config::this_system();
    let quick = g2.add(Kind::Ca, "dash-quick", "echo q > $out", &[], &[]);
    let quick_file = c.qr.write_json("dash-quick.json", &g2.doc());
    let quick_build = c.submit(&[&quick_file], 60);
    // More small builds while the page is still open, so events reach it even when a loaded
    // machine starts Chromium late (each is a drv of its own; nothing waits for them).
    let mut page = page;
    for i in 0..20 {
        if page.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(700));
        let mut gi = Gen::new();
        gi.system = qr::config::this_system();
        gi.add(
            Kind::Ca,
            &format!("dash-more-{i}"),
            "echo m > $out",
            &[],
            &[],
        );
        let f = c.qr.write_json(&format!("dash-more-{i}.json"), &gi.doc());
        let out = c.qr.run(&["submit", f.to_str().expect("utf-8 path")], &[]);
        assert!(out.status.success(), "{out:?}");
    }
    let dom = output(page);
    // The tree: a step that resolved (awaiting its child) with the resolved child under it.
    assert!(
        dom.contains("awaiting_resolved"),
        "no resolved step in the tree:\n{dom}"
    );
    assert!(
        dom.contains("resolved-child"),
        "no resolved child in the tree:\n{dom}"
    );
    assert!(dom.contains(&format!("step:{}", b)) || dom.contains(&format!("step:{}", cc)));
    // The evaluations panel: one job, reused, its build still queued, one error line.
    assert!(dom.contains(r#"data-eval="1""#), "no evaluation:\n{dom}");
    assert!(
        dom.contains(r#"<td class="queued">1</td>"#),
        "the evaluation's queued count:\n{dom}"
    );
    // The event list filled after the page loaded (it starts empty).
    assert!(dom.contains("data-kind="), "no live events:\n{dom}");
    if let Ok(path) = std::env::var("QR_SCREENSHOT") {
        output(headless(&chrome, &url, &[format!("--screenshot={path}")]));
    }
    let (out, _) = c.finish(quick_build);
    assert!(out.status.success(), "{quick}: {}", c.serve_logs());
    let (out, builds) = c.finish(child);
    assert!(out.status.success(), "{}", c.serve_logs());
    assert_eq!(builds[0]["drvPath"], top);
    assert_eq!(builds[0]["status"], 0);
}
