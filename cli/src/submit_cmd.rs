//! `taskvm submit TASK.json`: queue a task on a `taskvm serve`, and with `--follow` print its
//! log as it runs and exit with `taskvm run`'s codes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lifecycle::exit::Outcome;
use lifecycle::resolution::Resolution;
use schemas::shown::escaped;
use serve::client::{ApiClient, ApiError};
use serve::wire;

/// Arguments of `taskvm submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The task payload (JSON).
    task: PathBuf,
    /// Which server.
    #[command(flatten)]
    server: crate::args::ServerArgs,
    /// Print the task's log until it is resolved, and exit as `taskvm run` does: 0 completed,
    /// 1 failed, 2 malformed payload, 3 anything else.
    #[arg(long)]
    follow: bool,
}

/// Runs `taskvm submit`.
pub fn run(args: SubmitArgs) -> Outcome {
    let payload = match std::fs::read(&args.task) {
        Ok(bytes) => bytes,
        Err(error) => {
            eprintln!(
                "taskvm submit: cannot read {}: {error}",
                args.task.display()
            );
            return Outcome::Malformed;
        }
    };
    let client = ApiClient::new(&args.server.server, args.server.token.clone());
    let created = match client.submit(payload) {
        Ok(created) => created,
        Err(failure) => return report(failure),
    };
    let task_id = created.task_id;
    if !args.follow {
        println!("{task_id}");
        eprintln!("taskvm submit: queued; {}/tasks/{task_id}", client.base());
        return Outcome::Success;
    }
    eprintln!(
        "taskvm submit: task {task_id} queued; {}/tasks/{task_id}",
        client.base()
    );
    let notice = |line: &str| eprintln!("taskvm submit: {line}");
    if let Err(failure) = client.follow_log(&task_id, &mut std::io::stdout().lock(), &notice) {
        return report(failure);
    }
    match resolution(&client, &task_id) {
        Ok(resolution) => {
            eprintln!("taskvm submit: task {task_id} resolved {resolution}");
            resolution.outcome()
        }
        Err(failure) => report(failure),
    }
}

/// Says why talking to the server failed; the exit status for it.
fn report(failure: ApiError) -> Outcome {
    match failure {
        ApiError::Refused(body) => {
            eprintln!("taskvm submit: {}", body.error);
            for wire::Violation { pointer, rule } in &body.violations {
                let pointer = if pointer.is_empty() { "/" } else { pointer };
                eprintln!("  {pointer}: {rule}");
            }
            Outcome::Malformed
        }
        ApiError::Other(message) => {
            eprintln!("taskvm submit: {message}");
            Outcome::Internal
        }
    }
}

/// The task's resolution, waiting briefly for it to be recorded.
fn resolution(client: &ApiClient, task_id: &str) -> Result<Resolution, ApiError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let task = client.task(task_id)?;
        if let Some(text) = task.resolution.filter(|_| task.state.is_resolved()) {
            return text
                .parse()
                .map_err(|error: String| ApiError::Other(escaped(&error)));
        }
        if Instant::now() > deadline {
            return Err(ApiError::Other("the task did not resolve".to_owned()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
