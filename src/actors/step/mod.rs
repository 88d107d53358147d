//! The step actor: one per derivation still to build, shared through the registry.

pub mod actor;
pub mod machine;

pub use machine::{BuildOutcome, Effect, Event, Phase, Resolution, RetryPolicy, StepMachine};
