//! NAR compression for the binary cache (`[cache] compression`): streaming encoders over any
//! writer, so a NAR is never held in memory.

use std::io::{self, Write};
use std::str::FromStr;

use thiserror::Error;

/// The zstd level (zstd's own default).
const ZSTD_LEVEL: i32 = 3;
/// The xz preset (xz's own default, as Nix uses). It takes about 100 MiB per NAR being compressed.
const XZ_PRESET: u32 = 6;

/// How NAR files are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Zstd,
    Xz,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown compression {0:?} (expected zstd, xz or none)")]
pub struct UnknownCompression(pub String);

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "xz" => Ok(Compression::Xz),
            _ => Err(UnknownCompression(s.to_string())),
        }
    }
}

impl Compression {
    /// The narinfo's `Compression` value.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
        }
    }

    /// What follows `.nar` in a NAR file's name.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Zstd => ".zst",
            Compression::Xz => ".xz",
        }
    }

    /// The compression a NAR file's name (`<hash>.nar[.zst|.xz]`) says, and its hash part.
    pub fn of_file_name(name: &str) -> Option<(&str, Compression)> {
        for c in [Compression::Zstd, Compression::Xz, Compression::None] {
            if let Some(stem) = name.strip_suffix(&format!(".nar{}", c.suffix())) {
                return Some((stem, c));
            }
        }
        None
    }
}

/// A writer that compresses what it is given into `W`.
pub enum Encoder<W: Write> {
    None(W),
    Zstd(zstd::Encoder<'static, W>),
    Xz(xz2::write::XzEncoder<W>),
}

impl<W: Write> Encoder<W> {
    pub fn new(c: Compression, inner: W) -> io::Result<Self> {
        Ok(match c {
            Compression::None => Encoder::None(inner),
            Compression::Zstd => Encoder::Zstd(zstd::Encoder::new(inner, ZSTD_LEVEL)?),
            Compression::Xz => Encoder::Xz(xz2::write::XzEncoder::new(inner, XZ_PRESET)),
        })
    }

    /// Ends the compressed stream; returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Xz(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn names_parse_and_round_trip() {
        for c in [Compression::None, Compression::Zstd, Compression::Xz] {
            assert_eq!(c.name().parse::<Compression>().unwrap(), c);
            let file = format!("abc.nar{}", c.suffix());
            assert_eq!(Compression::of_file_name(&file), Some(("abc", c)));
        }
        assert_eq!(Compression::of_file_name("abc.narinfo"), None);
        assert!("gzip".parse::<Compression>().is_err());
    }

    #[test]
    fn encoders_produce_what_the_decoders_read() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for c in [Compression::None, Compression::Zstd, Compression::Xz] {
            let mut e = Encoder::new(c, Vec::new()).unwrap();
            e.write_all(&data).unwrap();
            let out = e.finish().unwrap();
            let mut back = Vec::new();
            match c {
                Compression::None => back = out.clone(),
                Compression::Zstd => {
                    zstd::Decoder::new(&out[..])
                        .unwrap()
                        .read_to_end(&mut back)
                        .unwrap();
                }
                Compression::Xz => {
                    xz2::read::XzDecoder::new(&out[..])
                        .read_to_end(&mut back)
                        .unwrap();
                }
            }
            assert_eq!(back, data, "{c:?}");
            if c != Compression::None {
                assert!(out.len() < data.len() / 4, "{c:?} compressed");
            }
        }
    }
}
