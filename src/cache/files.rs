//! Files of a binary cache on disk: each written under a temporary name in its directory, synced,
//! then renamed into place, so a reader (or a crash) never sees half a file.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::CacheError;
use super::compression::{Compression, Encoder};
use super::narinfo::NarFile;
use crate::store::Store;
use crate::store::nar::HashingWriter;

/// Writes `data` to `dir/name` atomically (temp file in `dir`, fsync, rename), creating `dir`.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<PathBuf, CacheError> {
    std::fs::create_dir_all(dir).map_err(CacheError::io("creating", dir))?;
    let target = dir.join(name);
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(CacheError::io("creating a temporary file in", dir))?;
    tmp.write_all(data)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(CacheError::io("writing", tmp.path().to_path_buf()))?;
    tmp.persist(&target).map_err(|e| CacheError::Io {
        op: "renaming into",
        path: target.clone(),
        source: e.error,
    })?;
    Ok(target)
}

/// Writes the NAR of the valid `path`, compressed with `c`, as `nar_dir/<file hash>.nar<suffix>`
/// (streamed: the NAR is never held in memory). Blocking: call from a blocking thread.
pub fn write_nar_file(
    store: &dyn Store,
    path: &str,
    c: Compression,
    nar_dir: &Path,
) -> Result<NarFile, CacheError> {
    std::fs::create_dir_all(nar_dir).map_err(CacheError::io("creating", nar_dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(nar_dir)
        .map_err(CacheError::io("creating a temporary file in", nar_dir))?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(CacheError::io("opening", tmp.path().to_path_buf()))?;
    let hashing = HashingWriter::tee(BufWriter::with_capacity(256 * 1024, file));
    let mut enc = Encoder::new(c, hashing).map_err(CacheError::io("compressing", path))?;
    store.export_nar(path, &mut enc)?;
    let hashing = enc.finish().map_err(CacheError::io("compressing", path))?;
    let (file_hash, file_size, buf) = hashing.finish();
    buf.into_inner()
        .map_err(|e| CacheError::Io {
            op: "writing",
            path: tmp.path().to_path_buf(),
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(CacheError::io("syncing", tmp.path().to_path_buf()))?;
    let url = NarFile::url_for(&file_hash, c);
    let name = url.trim_start_matches("nar/");
    let target = nar_dir.join(name);
    tmp.persist(&target).map_err(|e| CacheError::Io {
        op: "renaming into",
        path: target.clone(),
        source: e.error,
    })?;
    Ok(NarFile {
        url,
        compression: c,
        file_hash,
        file_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("a/b");
        let p = write_atomic(&sub, "x.narinfo", b"hello").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        write_atomic(&sub, "x.narinfo", b"again").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"again");
        let names: Vec<_> = std::fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.narinfo")]);
    }
}
