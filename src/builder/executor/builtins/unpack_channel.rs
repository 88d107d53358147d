//! `builtin:unpack-channel`: a channel tarball (`src`) unpacked into `out`, its one top-level
//! entry renamed to `channelName`, as Nix 2.8's builtin does. The tarball may be plain or
//! compressed with gzip, xz, bzip2 or zstd (recognised by its first bytes, as libarchive does
//! for Nix). An entry that would land outside `out` (an absolute path, `..`) fails the build.

use std::fs;
use std::io::{self, BufReader, Read};
use std::path::Path;

use super::{BuiltinCtx, BuiltinError, io_err};

/// Runs the builtin (the attributes are read in Nix's order: `out`, `channelName`, `src`).
pub fn unpack_channel(ctx: &BuiltinCtx, _log: &mut dyn FnMut(&str)) -> Result<(), BuiltinError> {
    let out = ctx.attr("out")?.to_string();
    let channel = ctx.attr("channelName")?.to_string();
    let src = ctx.attr("src")?.to_string();
    if channel.is_empty() || channel.contains('/') || channel == "." || channel == ".." {
        return Err(BuiltinError::Build(format!(
            "invalid channel name '{channel}'"
        )));
    }
    let dest = ctx.fs.physical(&out);
    fs::create_dir_all(&dest).map_err(io_err(format!("creating directory '{out}'")))?;
    let src_file = ctx
        .fs
        .canonical(&src)
        .map(|c| ctx.fs.physical(&c))
        .map_err(io_err(format!("opening '{src}'")))?;
    let file = fs::File::open(&src_file).map_err(io_err(format!("opening '{src}'")))?;
    unpack(BufReader::new(file), &dest)
        .map_err(|e| BuiltinError::Build(format!("failed to extract archive ({e})")))?;
    let mut entries = Vec::new();
    for e in fs::read_dir(&dest).map_err(io_err(format!("reading directory '{out}'")))? {
        entries.push(
            e.map_err(io_err(format!("reading directory '{out}'")))?
                .file_name(),
        );
    }
    if entries.len() != 1 {
        return Err(BuiltinError::Build(format!(
            "channel tarball '{src}' contains more than one file"
        )));
    }
    fs::rename(dest.join(&entries[0]), dest.join(&channel))
        .map_err(io_err("renaming channel directory"))?;
    Ok(())
}

/// How a tarball is compressed, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Xz,
    Bzip2,
    Zstd,
}

fn compression_of(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Unpacks the (possibly compressed) tarball `r` into `dest`.
fn unpack(mut r: impl io::BufRead, dest: &Path) -> io::Result<()> {
    let head = r.fill_buf()?.to_vec();
    let reader: Box<dyn Read> = match compression_of(&head) {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Compression::Xz => Box::new(xz2::bufread::XzDecoder::new_multi_decoder(r)),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(false);
    archive.set_unpack_xattrs(false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.display().to_string();
        if !entry.unpack_in(dest)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("entry '{name}' lies outside the destination"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_cksum();
            b.append_data(&mut h, path, *data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn compressions_are_recognised_by_their_magic() {
        assert_eq!(compression_of(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(compression_of(b"\xfd7zXZ\0rest"), Compression::Xz);
        assert_eq!(compression_of(b"BZh91AY"), Compression::Bzip2);
        assert_eq!(
            compression_of(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(compression_of(b"nixexprs/\0\0"), Compression::None);
    }

    #[test]
    fn a_gzipped_tarball_unpacks_with_its_modes() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let tar = tarball(&[
            ("top/a", b"a\n", 0o644),
            ("top/bin/x", b"#!/bin/sh\n", 0o755),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let d = tempfile::tempdir().expect("tempdir");
        unpack(io::Cursor::new(gz), d.path()).expect("unpack");
        assert_eq!(fs::read(d.path().join("top/a")).expect("a"), b"a\n");
        let mode = fs::metadata(d.path().join("top/bin/x"))
            .expect("x")
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
    }

    #[test]
    fn an_entry_outside_the_destination_fails() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        // Written raw: the builder refuses `..` in the path it is given.
        h.as_gnu_mut().expect("gnu").name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        b.append(&h, &b"x"[..]).expect("append");
        let tar = b.into_inner().expect("tar");
        let d = tempfile::tempdir().expect("tempdir");
        let inner = d.path().join("in");
        fs::create_dir(&inner).expect("mkdir");
        assert!(unpack(io::Cursor::new(tar), &inner).is_err());
        assert!(!d.path().join("escape").exists());
    }
}
