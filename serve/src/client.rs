//! A client of the API, typed with [`crate::wire`] (what `taskvm submit` uses): blocking, each
//! answer bounded in size and each request (not the log stream) in time, what the server says
//! quoted escaped.

use std::io::{Read, Write};
use std::time::Duration;

use schemas::shown::escaped;
use thiserror::Error;

use crate::wire;

/// Most bytes of one API answer (not the log stream) read: a task with its payload and runs
/// is far smaller; a server sending more is refused.
pub const ANSWER_LIMIT: u64 = 8 << 20;
/// How long one API request (not the log stream) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Reconnections of a cut log stream before giving up.
const LOG_RETRIES: u32 = 5;

/// Why a request failed.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The server refused the payload (400), with the violations it listed.
    #[error("{}", .0.error)]
    Refused(wire::Error),
    /// Anything else, said in one line.
    #[error("{0}")]
    Other(String),
}

/// The API of the server at one base URL.
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::blocking::Client,
}

impl ApiClient {
    /// The server at `server` (its base URL), with its access token when it needs one.
    pub fn new(server: &str, token: Option<String>) -> ApiClient {
        ApiClient {
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

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Queues `payload` (JSON bytes).
    pub fn submit(&self, payload: Vec<u8>) -> Result<wire::Created, ApiError> {
        let response = self
            .request(reqwest::Method::POST, "/api/tasks")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(REQUEST_TIMEOUT)
            .body(payload)
            .send()
            .map_err(|error| ApiError::Other(format!("cannot reach {}: {error}", self.base)))?;
        let status = response.status();
        let body = read_answer(response)?;
        let unreadable = |error: serde_json::Error| {
            ApiError::Other(format!(
                "the server answered {status} with an unreadable body: {error}"
            ))
        };
        match status.as_u16() {
            200..=299 => serde_json::from_slice(&body).map_err(unreadable),
            400 => Err(ApiError::Refused(
                serde_json::from_slice(&body).map_err(unreadable)?,
            )),
            _ => Err(ApiError::Other(format!(
                "the server answered {status}: {}",
                serde_json::from_slice::<wire::Error>(&body)
                    .map(|error| escaped(&error.error))
                    .unwrap_or_default()
            ))),
        }
    }

    /// The kept VMs.
    pub fn kept(&self) -> Result<wire::KeptList, ApiError> {
        let response = self
            .request(reqwest::Method::GET, "/api/kept")
            .timeout(REQUEST_TIMEOUT)
            .send()
            .map_err(|error| ApiError::Other(format!("cannot reach {}: {error}", self.base)))?;
        self.json_answer(response, "the kept VMs")
    }

    /// Deletes kept VM `name`.
    pub fn delete_kept(&self, name: &str) -> Result<wire::KeptDeleted, ApiError> {
        if !wire::is_kept_name(name) {
            return Err(ApiError::Other(format!(
                "{} is not the name of a kept VM (taskvm kept ls lists them)",
                escaped(name)
            )));
        }
        let response = self
            .request(reqwest::Method::DELETE, &format!("/api/kept/{name}"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .map_err(|error| ApiError::Other(format!("cannot reach {}: {error}", self.base)))?;
        self.json_answer(response, name)
    }

    /// Runs `script` in a fresh copy of kept VM `name` (no time bound here: the server's
    /// `kept.resumeTime` is).
    pub fn exec_in_kept(&self, name: &str, script: &str) -> Result<wire::ExecAnswer, ApiError> {
        if !wire::is_kept_name(name) {
            return Err(ApiError::Other(format!(
                "{} is not the name of a kept VM (taskvm kept ls lists them)",
                escaped(name)
            )));
        }
        let body = serde_json::to_vec(&wire::ExecRequest {
            script: script.to_owned(),
        })
        .map_err(|error| ApiError::Other(error.to_string()))?;
        let response = self
            .request(reqwest::Method::POST, &format!("/api/kept/{name}/exec"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .map_err(|error| ApiError::Other(format!("cannot reach {}: {error}", self.base)))?;
        self.json_answer(response, name)
    }

    fn json_answer<T: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::blocking::Response,
        what: &str,
    ) -> Result<T, ApiError> {
        let status = response.status();
        let body = read_answer(response)?;
        if !status.is_success() {
            return Err(ApiError::Other(format!(
                "the server answered {status} about {}: {}",
                escaped(what),
                serde_json::from_slice::<wire::Error>(&body)
                    .map(|error| escaped(&error.error))
                    .unwrap_or_default()
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|error| ApiError::Other(format!("{}: {error}", escaped(what))))
    }

    /// A task and its runs.
    pub fn task(&self, task_id: &str) -> Result<wire::Task, ApiError> {
        let response = self
            .request(reqwest::Method::GET, &format!("/api/tasks/{task_id}"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .and_then(|response| response.error_for_status())
            .map_err(|error| ApiError::Other(format!("the task's state: {error}")))?;
        let body = read_answer(response)?;
        serde_json::from_slice(&body)
            .map_err(|error| ApiError::Other(format!("the task's state: {error}")))
    }

    /// Copies the task's log stream into `out` until the server ends it; reconnects after a
    /// cut, skipping what was already copied. `notice` hears of each retry.
    pub fn follow_log(
        &self,
        task_id: &str,
        out: &mut impl Write,
        notice: &dyn Fn(&str),
    ) -> Result<(), ApiError> {
        let mut attempts = 0;
        let mut printed: u64 = 0;
        loop {
            let sent = self
                .request(reqwest::Method::GET, &format!("/api/tasks/{task_id}/log"))
                .send();
            let mut response = match sent {
                Ok(response) if response.status().is_success() => response,
                Ok(response) => {
                    return Err(ApiError::Other(format!("the log: {}", response.status())))
                }
                Err(error) if attempts < LOG_RETRIES => {
                    attempts += 1;
                    notice(&format!("the log stream: {error}; retrying"));
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                Err(error) => return Err(ApiError::Other(format!("the log stream: {error}"))),
            };
            let mut buffer = vec![0u8; 64 * 1024];
            let mut seen: u64 = 0;
            let cut = loop {
                match response.read(&mut buffer) {
                    Ok(0) => break false,
                    Ok(read) => {
                        // After a reconnect the stream starts over: skip what was copied.
                        let start = printed.saturating_sub(seen).min(read as u64) as usize;
                        seen += read as u64;
                        if start < read {
                            let _ = out.write_all(&buffer[start..read]);
                            let _ = out.flush();
                            printed += (read - start) as u64;
                        }
                    }
                    Err(_) => break true,
                }
            };
            if !cut || attempts >= LOG_RETRIES {
                return Ok(());
            }
            attempts += 1;
        }
    }
}

/// An API answer's body, refused when it is larger than [`ANSWER_LIMIT`].
fn read_answer(response: reqwest::blocking::Response) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    response
        .take(ANSWER_LIMIT + 1)
        .read_to_end(&mut body)
        .map_err(|error| ApiError::Other(format!("reading the server's answer: {error}")))?;
    if body.len() as u64 > ANSWER_LIMIT {
        return Err(ApiError::Other(format!(
            "the server's answer is larger than {} MiB; taskvm submit reads no more",
            ANSWER_LIMIT >> 20
        )));
    }
    Ok(body)
}
