//! The library half of the `taskvm` binary: what every queue provider shares — the exit
//! codes, the task lifecycle and the embedded queue (`serve`) and the Taskcluster provider (`provider`). The binary (`main.rs`) adds argument parsing and the
//! commands.

#![warn(clippy::unwrap_used)]

pub mod exit;
pub mod provider;
pub mod serve;
pub mod task;
