//! Builds and steps as actors (queue monitor, build, step, dispatcher, machine, supervisor).
//!
//! Each actor's logic is a plain state machine (`on(event) -> effects`) tested with no runtime; the
//! actix handlers perform the effects.

pub mod build;
pub mod dispatcher;
pub mod step;
pub mod types;
