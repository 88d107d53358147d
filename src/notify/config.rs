//! `[notify]` checked at start: every webhook's URL, secret, events and format, with a message
//! naming the entry and the key when one is wrong.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::config::{NotifyConfig, WebhookConfig};
use crate::db::{EventKind, NotifyTargets};

/// What is wrong with `[notify]`.
#[derive(Debug, Error)]
pub enum NotifyConfigError {
    #[error("[[notify.webhooks]] #{index}: {message}")]
    Webhook { index: usize, message: String },
    #[error("[[notify.webhooks]] #{index} ({name}): cannot read {key} {path}: {source}")]
    Read {
        index: usize,
        name: String,
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("[[notify.webhooks]]: two webhooks are named {0:?} (set `name` to tell them apart)")]
    DuplicateName(String),
    #[error("[notify] {key} = {value}: expected a number of seconds above 0")]
    Seconds { key: &'static str, value: f64 },
}

/// The body a webhook is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qr's JSON event (`payload::qr_body`).
    Qr,
    /// GitHub's commit status (`{state, target_url, description, context}`) to a URL with the
    /// job's `{repo}` and `{rev}`.
    GithubStatus,
}

/// A checked `[[notify.webhooks]]` entry.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    pub name: String,
    pub url: String,
    /// Empty: no `X-Qr-Signature-256`.
    pub secret: Vec<u8>,
    pub events: Vec<EventKind>,
    pub format: Format,
    /// github-status: `Authorization: Bearer …`.
    pub token: Option<String>,
    pub target_url: String,
    pub context: String,
}

/// Secrets are not printed.
impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// `[notify]`, checked.
#[derive(Debug, Clone)]
pub struct NotifySettings {
    pub poll_interval: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub timeout: Duration,
    pub drain_timeout: Duration,
    pub ca_file: PathBuf,
    pub webhooks: Vec<Webhook>,
}

fn seconds(key: &'static str, value: f64) -> Result<Duration, NotifyConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(NotifyConfigError::Seconds { key, value })
    }
}

fn read_trimmed(
    index: usize,
    name: &str,
    key: &'static str,
    path: &str,
) -> Result<String, NotifyConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|source| NotifyConfigError::Read {
            index,
            name: name.to_string(),
            key,
            path: PathBuf::from(path),
            source,
        })
}

impl NotifySettings {
    /// Checks `[notify]`.
    pub fn from_config(c: &NotifyConfig) -> Result<NotifySettings, NotifyConfigError> {
        let mut webhooks: Vec<Webhook> = Vec::new();
        for (i, w) in c.webhooks.iter().enumerate() {
            let wh = webhook(i + 1, w)?;
            if webhooks.iter().any(|x| x.name == wh.name) {
                return Err(NotifyConfigError::DuplicateName(wh.name));
            }
            webhooks.push(wh);
        }
        Ok(NotifySettings {
            poll_interval: seconds("poll_interval_s", c.poll_interval_s)?,
            retry_base: seconds("retry_base_s", c.retry_base_s)?,
            retry_max: seconds("retry_max_s", c.retry_max_s)?,
            timeout: seconds("timeout_s", c.timeout_s)?,
            drain_timeout: Duration::from_secs_f64(c.drain_timeout_s.max(0.0)),
            ca_file: PathBuf::from(&c.ca_file),
            webhooks,
        })
    }

    /// Which webhooks want which event: what the database writes need.
    pub fn targets(&self) -> NotifyTargets {
        let mut t = NotifyTargets::default();
        for w in &self.webhooks {
            for e in &w.events {
                t.add(*e, &w.name);
            }
        }
        t
    }
}

fn webhook(index: usize, w: &WebhookConfig) -> Result<Webhook, NotifyConfigError> {
    let bad = |message: String| NotifyConfigError::Webhook { index, message };
    if w.url.is_empty() {
        return Err(bad("`url` is required".into()));
    }
    let scheme_ok = w.url.starts_with("http://") || w.url.starts_with("https://");
    if !scheme_ok {
        return Err(bad(format!(
            "url = {:?}: expected an http:// or https:// URL",
            w.url
        )));
    }
    let name = match w.name.as_str() {
        "" => w.url.clone(),
        n => n.to_string(),
    };
    let format = match w.format.as_str() {
        "" | "qr" => Format::Qr,
        "github-status" => Format::GithubStatus,
        other => {
            return Err(bad(format!(
                "format = {other:?}: expected \"qr\" or \"github-status\""
            )));
        }
    };
    if format == Format::GithubStatus {
        // The template is filled in per job; a URL without the placeholders would post every
        // job's status to one commit.
        for p in ["{repo}", "{rev}"] {
            if !w.url.contains(p) {
                return Err(bad(format!(
                    "url = {:?}: a github-status URL needs {p} (e.g. https://api.github.com/repos/{{repo}}/statuses/{{rev}})",
                    w.url
                )));
            }
        }
    }
    // Checked with the placeholders filled in, so a template is checked too.
    let sample = w.url.replace("{repo}", "o/r").replace("{rev}", "0");
    if let Err(e) = sample.parse::<hyper::Uri>() {
        return Err(bad(format!("url = {:?}: {e}", w.url)));
    }
    let secret = match (w.secret.as_str(), w.secret_file.as_str()) {
        ("", "") => Vec::new(),
        (s, "") => s.as_bytes().to_vec(),
        ("", f) => read_trimmed(index, &name, "secret_file", f)?.into_bytes(),
        _ => return Err(bad("set `secret` or `secret_file`, not both".into())),
    };
    if secret.is_empty() {
        tracing::warn!(webhook = %name, "webhook without a secret: its deliveries are not signed");
    }
    let mut events = Vec::new();
    for e in &w.events {
        match EventKind::parse(e) {
            Some(k) if !events.contains(&k) => events.push(k),
            Some(_) => {}
            None => {
                return Err(bad(format!(
                    "events: {e:?} is no event (expected build_started, build_finished or eval_completed)"
                )));
            }
        }
    }
    let has_eval = events.contains(&EventKind::EvalCompleted);
    if format == Format::GithubStatus && has_eval {
        return Err(bad(
            "events: a github-status webhook has no eval_completed (commit statuses are per job)"
                .into(),
        ));
    }
    if events.is_empty() {
        events = match format {
            Format::Qr => EventKind::ALL.to_vec(),
            Format::GithubStatus => vec![EventKind::BuildStarted, EventKind::BuildFinished],
        };
    }
    let token = match w.token_file.as_str() {
        "" => None,
        f => Some(read_trimmed(index, &name, "token_file", f)?),
    };
    Ok(Webhook {
        name,
        url: w.url.clone(),
        secret,
        events,
        format,
        token,
        target_url: w.target_url.clone(),
        context: match w.context.as_str() {
            "" => "qr/{job}".into(),
            c => c.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ws: Vec<WebhookConfig>) -> NotifyConfig {
        NotifyConfig {
            webhooks: ws,
            ..NotifyConfig::default()
        }
    }

    fn wh(url: &str) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            secret: "s".into(),
            ..WebhookConfig::default()
        }
    }

    fn err(ws: Vec<WebhookConfig>) -> String {
        match NotifySettings::from_config(&cfg(ws)) {
            Ok(s) => panic!("accepted: {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_are_every_event_of_the_format() {
        let s = NotifySettings::from_config(&cfg(vec![wh("http://127.0.0.1:9/h")])).unwrap();
        assert_eq!(s.webhooks[0].name, "http://127.0.0.1:9/h");
        assert_eq!(s.webhooks[0].events, EventKind::ALL.to_vec());
        let t = s.targets();
        assert_eq!(t.eval_completed, vec!["http://127.0.0.1:9/h".to_string()]);
        let mut g = wh("https://api.github.com/repos/{repo}/statuses/{rev}");
        g.format = "github-status".into();
        let s = NotifySettings::from_config(&cfg(vec![g])).unwrap();
        assert_eq!(
            s.webhooks[0].events,
            vec![EventKind::BuildStarted, EventKind::BuildFinished]
        );
        assert!(s.targets().eval_completed.is_empty());
        assert!(
            NotifySettings::from_config(&cfg(vec![]))
                .unwrap()
                .targets()
                .is_empty()
        );
    }

    #[test]
    fn bad_entries_are_named_with_their_key() {
        let e = err(vec![wh("ftp://x")]);
        assert!(e.contains("#1") && e.contains("http://"), "{e}");
        let mut w = wh("http://x/");
        w.events = vec!["build_done".into()];
        let e = err(vec![w]);
        assert!(e.contains("build_done") && e.contains("events"), "{e}");
        let mut w = wh("http://x/");
        w.format = "slack".into();
        assert!(err(vec![w]).contains("format = \"slack\""));
        let mut w = wh("https://api.github.com/repos/{repo}/statuses");
        w.format = "github-status".into();
        assert!(err(vec![w]).contains("{rev}"));
        let mut w = wh("http://x/");
        w.secret_file = "/nonexistent/secret".into();
        let e = err(vec![w]);
        assert!(e.contains("not both"), "{e}");
        let mut w = wh("http://x/");
        w.secret = String::new();
        w.secret_file = "/nonexistent/secret".into();
        let e = err(vec![w]);
        assert!(
            e.contains("secret_file") && e.contains("/nonexistent/secret"),
            "{e}"
        );
        let e = err(vec![wh("http://x/"), wh("http://x/")]);
        assert!(e.contains("two webhooks"), "{e}");
        let bad = NotifyConfig {
            retry_base_s: 0.0,
            ..NotifyConfig::default()
        };
        let e = NotifySettings::from_config(&bad).unwrap_err().to_string();
        assert!(e.contains("retry_base_s"), "{e}");
    }

    #[test]
    fn secret_file_is_read_without_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "hunter2\n").unwrap();
        let mut w = wh("http://x/");
        w.secret = String::new();
        w.secret_file = f.display().to_string();
        let s = NotifySettings::from_config(&cfg(vec![w])).unwrap();
        assert_eq!(s.webhooks[0].secret, b"hunter2");
        assert!(!format!("{:?}", s.webhooks[0]).contains("hunter2"));
    }
}
