//! Realisation keys: which derivation output a realisation (a built output path) belongs to.
//!
//! Nix ≤ 2.34 keys realisations by `sha256:<hashModulo hex>!<output>` ([`LegacyDrvOutput`]);
//! Nix 2.35+ keys them by `<resolved drv path>^<output>` ([`DrvOutput`]). Both are kept as types
//! of their own so the runner can serve either.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::hash::{Sha256Hash, from_hex, to_hex};

/// A derivation output: `<drv path>^<output>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DrvOutput {
    /// The full store path of the `.drv`.
    pub drv_path: String,
    pub output: String,
}

/// Nix ≤ 2.34's realisation id: `sha256:<hashModulo hex>!<output>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LegacyDrvOutput {
    pub drv_hash: Sha256Hash,
    pub output: String,
}

/// A realisation as given on the command line: `DRVPATH^OUT=OUTPATH`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Realisation {
    pub id: DrvOutput,
    pub out_path: String,
}

/// Why a realisation key did not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RealisationParseError {
    #[error("{0:?} is not of the form DRVPATH^OUTPUT (an absolute .drv path, '^', an output name)")]
    DrvOutput(String),
    #[error("{0:?} is not of the form sha256:<64 hex digits>!<output>")]
    Legacy(String),
    #[error("{0:?} is not of the form DRVPATH^OUTPUT=OUTPATH (OUTPATH absolute)")]
    Realisation(String),
}

impl DrvOutput {
    pub fn new(drv_path: impl Into<String>, output: impl Into<String>) -> Self {
        DrvOutput {
            drv_path: drv_path.into(),
            output: output.into(),
        }
    }

    /// The key Nix ≤ 2.34 uses for this output, given the drv's (masked) modulo hash.
    pub fn legacy(&self, hash_modulo: &Sha256Hash) -> LegacyDrvOutput {
        LegacyDrvOutput {
            drv_hash: *hash_modulo,
            output: self.output.clone(),
        }
    }

    /// `sha256:<hashModulo hex>!<output>`, Nix ≤ 2.34's realisation id.
    pub fn nix_legacy_id(&self, hash_modulo: &Sha256Hash) -> String {
        self.legacy(hash_modulo).to_string()
    }
}

impl fmt::Display for DrvOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}^{}", self.drv_path, self.output)
    }
}

fn valid_output_name(s: &str) -> bool {
    !s.is_empty() && !s.contains(['^', '!', '/', '='])
}

impl FromStr for DrvOutput {
    type Err = RealisationParseError;

    /// Parses `DRVPATH^OUTPUT` ('^' cannot occur in a store path).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RealisationParseError::DrvOutput(s.to_string());
        let (drv, out) = s.split_once('^').ok_or_else(err)?;
        if !drv.starts_with('/') || !drv.ends_with(".drv") || !valid_output_name(out) {
            return Err(err());
        }
        Ok(DrvOutput::new(drv, out))
    }
}

impl fmt::Display for LegacyDrvOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}!{}", to_hex(&self.drv_hash), self.output)
    }
}

impl FromStr for LegacyDrvOutput {
    type Err = RealisationParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RealisationParseError::Legacy(s.to_string());
        let rest = s.strip_prefix("sha256:").ok_or_else(err)?;
        let (hex, out) = rest.split_once('!').ok_or_else(err)?;
        let drv_hash = from_hex(hex).ok_or_else(err)?;
        if !valid_output_name(out) {
            return Err(err());
        }
        Ok(LegacyDrvOutput {
            drv_hash,
            output: out.to_string(),
        })
    }
}

impl fmt::Display for Realisation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.id, self.out_path)
    }
}

impl FromStr for Realisation {
    type Err = RealisationParseError;

    /// Parses `DRVPATH^OUTPUT=OUTPATH`. Store path names may contain `=`, but an output name cannot
    /// and OUTPATH is absolute, so the split is at the first `=/` after the `^`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RealisationParseError::Realisation(s.to_string());
        let caret = s.find('^').ok_or_else(err)?;
        let eq = s[caret..].find("=/").ok_or_else(err)? + caret;
        let id: DrvOutput = s[..eq].parse().map_err(|_| err())?;
        Ok(Realisation {
            id,
            out_path: s[eq + 1..].to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = "/nix/store/bb2hv5vpc898gbqnr314h9367m8ambvj-chain-a.drv";

    #[test]
    fn drv_output_round_trip() {
        let o: DrvOutput = format!("{DRV}^out").parse().unwrap();
        assert_eq!(o, DrvOutput::new(DRV, "out"));
        assert_eq!(o.to_string(), format!("{DRV}^out"));
        for bad in ["", "^out", "/x.drv^", "x.drv^out", "/x^out", "/x.drv"] {
            assert!(bad.parse::<DrvOutput>().is_err(), "{bad}");
        }
    }

    #[test]
    fn legacy_id() {
        // chain.json: chain-a's realisation id.
        let hex = "28097c5122d801ed8cc4dffe710395d2721fad3205eb24379038562fcd3f571c";
        let h = from_hex(hex).unwrap();
        let id = DrvOutput::new(DRV, "out").nix_legacy_id(&h);
        assert_eq!(id, format!("sha256:{hex}!out"));
        let back: LegacyDrvOutput = id.parse().unwrap();
        assert_eq!(back.drv_hash, h);
        assert_eq!(back.output, "out");
        assert!("sha256:00!out".parse::<LegacyDrvOutput>().is_err());
    }

    #[test]
    fn realisation_arg() {
        let r: Realisation = "/nix/store/x-a=b.drv^dev=/nix/store/y-a=b-dev"
            .parse()
            .unwrap();
        assert_eq!(r.id, DrvOutput::new("/nix/store/x-a=b.drv", "dev"));
        assert_eq!(r.out_path, "/nix/store/y-a=b-dev");
        assert_eq!(
            r.to_string(),
            "/nix/store/x-a=b.drv^dev=/nix/store/y-a=b-dev"
        );
        assert!(
            format!("{DRV}^out=relative")
                .parse::<Realisation>()
                .is_err()
        );
        assert!(
            format!("{DRV}=/nix/store/y")
                .parse::<Realisation>()
                .is_err()
        );
    }
}
