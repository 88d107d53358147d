//! Machine actors: one per builder. For now the in-process local builder.

pub mod executor;
pub mod local;
pub mod local_core;
pub mod native;
pub mod simulated;

pub use executor::{Built, ExecFailure, Executor, Job};
