//! `taskvm`: runs each CI task in its own throwaway, sandboxed QEMU virtual machine.
//!
//! This binary is thin: argument parsing, reading files and mapping results to exit codes.
//! The data model lives in the `schemas` crate.

#![warn(clippy::unwrap_used)]

mod args;
mod build_cmd;
mod cache_cmd;
mod documents;
mod image_cmd;
mod kept_cmd;
mod logging;
mod run_cmd;
mod serve_cmd;
mod shell_cmd;
mod signals;
mod sizes;
mod submit_cmd;
mod validate;
mod warm_cmd;
mod worker_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use schemas::DocumentKind;

use crate::validate::ValidateKind;
use lifecycle::exit::Outcome;

/// Runs each CI task in its own throwaway, sandboxed QEMU virtual machine.
#[derive(Debug, Parser)]
#[command(name = "taskvm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How taskvm's own messages on standard error are written: `text` lines, or `json`, one
    /// object per line with the task and VM they concern (for log shippers).
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the JSON Schema of a document taskvm reads.
    Schema {
        /// Which document.
        #[arg(value_enum)]
        document: SchemaDocument,
    },
    /// Fetch, list, collect, verify and pack VM images.
    Image {
        #[command(subcommand)]
        command: image_cmd::ImageCommand,
    },
    /// List, remove and collect the writable caches payloads mount (`mounts`).
    Cache {
        #[command(subcommand)]
        command: cache_cmd::CacheCommand,
    },
    /// Run one task in a fresh VM: its output on stdout, its resolution as the exit status.
    ///
    /// Exit status: 0 completed, 1 failed, 2 malformed payload, 3 internal error or another
    /// exception (canceled).
    Run(run_cmd::RunArgs),
    /// Serve the embedded queue: tasks in SQLite, run on this host's VMs, with an HTTP API
    /// (/api, OpenAPI at /api/openapi.json), Prometheus /metrics and a web UI at /.
    Serve(serve_cmd::ServeArgs),
    /// Queue a task on a `taskvm serve`; with --follow, print its log and exit as `taskvm run`.
    Submit(submit_cmd::SubmitArgs),
    /// List or delete the failed VMs this host keeps for debugging (payload
    /// `debug.keepOnFailure`).
    Kept {
        #[command(subcommand)]
        command: kept_cmd::KeptCommand,
    },
    /// Resume a kept failed VM — the command's processes, files and memory as they were when
    /// it failed — on a fresh network: a shell on this terminal, or `--exec SCRIPT`.
    ///
    /// Exit status: 0 when the shell ends (or the script exits 0), 1 when the script fails,
    /// 3 when the VM cannot be resumed.
    Debug(kept_cmd::DebugArgs),
    /// Open a login shell in a running task's VM on this terminal: a task on a `taskvm serve`,
    /// or an interactive Taskcluster task's shell by its URL.
    ///
    /// Exit status: 0 when the shell ends, 3 when none could be opened.
    Shell(shell_cmd::ShellArgs),
    /// Claim and run tasks from a Taskcluster queue (credentials from TASKCLUSTER_ROOT_URL,
    /// TASKCLUSTER_CLIENT_ID, TASKCLUSTER_ACCESS_TOKEN and TASKCLUSTER_CERTIFICATE, or the
    /// configuration); SIGTERM stops claiming and lets running tasks finish.
    Worker(worker_cmd::WorkerArgs),
    /// Check a task payload (or machine.json, or configuration) and print `ok` or every error.
    ///
    /// Exit status: 0 valid, 2 invalid.
    Validate {
        /// The file to check (JSON; TOML for a configuration ending in `.toml`).
        file: PathBuf,
        /// What the file is.
        #[arg(long, value_enum, default_value = "payload")]
        kind: ValidateKind,
        /// Worker configuration whose limits and machine apply to the payload.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// Documents with a published schema.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SchemaDocument {
    /// A task payload.
    Payload,
    /// A machine definition (`machine.json`).
    Machine,
    /// A host's machine limits.
    Limits,
    /// A worker configuration file.
    Config,
}

impl From<SchemaDocument> for DocumentKind {
    fn from(document: SchemaDocument) -> Self {
        match document {
            SchemaDocument::Payload => DocumentKind::Payload,
            SchemaDocument::Machine => DocumentKind::Machine,
            SchemaDocument::Limits => DocumentKind::Limits,
            SchemaDocument::Config => DocumentKind::Config,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let prefix = match cli.command {
        Command::Serve(_) => "taskvm serve",
        Command::Worker(_) => "taskvm worker",
        _ => "taskvm",
    };
    logging::init(cli.log_format, prefix);
    let outcome = match cli.command {
        Command::Schema { document } => {
            print!("{}", DocumentKind::from(document).schema_text());
            Outcome::Success
        }
        Command::Image { command } => image_cmd::run(command),
        Command::Cache { command } => cache_cmd::run(command),
        Command::Run(args) => run_cmd::run(args),
        Command::Serve(args) => serve_cmd::run(args),
        Command::Submit(args) => submit_cmd::run(args),
        Command::Shell(args) => shell_cmd::run(args),
        Command::Kept { command } => kept_cmd::run(command),
        Command::Debug(args) => kept_cmd::debug(args),
        Command::Worker(args) => worker_cmd::run(args),
        Command::Validate { file, kind, config } => run_validate(&file, kind, config.as_deref()),
    };
    outcome.into()
}

fn run_validate(
    file: &std::path::Path,
    kind: ValidateKind,
    config: Option<&std::path::Path>,
) -> Outcome {
    let config = match documents::load_config(config) {
        Ok(config) => config,
        Err(violations) => {
            eprintln!("taskvm: invalid configuration:");
            eprintln!("{violations}");
            return Outcome::Malformed;
        }
    };
    match validate::validate(file, kind, &config) {
        Ok(()) => {
            println!("ok");
            Outcome::Success
        }
        Err(violations) => {
            println!("{violations}");
            Outcome::Malformed
        }
    }
}
