//! `taskvm run TASK.json`: one task, locally, its log on stdout, its artifacts in a directory,
//! its resolution as the exit code. Ctrl-C or SIGTERM cancels it cleanly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use schemas::parse_payload;
use tokio::sync::watch;

use lifecycle::exit::Outcome;
use lifecycle::log::{Echo, TaskLog};
use lifecycle::{run_payload, PayloadDocument, PayloadRun, TaskOutcome};

/// Arguments of `taskvm run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration, cache, state and accelerator.
    #[command(flatten)]
    host: crate::documents::HostArgs,
    /// The task payload (JSON).
    task: PathBuf,
    /// Where to put the task's artifacts, logs and screenshot (default: not kept).
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// How the VM starts (default: the configuration's start, `auto` unless set).
    #[arg(long, value_enum)]
    start: Option<crate::args::StartArg>,
    /// Pass the guest's output to a terminal as it is, escape sequences included (by default
    /// a terminal gets control characters shown escaped; a pipe always gets the bytes).
    #[arg(long)]
    raw_output: bool,
}

/// Runs `taskvm run`.
pub fn run(args: RunArgs) -> Outcome {
    let config = match crate::documents::load_host_config(&args.host, args.start.map(Into::into)) {
        Ok(config) => config,
        Err(outcome) => return outcome,
    };
    let kept = args.artifacts.is_some();
    let artifacts = match prepare_artifacts(args.artifacts.as_deref()) {
        Ok(dir) => dir,
        Err(error) => {
            eprintln!("taskvm: artifacts directory: {error}");
            return Outcome::Internal;
        }
    };
    let echo = if args.raw_output || !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        Echo::Terminal
    } else {
        Echo::TerminalEscaped
    };
    // The payload first: a malformed one is the user's to fix, whatever this host can do.
    let document = crate::documents::read_document(&args.task)
        .and_then(|value| parse_payload(&value).map(|_| value));
    let document = match document {
        Ok(document) => document,
        Err(violations) => return malformed(&artifacts, echo, &violations.to_string()),
    };
    let runtime = match crate::documents::vm_runtime() {
        Ok(runtime) => runtime,
        Err(outcome) => return outcome,
    };
    let say = crate::documents::say;
    let outcome = runtime.block_on(async {
        let host = match crate::documents::prepared_host(config, &say, "tasks") {
            Ok(mut host) => {
                host.allow_any_local_file();
                Arc::new(host)
            }
            Err(outcome) => return outcome,
        };
        let (stop, stop_signal) = watch::channel(None);
        tokio::spawn(async move {
            let reason = crate::signals::wait_for_signal().await;
            let _ = stop.send(Some(reason));
            // Keep the sender: dropping it would look like "no more signals".
            std::future::pending::<()>().await;
        });
        let run = PayloadRun {
            payload: PayloadDocument::Json(document),
            dir: artifacts.path().to_path_buf(),
            header: String::new(),
            echo,
            capacity: None,
            live: None,
            on_log: None,
            scopes: None,
            task: None,
        };
        let outcome = run_payload(host, run, stop_signal).await;
        outcome.ending.resolution.outcome()
    });
    if kept {
        // Not in the log, whose last line is the resolution.
        let _ = writeln!(
            std::io::stderr(),
            "taskvm: artifacts in {}",
            artifacts.path().display()
        );
    }
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    outcome
}

/// A payload refused before any host work: the lifecycle resolves it in the task log.
fn malformed(artifacts: &ArtifactsDir, echo: Echo, violations: &str) -> Outcome {
    match TaskLog::create(&artifacts.path().join("live.log"), echo) {
        Ok(log) => TaskOutcome::malformed_payload(&log, violations)
            .ending
            .resolution
            .outcome(),
        Err(error) => {
            eprintln!("taskvm: cannot write the task log: {error}");
            Outcome::Internal
        }
    }
}

/// The artifacts directory: the one given (created), or a temporary one removed at exit.
enum ArtifactsDir {
    Kept(PathBuf),
    Temporary(tempfile::TempDir),
}

impl ArtifactsDir {
    fn path(&self) -> &Path {
        match self {
            ArtifactsDir::Kept(path) => path,
            ArtifactsDir::Temporary(dir) => dir.path(),
        }
    }
}

fn prepare_artifacts(dir: Option<&Path>) -> std::io::Result<ArtifactsDir> {
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            Ok(ArtifactsDir::Kept(dir.to_path_buf()))
        }
        None => Ok(ArtifactsDir::Temporary(tempfile::tempdir()?)),
    }
}
