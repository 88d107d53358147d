//! Finding (and rewriting) store path hash parts in a NAR stream, as Nix does.
//!
//! Nix decides what a store object refers to by searching its NAR serialisation for the 32-character
//! nix32 hash parts of candidate paths (`RefScanSink`): every 32-byte window made only of nix32
//! characters is looked up, so a hash part is found even inside a longer run of such characters, and
//! across the boundaries of the chunks the stream arrives in. The same windows are what
//! [`RewritingWriter`] replaces (Nix's `RewritingSink` / `rewriteStrings`).

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::path::Path;

use super::hash::Sha256Hash;
use super::nar::{HashingWriter, NarTree, NarWriteError, dump_path, write_tree};
use super::path::{HASH_PART_LEN, StorePath};

const N: usize = HASH_PART_LEN;

const fn nix32_table() -> [bool; 256] {
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut t = [false; 256];
    let mut i = 0;
    while i < alphabet.len() {
        t[alphabet[i] as usize] = true;
        i += 1;
    }
    t
}

static IS_NIX32: [bool; 256] = nix32_table();

/// Calls `f(buf, i)` for each `i` such that `buf[i..i + 32]` is all nix32 characters, in
/// increasing order, skipping ahead past any other byte. `f` returns true when it changed
/// `buf[i..i + 32]` (to bytes that must be checked again). Returns the first start position not
/// examined (every window starting before it has been seen).
fn for_each_window(buf: &mut [u8], mut f: impl FnMut(&mut [u8], usize) -> bool) -> usize {
    let n = buf.len();
    let mut i = 0;
    // buf[i..ok] is known to be nix32 characters.
    let mut ok = 0;
    while i + N <= n {
        let end = i + N;
        let lo = ok.max(i);
        if let Some(k) = (lo..end).rev().find(|&k| !IS_NIX32[buf[k] as usize]) {
            i = k + 1;
            continue;
        }
        ok = end;
        if f(buf, i) {
            ok = i;
        }
        i += 1;
    }
    i
}

/// A [`Write`] sink that records which candidate hash parts occur in what is written to it.
pub struct RefScanner {
    by_hash: HashMap<[u8; N], Vec<usize>>,
    candidates: Vec<StorePath>,
    seen: Vec<bool>,
    /// The last (up to 31) bytes of the stream, which may start a window.
    tail: Vec<u8>,
    scratch: Vec<u8>,
}

fn hash_key(p: &StorePath) -> [u8; N] {
    let mut k = [0u8; N];
    k.copy_from_slice(&p.hash_part().as_bytes()[..N]);
    k
}

impl RefScanner {
    /// A scanner for the hash parts of `candidates`.
    pub fn new(candidates: impl IntoIterator<Item = StorePath>) -> Self {
        let candidates: Vec<StorePath> = candidates.into_iter().collect();
        let mut by_hash: HashMap<[u8; N], Vec<usize>> = HashMap::new();
        for (i, c) in candidates.iter().enumerate() {
            by_hash.entry(hash_key(c)).or_default().push(i);
        }
        RefScanner {
            seen: vec![false; candidates.len()],
            by_hash,
            candidates,
            tail: Vec::with_capacity(2 * N),
            scratch: Vec::with_capacity(3 * N),
        }
    }

    fn search(by_hash: &HashMap<[u8; N], Vec<usize>>, seen: &mut [bool], buf: &[u8]) {
        // As `for_each_window`, on a shared slice.
        let (mut i, mut ok) = (0, 0);
        while i + N <= buf.len() {
            let end = i + N;
            if let Some(k) = (ok.max(i)..end).rev().find(|&k| !IS_NIX32[buf[k] as usize]) {
                i = k + 1;
                continue;
            }
            ok = end;
            if let Some(idxs) = by_hash.get(&buf[i..end]) {
                for &j in idxs {
                    seen[j] = true;
                }
            }
            i += 1;
        }
    }

    /// Scans the next chunk of the stream.
    pub fn feed(&mut self, data: &[u8]) {
        if data.is_empty() || self.by_hash.is_empty() {
            return;
        }
        // Windows that straddle the previous chunk and this one.
        if !self.tail.is_empty() {
            self.scratch.clear();
            self.scratch.extend_from_slice(&self.tail);
            self.scratch
                .extend_from_slice(&data[..data.len().min(N - 1)]);
            Self::search(&self.by_hash, &mut self.seen, &self.scratch);
        }
        Self::search(&self.by_hash, &mut self.seen, data);
        // Keep the last N - 1 bytes of the stream.
        if data.len() >= N - 1 {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - (N - 1)..]);
        } else {
            self.tail.extend_from_slice(data);
            let excess = self.tail.len().saturating_sub(N - 1);
            self.tail.drain(..excess);
        }
    }

    /// The candidates found so far.
    pub fn found(&self) -> BTreeSet<StorePath> {
        self.candidates
            .iter()
            .zip(&self.seen)
            .filter(|(_, s)| **s)
            .map(|(c, _)| c.clone())
            .collect()
    }
}

impl Write for RefScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The candidates whose hash parts occur in the NAR (or any byte stream) read from `r`.
pub fn scan_nar<R: Read>(
    mut r: R,
    candidates: impl IntoIterator<Item = StorePath>,
) -> io::Result<BTreeSet<StorePath>> {
    let mut s = RefScanner::new(candidates);
    io::copy(&mut r, &mut s)?;
    Ok(s.found())
}

/// The candidates referenced by the filesystem object at `path` (scanning its NAR serialisation).
pub fn scan_path(
    path: &Path,
    candidates: impl IntoIterator<Item = StorePath>,
) -> Result<BTreeSet<StorePath>, NarWriteError> {
    let mut s = RefScanner::new(candidates);
    dump_path(path, &mut s)?;
    Ok(s.found())
}

/// The candidates referenced by an in-memory tree.
pub fn scan_tree(
    tree: &NarTree,
    candidates: impl IntoIterator<Item = StorePath>,
) -> Result<BTreeSet<StorePath>, NarWriteError> {
    let mut s = RefScanner::new(candidates);
    write_tree(tree, &mut s)?;
    Ok(s.found())
}

/// `narHash`, `narSize` and references of the filesystem object at `path`, in one pass: what an
/// input-addressed output (written directly at its final path) is registered with.
pub fn hash_and_scan_path(
    path: &Path,
    candidates: impl IntoIterator<Item = StorePath>,
) -> Result<(Sha256Hash, u64, BTreeSet<StorePath>), NarWriteError> {
    let mut w = HashingWriter::tee(RefScanner::new(candidates));
    dump_path(path, &mut w)?;
    let (hash, size, scanner) = w.finish();
    Ok((hash, size, scanner.found()))
}

/// Why a rewrite table was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("rewrite source {0:?} is not a 32-character nix32 hash part")]
    BadFrom(String),
    #[error("rewrite target for {from:?} is {len} bytes, not 32")]
    BadTo { from: String, len: usize },
}

/// A streaming [`Write`] adapter that replaces hash parts (32 nix32 characters) by other 32-byte
/// strings and passes everything on to `inner`, recording the stream offset of every replacement.
///
/// Matches are found left to right; after a replacement the search goes on at the next byte (over
/// the replaced bytes), as Nix's `RewritingSink` does. Up to 31 bytes are held back between writes
/// (a match may straddle them): call [`finish`](Self::finish) to pass them on.
pub struct RewritingWriter<W: Write> {
    inner: W,
    map: HashMap<[u8; N], [u8; N]>,
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    pos: u64,
    matches: Vec<u64>,
}

impl<W: Write> RewritingWriter<W> {
    /// Rewrites every `from` hash part (32 nix32 characters) to its `to` (any 32 bytes).
    /// Pairs with `from == to` are ignored.
    pub fn new<'a>(
        inner: W,
        rewrites: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, RewriteError> {
        let mut map = HashMap::new();
        for (from, to) in rewrites {
            if from.len() != N || !from.bytes().all(|b| IS_NIX32[b as usize]) {
                return Err(RewriteError::BadFrom(from.to_string()));
            }
            let to: [u8; N] = to.try_into().map_err(|_| RewriteError::BadTo {
                from: from.to_string(),
                len: to.len(),
            })?;
            if from.as_bytes() != to {
                map.insert(hash_key_str(from), to);
            }
        }
        Ok(RewritingWriter {
            inner,
            map,
            buf: Vec::new(),
            pos: 0,
            matches: Vec::new(),
        })
    }

    /// Writes out what is held back; returns the inner writer, the offsets of the replacements and
    /// the total number of bytes written.
    pub fn finish(mut self) -> io::Result<(W, Vec<u64>, u64)> {
        self.inner.write_all(&self.buf)?;
        let total = self.pos + self.buf.len() as u64;
        Ok((self.inner, self.matches, total))
    }
}

fn hash_key_str(s: &str) -> [u8; N] {
    let mut k = [0u8; N];
    k.copy_from_slice(&s.as_bytes()[..N]);
    k
}

impl<W: Write> Write for RewritingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.map.is_empty() {
            self.inner.write_all(data)?;
            self.pos += data.len() as u64;
            return Ok(data.len());
        }
        self.buf.extend_from_slice(data);
        let (map, matches, pos) = (&self.map, &mut self.matches, self.pos);
        let done = for_each_window(&mut self.buf, |b, i| match map.get(&b[i..i + N]) {
            Some(to) => {
                matches.push(pos + i as u64);
                b[i..i + N].copy_from_slice(to);
                true
            }
            None => false,
        });
        // Everything before `done` is final; keep the rest (< 32 bytes) for the next write.
        self.inner.write_all(&self.buf[..done])?;
        self.buf.drain(..done);
        self.pos += done as u64;
        Ok(data.len())
    }

    /// Flushes the inner writer; bytes held back for a possible match stay until [`Self::finish`].
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "nscyc94rf5cvmf5i5xpbbgd4wscv2z9d";
    const B: &str = "x15h1kimp67xgmq013zcyfp7v3gs9dn2";

    fn sp(h: &str, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{h}-{name}")).unwrap()
    }

    fn cands() -> Vec<StorePath> {
        vec![sp(A, "chain-a"), sp(B, "dia-base")]
    }

    fn scan_chunked(data: &[u8], chunks: &[usize]) -> BTreeSet<StorePath> {
        let mut s = RefScanner::new(cands());
        let mut rest = data;
        for &c in chunks {
            let c = c.min(rest.len());
            s.feed(&rest[..c]);
            rest = &rest[c..];
        }
        s.feed(rest);
        s.found()
    }

    #[test]
    fn finds_hash_parts_at_every_split() {
        let data = format!("xx /nix/store/{A}-chain-a\n and {B}");
        let all: BTreeSet<_> = cands().into_iter().collect();
        for split in 0..=data.len() {
            assert_eq!(
                scan_chunked(data.as_bytes(), &[split]),
                all,
                "split {split}"
            );
        }
        // Byte by byte.
        assert_eq!(scan_chunked(data.as_bytes(), &vec![1; data.len()]), all);
        for split in 0..=data.len() {
            assert_eq!(
                scan_chunked(data.as_bytes(), &[split, 3, 1, 7, 2]),
                all,
                "split {split}"
            );
        }
    }

    #[test]
    fn finds_hash_parts_inside_longer_nix32_runs() {
        // As Nix: every 32-char window of a nix32 run is looked up.
        let data = format!("abc{A}xyz");
        assert_eq!(
            scan_chunked(data.as_bytes(), &[]),
            [sp(A, "chain-a")].into_iter().collect()
        );
        assert!(scan_chunked(&A.as_bytes()[..31], &[]).is_empty());
        assert!(scan_chunked(b"", &[]).is_empty());
        // Not a nix32 character in the middle ('e'): no match.
        let mut broken = A.as_bytes().to_vec();
        broken[10] = b'e';
        assert!(scan_chunked(&broken, &[]).is_empty());
    }

    fn rewrite_chunked(data: &[u8], chunks: &[usize], to: &[u8]) -> (Vec<u8>, Vec<u64>, u64) {
        let mut w = RewritingWriter::new(Vec::new(), [(A, to)]).unwrap();
        let mut rest = data;
        for &c in chunks {
            let c = c.min(rest.len());
            w.write_all(&rest[..c]).unwrap();
            rest = &rest[c..];
        }
        w.write_all(rest).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn rewrites_across_chunk_boundaries() {
        let data = format!("{A}/nix/store/{A}-x {A}z{A}");
        let zeros = [0u8; 32];
        let expected: Vec<u8> = data.replace(A, &"\0".repeat(32)).into_bytes();
        let offs: Vec<u64> = data.match_indices(A).map(|(i, _)| i as u64).collect();
        for split in 0..=data.len() {
            let (out, m, total) = rewrite_chunked(data.as_bytes(), &[split, 5], &zeros);
            assert_eq!(out, expected, "split {split}");
            assert_eq!(m, offs);
            assert_eq!(total, data.len() as u64);
        }
        let (out, m, _) = rewrite_chunked(data.as_bytes(), &vec![1; data.len()], B.as_bytes());
        assert_eq!(out, data.replace(A, B).into_bytes());
        assert_eq!(m, offs);
    }

    #[test]
    fn rejects_bad_tables() {
        assert!(RewritingWriter::new(Vec::new(), [("short", &b"x"[..])]).is_err());
        assert!(RewritingWriter::new(Vec::new(), [(A, &b"x"[..])]).is_err());
        // Identity rewrites are dropped.
        let mut w = RewritingWriter::new(Vec::new(), [(A, A.as_bytes())]).unwrap();
        w.write_all(A.as_bytes()).unwrap();
        let (out, m, _) = w.finish().unwrap();
        assert_eq!(out, A.as_bytes());
        assert!(m.is_empty());
    }

    fn piece() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(A.as_bytes().to_vec()),
            Just(B.as_bytes().to_vec()),
            Just(A.as_bytes()[..20].to_vec()),
            "[0-9a-z]{0,40}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..10),
        ]
    }

    /// Nix's `RewritingSink` on the whole string: find from the match position after replacing.
    fn naive_rewrite(data: &[u8], from: &[u8], to: &[u8]) -> (Vec<u8>, Vec<u64>) {
        let mut s = data.to_vec();
        let mut m = Vec::new();
        let mut j = 0;
        while j + from.len() <= s.len() {
            if &s[j..j + from.len()] == from {
                m.push(j as u64);
                s[j..j + from.len()].copy_from_slice(to);
            }
            j += 1;
        }
        (s, m)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]

        #[test]
        fn chunked_scan_and_rewrite_match_naive(
            pieces in proptest::collection::vec(piece(), 0..12),
            chunks in proptest::collection::vec(0usize..50, 0..20),
        ) {
            let data: Vec<u8> = pieces.concat();
            let windows: BTreeSet<&[u8]> = data.windows(32).collect();
            let expected: BTreeSet<StorePath> = cands()
                .into_iter()
                .filter(|c| windows.contains(c.hash_part().as_bytes()))
                .collect();
            proptest::prop_assert_eq!(scan_chunked(&data, &chunks), expected);
            let (out, m, total) = rewrite_chunked(&data, &chunks, &[0u8; 32]);
            let (nout, nm) = naive_rewrite(&data, A.as_bytes(), &[0u8; 32]);
            proptest::prop_assert_eq!(out, nout);
            proptest::prop_assert_eq!(m, nm);
            proptest::prop_assert_eq!(total, data.len() as u64);
        }
    }
}
