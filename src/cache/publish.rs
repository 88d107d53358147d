//! Publishing to a `file://` binary cache (`[cache] upload = "file:///DIR"`).
//!
//! A follower of the store's realisations (in the order they were recorded, by row id): for each
//! realised output it writes, into DIR in Nix's layout, every path of the output's closure that
//! DIR lacks (`nar/<file hash>.nar.zst`, then `<hash>.narinfo`, references before referrers), the
//! realisation under both of Nix's keys (`realisations/<id>.doi`, `build-trace-v2/<drv>/<out>.doi`)
//! and the drv's build log (`log/<drv base>`), plus `nix-cache-info`. Every file is written to a
//! temporary name and renamed; a narinfo only after its NAR, so a reader never finds a narinfo
//! whose NAR is missing. Nothing is kept between runs: a new publisher starts from the first
//! realisation and skips what DIR has, so outputs realised while the runner was down or before a
//! crash are published at the next start.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::files::{write_atomic, write_nar_file};
use super::narinfo;
use super::realisation::BuildTraceEntry;
use super::source::base_name;
use super::{Cache, CacheError};
use crate::store::Store;
use crate::store::realisation::DrvOutput;

/// Realisations read per step of the follower.
const BATCH: u32 = 200;

/// The directory of a `file://DIR` upload URL.
pub fn upload_dir(url: &str) -> Result<PathBuf, String> {
    let dir = url
        .strip_prefix("file://")
        .ok_or_else(|| format!("[cache] upload = {url:?}: only file:///DIR is supported"))?;
    if !dir.starts_with('/') {
        return Err(format!(
            "[cache] upload = {url:?}: the directory must be absolute (file:///DIR)"
        ));
    }
    Ok(PathBuf::from(dir))
}

/// What one pass published.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub realisations: usize,
    pub paths: usize,
    pub logs: usize,
}

/// Fills a `file://` cache from the store.
pub struct Publisher {
    cache: Arc<Cache>,
    dir: PathBuf,
    cursor: i64,
    /// Paths known to be in DIR (so a closure is not looked up path by path again).
    published: HashSet<String>,
}

fn exists(p: &Path) -> bool {
    p.try_exists().unwrap_or(false)
}

impl Publisher {
    pub fn new(cache: Arc<Cache>, dir: PathBuf) -> Self {
        Publisher {
            cache,
            dir,
            cursor: 0,
            published: HashSet::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Publishes every realisation recorded since the last pass; returns what it wrote.
    pub async fn pass(&mut self) -> Result<Published, CacheError> {
        let mut done = Published::default();
        if !exists(&self.dir.join("nix-cache-info")) {
            write_atomic(
                &self.dir,
                "nix-cache-info",
                self.cache.cache_info().as_bytes(),
            )?;
        }
        loop {
            let (rows, max) = self
                .cache
                .store()
                .realisations_after(self.cursor, BATCH)
                .await?;
            if max < self.cursor {
                self.cursor = max;
                continue;
            }
            let n = rows.len();
            for (rowid, key, out) in rows {
                self.publish(&key, &out, &mut done).await?;
                self.cursor = rowid;
            }
            if n < BATCH as usize {
                return Ok(done);
            }
        }
    }

    /// Publishes one realised output: its closure, its realisation files, its log.
    async fn publish(
        &mut self,
        key: &DrvOutput,
        out: &str,
        done: &mut Published,
    ) -> Result<(), CacheError> {
        let sd = self.cache.store().store_dir().clone();
        let narinfo_name = |p: &str| -> Result<String, CacheError> {
            let hash = sd
                .parse(p)
                .map(|p| p.hash_part().to_string())
                .map_err(crate::store::StoreError::from)?;
            Ok(format!("{hash}.narinfo"))
        };
        let (dir, published) = (&self.dir, &mut self.published);
        let todo = self
            .cache
            .closure_in_order(&[out], |p| {
                if published.contains(p) {
                    return false;
                }
                // A narinfo in DIR means its path (and, as we write them, its closure) is there.
                if narinfo_name(p).is_ok_and(|n| exists(&dir.join(n))) {
                    crate::metrics::global().cache.upload_skipped.inc();
                    published.insert(p.to_string());
                    return false;
                }
                true
            })
            .await?;
        for info in todo {
            let name = narinfo_name(&info.path)?;
            let (store, path, nar_dir) = (
                self.cache.store().clone(),
                info.path.clone(),
                self.dir.join("nar"),
            );
            let c = self.cache.settings().compression;
            let started = std::time::Instant::now();
            let file = tokio::task::spawn_blocking(move || {
                write_nar_file(&*store as &dyn Store, &path, c, &nar_dir)
            })
            .await
            .map_err(|e| CacheError::Task(e.to_string()))??;
            let m = &crate::metrics::global().cache;
            m.upload_nar_bytes.add(info.nar_size);
            m.upload_file_bytes.add(file.file_size);
            if c != crate::cache::compression::Compression::None {
                m.compressed(info.nar_size, file.file_size, started.elapsed());
            }
            let text = narinfo::render(&info, &file, self.cache.key());
            write_atomic(&self.dir, &name, text.as_bytes())?;
            self.published.insert(info.path.clone());
            crate::metrics::global().cache.upload_paths.inc();
            done.paths += 1;
            tracing::debug!(path = %info.path, dir = %self.dir.display(), "published a path");
        }
        let legacy = self.cache.legacy_realisation(key, out).await?;
        let doi = format!("{}.doi", legacy.id);
        let rdir = self.dir.join("realisations");
        if !exists(&rdir.join(&doi)) {
            write_atomic(&rdir, &doi, legacy.to_json(self.cache.key()).as_bytes())?;
        }
        let trace = BuildTraceEntry {
            drv_path: key.drv_path.clone(),
            output: key.output.clone(),
            out_path: out.to_string(),
        };
        let tdir = self
            .dir
            .join("build-trace-v2")
            .join(base_name(&key.drv_path));
        let tname = format!("{}.doi", key.output);
        if !exists(&tdir.join(&tname)) {
            write_atomic(&tdir, &tname, trace.to_json(self.cache.key()).as_bytes())?;
        }
        crate::metrics::global().cache.upload_realisations.inc();
        done.realisations += 1;
        let drv_base = base_name(&key.drv_path);
        let ldir = self.dir.join("log");
        if !exists(&ldir.join(drv_base))
            && let Some(log) = self.cache.log(drv_base).await?
        {
            write_atomic(&ldir, drv_base, &log)?;
            crate::metrics::global().cache.upload_logs.inc();
            done.logs += 1;
        }
        Ok(())
    }

    /// Publishes for as long as the runner runs: a pass every `interval` (a failed pass is
    /// logged and retried at the next one).
    pub fn spawn(mut self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            tracing::info!(dir = %self.dir.display(), "publishing to a file:// binary cache");
            loop {
                let pass = self.pass().await;
                let result = if pass.is_ok() { "ok" } else { "error" };
                crate::metrics::global()
                    .cache
                    .upload_passes
                    .with(&[("result", result)])
                    .inc();
                match pass {
                    Ok(p) if p.realisations > 0 => tracing::info!(
                        realisations = p.realisations,
                        paths = p.paths,
                        logs = p.logs,
                        dir = %self.dir.display(),
                        "published to the binary cache"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, dir = %self.dir.display(),
                        "publishing to the binary cache failed; retrying"),
                }
                tokio::time::sleep(interval).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_urls() {
        assert_eq!(
            upload_dir("file:///srv/cache").unwrap(),
            PathBuf::from("/srv/cache")
        );
        assert!(
            upload_dir("s3://bucket")
                .unwrap_err()
                .contains("file:///DIR")
        );
        assert!(
            upload_dir("file://relative")
                .unwrap_err()
                .contains("absolute")
        );
    }
}
