//! One payload as a provider hands it over — a document nobody has validated yet — run to its
//! [`TaskOutcome`]: the run's directory and log made, the payload validated (a malformed one
//! resolves `exception/malformed-payload`), then [`run_task`]. Every provider — `taskvm run`,
//! the embedded queue and the Taskcluster provider — goes through here, so what happens before
//! the task can start is resolved by the lifecycle too.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::capacity::Capacity;
use crate::host::Host;
use crate::log::{Echo, LogListener, TaskLog};
use crate::resolution::Ending;
use crate::{run_task, LiveVm, StopSignal, TaskOutcome, TaskRequest};

/// A payload as it arrived.
#[derive(Debug, Clone)]
pub enum PayloadDocument {
    /// JSON text (as stored by the embedded queue).
    Text(String),
    /// A parsed JSON value (as a Taskcluster task definition holds it).
    Json(serde_json::Value),
}

/// What a provider knows of one run.
pub struct PayloadRun {
    /// The payload, unvalidated.
    pub payload: PayloadDocument,
    /// The run's own directory (made here): `live.log` and the artifacts.
    pub dir: PathBuf,
    /// The log's first line, naming the run (e.g. `task X run 0 on taskvm serve`; none when
    /// empty).
    pub header: String,
    /// Whether the log is also shown as it is written (`taskvm run`'s terminal).
    pub echo: Echo,
    /// The host's capacity shared with the provider's other runs.
    pub capacity: Option<Arc<Capacity>>,
    /// Told where the running VM can be watched.
    pub live: Option<watch::Sender<Option<LiveVm>>>,
    /// Told of every write to the run's log (a provider that streams it).
    pub on_log: Option<LogListener>,
    /// The task's scopes, when its queue has them (Taskcluster): a cache NAME it mounts then
    /// needs `taskvm:cache:NAME`. None: no scope is asked for (a local run, the embedded
    /// queue).
    pub scopes: Option<Vec<String>>,
    /// The provider's name for the task (serve: its id; the worker: `TASK_ID/RUN_ID`), kept
    /// with its VM when one is kept.
    pub task: Option<String>,
}

/// The scope a task needs to mount cache `name`, on queues with scopes.
pub fn cache_scope(name: &str) -> String {
    format!("taskvm:cache:{name}")
}

/// Whether `scopes` grant `wanted`: one equals it, or ends in `*` and `wanted` starts with what
/// comes before (Taskcluster's rule).
pub fn scopes_satisfy(scopes: &[String], wanted: &str) -> bool {
    scopes.iter().any(|scope| match scope.strip_suffix('*') {
        Some(prefix) => wanted.starts_with(prefix),
        None => scope == wanted,
    })
}

/// Runs `run` on `host` to its outcome; see the module documentation. `stop` turning `Some`
/// cancels it.
pub async fn run_payload(host: Arc<Host>, run: PayloadRun, stop: StopSignal) -> TaskOutcome {
    if let Err(error) = std::fs::create_dir_all(&run.dir) {
        return internal_error(format!("cannot create {}: {error}", run.dir.display()));
    }
    let log = match TaskLog::create(&run.dir.join("live.log"), run.echo) {
        Ok(log) => match run.on_log {
            Some(listener) => log.with_listener(listener),
            None => log,
        },
        Err(error) => return internal_error(format!("cannot create the task log: {error}")),
    };
    if !run.header.is_empty() {
        log.note(&run.header);
    }
    let value = match run.payload {
        PayloadDocument::Text(text) => serde_json::from_str(&text).map_err(|e| e.to_string()),
        PayloadDocument::Json(value) => Ok(value),
    };
    let payload = value.and_then(|value| schemas::parse_payload(&value).map_err(|e| e.to_string()));
    let payload = match payload {
        Ok(payload) => payload,
        // Accepted by an older version, or sent by a queue: refused by this one.
        Err(violations) => return TaskOutcome::malformed_payload(&log, &violations),
    };
    if let Some(scopes) = &run.scopes {
        let missing: Vec<String> = payload
            .mounts
            .iter()
            .filter_map(|mount| mount.cache.as_deref().map(cache_scope))
            .filter(|wanted| !scopes_satisfy(scopes, wanted))
            .collect();
        if !missing.is_empty() {
            let lines: Vec<String> = missing
                .iter()
                .map(|scope| format!("/mounts: the task's scopes do not include {scope}"))
                .collect();
            return TaskOutcome::malformed_payload(&log, &lines.join("\n"));
        }
    }
    let mut request = TaskRequest::new(
        payload,
        format!("task-{:08x}", rand::random::<u32>()),
        run.dir.clone(),
    );
    request.capacity = run.capacity;
    request.live = run.live;
    request.task = run.task;
    let outcome = run_task(host, request, &log, stop).await;
    if let Some(error) = log.write_error() {
        log.note(&format!("warning: the task log is incomplete: {error}"));
    }
    outcome
}

/// The outcome of a run that could not begin because the host failed (no log to write).
fn internal_error(reason: String) -> TaskOutcome {
    TaskOutcome::before_start(Ending::internal(reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_grants_what_starts_with_its_prefix_and_nothing_else_does() {
        let scopes = [
            "taskvm:cache:deps".to_owned(),
            "taskvm:cache:tool-*".to_owned(),
        ];
        assert!(scopes_satisfy(&scopes, "taskvm:cache:deps"));
        assert!(scopes_satisfy(&scopes, "taskvm:cache:tool-rust"));
        assert!(!scopes_satisfy(&scopes, "taskvm:cache:deps2"));
        assert!(!scopes_satisfy(&scopes, "taskvm:cache:tool"));
        assert!(scopes_satisfy(&["*".to_owned()], "taskvm:cache:x"));
        assert!(!scopes_satisfy(&[], "taskvm:cache:x"));
    }
}
