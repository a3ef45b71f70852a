//! `taskvm-agent`: runs inside a taskvm guest. It takes the task from the metadata service,
//! runs the command, streams its output, reports the exit code, answers the worker's actions
//! and powers the VM off when told to.
//!
//! - As PID 1 of a minimal image it also does init's work ([`init`]).
//! - As a service in a full distribution (`taskvm-agent.service`) it only runs the task.
//!
//! The metadata service is `http://169.254.169.254` unless `TASKVM_METADATA_URL` (or the
//! kernel parameter `taskvm.metadata=`) says otherwise.
//!
//! It depends on `taskvm-protocol` (the guest <-> host contract) and nothing of the host's code.

#![warn(clippy::unwrap_used)]

mod actions;
mod agent;
mod client;
mod fresh;
mod http;
mod init;
mod kernel_cmdline;
mod markers;
mod mounts;
mod netlink;
mod run;
mod shell;
mod stage1;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let url = std::env::var("TASKVM_METADATA_URL")
        .unwrap_or_else(|_| format!("http://{}", protocol::METADATA_ADDRESS));
    if rustix::process::getpid().is_init() {
        init::run(&url);
    }
    // `--child URL`: started by init::run.
    let (url, as_child) = match args.get(1).map(String::as_str) {
        Some("--child") => (args.get(2).cloned().unwrap_or(url), true),
        Some("--version") => {
            println!("taskvm-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("usage: taskvm-agent [--version]   (unexpected argument {other:?})");
            return ExitCode::from(2);
        }
        None => (url, false),
    };
    match agent::serve(&url) {
        Ok(()) if as_child => ExitCode::SUCCESS,
        Ok(()) => {
            if std::env::var_os("TASKVM_AGENT_NO_POWEROFF").is_none() {
                init::power_off();
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("taskvm-agent: {error}");
            ExitCode::from(1)
        }
    }
}
