//! The build actor: one per unfinished build, waiting for its top-level step.

pub mod actor;
pub mod core;
pub mod expand;
pub mod expander;
pub mod machine;
mod perform;

pub use machine::{BuildMachine, Effect, Event, Phase};
