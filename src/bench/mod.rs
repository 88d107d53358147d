//! `qr bench`: synthetic workloads through the real actors, database and store, measured inside
//! one run (percentiles, not single samples). `graph` generates the derivation graphs,
//! `scenario` runs them (`remote`: with `qr builder` processes over gRPC), `measure` holds the
//! instruments, `restart` is the restart at scale.

pub mod actor_cost;
pub mod graph;
pub mod makespan;
pub mod measure;
pub mod pickup;
pub mod remote;
pub mod restart;
pub mod scenario;
