//! An in-memory filesystem tree with NAR semantics (for tests and small objects).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use super::read::{NarError, NarErrorKind, NarEvent, NarLimits, NarReader};
use super::write::{NarWriteError, dump_path, write_tree};

/// A directory's entries by name.
type Entries = BTreeMap<Vec<u8>, NarTree>;

/// A filesystem object as a NAR sees it. Directory entries are kept in byte order of their names,
/// which is the NAR order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarTree {
    Regular { executable: bool, contents: Vec<u8> },
    Symlink { target: Vec<u8> },
    Directory(BTreeMap<Vec<u8>, NarTree>),
}

impl NarTree {
    /// A non-executable regular file.
    pub fn file(contents: impl Into<Vec<u8>>) -> Self {
        NarTree::Regular {
            executable: false,
            contents: contents.into(),
        }
    }

    /// An executable regular file.
    pub fn executable(contents: impl Into<Vec<u8>>) -> Self {
        NarTree::Regular {
            executable: true,
            contents: contents.into(),
        }
    }

    pub fn symlink(target: impl Into<Vec<u8>>) -> Self {
        NarTree::Symlink {
            target: target.into(),
        }
    }

    /// A directory from `(name, child)` pairs.
    pub fn dir<N: Into<Vec<u8>>>(entries: impl IntoIterator<Item = (N, NarTree)>) -> Self {
        NarTree::Directory(entries.into_iter().map(|(n, t)| (n.into(), t)).collect())
    }

    /// The object at a `/`-separated relative path (empty for `self`); symlinks are not followed.
    pub fn get(&self, rel: &str) -> Option<&NarTree> {
        let mut cur = self;
        for comp in rel.split('/').filter(|c| !c.is_empty()) {
            match cur {
                NarTree::Directory(entries) => cur = entries.get(comp.as_bytes())?,
                _ => return None,
            }
        }
        Some(cur)
    }

    /// The NAR serialisation.
    pub fn to_nar(&self) -> Result<Vec<u8>, NarWriteError> {
        let mut v = Vec::new();
        write_tree(self, &mut v)?;
        Ok(v)
    }

    /// Reads a filesystem object into memory (through its NAR serialisation).
    pub fn from_path(path: &Path) -> Result<Self, NarWriteError> {
        let mut v = Vec::new();
        dump_path(path, &mut v)?;
        Self::from_nar(&mut v.as_slice(), &NarLimits::default(), u64::MAX).map_err(|e| {
            NarWriteError::Write(std::io::Error::other(format!(
                "re-reading our own NAR of {}: {e}",
                path.display()
            )))
        })
    }

    /// Parses one NAR from `r` into memory. `max_bytes` bounds the total of contents, names and
    /// symlink targets held (memory grows with the data actually read, never with a declared size).
    /// Stops at the end of the NAR; see [`NarReader::expect_eof`] to reject trailing data.
    pub fn from_nar<R: Read>(r: R, limits: &NarLimits, max_bytes: u64) -> Result<Self, NarError> {
        let mut nar = NarReader::with_limits(r, limits.clone());
        let tree = Self::from_reader(&mut nar, max_bytes)?;
        Ok(tree)
    }

    /// Like [`from_nar`](Self::from_nar), on an existing reader (which is left after the NAR).
    pub fn from_reader<R: Read>(nar: &mut NarReader<R>, max_bytes: u64) -> Result<Self, NarError> {
        // Open directories: (entry name in the parent, entries so far).
        let mut stack: Vec<(Vec<u8>, Entries)> = Vec::new();
        let mut used: u64 = 0;
        let mut charge = |n: u64, at: u64| -> Result<(), NarError> {
            used = used.saturating_add(n);
            if used > max_bytes {
                Err(NarError {
                    offset: at,
                    kind: NarErrorKind::TooLarge(max_bytes),
                })
            } else {
                Ok(())
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut root: Option<NarTree> = None;
        while let Some(ev) = nar.next_event()? {
            let at = nar.offset();
            let (name, node) = match ev {
                NarEvent::Directory { path } => {
                    let name = last_name(&path);
                    charge(name.len() as u64, at)?;
                    stack.push((name, BTreeMap::new()));
                    continue;
                }
                NarEvent::EndDirectory => match stack.pop() {
                    Some((name, entries)) => (name, NarTree::Directory(entries)),
                    None => continue, // unreachable: the reader balances directories
                },
                NarEvent::Regular {
                    path, executable, ..
                } => {
                    let name = last_name(&path);
                    charge(name.len() as u64, at)?;
                    let mut contents = Vec::new();
                    loop {
                        let n = nar.read_contents(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        charge(n as u64, nar.offset())?;
                        contents.extend_from_slice(&buf[..n]);
                    }
                    (
                        name,
                        NarTree::Regular {
                            executable,
                            contents,
                        },
                    )
                }
                NarEvent::Symlink { path, target } => {
                    let name = last_name(&path);
                    charge((name.len() + target.len()) as u64, at)?;
                    (name, NarTree::Symlink { target })
                }
            };
            match stack.last_mut() {
                Some((_, entries)) => {
                    entries.insert(name, node);
                }
                None => root = Some(node),
            }
        }
        root.ok_or(NarError {
            offset: nar.offset(),
            kind: NarErrorKind::UnexpectedEof,
        })
    }
}

fn last_name(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default()
}
