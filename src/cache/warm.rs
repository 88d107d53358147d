//! Compressing NARs ahead of the first request (`[cache] precompress`): a follower of the store's
//! realisations (by row id, as the publisher) that writes the compressed NAR of every path of
//! each realised output's closure into `[cache] nar_dir`, so a narinfo is answered at once
//! instead of after compressing a possibly large NAR. What is already compressed is skipped.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::{Cache, CacheError};

/// Realisations read per step.
const BATCH: u32 = 200;

/// Compresses the NARs of everything realised after `cursor`; returns the new cursor and how
/// many paths it looked at.
pub async fn warm_pass(
    cache: &Cache,
    mut cursor: i64,
    seen: &mut HashSet<String>,
) -> Result<(i64, usize), CacheError> {
    let mut n = 0;
    loop {
        let (rows, max) = cache.store().realisations_after(cursor, BATCH).await?;
        if max < cursor {
            cursor = max;
            continue;
        }
        let count = rows.len();
        for (rowid, _key, out) in rows {
            for info in cache
                .closure_in_order(&[out.as_str()], |p| !seen.contains(p))
                .await?
            {
                cache.nar_file(&info).await?;
                seen.insert(info.path);
                n += 1;
            }
            cursor = rowid;
        }
        if count < BATCH as usize {
            return Ok((cursor, n));
        }
    }
}

/// Runs [`warm_pass`] every `interval` for as long as the runner runs.
pub fn spawn(cache: Arc<Cache>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (mut cursor, mut seen) = (0, HashSet::new());
        loop {
            match warm_pass(&cache, cursor, &mut seen).await {
                Ok((c, _)) => cursor = c,
                Err(e) => tracing::error!(error = %e, "compressing NARs ahead failed; retrying"),
            }
            tokio::time::sleep(interval).await;
        }
    })
}
