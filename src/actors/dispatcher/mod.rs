//! The dispatcher: runnable steps per system, matched to machines with free slots.

pub mod actor;
pub mod core;
pub mod machine;
pub mod messages;

pub use machine::{Dispatcher, Effect, Event, MachineInfo, Order, Priority, RunnableStep};
