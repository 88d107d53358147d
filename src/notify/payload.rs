//! The bodies: from an outbox row (the facts its write recorded), the build it names (jobset,
//! job, drv and system, which never change) and the job's `meta.repo`/`rev`. Only what cannot
//! change goes in, so every redelivery of a row sends the same bytes.

use serde_json::{Value, json};

use super::config::{Format, Webhook};
use crate::db::types::{Build, BuildStatus};
use crate::db::{EventKind, OutboxRow};

/// What a row becomes for a webhook.
#[derive(Debug, Clone, PartialEq)]
pub enum Rendered {
    /// POST `body` to `url`.
    Send { url: String, body: Vec<u8> },
    /// Nothing to send (and why): the row is marked delivered with the reason.
    Skip(String),
}

/// What the row names, read at delivery.
#[derive(Debug, Clone, Default)]
pub struct Context<'a> {
    pub build: Option<&'a Build>,
    /// The job's `meta.repo` and `meta.rev`.
    pub repo_rev: Option<(&'a str, &'a str)>,
}

/// `row` for `wh`.
pub fn render(wh: &Webhook, row: &OutboxRow, cx: &Context<'_>) -> Rendered {
    match wh.format {
        Format::Qr => Rendered::Send {
            url: wh.url.clone(),
            body: qr_body(row, cx).to_string().into_bytes(),
        },
        Format::GithubStatus => github_status(wh, row, cx),
    }
}

fn build_json(b: &Build, cx: &Context<'_>) -> Value {
    let mut v = json!({
        "id": b.id.0,
        "jobset": b.jobset,
        "job": b.job,
        "drvPath": b.drv_path,
        "system": b.system,
    });
    if let (Some((repo, rev)), Some(o)) = (cx.repo_rev, v.as_object_mut()) {
        o.insert("repo".into(), json!(repo));
        o.insert("rev".into(), json!(rev));
    }
    v
}

/// qr's event: `{event, delivery, created, build | eval, …}`.
pub fn qr_body(row: &OutboxRow, cx: &Context<'_>) -> Value {
    let p = &row.payload;
    let mut v = json!({
        "event": row.kind.as_str(),
        "delivery": row.key,
        "created": row.created,
    });
    let Some(o) = v.as_object_mut() else {
        return v;
    };
    match row.kind {
        EventKind::BuildStarted | EventKind::BuildFinished => {
            let mut b = match cx.build {
                Some(b) => build_json(b, cx),
                None => json!({"id": p.get("build")}),
            };
            if let Some(bo) = b.as_object_mut() {
                for k in ["status", "statusName", "startTime", "stopTime", "isCached"] {
                    if let Some(x) = p.get(k) {
                        bo.insert(k.into(), x.clone());
                    }
                }
            }
            o.insert("build".into(), b);
            if row.kind == EventKind::BuildStarted {
                o.insert(
                    "step".into(),
                    json!({"nr": p.get("step"), "machine": p.get("machine"), "time": p.get("time")}),
                );
            }
        }
        EventKind::EvalCompleted => {
            o.insert("eval".into(), p.clone());
        }
    }
    v
}

/// GitHub's commit status state for a finished build.
fn state_of(status: Option<BuildStatus>) -> &'static str {
    match status {
        Some(BuildStatus::Success) => "success",
        Some(BuildStatus::Cancelled | BuildStatus::Aborted) => "error",
        Some(_) => "failure",
        None => "pending",
    }
}

fn github_status(wh: &Webhook, row: &OutboxRow, cx: &Context<'_>) -> Rendered {
    let Some(b) = cx.build else {
        return Rendered::Skip("the build is gone".into());
    };
    let Some((repo, rev)) = cx.repo_rev else {
        return Rendered::Skip("the job carries no meta.repo/meta.rev".into());
    };
    let p = &row.payload;
    let (state, description) = match row.kind {
        EventKind::BuildStarted => (
            "pending",
            format!(
                "build {} started on {}",
                b.id.0,
                p.get("machine").and_then(Value::as_str).unwrap_or("?")
            ),
        ),
        EventKind::BuildFinished => {
            let status = p
                .get("status")
                .and_then(Value::as_i64)
                .and_then(|c| BuildStatus::from_code(c as i32).ok());
            let name = p.get("statusName").and_then(Value::as_str).unwrap_or("?");
            (state_of(status), format!("build {}: {name}", b.id.0))
        }
        EventKind::EvalCompleted => {
            return Rendered::Skip("no commit status for evaluations".into());
        }
    };
    let fill = |t: &str| {
        t.replace("{build}", &b.id.0.to_string())
            .replace("{jobset}", &b.jobset)
            .replace("{job}", &b.job)
    };
    let mut body = json!({
        "state": state,
        "description": description,
        "context": fill(&wh.context),
    });
    if let (false, Some(o)) = (wh.target_url.is_empty(), body.as_object_mut()) {
        o.insert("target_url".into(), json!(fill(&wh.target_url)));
    }
    Rendered::Send {
        url: wh.url.replace("{repo}", repo).replace("{rev}", rev),
        body: body.to_string().into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::types::BuildId;

    fn build() -> Build {
        Build {
            id: BuildId(7),
            jobset: "js".into(),
            job: "hello".into(),
            drv_path: "/nix/store/x-hello.drv".into(),
            system: "x86_64-linux".into(),
            priority: 0,
            global_priority: 0,
            max_silent: 0,
            timeout: 0,
            timestamp: 1,
            finished: true,
            build_status: Some(BuildStatus::Failed),
            start_time: Some(2),
            stop_time: Some(3),
            is_cached_build: false,
            last_step_nr: 1,
        }
    }

    fn row(kind: EventKind, payload: Value) -> OutboxRow {
        OutboxRow {
            id: 1,
            webhook: "w".into(),
            kind,
            build: Some(BuildId(7)),
            eval: None,
            key: "qr-k".into(),
            payload,
            created: 5,
            attempts: 0,
            next_attempt_at: 5,
            delivered_at: None,
            last_error: None,
        }
    }

    fn github() -> Webhook {
        Webhook {
            name: "gh".into(),
            url: "https://api.github.com/repos/{repo}/statuses/{rev}".into(),
            secret: vec![],
            events: vec![EventKind::BuildFinished],
            format: Format::GithubStatus,
            token: None,
            target_url: "https://qr.example/build/{build}".into(),
            context: "qr/{jobset}/{job}".into(),
        }
    }

    #[test]
    fn github_status_of_a_finished_build() {
        let b = build();
        let cx = Context {
            build: Some(&b),
            repo_rev: Some(("o/r", "abc123")),
        };
        let r = row(
            EventKind::BuildFinished,
            json!({"build": 7, "status": 1, "statusName": "Failed"}),
        );
        let Rendered::Send { url, body } = render(&github(), &r, &cx) else {
            panic!("skipped")
        };
        assert_eq!(url, "https://api.github.com/repos/o/r/statuses/abc123");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"state": "failure", "description": "build 7: Failed",
                   "context": "qr/js/hello", "target_url": "https://qr.example/build/7"})
        );
        let started = row(EventKind::BuildStarted, json!({"machine": "m1"}));
        let Rendered::Send { body, .. } = render(&github(), &started, &cx) else {
            panic!("skipped")
        };
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["state"], "pending");
        let no_meta = Context {
            build: Some(&b),
            repo_rev: None,
        };
        assert!(matches!(render(&github(), &r, &no_meta), Rendered::Skip(_)));
    }

    #[test]
    fn qr_body_carries_the_facts_and_the_key() {
        let b = build();
        let cx = Context {
            build: Some(&b),
            repo_rev: None,
        };
        let r = row(
            EventKind::BuildStarted,
            json!({"build": 7, "step": 2, "machine": "m", "time": 9}),
        );
        let v = qr_body(&r, &cx);
        assert_eq!(v["event"], "build_started");
        assert_eq!(v["delivery"], "qr-k");
        assert_eq!(v["build"]["job"], "hello");
        assert_eq!(v["step"], json!({"nr": 2, "machine": "m", "time": 9}));
        // The same row renders to the same bytes.
        assert_eq!(qr_body(&r, &cx).to_string(), v.to_string());
    }
}
