//! The Taskcluster queue calls a worker makes, over the `taskcluster` crate (Hawk, retries of
//! 5xx and connection errors with back-off; 4xx come back at once), with errors of our own.

use std::time::Duration;

use serde_json::{json, Value};
use taskcluster::{ClientBuilder, Credentials, Queue, Retry};
use thiserror::Error;

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
    fn from_anyhow(call: &'static str, error: &anyhow::Error) -> QueueError {
        QueueError {
            call,
            status: taskcluster::err_status_code(error).map(|status| status.as_u16()),
            message: format!("{error:#}"),
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
        let builder = ClientBuilder::new(self.root_url.clone())
            .credentials(credentials.clone())
            .timeout(timeout)
            .retry(Retry {
                retries: 5,
                max_delay: Duration::from_secs(10),
                delay_factor: Duration::from_millis(250),
                ..Retry::default()
            });
        Queue::new(builder).map_err(|error| QueueError::from_anyhow("client", &error))
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
        .claimWork(task_queue_id, &body)
        .await
        .map_err(|error| QueueError::from_anyhow("claimWork", &error))?;
    Ok(answer
        .get("tasks")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default())
}

/// `reclaimTask`: the claim's new `takenUntil` and credentials.
pub async fn reclaim(queue: &Queue, task_id: &str, run_id: u32) -> Result<Value, QueueError> {
    queue
        .reclaimTask(task_id, &run_id.to_string())
        .await
        .map_err(|error| QueueError::from_anyhow("reclaimTask", &error))
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
    let result = match report {
        Report::Completed => queue.reportCompleted(task_id, &run).await,
        Report::Failed => queue.reportFailed(task_id, &run).await,
        Report::Exception(reason) => {
            queue
                .reportException(task_id, &run, &json!({ "reason": reason }))
                .await
        }
    };
    result
        .map(|_| ())
        .map_err(|error| QueueError::from_anyhow("report", &error))
}

/// `createArtifact`.
pub async fn create_artifact(
    queue: &Queue,
    task_id: &str,
    run_id: u32,
    name: &str,
    request: &Value,
) -> Result<Value, QueueError> {
    queue
        .createArtifact(task_id, &run_id.to_string(), name, request)
        .await
        .map_err(|error| QueueError::from_anyhow("createArtifact", &error))
}
