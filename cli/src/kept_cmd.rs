//! `taskvm kept ls|rm [--server URL]` and `taskvm debug NAME [--exec CMD]`: the failed VMs this host keeps
//! for debugging (a payload's `debug.keepOnFailure`), and resuming one — a shell on this
//! terminal, or one command whose output and exit status are printed — on a fresh isolated
//! network, for at most `kept.resumeTime`. The kept VM itself is never changed: each resume
//! starts from the moment it failed, and what a resume does is discarded with it.

use clap::Subcommand;
use lifecycle::exit::Outcome;
use lifecycle::kept::{resume, KeptStore, Resumed};
use schemas::protocol::{ExecResult, EXEC_OUTPUT_LIMIT};
use std::sync::Arc;

use crate::documents::{say, HostArgs};
use crate::sizes::{human_duration, human_size};
use serve::client::ApiClient;

/// Subcommands of `taskvm kept`.
#[derive(Debug, Subcommand)]
pub enum KeptCommand {
    /// List the kept VMs: name, size on disk, age, time left, and the task's command.
    Ls {
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Delete a kept VM with everything it held.
    Rm {
        /// Its name (from `taskvm kept ls`).
        name: String,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

/// Arguments of `taskvm debug`.
#[derive(Debug, clap::Args)]
pub struct DebugArgs {
    /// The kept VM's name (from `taskvm kept ls`, or the task log's last lines).
    name: String,
    /// Run this shell script in it instead of a shell on this terminal; print its output and
    /// exit with its exit status.
    #[arg(long, value_name = "SCRIPT")]
    exec: Option<String>,
    #[command(flatten)]
    host: HostArgs,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// `--server` and `--token`: the kept VMs of a `taskvm serve` instead of this host's state.
#[derive(Debug, clap::Args)]
pub struct RemoteArgs {
    /// The `taskvm serve` whose kept VMs to use (default: this host's state directory).
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// The server's access token (needed when it listens off loopback).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TASKVM_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

/// Runs `taskvm kept …`.
pub fn run(command: KeptCommand) -> Outcome {
    let (host, name) = match &command {
        KeptCommand::Ls { remote, .. } if remote.server.is_some() => return list_remote(remote),
        KeptCommand::Ls { host, .. } => (host, None),
        KeptCommand::Rm { name, remote, .. } if remote.server.is_some() => {
            return remove_remote(remote, name)
        }
        KeptCommand::Rm { name, host, .. } => (host, Some(name)),
    };
    let config = match crate::documents::load_host_config(host, None) {
        Ok(config) => config,
        Err(outcome) => return outcome,
    };
    let store = KeptStore::for_config(&config);
    for removed in store.trim() {
        say(&format!(
            "deleted {removed} (expired, or past the kept limits)"
        ));
    }
    match name {
        None => list(&store),
        Some(name) => match store.remove(name) {
            Ok(()) => {
                say(&format!("deleted {name}"));
                Outcome::Success
            }
            Err(error) => {
                say(&error.to_string());
                Outcome::Malformed
            }
        },
    }
}

fn list(store: &KeptStore) -> Outcome {
    print_header();
    let now = now();
    for vm in store.list() {
        print_row(
            &vm.meta.name,
            vm.size,
            now.saturating_sub(vm.meta.kept_at),
            store.expires_at(&vm.meta).saturating_sub(now),
            &vm.meta.payload.command,
        );
    }
    Outcome::Success
}

fn client(remote: &RemoteArgs) -> ApiClient {
    ApiClient::new(
        remote.server.as_deref().unwrap_or_default(),
        remote.token.clone(),
    )
}

fn remove_remote(remote: &RemoteArgs, name: &str) -> Outcome {
    match client(remote).delete_kept(name) {
        Ok(deleted) => {
            say(&format!("deleted {}", deleted.deleted));
            Outcome::Success
        }
        Err(error) => {
            say(&error.to_string());
            Outcome::Internal
        }
    }
}

fn list_remote(remote: &RemoteArgs) -> Outcome {
    let client = client(remote);
    let listed = match client.kept() {
        Ok(listed) => listed,
        Err(error) => {
            say(&error.to_string());
            return Outcome::Internal;
        }
    };
    print_header();
    let now = now();
    for vm in listed.kept {
        print_row(
            &vm.name,
            vm.size,
            now.saturating_sub(vm.kept_at),
            vm.expires_at.saturating_sub(now),
            &vm.command,
        );
    }
    Outcome::Success
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn print_header() {
    println!(
        "{:<40}  {:>10}  {:>8}  {:>8}  COMMAND",
        "NAME", "SIZE", "AGE", "LEFT"
    );
}

fn print_row(name: &str, size: u64, age: u64, left: u64, command: &[String]) {
    println!(
        "{:<40}  {:>10}  {:>8}  {:>8}  {}",
        name,
        human_size(size),
        human_duration(age),
        human_duration(left),
        schemas::shown::quoted(&command.join(" "))
    );
}

/// `taskvm debug NAME --server URL`: the server resumes a copy.
fn debug_remote(args: &DebugArgs, server: &str) -> Outcome {
    let token = args.remote.token.clone();
    if let Some(script) = &args.exec {
        let client = ApiClient::new(server, token);
        return match client.exec_in_kept(&args.name, script) {
            Ok(answer) => report(&ExecResult {
                exit_code: answer.exit_code,
                output: answer.output,
                truncated: answer.truncated,
            }),
            Err(error) => {
                say(&error.to_string());
                Outcome::Internal
            }
        };
    }
    let runtime = match crate::documents::vm_runtime() {
        Ok(runtime) => runtime,
        Err(outcome) => return outcome,
    };
    let outcome = runtime.block_on(async {
        let (rows, cols) = crate::shell_cmd::terminal_size().unwrap_or((24, 80));
        let connected =
            serve::shell_client::connect_kept(server, token.as_deref(), &args.name, rows, cols);
        match connected.await {
            Ok((input, output)) => {
                crate::shell_cmd::attach_websocket(input, output).await;
                Outcome::Success
            }
            Err(error) => {
                say(&error.to_string());
                Outcome::Internal
            }
        }
    });
    runtime.shutdown_background();
    outcome
}

/// Runs `taskvm debug`.
pub fn debug(args: DebugArgs) -> Outcome {
    if let Some(server) = args.remote.server.clone() {
        return debug_remote(&args, &server);
    }
    let config = match crate::documents::load_host_config(&args.host, None) {
        Ok(config) => config,
        Err(outcome) => return outcome,
    };
    let runtime = match crate::documents::vm_runtime() {
        Ok(runtime) => runtime,
        Err(outcome) => return outcome,
    };
    let outcome = runtime.block_on(async {
        let host = match crate::documents::prepared_host(config, &|line| say(line), "VMs") {
            Ok(host) => Arc::new(host),
            Err(outcome) => return outcome,
        };
        let resumed = match resume(&host, &args.name, None).await {
            Ok(resumed) => resumed,
            Err(error) => {
                say(&format!("{} cannot be resumed: {error}", args.name));
                return Outcome::Internal;
            }
        };
        say(&format!(
            "{} resumed on a network of its own; it is discarded again when this ends",
            args.name
        ));
        let until = resumed.until;
        let ran = tokio::select! {
            ran = attach(&resumed, args.exec.as_deref()) => ran,
            () = tokio::time::sleep_until(until) => {
                say("kept.resumeTime is over: the resumed VM is discarded (the setting raises it)");
                Outcome::Failed
            }
        };
        drop(resumed);
        ran
    });
    runtime.shutdown_background();
    outcome
}

/// A shell on this terminal, or `script` run: its exit status decides the outcome.
async fn attach(resumed: &Resumed, script: Option<&str>) -> Outcome {
    let Some(script) = script else {
        let (rows, cols) = crate::shell_cmd::terminal_size().unwrap_or((24, 80));
        return match resumed.shells().open(rows, cols).await {
            Ok(shell) => {
                crate::shell_cmd::attach_terminal(shell).await;
                Outcome::Success
            }
            Err(error) => {
                say(&format!("no shell: {error}"));
                Outcome::Internal
            }
        };
    };
    let result = match resumed.exec(script).await {
        Ok(result) => result,
        Err(error) => {
            say(&error.to_string());
            return Outcome::Internal;
        }
    };
    report(&result)
}

/// Prints how a script ended; its exit status decides the outcome.
fn report(result: &ExecResult) -> Outcome {
    print!("{}", result.output);
    if result.truncated {
        say(&format!(
            "the output was cut at {} (its first bytes are above)",
            human_size(EXEC_OUTPUT_LIMIT as u64)
        ));
    }
    say(&format!("exit status {}", result.exit_code));
    if result.exit_code == 0 {
        Outcome::Success
    } else {
        Outcome::Failed
    }
}
