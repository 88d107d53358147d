//! Signing keys in Nix's text format, as `nix-store --generate-binary-cache-key NAME SK PK` writes
//! them: `NAME:<base64 of the 64-byte ed25519 secret key (seed, then public key)>` and
//! `NAME:<base64 of the 32-byte public key>`. A signature is `NAME:<base64 of 64 bytes>`.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use thiserror::Error;

/// Why a key or signature was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{what} is not of the form NAME:BASE64")]
    Shape { what: &'static str },
    #[error("{what}: the key name is empty")]
    EmptyName { what: &'static str },
    #[error("{what}: invalid base64: {message}")]
    Base64 { what: &'static str, message: String },
    #[error("{what}: expected {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("secret key {name:?}: its public half does not match its seed")]
    Mismatch { name: String },
    #[error("cannot read key file {path}: {message}")]
    Read { path: String, message: String },
}

fn split<'a>(s: &'a str, what: &'static str) -> Result<(&'a str, Vec<u8>), KeyError> {
    let (name, b64) = s.trim().split_once(':').ok_or(KeyError::Shape { what })?;
    if name.is_empty() {
        return Err(KeyError::EmptyName { what });
    }
    let bytes = B64.decode(b64).map_err(|e| KeyError::Base64 {
        what,
        message: e.to_string(),
    })?;
    Ok((name, bytes))
}

fn exact<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u8; N], KeyError> {
    bytes.try_into().map_err(|_| KeyError::Length {
        what,
        expected: N,
        got: bytes.len(),
    })
}

/// A named ed25519 secret key.
#[derive(Clone)]
pub struct SecretKey {
    pub name: String,
    key: SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SecretKey {
    /// Parses `NAME:<base64 of 64 bytes>`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let what = "secret key";
        let (name, bytes) = split(s, what)?;
        let pair: [u8; 64] = exact(&bytes, what)?;
        let key = SigningKey::from_keypair_bytes(&pair).map_err(|_| KeyError::Mismatch {
            name: name.to_string(),
        })?;
        Ok(SecretKey {
            name: name.to_string(),
            key,
        })
    }

    /// Reads a key file (surrounding whitespace is ignored).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text)
    }

    /// A key from a 32-byte seed (tests and benchmarks).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        SecretKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// `NAME:<base64>` of the 64-byte secret key, as Nix writes it.
    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, B64.encode(self.key.to_keypair_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Nix's detached signature of `fingerprint`: `NAME:<base64 of the signature>`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, B64.encode(sig.to_bytes()))
    }

    /// The signature alone (base64), for the structured signatures of newer Nix.
    pub fn sign_raw(&self, fingerprint: &str) -> String {
        B64.encode(self.key.sign(fingerprint.as_bytes()).to_bytes())
    }
}

/// A named ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses `NAME:<base64 of 32 bytes>`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let what = "public key";
        let (name, bytes) = split(s, what)?;
        let raw: [u8; 32] = exact(&bytes, what)?;
        let key = VerifyingKey::from_bytes(&raw).map_err(|_| KeyError::Length {
            what,
            expected: 32,
            got: bytes.len(),
        })?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }

    /// `NAME:<base64>`, the form `trusted-public-keys` takes.
    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, B64.encode(self.key.to_bytes()))
    }

    /// Whether `sig` (`NAME:<base64>`) is this key's signature of `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &str) -> bool {
        let Ok((name, bytes)) = split(sig, "signature") else {
            return false;
        };
        let Ok(raw) = exact::<64>(&bytes, "signature") else {
            return false;
        };
        name == self.name
            && self
                .key
                .verify(
                    fingerprint.as_bytes(),
                    &ed25519_dalek::Signature::from_bytes(&raw),
                )
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_verifies() {
        let sk = SecretKey::from_seed("test-1", [7; 32]);
        let text = sk.to_nix_string();
        let back = SecretKey::parse(&format!("{text}\n")).unwrap();
        assert_eq!(back.name, "test-1");
        let pk = PublicKey::parse(&back.public().to_nix_string()).unwrap();
        let sig = back.sign("1;/nix/store/x;sha256:y;1;");
        assert!(sig.starts_with("test-1:"));
        assert!(pk.verify("1;/nix/store/x;sha256:y;1;", &sig));
        assert!(!pk.verify("1;/nix/store/x;sha256:y;2;", &sig));
        let other = SecretKey::from_seed("test-1", [8; 32]).public();
        assert!(!other.verify("1;/nix/store/x;sha256:y;1;", &sig));
    }

    #[test]
    fn malformed_keys_are_clear_errors() {
        assert_eq!(
            SecretKey::parse("no-colon").unwrap_err(),
            KeyError::Shape { what: "secret key" }
        );
        assert_eq!(
            SecretKey::parse(":AAAA").unwrap_err(),
            KeyError::EmptyName { what: "secret key" }
        );
        assert!(matches!(
            SecretKey::parse("k:!!!").unwrap_err(),
            KeyError::Base64 { .. }
        ));
        assert_eq!(
            SecretKey::parse(&format!("k:{}", B64.encode([0u8; 32]))).unwrap_err(),
            KeyError::Length {
                what: "secret key",
                expected: 64,
                got: 32
            }
        );
        // a public half that is not the seed's
        let mut pair = SecretKey::from_seed("k", [1; 32]).key.to_keypair_bytes();
        pair[40] ^= 1;
        assert!(matches!(
            SecretKey::parse(&format!("k:{}", B64.encode(pair))).unwrap_err(),
            KeyError::Mismatch { .. }
        ));
    }
}
