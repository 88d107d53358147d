//! The queue monitor: reads the queued builds at start and whenever the database says the queue
//! changed (or the periodic rescan fires), and keeps one build actor per unfinished build.
//! [`core`] decides, [`actor`] performs on the generic driver, [`perform`] does the I/O.

pub mod actor;
pub mod core;
mod perform;

pub use actor::{ActiveBuilds, QueueMonitor, Restart};
