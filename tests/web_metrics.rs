//! The HTTP side of `qr serve`: `/metrics` parses as the Prometheus text format (a strict parser
//! below) and its counters move as a build with a CA step runs; `/status` is JSON; the dashboard
//! page and its JSON endpoints answer; the event stream (server-sent events) delivers events.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use common::cluster::Cluster;
use common::instantiate::{Gen, Kind};
use common::qr::Backend;

/// Parses the Prometheus text exposition format strictly: every sample belongs to a family whose
/// `# TYPE` came first (summaries may add `_sum`/`_count`), names and labels are well-formed,
/// values are floats. Returns samples keyed by `name{labels}`.
fn parse_prometheus(text: &str) -> Result<BTreeMap<String, f64>, String> {
    parse_families(text).map(|(samples, _, _)| samples)
}

/// [`parse_prometheus`], and also: every family has both its `# HELP` and its `# TYPE`, and every
/// series of every histogram is consistent ([`histogram`]). Returns the samples and the families
/// (name → type).
fn parse_page(text: &str) -> Result<Page, String> {
    let (out, types, helped) = parse_families(text)?;
    let typed: BTreeSet<String> = types.keys().cloned().collect();
    if typed != helped {
        return Err(format!(
            "HELP without TYPE or TYPE without HELP: {:?}",
            typed.symmetric_difference(&helped).collect::<Vec<_>>()
        ));
    }
    for (name, t) in &types {
        if t != "histogram" {
            continue;
        }
        let count = format!("{name}_count");
        for series in out.keys() {
            let labels = match series.strip_prefix(&count) {
                Some("") => "",
                Some(l) => match l.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
                    Some(l) => l,
                    None => continue,
                },
                None => continue,
            };
            histogram(&out, name, labels)?;
        }
    }
    Ok((out, types))
}

/// The samples and the families (name → type).
type Page = (BTreeMap<String, f64>, BTreeMap<String, String>);

/// The samples, the families' types and the families with a HELP.
type Parsed = (
    BTreeMap<String, f64>,
    BTreeMap<String, String>,
    BTreeSet<String>,
);

fn parse_families(text: &str) -> Result<Parsed, String> {
    fn name_ok(n: &str) -> bool {
        let mut c = n.chars();
        matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: BTreeSet<String> = BTreeSet::new();
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(n), Some(_)) if name_ok(n) => {
                    if !helped.insert(n.to_string()) {
                        return Err(at("second HELP"));
                    }
                }
                (Some("TYPE"), Some(n), Some(t)) if name_ok(n) => {
                    if !["counter", "gauge", "summary", "histogram", "untyped"].contains(&t) {
                        return Err(at("unknown type"));
                    }
                    if types.insert(n.to_string(), t.to_string()).is_some() {
                        return Err(at("second TYPE"));
                    }
                }
                _ => return Err(at("malformed comment")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| at("bad value"))?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (
                n,
                Some(l.strip_suffix('}').ok_or_else(|| at("unclosed labels"))?),
            ),
            None => (series, None),
        };
        if !name_ok(name) {
            return Err(at("bad metric name"));
        }
        if let Some(l) = labels {
            // k="v" pairs with escapes \\ \" \n
            let mut rest = l;
            while !rest.is_empty() {
                let (k, after) = rest.split_once("=\"").ok_or_else(|| at("bad label"))?;
                if !name_ok(k) {
                    return Err(at("bad label name"));
                }
                let mut chars = after.char_indices();
                let mut end = None;
                while let Some((j, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some((_, '\\' | '"' | 'n')) => {}
                            _ => return Err(at("bad escape")),
                        },
                        '"' => {
                            end = Some(j);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end.ok_or_else(|| at("unterminated label value"))?;
                rest = &after[end + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
        }
        let family = [
            name,
            name.trim_end_matches("_sum"),
            name.trim_end_matches("_count"),
            name.trim_end_matches("_bucket"),
        ]
        .into_iter()
        .find(|f| types.contains_key(*f))
        .ok_or_else(|| at("sample without a TYPE"))?;
        if family != name && types[family] != "summary" && types[family] != "histogram" {
            return Err(at("_sum/_count on a non-summary"));
        }
        if name.ends_with("_bucket") && family != name {
            if types[family] != "histogram" {
                return Err(at("_bucket on a non-histogram"));
            }
            if !labels.is_some_and(|l| l.contains("le=\"")) {
                return Err(at("a bucket without le"));
            }
        }
        if types[family] == "histogram" && family == name {
            return Err(at("a histogram sample without _bucket/_sum/_count"));
        }
        if out.insert(series.to_string(), v).is_some() {
            return Err(at("duplicate series"));
        }
    }
    Ok((out, types, helped))
}

#[test]
fn the_parser_is_strict() {
    assert!(parse_prometheus("# TYPE a counter\na 1\n").is_ok());
    assert!(parse_prometheus("a 1\n").is_err());
    assert!(parse_prometheus("# TYPE a gauge\na{x=\"1\"} 2\na{x=\"2\"} 3\n").is_ok());
    assert!(parse_prometheus("# TYPE a gauge\na{x=1} 2\n").is_err());
    assert!(parse_prometheus("# TYPE a gauge\na one\n").is_err());
    assert!(parse_prometheus("# TYPE a gauge\na_sum 1\n").is_err());
    assert!(parse_prometheus("# TYPE a summary\na_sum 1\na_count 2\n").is_ok());
    let h = "# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";
    let parsed = parse_prometheus(h).unwrap();
    assert_eq!(histogram(&parsed, "h", "").unwrap(), (2.0, 0.3));
    assert!(parse_prometheus("# TYPE a summary\na_bucket{le=\"1\"} 1\n").is_err());
    assert!(parse_prometheus("# TYPE h histogram\nh 1\n").is_err());
    assert!(parse_prometheus("# TYPE h histogram\nh_bucket 1\n").is_err());
    let bad =
        "# TYPE h histogram\nh_bucket{le=\"0.1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 0\nh_count 2\n";
    assert!(histogram(&parse_prometheus(bad).unwrap(), "h", "").is_err());
    let bad = "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0\nh_count 3\n";
    assert!(histogram(&parse_prometheus(bad).unwrap(), "h", "").is_err());
    // The page checks: HELP and TYPE both, histograms consistent.
    assert!(parse_page("# HELP a A.\n# TYPE a counter\na 1\n").is_ok());
    assert!(parse_page("# TYPE a counter\na 1\n").is_err());
    assert!(parse_page("# HELP a A.\n# TYPE a counter\n# HELP b B.\n").is_err());
    let h = "# HELP h H.\n# TYPE h histogram\nh_bucket{k=\"x\",le=\"+Inf\"} 2\nh_sum{k=\"x\"} 1\nh_count{k=\"x\"} 3\n";
    assert!(parse_prometheus(h).is_ok());
    assert!(parse_page(h).is_err(), "+Inf bucket is not the count");
}

/// Checks one series of histogram `name` (its labels besides `le`, e.g. `kind="write"`, given as
/// `labels`): buckets sorted by `le` with non-decreasing counts, a `+Inf` bucket equal to `_count`.
/// Returns (count, sum).
fn histogram(
    samples: &BTreeMap<String, f64>,
    name: &str,
    labels: &str,
) -> Result<(f64, f64), String> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for (series, v) in samples {
        let Some(rest) = series.strip_prefix(&prefix) else {
            continue;
        };
        let inner = rest.strip_suffix('}').ok_or("unclosed")?;
        let mut le = None;
        let mut others = Vec::new();
        for kv in inner.split(',') {
            match kv.strip_prefix("le=\"") {
                Some(x) => le = Some(x.trim_end_matches('"').to_string()),
                None => others.push(kv),
            }
        }
        if others.join(",") != labels {
            continue;
        }
        let le = le.ok_or("no le")?;
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().map_err(|_| format!("bad le {le}"))?
        };
        buckets.push((le, *v));
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if buckets.last().map(|b| b.0) != Some(f64::INFINITY) {
        return Err(format!("{name}{{{labels}}}: no +Inf bucket: {buckets:?}"));
    }
    if buckets.windows(2).any(|w| w[0].1 > w[1].1) {
        return Err(format!(
            "{name}{{{labels}}}: buckets not cumulative: {buckets:?}"
        ));
    }
    let key = |suffix: &str| {
        if labels.is_empty() {
            format!("{name}_{suffix}")
        } else {
            format!("{name}_{suffix}{{{labels}}}")
        }
    };
    let count = *samples.get(&key("count")).ok_or("no _count")?;
    let sum = *samples.get(&key("sum")).ok_or("no _sum")?;
    if buckets.last().map(|b| b.1) != Some(count) {
        return Err(format!(
            "{name}{{{labels}}}: +Inf bucket is not _count ({count})"
        ));
    }
    Ok((count, sum))
}

fn metrics_and_status(backend: Backend) {
    let Some(mut c) = Cluster::new(backend) else {
        return;
    };
    c.serve_env = vec![
        ("QR_LOCAL_BUILDER_ENABLED".into(), "true".into()),
        ("QR_HTTP_HISTORY_INTERVAL_S".into(), "0.2".into()),
    ];
    let mut g = Gen::new();
    g.system = qr::config::this_system();
    let a = g.add(Kind::Ca, "web-a", "sleep 1; echo a > $out", &[], &[]);
    let script = format!("cat {} > $out; echo b >> $out", g.out(&a));
    let b = g.add(Kind::Ca, "web-b", &script, &[], &[&a]);
    let file = c.qr.write_json("web-graph.json", &g.doc());
    c.start_serve();

    let (code, ctype, body) = c.http_get("/metrics");
    assert_eq!(code, 200, "{body}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let before = parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    for k in [
        "qr_builds_finished_total",
        "qr_steps_built_total",
        "qr_resolutions_total",
        "qr_runnable_steps",
        "qr_dispatch_latency_seconds_count",
        "qr_build_duration_seconds_count",
        "qr_actor_restarts_total",
        "qr_machine_slots{machine=\"localhost\"}",
    ] {
        assert!(before.contains_key(k), "no {k} in\n{body}");
    }

    // The event stream, read on a thread while the build runs.
    let port = c.http_port;
    let sse = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(s, "GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let mut head = String::new();
        let mut seen = Vec::new();
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if head.len() < 2000 {
                head.push_str(&line);
            }
            if line.starts_with("data: ") && line.contains("\"kind\"") {
                seen.push(line.clone());
                if line.contains("build_finished") {
                    break;
                }
            }
            line.clear();
        }
        (head, seen)
    });
    std::thread::sleep(Duration::from_millis(500));

    let child = c.submit(&[&file], 120);
    let (out, builds) = c.finish(child);
    assert!(out.status.success(), "{}", c.serve_logs());
    assert_eq!(builds[0]["status"], 0);

    let (_, _, body) = c.http_get("/metrics");
    let (after, families) = parse_page(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert!(families.len() >= 80, "{} families:\n{body}", families.len());
    let moved = |k: &str, by: f64| {
        assert!(
            after[k] >= before[k] + by,
            "{k}: {} -> {}",
            before[k],
            after[k]
        );
    };
    moved("qr_builds_finished_total", 1.0);
    moved("qr_steps_built_total", 2.0);
    moved("qr_resolutions_total", 1.0);
    moved("qr_dispatch_latency_seconds_count", 2.0);
    moved("qr_build_duration_seconds_count", 1.0);
    moved("qr_steps_created_total", 2.0);
    moved("qr_db_write_transactions_total", 3.0);
    moved("qr_executor_runs_total", 2.0);
    // The runner's own bookkeeping held: no gauge went below 0, no write was lost, no drv ran
    // twice.
    for k in [
        "qr_gauge_underflows_total",
        "qr_db_write_failures_total",
        "qr_executor_reruns_total",
    ] {
        assert_eq!(after.get(k), Some(&0.0), "{k} in\n{body}");
    }
    // Transaction latency: a histogram per kind whose counts moved with the build's writes.
    let be = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    for kind in ["read", "write"] {
        let labels = format!("backend=\"{be}\",kind=\"{kind}\"");
        let (n0, _) = histogram(&before, "qr_db_transaction_seconds", &labels)
            .unwrap_or_else(|e| panic!("{e}\n{body}"));
        let (n1, sum) = histogram(&after, "qr_db_transaction_seconds", &labels)
            .unwrap_or_else(|e| panic!("{e}\n{body}"));
        assert!(n1 > n0, "{kind} transactions: {n0} -> {n1}");
        assert!(sum > 0.0 && sum < n1 * 30.0, "{kind}: sum {sum} for {n1}");
    }

    let (code, ctype, body) = c.http_get("/status");
    assert_eq!((code, ctype.as_str()), (200, "application/json"));
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(st["resolutions"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["machines"], 1);

    let (code, ctype, body) = c.http_get("/");
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/html") && body.contains("supervision"));
    let (_, _, body) = c.http_get("/api/builds");
    let bs: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = bs["builds"][0]["id"].as_i64().unwrap();
    assert_eq!(bs["builds"][0]["drv_path"], b);
    let (code, _, body) = c.http_get(&format!("/api/builds/{id}"));
    assert_eq!(code, 200);
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    let resolved = d["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["status"] == 13)
        .expect("a Resolved step")
        .clone();
    let (code, _, body) = c.http_get(&format!("/api/builds/{id}/steps/{}", resolved["stepnr"]));
    assert_eq!(code, 200);
    let sd: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sd["resolved_chain"].as_array().unwrap().len(), 2);
    assert_eq!(c.http_get("/api/builds/99999").0, 404);
    // Finished steps' logs are kept gzip-compressed (a few seconds after the step ends).
    let logs = c.qr.state_dir().join("logs");
    let t = std::time::Instant::now();
    loop {
        let names: Vec<String> = std::fs::read_dir(&logs)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let gz = names.iter().filter(|n| n.ends_with(".log.gz")).count();
        let plain = names.iter().filter(|n| n.ends_with(".log")).count();
        if gz >= 2 && plain == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "logs not compressed: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let child_nr = resolved["resolved_to_step"].as_i64().unwrap();
    let (code, _, body) = c.http_get(&format!("/api/builds/{id}/steps/{child_nr}/log"));
    assert_eq!(code, 200, "{body}");
    let (code, _, _) = c.http_get(&format!(
        "/api/builds/{id}/steps/{}/log",
        resolved["stepnr"]
    ));
    assert_eq!(code, 404);
    assert_eq!(c.http_get("/api/actors").0, 200);
    let (code, _, body) = c.http_get("/api/machines");
    assert_eq!(code, 200);
    let ms: serde_json::Value = serde_json::from_str(&body).unwrap();
    let local = &ms["machines"][0];
    assert_eq!(
        (&local["id"], &local["local"]),
        (&"localhost".into(), &true.into())
    );
    assert!(local["last_heartbeat_ms"].as_i64().unwrap() > 0, "{local}");
    assert!(after.contains_key("qr_machine_heartbeat_age_seconds{machine=\"localhost\"}"));
    assert_eq!(after["qr_database_up"], 1.0);

    // The runner's history (sampled every 0.2 s here): the build's steps in it, in time order.
    let (code, ctype, body) = c.http_get("/api/history");
    assert_eq!((code, ctype.as_str()), (200, "application/json"), "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["interval_s"], 0.2);
    assert_eq!(h["window_s"], 900.0);
    let samples = h["samples"].as_array().unwrap();
    assert!(samples.len() >= 5, "{h}");
    let ts: Vec<i64> = samples
        .iter()
        .map(|x| x["t_ms"].as_i64().unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "{ts:?}");
    let sum = |k: &str| samples.iter().map(|x| x[k].as_u64().unwrap()).sum::<u64>();
    assert!(sum("built") >= 2 && sum("finished") >= 1, "{h}");
    assert!(
        samples.iter().any(|x| x["running"].as_u64().unwrap() >= 1),
        "no sample saw a step running: {h}"
    );
    // Only what came after a time.
    let last = ts[ts.len() - 1];
    let (_, _, body) = c.http_get(&format!("/api/history?after_ms={}", ts[ts.len() - 2]));
    let tail: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        tail["samples"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["t_ms"].as_i64().unwrap() >= last),
        "{tail}"
    );

    let (head, seen) = sse.join().unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    assert!(seen.iter().any(|l| l.contains("step_resolved")), "{seen:?}");
    assert!(
        seen.iter().any(|l| l.contains("build_finished")),
        "{seen:?}"
    );
}

#[test]
fn metrics_and_status_on_sqlite() {
    metrics_and_status(Backend::Sqlite);
}

#[test]
fn metrics_and_status_on_postgres() {
    metrics_and_status(Backend::Postgres);
}

/// The Hydra-grade families after a real run: a CA graph built on a remote builder over gRPC, an
/// evaluation with an error line, binary cache requests (a hit, a miss). The page parses
/// strictly with at least 80 families, and the new families moved where the things happened.
fn hydra_grade_metrics(backend: Backend) {
    let Some(mut c) = Cluster::new(backend) else {
        return;
    };
    let system = qr::config::this_system();
    let mut g = Gen::new();
    g.system = system.clone();
    let a = g.add(Kind::Ca, "hm-a", "sleep 2; echo a > $out", &[], &[]);
    let script = format!("cat {} > $out; echo b >> $out", g.out(&a));
    let b = g.add(Kind::Ca, "hm-b", &script, &[], &[&a]);
    let file = c.qr.write_json("hm-graph.json", &g.doc());
    c.start_serve();
    let builder = c.builder("b1", &[], &[]);
    assert!(
        c.wait_joined("b1", 1, Duration::from_secs(30)),
        "{}",
        c.logs(&[&builder])
    );
    let scrape = |c: &Cluster| {
        let (code, _, body) = c.http_get("/metrics");
        assert_eq!(code, 200, "{body}");
        let (samples, families) = parse_page(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        (samples, families, body)
    };
    let (before, families, body) = scrape(&c);
    assert!(families.len() >= 80, "{} families:\n{body}", families.len());

    // While `a` builds: the steps by machine type and state, and the machine busy.
    let child = c.submit(&[&file], 120);
    let building =
        format!("qr_steps_by_machine_type{{machine_type=\"{system}\",state=\"building\"}}");
    let t = std::time::Instant::now();
    let mut seen_building = false;
    while t.elapsed() < Duration::from_secs(60) && !seen_building {
        let (s, _, _) = scrape(&c);
        seen_building = s.get(&building).is_some_and(|v| *v >= 1.0)
            && s.get("qr_machine_running_jobs{machine=\"b1\"}") == Some(&1.0)
            && s.get("qr_machine_idle_since_timestamp_seconds{machine=\"b1\"}") == Some(&0.0);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(seen_building, "never saw {building} with b1 busy");
    let (out, builds) = c.finish(child);
    assert!(out.status.success(), "{}", c.logs(&[&builder]));
    assert_eq!(builds[0]["status"], 0, "{builds:?}");
    let out_path = builds[0]["outputs"]["out"]
        .as_str()
        .expect("b's output")
        .to_string();

    // An evaluation: b's job (joins the existing build) and a line that queued nothing.
    let lines = format!(
        "{}\n{}\n",
        serde_json::json!({"attr": "hm-b", "attrPath": ["hm-b"], "drvPath": b, "name": "hm-b",
            "outputs": {"out": null}, "system": system}),
        serde_json::json!({"attr": "broken", "attrPath": ["broken"], "error": "boom"}),
    );
    let evals = c.qr.state_dir().join("hm-evals.jsonl");
    std::fs::write(&evals, lines).unwrap();
    let mut cmd = c.qr.command();
    cmd.args(["submit", "--eval-jobs"]).arg(&evals);
    let o = cmd.output().expect("qr submit --eval-jobs");
    assert_eq!(o.status.code(), Some(1), "an error line: exit 1\n{o:?}");

    // The binary cache: its info, b's narinfo (a hit), a narinfo it does not have (a miss).
    let hash = out_path
        .strip_prefix("/nix/store/")
        .and_then(|p| p.split('-').next())
        .expect("a store path");
    assert_eq!(c.http_get("/nix-cache-info").0, 200);
    let (code, _, narinfo) = c.http_get(&format!("/{hash}.narinfo"));
    assert_eq!(code, 200, "{narinfo}");
    assert_eq!(
        c.http_get("/00000000000000000000000000000000.narinfo").0,
        404
    );

    let (after, families, body) = scrape(&c);
    assert!(families.len() >= 80, "{} families", families.len());
    eprintln!(
        "/metrics: {} families, {} series",
        families.len(),
        after.len()
    );
    let get = |k: &str| -> f64 { *after.get(k).unwrap_or_else(|| panic!("no {k} in\n{body}")) };
    let grew = |k: &str, by: f64| {
        let was = before.get(k).copied().unwrap_or(0.0);
        assert!(get(k) >= was + by, "{k}: {was} -> {}\n{body}", get(k));
    };
    // Per machine: jobs, no failures, busy time (a sleeps 2 s), bytes both ways.
    let m = |f: &str| format!("{f}{{machine=\"b1\"}}");
    grew(&m("qr_machine_jobs_started_total"), 2.0);
    grew(&m("qr_machine_steps_done_total"), 2.0);
    assert_eq!(get(&m("qr_machine_step_failures_total")), 0.0);
    assert_eq!(get(&m("qr_machine_consecutive_failures")), 0.0);
    assert_eq!(get(&m("qr_machine_running_jobs")), 0.0);
    assert!(get(&m("qr_machine_busy_seconds_total")) >= 2.0, "{body}");
    assert!(
        get("qr_machine_phase_seconds_total{machine=\"b1\",phase=\"building\"}") >= 2.0,
        "{body}"
    );
    grew(&m("qr_machine_nars_received_total"), 2.0);
    grew(&m("qr_machine_nar_bytes_received_total"), 1.0);
    grew(&m("qr_machine_nars_sent_total"), 1.0);
    grew(&m("qr_machine_nar_bytes_sent_total"), 1.0);
    assert!(get(&m("qr_machine_sessions_total")) >= 1.0);
    assert!(get(&m("qr_machine_idle_since_timestamp_seconds")) > 0.0);
    assert!(get(&m("qr_machine_last_heartbeat_timestamp_seconds")) > 0.0);
    // Transfers in flight are given back.
    assert_eq!(get("qr_steps_copying_to"), 0.0);
    assert_eq!(get("qr_steps_copying_from"), 0.0);
    // Phases and waits as histograms.
    let count = |name: &str, labels: &str| -> f64 {
        histogram(&after, name, labels)
            .unwrap_or_else(|e| panic!("{e}\n{body}"))
            .0
    };
    assert!(count("qr_step_phase_seconds", "phase=\"total\"") >= 2.0);
    assert!(count("qr_step_phase_seconds", "phase=\"building\"") >= 2.0);
    assert!(count("qr_step_phase_seconds", "phase=\"receiving_outputs\"") >= 2.0);
    let mt = format!("machine_type=\"{system}\"");
    assert!(count("qr_job_wait_seconds", &mt) >= 2.0);
    assert!(count("qr_step_critical_path_seconds", &mt) >= 2.0);
    assert!(count("qr_step_input_drvs", &mt) >= 2.0);
    assert!(count("qr_step_input_closure_bytes", &mt) >= 2.0);
    // Steps, resolutions, builds.
    grew("qr_steps_started_total", 2.0);
    grew("qr_steps_finished_total{status=\"success\"}", 2.0);
    grew("qr_resolutions_total", 1.0);
    assert_eq!(
        get("qr_dynamic_steps_total"),
        0.0,
        "no dynamic derivation in this graph"
    );
    grew("qr_builds_succeeded_total", 1.0);
    grew(
        "qr_builds_finished_by_status_total{status=\"success\"}",
        1.0,
    );
    assert_eq!(get("qr_builds_failed_total"), 0.0);
    // The queue monitor and the dispatcher.
    grew("qr_queue_checks_finished_total", 1.0);
    grew("qr_queue_builds_read_total", 1.0);
    grew("qr_queue_builds_loaded_total", 1.0);
    grew("qr_dispatcher_wakeups_total", 2.0);
    assert!(get("qr_dispatcher_busy_seconds_total") > 0.0);
    // The binary cache.
    grew(
        "qr_cache_requests_total{kind=\"cache_info\",result=\"hit\"}",
        1.0,
    );
    grew(
        "qr_cache_requests_total{kind=\"narinfo\",result=\"hit\"}",
        1.0,
    );
    grew(
        "qr_cache_requests_total{kind=\"narinfo\",result=\"miss\"}",
        1.0,
    );
    grew(
        "qr_cache_response_bytes_total{kind=\"narinfo\"}",
        narinfo.len() as f64,
    );
    let ratio = get("qr_cache_narinfo_hit_ratio");
    assert!(ratio > 0.0 && ratio < 1.0, "{ratio}");
    // Evaluations.
    grew("qr_evaluations_total", 1.0);
    grew("qr_evaluation_errors_total", 1.0);
    grew("qr_evaluation_jobs_total", 1.0);
    // The database: latency and the pool.
    let be = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert!(
        count(
            "qr_db_transaction_seconds",
            &format!("backend=\"{be}\",kind=\"write\"")
        ) > 0.0
    );
    assert!(get("qr_db_pool_max_connections") >= 1.0);
    let sat = get("qr_db_pool_saturation_ratio");
    assert!((0.0..=1.0).contains(&sat), "{sat}");
    assert!(
        get("qr_db_pool_connections{state=\"idle\"}")
            + get("qr_db_pool_connections{state=\"in_use\"}")
            >= 1.0
    );
    assert_eq!(
        get(&format!(
            "qr_db_operation_failures_total{{backend=\"{be}\",kind=\"write\"}}"
        )),
        0.0
    );
}

#[test]
fn hydra_grade_metrics_on_sqlite() {
    hydra_grade_metrics(Backend::Sqlite);
}

#[test]
fn hydra_grade_metrics_on_postgres() {
    hydra_grade_metrics(Backend::Postgres);
}
