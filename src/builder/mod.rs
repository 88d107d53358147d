//! The build agent: executors that run derivation builders (the native one needs no Nix; the nix
//! one calls a real Nix), log capture, and the remote builder's agent ([`agent`]): input fetching,
//! output upload, reconnection.

pub mod agent;
pub mod executor;
pub mod logs;
