//! Configuration: `config.toml` (every key has a default), overridden by `QR_<SECTION>_<KEY>`
//! environment variables. Strings may contain `{state_dir}`, replaced by the absolute state dir.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why the configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}={value:?}: expected {expected}")]
    Env {
        var: String,
        value: String,
        expected: &'static str,
    },
    #[error("cannot create state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub store: StoreConfig,
    pub grpc: GrpcConfig,
    pub http: HttpConfig,
    pub local_builder: LocalBuilderConfig,
    pub scheduler: SchedulerConfig,
    pub cache: CacheConfig,
    pub notify: NotifyConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` or `postgres://…`.
    pub url: String,
    pub max_connections: u32,
    /// Seconds between re-reads of the queue (the safety net behind notifications).
    pub rescan_interval_s: f64,
    /// SQLite: seconds between looks for builds another process (`qr submit`) queued; 0 leaves
    /// them to the rescan.
    pub sqlite_poll_interval_s: f64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://{state_dir}/qr.db".into(),
            max_connections: 8,
            rescan_interval_s: 30.0,
            sqlite_poll_interval_s: 0.2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The logical store dir: the prefix of every store path.
    pub dir: String,
    /// Where the store's files physically live.
    pub root: String,
    /// Largest build log kept per step, in bytes.
    pub max_log_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            dir: "{state_dir}/store".into(),
            root: "{state_dir}/store".into(),
            max_log_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    pub listen: String,
    /// File holding the token builders and admin clients present; empty: no token accepted.
    pub token_file: String,
    pub tls_cert: String,
    pub tls_key: String,
    /// Builders send a heartbeat this often, and the runner sends one to each builder.
    pub heartbeat_interval_s: f64,
    /// A peer (builder or runner) that sends nothing for this long is lost: the runner retries
    /// the builder's jobs elsewhere, the builder reconnects. At least one heartbeat interval.
    pub silent_timeout_s: f64,
    /// HTTP/2 PING every this many seconds on every connection (runner and builder); 0: none.
    pub keepalive_interval_s: f64,
    /// A PING unanswered for this long closes the connection.
    pub keepalive_timeout_s: f64,
    /// Largest NAR sent to or accepted from a builder.
    pub max_nar_bytes: u64,
    /// After a restart, how long a step that was building on a builder waits for that builder
    /// to rejoin (and have its build adopted) before it goes to any machine.
    pub rejoin_grace_s: f64,
    /// How long a builder that broke the protocol (lied about outputs) is refused.
    pub quarantine_s: f64,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            listen: "127.0.0.1:50051".into(),
            token_file: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            heartbeat_interval_s: 10.0,
            silent_timeout_s: 25.0,
            keepalive_interval_s: 10.0,
            keepalive_timeout_s: 10.0,
            max_nar_bytes: 4 << 30,
            rejoin_grace_s: 30.0,
            quarantine_s: 300.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    /// Seconds between the samples of the dashboard's history graph (`GetHistory`).
    pub history_interval_s: f64,
    /// Seconds of history kept.
    pub history_window_s: f64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            history_interval_s: 5.0,
            history_window_s: 900.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalBuilderConfig {
    pub enabled: bool,
    /// Concurrent builds; 0 means the number of cores.
    pub max_jobs: u32,
    /// Systems it builds for; empty means this machine's own (e.g. `x86_64-linux`).
    pub systems: Vec<String>,
    pub features: Vec<String>,
    /// Features a step must require for this builder to take it; `local` is met by a
    /// `preferLocalBuild` step too (Hydra's), so `["local"]` keeps it for those.
    pub mandatory_features: Vec<String>,
    /// `native` (builds like Nix, no Nix needed) or `simulated` (zero-time, for benchmarks).
    pub executor: String,
}

impl Default for LocalBuilderConfig {
    fn default() -> Self {
        LocalBuilderConfig {
            enabled: true,
            max_jobs: 0,
            systems: vec![],
            features: vec![],
            mandatory_features: vec![],
            executor: "native".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    pub max_tries: u32,
    pub retry_interval_s: f64,
    pub retry_backoff: f64,
    pub max_silent_time_s: u64,
    pub build_timeout_s: u64,
    pub unsupported_wait_s: u64,
    /// How runnable steps of equal priority and share use are ordered.
    pub order: crate::actors::dispatcher::machine::Order,
    /// Expected duration of a step with no history of its name or job.
    pub default_step_duration_s: u64,
}

impl SchedulerConfig {
    /// The queue's order and expected durations, for the actors.
    pub fn scheduling(&self) -> crate::actors::env::Scheduling {
        crate::actors::env::Scheduling {
            order: self.order,
            default_step_duration: std::time::Duration::from_secs(self.default_step_duration_s),
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_tries: 5,
            retry_interval_s: 60.0,
            retry_backoff: 3.0,
            max_silent_time_s: 3600,
            build_timeout_s: 36000,
            unsupported_wait_s: 60,
            order: Default::default(),
            default_step_duration_s: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Serve the binary cache on `[http] listen` (with `qr serve`).
    pub enabled: bool,
    /// Secret key in Nix's format (`nix-store --generate-binary-cache-key`); empty: unsigned.
    pub secret_key_file: String,
    /// `zstd`, `xz` or `none`.
    pub compression: String,
    /// `nix-cache-info`'s `Priority` (lower is preferred by Nix).
    pub priority: u32,
    /// `nix-cache-info`'s `WantMassQuery`.
    pub want_mass_query: bool,
    /// Where compressed NARs served over HTTP are kept.
    pub nar_dir: String,
    /// Compress every realised output's NARs into `nar_dir` ahead of the first request.
    pub precompress: bool,
    /// `file:///DIR`: also publish every realised output there; empty: no upload.
    pub upload: String,
    /// Seconds between the publisher's (and the precompression's) looks for new realisations.
    pub upload_interval_s: f64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            secret_key_file: String::new(),
            compression: "zstd".into(),
            priority: 40,
            want_mass_query: true,
            nar_dir: "{state_dir}/cache/nar".into(),
            precompress: true,
            upload: String::new(),
            upload_interval_s: 2.0,
        }
    }
}

/// `[notify]`: webhooks for build and evaluation events, delivered from the database's outbox
/// (`crate::notify`, `docs/ops.md` "Notifications").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Seconds between the delivery task's looks for due events.
    pub poll_interval_s: f64,
    /// The first retry of a failed delivery waits this long, each next one twice as long…
    pub retry_base_s: f64,
    /// … up to this.
    pub retry_max_s: f64,
    /// One delivery (connect, send, answer) may take this long before it counts as failed.
    pub timeout_s: f64,
    /// `qr run`: how long it waits, after its builds, for their events to be delivered (what is
    /// left is delivered by the next `qr serve` or `qr run`).
    pub drain_timeout_s: f64,
    /// PEM file of the CA certificates `https://` receivers are verified against.
    pub ca_file: String,
    /// `[[notify.webhooks]]`: none by default (and then no outbox rows are written).
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            poll_interval_s: 1.0,
            retry_base_s: 2.0,
            retry_max_s: 600.0,
            timeout_s: 10.0,
            drain_timeout_s: 10.0,
            ca_file: "/etc/ssl/certs/ca-certificates.crt".into(),
            webhooks: vec![],
        }
    }
}

/// One `[[notify.webhooks]]` entry (checked by `crate::notify::config`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the webhook's outbox rows; default: the URL. Keep it when changing the URL, or
    /// the undelivered events of the old name are left behind.
    pub name: String,
    /// Where to POST; with `format = "github-status"` a template with `{repo}` and `{rev}`.
    pub url: String,
    /// The HMAC-SHA256 key of `X-Qr-Signature-256` (or `secret_file`). `qr config` prints it
    /// as `<redacted>`.
    #[serde(serialize_with = "redacted")]
    pub secret: String,
    pub secret_file: String,
    /// Any of `build_started`, `build_finished`, `eval_completed`; empty: every event the
    /// format has.
    pub events: Vec<String>,
    /// `qr` (default) or `github-status`.
    pub format: String,
    /// github-status: file holding the token sent as `Authorization: Bearer …`.
    pub token_file: String,
    /// github-status: `target_url`, a template with `{build}`; empty: none.
    pub target_url: String,
    /// github-status: `context`, a template with `{jobset}`, `{job}`; empty: `qr/{job}`.
    pub context: String,
}

/// A secret as `qr config` shows it: `<redacted>` unless empty.
fn redacted<S: serde::Serializer>(secret: &str, s: S) -> Result<S::Ok, S::Error> {
    match secret.is_empty() {
        true => s.serialize_str(""),
        false => s.serialize_str("<redacted>"),
    }
}

/// The default state dir: `$XDG_STATE_HOME/qr`, else `$HOME/.local/state/qr`, else `./qr-state`.
pub fn default_state_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("qr");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".local/state/qr");
    }
    PathBuf::from("qr-state")
}

impl Config {
    /// Loads the configuration: defaults, then `file` if given and present, then the environment
    /// (`env` yields variables; normally `std::env::vars`), then `{state_dir}` expansion.
    pub fn load(
        file: Option<&Path>,
        state_dir: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut value =
            toml::Value::try_from(Config::default()).map_err(|e| ConfigError::Parse {
                path: PathBuf::from("<defaults>"),
                message: e.to_string(),
            })?;
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let parsed: toml::Value =
                        toml::from_str(&text).map_err(|e| ConfigError::Parse {
                            path: path.to_path_buf(),
                            message: e.to_string(),
                        })?;
                    merge(&mut value, parsed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(path = %path.display(), "config file not found: using defaults");
                }
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
        apply_env(&mut value, env)?;
        let mut cfg: Config =
            value
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: file
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| PathBuf::from("<environment>")),
                    message: e.to_string(),
                })?;
        cfg.expand_state_dir(state_dir);
        Ok(cfg)
    }

    fn expand_state_dir(&mut self, state_dir: &Path) {
        let sd = state_dir.to_string_lossy();
        for s in [
            &mut self.database.url,
            &mut self.store.dir,
            &mut self.store.root,
            &mut self.grpc.token_file,
            &mut self.grpc.tls_cert,
            &mut self.grpc.tls_key,
            &mut self.cache.secret_key_file,
            &mut self.cache.nar_dir,
            &mut self.cache.upload,
            &mut self.notify.ca_file,
        ] {
            *s = s.replace("{state_dir}", &sd);
        }
        for w in &mut self.notify.webhooks {
            for s in [&mut w.secret_file, &mut w.token_file] {
                *s = s.replace("{state_dir}", &sd);
            }
        }
    }

    /// Builds per step run concurrently on the local builder.
    pub fn local_max_jobs(&self) -> usize {
        match self.local_builder.max_jobs {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n as usize,
        }
    }
}

/// This machine's Nix system string (e.g. `x86_64-linux`).
pub fn this_system() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

/// Makes the state dir absolute and creates it.
pub fn prepare_state_dir(dir: &Path) -> Result<PathBuf, ConfigError> {
    std::fs::create_dir_all(dir).map_err(|source| ConfigError::StateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    std::path::absolute(dir).map_err(|source| ConfigError::StateDir {
        path: dir.to_path_buf(),
        source,
    })
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_table() && v.is_table() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Applies `QR_<SECTION>_<KEY>` overrides for every key the configuration has, parsing each value
/// as the type of its default.
fn apply_env(
    value: &mut toml::Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let env: std::collections::HashMap<String, String> = env.into_iter().collect();
    let Some(sections) = value.as_table_mut() else {
        return Ok(());
    };
    for (section, table) in sections.iter_mut() {
        let Some(table) = table.as_table_mut() else {
            continue;
        };
        for (key, slot) in table.iter_mut() {
            let var = format!("QR_{}_{}", section.to_uppercase(), key.to_uppercase());
            let Some(raw) = env.get(&var) else { continue };
            let bad = |expected| ConfigError::Env {
                var: var.clone(),
                value: raw.clone(),
                expected,
            };
            *slot = match slot {
                toml::Value::String(_) => toml::Value::String(raw.clone()),
                toml::Value::Integer(_) => {
                    toml::Value::Integer(raw.trim().parse().map_err(|_| bad("an integer"))?)
                }
                toml::Value::Float(_) => {
                    toml::Value::Float(raw.trim().parse().map_err(|_| bad("a number"))?)
                }
                toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim() {
                    "1" | "true" | "yes" | "on" => true,
                    "0" | "false" | "no" | "off" => false,
                    _ => return Err(bad("true or false")),
                }),
                toml::Value::Array(_) => toml::Value::Array(
                    raw.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.to_string()))
                        .collect(),
                ),
                _ => continue,
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        vec![]
    }

    #[test]
    fn documented_config_toml_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let from_file = Config::load(Some(&path), Path::new("/sd"), no_env()).unwrap();
        let defaults = Config::load(None, Path::new("/sd"), no_env()).unwrap();
        assert_eq!(from_file, defaults);
        // and the file names every key the configuration has
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Value = toml::from_str(&text).unwrap();
        let all = toml::Value::try_from(Config::default()).unwrap();
        for (section, keys) in all.as_table().unwrap() {
            for key in keys.as_table().unwrap().keys() {
                assert!(
                    table.get(section).and_then(|s| s.get(key)).is_some(),
                    "config.toml lacks [{section}] {key}"
                );
            }
        }
    }

    #[test]
    fn webhooks_are_read_and_their_secret_is_not_shown() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[notify]\npoll_interval_s = 0.5\n[[notify.webhooks]]\nurl = \"http://x/\"\n\
             secret = \"hunter2\"\nsecret_file = \"{state_dir}/s\"\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&f), Path::new("/sd"), no_env()).unwrap();
        assert_eq!(cfg.notify.poll_interval_s, 0.5);
        assert_eq!(cfg.notify.webhooks.len(), 1);
        assert_eq!(cfg.notify.webhooks[0].secret, "hunter2");
        assert_eq!(cfg.notify.webhooks[0].secret_file, "/sd/s");
        let shown = toml::to_string_pretty(&cfg).unwrap();
        assert!(
            !shown.contains("hunter2") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn missing_file_means_defaults_and_state_dir_expands() {
        let cfg = Config::load(
            Some(Path::new("/nonexistent/qr.toml")),
            Path::new("/var/lib/qr"),
            no_env(),
        )
        .unwrap();
        assert_eq!(cfg.database.url, "sqlite:///var/lib/qr/qr.db");
        assert_eq!(cfg.store.root, "/var/lib/qr/store");
        assert_eq!(cfg.scheduler.max_tries, 5);
    }

    #[test]
    fn env_overrides_every_type() {
        let env = vec![
            (
                "QR_DATABASE_URL".to_string(),
                "postgres://x@127.0.0.1/test".to_string(),
            ),
            ("QR_DATABASE_MAX_CONNECTIONS".to_string(), "3".to_string()),
            ("QR_SCHEDULER_RETRY_BACKOFF".to_string(), "1.5".to_string()),
            ("QR_LOCAL_BUILDER_ENABLED".to_string(), "false".to_string()),
            (
                "QR_LOCAL_BUILDER_SYSTEMS".to_string(),
                "x86_64-linux, aarch64-linux".to_string(),
            ),
            ("QR_STORE_DIR".to_string(), "/nix/store".to_string()),
        ];
        let cfg = Config::load(None, Path::new("/sd"), env).unwrap();
        assert_eq!(cfg.database.url, "postgres://x@127.0.0.1/test");
        assert_eq!(cfg.database.max_connections, 3);
        assert_eq!(cfg.scheduler.retry_backoff, 1.5);
        assert!(!cfg.local_builder.enabled);
        assert_eq!(
            cfg.local_builder.systems,
            vec!["x86_64-linux", "aarch64-linux"]
        );
        assert_eq!(cfg.store.dir, "/nix/store");
    }

    #[test]
    fn bad_env_and_unknown_keys_are_clear_errors() {
        let env = vec![(
            "QR_DATABASE_MAX_CONNECTIONS".to_string(),
            "many".to_string(),
        )];
        let e = Config::load(None, Path::new("/sd"), env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("QR_DATABASE_MAX_CONNECTIONS") && e.contains("integer"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[database]\nulr = \"x\"\n").unwrap();
        let e = Config::load(Some(&f), Path::new("/sd"), no_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ulr"), "{e}");
    }
}
