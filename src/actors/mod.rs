//! Builds and steps as actors (queue monitor, build, step, dispatcher, machine, supervisor).
