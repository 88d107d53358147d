//! Builds and steps as actors (queue monitor, build, step, dispatcher, machine).
//!
//! Each actor's logic is a plain state machine (`on(event) -> effects`) tested with no runtime; the
//! actix handlers perform the effects. Strong references point down the graph (build → step →
//! input step / resolved step), weak ones up, and one registry keyed by drv path deduplicates steps.

pub mod aggregate;
pub mod build;
pub mod built;
pub mod carried;
pub mod dispatcher;
pub mod driver;
pub mod env;
pub mod graph;
pub mod history;
pub mod introspect;
pub mod limits;
pub mod machine;
pub mod messages;
pub mod queue_monitor;
pub mod scheduler;
pub mod step;
pub mod types;
