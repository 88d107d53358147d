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
        ]
        .into_iter()
        .find(|f| types.contains_key(*f))
        .ok_or_else(|| at("sample without a TYPE"))?;
        if family != name && types[family] != "summary" && types[family] != "histogram" {
            return Err(at("_sum/_count on a non-summary"));
        }
        if out.insert(series.to_string(), v).is_some() {
            return Err(at("duplicate series"));
        }
    }
    Ok(out)
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
}

fn metrics_and_status(backend: Backend) {
    let Some(mut c) = Cluster::new(backend) else {
        return;
    };
    c.serve_env = vec![("QR_LOCAL_BUILDER_ENABLED".into(), "true".into())];
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
    let after = parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
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
    assert_eq!(c.http_get("/api/machines").0, 200);

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
