//! Machine actors: one per builder. For now the in-process local builder.

pub mod executor;
pub mod local;
pub mod simulated;

pub use executor::{ExecFailure, Executor, Job};
