//! The library half of the `taskvm` binary: what every queue provider shares — the exit
//! codes and the task lifecycle. The binary (`main.rs`) adds argument parsing and the
//! commands.

#![warn(clippy::unwrap_used)]

pub mod exit;
pub mod task;
