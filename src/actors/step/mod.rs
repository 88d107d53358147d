//! The step actor: one per derivation still to build, shared through the registry.

pub mod actor;
pub mod core;
pub mod describe;
mod dormant;
mod inbox;
pub mod machine;
mod outbox;
pub mod perform;
pub mod slot;
pub mod wiring;

pub use machine::{
    BuildOutcome, DynamicNeed, Effect, Event, Phase, Resolution, RetryPolicy, StepMachine,
};
