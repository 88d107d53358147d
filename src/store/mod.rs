//! Nix's formats and algorithms, reproduced byte for byte, and the store.

pub mod api;
pub mod aterm;
pub mod ca_output;
pub mod derivation;
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
