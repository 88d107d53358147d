//! `qr`: an actor-model queue runner for Nix builds.
//!
//! The folder tree is the architecture: `store` (Nix's formats, the `Store` trait and the native
//! store), `db` (the runner's journal), `actors` (builds and steps as actors), `grpc` (builder and
//! admin protocols), `web` (dashboard, `/status`, `/metrics`), `cli` (the `qr` command) and `config`.

pub mod actors;
pub mod bench;
pub mod builder;
pub mod cache;
pub mod cli;
pub mod config;
pub mod db;
pub mod grpc;
pub mod metrics;
pub mod notify;
pub mod store;
pub mod web;
