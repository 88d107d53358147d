//! The local store's metadata: a SQLite database (`<root>/.qr-meta/store.sqlite`) with the valid
//! paths, their references, realisations and GC roots, in the spirit of Nix's `db.sqlite`.
//!
//! The closure invariant is enforced by foreign keys: a path can only be registered if every path it
//! refers to is valid (or registered in the same transaction), and a path cannot be invalidated
//! while a valid path still refers to it (invalidate referrers first, as GC does). Realisations
//! point at valid paths and disappear with them.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

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

fn db_err(what: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |e| StoreError::Metadata(format!("{what}: {e}"))
}

/// The metadata database.
#[derive(Debug, Clone)]
pub(crate) struct MetaDb {
    pool: SqlitePool,
}

/// A path to register, with its metadata.
pub(crate) type Registration = PathInfo;

impl MetaDb {
    /// Opens (creating if needed) the database at `file`.
    pub(crate) async fn open(file: &Path) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(file)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed transaction survives a power loss, which the "contents first,
            // then metadata" ordering relies on.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(60));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // In-process: no ping round trip to the connection's worker before each use.
            .test_before_acquire(false)
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Metadata(format!("opening {}: {e}", file.display())))?;
        for stmt in SCHEMA {
            sqlx::query(stmt)
                .execute(&pool)
                .await
                .map_err(db_err("creating the schema"))?;
        }
        Ok(MetaDb { pool })
    }

    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) async fn is_valid(&self, path: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 FROM ValidPaths WHERE path = ?")
            .bind(path)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err("querying validity"))?;
        Ok(row.is_some())
    }

    pub(crate) async fn path_info(&self, path: &str) -> Result<Option<PathInfo>, StoreError> {
        let Some(row) =
            sqlx::query("SELECT id, narHash, narSize, ca, deriver FROM ValidPaths WHERE path = ?")
                .bind(path)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err("querying path info"))?
        else {
            return Ok(None);
        };
        let id: i64 = row.get(0);
        let nar_hash_s: String = row.get(1);
        let nar_hash = parse_sha256(&nar_hash_s)
            .map_err(|e| StoreError::Metadata(format!("{path}: stored narHash is corrupt: {e}")))?;
        let nar_size: i64 = row.get(2);
        let refs = sqlx::query(
            "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("querying references"))?;
        Ok(Some(PathInfo {
            path: path.to_string(),
            nar_hash,
            nar_size: u64::try_from(nar_size).unwrap_or(0),
            references: refs.iter().map(|r| r.get::<String, _>(0)).collect(),
            ca: row.get(3),
            deriver: row.get(4),
        }))
    }

    /// Registers `paths`, records `realisations` and sets GC `roots` (name, path) in one
    /// transaction. Paths already valid are left as they are; every reference must be valid or
    /// among `paths`; every realisation's output and every root's path must be valid afterwards.
    /// Returns the paths that were newly registered.
    ///
    /// A fixed number of statements whatever the batch size (rows go in as JSON arrays through
    /// `json_each`), so a group commit of many registrations costs about what one does.
    pub(crate) async fn register(
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
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err("starting a transaction"))?;
        let new: std::collections::HashSet<String> = if paths.is_empty() {
            Default::default()
        } else {
            sqlx::query_scalar::<_, String>(
                "INSERT INTO ValidPaths (path, narHash, narSize, ca, deriver, registrationTime)
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, ?
                 FROM json_each(?) WHERE true
                 ON CONFLICT(path) DO NOTHING
                 RETURNING path",
            )
            .bind(now)
            .bind(&rows)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err("registering paths"))?
            .into_iter()
            .collect()
        };
        let pairs: Vec<(&str, &str)> = paths
            .iter()
            .filter(|i| new.contains(&i.path))
            .flat_map(|i| {
                i.references
                    .iter()
                    .map(move |r| (i.path.as_str(), r.as_str()))
            })
            .collect();
        if !pairs.is_empty() {
            let json = json_arg(&pairs, "a registration")?;
            let r = sqlx::query(
                "INSERT OR IGNORE INTO Refs (referrer, reference)
                 SELECT a.id, b.id FROM json_each(?) j
                 JOIN ValidPaths a ON a.path = j.value ->> 0
                 JOIN ValidPaths b ON b.path = j.value ->> 1",
            )
            .bind(&json)
            .execute(&mut *tx)
            .await
            .map_err(db_err("registering references"))?;
            if r.rows_affected() != pairs.len() as u64 {
                // A reference that is not valid (a row for a path registered just now cannot
                // exist already): name it.
                let refs: Vec<&str> = pairs.iter().map(|(_, r)| *r).collect();
                let refs = json_arg(&refs, "a registration")?;
                let missing: Option<String> = sqlx::query_scalar(
                    "SELECT value FROM json_each(?)
                     WHERE value NOT IN (SELECT path FROM ValidPaths) LIMIT 1",
                )
                .bind(&refs)
                .fetch_optional(&mut *tx)
                .await
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
            insert_realisations(&mut tx, realisations).await?;
        }
        if !roots.is_empty() {
            let json = json_arg(roots, "a registration")?;
            let r = sqlx::query(
                "INSERT INTO GcRoots (name, path)
                 SELECT j.value ->> 0, v.path FROM json_each(?) j
                 JOIN ValidPaths v ON v.path = j.value ->> 1 WHERE true
                 ON CONFLICT(name) DO UPDATE SET path = excluded.path",
            )
            .bind(&json)
            .execute(&mut *tx)
            .await
            .map_err(db_err("adding GC roots"))?;
            if r.rows_affected() != roots.len() as u64 {
                let valid = sqlx::query_scalar::<_, String>(
                    "SELECT path FROM ValidPaths WHERE path IN
                     (SELECT value ->> 1 FROM json_each(?))",
                )
                .bind(&json)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err("checking GC roots"))?;
                let missing = roots
                    .iter()
                    .find(|(_, p)| !valid.contains(p))
                    .map(|(_, p)| p.clone())
                    .unwrap_or_default();
                return Err(StoreError::NotValid(missing));
            }
        }
        tx.commit()
            .await
            .map_err(db_err("committing a registration"))?;
        Ok(paths
            .iter()
            .filter(|i| new.contains(&i.path))
            .map(|i| i.path.clone())
            .collect())
    }

    /// The valid paths among `paths` (one query per 500).
    pub(crate) async fn valid_among(
        &self,
        paths: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut out = std::collections::HashSet::new();
        for chunk in paths.chunks(500) {
            let q = format!(
                "SELECT path FROM ValidPaths WHERE path IN ({})",
                vec!["?"; chunk.len()].join(",")
            );
            let mut query = sqlx::query_scalar::<_, String>(&q).persistent(false);
            for p in chunk {
                query = query.bind(p);
            }
            out.extend(
                query
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err("querying validity"))?,
            );
        }
        Ok(out)
    }

    /// The realisations recorded for any output of `drvs` (one query per 500).
    pub(crate) async fn realisations_of(
        &self,
        drvs: &[String],
    ) -> Result<Vec<(DrvOutput, String)>, StoreError> {
        let mut out = Vec::new();
        for chunk in drvs.chunks(500) {
            let q = format!(
                "SELECT r.drvPath, r.outputName, v.path FROM Realisations r
                 JOIN ValidPaths v ON v.id = r.outputPath WHERE r.drvPath IN ({})",
                vec!["?"; chunk.len()].join(",")
            );
            let mut query = sqlx::query(&q).persistent(false);
            for p in chunk {
                query = query.bind(p);
            }
            for row in query
                .fetch_all(&self.pool)
                .await
                .map_err(db_err("querying realisations"))?
            {
                out.push((
                    DrvOutput::new(row.get::<String, _>(0), row.get::<String, _>(1)),
                    row.get(2),
                ));
            }
        }
        Ok(out)
    }

    pub(crate) async fn realisation(&self, key: &DrvOutput) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "SELECT v.path FROM Realisations r JOIN ValidPaths v ON v.id = r.outputPath
             WHERE r.drvPath = ? AND r.outputName = ?",
        )
        .bind(&key.drv_path)
        .bind(&key.output)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err("querying a realisation"))?;
        Ok(row.map(|r| r.get(0)))
    }

    #[cfg(test)]
    pub(crate) async fn add_realisation(
        &self,
        key: &DrvOutput,
        out_path: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err("starting a transaction"))?;
        insert_realisations(&mut tx, &[(key.clone(), out_path.to_string())]).await?;
        tx.commit()
            .await
            .map_err(db_err("committing a realisation"))
    }

    #[cfg(test)]
    pub(crate) async fn add_root(&self, name: &str, path: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO GcRoots (name, path) VALUES (?, ?)
             ON CONFLICT(name) DO UPDATE SET path = excluded.path",
        )
        .bind(name)
        .bind(path)
        .execute(&self.pool)
        .await
        .map_err(db_err("adding a GC root"))?;
        Ok(())
    }

    pub(crate) async fn remove_root(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM GcRoots WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(db_err("removing a GC root"))?;
        Ok(())
    }

    /// Every GC root: (name, path).
    pub(crate) async fn roots(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT name, path FROM GcRoots ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("listing GC roots"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Every valid path.
    pub(crate) async fn valid_paths(&self) -> Result<BTreeSet<String>, StoreError> {
        let rows = sqlx::query("SELECT path FROM ValidPaths")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("listing valid paths"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
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
        let rows = sqlx::query(
            "WITH RECURSIVE c(id) AS (
                 SELECT id FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))
                 UNION
                 SELECT r.reference FROM Refs r JOIN c ON r.referrer = c.id
             )
             SELECT v.path FROM ValidPaths v JOIN c ON v.id = c.id",
        )
        .bind(json)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("computing a closure"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Makes `paths` invalid in one transaction (their references, realisations and GC roots go
    /// with them). Fails if a valid path outside `paths` still refers to one of them.
    pub(crate) async fn invalidate(&self, paths: &BTreeSet<String>) -> Result<(), StoreError> {
        if paths.is_empty() {
            return Ok(());
        }
        let json = json_arg(paths, "a path list")?;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err("starting a transaction"))?;
        sqlx::query(
            "DELETE FROM Refs WHERE referrer IN
                 (SELECT id FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?)))",
        )
        .bind(&json)
        .execute(&mut *tx)
        .await
        .map_err(db_err("removing references"))?;
        sqlx::query("DELETE FROM GcRoots WHERE path IN (SELECT value FROM json_each(?))")
            .bind(&json)
            .execute(&mut *tx)
            .await
            .map_err(db_err("removing GC roots"))?;
        sqlx::query("DELETE FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))")
            .bind(&json)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                StoreError::Metadata(format!(
                    "invalidating paths (a valid path still refers to one of them?): {e}"
                ))
            })?;
        tx.commit()
            .await
            .map_err(db_err("committing an invalidation"))
    }

    /// The valid paths that refer to any of `paths` (excluding `paths` themselves).
    pub(crate) async fn referrers(
        &self,
        paths: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, StoreError> {
        let json = json_arg(paths, "a path list")?;
        let rows = sqlx::query(
            "SELECT DISTINCT a.path FROM Refs r
               JOIN ValidPaths a ON a.id = r.referrer
               JOIN ValidPaths b ON b.id = r.reference
             WHERE b.path IN (SELECT value FROM json_each(?))",
        )
        .bind(json)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("querying referrers"))?;
        Ok(rows
            .iter()
            .map(|r| r.get::<String, _>(0))
            .filter(|p| !paths.contains(p))
            .collect())
    }
}

/// Records realisations (drv output → output path) in two statements: the known ones are
/// checked (an existing different one is a `RealisationConflict`), the rest inserted; every output
/// must be valid.
async fn insert_realisations(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
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
    let existing = sqlx::query(
        "SELECT r.drvPath, r.outputName, v.path FROM json_each(?) j
         JOIN Realisations r ON r.drvPath = j.value ->> 0 AND r.outputName = j.value ->> 1
         JOIN ValidPaths v ON v.id = r.outputPath",
    )
    .bind(&keys)
    .fetch_all(&mut **tx)
    .await
    .map_err(db_err("querying realisations"))?;
    for row in existing {
        let (drv, output, path): (String, String, String) = (row.get(0), row.get(1), row.get(2));
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
    let r = sqlx::query(
        "INSERT INTO Realisations (drvPath, outputName, outputPath)
         SELECT j.value ->> 0, j.value ->> 1, v.id FROM json_each(?) j
         JOIN ValidPaths v ON v.path = j.value ->> 2",
    )
    .bind(&rows)
    .execute(&mut **tx)
    .await
    .map_err(db_err("recording realisations"))?;
    if r.rows_affected() != wanted.len() as u64 {
        let outs = json_arg(&wanted.values().collect::<Vec<_>>(), "realisations")?;
        let missing: Option<String> = sqlx::query_scalar(
            "SELECT value FROM json_each(?) WHERE value NOT IN (SELECT path FROM ValidPaths) LIMIT 1",
        )
        .bind(&outs)
        .fetch_optional(&mut **tx)
        .await
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
}
