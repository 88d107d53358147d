//! The dispatcher: runnable steps per system, matched to machines with free slots.

pub mod actor;
pub mod machine;

pub use machine::{Dispatcher, Effect, Event, MachineInfo, Priority, RunnableStep};
