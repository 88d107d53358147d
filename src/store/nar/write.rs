//! Serialising a filesystem tree or a [`NarTree`] as a NAR, streaming to any [`Write`].

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::tree::NarTree;
use super::{NAR_MAGIC, validate_entry_name, validate_symlink_target};
use crate::store::hash::Sha256Hash;

/// Size of the buffer file contents are streamed through.
pub(crate) const COPY_BUF: usize = 64 * 1024;

/// Why a NAR could not be written.
#[derive(Debug, Error)]
pub enum NarWriteError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing the NAR: {0}")]
    Write(#[source] io::Error),
    #[error("{path} is a {kind}, which a NAR cannot hold")]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("{path} shrank while it was being archived (expected {expected} bytes, got {got})")]
    FileShrank {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error("invalid directory entry name {name:?}: {why}")]
    InvalidName { name: Vec<u8>, why: &'static str },
    #[error("invalid symlink target {target:?}: {why}")]
    InvalidTarget { target: Vec<u8>, why: &'static str },
}

/// The low-level token writer. Keeps the byte count so callers get `narSize` for free.
pub(crate) struct NarEncoder<W: Write> {
    w: W,
    pos: u64,
}

const ZEROS: [u8; 8] = [0; 8];

pub(crate) fn padding(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

impl<W: Write> NarEncoder<W> {
    /// Starts a NAR: writes the `nix-archive-1` magic.
    pub(crate) fn new(w: W) -> io::Result<Self> {
        let mut e = NarEncoder { w, pos: 0 };
        e.str(NAR_MAGIC.as_bytes())?;
        Ok(e)
    }

    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    pub(crate) fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn u64(&mut self, n: u64) -> io::Result<()> {
        self.raw(&n.to_le_bytes())
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        self.raw(&ZEROS[..padding(len)])
    }

    fn str(&mut self, s: &[u8]) -> io::Result<()> {
        self.u64(s.len() as u64)?;
        self.raw(s)?;
        self.pad(s.len() as u64)
    }

    /// `( type regular [executable ""] contents <size>`; the caller then writes exactly `size`
    /// bytes with [`raw`](Self::raw) and calls [`regular_end`](Self::regular_end).
    pub(crate) fn regular_start(&mut self, executable: bool, size: u64) -> io::Result<()> {
        self.str(b"(")?;
        self.str(b"type")?;
        self.str(b"regular")?;
        if executable {
            self.str(b"executable")?;
            self.str(b"")?;
        }
        self.str(b"contents")?;
        self.u64(size)
    }

    pub(crate) fn regular_end(&mut self, size: u64) -> io::Result<()> {
        self.pad(size)?;
        self.str(b")")
    }

    pub(crate) fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.str(b"(")?;
        self.str(b"type")?;
        self.str(b"symlink")?;
        self.str(b"target")?;
        self.str(target)?;
        self.str(b")")
    }

    pub(crate) fn directory_start(&mut self) -> io::Result<()> {
        self.str(b"(")?;
        self.str(b"type")?;
        self.str(b"directory")
    }

    /// `entry ( name <name> node`; the entry's node follows, then [`entry_end`](Self::entry_end).
    pub(crate) fn entry_start(&mut self, name: &[u8]) -> io::Result<()> {
        self.str(b"entry")?;
        self.str(b"(")?;
        self.str(b"name")?;
        self.str(name)?;
        self.str(b"node")
    }

    pub(crate) fn entry_end(&mut self) -> io::Result<()> {
        self.str(b")")
    }

    pub(crate) fn directory_end(&mut self) -> io::Result<()> {
        self.str(b")")
    }
}

/// Serialises the filesystem object at `path` (not following a symlink at `path` itself) as a NAR
/// into `w`, streaming file contents. Returns the NAR's size in bytes.
///
/// As Nix does: regular files carry the executable flag when the owner may execute them, directory
/// entries are sorted by their name's bytes, and anything other than a regular file, a symlink or a
/// directory is an error. `w` gets many small writes: wrap a raw file or socket in a `BufWriter`.
pub fn dump_path<W: Write>(path: &Path, w: W) -> Result<u64, NarWriteError> {
    let mut enc = NarEncoder::new(w).map_err(NarWriteError::Write)?;
    let mut buf = vec![0u8; COPY_BUF];
    // The open directories, innermost last: no recursion, so a tree as deep as paths allow
    // needs no stack (and no directory stays open while its entries are archived).
    let mut open: Vec<OpenDir> = Vec::new();
    if let Some(d) = dump_node(path, &mut enc, &mut buf)? {
        open.push(d);
    }
    while let Some(top) = open.last_mut() {
        match top.names.next() {
            Some(name) => {
                let child = top.path.join(&name);
                enc.entry_start(name.as_bytes())
                    .map_err(NarWriteError::Write)?;
                match dump_node(&child, &mut enc, &mut buf)? {
                    Some(d) => open.push(d),
                    None => enc.entry_end().map_err(NarWriteError::Write)?,
                }
            }
            None => {
                open.pop();
                enc.directory_end().map_err(NarWriteError::Write)?;
                if !open.is_empty() {
                    enc.entry_end().map_err(NarWriteError::Write)?;
                }
            }
        }
    }
    Ok(enc.position())
}

/// A directory being archived: the names of its entries still to write, in NAR order.
struct OpenDir {
    path: PathBuf,
    names: std::vec::IntoIter<std::ffi::OsString>,
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> NarWriteError + '_ {
    move |source| NarWriteError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a regular file or symlink node whole; for a directory, writes its start and returns
/// its sorted entry names (the caller writes the entries and the end).
fn dump_node<W: Write>(
    path: &Path,
    enc: &mut NarEncoder<W>,
    buf: &mut [u8],
) -> Result<Option<OpenDir>, NarWriteError> {
    let meta = fs::symlink_metadata(path).map_err(read_err(path))?;
    let ft = meta.file_type();
    if ft.is_file() {
        dump_file(path, enc, buf).map(|()| None)
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(read_err(path))?;
        enc.symlink(target.as_os_str().as_bytes())
            .map_err(NarWriteError::Write)?;
        Ok(None)
    } else if ft.is_dir() {
        let mut names: Vec<std::ffi::OsString> = Vec::new();
        for entry in fs::read_dir(path).map_err(read_err(path))? {
            names.push(entry.map_err(read_err(path))?.file_name());
        }
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        enc.directory_start().map_err(NarWriteError::Write)?;
        Ok(Some(OpenDir {
            path: path.to_path_buf(),
            names: names.into_iter(),
        }))
    } else {
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_fifo() {
            "FIFO"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_char_device() {
            "character device"
        } else {
            "file of unknown type"
        };
        Err(NarWriteError::Unsupported {
            path: path.to_path_buf(),
            kind,
        })
    }
}

fn dump_file<W: Write>(
    path: &Path,
    enc: &mut NarEncoder<W>,
    buf: &mut [u8],
) -> Result<(), NarWriteError> {
    // O_NOFOLLOW: the object was a regular file when we looked; never follow a swapped-in symlink.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(read_err(path))?;
    let meta = f.metadata().map_err(read_err(path))?;
    if !meta.file_type().is_file() {
        return Err(NarWriteError::Unsupported {
            path: path.to_path_buf(),
            kind: "non-regular file (it changed while being archived)",
        });
    }
    let size = meta.len();
    let executable = meta.permissions().mode() & 0o100 != 0;
    enc.regular_start(executable, size)
        .map_err(NarWriteError::Write)?;
    copy_exact(&mut f, size, enc, buf).map_err(|e| match e {
        CopyError::Read(source) => NarWriteError::Read {
            path: path.to_path_buf(),
            source,
        },
        CopyError::Write(e) => NarWriteError::Write(e),
        CopyError::Short(got) => NarWriteError::FileShrank {
            path: path.to_path_buf(),
            expected: size,
            got,
        },
    })?;
    enc.regular_end(size).map_err(NarWriteError::Write)
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
    Short(u64),
}

fn copy_exact<R: Read, W: Write>(
    r: &mut R,
    size: u64,
    enc: &mut NarEncoder<W>,
    buf: &mut [u8],
) -> Result<(), CopyError> {
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match r.read(&mut buf[..want]) {
            Ok(0) => return Err(CopyError::Short(size - left)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        enc.raw(&buf[..n]).map_err(CopyError::Write)?;
        left -= n as u64;
    }
    Ok(())
}

/// Serialises an in-memory tree as a NAR into `w`. Returns the NAR's size in bytes.
pub fn write_tree<W: Write>(tree: &NarTree, w: W) -> Result<u64, NarWriteError> {
    let mut enc = NarEncoder::new(w).map_err(NarWriteError::Write)?;
    // The open directories' remaining entries, innermost last (no recursion: any depth).
    let mut open: Vec<std::collections::btree_map::Iter<'_, Vec<u8>, NarTree>> = Vec::new();
    if let Some(entries) = write_tree_node(tree, &mut enc)? {
        open.push(entries);
    }
    while let Some(top) = open.last_mut() {
        match top.next() {
            Some((name, child)) => {
                validate_entry_name(name).map_err(|why| NarWriteError::InvalidName {
                    name: name.clone(),
                    why,
                })?;
                enc.entry_start(name).map_err(NarWriteError::Write)?;
                match write_tree_node(child, &mut enc)? {
                    Some(entries) => open.push(entries),
                    None => enc.entry_end().map_err(NarWriteError::Write)?,
                }
            }
            None => {
                open.pop();
                enc.directory_end().map_err(NarWriteError::Write)?;
                if !open.is_empty() {
                    enc.entry_end().map_err(NarWriteError::Write)?;
                }
            }
        }
    }
    Ok(enc.position())
}

/// Writes a regular file or symlink node whole; for a directory, writes its start and returns
/// its entries (a `BTreeMap<Vec<u8>, _>` iterates in byte order, which is the NAR order).
fn write_tree_node<'t, W: Write>(
    tree: &'t NarTree,
    enc: &mut NarEncoder<W>,
) -> Result<Option<std::collections::btree_map::Iter<'t, Vec<u8>, NarTree>>, NarWriteError> {
    match tree {
        NarTree::Regular {
            executable,
            contents,
        } => {
            let size = contents.len() as u64;
            enc.regular_start(*executable, size)
                .and_then(|()| enc.raw(contents))
                .and_then(|()| enc.regular_end(size))
                .map_err(NarWriteError::Write)?;
            Ok(None)
        }
        NarTree::Symlink { target } => {
            validate_symlink_target(target).map_err(|why| NarWriteError::InvalidTarget {
                target: target.clone(),
                why,
            })?;
            enc.symlink(target).map_err(NarWriteError::Write)?;
            Ok(None)
        }
        NarTree::Directory(entries) => {
            enc.directory_start().map_err(NarWriteError::Write)?;
            Ok(Some(entries.iter()))
        }
    }
}

/// A [`Write`] that hashes (sha256) and counts what goes through it, optionally passing it on.
pub struct HashingWriter<W: Write = io::Sink> {
    hasher: Sha256,
    size: u64,
    inner: W,
}

impl HashingWriter<io::Sink> {
    /// Hashes and counts, discarding the bytes.
    pub fn new() -> Self {
        Self::tee(io::sink())
    }
}

impl Default for HashingWriter<io::Sink> {
    fn default() -> Self {
        Self::new()
    }
}

impl<W: Write> HashingWriter<W> {
    /// Hashes and counts, and writes every byte on to `inner` (hashed only once `inner` took it).
    pub fn tee(inner: W) -> Self {
        HashingWriter {
            hasher: Sha256::new(),
            size: 0,
            inner,
        }
    }

    /// The sha256 and the byte count so far.
    pub fn finish(self) -> (Sha256Hash, u64, W) {
        (self.hasher.finalize().into(), self.size, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `narHash` and `narSize` of the filesystem object at `path`, hashing the NAR as it is produced.
pub fn nar_hash_and_size(path: &Path) -> Result<(Sha256Hash, u64), NarWriteError> {
    let mut h = HashingWriter::new();
    dump_path(path, &mut h)?;
    let (hash, size, _) = h.finish();
    Ok((hash, size))
}

/// `narHash` and `narSize` of an in-memory tree.
pub fn tree_hash_and_size(tree: &NarTree) -> Result<(Sha256Hash, u64), NarWriteError> {
    let mut h = HashingWriter::new();
    write_tree(tree, &mut h)?;
    let (hash, size, _) = h.finish();
    Ok((hash, size))
}
