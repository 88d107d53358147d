//! Nix's formats and algorithms, reproduced byte for byte, and the store.

pub mod api;
pub mod aterm;
pub mod ca_output;
pub mod derivation;
pub mod drv_json;
pub mod drv_options;
pub(crate) mod fsutil;
pub mod hash;
pub mod hash_modulo;
pub mod local;
pub mod nar;
pub mod nix32;
pub mod path;
pub mod placeholder;
pub mod realisation;
pub mod refscan;
pub mod relocate;
pub mod resolve;

pub use api::{PathInfo, Store, StoreError};
pub use derivation::{Derivation, DerivationOutput, DerivationType};
pub use local::LocalStore;
pub use path::{StoreDir, StorePath, StorePathError};
pub use realisation::{DrvOutput, LegacyDrvOutput};

/// How much of an input an error message quotes.
pub const CLIP_BYTES: usize = 200;

/// `s` as an error quotes it: whole when short, else its first [`CLIP_BYTES`] bytes (cut at a
/// character boundary) and its length. Input from outside (a builder's paths and hashes) can be
/// megabytes long; an error about it should not be.
pub fn clip(s: &str) -> String {
    clip_to(s, CLIP_BYTES)
}

/// [`clip`] to `max` bytes.
pub fn clip_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes)", &s[..cut], s.len())
}
