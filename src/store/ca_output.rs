//! Turning the scratch outputs of a floating content-addressed (`r:sha256`) build into their final
//! store paths, exactly as Nix (2.8 … 2.34, `LocalDerivationGoal::registerOutputs`) does.
//!
//! 1. The builder wrote output `o` at the scratch path
//!    `makeStorePath("rewrite:<drvBaseName>:name:<o>", <32 zero bytes>, outputPathName)` ([`scratch_path`]).
//! 2. Each output's NAR is scanned for the hash parts of the referenceable paths (the inputs' closure
//!    and every scratch output).
//! 3. Outputs are processed in dependency order (an output referring to another one's scratch path
//!    comes after it); a cycle between outputs is an error.
//! 4. For each output: the scratch hash parts of the outputs already finished are rewritten to their
//!    final hash parts; the NAR is hashed *modulo* its own scratch hash part ([`HashModuloWriter`]:
//!    each occurrence replaced by 32 NUL bytes, then `|<offset>` per occurrence appended to the
//!    hashed data); the final path is `makeStorePath("source:<refs…>[:self]", that hash, name)`; the
//!    scratch hash part is rewritten to the final one, and the result is restored at the final path.
//!    `narHash`/`narSize` are those of the rewritten NAR; `ca` is `fixed:r:sha256:<nix32 of the
//!    modulo hash>`; the references are the scanned ones (sibling outputs mapped to their final
//!    paths), plus the path itself if its scratch hash part occurred.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use thiserror::Error;

use super::fsutil::{remove_tree, rename_noreplace};
use super::hash::Sha256Hash;
use super::nar::{
    HashingWriter, NarReader, NarTree, NarWriteError, RestoreError, dump_path, restore, write_tree,
};
use super::nix32;
use super::path::{StoreDir, StorePath, output_path_name};
use super::refscan::{RefScanner, RewriteError, RewritingWriter};

const CHUNK: usize = 64 * 1024;

/// The path a CA floating output is built at before its real path is known.
/// `drv_path` is the derivation that is built (for a resolved derivation, the resolved one).
pub fn scratch_path(store_dir: &StoreDir, drv_path: &StorePath, output: &str) -> StorePath {
    store_dir.make_store_path(
        &format!("rewrite:{}:name:{output}", drv_path.base_name()),
        &[0u8; 32],
        &output_path_name(drv_path.drv_name(), output),
    )
}

/// The `ca` field Nix records for a recursive sha256 content-addressed path.
pub fn ca_string(hash: &Sha256Hash) -> String {
    format!("fixed:r:sha256:{}", nix32::encode(hash))
}

/// Nix's `HashModuloSink`: sha256 of a stream in which every occurrence of `modulus` (a hash part)
/// is replaced by NUL bytes, followed by `|<offset>` (decimal stream offset) for each occurrence.
pub struct HashModuloWriter {
    inner: RewritingWriter<HashingWriter>,
}

/// What a [`HashModuloWriter`] computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashModulo {
    pub hash: Sha256Hash,
    /// Bytes of the stream (the `|<offset>` suffixes not counted).
    pub size: u64,
    /// Offsets of the occurrences of the modulus.
    pub occurrences: Vec<u64>,
}

impl HashModuloWriter {
    /// `modulus` must be a 32-character nix32 hash part.
    pub fn new(modulus: &str) -> Result<Self, RewriteError> {
        let zeros = [0u8; 32];
        Ok(HashModuloWriter {
            inner: RewritingWriter::new(HashingWriter::new(), [(modulus, &zeros[..])])?,
        })
    }

    pub fn finish(self) -> HashModulo {
        // Writing into a HashingWriter<Sink> cannot fail.
        let (mut hasher, occurrences, size) = match self.inner.finish() {
            Ok(r) => r,
            Err(_) => unreachable!("hashing never fails"),
        };
        for pos in &occurrences {
            let _ = hasher.write_all(format!("|{pos}").as_bytes());
        }
        let (hash, _, _) = hasher.finish();
        HashModulo {
            hash,
            size,
            occurrences,
        }
    }
}

impl Write for HashModuloWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Something that can be serialised as a NAR: a filesystem object or an in-memory tree.
pub trait NarSource {
    fn dump(&self, w: &mut dyn Write) -> Result<u64, NarWriteError>;
}

impl NarSource for Path {
    fn dump(&self, w: &mut dyn Write) -> Result<u64, NarWriteError> {
        dump_path(self, w)
    }
}

impl NarSource for PathBuf {
    fn dump(&self, w: &mut dyn Write) -> Result<u64, NarWriteError> {
        dump_path(self, w)
    }
}

impl NarSource for NarTree {
    fn dump(&self, w: &mut dyn Write) -> Result<u64, NarWriteError> {
        write_tree(self, w)
    }
}

/// Writes everything to both writers.
struct Tee<A: Write, B: Write>(A, B);

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

/// One output as the builder left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchOutput {
    /// The output name (`out`, `dev`, …).
    pub name: String,
    /// Where the builder's `$<name>` (the scratch path) is on disk.
    pub physical: PathBuf,
}

/// A finished CA output, ready to be registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalOutput {
    pub name: String,
    /// The scratch path the builder wrote to.
    pub scratch_path: StorePath,
    /// The final, content-addressed path.
    pub path: StorePath,
    /// sha256 of the NAR of the final (rewritten) output.
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    /// References of the final output, including itself when it refers to itself.
    pub references: BTreeSet<StorePath>,
    /// The content address: the NAR hash modulo self-references.
    pub ca_hash: Sha256Hash,
    /// `fixed:r:sha256:<nix32 of ca_hash>`.
    pub ca: String,
    /// Where the final output is on disk (`<physical store>/<base name>`).
    pub physical: PathBuf,
    /// The final path was already present on disk, so the new copy was discarded (the caller
    /// decides whether that existing copy is valid).
    pub already_existed: bool,
}

/// Why CA outputs could not be finalised.
#[derive(Debug, Error)]
pub enum CaOutputError {
    #[error("derivation {drv} lists output {output:?} twice")]
    DuplicateOutput { drv: String, output: String },
    #[error("builder for {drv} failed to produce output {output:?} (expected at {physical})")]
    MissingOutput {
        drv: String,
        output: String,
        physical: PathBuf,
    },
    #[error(
        "cycle detected in build of {drv}: output {from:?} refers to output {to:?}, which refers back"
    )]
    Cycle {
        drv: String,
        from: String,
        to: String,
    },
    #[error("archiving output {output:?}: {source}")]
    Nar {
        output: String,
        source: NarWriteError,
    },
    #[error("restoring output {output:?} at its final path: {source}")]
    Restore {
        output: String,
        source: RestoreError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Rewrite(#[from] RewriteError),
}

/// The hashing plan for one output.
struct Planned {
    scratch: StorePath,
    final_path: StorePath,
    modulo: HashModulo,
    references: BTreeSet<StorePath>,
    /// Rewrites to apply to the output's contents: earlier outputs' scratch → final, then self.
    rewrites: Vec<(String, String)>,
}

/// Steps 2–4 of the module doc, without touching the filesystem: returns, per output (in the
/// order given), its plan, and the processing order.
fn plan<S: NarSource + ?Sized>(
    store_dir: &StoreDir,
    drv_path: &StorePath,
    outputs: &[(&str, &S)],
    candidates: &[StorePath],
) -> Result<(Vec<Planned>, Vec<usize>), CaOutputError> {
    let drv = store_dir.print(drv_path);
    let mut names = BTreeSet::new();
    for (name, _) in outputs {
        if !names.insert(*name) {
            return Err(CaOutputError::DuplicateOutput {
                drv,
                output: name.to_string(),
            });
        }
    }
    let scratch: Vec<StorePath> = outputs
        .iter()
        .map(|(name, _)| scratch_path(store_dir, drv_path, name))
        .collect();
    let index_of_scratch: HashMap<&StorePath, usize> =
        scratch.iter().enumerate().map(|(i, p)| (p, i)).collect();

    // Scan every output for the referenceable paths: the inputs' closure and the scratch outputs.
    let mut referenceable: BTreeSet<StorePath> = candidates.iter().cloned().collect();
    referenceable.extend(scratch.iter().cloned());
    // The same pass hashes each output modulo its scratch hash part: that is the final hash of
    // every output that refers to no sibling (nothing to rewrite first), the common case.
    let mut scanned: Vec<BTreeSet<StorePath>> = Vec::with_capacity(outputs.len());
    let mut first_modulo: Vec<Option<HashModulo>> = Vec::with_capacity(outputs.len());
    for (i, (name, src)) in outputs.iter().enumerate() {
        let nar_err = |source| CaOutputError::Nar {
            output: name.to_string(),
            source,
        };
        let tee = Tee(
            RefScanner::new(referenceable.iter().cloned()),
            HashModuloWriter::new(scratch[i].hash_part())?,
        );
        let mut w = BufWriter::with_capacity(CHUNK, tee);
        src.dump(&mut w).map_err(nar_err)?;
        let Tee(scanner, hm) = w
            .into_inner()
            .map_err(|e| nar_err(NarWriteError::Write(e.into_error())))?;
        scanned.push(scanner.found());
        first_modulo.push(Some(hm.finish()));
    }

    // Dependency order (dependencies first), visiting outputs by name for determinism.
    let deps: Vec<BTreeSet<usize>> = scanned
        .iter()
        .enumerate()
        .map(|(i, refs)| {
            refs.iter()
                .filter_map(|r| index_of_scratch.get(r).copied())
                .filter(|&j| j != i)
                .collect()
        })
        .collect();
    let mut by_name: Vec<usize> = (0..outputs.len()).collect();
    by_name.sort_by_key(|&i| outputs[i].0);
    let mut state = vec![0u8; outputs.len()]; // 0 new, 1 on the stack, 2 done
    let mut order = Vec::with_capacity(outputs.len());
    for &root in &by_name {
        // Iterative DFS: (node, remaining deps).
        if state[root] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, Vec<usize>)> =
            vec![(root, deps[root].iter().copied().collect())];
        state[root] = 1;
        while let Some((node, pending)) = stack.last_mut() {
            let node = *node;
            match pending.pop() {
                Some(d) => match state[d] {
                    0 => {
                        state[d] = 1;
                        stack.push((d, deps[d].iter().copied().collect()));
                    }
                    1 => {
                        return Err(CaOutputError::Cycle {
                            drv,
                            from: outputs[node].0.to_string(),
                            to: outputs[d].0.to_string(),
                        });
                    }
                    _ => {}
                },
                None => {
                    state[node] = 2;
                    order.push(node);
                    stack.pop();
                }
            }
        }
    }

    let mut finals: Vec<Option<StorePath>> = vec![None; outputs.len()];
    let mut done_rewrites: Vec<(String, String)> = Vec::new();
    let mut planned: Vec<Option<Planned>> = (0..outputs.len()).map(|_| None).collect();
    for &i in &order {
        let (name, src) = outputs[i];
        let nar_err = |source| CaOutputError::Nar {
            output: name.to_string(),
            source,
        };
        // Hash modulo the scratch hash part, after rewriting the finished siblings.
        let modulo = match first_modulo[i].take() {
            Some(m) if deps[i].is_empty() => m,
            _ => {
                let hm = HashModuloWriter::new(scratch[i].hash_part())?;
                let pairs: Vec<(&str, &[u8])> = done_rewrites
                    .iter()
                    .map(|(f, t)| (f.as_str(), t.as_bytes()))
                    .collect();
                let mut w = BufWriter::with_capacity(CHUNK, RewritingWriter::new(hm, pairs)?);
                src.dump(&mut w).map_err(nar_err)?;
                let (hm, _, _) = w
                    .into_inner()
                    .map_err(|e| nar_err(NarWriteError::Write(e.into_error())))?
                    .finish()
                    .map_err(|e| nar_err(NarWriteError::Write(e)))?;
                hm.finish()
            }
        };

        let mut self_ref = false;
        let mut others: BTreeSet<StorePath> = BTreeSet::new();
        for r in &scanned[i] {
            match index_of_scratch.get(r) {
                Some(&j) if j == i => self_ref = true,
                Some(&j) => match &finals[j] {
                    Some(f) => {
                        others.insert(f.clone());
                    }
                    None => unreachable!("dependencies are finished first"),
                },
                None => {
                    others.insert(r.clone());
                }
            }
        }
        let printed: Vec<String> = others.iter().map(|p| store_dir.print(p)).collect();
        let final_path = store_dir.make_source_path(
            &output_path_name(drv_path.drv_name(), name),
            &modulo.hash,
            printed.iter().map(String::as_str),
            self_ref,
        );
        let mut references = others;
        if self_ref {
            references.insert(final_path.clone());
        }
        let mut rewrites = done_rewrites.clone();
        rewrites.push((
            scratch[i].hash_part().to_string(),
            final_path.hash_part().to_string(),
        ));
        done_rewrites.push((
            scratch[i].hash_part().to_string(),
            final_path.hash_part().to_string(),
        ));
        finals[i] = Some(final_path.clone());
        planned[i] = Some(Planned {
            scratch: scratch[i].clone(),
            final_path,
            modulo,
            references,
            rewrites,
        });
    }
    let planned = planned
        .into_iter()
        .map(|p| p.unwrap_or_else(|| unreachable!("every output is in the order")))
        .collect();
    Ok((planned, order))
}

/// Finalises the CA floating (`r:sha256`) outputs of one build.
///
/// - `store_dir`: the logical store dir the paths are in (e.g. `/nix/store`);
/// - `physical_store`: the directory the store's objects are really in; final outputs are created
///   at `<physical_store>/<base name>` (atomically: restored beside it, then renamed);
/// - `drv_path`: the derivation that was built (the resolved one, if it was resolved);
/// - `outputs`: where the builder left each output (its scratch path, see [`scratch_path`]);
/// - `candidates`: every other path the outputs may refer to (the closure of the inputs).
///
/// Returns the outputs in the order given. The scratch copies are deleted once every output is in
/// place. If a final path already exists on disk, it is left alone and `already_existed` is set.
/// File modes are 0644/0755 and timestamps are not canonicalised: that is the store's job.
pub fn finalize_ca_outputs(
    store_dir: &StoreDir,
    physical_store: &Path,
    drv_path: &StorePath,
    outputs: &[ScratchOutput],
    candidates: &[StorePath],
) -> Result<Vec<FinalOutput>, CaOutputError> {
    for o in outputs {
        if fs::symlink_metadata(&o.physical).is_err() {
            return Err(CaOutputError::MissingOutput {
                drv: store_dir.print(drv_path),
                output: o.name.clone(),
                physical: o.physical.clone(),
            });
        }
    }
    let srcs: Vec<(&str, &Path)> = outputs
        .iter()
        .map(|o| (o.name.as_str(), o.physical.as_path()))
        .collect();
    let (planned, order) = plan(store_dir, drv_path, &srcs, candidates)?;

    let mut results: Vec<Option<FinalOutput>> = (0..outputs.len()).map(|_| None).collect();
    for &i in &order {
        let o = &outputs[i];
        let p = &planned[i];
        let dest = physical_store.join(p.final_path.base_name());
        let (nar_hash, nar_size, already_existed) = if dest == o.physical {
            // The scratch path is the final path (no rewriting can be needed).
            let (h, n) =
                super::nar::nar_hash_and_size(&dest).map_err(|source| CaOutputError::Nar {
                    output: o.name.clone(),
                    source,
                })?;
            (h, n, false)
        } else {
            materialise(&o.name, &o.physical, &p.rewrites, physical_store, &dest)?
        };
        results[i] = Some(FinalOutput {
            name: o.name.clone(),
            scratch_path: p.scratch.clone(),
            path: p.final_path.clone(),
            nar_hash,
            nar_size,
            references: p.references.clone(),
            ca_hash: p.modulo.hash,
            ca: ca_string(&p.modulo.hash),
            physical: dest,
            already_existed,
        });
    }
    for (o, r) in outputs.iter().zip(&results) {
        if r.as_ref().is_some_and(|r| r.physical != o.physical) {
            remove_tree(&o.physical).map_err(|source| CaOutputError::Io {
                what: "removing the scratch output",
                path: o.physical.clone(),
                source,
            })?;
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| unreachable!("every output is in the order")))
        .collect())
}

/// Streams `src`'s NAR through the rewrites into a restore at `dest`, hashing the rewritten NAR.
/// Returns (narHash, narSize, dest already existed).
fn materialise(
    output: &str,
    src: &Path,
    rewrites: &[(String, String)],
    physical_store: &Path,
    dest: &Path,
) -> Result<(Sha256Hash, u64, bool), CaOutputError> {
    let nar_err = |source| CaOutputError::Nar {
        output: output.to_string(),
        source,
    };
    let pairs: Vec<(&str, &[u8])> = rewrites
        .iter()
        .map(|(f, t)| (f.as_str(), t.as_bytes()))
        .collect();
    let produce = |sink: Box<dyn Write + Send>| -> Result<(Sha256Hash, u64), CaOutputError> {
        let rw = RewritingWriter::new(HashingWriter::tee(sink), pairs.iter().copied())?;
        let mut w = BufWriter::with_capacity(CHUNK, rw);
        src.dump(&mut w).map_err(nar_err)?;
        let (hashing, _, _) = w
            .into_inner()
            .map_err(|e| nar_err(NarWriteError::Write(e.into_error())))?
            .finish()
            .map_err(|e| nar_err(NarWriteError::Write(e)))?;
        let (hash, size, _) = hashing.finish();
        Ok((hash, size))
    };

    if fs::symlink_metadata(dest).is_ok() {
        let (h, n) = produce(Box::new(io::sink()))?;
        return Ok((h, n, true));
    }

    let tmp = tempfile::Builder::new()
        .prefix(".qr-ca-")
        .tempdir_in(physical_store)
        .map_err(|source| CaOutputError::Io {
            what: "creating a temporary directory in",
            path: physical_store.to_path_buf(),
            source,
        })?;
    let staged = tmp.path().join("o");
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4);
    let (produced, restored) = std::thread::scope(|s| {
        let producer = s.spawn(move || produce(Box::new(ChanWriter { tx })));
        let mut reader = ChanReader {
            rx,
            cur: Vec::new(),
            off: 0,
        };
        let restored = {
            let mut nar = NarReader::new(&mut reader);
            restore(&mut nar, &staged).and_then(|()| nar.expect_eof().map_err(Into::into))
        };
        drop(reader); // unblocks the producer if the restore stopped early
        let produced = producer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (produced, restored)
    });
    // The producer's error (e.g. an unreadable file) explains a restore that saw the stream end.
    let (hash, size) = produced?;
    restored.map_err(|source| CaOutputError::Restore {
        output: output.to_string(),
        source,
    })?;
    let already = match rename_noreplace(&staged, dest) {
        Ok(()) => false,
        Err(e)
            if e.kind() == io::ErrorKind::AlreadyExists || fs::symlink_metadata(dest).is_ok() =>
        {
            true
        }
        Err(source) => {
            return Err(CaOutputError::Io {
                what: "moving the output into place at",
                path: dest.to_path_buf(),
                source,
            });
        }
    };
    if already {
        let _ = remove_tree(&staged);
    }
    drop(tmp);
    Ok((hash, size, already))
}

struct ChanWriter {
    tx: mpsc::SyncSender<Vec<u8>>,
}

impl Write for ChanWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.tx
            .send(buf.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the restore stopped"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct ChanReader {
    rx: mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    off: usize,
}

impl Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.off == self.cur.len() {
            match self.rx.recv() {
                Ok(v) => {
                    self.cur = v;
                    self.off = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.off);
        buf[..n].copy_from_slice(&self.cur[self.off..self.off + n]);
        self.off += n;
        Ok(n)
    }
}

/// [`finalize_ca_outputs`] for outputs held in memory (no filesystem): per output name, its final
/// path, content address and references, and the rewritten tree (`physical` is the logical path).
pub fn finalize_ca_trees(
    store_dir: &StoreDir,
    drv_path: &StorePath,
    outputs: &BTreeMap<String, NarTree>,
    candidates: &[StorePath],
) -> Result<BTreeMap<String, (FinalOutput, NarTree)>, CaOutputError> {
    let srcs: Vec<(&str, &NarTree)> = outputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let (planned, _) = plan(store_dir, drv_path, &srcs, candidates)?;
    let mut out = BTreeMap::new();
    for ((name, tree), p) in outputs.iter().zip(planned) {
        let nar_err = |source| CaOutputError::Nar {
            output: name.clone(),
            source,
        };
        let pairs: Vec<(&str, &[u8])> = p
            .rewrites
            .iter()
            .map(|(f, t)| (f.as_str(), t.as_bytes()))
            .collect();
        let mut w = RewritingWriter::new(HashingWriter::tee(Vec::new()), pairs)?;
        write_tree(tree, &mut w).map_err(nar_err)?;
        let (hashing, _, _) = w.finish().map_err(|e| nar_err(NarWriteError::Write(e)))?;
        let (nar_hash, nar_size, bytes) = hashing.finish();
        let rewritten = NarTree::from_nar(
            bytes.as_slice(),
            &super::nar::NarLimits::default(),
            u64::MAX,
        )
        .map_err(|e| CaOutputError::Restore {
            output: name.clone(),
            source: e.into(),
        })?;
        out.insert(
            name.clone(),
            (
                FinalOutput {
                    name: name.clone(),
                    scratch_path: p.scratch,
                    path: p.final_path.clone(),
                    nar_hash,
                    nar_size,
                    references: p.references,
                    ca_hash: p.modulo.hash,
                    ca: ca_string(&p.modulo.hash),
                    physical: PathBuf::from(store_dir.print(&p.final_path)),
                    already_existed: false,
                },
                rewritten,
            ),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::hash::{render_sri, sha256};

    fn sd() -> StoreDir {
        StoreDir::default()
    }

    fn drv(base: &str) -> StorePath {
        StorePath::from_base_name(base).unwrap()
    }

    /// mo-selfref from ../shared/fixtures/nix-oracle/multi.json:
    /// `mkdir $out; echo $out > $out/me; ln -s $out/me $out/link`.
    fn selfref_tree(out: &str) -> NarTree {
        NarTree::dir([
            ("me", NarTree::file(format!("{out}\n"))),
            ("link", NarTree::symlink(format!("{out}/me"))),
        ])
    }

    const SELFREF_DRV: &str = "k15gvglc23aqbfyzzyzh2flxfadqwn7a-mo-selfref.drv";

    #[test]
    fn scratch_paths() {
        let d = drv("1clrh13xr4sr7m2pdc17jr7m2364xcpi-mo-lib.drv");
        let out = scratch_path(&sd(), &d, "out");
        let dev = scratch_path(&sd(), &d, "dev");
        assert_eq!(out.name(), "mo-lib");
        assert_eq!(dev.name(), "mo-lib-dev");
        assert_ne!(out.hash_part(), dev.hash_part());
        let fp = "rewrite:1clrh13xr4sr7m2pdc17jr7m2364xcpi-mo-lib.drv:name:dev";
        assert_eq!(dev, sd().make_store_path(fp, &[0; 32], "mo-lib-dev"));
    }

    #[test]
    fn self_references_hash_modulo_with_offsets() {
        let d = drv(SELFREF_DRV);
        let scratch = scratch_path(&sd(), &d, "out");
        let tree = selfref_tree(&sd().print(&scratch));
        let outputs = BTreeMap::from([("out".to_string(), tree.clone())]);
        let r = finalize_ca_trees(&sd(), &d, &outputs, &[]).unwrap();
        let (f, rewritten) = &r["out"];
        // What Nix 2.8 recorded.
        assert_eq!(
            sd().print(&f.path),
            "/nix/store/hh9jnm8bhiy4rjqps0lq4b6vyaa1kiqz-mo-selfref"
        );
        assert_eq!(
            f.ca,
            "fixed:r:sha256:02xprmxjhv31sz1jwim05w6i6mw5lacacbqxbpz7nvs01m9bnaca"
        );
        assert_eq!(
            render_sri(&f.nar_hash),
            "sha256-xIVglJcMHei8PKUjkKPcl6pbEdpriheRGCFgoR9VBk8="
        );
        assert_eq!(f.nar_size, 584);
        assert_eq!(f.references, BTreeSet::from([f.path.clone()]));
        assert_eq!(rewritten, &selfref_tree(&sd().print(&f.path)));

        // The rule, spelled out: zero the scratch hash part, then append `|<offset>` per
        // occurrence (offsets in the NAR: one in the file, one in the symlink target).
        let nar = tree.to_nar().unwrap();
        let h = scratch.hash_part().as_bytes();
        let offsets: Vec<usize> = (0..=nar.len() - 32)
            .filter(|&i| &nar[i..i + 32] == h)
            .collect();
        assert_eq!(offsets.len(), 2);
        let mut zeroed = nar.clone();
        for &i in &offsets {
            zeroed[i..i + 32].fill(0);
        }
        let mut with_offsets = zeroed.clone();
        for &i in &offsets {
            with_offsets.extend_from_slice(format!("|{i}").as_bytes());
        }
        assert_eq!(sha256(&with_offsets), f.ca_hash);
        // Without the offsets the hash (and so the path) would differ.
        assert_ne!(sha256(&zeroed), f.ca_hash);
        let mut hm = HashModuloWriter::new(scratch.hash_part()).unwrap();
        for b in &nar {
            hm.write_all(std::slice::from_ref(b)).unwrap();
        }
        let m = hm.finish();
        assert_eq!(m.hash, f.ca_hash);
        assert_eq!(m.size, nar.len() as u64);
        assert_eq!(
            m.occurrences,
            offsets.iter().map(|&i| i as u64).collect::<Vec<_>>()
        );
    }

    #[test]
    fn cycles_between_outputs_are_errors() {
        let d = drv("1clrh13xr4sr7m2pdc17jr7m2364xcpi-mo-lib.drv");
        let out = sd().print(&scratch_path(&sd(), &d, "out"));
        let dev = sd().print(&scratch_path(&sd(), &d, "dev"));
        let outputs = BTreeMap::from([
            ("out".to_string(), NarTree::file(dev.clone())),
            ("dev".to_string(), NarTree::file(out.clone())),
        ]);
        let e = finalize_ca_trees(&sd(), &d, &outputs, &[]).unwrap_err();
        assert!(matches!(e, CaOutputError::Cycle { .. }), "{e}");
        assert!(e.to_string().contains("cycle"));
        // A chain is fine, whatever the names' order.
        let outputs = BTreeMap::from([
            ("out".to_string(), NarTree::file(dev.clone())),
            ("dev".to_string(), NarTree::file("leaf")),
        ]);
        let r = finalize_ca_trees(&sd(), &d, &outputs, &[]).unwrap();
        assert_eq!(
            r["out"].0.references,
            BTreeSet::from([r["dev"].0.path.clone()])
        );
    }

    #[test]
    fn on_disk_finalisation() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path();
        let d = drv(SELFREF_DRV);
        let scratch = scratch_path(&sd(), &d, "out");
        let phys = store.join(scratch.base_name());
        let make = || {
            let nar = selfref_tree(&sd().print(&scratch)).to_nar().unwrap();
            restore(&mut NarReader::new(nar.as_slice()), &phys).unwrap();
            // Builders may leave read-only directories behind.
            fs::set_permissions(&phys, fs::Permissions::from_mode(0o555)).unwrap();
        };
        make();
        let outs = [ScratchOutput {
            name: "out".into(),
            physical: phys.clone(),
        }];
        let first = finalize_ca_outputs(&sd(), store, &d, &outs, &[]).unwrap();
        assert!(!phys.exists());
        assert!(!first[0].already_existed);
        assert_eq!(
            first[0].physical,
            store.join("hh9jnm8bhiy4rjqps0lq4b6vyaa1kiqz-mo-selfref")
        );
        assert_eq!(
            super::super::nar::nar_hash_and_size(&first[0].physical).unwrap(),
            (first[0].nar_hash, first[0].nar_size)
        );
        // No temporary directory is left in the store.
        assert_eq!(fs::read_dir(store).unwrap().count(), 1);
        // Building it again finds the path present.
        make();
        let second = finalize_ca_outputs(&sd(), store, &d, &outs, &[]).unwrap();
        assert!(second[0].already_existed);
        assert_eq!(
            (second[0].path.clone(), second[0].nar_hash),
            (first[0].path.clone(), first[0].nar_hash)
        );
        assert!(!phys.exists());
        assert_eq!(fs::read_dir(store).unwrap().count(), 1);
        // A missing output is a clear error.
        let e = finalize_ca_outputs(&sd(), store, &d, &outs, &[]).unwrap_err();
        assert!(matches!(e, CaOutputError::MissingOutput { .. }), "{e}");
        let dup = [outs[0].clone(), outs[0].clone()];
        make();
        let e = finalize_ca_outputs(&sd(), store, &d, &dup, &[]).unwrap_err();
        assert!(matches!(e, CaOutputError::DuplicateOutput { .. }), "{e}");
    }

    #[test]
    fn large_outputs_stream_with_matches_across_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path();
        let d = drv("1clrh13xr4sr7m2pdc17jr7m2364xcpi-mo-lib.drv");
        let out = sd().print(&scratch_path(&sd(), &d, "out"));
        let dev = sd().print(&scratch_path(&sd(), &d, "dev"));
        // References placed around the 64 KiB chunk boundaries of the streams.
        let mut big = vec![b'x'; 300 * 1024];
        for (k, at) in [65_500usize, 131_060, 196_600, 262_130].iter().enumerate() {
            let p = if k % 2 == 0 { &out } else { &dev };
            big[*at..*at + p.len()].copy_from_slice(p.as_bytes());
        }
        let trees = BTreeMap::from([
            (
                "out".to_string(),
                NarTree::dir([
                    ("big", NarTree::executable(big)),
                    ("l", NarTree::symlink(dev.clone())),
                ]),
            ),
            ("dev".to_string(), NarTree::file(format!("{dev}\n"))),
        ]);
        let mem = finalize_ca_trees(&sd(), &d, &trees, &[]).unwrap();
        let mut outs = Vec::new();
        for (name, t) in &trees {
            let scratch = scratch_path(&sd(), &d, name);
            let phys = store.join(scratch.base_name());
            restore(&mut NarReader::new(t.to_nar().unwrap().as_slice()), &phys).unwrap();
            outs.push(ScratchOutput {
                name: name.clone(),
                physical: phys,
            });
        }
        let disk = finalize_ca_outputs(&sd(), store, &d, &outs, &[]).unwrap();
        for f in &disk {
            let (m, tree) = &mem[&f.name];
            assert_eq!(
                (&m.path, m.nar_hash, m.nar_size, &m.references, &m.ca),
                (&f.path, f.nar_hash, f.nar_size, &f.references, &f.ca)
            );
            assert_eq!(&NarTree::from_path(&f.physical).unwrap(), tree);
        }
        let o = &mem["out"].0;
        assert!(o.references.contains(&o.path));
        assert!(o.references.contains(&mem["dev"].0.path));
    }
}
