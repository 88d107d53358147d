//! [`Cache`]: everything a binary cache serves, read from the local store — `nix-cache-info`,
//! narinfos (signed), NAR files (compressed ones kept on disk keyed by NarHash, so FileHash and
//! FileSize are known when the narinfo is served), realisations in both of Nix's layouts, and
//! build logs.
//!
//! Nix ≤ 2.34 asks for a realisation by `sha256:<hashModulo hex>!<output>`, which cannot be turned
//! back into a drv path: an index from that id to `<drv path>^<output>` is kept in memory, filled
//! from the store's realisations in the order they were recorded (a cursor on their row id), and
//! brought up to date before every lookup.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::CacheError;
use super::compression::Compression;
use super::files::{write_atomic, write_nar_file};
use super::key::SecretKey;
use super::narinfo::{self, NarFile};
use super::realisation::{BuildTraceEntry, LegacyRealisation};
use crate::store::api::PathInfo;
use crate::store::derivation::Derivation;
use crate::store::hash::Sha256Hash;
use crate::store::hash_modulo::DrvHashes;
use crate::store::realisation::{DrvOutput, LegacyDrvOutput};
use crate::store::{LocalStore, Store, nix32};

/// Rows of the store's realisations read per index refresh query.
const INDEX_BATCH: u32 = 1000;
/// Memoised modulo hashes kept before the memo is dropped and started afresh.
const MAX_MEMO: usize = 200_000;

/// The settings of a cache.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub key: Option<SecretKey>,
    pub compression: Compression,
    pub want_mass_query: bool,
    pub priority: u32,
    /// Where compressed NARs are kept for HTTP (`<dir>/<file hash>.nar.zst` and a
    /// `<nar hash>.<compression>` record of each).
    pub nar_dir: PathBuf,
    /// Where build logs are (as `qr admin log` finds them).
    pub log_dirs: Vec<PathBuf>,
}

/// What a NAR request is answered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarSource {
    /// The uncompressed NAR of a valid store path, exported on the fly.
    Store { path: String, size: u64 },
    /// A compressed NAR file on disk.
    File { path: PathBuf, size: u64 },
}

/// An output path and its dependent realisations (id → output path).
type KnownDeps = (String, BTreeMap<String, String>);

#[derive(Debug)]
struct Ids {
    hashes: DrvHashes,
    index: HashMap<LegacyDrvOutput, DrvOutput>,
    cursor: i64,
}

/// A binary cache over a local store.
pub struct Cache {
    store: Arc<LocalStore>,
    settings: CacheSettings,
    ids: tokio::sync::Mutex<Ids>,
    /// One compression at a time per NAR hash.
    compressing: std::sync::Mutex<HashMap<Sha256Hash, Arc<tokio::sync::Mutex<()>>>>,
    /// Dependent realisations computed so far: key → (output path, id → output path).
    deps: std::sync::Mutex<HashMap<DrvOutput, Arc<KnownDeps>>>,
}

fn base(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A store path's hash part: 32 characters of Nix's base-32 alphabet.
pub fn is_hash_part(s: &str) -> bool {
    s.len() == 32 && nix32::decode(s, 20).is_ok()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::Task(e.to_string()))?
}

impl Cache {
    pub fn new(store: Arc<LocalStore>, settings: CacheSettings) -> Self {
        let hashes = DrvHashes::new(store.store_dir().clone());
        Cache {
            store,
            settings,
            ids: tokio::sync::Mutex::new(Ids {
                hashes,
                index: HashMap::new(),
                cursor: 0,
            }),
            compressing: Default::default(),
            deps: Default::default(),
        }
    }

    pub fn store(&self) -> &Arc<LocalStore> {
        &self.store
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    pub fn key(&self) -> Option<&SecretKey> {
        self.settings.key.as_ref()
    }

    pub fn cache_info(&self) -> String {
        narinfo::cache_info(
            self.store.store_dir().as_str(),
            self.settings.want_mass_query,
            self.settings.priority,
        )
    }

    /// The info of the valid path whose hash part is `hash`.
    pub async fn path_info_by_hash(&self, hash: &str) -> Result<Option<PathInfo>, CacheError> {
        if !is_hash_part(hash) {
            return Ok(None);
        }
        let Some(path) = self.store.path_from_hash_part(hash).await? else {
            return Ok(None);
        };
        Ok(self.store.query_path_info(&path).await?)
    }

    /// The signed narinfo of the valid path whose hash part is `hash`; its NAR file is written
    /// first when it is compressed and not on disk yet.
    pub async fn narinfo(&self, hash: &str) -> Result<Option<String>, CacheError> {
        let Some(info) = self.path_info_by_hash(hash).await? else {
            return Ok(None);
        };
        let file = self.nar_file(&info).await?;
        Ok(Some(narinfo::render(&info, &file, self.key())))
    }

    /// The NAR file of `info` as the HTTP cache serves it.
    pub async fn nar_file(&self, info: &PathInfo) -> Result<NarFile, CacheError> {
        let c = self.settings.compression;
        if c == Compression::None {
            return Ok(NarFile {
                url: NarFile::url_for(&info.nar_hash, c),
                compression: c,
                file_hash: info.nar_hash,
                file_size: info.nar_size,
            });
        }
        let dir = self.settings.nar_dir.clone();
        let record = dir.join(format!("{}.{}", nix32::encode(&info.nar_hash), c.name()));
        if let Some(f) = read_record(&record, &dir, c) {
            return Ok(f);
        }
        let lock = {
            let mut m = self.compressing.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(info.nar_hash).or_default().clone()
        };
        let _held = lock.lock().await;
        let result = async {
            if let Some(f) = read_record(&record, &dir, c) {
                return Ok(f);
            }
            let store = self.store.clone();
            let path = info.path.clone();
            let started = std::time::Instant::now();
            let f = blocking(move || {
                let f = write_nar_file(&*store, &path, c, &dir)?;
                let text = format!("{} {}\n", nix32::encode(&f.file_hash), f.file_size);
                let name = record.file_name().map(|n| n.to_string_lossy().into_owned());
                write_atomic(&dir, &name.unwrap_or_default(), text.as_bytes())?;
                Ok(f)
            })
            .await?;
            crate::metrics::global().cache.compressed(
                info.nar_size,
                f.file_size,
                started.elapsed(),
            );
            tracing::info!(path = %info.path, compression = c.name(), nar_size = info.nar_size,
                file_size = f.file_size, ms = started.elapsed().as_millis() as u64,
                "compressed a NAR for the binary cache");
            Ok(f)
        }
        .await;
        self.compressing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&info.nar_hash);
        result
    }

    /// What `nar/<name>` is answered from, if anything.
    pub async fn nar(&self, name: &str) -> Result<Option<NarSource>, CacheError> {
        let Some((hash, c)) = Compression::of_file_name(name) else {
            return Ok(None);
        };
        let Ok(raw) = nix32::decode(hash, 32) else {
            return Ok(None);
        };
        let Ok(hash): Result<Sha256Hash, _> = raw.try_into() else {
            return Ok(None);
        };
        if c == Compression::None {
            let Some(path) = self.store.path_with_nar_hash(&hash).await? else {
                return Ok(None);
            };
            let Some(info) = self.store.query_path_info(&path).await? else {
                return Ok(None);
            };
            return Ok(Some(NarSource::Store {
                path,
                size: info.nar_size,
            }));
        }
        let file = self.settings.nar_dir.join(name);
        match tokio::fs::metadata(&file).await {
            Ok(m) if m.is_file() => Ok(Some(NarSource::File {
                path: file,
                size: m.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::Io {
                op: "reading",
                path: file,
                source: e,
            }),
        }
    }

    /// Brings the legacy-id index up to date with the store's realisations.
    async fn refresh_index(&self, ids: &mut Ids) -> Result<(), CacheError> {
        loop {
            let (rows, max) = self
                .store
                .realisations_after(ids.cursor, INDEX_BATCH)
                .await?;
            if max < ids.cursor {
                // The newest rows were removed (GC): a new row may reuse their ids.
                ids.cursor = max;
                continue;
            }
            let n = rows.len();
            for (rowid, key, _out) in rows {
                ids.cursor = rowid;
                match self.legacy_id_in(ids, &key).await {
                    Ok(id) => {
                        ids.index.insert(id, key);
                    }
                    Err(e) => {
                        tracing::warn!(realisation = %key, error = %e,
                            "no Nix 2.8 realisation id for it: it is not served under one");
                    }
                }
            }
            if n < INDEX_BATCH as usize {
                return Ok(());
            }
        }
    }

    /// `sha256:<hashModulo hex>!<output>` of `key`.
    pub async fn legacy_id(&self, key: &DrvOutput) -> Result<LegacyDrvOutput, CacheError> {
        let mut ids = self.ids.lock().await;
        self.legacy_id_in(&mut ids, key).await
    }

    async fn legacy_id_in(
        &self,
        ids: &mut Ids,
        key: &DrvOutput,
    ) -> Result<LegacyDrvOutput, CacheError> {
        if ids.hashes.len() > MAX_MEMO {
            ids.hashes = DrvHashes::new(self.store.store_dir().clone());
        }
        let drvs = load_unhashed_closure(&self.store, &ids.hashes, &key.drv_path).await?;
        let err = |message: String| CacheError::HashModulo {
            drv: key.drv_path.clone(),
            message,
        };
        let root = drvs
            .get(&key.drv_path)
            .ok_or_else(|| err("not loaded".into()))?
            .clone();
        let mut load = |p: &str| drvs.get(p).cloned().ok_or_else(|| p.to_string());
        let h = ids
            .hashes
            .static_output_hashes(&root, &mut load)
            .map_err(|e| err(e.to_string()))?;
        let hash = h
            .output(&key.output)
            .ok_or_else(|| err(format!("no output {:?}", key.output)))?;
        Ok(key.legacy(hash))
    }

    /// The drv output a Nix ≤ 2.34 realisation id stands for, if it was realised here.
    pub async fn lookup_legacy(
        &self,
        id: &LegacyDrvOutput,
    ) -> Result<Option<DrvOutput>, CacheError> {
        let mut ids = self.ids.lock().await;
        self.refresh_index(&mut ids).await?;
        Ok(ids.index.get(id).cloned())
    }

    /// The Nix ≤ 2.34 realisation of `key` realised to `out_path`, with its dependent
    /// realisations computed as Nix 2.8 does: for each input drv output, its realisation and,
    /// transitively, theirs, kept if its output is among `out_path`'s references.
    pub async fn legacy_realisation(
        &self,
        key: &DrvOutput,
        out_path: &str,
    ) -> Result<LegacyRealisation, CacheError> {
        let id = self.legacy_id(key).await?;
        let mut memo = HashMap::new();
        let dependents = self.dependents(key, out_path, &mut memo).await?;
        Ok(LegacyRealisation {
            id,
            out_path: out_path.to_string(),
            dependents,
        })
    }

    /// The dependent realisations (id → output path) of `key` realised to `out_path`.
    async fn dependents(
        &self,
        key: &DrvOutput,
        out_path: &str,
        memo: &mut HashMap<DrvOutput, BTreeMap<String, String>>,
    ) -> Result<BTreeMap<String, String>, CacheError> {
        // Iterative post-order over the drv outputs below `key` (inputs first), so deep graphs
        // need no recursion.
        enum Step {
            Enter(DrvOutput, String),
            Exit(DrvOutput, String, Vec<(DrvOutput, String)>),
        }
        let mut stack = vec![Step::Enter(key.clone(), out_path.to_string())];
        while let Some(step) = stack.pop() {
            match step {
                Step::Enter(k, out) => {
                    if memo.contains_key(&k) {
                        continue;
                    }
                    if let Some(known) = self.known_deps(&k, &out) {
                        memo.insert(k, known);
                        continue;
                    }
                    let drv = self.store.read_derivation(&k.drv_path).await?;
                    let keys: Vec<DrvOutput> = drv
                        .input_drvs
                        .iter()
                        .flat_map(|(i, outs)| outs.iter().map(move |o| DrvOutput::new(i, o)))
                        .collect();
                    let inputs = self.store.query_realisations(&keys).await?;
                    stack.push(Step::Exit(k, out, inputs.clone()));
                    for (ik, ip) in inputs {
                        if !memo.contains_key(&ik) {
                            stack.push(Step::Enter(ik, ip));
                        }
                    }
                }
                Step::Exit(k, out, inputs) => {
                    let mut closure: BTreeMap<String, String> = BTreeMap::new();
                    for (ik, ip) in &inputs {
                        let id = self.legacy_id(ik).await?;
                        closure.insert(id.to_string(), ip.clone());
                        if let Some(deps) = memo.get(ik) {
                            closure.extend(deps.iter().map(|(a, b)| (a.clone(), b.clone())));
                        }
                    }
                    let refs: BTreeSet<String> = match self.store.query_path_info(&out).await? {
                        Some(i) => i.references,
                        None => BTreeSet::new(),
                    };
                    closure.retain(|_, p| refs.contains(p.as_str()));
                    self.remember_deps(&k, &out, &closure);
                    memo.insert(k, closure);
                }
            }
        }
        Ok(memo.get(key).cloned().unwrap_or_default())
    }

    fn known_deps(&self, key: &DrvOutput, out: &str) -> Option<BTreeMap<String, String>> {
        let m = self.deps.lock().unwrap_or_else(|p| p.into_inner());
        m.get(key).filter(|e| e.0 == out).map(|e| e.1.clone())
    }

    fn remember_deps(&self, key: &DrvOutput, out: &str, deps: &BTreeMap<String, String>) {
        let mut m = self.deps.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_MEMO {
            m.clear();
        }
        m.insert(key.clone(), Arc::new((out.to_string(), deps.clone())));
    }

    /// `realisations/<id>.doi`: the signed Nix ≤ 2.34 realisation for `id`.
    pub async fn legacy_doc(&self, id: &str) -> Result<Option<String>, CacheError> {
        let Ok(id) = id.parse::<LegacyDrvOutput>() else {
            return Ok(None);
        };
        let Some(key) = self.lookup_legacy(&id).await? else {
            return Ok(None);
        };
        let Some(out) = self.store.query_realisation(&key).await? else {
            return Ok(None);
        };
        let r = self.legacy_realisation(&key, &out).await?;
        Ok(Some(r.to_json(self.key())))
    }

    /// `build-trace-v2/<drv base>/<output>.doi`: the signed Nix ≥ 2.35 build trace value.
    pub async fn build_trace_doc(
        &self,
        drv_base: &str,
        output: &str,
    ) -> Result<Option<String>, CacheError> {
        let Some(key) = self.drv_output(drv_base, output) else {
            return Ok(None);
        };
        let Some(out) = self.store.query_realisation(&key).await? else {
            return Ok(None);
        };
        let e = BuildTraceEntry {
            drv_path: key.drv_path,
            output: key.output,
            out_path: out,
        };
        Ok(Some(e.to_json(self.key())))
    }

    fn drv_output(&self, drv_base: &str, output: &str) -> Option<DrvOutput> {
        let full = format!("{}/{drv_base}", self.store.store_dir().as_str());
        let p = self.store.store_dir().parse(&full).ok()?;
        if !p.is_derivation() {
            return None;
        }
        format!("{full}^{output}").parse().ok()
    }

    /// The newest build log of the drv whose base name is `drv_base` (gunzipped): its own, or,
    /// for a CA drv that was resolved, the resolved drv's.
    pub async fn log(&self, drv_base: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let full = format!("{}/{drv_base}", self.store.store_dir().as_str());
        match self.store.store_dir().parse(&full) {
            Ok(p) if p.is_derivation() => {}
            _ => return Ok(None),
        }
        let Some(file) = self.log_file(&full).await? else {
            return Ok(None);
        };
        let data = blocking(move || {
            crate::grpc::admin::read_log(&file).map_err(CacheError::io("reading", file))
        })
        .await?;
        Ok(Some(data))
    }

    async fn log_file(&self, drv_path: &str) -> Result<Option<PathBuf>, CacheError> {
        let dirs = self.settings.log_dirs.clone();
        let own = {
            let (dirs, p) = (dirs.clone(), drv_path.to_string());
            blocking(move || Ok(crate::builder::logs::latest(&dirs, &p))).await?
        };
        if let Some(l) = own {
            return Ok(Some(l.path));
        }
        let Some(resolved) = self.resolved_path(drv_path).await? else {
            return Ok(None);
        };
        let found = blocking(move || Ok(crate::builder::logs::latest(&dirs, &resolved))).await?;
        Ok(found.map(|l| l.path))
    }

    /// The resolved drv of a drv with input drvs whose outputs are all realised.
    async fn resolved_path(&self, drv_path: &str) -> Result<Option<String>, CacheError> {
        if !self.store.is_valid_path(drv_path).await? {
            return Ok(None);
        }
        let drv = self.store.read_derivation(drv_path).await?;
        if drv.input_drvs.is_empty() {
            return Ok(None);
        }
        let keys: Vec<DrvOutput> = drv
            .input_drvs
            .iter()
            .flat_map(|(i, outs)| outs.iter().map(move |o| DrvOutput::new(i, o)))
            .collect();
        let known: HashMap<DrvOutput, String> = self
            .store
            .query_realisations(&keys)
            .await?
            .into_iter()
            .collect();
        let sd = self.store.store_dir();
        let Ok(resolved) = crate::store::resolve::try_resolve(&drv, sd, |i, o| {
            known.get(&DrvOutput::new(i, o)).cloned()
        }) else {
            return Ok(None);
        };
        Ok(resolved.drv_path(sd).ok().map(|p| sd.print(&p)))
    }

    /// The valid paths of the closure of `paths` for which `wanted` holds, each after every
    /// such path it refers to.
    pub async fn closure_in_order(
        &self,
        paths: &[&str],
        mut wanted: impl FnMut(&str) -> bool,
    ) -> Result<Vec<PathInfo>, CacheError> {
        let all = self.store.closure(paths.iter().copied()).await?;
        let mut infos: BTreeMap<String, PathInfo> = BTreeMap::new();
        for p in all.iter().filter(|p| wanted(p)) {
            if let Some(i) = self.store.query_path_info(p).await? {
                infos.insert(p.clone(), i);
            }
        }
        Ok(topo_order(infos))
    }
}

/// Reads a `<nar hash>.<compression>` record (`<file hash> <size>`) whose NAR file exists.
fn read_record(record: &Path, dir: &Path, c: Compression) -> Option<NarFile> {
    let text = std::fs::read_to_string(record).ok()?;
    let (h, size) = text.trim().split_once(' ')?;
    let file_hash: Sha256Hash = nix32::decode(h, 32).ok()?.try_into().ok()?;
    let file_size: u64 = size.parse().ok()?;
    let url = NarFile::url_for(&file_hash, c);
    let on_disk = std::fs::metadata(dir.join(url.trim_start_matches("nar/"))).ok()?;
    (on_disk.len() == file_size).then_some(NarFile {
        url,
        compression: c,
        file_hash,
        file_size,
    })
}

/// Path infos ordered so each comes after its references (self-references ignored).
pub fn topo_order(mut infos: BTreeMap<String, PathInfo>) -> Vec<PathInfo> {
    let mut out = Vec::with_capacity(infos.len());
    let mut done: HashSet<String> = HashSet::new();
    let keys: Vec<String> = infos.keys().cloned().collect();
    for root in keys {
        let mut stack = vec![(root, false)];
        while let Some((p, expanded)) = stack.pop() {
            if done.contains(&p) {
                continue;
            }
            if expanded {
                done.insert(p.clone());
                if let Some(i) = infos.remove(&p) {
                    out.push(i);
                }
                continue;
            }
            let Some(i) = infos.get(&p) else { continue };
            let refs: Vec<String> = i
                .references
                .iter()
                .filter(|r| **r != p && !done.contains(*r))
                .cloned()
                .collect();
            stack.push((p, true));
            stack.extend(refs.into_iter().map(|r| (r, false)));
        }
    }
    out
}

/// `root` and every drv below it whose modulo hash is not memoised yet, read from the store.
async fn load_unhashed_closure(
    store: &LocalStore,
    hashes: &DrvHashes,
    root: &str,
) -> Result<HashMap<String, Derivation>, CacheError> {
    let mut out: HashMap<String, Derivation> = HashMap::new();
    let mut level = vec![root.to_string()];
    while !level.is_empty() {
        let drvs = store.read_derivations(&level).await;
        let mut next = Vec::new();
        for (p, d) in level.into_iter().zip(drvs) {
            let d = d?;
            for i in d.input_drvs.keys() {
                if hashes.cached(i).is_none() && !out.contains_key(i) && !next.contains(i) {
                    next.push(i.clone());
                }
            }
            out.insert(p, d);
        }
        next.retain(|p| !out.contains_key(p));
        level = next;
    }
    Ok(out)
}

/// The base name of a store path (for file names in a cache).
pub fn base_name(path: &str) -> &str {
    base(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(p: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: p.into(),
            nar_hash: [0; 32],
            nar_size: 0,
            references: refs.iter().map(|r| r.to_string()).collect(),
            ca: None,
            deriver: None,
        }
    }

    #[test]
    fn topo_order_puts_references_first() {
        let infos: BTreeMap<String, PathInfo> = [
            info("/s/a", &["/s/b", "/s/a"]),
            info("/s/b", &["/s/c"]),
            info("/s/c", &[]),
            info("/s/d", &["/s/a", "/s/c"]),
        ]
        .into_iter()
        .map(|i| (i.path.clone(), i))
        .collect();
        let order: Vec<String> = topo_order(infos).into_iter().map(|i| i.path).collect();
        let pos = |p: &str| order.iter().position(|x| x == p).unwrap();
        assert_eq!(order.len(), 4);
        assert!(pos("/s/c") < pos("/s/b"));
        assert!(pos("/s/b") < pos("/s/a"));
        assert!(pos("/s/a") < pos("/s/d"));
    }

    #[test]
    fn hash_parts_are_checked() {
        assert!(is_hash_part("i5ypy73hffqhy85x5yn0k88yjym4brb5"));
        assert!(!is_hash_part("i5ypy73hffqhy85x5yn0k88yjym4brb"));
        assert!(!is_hash_part("e5ypy73hffqhy85x5yn0k88yjym4brb5"));
        assert!(!is_hash_part("../../../../../../../etc/passwd!"));
    }
}
