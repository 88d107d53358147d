//! The native local store: store objects as plain files under a physical root, metadata in SQLite.
//!
//! - The logical store dir (the prefix of every path, e.g. `/nix/store`) and the physical root (where
//!   the files are) may differ, like Nix's `local?root=X`: `<dir>/<hash>-<name>` lives at
//!   `<root>/<hash>-<name>`.
//! - Metadata (valid paths, references, realisations, GC roots) is in
//!   `<root>/.qr-meta/store.sqlite` (a dot-name is never a store path).
//! - Crash safety: a path's contents are written under a temporary dot-name in the root,
//!   canonicalised and fsynced, renamed into place and the root fsynced, and only then is the
//!   metadata transaction committed. On open (when no other process has the store open), every
//!   entry of the root that is not registered is removed, as is every temporary dot-entry, and a
//!   registered path whose contents are missing is invalidated (with its referrers). So a killed
//!   process never leaves a path registered without contents, nor contents visible without
//!   registration.
//! - Concurrency: in-process operations that put contents in place hold a reservation on the base
//!   name (so build-time checks for stray writes ignore them) and a write lock (an async mutex plus
//!   an `flock` on `.qr-meta/write.lock` for other processes) around "rename, commit".

mod import;
mod meta;
mod valid_cache;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::api::{PathInfo, Store, StoreError};
use super::aterm;
use super::derivation::Derivation;
use super::hash::{Sha256Hash, render_nix32, sha256};
use super::nar::{HashingWriter, NarEvent, NarReader, dump_path, nar_hash_and_size, restore};
use super::nix32;
use super::path::{StoreDir, StorePath};
use super::realisation::DrvOutput;

pub use super::fsutil::remove_tree;
pub(crate) use super::fsutil::{canonicalise, fsync_tree, move_tree};
pub use import::ImportReport;

use super::fsutil::{self, FileLock, LockMode, fsync_dir, rename_noreplace};
use meta::MetaDb;
use valid_cache::ValidCache;

/// The directory under the root that holds the metadata (never a store path: it starts with a dot).
pub const META_DIR: &str = ".qr-meta";

/// Points where a fault can be injected (tests of crash safety).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Contents are in place and fsynced; the metadata transaction has not been committed.
    BeforeRegister,
}

/// A fault-injection hook: returning `Err(message)` makes the operation fail at that point (as a
/// crash would, without cleaning up); it may also abort the process.
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> Result<(), String> + Send + Sync>;

/// The environment variable that installs a fault at open time (for crash tests of the binary;
/// feature `test-hooks` only): `abort-before-register` aborts the process at
/// [`FaultPoint::BeforeRegister`].
#[cfg(feature = "test-hooks")]
pub const FAULT_ENV: &str = "QR_STORE_FAULT";

/// A path whose contents are ready (under a temporary name in the root, or already at their final
/// place) and the metadata to register them with.
#[derive(Debug, Clone)]
pub struct StagedPath {
    pub info: PathInfo,
    /// Where the contents are now; must be on the root's filesystem for an atomic rename.
    pub staged: PathBuf,
}

/// A temporary directory in the root (`.qr-tmp-…`), removed (even if read-only) on drop.
#[derive(Debug)]
pub struct StagingDir {
    path: PathBuf,
}

impl StagingDir {
    /// Creates `<root>/.qr-<kind>-XXXXXX`.
    pub fn new(root: &Path, kind: &str) -> Result<Self, StoreError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!(".qr-{kind}-"))
            .tempdir_in(root)
            .map_err(|source| StoreError::Io {
                op: "creating a staging directory in",
                path: root.to_path_buf(),
                source,
            })?;
        Ok(StagingDir { path: dir.keep() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A unique name in the root (`.qr-tmp-<pid>-<n>`; short, so any store name fits) for contents
/// being written, with no directory around them: whatever is still there on drop (the contents were not moved into
/// place) is removed. A crash leaves a dot-entry that the next open removes.
#[derive(Debug)]
pub struct StagingPath {
    path: PathBuf,
}

impl StagingPath {
    pub fn new(root: &Path) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        StagingPath {
            path: root.join(format!(".qr-tmp-{}-{n}", std::process::id())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagingPath {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok()
            && let Err(e) = remove_tree(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove staged contents");
        }
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a staging directory");
        }
    }
}

type ReservationMap = Arc<Mutex<HashMap<String, usize>>>;

/// Base names reserved by an in-process operation (a build's outputs, a path being added): their
/// appearance in the root is expected. Released on drop.
#[derive(Debug)]
pub struct Reservation {
    names: Vec<String>,
    map: ReservationMap,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for n in &self.names {
            if let Some(c) = m.get_mut(n) {
                *c -= 1;
                if *c == 0 {
                    m.remove(n);
                }
            }
        }
    }
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub deleted: Vec<String>,
    pub bytes_freed: u64,
}

/// The native local store.
pub struct LocalStore {
    store_dir: StoreDir,
    root: PathBuf,
    db: MetaDb,
    rt: tokio::runtime::Handle,
    reservations: ReservationMap,
    write_mutex: tokio::sync::Mutex<()>,
    /// Registrations waiting for the write lock: whoever takes it commits them all (group commit).
    group: Mutex<Vec<GroupReq>>,
    /// Paths known valid (positive answers only; see [`ValidCache`]).
    valid: Arc<ValidCache>,
    /// Off only to fill a scratch store quickly (`qr bench` setup): contents are not fsynced.
    no_fsync: std::sync::atomic::AtomicBool,
    fault: Mutex<Option<FaultHook>>,
    _open_lock: FileLock,
}

/// One caller's registration, waiting to be committed with others.
struct GroupReq {
    items: Vec<(PathInfo, PathBuf, PathBuf)>,
    realisations: Vec<(DrvOutput, String)>,
    roots: Vec<(String, String)>,
    reply: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("store_dir", &self.store_dir)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Metadata(format!("a blocking store task failed: {e}")))?
}

impl LocalStore {
    /// Opens (creating if needed) the store with logical dir `store_dir` at physical `root`.
    /// Must be called inside a tokio runtime (its handle serves the blocking NAR methods).
    pub async fn open(store_dir: StoreDir, root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = std::path::absolute(root.into()).map_err(io_err("resolving", Path::new(".")))?;
        let meta_dir = root.join(META_DIR);
        fs::create_dir_all(&meta_dir).map_err(io_err("creating", &meta_dir))?;
        let lock_path = meta_dir.join("lock");
        // Exclusive: nobody else has the store open, so unregistered entries are garbage.
        let (open_lock, recover) = {
            let lp = lock_path.clone();
            blocking(move || match FileLock::try_lock(&lp, LockMode::Exclusive) {
                Ok(Some(l)) => Ok((l, true)),
                Ok(None) => FileLock::lock(&lp, LockMode::Shared)
                    .map(|l| (l, false))
                    .map_err(io_err("locking", &lp)),
                Err(e) => Err(io_err("locking", &lp)(e)),
            })
            .await?
        };
        let db = MetaDb::open(&meta_dir.join("store.sqlite")).await?;
        #[cfg(feature = "test-hooks")]
        let fault: Option<FaultHook> = match std::env::var(FAULT_ENV).as_deref() {
            Ok("abort-before-register") => Some(Arc::new(|p| {
                if p == FaultPoint::BeforeRegister {
                    eprintln!("qr: {FAULT_ENV}: aborting before registering a path");
                    std::process::abort();
                }
                Ok(())
            })),
            _ => None,
        };
        #[cfg(not(feature = "test-hooks"))]
        let fault: Option<FaultHook> = None;
        let store = LocalStore {
            store_dir,
            root,
            db,
            rt: tokio::runtime::Handle::current(),
            reservations: Arc::new(Mutex::new(HashMap::new())),
            write_mutex: tokio::sync::Mutex::new(()),
            group: Mutex::new(Vec::new()),
            valid: Arc::default(),
            no_fsync: Default::default(),
            fault: Mutex::new(fault),
            _open_lock: open_lock,
        };
        if recover {
            store.recover().await?;
            store
                ._open_lock
                .set(LockMode::Shared, true)
                .map_err(io_err("locking", &lock_path))?;
        }
        Ok(store)
    }

    /// Opens the store a configuration names (`[store] dir` and `root`).
    pub async fn open_config(cfg: &crate::config::StoreConfig) -> Result<Self, StoreError> {
        Self::open(StoreDir::new(cfg.dir.clone())?, PathBuf::from(&cfg.root)).await
    }

    /// Closes the metadata database (pending writes are already committed).
    pub async fn close(&self) {
        self.db.close().await;
    }

    /// The physical root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True when the logical store dir is not where the files are, so builders must see the store
    /// through a private mount namespace.
    pub fn needs_namespace(&self) -> bool {
        Path::new(self.store_dir.as_str()) != self.root
    }

    /// Whether contents (and the root) are fsynced before registration: on unless turned off
    /// with [`LocalStore::set_fsync`].
    pub fn fsync(&self) -> bool {
        !self.no_fsync.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns the fsync of contents and of metadata commits off (or back on). Off, a power loss
    /// may leave registered paths with missing contents or lose registrations: only for scratch
    /// stores (benchmark setup, `qr bench --no-fsync`).
    pub fn set_fsync(&self, on: bool) {
        self.no_fsync
            .store(!on, std::sync::atomic::Ordering::Relaxed);
        self.db.set_synchronous(on);
    }

    /// Installs (or removes) a fault-injection hook (unit tests, and the feature `test-hooks`).
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn set_fault_hook(&self, hook: Option<FaultHook>) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// Reserves base names (see [`Reservation`]).
    pub fn reserve(&self, names: impl IntoIterator<Item = String>) -> Reservation {
        let names: Vec<String> = names.into_iter().collect();
        let mut m = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
        for n in &names {
            *m.entry(n.clone()).or_insert(0) += 1;
        }
        Reservation {
            names,
            map: self.reservations.clone(),
        }
    }

    /// [`Store::is_valid_path`] from a blocking context (a `spawn_blocking` thread; not from a
    /// runtime worker).
    pub fn is_valid_path_blocking(&self, path: &str) -> Result<bool, StoreError> {
        self.store_dir.parse(path)?;
        self.rt.block_on(self.is_valid_cached(path))
    }

    /// Whether `path` is valid: from the cache when known, else from the metadata database.
    async fn is_valid_cached(&self, path: &str) -> Result<bool, StoreError> {
        valid_via_cache(&self.valid, &self.db, path)
    }

    /// The valid paths among `paths`: the cache first, the database for the rest.
    async fn valid_among_cached(
        &self,
        paths: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut out = std::collections::HashSet::new();
        let mut unknown = Vec::new();
        for p in paths {
            if self.valid.contains(p) {
                out.insert(p.clone());
            } else {
                unknown.push(p.clone());
            }
        }
        if !unknown.is_empty() {
            let found = self.db.valid_among(&unknown).await?;
            self.valid.insert(found.iter().map(String::as_str));
            out.extend(found);
        }
        Ok(out)
    }

    /// Whether an in-process operation expects `base_name` to appear in the root.
    pub fn is_reserved(&self, base_name: &str) -> bool {
        self.reservations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(base_name)
    }

    /// The physical location of a store path (given as a [`StorePath`]).
    pub fn physical(&self, p: &StorePath) -> PathBuf {
        self.root.join(p.base_name())
    }

    /// The infos of the valid paths among `paths`, by path, in one read of the metadata.
    pub async fn query_path_infos(
        &self,
        paths: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, PathInfo>, StoreError> {
        for p in paths {
            self.store_dir.parse(p)?;
        }
        self.db.path_infos(paths).await
    }

    /// The closure of `paths` under references (valid paths only).
    pub async fn closure(
        &self,
        paths: impl IntoIterator<Item = &str>,
    ) -> Result<BTreeSet<String>, StoreError> {
        self.db.closure(paths).await
    }

    /// The valid path whose hash part (the 32 characters after the store dir) is `hash`.
    pub async fn path_from_hash_part(&self, hash: &str) -> Result<Option<String>, StoreError> {
        self.db
            .path_from_hash_part(self.store_dir.as_str(), hash)
            .await
    }

    /// A valid path whose NAR hashes to `nar_hash`.
    pub async fn path_with_nar_hash(
        &self,
        nar_hash: &Sha256Hash,
    ) -> Result<Option<String>, StoreError> {
        self.db.path_with_nar_hash(nar_hash).await
    }

    /// Up to `limit` realisations recorded after row `after`, in the order they were recorded
    /// (row id, key, output path), and the largest row id there is. A follower keeps the last
    /// row id it saw; a largest row id below it means rows were removed (GC) and it should
    /// resume from there.
    pub async fn realisations_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<(Vec<(i64, DrvOutput, String)>, i64), StoreError> {
        self.db.realisations_after(after, limit).await
    }

    /// Every valid path.
    pub async fn valid_paths(&self) -> Result<BTreeSet<String>, StoreError> {
        self.db.valid_paths().await
    }

    /// Every GC root: (name, path).
    pub async fn gc_roots(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.db.roots().await
    }

    /// Takes the write lock: in-process mutex, then the cross-process `flock`.
    async fn write_lock(&self) -> Result<(tokio::sync::MutexGuard<'_, ()>, FileLock), StoreError> {
        let g = self.write_mutex.lock().await;
        let p = self.root.join(META_DIR).join("write.lock");
        let l = blocking(move || {
            FileLock::lock(&p, LockMode::Exclusive).map_err(io_err("locking", &p))
        })
        .await?;
        Ok((g, l))
    }

    /// Registers paths whose contents are staged (or already in place), with `realisations`, in
    /// one transaction: contents are canonicalised and fsynced, renamed into place, the root is
    /// fsynced, then the metadata is committed. Paths already valid keep their existing contents
    /// (the staged copy is discarded). Returns the registered infos (the store's, for paths that
    /// were already valid).
    pub async fn register_staged(
        &self,
        items: Vec<StagedPath>,
        realisations: Vec<(DrvOutput, String)>,
    ) -> Result<Vec<PathInfo>, StoreError> {
        self.commit_registration(&items, realisations, vec![])
            .await?;
        let mut out = Vec::with_capacity(items.len());
        for it in &items {
            match self.db.path_info(&it.info.path).await? {
                Some(i) => out.push(i),
                None => return Err(StoreError::NotValid(it.info.path.clone())),
            }
        }
        Ok(out)
    }

    /// What [`LocalStore::register_staged`] commits, plus GC `roots` (name, path) set in the same
    /// transaction, through the group commit. Realisations and roots alone (no items) are
    /// group-committed too, so a busy runner shares one metadata fsync among many of them.
    async fn commit_registration(
        &self,
        items: &[StagedPath],
        realisations: Vec<(DrvOutput, String)>,
        roots: Vec<(String, String)>,
    ) -> Result<(), StoreError> {
        let mut dests = Vec::with_capacity(items.len());
        for it in items {
            let sp = self.store_dir.parse(&it.info.path)?;
            dests.push(self.physical(&sp));
        }
        let _res = self.reserve(
            items
                .iter()
                .filter_map(|i| self.store_dir.parse(&i.info.path).ok())
                .map(|p| p.base_name()),
        );
        if !items.is_empty() {
            let staged: Vec<PathBuf> = items.iter().map(|i| i.staged.clone()).collect();
            let sync = self.fsync();
            blocking(move || {
                for s in &staged {
                    canonicalise(s).map_err(io_err("canonicalising", s))?;
                    if sync {
                        fsync_tree(s).map_err(io_err("syncing", s))?;
                    }
                }
                Ok(())
            })
            .await?;
        }
        // Group commit: queue this registration; whoever holds the write lock next commits every
        // queued one (one directory fsync, one metadata transaction), so concurrent callers
        // share the fsyncs. The order per path is unchanged: contents in place and the root
        // fsynced, then the metadata committed.
        let (reply, done) = tokio::sync::oneshot::channel();
        self.group
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(GroupReq {
                items: items
                    .iter()
                    .zip(&dests)
                    .map(|(it, d)| (it.info.clone(), it.staged.clone(), d.clone()))
                    .collect(),
                realisations,
                roots,
                reply,
            });
        {
            // The in-process lock here; the cross-process one, the moves and the metadata
            // transaction on one blocking thread (one hand-off for the whole group).
            let _held = self.write_mutex.lock().await;
            let batch = std::mem::take(&mut *self.group.lock().unwrap_or_else(|p| p.into_inner()));
            if !batch.is_empty() {
                let c = GroupCommit {
                    root: self.root.clone(),
                    db: self.db.clone(),
                    valid: self.valid.clone(),
                    fsync: self.fsync(),
                    fault: self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                };
                if let Err(e) = tokio::task::spawn_blocking(move || c.commit(batch)).await {
                    // The replies went with the batch: each caller sees it below.
                    tracing::error!(error = %e, "a group commit of the store failed");
                }
            }
        }
        done.await.map_err(|_| {
            StoreError::Metadata("a registration was dropped before it committed".into())
        })?
    }

    /// [`Store::add_text`], also setting the GC root `<root_prefix><base name>` on the path in
    /// the same transaction when `root_prefix` is given. The contents are staged as one file (no
    /// staging directory) and hashed in memory.
    async fn add_text_rooted(
        &self,
        name: &str,
        contents: &str,
        references: &BTreeSet<String>,
        root_prefix: Option<&str>,
    ) -> Result<String, StoreError> {
        for r in references {
            self.store_dir.parse(r)?;
        }
        crate::store::path::validate_name(name).map_err(|why| {
            StoreError::BadPath(crate::store::StorePathError::BadName {
                path: name.to_string(),
                why,
            })
        })?;
        let sp = self.store_dir.make_text_path(
            name,
            contents.as_bytes(),
            references.iter().map(String::as_str),
        );
        let path = self.store_dir.print(&sp);
        let roots: Vec<(String, String)> = root_prefix
            .map(|p| vec![(format!("{p}{}", sp.base_name()), path.clone())])
            .unwrap_or_default();
        if self.is_valid_cached(&path).await? {
            if !roots.is_empty() {
                self.commit_registration(&[], vec![], roots).await?;
            }
            return Ok(path);
        }
        if !references.is_empty() {
            let wanted: Vec<String> = references.iter().cloned().collect();
            let valid = self.valid_among_cached(&wanted).await?;
            if let Some(r) = wanted.into_iter().find(|r| !valid.contains(r)) {
                return Err(StoreError::NotValid(r));
            }
        }
        let nar = crate::store::nar::NarTree::file(contents.as_bytes().to_vec())
            .to_nar()
            .map_err(|e| StoreError::Nar {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let staging = StagingPath::new(&self.root);
        let staged = staging.path().to_path_buf();
        fs::write(&staged, contents).map_err(io_err("writing", &staged))?;
        let info = PathInfo {
            path: path.clone(),
            nar_hash: sha256(&nar),
            nar_size: nar.len() as u64,
            references: references.clone(),
            ca: Some(format!(
                "text:sha256:{}",
                nix32::encode(&sha256(contents.as_bytes()))
            )),
            deriver: None,
        };
        self.commit_registration(&[StagedPath { info, staged }], vec![], roots)
            .await?;
        Ok(path)
    }

    /// Adds the tree at `src` (copied) as a source path named `name` with no references; returns
    /// its path.
    pub async fn add_source_path(&self, name: &str, src: &Path) -> Result<String, StoreError> {
        let staging = StagingDir::new(&self.root, "tmp")?;
        let staged = staging.path().join("o");
        let (src2, st2) = (src.to_path_buf(), staged.clone());
        let (hash, size) = blocking(move || {
            fsutil::copy_tree(&src2, &st2).map_err(io_err("copying", &src2))?;
            nar_hash_and_size(&st2).map_err(|e| StoreError::Nar {
                path: st2.display().to_string(),
                message: e.to_string(),
            })
        })
        .await?;
        let path = self
            .store_dir
            .print(&self.store_dir.make_source_path(name, &hash, [], false));
        let info = PathInfo {
            path: path.clone(),
            nar_hash: hash,
            nar_size: size,
            references: BTreeSet::new(),
            ca: Some(format!("fixed:r:sha256:{}", nix32::encode(&hash))),
            deriver: None,
        };
        self.register_staged(vec![StagedPath { info, staged }], vec![])
            .await?;
        Ok(path)
    }

    /// On open with the exclusive lock: removes temporary and unregistered entries, invalidates
    /// registered paths without contents.
    async fn recover(&self) -> Result<(), StoreError> {
        let entries = fs::read_dir(&self.root).map_err(io_err("listing", &self.root))?;
        for e in entries {
            let e = e.map_err(io_err("listing", &self.root))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name == META_DIR {
                continue;
            }
            let remove = if name.starts_with('.') {
                true
            } else {
                let logical = format!("{}/{}", self.store_dir, name);
                !self.db.is_valid(&logical).await?
            };
            if remove {
                tracing::warn!(entry = %name, root = %self.root.display(),
                    "removing an unregistered store entry (left by an interrupted operation)");
                let p = e.path();
                remove_tree(&p).map_err(io_err("removing", &p))?;
            }
        }
        let mut missing = BTreeSet::new();
        for p in self.db.valid_paths().await? {
            let phys = match self.store_dir.parse(&p) {
                Ok(sp) => self.physical(&sp),
                Err(_) => {
                    missing.insert(p);
                    continue;
                }
            };
            if fs::symlink_metadata(&phys).is_err() {
                missing.insert(p);
            }
        }
        if !missing.is_empty() {
            // A valid path's referrers must go too (the closure invariant).
            loop {
                let more = self.db.referrers(&missing).await?;
                if more.is_empty() {
                    break;
                }
                missing.extend(more);
            }
            tracing::warn!(
                count = missing.len(),
                "invalidating registered paths whose contents are missing"
            );
            self.db.invalidate(&missing).await?;
            self.valid.remove(missing.iter().map(String::as_str));
            for p in &missing {
                if let Ok(sp) = self.store_dir.parse(p) {
                    let phys = self.physical(&sp);
                    remove_tree(&phys).map_err(io_err("removing", &phys))?;
                }
            }
        }
        Ok(())
    }

    /// Deletes every valid path not reachable from a GC root or from an in-process reservation
    /// (a running build's inputs and outputs). Metadata goes first, then the contents (moved aside,
    /// then removed), so a crash in between leaves unregistered contents that the next open
    /// removes.
    pub async fn collect_garbage(&self) -> Result<GcReport, StoreError> {
        let (_g, _l) = self.write_lock().await?;
        let mut live_roots: Vec<String> =
            self.db.roots().await?.into_iter().map(|(_, p)| p).collect();
        {
            let m = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
            live_roots.extend(m.keys().map(|b| format!("{}/{}", self.store_dir, b)));
        }
        let live = self
            .db
            .closure(live_roots.iter().map(String::as_str))
            .await?;
        let dead: BTreeSet<String> = self
            .db
            .valid_paths()
            .await?
            .into_iter()
            .filter(|p| !live.contains(p))
            .collect();
        let mut report = GcReport::default();
        if dead.is_empty() {
            return Ok(report);
        }
        let mut sizes = 0u64;
        for p in &dead {
            if let Some(i) = self.db.path_info(p).await? {
                sizes += i.nar_size;
            }
        }
        self.db.invalidate(&dead).await?;
        self.valid.remove(dead.iter().map(String::as_str));
        let trash = StagingDir::new(&self.root, "trash")?;
        for p in &dead {
            if let Ok(sp) = self.store_dir.parse(p) {
                let phys = self.physical(&sp);
                match fs::rename(&phys, trash.path().join(sp.base_name())) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("moving aside", &phys)(e)),
                }
            }
            report.deleted.push(p.clone());
        }
        report.bytes_freed = sizes;
        drop(trash);
        Ok(report)
    }

    /// Copies drvs and their closures from a directory laid out as a store (see [`import`]).
    pub async fn import_from_dir(
        &self,
        dir: &Path,
        drv_paths: &[String],
    ) -> Result<ImportReport, StoreError> {
        import::import_from_dir(self, dir, drv_paths).await
    }

    fn drain_nar(nar: &mut dyn Read, path: &str) -> Result<(Sha256Hash, u64), StoreError> {
        let mut hr = HashingReader::new(nar);
        {
            let mut r = NarReader::new(&mut hr);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let ev = r.next_event().map_err(|e| StoreError::Nar {
                    path: path.to_string(),
                    message: e.to_string(),
                })?;
                match ev {
                    None => break,
                    Some(NarEvent::Regular { .. }) => loop {
                        let n = r.read_contents(&mut buf).map_err(|e| StoreError::Nar {
                            path: path.to_string(),
                            message: e.to_string(),
                        })?;
                        if n == 0 {
                            break;
                        }
                    },
                    Some(_) => {}
                }
            }
        }
        Ok(hr.finish())
    }
}

/// A reader that hashes (sha256) and counts what is read through it.
struct HashingReader<R: Read> {
    inner: R,
    h: HashingWriter,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            h: HashingWriter::new(),
        }
    }

    fn finish(self) -> (Sha256Hash, u64) {
        let (h, n, _) = self.h.finish();
        (h, n)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.h.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// The same error for every caller of a group commit (store errors are not `Clone`).
fn copy_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Metadata(m) => StoreError::Metadata(m.clone()),
        StoreError::Io { op, path, source } => StoreError::Io {
            op,
            path: path.clone(),
            source: io::Error::new(source.kind(), source.to_string()),
        },
        other => StoreError::Metadata(other.to_string()),
    }
}

fn hash_desc(h: &Sha256Hash, size: u64) -> String {
    format!("{} ({size} bytes)", render_nix32(h))
}

#[async_trait]
impl Store for LocalStore {
    fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    async fn read_derivation(&self, drv_path: &str) -> Result<Derivation, StoreError> {
        let sp = self.store_dir.parse(drv_path)?;
        if !sp.is_derivation() {
            return Err(StoreError::BadDerivation {
                path: drv_path.to_string(),
                message: "not a .drv path".into(),
            });
        }
        if !self.is_valid_cached(drv_path).await? {
            return Err(StoreError::NotValid(drv_path.to_string()));
        }
        let phys = self.physical(&sp);
        let bytes = tokio::fs::read(&phys)
            .await
            .map_err(io_err("reading", &phys))?;
        aterm::parse_named(&bytes, sp.drv_name()).map_err(|e| StoreError::BadDerivation {
            path: drv_path.to_string(),
            message: e.to_string(),
        })
    }

    async fn is_valid_path(&self, path: &str) -> Result<bool, StoreError> {
        self.store_dir.parse(path)?;
        self.is_valid_cached(path).await
    }

    /// One validity query per 500 paths, then the files read and parsed on blocking threads.
    async fn read_derivations(&self, drv_paths: &[String]) -> Vec<Result<Derivation, StoreError>> {
        let mut out: Vec<Option<Result<Derivation, StoreError>>> = Vec::new();
        let mut to_read: Vec<(usize, String, PathBuf)> = Vec::new();
        for (i, p) in drv_paths.iter().enumerate() {
            match self.store_dir.parse(p) {
                Ok(sp) if sp.is_derivation() => {
                    out.push(None);
                    to_read.push((i, sp.drv_name().to_string(), self.physical(&sp)));
                }
                Ok(_) => out.push(Some(Err(StoreError::BadDerivation {
                    path: p.clone(),
                    message: "not a .drv path".into(),
                }))),
                Err(e) => out.push(Some(Err(e.into()))),
            }
        }
        let candidates: Vec<String> = to_read
            .iter()
            .map(|(i, ..)| drv_paths[*i].clone())
            .collect();
        let valid = match self.valid_among_cached(&candidates).await {
            Ok(v) => v,
            Err(e) => {
                let msg = e.to_string();
                return drv_paths
                    .iter()
                    .map(|_| Err(StoreError::Metadata(msg.clone())))
                    .collect();
            }
        };
        to_read.retain(|(i, ..)| {
            let ok = valid.contains(&drv_paths[*i]);
            if !ok {
                out[*i] = Some(Err(StoreError::NotValid(drv_paths[*i].clone())));
            }
            ok
        });
        let tasks: Vec<_> = to_read
            .chunks(512)
            .map(|chunk| {
                let chunk: Vec<(usize, String, PathBuf)> = chunk.to_vec();
                let paths: Vec<String> =
                    chunk.iter().map(|(i, ..)| drv_paths[*i].clone()).collect();
                tokio::task::spawn_blocking(move || {
                    chunk
                        .into_iter()
                        .zip(paths)
                        .map(|((i, name, phys), path)| {
                            let r = fs::read(&phys).map_err(io_err("reading", &phys)).and_then(
                                |bytes| {
                                    aterm::parse_named(&bytes, &name).map_err(|e| {
                                        StoreError::BadDerivation {
                                            path,
                                            message: e.to_string(),
                                        }
                                    })
                                },
                            );
                            (i, r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for t in futures::future::join_all(tasks).await {
            match t {
                Ok(results) => {
                    for (i, r) in results {
                        out[i] = Some(r);
                    }
                }
                Err(e) => tracing::error!(error = %e, "a blocking derivation read failed"),
            }
        }
        out.into_iter()
            .zip(drv_paths)
            .map(|(r, p)| {
                r.unwrap_or_else(|| Err(StoreError::Metadata(format!("{p} was not read"))))
            })
            .collect()
    }

    async fn valid_among(
        &self,
        paths: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        self.valid_among_cached(paths).await
    }

    async fn query_realisations(
        &self,
        keys: &[DrvOutput],
    ) -> Result<Vec<(DrvOutput, String)>, StoreError> {
        let drvs: Vec<String> = keys
            .iter()
            .map(|k| k.drv_path.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let wanted: std::collections::HashSet<&DrvOutput> = keys.iter().collect();
        Ok(self
            .db
            .realisations_of(&drvs)
            .await?
            .into_iter()
            .filter(|(k, _)| wanted.contains(k))
            .collect())
    }

    async fn query_path_info(&self, path: &str) -> Result<Option<PathInfo>, StoreError> {
        self.store_dir.parse(path)?;
        self.db.path_info(path).await
    }

    async fn add_text(
        &self,
        name: &str,
        contents: &str,
        references: &BTreeSet<String>,
    ) -> Result<String, StoreError> {
        self.add_text_rooted(name, contents, references, None).await
    }

    /// The drv and its GC root in one registration (one metadata transaction, group-committed).
    async fn add_derivation_rooted(
        &self,
        drv: &Derivation,
        root_prefix: &str,
    ) -> Result<String, StoreError> {
        let refs: BTreeSet<String> = drv.references().into_iter().map(str::to_string).collect();
        self.add_text_rooted(
            &format!("{}.drv", drv.name),
            &drv.to_aterm(),
            &refs,
            Some(root_prefix),
        )
        .await
    }

    async fn query_realisation(&self, key: &DrvOutput) -> Result<Option<String>, StoreError> {
        self.db.realisation(key).await
    }

    async fn register_realisation(
        &self,
        key: &DrvOutput,
        out_path: &str,
    ) -> Result<(), StoreError> {
        self.store_dir.parse(out_path)?;
        self.commit_registration(&[], vec![(key.clone(), out_path.to_string())], vec![])
            .await
    }

    async fn add_gc_root(&self, name: &str, path: &str) -> Result<(), StoreError> {
        self.store_dir.parse(path)?;
        self.commit_registration(&[], vec![], vec![(name.to_string(), path.to_string())])
            .await
    }

    async fn remove_gc_root(&self, name: &str) -> Result<(), StoreError> {
        self.db.remove_root(name).await
    }

    fn export_nar(&self, path: &str, out: &mut dyn Write) -> Result<u64, StoreError> {
        let sp = self.store_dir.parse(path)?;
        if !self.rt.block_on(self.is_valid_cached(path))? {
            return Err(StoreError::NotValid(path.to_string()));
        }
        let mut w = BufWriter::with_capacity(64 * 1024, out);
        let n = dump_path(&self.physical(&sp), &mut w).map_err(|e| StoreError::Nar {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        w.flush().map_err(|e| StoreError::Nar {
            path: path.to_string(),
            message: format!("writing the NAR: {e}"),
        })?;
        Ok(n)
    }

    fn import_nar(&self, info: &PathInfo, nar: &mut dyn Read) -> Result<(), StoreError> {
        self.store_dir.parse(&info.path)?;
        let check = |hash: Sha256Hash, size: u64| {
            if hash != info.nar_hash || size != info.nar_size {
                Err(StoreError::HashMismatch {
                    path: info.path.clone(),
                    expected: hash_desc(&info.nar_hash, info.nar_size),
                    got: hash_desc(&hash, size),
                })
            } else {
                Ok(())
            }
        };
        if self.rt.block_on(self.is_valid_cached(&info.path))? {
            let (h, n) = Self::drain_nar(nar, &info.path)?;
            return check(h, n);
        }
        for r in &info.references {
            self.store_dir.parse(r)?;
            if *r != info.path && !self.rt.block_on(self.is_valid_cached(r))? {
                return Err(StoreError::NotValid(r.clone()));
            }
        }
        let staging = StagingPath::new(&self.root);
        let staged = staging.path().to_path_buf();
        let mut hr = HashingReader::new(nar);
        {
            let mut r = NarReader::new(&mut hr);
            restore(&mut r, &staged).map_err(|e| StoreError::Nar {
                path: info.path.clone(),
                message: e.to_string(),
            })?;
        }
        let (h, n) = hr.finish();
        check(h, n)?;
        self.rt.block_on(self.commit_registration(
            &[StagedPath {
                info: info.clone(),
                staged,
            }],
            vec![],
            vec![],
        ))?;
        Ok(())
    }

    fn physical_path(&self, path: &str) -> Option<PathBuf> {
        self.store_dir.parse(path).ok().map(|sp| self.physical(&sp))
    }
}

#[cfg(test)]
mod tests;

/// A group commit's share of the store, owned, for the blocking thread that runs it.
struct GroupCommit {
    root: PathBuf,
    db: MetaDb,
    valid: Arc<ValidCache>,
    fsync: bool,
    fault: Option<FaultHook>,
}

impl GroupCommit {
    fn fault_at(&self, point: FaultPoint) -> Result<(), StoreError> {
        match &self.fault {
            Some(h) => h(point).map_err(|m| StoreError::Metadata(format!("injected fault: {m}"))),
            None => Ok(()),
        }
    }

    fn is_valid(&self, path: &str) -> Result<bool, StoreError> {
        valid_via_cache(&self.valid, &self.db, path)
    }

    /// Commits queued registrations (the in-process write lock is held; this takes the cross-process one), on a thread that may block: moves every one's contents into
    /// place, fsyncs the root once, then registers all in one transaction. If that transaction
    /// fails, each registration is committed on its own, so one bad registration fails only its
    /// caller.
    fn commit(&self, batch: Vec<GroupReq>) {
        let p = self.root.join(META_DIR).join("write.lock");
        let _lock = match FileLock::lock(&p, LockMode::Exclusive).map_err(io_err("locking", &p)) {
            Ok(l) => l,
            Err(e) => {
                for r in batch {
                    let _ = r.reply.send(Err(copy_err(&e)));
                }
                return;
            }
        };
        struct Moved {
            reply: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
            infos: Vec<PathInfo>,
            realisations: Vec<(DrvOutput, String)>,
            roots: Vec<(String, String)>,
            moved: Vec<PathBuf>,
        }
        let mut ready: Vec<Moved> = Vec::new();
        // Paths put in place by this group: a second copy is discarded, as for a valid path.
        let mut placed: std::collections::HashSet<String> = std::collections::HashSet::new();
        for req in batch {
            let mut m = Moved {
                reply: req.reply,
                infos: Vec::new(),
                realisations: req.realisations,
                roots: req.roots,
                moved: Vec::new(),
            };
            let mut failed = None;
            for (info, staged, dest) in req.items {
                let step = || {
                    // A valid path has its contents in place: when nothing is at `dest`, the
                    // path is not valid (or lost its contents, which this copy restores), so
                    // the metadata database is asked only when something is there.
                    if placed.contains(&info.path)
                        || (fs::symlink_metadata(&dest).is_ok() && self.is_valid(&info.path)?)
                    {
                        if staged != dest {
                            remove_tree(&staged).map_err(io_err("removing", &staged))?;
                        }
                        return Ok::<_, StoreError>(None);
                    }
                    if staged != dest {
                        if fs::symlink_metadata(&dest).is_ok() {
                            // Unregistered leftovers (e.g. of a failed build): replace them.
                            remove_tree(&dest).map_err(io_err("removing", &dest))?;
                        }
                        rename_noreplace(&staged, &dest)
                            .map_err(io_err("moving into place", &dest))?;
                        m.moved.push(dest.clone());
                    }
                    Ok(Some(info))
                };
                match step() {
                    Ok(Some(info)) => {
                        placed.insert(info.path.clone());
                        m.infos.push(info);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                Some(e) => {
                    let _ = m.reply.send(Err(e));
                }
                None => ready.push(m),
            }
        }
        if self.fsync
            && ready.iter().any(|m| !m.infos.is_empty())
            && let Err(e) = fsync_dir(&self.root).map_err(io_err("syncing", &self.root))
        {
            for m in ready {
                let _ = m.reply.send(Err(copy_err(&e)));
            }
            return;
        }
        // An injected fault stands for a crash: nothing is cleaned up (the next open does it).
        if let Err(e) = self.fault_at(FaultPoint::BeforeRegister) {
            for m in ready {
                let _ = m.reply.send(Err(copy_err(&e)));
            }
            return;
        }
        let all_infos: Vec<PathInfo> = ready.iter().flat_map(|m| m.infos.clone()).collect();
        let all_real: Vec<(DrvOutput, String)> =
            ready.iter().flat_map(|m| m.realisations.clone()).collect();
        let all_roots: Vec<(String, String)> = ready.iter().flat_map(|m| m.roots.clone()).collect();
        if ready.len() > 1
            && self
                .db
                .register_now(&all_infos, &all_real, &all_roots)
                .is_ok()
        {
            self.valid.insert(all_infos.iter().map(|i| i.path.as_str()));
            for m in ready {
                let _ = m.reply.send(Ok(()));
            }
            return;
        }
        for m in ready {
            let r = self
                .db
                .register_now(&m.infos, &m.realisations, &m.roots)
                .map(|_| ());
            if r.is_ok() {
                self.valid.insert(m.infos.iter().map(|i| i.path.as_str()));
            }
            if r.is_err() {
                // Nothing was registered: take the contents back out of sight.
                for d in &m.moved {
                    if let Err(re) = remove_tree(d) {
                        tracing::warn!(path = %d.display(), error = %re, "cannot remove unregistered contents");
                    }
                }
            }
            let _ = m.reply.send(r);
        }
    }
}

/// Whether `path` is valid: the cache, then the metadata database (a read on the calling
/// thread), remembering a positive answer.
fn valid_via_cache(valid: &ValidCache, db: &MetaDb, path: &str) -> Result<bool, StoreError> {
    if valid.contains(path) {
        return Ok(true);
    }
    let v = db.is_valid_now(path)?;
    if v {
        valid.insert([path]);
    }
    Ok(v)
}
