//! The local store's metadata: a SQLite database (`<root>/.qr-meta/store.sqlite`) with the valid
//! paths, their references, realisations and GC roots, in the spirit of Nix's `db.sqlite`.
//!
//! The closure invariant is enforced by foreign keys: a path can only be registered if every path it
//! refers to is valid (or registered in the same transaction), and a path cannot be invalidated
//! while a valid path still refers to it (invalidate referrers first, as GC does). Realisations
//! point at valid paths and disappear with them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::store::api::{PathInfo, StoreError};
use crate::store::hash::{parse_sha256, render_nix32};
use crate::store::realisation::DrvOutput;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS ValidPaths (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        path             TEXT NOT NULL UNIQUE,
        narHash          TEXT NOT NULL,
        narSize          INTEGER NOT NULL,
        ca               TEXT,
        deriver          TEXT,
        registrationTime INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS Refs (
        referrer  INTEGER NOT NULL REFERENCES ValidPaths(id) ON DELETE CASCADE,
        reference INTEGER NOT NULL REFERENCES ValidPaths(id) ON DELETE RESTRICT,
        PRIMARY KEY (referrer, reference)
    )",
    "CREATE INDEX IF NOT EXISTS IndexReference ON Refs(reference)",
    "CREATE TABLE IF NOT EXISTS Realisations (
        drvPath    TEXT NOT NULL,
        outputName TEXT NOT NULL,
        outputPath INTEGER NOT NULL REFERENCES ValidPaths(id) ON DELETE CASCADE,
        PRIMARY KEY (drvPath, outputName)
    )",
    "CREATE INDEX IF NOT EXISTS IndexRealisationsOutput ON Realisations(outputPath)",
    // The binary cache finds an uncompressed NAR (`nar/<narHash>.nar`) by its hash.
    "CREATE INDEX IF NOT EXISTS IndexNarHash ON ValidPaths(narHash)",
    "CREATE TABLE IF NOT EXISTS GcRoots (
        name TEXT PRIMARY KEY,
        path TEXT NOT NULL
    )",
];

/// `v` as a JSON text, the one argument `json_each(?)` reads rows from; `what` names it in the
/// (unreachable for strings and numbers) error.
fn json_arg<T: serde::Serialize + ?Sized>(v: &T, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Metadata(format!("encoding {what}: {e}")))
}

fn db_err(what: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Metadata(format!("{what}: {e}"))
}

/// Read connections kept for reuse; more may be open at once (a reader is opened whenever none is
/// free), the extra ones are closed when given back.
const MAX_IDLE_READERS: usize = 4;

/// Prepared statements kept per connection (sqlx's default, which this replaced): the fixed
/// statements, plus the `IN (?, …)` lookups of recently used lengths.
const STATEMENT_CACHE: usize = 100;

/// The metadata database.
///
/// Statements run on the calling thread through rusqlite (no round trip to a connection's worker
/// thread). Reads take a read-only connection from a small pool and run right away (they take
/// microseconds). Everything that commits goes through the one writer connection, on a blocking
/// thread, since the commit fsyncs the WAL.
#[derive(Debug, Clone)]
pub(crate) struct MetaDb {
    inner: Arc<Inner>,
}

struct Inner {
    file: PathBuf,
    /// `None` once closed.
    writer: Mutex<Option<Connection>>,
    readers: Mutex<Vec<Connection>>,
    closed: AtomicBool,
    /// Whether commits should sync (`synchronous = FULL`) or not (`OFF`: scratch stores only,
    /// see [`MetaDb::set_synchronous`]), and what the writer connection has now (changed only
    /// under the writer's lock, before its next write).
    want_sync: AtomicBool,
    has_sync: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaDb")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

fn closed_err() -> StoreError {
    StoreError::Metadata("the store's metadata database is closed".into())
}

/// Opens a connection to `file` with the store's settings: WAL, `synchronous = FULL`, foreign
/// keys on, a 60 s busy timeout. A reader is opened read-only (the journal mode is the file's,
/// set by the writer).
fn connect(file: &Path, writer: bool) -> Result<Connection, StoreError> {
    let open_err =
        |e: rusqlite::Error| StoreError::Metadata(format!("opening {}: {e}", file.display()));
    let access = if writer {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    };
    let conn = Connection::open_with_flags(file, access | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(60))
        .map_err(open_err)?;
    if writer {
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
            .map_err(open_err)?;
    }
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(open_err)?;
    // FULL: a committed transaction survives a power loss, which the "contents first, then
    // metadata" ordering relies on.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Every row's first column.
fn column0<T: rusqlite::types::FromSql>(
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
) -> rusqlite::Result<Vec<T>> {
    stmt.query_map(params, |r| r.get(0))?.collect()
}

/// A path to register, with its metadata.
pub(crate) type Registration = PathInfo;

impl MetaDb {
    /// Opens (creating if needed) the database at `file`.
    pub(crate) async fn open(file: &Path) -> Result<Self, StoreError> {
        let file = file.to_path_buf();
        let inner = super::blocking(move || {
            let conn = connect(&file, true)?;
            for stmt in SCHEMA {
                conn.execute(stmt, [])
                    .map_err(db_err("creating the schema"))?;
            }
            Ok(Inner {
                file,
                writer: Mutex::new(Some(conn)),
                readers: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                want_sync: AtomicBool::new(true),
                has_sync: AtomicBool::new(true),
            })
        })
        .await?;
        Ok(MetaDb {
            inner: Arc::new(inner),
        })
    }

    /// Closes the connections (a write in progress finishes first); later calls fail.
    pub(crate) async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let inner = self.inner.clone();
        // Closing the last connection checkpoints the WAL (fsyncs): not on an async worker.
        let _ = tokio::task::spawn_blocking(move || {
            let readers =
                std::mem::take(&mut *inner.readers.lock().unwrap_or_else(|p| p.into_inner()));
            drop(readers);
            let writer = inner
                .writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            drop(writer);
        })
        .await;
    }

    /// Commits sync their WAL (`true`, the default) or not (`false`: a power loss may lose
    /// committed metadata; for scratch stores, with the contents' fsyncs off too). Applies from
    /// the next write.
    pub(crate) fn set_synchronous(&self, on: bool) {
        self.inner.want_sync.store(on, Ordering::SeqCst);
    }

    /// Runs `f` on a read connection, on the calling thread.
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(closed_err());
        }
        let idle = self
            .inner
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let conn = match idle {
            Some(c) => c,
            None => connect(&self.inner.file, false)?,
        };
        let r = f(&conn);
        // Checked under the lock `close` takes after setting the flag: nothing is kept after it.
        let mut idle = self.inner.readers.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_READERS && !self.inner.closed.load(Ordering::SeqCst) {
            idle.push(conn);
        }
        r
    }

    /// Runs `f` on the writer connection, on a blocking thread (a commit fsyncs).
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let me = self.clone();
        super::blocking(move || me.write_now(f)).await
    }

    /// Runs `f` on the writer connection on the calling thread (one that may block).
    fn write_now<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let inner = &self.inner;
        {
            let mut guard = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            let conn = guard.as_mut().ok_or_else(closed_err)?;
            if !conn.is_autocommit() {
                // Left open by a panic (the mutex was poisoned): nothing of it was committed.
                conn.execute_batch("ROLLBACK")
                    .map_err(db_err("rolling back an abandoned transaction"))?;
            }
            let want = inner.want_sync.load(Ordering::SeqCst);
            if want != inner.has_sync.load(Ordering::SeqCst) {
                conn.pragma_update(None, "synchronous", if want { "FULL" } else { "OFF" })
                    .map_err(db_err("setting synchronous"))?;
                inner.has_sync.store(want, Ordering::SeqCst);
            }
            f(conn)
        }
    }

    pub(crate) async fn is_valid(&self, path: &str) -> Result<bool, StoreError> {
        self.is_valid_now(path)
    }

    pub(crate) async fn path_info(&self, path: &str) -> Result<Option<PathInfo>, StoreError> {
        self.read(|c| {
            type Row = (i64, String, i64, Option<String>, Option<String>);
            let row: Option<Row> = c
                .prepare_cached(
                    "SELECT id, narHash, narSize, ca, deriver FROM ValidPaths WHERE path = ?",
                )
                .and_then(|mut s| {
                    s.query_row([path], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .optional()
                })
                .map_err(db_err("querying path info"))?;
            let Some((id, nar_hash_s, nar_size, ca, deriver)) = row else {
                return Ok(None);
            };
            let nar_hash = parse_sha256(&nar_hash_s).map_err(|e| {
                StoreError::Metadata(format!("{path}: stored narHash is corrupt: {e}"))
            })?;
            let references = c
                .prepare_cached(
                    "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?",
                )
                .and_then(|mut s| s.query_map([id], |r| r.get(0))?.collect())
                .map_err(db_err("querying references"))?;
            Ok(Some(PathInfo {
                path: path.to_string(),
                nar_hash,
                nar_size: u64::try_from(nar_size).unwrap_or(0),
                references,
                ca,
                deriver,
            }))
        })
    }

    /// The infos of the valid paths among `paths`, by path, in one read (two queries whatever
    /// their number).
    pub(crate) async fn path_infos(
        &self,
        paths: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, PathInfo>, StoreError> {
        if paths.is_empty() {
            return Ok(BTreeMap::new());
        }
        let json = json_arg(paths, "a path list")?;
        self.read(|c| {
            type Row = (i64, String, String, i64, Option<String>, Option<String>);
            let rows: Vec<Row> = c
                .prepare_cached(
                    "SELECT id, path, narHash, narSize, ca, deriver FROM ValidPaths
                      WHERE path IN (SELECT value FROM json_each(?))",
                )
                .and_then(|mut s| {
                    s.query_map([&json], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                        ))
                    })?
                    .collect()
                })
                .map_err(db_err("querying path infos"))?;
            let refs: Vec<(i64, String)> = c
                .prepare_cached(
                    "SELECT r.referrer, v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference
                      WHERE r.referrer IN
                        (SELECT id FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?)))",
                )
                .and_then(|mut s| {
                    s.query_map([&json], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect()
                })
                .map_err(db_err("querying references"))?;
            let mut refs_of: HashMap<i64, BTreeSet<String>> = HashMap::new();
            for (referrer, path) in refs {
                refs_of.entry(referrer).or_default().insert(path);
            }
            let mut out = BTreeMap::new();
            for (id, path, nar_hash_s, nar_size, ca, deriver) in rows {
                let nar_hash = parse_sha256(&nar_hash_s).map_err(|e| {
                    StoreError::Metadata(format!("{path}: stored narHash is corrupt: {e}"))
                })?;
                let info = PathInfo {
                    path: path.clone(),
                    nar_hash,
                    nar_size: u64::try_from(nar_size).unwrap_or(0),
                    references: refs_of.remove(&id).unwrap_or_default(),
                    ca,
                    deriver,
                };
                out.insert(path, info);
            }
            Ok(out)
        })
    }

    /// Registers `paths`, records `realisations` and sets GC `roots` (name, path) in one
    /// transaction. Paths already valid are left as they are; every reference must be valid or
    /// among `paths`; every realisation's output and every root's path must be valid afterwards.
    /// Returns the paths that were newly registered.
    ///
    /// A fixed number of statements whatever the batch size (rows go in as JSON arrays through
    /// `json_each`), so a group commit of many registrations costs about what one does.
    /// (Tests; the store calls [`MetaDb::register_now`] from its group commit's thread.)
    #[cfg(test)]
    pub(crate) async fn register(
        &self,
        paths: &[Registration],
        realisations: &[(DrvOutput, String)],
        roots: &[(String, String)],
    ) -> Result<Vec<String>, StoreError> {
        let me = self.clone();
        let (paths, realisations, roots) = (paths.to_vec(), realisations.to_vec(), roots.to_vec());
        super::blocking(move || me.register_now(&paths, &realisations, &roots)).await
    }

    /// Registers paths, realisations and roots in one transaction, as described at
    /// `MetaDb::register`, on the calling thread, which must be one that may block (a
    /// `spawn_blocking` thread): the commit syncs the WAL.
    pub(crate) fn register_now(
        &self,
        paths: &[Registration],
        realisations: &[(DrvOutput, String)],
        roots: &[(String, String)],
    ) -> Result<Vec<String>, StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let rows: Vec<serde_json::Value> = paths
            .iter()
            .map(|i| {
                serde_json::json!([
                    i.path,
                    render_nix32(&i.nar_hash),
                    i64::try_from(i.nar_size).unwrap_or(i64::MAX),
                    i.ca,
                    i.deriver,
                ])
            })
            .collect();
        let rows = json_arg(&rows, "a registration")?;
        let refs: Vec<(String, Vec<String>)> = paths
            .iter()
            .map(|i| (i.path.clone(), i.references.iter().cloned().collect()))
            .collect();
        self.write_now(|conn| register_in(conn, now, &rows, &refs, realisations, roots))
    }

    /// [`MetaDb::is_valid`], synchronously (a read takes microseconds).
    pub(crate) fn is_valid_now(&self, path: &str) -> Result<bool, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT 1 FROM ValidPaths WHERE path = ?")
                .and_then(|mut s| s.exists([path]))
                .map_err(db_err("querying validity"))
        })
    }

    /// The valid paths among `paths` (one query per 500).
    pub(crate) async fn valid_among(
        &self,
        paths: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        self.read(|c| {
            let mut out = std::collections::HashSet::new();
            for chunk in paths.chunks(500) {
                let q = format!(
                    "SELECT path FROM ValidPaths WHERE path IN ({})",
                    vec!["?"; chunk.len()].join(",")
                );
                let found: Vec<String> = c
                    .prepare_cached(&q)
                    .and_then(|mut s| column0(&mut s, rusqlite::params_from_iter(chunk)))
                    .map_err(db_err("querying validity"))?;
                out.extend(found);
            }
            Ok(out)
        })
    }

    /// The realisations recorded for any output of `drvs` (one query per 500).
    pub(crate) async fn realisations_of(
        &self,
        drvs: &[String],
    ) -> Result<Vec<(DrvOutput, String)>, StoreError> {
        self.read(|c| {
            let mut out = Vec::new();
            for chunk in drvs.chunks(500) {
                let q = format!(
                    "SELECT r.drvPath, r.outputName, v.path FROM Realisations r
                     JOIN ValidPaths v ON v.id = r.outputPath WHERE r.drvPath IN ({})",
                    vec!["?"; chunk.len()].join(",")
                );
                let rows: Vec<(String, String, String)> = c
                    .prepare_cached(&q)
                    .and_then(|mut s| {
                        s.query_map(rusqlite::params_from_iter(chunk), |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })?
                        .collect()
                    })
                    .map_err(db_err("querying realisations"))?;
                out.extend(
                    rows.into_iter()
                        .map(|(drv, output, path)| (DrvOutput::new(drv, output), path)),
                );
            }
            Ok(out)
        })
    }

    pub(crate) async fn realisation(&self, key: &DrvOutput) -> Result<Option<String>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT v.path FROM Realisations r JOIN ValidPaths v ON v.id = r.outputPath
                 WHERE r.drvPath = ? AND r.outputName = ?",
            )
            .and_then(|mut s| {
                s.query_row(params![key.drv_path, key.output], |r| r.get(0))
                    .optional()
            })
            .map_err(db_err("querying a realisation"))
        })
    }

    #[cfg(test)]
    pub(crate) async fn add_realisation(
        &self,
        key: &DrvOutput,
        out_path: &str,
    ) -> Result<(), StoreError> {
        let realisation = [(key.clone(), out_path.to_string())];
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err("starting a transaction"))?;
            insert_realisations(&tx, &realisation)?;
            tx.commit().map_err(db_err("committing a realisation"))
        })
        .await
    }

    #[cfg(test)]
    pub(crate) async fn add_root(&self, name: &str, path: &str) -> Result<(), StoreError> {
        let (name, path) = (name.to_string(), path.to_string());
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO GcRoots (name, path) VALUES (?, ?)
                 ON CONFLICT(name) DO UPDATE SET path = excluded.path",
            )
            .and_then(|mut s| s.execute([name, path]))
            .map_err(db_err("adding a GC root"))?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn remove_root(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_string();
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM GcRoots WHERE name = ?")
                .and_then(|mut s| s.execute([name]))
                .map_err(db_err("removing a GC root"))?;
            Ok(())
        })
        .await
    }

    /// Every GC root: (name, path).
    pub(crate) async fn roots(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT name, path FROM GcRoots ORDER BY name")
                .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(db_err("listing GC roots"))
        })
    }

    /// The valid path whose hash part is `hash` (`<dir>/<hash>-…`), found by a range scan of the
    /// path index: every such path lies in `["<dir>/<hash>-", "<dir>/<hash>.")`.
    pub(crate) async fn path_from_hash_part(
        &self,
        store_dir: &str,
        hash: &str,
    ) -> Result<Option<String>, StoreError> {
        let lo = format!("{store_dir}/{hash}-");
        let hi = format!("{store_dir}/{hash}.");
        self.read(|c| {
            c.prepare_cached("SELECT path FROM ValidPaths WHERE path >= ? AND path < ? LIMIT 1")
                .and_then(|mut s| s.query_row([&lo, &hi], |r| r.get(0)).optional())
                .map_err(db_err("querying a path by its hash part"))
        })
    }

    /// A valid path whose NAR hashes to `nar_hash` (any one, if several have the same contents).
    pub(crate) async fn path_with_nar_hash(
        &self,
        nar_hash: &crate::store::hash::Sha256Hash,
    ) -> Result<Option<String>, StoreError> {
        let h = render_nix32(nar_hash);
        self.read(|c| {
            c.prepare_cached("SELECT path FROM ValidPaths WHERE narHash = ? LIMIT 1")
                .and_then(|mut s| s.query_row([&h], |r| r.get(0)).optional())
                .map_err(db_err("querying a path by its NAR hash"))
        })
    }

    /// Up to `limit` realisations recorded after row `after` (SQLite's rowid, in order), each
    /// with its row id, and the largest row id there is (0 when there is none).
    pub(crate) async fn realisations_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<(Vec<(i64, DrvOutput, String)>, i64), StoreError> {
        self.read(|c| {
            let rows: Vec<(i64, String, String, String)> = c
                .prepare_cached(
                    "SELECT r.rowid, r.drvPath, r.outputName, v.path FROM Realisations r
                     JOIN ValidPaths v ON v.id = r.outputPath
                     WHERE r.rowid > ? ORDER BY r.rowid LIMIT ?",
                )
                .and_then(|mut s| {
                    s.query_map(params![after, limit], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect()
                })
                .map_err(db_err("listing realisations"))?;
            let max: i64 = c
                .prepare_cached("SELECT coalesce(max(rowid), 0) FROM Realisations")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(db_err("listing realisations"))?;
            Ok((
                rows.into_iter()
                    .map(|(id, d, o, p)| (id, DrvOutput::new(d, o), p))
                    .collect(),
                max,
            ))
        })
    }

    /// Every valid path.
    pub(crate) async fn valid_paths(&self) -> Result<BTreeSet<String>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT path FROM ValidPaths")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(db_err("listing valid paths"))
        })
    }

    /// The closure of `paths` under references (the valid ones among them, and everything they
    /// refer to, recursively).
    pub(crate) async fn closure(
        &self,
        paths: impl IntoIterator<Item = &str>,
    ) -> Result<BTreeSet<String>, StoreError> {
        let list: Vec<&str> = paths.into_iter().collect();
        if list.is_empty() {
            return Ok(BTreeSet::new());
        }
        let json = json_arg(&list, "a path list")?;
        self.read(|c| {
            c.prepare_cached(
                "WITH RECURSIVE c(id) AS (
                     SELECT id FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))
                     UNION
                     SELECT r.reference FROM Refs r JOIN c ON r.referrer = c.id
                 )
                 SELECT v.path FROM ValidPaths v JOIN c ON v.id = c.id",
            )
            .and_then(|mut s| s.query_map([&json], |r| r.get(0))?.collect())
            .map_err(db_err("computing a closure"))
        })
    }

    /// Makes `paths` invalid in one transaction (their references, realisations and GC roots go
    /// with them). Fails if a valid path outside `paths` still refers to one of them.
    pub(crate) async fn invalidate(&self, paths: &BTreeSet<String>) -> Result<(), StoreError> {
        if paths.is_empty() {
            return Ok(());
        }
        let json = json_arg(paths, "a path list")?;
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err("starting a transaction"))?;
            tx.prepare_cached(
                "DELETE FROM Refs WHERE referrer IN
                     (SELECT id FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?)))",
            )
            .and_then(|mut s| s.execute([&json]))
            .map_err(db_err("removing references"))?;
            tx.prepare_cached("DELETE FROM GcRoots WHERE path IN (SELECT value FROM json_each(?))")
                .and_then(|mut s| s.execute([&json]))
                .map_err(db_err("removing GC roots"))?;
            tx.prepare_cached(
                "DELETE FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))",
            )
            .and_then(|mut s| s.execute([&json]))
            .map_err(|e| {
                StoreError::Metadata(format!(
                    "invalidating paths (a valid path still refers to one of them?): {e}"
                ))
            })?;
            tx.commit().map_err(db_err("committing an invalidation"))
        })
        .await
    }

    /// The valid paths that refer to any of `paths` (excluding `paths` themselves).
    pub(crate) async fn referrers(
        &self,
        paths: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, StoreError> {
        let json = json_arg(paths, "a path list")?;
        let found: Vec<String> = self.read(|c| {
            c.prepare_cached(
                "SELECT DISTINCT a.path FROM Refs r
                   JOIN ValidPaths a ON a.id = r.referrer
                   JOIN ValidPaths b ON b.id = r.reference
                 WHERE b.path IN (SELECT value FROM json_each(?))",
            )
            .and_then(|mut s| column0(&mut s, [&json]))
            .map_err(db_err("querying referrers"))
        })?;
        Ok(found.into_iter().filter(|p| !paths.contains(p)).collect())
    }
}

/// [`MetaDb::register`] on the writer connection: `rows` is the JSON of the paths' rows, `refs`
/// each path with its references.
fn register_in(
    conn: &mut Connection,
    now: i64,
    rows: &str,
    refs: &[(String, Vec<String>)],
    realisations: &[(DrvOutput, String)],
    roots: &[(String, String)],
) -> Result<Vec<String>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err("starting a transaction"))?;
    let new: std::collections::HashSet<String> = if refs.is_empty() {
        Default::default()
    } else {
        tx.prepare_cached(
            "INSERT INTO ValidPaths (path, narHash, narSize, ca, deriver, registrationTime)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, ?
             FROM json_each(?) WHERE true
             ON CONFLICT(path) DO NOTHING
             RETURNING path",
        )
        .and_then(|mut s| s.query_map(params![now, rows], |r| r.get(0))?.collect())
        .map_err(db_err("registering paths"))?
    };
    let pairs: Vec<(&str, &str)> = refs
        .iter()
        .filter(|(p, _)| new.contains(p))
        .flat_map(|(p, rs)| rs.iter().map(move |r| (p.as_str(), r.as_str())))
        .collect();
    if !pairs.is_empty() {
        let json = json_arg(&pairs, "a registration")?;
        let n = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO Refs (referrer, reference)
                 SELECT a.id, b.id FROM json_each(?) j
                 JOIN ValidPaths a ON a.path = j.value ->> 0
                 JOIN ValidPaths b ON b.path = j.value ->> 1",
            )
            .and_then(|mut s| s.execute([&json]))
            .map_err(db_err("registering references"))?;
        if n != pairs.len() {
            // A reference that is not valid (a row for a path registered just now cannot exist
            // already): name it.
            let refs: Vec<&str> = pairs.iter().map(|(_, r)| *r).collect();
            let refs = json_arg(&refs, "a registration")?;
            let missing: Option<String> = tx
                .prepare_cached(
                    "SELECT value FROM json_each(?)
                     WHERE value NOT IN (SELECT path FROM ValidPaths) LIMIT 1",
                )
                .and_then(|mut s| s.query_row([&refs], |r| r.get(0)).optional())
                .map_err(db_err("checking references"))?;
            let missing = missing.unwrap_or_else(|| "(unknown)".into());
            let referrer = pairs
                .iter()
                .find(|(_, r)| *r == missing)
                .map(|(p, _)| *p)
                .unwrap_or("a path");
            return Err(StoreError::Metadata(format!(
                "cannot register {referrer}: its reference {missing} is not valid"
            )));
        }
    }
    if !realisations.is_empty() {
        insert_realisations(&tx, realisations)?;
    }
    if !roots.is_empty() {
        let json = json_arg(roots, "a registration")?;
        let n = tx
            .prepare_cached(
                "INSERT INTO GcRoots (name, path)
                 SELECT j.value ->> 0, v.path FROM json_each(?) j
                 JOIN ValidPaths v ON v.path = j.value ->> 1 WHERE true
                 ON CONFLICT(name) DO UPDATE SET path = excluded.path",
            )
            .and_then(|mut s| s.execute([&json]))
            .map_err(db_err("adding GC roots"))?;
        if n != roots.len() {
            let valid: Vec<String> = tx
                .prepare_cached(
                    "SELECT path FROM ValidPaths WHERE path IN
                     (SELECT value ->> 1 FROM json_each(?))",
                )
                .and_then(|mut s| column0(&mut s, [&json]))
                .map_err(db_err("checking GC roots"))?;
            let missing = roots
                .iter()
                .find(|(_, p)| !valid.contains(p))
                .map(|(_, p)| p.clone())
                .unwrap_or_default();
            return Err(StoreError::NotValid(missing));
        }
    }
    tx.commit().map_err(db_err("committing a registration"))?;
    Ok(refs
        .iter()
        .filter(|(p, _)| new.contains(p))
        .map(|(p, _)| p.clone())
        .collect())
}

/// Records realisations (drv output → output path) in two statements: the known ones are
/// checked (an existing different one is a `RealisationConflict`), the rest inserted; every output
/// must be valid.
fn insert_realisations(
    tx: &rusqlite::Transaction<'_>,
    realisations: &[(DrvOutput, String)],
) -> Result<(), StoreError> {
    // One wanted path per key; two different ones in the same batch conflict.
    let mut wanted: std::collections::BTreeMap<(&str, &str), &str> = Default::default();
    for (k, out) in realisations {
        if let Some(prev) = wanted.insert((k.drv_path.as_str(), k.output.as_str()), out.as_str())
            && prev != out
        {
            return Err(StoreError::RealisationConflict {
                key: k.to_string(),
                existing: prev.to_string(),
                new: out.clone(),
            });
        }
    }
    let keys = json_arg(&wanted.keys().collect::<Vec<_>>(), "realisations")?;
    let existing: Vec<(String, String, String)> = tx
        .prepare_cached(
            "SELECT r.drvPath, r.outputName, v.path FROM json_each(?) j
             JOIN Realisations r ON r.drvPath = j.value ->> 0 AND r.outputName = j.value ->> 1
             JOIN ValidPaths v ON v.id = r.outputPath",
        )
        .and_then(|mut s| {
            s.query_map([&keys], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .map_err(db_err("querying realisations"))?;
    for (drv, output, path) in existing {
        let key = wanted
            .keys()
            .copied()
            .find(|(d, o)| *d == drv && *o == output);
        if let Some(out) = key.and_then(|k| wanted.remove(&k))
            && out != path
        {
            return Err(StoreError::RealisationConflict {
                key: DrvOutput::new(drv, output).to_string(),
                existing: path,
                new: out.to_string(),
            });
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let rows: Vec<[&str; 3]> = wanted.iter().map(|((d, o), p)| [*d, *o, *p]).collect();
    let rows = json_arg(&rows, "realisations")?;
    let n = tx
        .prepare_cached(
            "INSERT INTO Realisations (drvPath, outputName, outputPath)
             SELECT j.value ->> 0, j.value ->> 1, v.id FROM json_each(?) j
             JOIN ValidPaths v ON v.path = j.value ->> 2",
        )
        .and_then(|mut s| s.execute([&rows]))
        .map_err(db_err("recording realisations"))?;
    if n != wanted.len() {
        let outs = json_arg(&wanted.values().collect::<Vec<_>>(), "realisations")?;
        let missing: Option<String> = tx
            .prepare_cached(
                "SELECT value FROM json_each(?) WHERE value NOT IN (SELECT path FROM ValidPaths) LIMIT 1",
            )
            .and_then(|mut s| s.query_row([&outs], |r| r.get(0)).optional())
            .map_err(db_err("checking realisations"))?;
        return Err(StoreError::NotValid(missing.unwrap_or_default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::hash::sha256;

    fn info(path: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: path.to_string(),
            nar_hash: sha256(path.as_bytes()),
            nar_size: 120,
            references: refs.iter().map(|s| s.to_string()).collect(),
            ca: Some("text:sha256:x".into()),
            deriver: None,
        }
    }

    const A: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a";
    const B: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b";
    const C: &str = "/nix/store/cccccccccccccccccccccccccccccccc-c";

    #[tokio::test]
    async fn registration_references_and_closure() {
        let dir = tempfile::tempdir().unwrap();
        let db = MetaDb::open(&dir.path().join("s.sqlite")).await.unwrap();
        // A reference that is not valid (and not in the batch) is refused, atomically.
        let e = db.register(&[info(B, &[A])], &[], &[]).await.unwrap_err();
        assert!(e.to_string().contains("its reference"), "{e}");
        assert!(!db.is_valid(B).await.unwrap());
        // In one batch, with a self-reference and a cycle-free chain.
        let new = db
            .register(&[info(A, &[A]), info(B, &[A]), info(C, &[B])], &[], &[])
            .await
            .unwrap();
        assert_eq!(new.len(), 3);
        let i = db.path_info(C).await.unwrap().unwrap();
        assert_eq!(i, info(C, &[B]));
        assert_eq!(db.path_info(A).await.unwrap().unwrap().references.len(), 1);
        // In one read: the valid ones among them, each as `path_info` has it.
        let asked: BTreeSet<String> = [A, C, "/nix/store/dddddddddddddddddddddddddddddddd-d"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let infos = db.path_infos(&asked).await.unwrap();
        assert_eq!(infos.keys().collect::<Vec<_>>(), [A, C]);
        assert_eq!(infos[A], db.path_info(A).await.unwrap().unwrap());
        assert_eq!(infos[C], info(C, &[B]));
        assert!(db.path_infos(&BTreeSet::new()).await.unwrap().is_empty());
        let cl = db.closure([C]).await.unwrap();
        assert_eq!(cl, [A, B, C].iter().map(|s| s.to_string()).collect());
        // Re-registering is a no-op.
        assert!(
            db.register(&[info(A, &[])], &[], &[])
                .await
                .unwrap()
                .is_empty()
        );
        // Invalidation must not leave a dangling reference.
        let only_a: BTreeSet<String> = [A.to_string()].into();
        assert!(db.invalidate(&only_a).await.is_err());
        assert!(db.is_valid(A).await.unwrap());
        assert_eq!(db.referrers(&only_a).await.unwrap(), [B.to_string()].into());
        let all: BTreeSet<String> = [A, B, C].iter().map(|s| s.to_string()).collect();
        db.invalidate(&all).await.unwrap();
        assert!(db.valid_paths().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn realisations_conflict_and_cascade() {
        let dir = tempfile::tempdir().unwrap();
        let db = MetaDb::open(&dir.path().join("s.sqlite")).await.unwrap();
        let key = DrvOutput::new("/nix/store/dddddddddddddddddddddddddddddddd-x.drv", "out");
        // The output must be valid.
        assert!(matches!(
            db.add_realisation(&key, A).await,
            Err(StoreError::NotValid(_))
        ));
        db.register(
            &[info(A, &[]), info(B, &[])],
            &[(key.clone(), A.to_string())],
            &[],
        )
        .await
        .unwrap();
        assert_eq!(db.realisation(&key).await.unwrap().as_deref(), Some(A));
        db.add_realisation(&key, A).await.unwrap();
        let e = db.add_realisation(&key, B).await.unwrap_err();
        assert!(matches!(e, StoreError::RealisationConflict { .. }), "{e}");
        db.invalidate(&[A.to_string()].into()).await.unwrap();
        assert_eq!(db.realisation(&key).await.unwrap(), None);
    }

    #[tokio::test]
    async fn gc_roots_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.sqlite");
        {
            let db = MetaDb::open(&file).await.unwrap();
            db.register(&[info(A, &[])], &[], &[]).await.unwrap();
            // A root on a path that is not valid is refused with the rest of its transaction.
            assert!(matches!(
                db.register(&[info(B, &[])], &[], &[("r0".into(), C.into())])
                    .await,
                Err(StoreError::NotValid(_))
            ));
            assert!(!db.is_valid(B).await.unwrap());
            db.add_root("r1", A).await.unwrap();
            db.add_root("r2", A).await.unwrap();
            db.add_root("r2", B).await.unwrap();
            db.remove_root("r1").await.unwrap();
            db.close().await;
        }
        let db = MetaDb::open(&file).await.unwrap();
        assert!(db.is_valid(A).await.unwrap());
        assert_eq!(db.roots().await.unwrap(), vec![("r2".into(), B.into())]);
    }

    #[tokio::test]
    async fn closed_database_refuses_reads_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = MetaDb::open(&dir.path().join("s.sqlite")).await.unwrap();
        db.register(&[info(A, &[])], &[], &[]).await.unwrap();
        assert!(db.is_valid(A).await.unwrap());
        let other = db.clone();
        db.close().await;
        assert!(matches!(
            other.is_valid(A).await,
            Err(StoreError::Metadata(m)) if m.contains("closed")
        ));
        assert!(matches!(
            other.register(&[info(B, &[])], &[], &[]).await,
            Err(StoreError::Metadata(m)) if m.contains("closed")
        ));
    }

    /// Reads on many threads at once (more than the readers kept) while registrations commit:
    /// every read sees a consistent, committed state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reads_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = MetaDb::open(&dir.path().join("s.sqlite")).await.unwrap();
        db.register(&[info(A, &[])], &[], &[]).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..20 {
                    let p = format!("/nix/store/{t:0>16}{i:0>16}-p");
                    db.register(&[info(&p, &[A])], &[], &[]).await.unwrap();
                    assert!(db.is_valid(&p).await.unwrap());
                    let pi = db.path_info(&p).await.unwrap().unwrap();
                    assert_eq!(pi.references, [A.to_string()].into());
                    let cl = db.closure([p.as_str()]).await.unwrap();
                    assert_eq!(cl.len(), 2);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(db.valid_paths().await.unwrap().len(), 1 + 8 * 20);
        let only_a: BTreeSet<String> = [A.to_string()].into();
        assert_eq!(db.referrers(&only_a).await.unwrap().len(), 8 * 20);
        assert!(db.inner.readers.lock().unwrap().len() <= MAX_IDLE_READERS);
    }
}
