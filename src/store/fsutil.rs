//! Filesystem helpers shared by the local store and CA output finalisation: fsync of trees,
//! canonical permissions and timestamps, atomic renames, removal of read-only trees, copies, and
//! `flock` locks.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// fsyncs a directory (so that entries created or renamed in it are durable).
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Visits the tree at `root` without recursion, so that a deep tree (a build can nest
/// directories as deep as `PATH_MAX` allows) needs no stack, and without holding a directory open
/// while visiting below it, so that it needs no file descriptor per level either. `pre` sees every
/// object before the entries of a directory are listed, `post` sees it after they were all visited
/// (for anything but a directory, right after `pre`). The first error stops the walk.
fn walk(
    root: &Path,
    mut pre: impl FnMut(&Path, &fs::Metadata) -> io::Result<()>,
    mut post: impl FnMut(&Path, &fs::Metadata) -> io::Result<()>,
) -> io::Result<()> {
    struct Dir {
        path: std::path::PathBuf,
        meta: fs::Metadata,
        entries: std::vec::IntoIter<std::ffi::OsString>,
    }
    let mut open: Vec<Dir> = Vec::new();
    let mut next = Some(root.to_path_buf());
    loop {
        if let Some(path) = next.take() {
            let meta = fs::symlink_metadata(&path)?;
            pre(&path, &meta)?;
            if meta.is_dir() {
                let entries = fs::read_dir(&path)?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<_>>>()?;
                open.push(Dir {
                    path,
                    meta,
                    entries: entries.into_iter(),
                });
            } else {
                post(&path, &meta)?;
            }
        }
        let Some(top) = open.last_mut() else {
            return Ok(());
        };
        match top.entries.next() {
            Some(name) => next = Some(top.path.join(name)),
            None => {
                let done = open.pop().expect("a directory is open");
                post(&done.path, &done.meta)?;
            }
        }
    }
}

/// fsyncs every regular file and directory of the tree at `path` (symlinks need none).
pub(crate) fn fsync_tree(path: &Path) -> io::Result<()> {
    walk(
        path,
        |_, _| Ok(()),
        |p, m| {
            if m.is_dir() || m.is_file() {
                File::open(p)?.sync_all()
            } else {
                Ok(())
            }
        },
    )
}

/// Nix's `canonicalisePathMetaData`: files 0444 (0555 if the owner may execute), directories
/// 0555, no setuid/setgid/sticky bits, and every timestamp set to 1 (symlinks included).
pub(crate) fn canonicalise(path: &Path) -> io::Result<()> {
    walk(path, |_, _| Ok(()), canonicalise_one)
}

/// [`canonicalise`] of one object (a directory's entries are done before it).
fn canonicalise_one(path: &Path, m: &fs::Metadata) -> io::Result<()> {
    if m.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o555))?;
    } else if m.is_file() {
        let mode = if m.mode() & 0o100 != 0 { 0o555 } else { 0o444 };
        if m.mode() & 0o7777 != mode {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        }
    } else if !m.file_type().is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is neither a file, a directory nor a symlink",
                path.display()
            ),
        ));
    }
    let c = cstr(path)?;
    let times = [
        libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        },
    ];
    // SAFETY: a valid NUL-terminated path and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Renames `from` to `to`, failing with `AlreadyExists` if `to` exists.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let f = cstr(from)?;
    let t = cstr(to)?;
    // SAFETY: two valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
        return Err(e);
    }
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::from(io::ErrorKind::AlreadyExists));
    }
    fs::rename(from, to)
}

/// Removes a file, symlink or directory tree, making read-only directories writable first.
/// A missing path is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    fn make_writable(p: &Path) -> io::Result<()> {
        walk(
            p,
            |p, m| {
                let mode = m.permissions().mode();
                if m.is_dir() && mode & 0o700 != 0o700 {
                    fs::set_permissions(p, fs::Permissions::from_mode(mode | 0o700))?;
                }
                Ok(())
            },
            |_, _| Ok(()),
        )
    }
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if m.is_dir() {
        make_writable(path)?;
        match fs::remove_dir_all(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    } else {
        match fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// Copies a tree (regular files with the owner's execute bit, directories, symlinks), for moves
/// across filesystems.
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    walk(
        src,
        |from, m| {
            let to = match from.strip_prefix(src) {
                Ok(rel) if !rel.as_os_str().is_empty() => dst.join(rel),
                _ => dst.to_path_buf(),
            };
            if m.is_dir() {
                fs::create_dir(&to)
            } else if m.is_file() {
                fs::copy(from, &to)?;
                let mode = if m.mode() & 0o100 != 0 { 0o755 } else { 0o644 };
                fs::set_permissions(&to, fs::Permissions::from_mode(mode))
            } else if m.file_type().is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(from)?, &to)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is neither a file, a directory nor a symlink",
                        from.display()
                    ),
                ))
            }
        },
        |_, _| Ok(()),
    )
}

/// Moves `src` to `dst` (which must not exist): a rename, or a copy and removal across
/// filesystems.
pub(crate) fn move_tree(src: &Path, dst: &Path) -> io::Result<()> {
    match rename_noreplace(src, dst) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_tree(src, dst)?;
            remove_tree(src)
        }
        r => r,
    }
}

/// An advisory `flock` on a file, released on drop.
#[derive(Debug)]
pub(crate) struct FileLock {
    file: File,
}

/// Lock modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Shared,
    Exclusive,
}

impl FileLock {
    fn open(path: &Path) -> io::Result<File> {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    }

    /// Waits for the lock.
    pub(crate) fn lock(path: &Path, mode: LockMode) -> io::Result<FileLock> {
        let file = Self::open(path)?;
        let l = FileLock { file };
        l.set(mode, true)?;
        Ok(l)
    }

    /// Takes the lock if it is free right now.
    pub(crate) fn try_lock(path: &Path, mode: LockMode) -> io::Result<Option<FileLock>> {
        let file = Self::open(path)?;
        let l = FileLock { file };
        match l.set(mode, false) {
            Ok(()) => Ok(Some(l)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Converts the lock (e.g. exclusive to shared), waiting if needed.
    pub(crate) fn set(&self, mode: LockMode, wait: bool) -> io::Result<()> {
        let mut op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        };
        if !wait {
            op |= libc::LOCK_NB;
        }
        loop {
            // SAFETY: flock on a file descriptor we own.
            let r = unsafe { libc::flock(self.file.as_raw_fd(), op) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalise_and_remove_read_only_trees() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        fs::create_dir_all(t.join("sub")).unwrap();
        fs::write(t.join("sub/f"), "x").unwrap();
        fs::write(t.join("x"), "#!").unwrap();
        fs::set_permissions(t.join("x"), fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("sub/f", t.join("l")).unwrap();
        canonicalise(&t).unwrap();
        let mode = |p: &str| fs::symlink_metadata(t.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("sub/f"), 0o444);
        assert_eq!(mode("x"), 0o555);
        assert_eq!(mode("sub"), 0o555);
        assert_eq!(fs::symlink_metadata(t.join("l")).unwrap().mtime(), 1);
        assert_eq!(fs::metadata(&t).unwrap().mtime(), 1);
        fsync_tree(&t).unwrap();
        let c = d.path().join("c");
        copy_tree(&t, &c).unwrap();
        assert_eq!(fs::read_link(c.join("l")).unwrap(), Path::new("sub/f"));
        remove_tree(&t).unwrap();
        remove_tree(&t).unwrap();
        assert!(!t.exists());
        assert_eq!(
            rename_noreplace(&c, d.path()).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn locks_exclude_each_other() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        let a = FileLock::lock(&p, LockMode::Shared).unwrap();
        assert!(FileLock::try_lock(&p, LockMode::Shared).unwrap().is_some());
        assert!(
            FileLock::try_lock(&p, LockMode::Exclusive)
                .unwrap()
                .is_none()
        );
        drop(a);
        let b = FileLock::try_lock(&p, LockMode::Exclusive)
            .unwrap()
            .unwrap();
        assert!(FileLock::try_lock(&p, LockMode::Shared).unwrap().is_none());
        b.set(LockMode::Shared, true).unwrap();
        assert!(FileLock::try_lock(&p, LockMode::Shared).unwrap().is_some());
    }
}
