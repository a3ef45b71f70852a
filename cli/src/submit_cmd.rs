//! `taskvm submit TASK.json`: queue a task on a `taskvm serve`, and with `--follow` print its
//! log as it runs and exit with `taskvm run`'s codes.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lifecycle::exit::Outcome;
use lifecycle::resolution::Resolution;
use schemas::shown::escaped;
use serve::wire;

/// Most bytes of one API answer (not the log stream) that `submit` reads: a task with its
/// payload and runs is far smaller; a server sending more is refused.
const ANSWER_LIMIT: u64 = 8 << 20;
/// How long one API request (not the log stream) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Arguments of `taskvm submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The task payload (JSON).
    task: PathBuf,
    /// The server's URL.
    #[arg(
        long,
        value_name = "URL",
        env = "TASKVM_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// The server's access token (needed when it listens off loopback).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TASKVM_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
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
    let client = Client::new(&args.server, args.token.clone());
    let created = match client.submit(payload) {
        Ok(created) => created,
        Err(failure) => return failure.report(),
    };
    let task_id = created.task_id;
    if !args.follow {
        println!("{task_id}");
        eprintln!("taskvm submit: queued; {}/tasks/{task_id}", client.base);
        return Outcome::Success;
    }
    eprintln!(
        "taskvm submit: task {task_id} queued; {}/tasks/{task_id}",
        client.base
    );
    if let Err(failure) = client.follow_log(&task_id) {
        return failure.report();
    }
    match client.resolution(&task_id) {
        Ok(resolution) => {
            eprintln!("taskvm submit: task {task_id} resolved {resolution}");
            resolution.outcome()
        }
        Err(failure) => failure.report(),
    }
}

/// Why talking to the server failed.
enum Failure {
    /// The server refused the payload (400): the violations it listed.
    Refused(wire::Error),
    /// Anything else.
    Other(String),
}

impl Failure {
    fn report(self) -> Outcome {
        match self {
            Failure::Refused(body) => {
                eprintln!("taskvm submit: {}", body.error);
                for wire::Violation { pointer, rule } in &body.violations {
                    let pointer = if pointer.is_empty() { "/" } else { pointer };
                    eprintln!("  {pointer}: {rule}");
                }
                Outcome::Malformed
            }
            Failure::Other(message) => {
                eprintln!("taskvm submit: {message}");
                Outcome::Internal
            }
        }
    }
}

struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::blocking::Client,
}

impl Client {
    fn new(server: &str, token: Option<String>) -> Client {
        Client {
            base: server.trim_end_matches('/').to_owned(),
            token,
            // No overall timeout: a followed log lasts as long as its task.
            http: reqwest::blocking::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .timeout(None)
                .build()
                .unwrap_or_else(|_| reqwest::blocking::Client::new()),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    fn submit(&self, payload: Vec<u8>) -> Result<wire::Created, Failure> {
        let response = self
            .request(reqwest::Method::POST, "/api/tasks")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(REQUEST_TIMEOUT)
            .body(payload)
            .send()
            .map_err(|error| Failure::Other(format!("cannot reach {}: {error}", self.base)))?;
        let status = response.status();
        let body = read_answer(response)?;
        let unreadable = |error: serde_json::Error| {
            Failure::Other(format!(
                "the server answered {status} with an unreadable body: {error}"
            ))
        };
        match status.as_u16() {
            200..=299 => serde_json::from_slice(&body).map_err(unreadable),
            400 => Err(Failure::Refused(
                serde_json::from_slice(&body).map_err(unreadable)?,
            )),
            _ => Err(Failure::Other(format!(
                "the server answered {status}: {}",
                serde_json::from_slice::<wire::Error>(&body)
                    .map(|error| escaped(&error.error))
                    .unwrap_or_default()
            ))),
        }
    }

    /// Copies the log stream to stdout until the server ends it; reconnects after a cut.
    fn follow_log(&self, task_id: &str) -> Result<(), Failure> {
        let mut attempts = 0;
        let mut printed: u64 = 0;
        loop {
            let sent = self
                .request(reqwest::Method::GET, &format!("/api/tasks/{task_id}/log"))
                .send();
            let mut response = match sent {
                Ok(response) if response.status().is_success() => response,
                Ok(response) => {
                    return Err(Failure::Other(format!("the log: {}", response.status())))
                }
                Err(error) if attempts < 5 => {
                    attempts += 1;
                    eprintln!("taskvm submit: the log stream: {error}; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                Err(error) => return Err(Failure::Other(format!("the log stream: {error}"))),
            };
            let mut buffer = vec![0u8; 64 * 1024];
            let mut seen: u64 = 0;
            let mut stdout = std::io::stdout().lock();
            let cut = loop {
                match response.read(&mut buffer) {
                    Ok(0) => break false,
                    Ok(read) => {
                        // After a reconnect the stream starts over: skip what was printed.
                        let start = printed.saturating_sub(seen).min(read as u64) as usize;
                        seen += read as u64;
                        if start < read {
                            let _ = stdout.write_all(&buffer[start..read]);
                            let _ = stdout.flush();
                            printed += (read - start) as u64;
                        }
                    }
                    Err(_) => break true,
                }
            };
            if !cut || attempts >= 5 {
                return Ok(());
            }
            attempts += 1;
        }
    }

    /// The task's resolution, waiting briefly for it to be recorded.
    fn resolution(&self, task_id: &str) -> Result<Resolution, Failure> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let response = self
                .request(reqwest::Method::GET, &format!("/api/tasks/{task_id}"))
                .timeout(REQUEST_TIMEOUT)
                .send()
                .and_then(|response| response.error_for_status())
                .map_err(|error| Failure::Other(format!("the task's state: {error}")))?;
            let body = read_answer(response)?;
            let task: wire::Task = serde_json::from_slice(&body)
                .map_err(|error| Failure::Other(format!("the task's state: {error}")))?;
            if let Some(text) = task.resolution.filter(|_| task.state.is_resolved()) {
                return text
                    .parse()
                    .map_err(|error: String| Failure::Other(escaped(&error)));
            }
            if Instant::now() > deadline {
                return Err(Failure::Other("the task did not resolve".to_owned()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// An API answer's body, refused when it is larger than [`ANSWER_LIMIT`].
fn read_answer(response: reqwest::blocking::Response) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    response
        .take(ANSWER_LIMIT + 1)
        .read_to_end(&mut body)
        .map_err(|error| Failure::Other(format!("reading the server's answer: {error}")))?;
    if body.len() as u64 > ANSWER_LIMIT {
        return Err(Failure::Other(format!(
            "the server's answer is larger than {} MiB; taskvm submit reads no more",
            ANSWER_LIMIT >> 20
        )));
    }
    Ok(body)
}
