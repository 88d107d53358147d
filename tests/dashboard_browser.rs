//! The dashboard in a real browser (Debian's headless `chromium`) against a real `qr serve` with
//! its local builder, over real HTTP:
//!
//! - the home page while a graph with CA steps builds: the supervision tree shows a step that
//!   resolved and its resolved child, the live event list fills from the server-sent events, the
//!   evaluations panel lists an evaluation (`qr submit --eval-jobs`) with its counts;
//! - the evaluation page of a `qr submit --eval-jobs` evaluation: each job's build with its status,
//!   new or reused, and the evaluation's error lines;
//! - the build page of a CA graph: the step tree with the resolved step's child nested under it
//!   and linked, and the live log tail of the running step growing through server-sent events;
//! - per-machine load over time (the local builder's busy slots, from the runner's samples);
//! - the supervision tree at 10,000 live actors: collapsed to its roots, and a search showing the
//!   one actor asked for with the path to it.
//!
//! Chromium dumps the DOM (or takes a screenshot) at the page's load event, which `?settle=MS`
//! holds back MS ms. Screenshots go to `$QR_SCREENSHOT_DIR` (`dashboard.png`,
//! `dashboard-build.png`, `dashboard-eval.png`, `dashboard-tree.png`) when it is set; the README
//! shows `docs/dashboard.png` and `docs/dashboard-build.png`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::instantiate::{Gen, Kind};
use common::qr::Backend;
use serde_json::Value;

/// One browser and one runner at a time (the machine is small; Chromium is heavy).
static SERIAL: Mutex<()> = Mutex::new(());

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

/// Chromium, or `None` (skipping) outside CI.
fn browser() -> Option<PathBuf> {
    let c = chromium();
    if c.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is not installed and CI is set"
        );
        eprintln!("skipping: no chromium");
    }
    c
}

/// The DOM of `url` at its load event.
fn dump(chrome: &PathBuf, url: &str) -> String {
    output(headless(chrome, url, &["--dump-dom".into()]))
}

/// A screenshot of `url` into `$QR_SCREENSHOT_DIR/name`, when that is set.
fn screenshot(chrome: &PathBuf, url: &str, name: &str) {
    if let Some(dir) = std::env::var_os("QR_SCREENSHOT_DIR") {
        let path = Path::new(&dir).join(name);
        output(headless(
            chrome,
            url,
            &[format!("--screenshot={}", path.display())],
        ));
        assert!(path.exists(), "no screenshot at {}", path.display());
    }
}

/// How often `needle` occurs in `hay`.
fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

/// The value of `attr="…"` on the first element carrying `marker` (an attribute or id).
fn attr(dom: &str, marker: &str, attr: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let tag_start = dom[..at].rfind('<')?;
    let tag_end = at + dom[at..].find('>')?;
    let tag = &dom[tag_start..tag_end];
    let key = format!("{attr}=\"");
    let v = tag.find(&key)? + key.len();
    Some(tag[v..].split('"').next()?.to_string())
}

fn get_json(c: &Cluster, path: &str) -> Value {
    let (code, _, body) = c.http_get(path);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Polls `f` every 100 ms until it gives a value, for at most `secs`.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What every test here starts with: the lock that runs them one at a time, the browser, and a
/// cluster on SQLite; `None` when the browser or the cluster is missing (each says why).
fn browser_and_cluster() -> Option<(std::sync::MutexGuard<'static, ()>, PathBuf, Cluster)> {
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let chrome = browser()?;
    let c = Cluster::new(Backend::Sqlite)?;
    Some((serial, chrome, c))
}

/// Writes `g`'s drvs into `dir` as a directory laid out as a store (`qr submit --from`).
fn write_store_dir(g: &Gen, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (p, d) in &g.drvs {
        let base = p.rsplit('/').next().unwrap();
        std::fs::write(dir.join(base), d.to_aterm()).unwrap();
    }
}

#[test]
fn dashboard_shows_a_resolved_step_and_live_events() {
    let Some((_serial, chrome, mut c)) = browser_and_cluster() else {
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
    screenshot(&chrome, &url, "dashboard.png");
    let (out, _) = c.finish(quick_build);
    assert!(out.status.success(), "{quick}: {}", c.serve_logs());
    let (out, builds) = c.finish(child);
    assert!(out.status.success(), "{}", c.serve_logs());
    assert_eq!(builds[0]["drvPath"], top);
    assert_eq!(builds[0]["status"], 0);
}

/// The highest `tick N` in `text`.
fn last_tick(text: &str) -> u32 {
    text.split("tick ")
        .skip(1)
        .filter_map(|r| {
            r.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .max()
        .unwrap_or(0)
}

/// The text of the element whose opening tag carries `marker` (up to the next `</`).
fn text_of<'a>(dom: &'a str, marker: &str) -> &'a str {
    let Some(at) = dom.find(marker) else {
        return "";
    };
    let rest = &dom[at..];
    let start = rest.find('>').map_or(rest.len(), |i| i + 1);
    let end = rest[start..].find("</").map_or(rest.len(), |i| start + i);
    &rest[start..end]
}

#[test]
fn evaluation_and_build_pages_with_a_live_log_and_machine_load() {
    let Some((_serial, chrome, mut c)) = browser_and_cluster() else {
        return;
    };
    c.serve_env = vec![
        ("QR_LOCAL_BUILDER_ENABLED".into(), "true".into()),
        ("QR_HTTP_HISTORY_INTERVAL_S".into(), "0.5".into()),
    ];
    c.start_serve();
    let sys = qr::config::this_system();
    // A job built before the evaluation: the evaluation reuses its build.
    let mut gq = Gen::new();
    gq.system = sys.clone();
    let quick = gq.add(Kind::Ca, "evp-quick", "echo q > $out", &[], &[]);
    let quick_file = c.qr.write_json("evp-quick.json", &gq.doc());
    let (out, builds) = c.finish(c.submit(&[&quick_file], 60));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(builds[0]["status"], 0);
    // The evaluation's own jobs: a CA step on a CA input (it resolves; its resolved drv prints
    // a line every 0.25 s for 30 s) and one that fails; plus a line that does not evaluate.
    let mut g = Gen::new();
    g.system = sys.clone();
    let a = g.add(Kind::Ca, "evp-a", "echo a > $out", &[], &[]);
    let slow_script = format!(
        "i=1; while [ $i -le 120 ]; do echo \"tick $i\"; i=$((i+1)); sleep 0.25; done; cat {} > $out",
        g.out(&a)
    );
    let slow = g.add(Kind::Ca, "evp-slow", &slow_script, &[], &[&a]);
    let fail = g.add(
        Kind::Ca,
        "evp-fail",
        "echo 'this one fails' >&2; exit 1",
        &[],
        &[],
    );
    let from = c.qr.state_dir().join("evp-from");
    write_store_dir(&g, &from);
    write_store_dir(&gq, &from);
    let line = |attr: &str, drv: &str| {
        serde_json::json!({"attr": attr, "attrPath": attr.split('.').collect::<Vec<_>>(), "drvPath": drv})
            .to_string()
    };
    let lines = format!(
        "{}\n{}\n{}\n{{\"attr\":\"evp.broken\",\"error\":\"error: evp is broken\"}}\n",
        line("evp.slow", &slow),
        line("evp.fail", &fail),
        line("evp.quick", &quick)
    );
    let eval_file = c.qr.state_dir().join("evp.jsonl");
    std::fs::write(&eval_file, lines).unwrap();
    let out = c.qr.run(
        &[
            "submit",
            "--eval-jobs",
            eval_file.to_str().unwrap(),
            "--from",
            from.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "the broken line: {out:?}");
    let evals = get_json(&c, "/api/evals");
    let eval_id = evals["evals"][0]["id"].as_i64().expect("an evaluation");
    let detail = get_json(&c, &format!("/api/evals/{eval_id}"));
    let job_build = |job: &str| -> i64 {
        detail["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["job"] == job)
            .and_then(|j| j["build"]["id"].as_i64())
            .unwrap_or_else(|| panic!("no job {job}: {detail}"))
    };
    let slow_build = job_build("evp.slow");
    // Wait until the slow drv has resolved and its resolved child runs and has logged a little.
    let (resolving, child) = wait_for(90, "the slow step resolves and runs", || {
        let t = get_json(&c, &format!("/api/builds/{slow_build}/tree"));
        let steps = t["steps"].as_array()?.clone();
        let from = steps
            .iter()
            .find(|s| s["resolved_to_step"].as_i64() > Some(0))?;
        let to = from["resolved_to_step"].as_i64()?;
        let child = steps.iter().find(|s| s["stepnr"].as_i64() == Some(to))?;
        (child["status"] == -1 && child["busy"].as_i64() != Some(0))
            .then(|| (from["stepnr"].as_i64().unwrap(), to))
    });
    let before = wait_for(30, "the child's log has lines", || {
        let (code, _, body) = c.http_get(&format!("/api/builds/{slow_build}/steps/{child}/log"));
        let v: Value = serde_json::from_str(&body).ok()?;
        let n = last_tick(v["text"].as_str()?);
        (code == 200 && n >= 2).then_some(n)
    });
    // The build page, open for 5 s.
    let build_url = format!(
        "http://127.0.0.1:{}/?settle=5000#/build/{slow_build}",
        c.http_port
    );
    let dom = dump(&chrome, &build_url);
    // The step tree: the resolved child nested under the step that resolved, and linked.
    let row = format!(r#"data-step="{child}""#);
    assert_eq!(
        attr(&dom, &row, "data-parent").as_deref(),
        Some(resolving.to_string().as_str()),
        "the resolved child is not under its parent:\n{dom}"
    );
    assert_eq!(attr(&dom, &row, "data-rel").as_deref(), Some("resolved"));
    assert!(
        dom.contains(&format!(
            r##"<a class="resolved-link" href="#/step/{slow_build}/{child}">→ step {child}</a>"##
        )),
        "no Resolved link to step {child}:\n{dom}"
    );
    // The live log: several server-sent events, and lines written after the page opened.
    let events: u32 = attr(&dom, r#"id="logtail""#, "data-events")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let shown = last_tick(text_of(&dom, r#"id="logtail""#));
    assert!(events >= 2, "the log tail got {events} events:\n{dom}");
    assert!(
        shown > before + 2,
        "the log tail did not grow past tick {before} (shows {shown}):\n{dom}"
    );
    assert_eq!(
        attr(&dom, r#"id="logtail""#, "data-step").as_deref(),
        Some(format!("{slow_build}/{child}").as_str())
    );
    screenshot(
        &chrome,
        &build_url.replace("settle=5000", "settle=3000"),
        "dashboard-build.png",
    );
    // The evaluation page, once the failing job has failed.
    let fail_build = job_build("evp.fail");
    wait_for(60, "the failing job fails", || {
        let b = get_json(&c, &format!("/api/builds/{fail_build}"));
        b["build"]["finished"].as_bool().filter(|f| *f)
    });
    let eval_url = format!(
        "http://127.0.0.1:{}/?settle=2500#/eval/{eval_id}",
        c.http_port
    );
    let dom = dump(&chrome, &eval_url);
    let job_attr = |job: &str, a: &str| attr(&dom, &format!(r#"data-job="{job}""#), a);
    assert_eq!(
        job_attr("evp.fail", "data-status").as_deref(),
        Some("Failed"),
        "{dom}"
    );
    assert_eq!(
        job_attr("evp.quick", "data-status").as_deref(),
        Some("Success"),
        "{dom}"
    );
    assert_eq!(
        job_attr("evp.quick", "data-build").as_deref(),
        Some(builds[0]["id"].to_string().as_str()),
        "the reused build is the earlier one"
    );
    let row_of = |job: &str| {
        let at = dom.find(&format!(r#"data-job="{job}""#)).unwrap_or(0);
        let end = dom[at..].find("</tr>").map_or(dom.len(), |e| at + e);
        dom[at..end].to_string()
    };
    assert!(
        row_of("evp.quick").contains(r#"class="reuse reused""#),
        "{dom}"
    );
    assert!(row_of("evp.fail").contains(r#"class="reuse new""#), "{dom}");
    assert!(row_of("evp.slow").contains(r#"class="reuse new""#), "{dom}");
    assert!(
        dom.contains("error: evp is broken"),
        "no error line:\n{dom}"
    );
    screenshot(&chrome, &eval_url, "dashboard-eval.png");
    // Per-machine load: the local builder was busy in the runner's samples.
    let load = get_json(&c, "/api/machines/history");
    let peak = load["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["peak_busy"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0);
    assert!(peak >= 1, "no machine was ever busy: {load}");
    let dom = dump(
        &chrome,
        &format!("http://127.0.0.1:{}/?settle=2500", c.http_port),
    );
    let drawn: usize = attr(&dom, r#"id="loadgraph""#, "data-machines")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let samples: usize = attr(&dom, r#"id="loadgraph""#, "data-samples")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        drawn >= 1 && samples >= 2,
        "load graph: {drawn} machines, {samples} samples:\n{dom}"
    );
    assert!(
        dom.contains(r#"data-peak="1""#) || dom.contains(r#"data-peak="2""#) || peak > 2,
        "the legend shows no busy peak:\n{dom}"
    );
    // Everything ends: the slow build succeeds.
    wait_for(120, "the slow build finishes", || {
        let b = get_json(&c, &format!("/api/builds/{slow_build}"));
        b["build"]["finished"].as_bool().filter(|f| *f)
    });
    let b = get_json(&c, &format!("/api/builds/{slow_build}"));
    assert_eq!(b["build"]["status"], 0, "{}", c.serve_logs());
    // The finished step's log followed whole, then again as a reconnect after byte 100 would.
    let path = format!("/api/builds/{slow_build}/steps/{child}/log/follow");
    let (text, last_id, end) = follow_sse(&c, &path, None);
    assert!(
        text.starts_with("tick 1\n") && text.contains("tick 120\n"),
        "{text}"
    );
    assert_eq!(last_id, Some(text.len() as u64));
    assert_eq!(end["reason"], "finished", "{end}");
    let (rest, _, _) = follow_sse(&c, &path, Some(100));
    assert_eq!(rest, text[100..]);
}

/// Reads the server-sent events of `path` until the server ends them: the `log` texts joined,
/// the last event id, and the `end` event's data.
fn follow_sse(c: &Cluster, path: &str, last_event_id: Option<u64>) -> (String, Option<u64>, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", c.http_port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let extra = last_event_id.map_or(String::new(), |i| format!("Last-Event-ID: {i}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("text/event-stream"),
        "{head}"
    );
    // Undo the chunked transfer encoding.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].strip_prefix("\r\n").expect("a chunk's end");
        }
        out
    } else {
        body.to_string()
    };
    let (mut text, mut id, mut end) = (String::new(), None, Value::Null);
    let mut kind = String::new();
    for line in body.lines() {
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}"));
            match kind.as_str() {
                "log" => text.push_str(v["text"].as_str().unwrap_or_default()),
                "end" => end = v,
                _ => {}
            }
        } else if let Some(i) = line.strip_prefix("id: ") {
            id = i.trim().parse().ok();
        }
    }
    (text, id, end)
}

#[test]
fn supervision_tree_at_10000_actors_is_collapsed_and_searchable() {
    let Some((_serial, chrome, mut c)) = browser_and_cluster() else {
        return;
    };
    // No machine: the steps stay live, waiting for one (and are not given up on meanwhile).
    c.serve_env = vec![("QR_SCHEDULER_UNSUPPORTED_WAIT_S".into(), "100000".into())];
    let mut g = Gen::new();
    let leaves: Vec<String> = (0..10_000)
        .map(|i| {
            g.add(
                Kind::Ca,
                &format!("wide-{i}"),
                &format!("echo {i} > $out"),
                &[],
                &[],
            )
        })
        .collect();
    let refs: Vec<&str> = leaves.iter().map(String::as_str).collect();
    let top = g.add(Kind::Ca, "wide-top", "echo top > $out", &[], &refs);
    let file = c.qr.write_json("wide.json", &g.doc());
    c.start_serve();
    let out = c.qr.run(&["submit", file.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{out:?}");
    let total = wait_for(180, "10,000 step actors", || {
        let t = get_json(&c, "/api/actors/tree");
        let n = t["total"].as_u64()?;
        (n >= 10_002).then_some(n)
    });
    // Collapsed: the roots only (queue monitor, dispatcher), with what is below them counted.
    let home = format!("http://127.0.0.1:{}/?settle=3000", c.http_port);
    let dom = dump(&chrome, &home);
    let shown_total: u64 = attr(&dom, r#"id="treetotal""#, "data-total")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        shown_total >= total,
        "the page counts {shown_total} actors:\n{dom}"
    );
    assert_eq!(
        attr(&dom, r#"id="tree""#, "data-auto-open").as_deref(),
        Some("false")
    );
    let rows = count(&dom, "<li data-actor=");
    assert!(
        (1..=5).contains(&rows),
        "{rows} rows at {total} actors (collapsed: the roots):\n{}",
        &dom[..dom.len().min(20_000)]
    );
    assert!(
        !dom.contains("wide-42.drv"),
        "a leaf is shown while collapsed"
    );
    // Search: one leaf among 10,000, with its path open (queue monitor → build → top → leaf).
    let leaf = &leaves[4242];
    let name = leaf.rsplit('/').next().unwrap();
    let search = format!("{home}#/?q={name}");
    let dom = dump(&chrome, &search);
    assert_eq!(
        attr(&dom, r#"id="treematches""#, "data-matches").as_deref(),
        Some("1"),
        "{dom}"
    );
    let hit = format!(r#"data-actor="step:{leaf}""#);
    assert!(dom.contains(&hit), "the match is not shown:\n{dom}");
    let at = dom.find(&hit).unwrap();
    assert!(dom[at..].contains(r#"class="node match""#));
    assert!(
        dom.contains(&format!(r#"data-actor="step:{top}""#)),
        "its parent is not shown"
    );
    let rows = count(&dom, "<li data-actor=");
    assert!((3..=6).contains(&rows), "{rows} rows for one match:\n{dom}");
    screenshot(&chrome, &search, "dashboard-tree.png");
}

/// Dynamic derivations: the build page nests each produced drv's step under the step whose
/// output holds it (`producedsteps`, edge `rel: "produced"`), two levels deep in
/// `examples/dynamic.json`.
#[test]
fn build_page_nests_produced_steps_under_their_producer() {
    let Some((_serial, chrome, mut c)) = browser_and_cluster() else {
        return;
    };
    c.serve_env = vec![("QR_LOCAL_BUILDER_ENABLED".into(), "true".into())];
    c.start_serve();
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/dynamic.json");
    let (out, builds) = c.finish(c.submit(&[&file], 120));
    assert!(out.status.success(), "{out:?}");
    let id = builds[0]["id"].as_i64().expect("a build id");
    let t = get_json(&c, &format!("/api/builds/{id}/tree"));
    let name_of = |nr: &Value| -> String {
        let s = t["steps"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["stepnr"] == *nr))
            .unwrap_or_else(|| panic!("no step {nr}: {t}"));
        let p = s["drv_path"].as_str().unwrap_or_default();
        p.rsplit('/').next().unwrap_or_default()[33..].to_string()
    };
    let produced: Vec<(i64, i64, String, String)> = t["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .filter(|e| e["rel"] == "produced")
        .map(|e| {
            let (from, to) = (e["from"].as_i64().unwrap(), e["to"].as_i64().unwrap());
            (from, to, name_of(&e["from"]), name_of(&e["to"]))
        })
        .collect();
    let names: Vec<(&str, &str)> = produced
        .iter()
        .map(|(_, _, f, t)| (f.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("dyn-leaf.drv.drv.drv", "dyn-leaf.drv.drv"),
            ("dyn-leaf.drv.drv", "dyn-leaf.drv")
        ],
        "{t}"
    );
    let dom = dump(
        &chrome,
        &format!("http://127.0.0.1:{}/?settle=2000#/build/{id}", c.http_port),
    );
    for (from, to, _, _) in &produced {
        let row = format!(r#"data-step="{to}""#);
        assert_eq!(
            attr(&dom, &row, "data-parent").as_deref(),
            Some(from.to_string().as_str()),
            "step {to} is not under its producer {from}:\n{dom}"
        );
        assert_eq!(attr(&dom, &row, "data-rel").as_deref(), Some("produced"));
    }
    assert_eq!(count(&dom, "⤷ produced"), 2, "{dom}");
}
