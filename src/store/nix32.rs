//! Nix's base-32 encoding (alphabet without e, o, u, t; most significant group first).

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a nix32 string could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Nix32Error {
    #[error("invalid nix32 character {ch:?} at offset {offset}")]
    InvalidChar { ch: char, offset: usize },
    #[error("nix32 string of length {len} does not encode {bytes} bytes")]
    BadLength { len: usize, bytes: usize },
    #[error("nix32 string has bits set beyond {bytes} bytes")]
    Overflow { bytes: usize },
}

/// Length of the nix32 encoding of `n` bytes: `ceil(n * 8 / 5)`.
pub const fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Encodes bytes as Nix's base-32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for k in (0..len).rev() {
        let b = k * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = bytes[i] as u16 >> j;
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 31) as usize] as char);
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decodes a nix32 string into exactly `n` bytes.
pub fn decode(s: &str, n: usize) -> Result<Vec<u8>, Nix32Error> {
    let bytes = s.as_bytes();
    if bytes.len() != encoded_len(n) {
        return Err(Nix32Error::BadLength {
            len: bytes.len(),
            bytes: n,
        });
    }
    let mut out = vec![0u8; n];
    for (k, &c) in bytes.iter().rev().enumerate() {
        let offset = bytes.len() - 1 - k;
        let d = digit(c).ok_or(Nix32Error::InvalidChar {
            ch: c as char,
            offset,
        })? as u16;
        let b = k * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (d << j) as u8;
        let carry = d >> (8 - j);
        if i + 1 < n {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(Nix32Error::Overflow { bytes: n });
        }
    }
    Ok(out)
}

/// Decodes a nix32 string of any valid length, inferring the byte count.
pub fn decode_any(s: &str) -> Result<Vec<u8>, Nix32Error> {
    let n = s.len() * 5 / 8;
    decode(s, n)
}

/// True when every character of `s` is in the nix32 alphabet.
pub fn is_nix32(s: &str) -> bool {
    s.bytes().all(|c| digit(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_empty_string_matches_nix() {
        // `nix hash to-base32 sha256:e3b0c4…` prints this.
        let h = crate::store::hash::sha256(b"");
        assert_eq!(
            encode(&h),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn round_trips_all_lengths() {
        for n in 0..40usize {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let s = encode(&bytes);
            assert_eq!(s.len(), encoded_len(n));
            assert_eq!(decode(&s, n).unwrap(), bytes);
        }
    }

    #[test]
    fn rejects_bad_characters_with_offset() {
        let mut s = encode(&[7u8; 20]);
        s.replace_range(3..4, "e");
        assert_eq!(
            decode(&s, 20),
            Err(Nix32Error::InvalidChar { ch: 'e', offset: 3 })
        );
        assert!(!is_nix32("abcde"));
    }

    #[test]
    fn rejects_bad_length_and_overflow() {
        assert_eq!(
            decode("abc", 20),
            Err(Nix32Error::BadLength { len: 3, bytes: 20 })
        );
        // 32 chars carry 160 bits exactly, so no overflow is possible at 20 bytes; 52 chars carry 260
        // bits for 256, so a leading 'z' overflows.
        let s = format!("z{}", "0".repeat(51));
        assert_eq!(decode(&s, 32), Err(Nix32Error::Overflow { bytes: 32 }));
    }
}
