//! Nix's formats and algorithms, reproduced byte for byte, and the store.

pub mod ca_output;
pub mod hash;
pub mod nar;
pub mod nix32;
pub mod path;
pub mod refscan;

pub use path::{StoreDir, StorePath, StorePathError};
