//! The build agent: executors that run derivation builders (the native one needs no Nix), log
//! capture, and (later) input fetching and output upload for remote builders.

pub mod executor;
