//! `builtin:fetchurl` as Nix 2.8 runs it (`src/libstore/builtins/fetchurl.cc`): `url` is
//! downloaded into `out` (TLS certificates are not verified, as in Nix: the fixed output's hash
//! is checked afterwards); with `unpack = "1"` the download is a NAR (xz-compressed when `url`
//! ends in `.xz`) restored at `out`; with `executable = "1"` the file is made executable. Only a
//! fixed-output derivation may use it here. `http://`, `https://` and `file://` URLs; Nix 2.8's
//! `hashed-mirrors` (empty by default) and netrc are not consulted.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::http::download;
use super::{BuiltinCtx, BuiltinError, io_err};
use crate::store::nar::{NarReader, restore};

/// A writer that feeds a NAR restore running on another thread.
struct PipeWriter(std::sync::mpsc::SyncSender<Vec<u8>>);

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send(buf.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the NAR restore stopped"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct PipeReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Downloads `url` into `sink`: `file://` read directly, `http(s)://` by [`download`].
fn fetch_into(ctx: &BuiltinCtx, url: &str, sink: &mut dyn Write) -> Result<(), BuiltinError> {
    if let Some(path) = url.strip_prefix("file://") {
        let mut f = fs::File::open(path).map_err(io_err(format!("unable to download '{url}'")))?;
        io::copy(&mut f, sink).map_err(io_err(format!("unable to download '{url}'")))?;
        return Ok(());
    }
    download(url, sink, ctx.timeout, ctx.max_silent)
}

/// Restores the NAR `url` gives at `dest` (decompressing xz first when `xz`).
fn fetch_nar(ctx: &BuiltinCtx, url: &str, dest: &Path, xz: bool) -> Result<(), BuiltinError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
    let dest2 = dest.to_path_buf();
    let restorer = std::thread::spawn(move || {
        let reader = PipeReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        };
        let r: Box<dyn Read> = if xz {
            Box::new(xz2::read::XzDecoder::new(reader))
        } else {
            Box::new(reader)
        };
        let mut nar = NarReader::new(r);
        restore(&mut nar, &dest2)?;
        nar.expect_eof()?;
        Ok::<(), crate::store::nar::RestoreError>(())
    });
    let fetched = fetch_into(ctx, url, &mut PipeWriter(tx));
    let restored = restorer
        .join()
        .map_err(|_| BuiltinError::Build("the NAR restore panicked".to_string()))?;
    // A restore error explains a broken pipe in the download.
    restored.map_err(|e| BuiltinError::Build(format!("unpacking the NAR from '{url}': {e}")))?;
    fetched
}

/// The builtin (see the module doc).
pub fn fetchurl(ctx: &BuiltinCtx, _log: &mut dyn FnMut(&str)) -> Result<(), BuiltinError> {
    let out = ctx.attr("out")?.to_string();
    let url = ctx.attr("url")?.to_string();
    if !ctx.fixed_output {
        return Err(BuiltinError::Build(
            "builtin:fetchurl must be used in a fixed-output derivation".to_string(),
        ));
    }
    let unpack = ctx.env.get("unpack").is_some_and(|v| v == "1");
    let dest = ctx.fs.physical(&out);
    if unpack {
        fetch_nar(ctx, &url, &dest, url.ends_with(".xz"))?;
    } else {
        let mut f = fs::File::create(&dest).map_err(io_err(format!("creating '{out}'")))?;
        fetch_into(ctx, &url, &mut f)?;
        f.sync_all().map_err(io_err(format!("writing '{out}'")))?;
    }
    if ctx.env.get("executable").is_some_and(|v| v == "1") {
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))
            .map_err(io_err(format!("making '{out}' executable")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::executor::builtins::StoreFs;
    use crate::store::nar::NarTree;
    use std::collections::{BTreeMap, HashMap};

    fn ctx(root: &Path, env: &[(&str, &str)], fixed: bool) -> BuiltinCtx {
        BuiltinCtx {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            fs: StoreFs {
                store_dir: "/s".into(),
                root: root.to_path_buf(),
                elsewhere: HashMap::new(),
            },
            fixed_output: fixed,
            timeout: None,
            max_silent: None,
        }
    }

    #[test]
    fn file_urls_flat_executable_and_unpacked_nars() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        fs::write(r.join("src"), "hello\n").unwrap();
        let url = format!("file://{}", r.join("src").display());
        let c = ctx(
            r,
            &[("out", "/s/o1"), ("url", &url), ("executable", "1")],
            true,
        );
        fetchurl(&c, &mut |_| {}).unwrap();
        assert_eq!(fs::read_to_string(r.join("o1")).unwrap(), "hello\n");
        assert_eq!(
            fs::metadata(r.join("o1")).unwrap().permissions().mode() & 0o111,
            0o111
        );

        let tree = NarTree::dir([
            ("bin", NarTree::executable("#!x")),
            ("l", NarTree::symlink("bin")),
        ]);
        let nar = tree.to_nar().unwrap();
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&nar).unwrap();
        fs::write(r.join("t.nar.xz"), xz.finish().unwrap()).unwrap();
        let url = format!("file://{}", r.join("t.nar.xz").display());
        let c = ctx(r, &[("out", "/s/o2"), ("url", &url), ("unpack", "1")], true);
        fetchurl(&c, &mut |_| {}).unwrap();
        assert_eq!(NarTree::from_path(&r.join("o2")).unwrap(), tree);

        // Not a NAR: a clear error.
        let url = format!("file://{}", r.join("src").display());
        let c = ctx(r, &[("out", "/s/o3"), ("url", &url), ("unpack", "1")], true);
        let e = fetchurl(&c, &mut |_| {}).unwrap_err();
        assert!(e.to_string().starts_with("unpacking the NAR from"), "{e}");
    }

    #[test]
    fn missing_attributes_and_non_fixed_outputs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let c = ctx(tmp.path(), &[("out", "/s/o")], true);
        assert_eq!(
            fetchurl(&c, &mut |_| {}).unwrap_err().to_string(),
            "attribute 'url' missing"
        );
        let c = ctx(tmp.path(), &[("out", "/s/o"), ("url", "file:///x")], false);
        assert!(
            fetchurl(&c, &mut |_| {})
                .unwrap_err()
                .to_string()
                .contains("fixed-output")
        );
        let c = ctx(
            tmp.path(),
            &[("out", "/s/o"), ("url", "file:///does/not/exist")],
            true,
        );
        assert!(
            fetchurl(&c, &mut |_| {})
                .unwrap_err()
                .to_string()
                .starts_with("unable to download")
        );
    }
}
