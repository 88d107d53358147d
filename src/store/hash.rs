//! Hashing helpers: sha256, `compress20`, hex and the `sha256:`/SRI renderings Nix uses.

use base64::Engine;
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::{clip, nix32};

/// A sha256 digest.
pub type Sha256Hash = [u8; 32];

/// sha256 of `data`.
pub fn sha256(data: &[u8]) -> Sha256Hash {
    Sha256::digest(data).into()
}

/// XOR-folds a digest into 20 bytes (`r[i % 20] ^= h[i]`), as Nix does for store path hashes.
pub fn compress20(h: &[u8]) -> [u8; 20] {
    let mut r = [0u8; 20];
    for (i, b) in h.iter().enumerate() {
        r[i % 20] ^= b;
    }
    r
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Why a hash string could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashParseError {
    #[error("hash {0:?} is not of the form sha256:<hex|nix32|base64> or sha256-<base64>")]
    Format(String),
    #[error("hash {0:?} has the wrong length for sha256")]
    Length(String),
}

/// Parses lower-case hex of exactly 32 bytes.
pub fn from_hex(s: &str) -> Option<Sha256Hash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hi = (chunk[0] as char).to_digit(16)?;
        let lo = (chunk[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// `sha256:<nix32>`, the form Nix's database uses for narHash.
pub fn render_nix32(h: &Sha256Hash) -> String {
    format!("sha256:{}", nix32::encode(h))
}

/// `sha256-<base64>`, the SRI form `nix path-info --json` shows.
pub fn render_sri(h: &Sha256Hash) -> String {
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(h)
    )
}

/// Parses a sha256 in any of Nix's renderings: `sha256:<hex>`, `sha256:<nix32>`, `sha256:<base64>`
/// or SRI `sha256-<base64>`.
pub fn parse_sha256(s: &str) -> Result<Sha256Hash, HashParseError> {
    let format = || HashParseError::Format(clip(s));
    let (body, sri) = if let Some(b) = s.strip_prefix("sha256:") {
        (b, false)
    } else if let Some(b) = s.strip_prefix("sha256-") {
        (b, true)
    } else {
        return Err(format());
    };
    // Hex is the longest rendering: anything longer is not decoded at all.
    if body.len() > 64 {
        return Err(HashParseError::Length(clip(s)));
    }
    if !sri {
        if body.len() == 64 {
            return from_hex(body).ok_or_else(format);
        }
        if body.len() == nix32::encoded_len(32) {
            let v = nix32::decode(body, 32).map_err(|_| format())?;
            return v.try_into().map_err(|_| HashParseError::Length(clip(s)));
        }
    }
    let v = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| format())?;
    v.try_into().map_err(|_| HashParseError::Length(clip(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_compress() {
        let h = sha256(b"abc");
        assert_eq!(
            to_hex(&h),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(from_hex(&to_hex(&h)), Some(h));
        let c = compress20(&h);
        for i in 0..20 {
            let mut x = h[i];
            if i + 20 < 32 {
                x ^= h[i + 20];
            }
            assert_eq!(c[i], x);
        }
    }

    #[test]
    fn parses_every_rendering() {
        let h = sha256(b"nar");
        for s in [
            format!("sha256:{}", to_hex(&h)),
            render_nix32(&h),
            render_sri(&h),
        ] {
            assert_eq!(parse_sha256(&s), Ok(h), "{s}");
        }
        assert!(parse_sha256("md5:abc").is_err());
        assert!(parse_sha256("sha256-AAAA").is_err());
    }
}
