//! Starting the binary cache from `[cache]`: the HTTP cache for `qr serve` and the `file://`
//! publisher for `qr serve` and `qr run`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::publish::{Publisher, upload_dir};
use super::source::CacheSettings;
use super::{Cache, Compression, SecretKey};
use crate::config::CacheConfig;
use crate::store::LocalStore;

/// The cache over `store` as `[cache]` configures it, if it is served or uploaded at all.
pub fn cache_from_config(
    cfg: &CacheConfig,
    store: Arc<LocalStore>,
    log_dirs: Vec<PathBuf>,
) -> anyhow::Result<Option<Arc<Cache>>> {
    if !cfg.enabled && cfg.upload.is_empty() {
        return Ok(None);
    }
    let compression: Compression = cfg.compression.parse().context("[cache] compression")?;
    let key = match cfg.secret_key_file.as_str() {
        "" => {
            tracing::warn!("[cache] secret_key_file is not set: the binary cache is unsigned");
            None
        }
        f => {
            Some(SecretKey::from_file(std::path::Path::new(f)).context("[cache] secret_key_file")?)
        }
    };
    Ok(Some(Arc::new(Cache::new(
        store,
        CacheSettings {
            key,
            compression,
            want_mass_query: cfg.want_mass_query,
            priority: cfg.priority,
            nar_dir: PathBuf::from(&cfg.nar_dir),
            log_dirs,
        },
    ))))
}

/// The publisher `[cache] upload` asks for, if any.
pub fn publisher(
    cfg: &CacheConfig,
    cache: &Option<Arc<Cache>>,
) -> anyhow::Result<Option<Publisher>> {
    match (cfg.upload.as_str(), cache) {
        ("", _) | (_, None) => Ok(None),
        (url, Some(c)) => {
            let dir = upload_dir(url).map_err(anyhow::Error::msg)?;
            Ok(Some(Publisher::new(c.clone(), dir)))
        }
    }
}

/// The publisher's interval.
pub fn upload_interval(cfg: &CacheConfig) -> Duration {
    Duration::from_secs_f64(cfg.upload_interval_s.max(0.05))
}

/// What `qr serve` runs of the cache: the publisher (with an upload), the precompression (for
/// the HTTP cache, when on and compressing). Returns the cache to serve over HTTP, if enabled.
pub fn start(
    cfg: &CacheConfig,
    store: Arc<LocalStore>,
    log_dirs: Vec<PathBuf>,
) -> anyhow::Result<Option<Arc<Cache>>> {
    let cache = cache_from_config(cfg, store, log_dirs)?;
    if let Some(p) = publisher(cfg, &cache)? {
        p.spawn(upload_interval(cfg));
    }
    let http = cache.filter(|_| cfg.enabled);
    if let Some(c) = &http
        && cfg.precompress
        && c.settings().compression != Compression::None
    {
        super::warm::spawn(c.clone(), upload_interval(cfg));
    }
    Ok(http)
}
