//! A strict, streaming NAR parser (pull events) and restoring a NAR into a directory.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::write::{COPY_BUF, padding};
use super::{NAR_MAGIC, validate_entry_name, validate_symlink_target};

/// Bounds on what the parser accepts; nothing is allocated beyond them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarLimits {
    /// Longest directory entry name (Linux's `NAME_MAX` is 255).
    pub max_name_len: u64,
    /// Longest symlink target (Linux's `PATH_MAX` is 4096 with the NUL).
    pub max_target_len: u64,
    /// Deepest directory nesting.
    pub max_depth: usize,
    /// Largest regular file (contents are streamed, never held whole).
    pub max_file_size: u64,
}

impl Default for NarLimits {
    fn default() -> Self {
        NarLimits {
            max_name_len: 255,
            max_target_len: 4095,
            max_depth: 1024,
            max_file_size: u64::MAX,
        }
    }
}

/// Longest fixed token (`nix-archive-1`, `executable`, …) the parser will read.
const MAX_TOKEN_LEN: u64 = 16;

/// A malformed NAR (or a failing reader), with the byte offset in the stream where it was noticed.
#[derive(Debug, Error)]
#[error("invalid NAR at byte {offset}: {kind}")]
pub struct NarError {
    /// Offset of the offending item from the start of the NAR.
    pub offset: u64,
    pub kind: NarErrorKind,
}

/// What was wrong.
#[derive(Debug, Error)]
pub enum NarErrorKind {
    #[error("reading the NAR failed: {0}")]
    Io(#[source] io::Error),
    #[error("unexpected end of input")]
    UnexpectedEof,
    #[error("bad magic: this is not a nix-archive-1 NAR")]
    BadMagic,
    #[error("non-zero padding byte")]
    NonZeroPadding,
    #[error("expected {expected}, found {found}")]
    UnexpectedToken {
        expected: &'static str,
        found: String,
    },
    #[error("{what} of {len} bytes is longer than the limit of {limit}")]
    TooLong {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("invalid entry name {name:?}: {why}")]
    InvalidName { name: Vec<u8>, why: &'static str },
    #[error("entry {name:?} comes after {prev:?}: directory entries are not sorted")]
    Unsorted { prev: Vec<u8>, name: Vec<u8> },
    #[error("duplicate directory entry {name:?}")]
    Duplicate { name: Vec<u8> },
    #[error("invalid symlink target {target:?}: {why}")]
    InvalidTarget { target: Vec<u8>, why: &'static str },
    #[error("the executable marker has a non-empty value")]
    ExecutableNotEmpty,
    #[error("directories nested deeper than {0}")]
    TooDeep(usize),
    #[error("data after the end of the NAR")]
    TrailingData,
    #[error("the NAR's contents exceed the in-memory limit of {0} bytes")]
    TooLarge(u64),
    #[error("the reader already failed; it cannot continue")]
    Poisoned,
}

/// One step of a NAR, in order. Paths are relative to the NAR's root (empty for the root itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarEvent {
    /// A directory starts; its entries follow, then [`NarEvent::EndDirectory`].
    Directory {
        path: PathBuf,
    },
    EndDirectory,
    /// A regular file of `size` bytes; read them with [`NarReader::read_contents`] (whatever is not
    /// read is skipped by the next [`NarReader::next_event`]).
    Regular {
        path: PathBuf,
        executable: bool,
        size: u64,
    },
    Symlink {
        path: PathBuf,
        target: Vec<u8>,
    },
}

/// A pull parser over a NAR stream. It reads the stream with many small reads: give it a buffered
/// reader. It never reads past the end of the NAR, so a NAR embedded in a longer stream is fine.
pub struct NarReader<R: Read> {
    r: R,
    pos: u64,
    limits: NarLimits,
    started: bool,
    finished: bool,
    poisoned: bool,
    /// One frame per open directory: the previous entry name in it.
    dirs: Vec<Option<Vec<u8>>>,
    /// The names of the open entries (the current node's path).
    path: Vec<Vec<u8>>,
    /// Contents of the current regular file still to read: (left, size).
    pending: Option<(u64, u64)>,
    /// The current node's `)` has been read; its entry (if any) is still open.
    close_node: bool,
}

fn token_display(tok: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(tok))
}

impl<R: Read> NarReader<R> {
    pub fn new(r: R) -> Self {
        Self::with_limits(r, NarLimits::default())
    }

    pub fn with_limits(r: R, limits: NarLimits) -> Self {
        NarReader {
            r,
            pos: 0,
            limits,
            started: false,
            finished: false,
            poisoned: false,
            dirs: Vec::new(),
            path: Vec::new(),
            pending: None,
            close_node: false,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.pos
    }

    /// True once the root node has been read completely.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn into_inner(self) -> R {
        self.r
    }

    fn err(&self, offset: u64, kind: NarErrorKind) -> NarError {
        NarError { offset, kind }
    }

    /// The next event, or `None` after the root node.
    pub fn next_event(&mut self) -> Result<Option<NarEvent>, NarError> {
        if self.poisoned {
            return Err(self.err(self.pos, NarErrorKind::Poisoned));
        }
        let r = self.next_inner();
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Reads up to `buf.len()` bytes of the current regular file's contents; `Ok(0)` at its end (or
    /// when the last event was not a regular file).
    pub fn read_contents(&mut self, buf: &mut [u8]) -> Result<usize, NarError> {
        if self.poisoned {
            return Err(self.err(self.pos, NarErrorKind::Poisoned));
        }
        let Some((left, size)) = self.pending else {
            return Ok(0);
        };
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match self.read_some(&mut buf[..want]) {
            Ok(n) => {
                self.pending = Some((left - n as u64, size));
                Ok(n)
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// After the root node: checks that the stream ends here.
    pub fn expect_eof(&mut self) -> Result<(), NarError> {
        if !self.finished {
            return Err(self.err(
                self.pos,
                NarErrorKind::UnexpectedToken {
                    expected: "the end of the NAR",
                    found: "an unfinished NAR".into(),
                },
            ));
        }
        let mut b = [0u8; 1];
        loop {
            match self.r.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(self.err(self.pos, NarErrorKind::TrailingData)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(self.pos, NarErrorKind::Io(e))),
            }
        }
    }

    fn next_inner(&mut self) -> Result<Option<NarEvent>, NarError> {
        if let Some((left, size)) = self.pending.take() {
            self.skip(left)?;
            self.read_padding(size)?;
            self.expect(b")", "\")\" after the file contents")?;
            self.node_done()?;
        } else if self.close_node {
            self.close_node = false;
            self.node_done()?;
        }
        if self.finished {
            return Ok(None);
        }
        if !self.started {
            self.started = true;
            let start = self.pos;
            let len = self.read_u64()?;
            if len != NAR_MAGIC.len() as u64 {
                return Err(self.err(start, NarErrorKind::BadMagic));
            }
            let mut magic = [0u8; NAR_MAGIC.len()];
            self.read_exact(&mut magic)?;
            if magic != NAR_MAGIC.as_bytes() {
                return Err(self.err(start, NarErrorKind::BadMagic));
            }
            self.read_padding(len)?;
            return self.read_node().map(Some);
        }
        // Inside a directory: another entry or its end.
        let start = self.pos;
        let tok = self.read_token("\"entry\" or \")\"")?;
        match tok.as_slice() {
            b")" => {
                self.dirs.pop();
                self.close_node = true;
                Ok(Some(NarEvent::EndDirectory))
            }
            b"entry" => {
                self.expect(b"(", "\"(\" after \"entry\"")?;
                self.expect(b"name", "\"name\"")?;
                let name_at = self.pos;
                let name = self.read_string(self.limits.max_name_len, "entry name")?;
                if let Err(why) = validate_entry_name(&name) {
                    return Err(self.err(name_at, NarErrorKind::InvalidName { name, why }));
                }
                let prev = self.dirs.last_mut().and_then(Option::take);
                if let Some(prev) = prev {
                    if name == prev {
                        return Err(self.err(name_at, NarErrorKind::Duplicate { name }));
                    }
                    if name < prev {
                        return Err(self.err(name_at, NarErrorKind::Unsorted { prev, name }));
                    }
                }
                if let Some(frame) = self.dirs.last_mut() {
                    *frame = Some(name.clone());
                }
                self.expect(b"node", "\"node\"")?;
                self.path.push(name);
                self.read_node().map(Some)
            }
            other => Err(self.err(
                start,
                NarErrorKind::UnexpectedToken {
                    expected: "\"entry\" or \")\"",
                    found: token_display(other),
                },
            )),
        }
    }

    fn current_path(&self) -> PathBuf {
        self.path.iter().map(|c| OsStr::from_bytes(c)).collect()
    }

    fn read_node(&mut self) -> Result<NarEvent, NarError> {
        self.expect(b"(", "\"(\"")?;
        self.expect(b"type", "\"type\"")?;
        let start = self.pos;
        let ty = self.read_token("a node type")?;
        match ty.as_slice() {
            b"regular" => {
                let mut at = self.pos;
                let mut tok = self.read_token("\"executable\" or \"contents\"")?;
                let executable = tok == b"executable";
                if executable {
                    let v_at = self.pos;
                    if self.read_u64()? != 0 {
                        return Err(self.err(v_at, NarErrorKind::ExecutableNotEmpty));
                    }
                    at = self.pos;
                    tok = self.read_token("\"contents\"")?;
                }
                if tok != b"contents" {
                    return Err(self.err(
                        at,
                        NarErrorKind::UnexpectedToken {
                            expected: "\"contents\"",
                            found: token_display(&tok),
                        },
                    ));
                }
                let size_at = self.pos;
                let size = self.read_u64()?;
                if size > self.limits.max_file_size {
                    return Err(self.err(
                        size_at,
                        NarErrorKind::TooLong {
                            what: "file",
                            len: size,
                            limit: self.limits.max_file_size,
                        },
                    ));
                }
                self.pending = Some((size, size));
                Ok(NarEvent::Regular {
                    path: self.current_path(),
                    executable,
                    size,
                })
            }
            b"symlink" => {
                self.expect(b"target", "\"target\"")?;
                let at = self.pos;
                let target = self.read_string(self.limits.max_target_len, "symlink target")?;
                if let Err(why) = validate_symlink_target(&target) {
                    return Err(self.err(at, NarErrorKind::InvalidTarget { target, why }));
                }
                self.expect(b")", "\")\" after the symlink target")?;
                self.close_node = true;
                Ok(NarEvent::Symlink {
                    path: self.current_path(),
                    target,
                })
            }
            b"directory" => {
                if self.dirs.len() >= self.limits.max_depth {
                    return Err(self.err(start, NarErrorKind::TooDeep(self.limits.max_depth)));
                }
                self.dirs.push(None);
                Ok(NarEvent::Directory {
                    path: self.current_path(),
                })
            }
            other => Err(self.err(
                start,
                NarErrorKind::UnexpectedToken {
                    expected: "\"regular\", \"symlink\" or \"directory\"",
                    found: token_display(other),
                },
            )),
        }
    }

    /// The current node's closing `)` has been read: close its entry, or finish the NAR.
    fn node_done(&mut self) -> Result<(), NarError> {
        if self.path.pop().is_some() {
            self.expect(b")", "\")\" closing the entry")
        } else {
            self.finished = true;
            Ok(())
        }
    }

    // --- primitives ---

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, NarError> {
        loop {
            match self.r.read(buf) {
                Ok(0) => return Err(self.err(self.pos, NarErrorKind::UnexpectedEof)),
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(self.pos, NarErrorKind::Io(e))),
            }
        }
    }

    fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<(), NarError> {
        while !buf.is_empty() {
            let n = self.read_some(buf)?;
            buf = &mut buf[n..];
        }
        Ok(())
    }

    fn skip(&mut self, mut n: u64) -> Result<(), NarError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            let got = self.read_some(&mut buf[..want])?;
            n -= got as u64;
        }
        Ok(())
    }

    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarError> {
        let n = padding(len);
        let mut b = [0u8; 8];
        let start = self.pos;
        self.read_exact(&mut b[..n])?;
        if let Some(i) = b[..n].iter().position(|&x| x != 0) {
            return Err(self.err(start + i as u64, NarErrorKind::NonZeroPadding));
        }
        Ok(())
    }

    /// A string of at most `limit` bytes.
    fn read_string(&mut self, limit: u64, what: &'static str) -> Result<Vec<u8>, NarError> {
        let start = self.pos;
        let len = self.read_u64()?;
        if len > limit {
            return Err(self.err(start, NarErrorKind::TooLong { what, len, limit }));
        }
        // `len <= limit`, and limits are small, so this allocation is bounded.
        let mut s = vec![0u8; len as usize];
        self.read_exact(&mut s)?;
        self.read_padding(len)?;
        Ok(s)
    }

    /// A short fixed token; anything longer than any token is reported as unexpected.
    fn read_token(&mut self, expected: &'static str) -> Result<Vec<u8>, NarError> {
        let start = self.pos;
        let len = self.read_u64()?;
        if len > MAX_TOKEN_LEN {
            return Err(self.err(
                start,
                NarErrorKind::UnexpectedToken {
                    expected,
                    found: format!("a string of {len} bytes"),
                },
            ));
        }
        let mut s = vec![0u8; len as usize];
        self.read_exact(&mut s)?;
        self.read_padding(len)?;
        Ok(s)
    }

    fn expect(&mut self, tok: &[u8], expected: &'static str) -> Result<(), NarError> {
        let start = self.pos;
        let got = self.read_token(expected)?;
        if got != tok {
            return Err(self.err(
                start,
                NarErrorKind::UnexpectedToken {
                    expected,
                    found: token_display(&got),
                },
            ));
        }
        Ok(())
    }
}

/// Why a NAR could not be restored.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(transparent)]
    Nar(#[from] NarError),
    #[error("restoring {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Restores the NAR read by `nar` at `dest` (which must not exist; its parent must). Reads exactly
/// the NAR, nothing after it. Files are created 0644 (0755 when executable), directories 0755.
/// On error, whatever was already created stays: restore into a temporary location.
pub fn restore<R: Read>(nar: &mut NarReader<R>, dest: &Path) -> Result<(), RestoreError> {
    let mut buf = vec![0u8; COPY_BUF];
    let target_of = |rel: &Path| -> PathBuf {
        if rel.as_os_str().is_empty() {
            dest.to_path_buf()
        } else {
            dest.join(rel)
        }
    };
    while let Some(ev) = nar.next_event()? {
        match ev {
            NarEvent::Directory { path } => {
                let p = target_of(&path);
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&p)
                    .map_err(|source| RestoreError::Io { path: p, source })?;
            }
            NarEvent::EndDirectory => {}
            NarEvent::Regular {
                path, executable, ..
            } => {
                let p = target_of(&path);
                let io_err = |source| RestoreError::Io {
                    path: p.clone(),
                    source,
                };
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(if executable { 0o755 } else { 0o644 })
                    .open(&p)
                    .map_err(io_err)?;
                if executable {
                    // The umask may have stripped the owner's execute bit; the NAR says it is set.
                    f.set_permissions(fs::Permissions::from_mode(0o755))
                        .map_err(io_err)?;
                }
                loop {
                    let n = nar.read_contents(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    f.write_all(&buf[..n]).map_err(io_err)?;
                }
            }
            NarEvent::Symlink { path, target } => {
                let p = target_of(&path);
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &p)
                    .map_err(|source| RestoreError::Io { path: p, source })?;
            }
        }
    }
    Ok(())
}
