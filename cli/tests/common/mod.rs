//! The harness of the `taskvm` binary's tests: the binary as a command or run to its end.
//! The rest of the tier's harness is `testkit::process` (scratch directories, the shared
//! cache, long-lived `serve`/`worker` processes).

#![allow(dead_code)]

use std::process::{Command, Output};

pub mod scene;

/// `taskvm ARGS…`, to add to and run.
pub fn taskvm_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_taskvm"));
    command.args(args);
    command
}

/// `taskvm ARGS…` run to its end.
pub fn taskvm(args: &[&str]) -> Output {
    taskvm_command(args).output().expect("run taskvm")
}
