//! The Taskcluster queue calls a worker makes, over [`crate::client`] (Hawk, retries of 5xx
//! and connection errors with back-off; 4xx come back at once), with errors of our own.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use thiserror::Error;

use crate::client::{CallError, Credentials, Service};

/// A queue client.
pub type Queue = Service;

/// A failed queue call.
#[derive(Debug, Error)]
#[error("queue {call}: {message}")]
pub struct QueueError {
    /// Which call.
    pub call: &'static str,
    /// The HTTP status, when the queue answered.
    pub status: Option<u16>,
    /// What went wrong.
    pub message: String,
}

impl QueueError {
    fn from_call(call: &'static str, error: CallError) -> QueueError {
        QueueError {
            call,
            status: error.status,
            message: error.to_string(),
        }
    }

    /// Whether the queue refused the call (4xx): retrying the same call will not help.
    pub fn is_refusal(&self) -> bool {
        self.status
            .is_some_and(|status| (400..500).contains(&status))
    }
}

/// Where the queue is, and the worker's own credentials.
#[derive(Debug, Clone)]
pub struct QueueEndpoint {
    /// The deployment's root URL.
    pub root_url: String,
    /// The worker's permanent (or temporary) credentials, for `claimWork`.
    pub credentials: Credentials,
}

impl QueueEndpoint {
    /// A queue client acting with `credentials` (the worker's, or a claim's).
    pub fn client(
        &self,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<Queue, QueueError> {
        Service::new(&self.root_url, "queue", Some(credentials), timeout)
            .map_err(|error| QueueError::from_call("client", error))
    }
}

/// `claimWork`: up to `tasks` tasks for `task_queue_id` (long-polls ~20 s when there is none).
pub async fn claim_work(
    queue: &Queue,
    task_queue_id: &str,
    worker_group: &str,
    worker_id: &str,
    tasks: usize,
) -> Result<Vec<Value>, QueueError> {
    let body = json!({ "workerGroup": worker_group, "workerId": worker_id, "tasks": tasks });
    let answer = queue
        .call(Method::POST, &["claim-work", task_queue_id], Some(&body))
        .await
        .map_err(|error| QueueError::from_call("claimWork", error))?;
    Ok(answer
        .get("tasks")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default())
}

/// `reclaimTask`: the claim's new `takenUntil` and credentials.
pub async fn reclaim(queue: &Queue, task_id: &str, run_id: u32) -> Result<Value, QueueError> {
    let run = run_id.to_string();
    queue
        .call(
            Method::POST,
            &["task", task_id, "runs", &run, "reclaim"],
            None,
        )
        .await
        .map_err(|error| QueueError::from_call("reclaimTask", error))
}

/// How a run is reported to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// `reportCompleted`.
    Completed,
    /// `reportFailed`.
    Failed,
    /// `reportException` with this reason.
    Exception(&'static str),
}

/// Resolves the run.
pub async fn report(
    queue: &Queue,
    task_id: &str,
    run_id: u32,
    report: Report,
) -> Result<(), QueueError> {
    let run = run_id.to_string();
    let (last, body) = match report {
        Report::Completed => ("completed", None),
        Report::Failed => ("failed", None),
        Report::Exception(reason) => ("exception", Some(json!({ "reason": reason }))),
    };
    queue
        .call(
            Method::POST,
            &["task", task_id, "runs", &run, last],
            body.as_ref(),
        )
        .await
        .map(drop)
        .map_err(|error| QueueError::from_call("report", error))
}

/// `createArtifact`.
pub async fn create_artifact(
    queue: &Queue,
    task_id: &str,
    run_id: u32,
    name: &str,
    request: &Value,
) -> Result<Value, QueueError> {
    let run = run_id.to_string();
    let path = ["task", task_id, "runs", &run, "artifacts", name];
    queue
        .call(Method::POST, &path, Some(request))
        .await
        .map_err(|error| QueueError::from_call("createArtifact", error))
}
