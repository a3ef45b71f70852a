//! The API's bodies as types: what the server sends, what `taskvm submit` reads, and — derived
//! from them with schemars — the schemas of the OpenAPI document (`crate::openapi`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use lifecycle::capacity::Resources;

use crate::store::{RunRecord, TaskRecord, TaskState};

/// Where a task's resources are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Links {
    /// The task (`GET`).
    #[serde(rename = "self")]
    pub task: String,
    /// Its log, followed while it runs.
    pub log: String,
    /// A screenshot of its running VM.
    pub screenshot: String,
    /// Where to cancel it (`POST`).
    pub cancel: String,
    /// Its page in the web UI.
    pub page: String,
}

impl Links {
    /// The links of task `task_id`.
    pub fn of(task_id: &str) -> Links {
        Links {
            task: format!("/api/tasks/{task_id}"),
            log: format!("/api/tasks/{task_id}/log"),
            screenshot: format!("/api/tasks/{task_id}/screenshot"),
            cancel: format!("/api/tasks/{task_id}/cancel"),
            page: format!("/tasks/{task_id}"),
        }
    }
}

/// The answer to a submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Created {
    /// The new task's id (16 hexadecimal digits).
    pub task_id: String,
    /// `queued`.
    pub state: TaskState,
    /// Where its resources are.
    pub links: Links,
}

/// A task in a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSummary {
    /// The task's id.
    pub task_id: String,
    /// Where it is.
    pub state: TaskState,
    /// When it was submitted (milliseconds since the Unix epoch).
    pub created: i64,
    /// Its newest run's resolution: `completed`, `failed` or `exception/REASON`.
    pub resolution: Option<String>,
    /// How many runs it had.
    pub runs: usize,
    /// The payload's image.
    pub image: Option<Value>,
}

impl TaskSummary {
    /// The summary of `record`.
    pub fn of(record: &TaskRecord) -> TaskSummary {
        TaskSummary {
            task_id: record.task_id.clone(),
            state: record.state,
            created: record.created,
            resolution: record.latest_run().and_then(|run| run.resolution.clone()),
            runs: record.runs.len(),
            image: record.payload.get("image").cloned(),
        }
    }
}

/// Tasks, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskList {
    /// The tasks.
    pub tasks: Vec<TaskSummary>,
}

/// A task, its payload and its runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    /// The task's id.
    pub task_id: String,
    /// Where it is.
    pub state: TaskState,
    /// When it was submitted (milliseconds since the Unix epoch).
    pub created: i64,
    /// The payload as submitted.
    pub payload: Value,
    /// Its runs, oldest first.
    pub runs: Vec<RunRecord>,
    /// Its newest run's resolution.
    pub resolution: Option<String>,
    /// Whether its running VM has a display to watch (the console).
    pub console: bool,
    /// Whether it has a running VM to open a shell in.
    #[serde(default)]
    pub shell: bool,
    /// Where its resources are.
    pub links: Links,
}

/// The answer to a cancel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Canceled {
    /// The task's id.
    pub task_id: String,
    /// Where it is now.
    pub state: TaskState,
    /// What happens to it.
    pub message: String,
}

/// The host's capacity for VMs and what running tasks hold of it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Capacity {
    /// All of it.
    pub total: Resources,
    /// What running tasks hold.
    pub used: Resources,
}

/// The server's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// taskvm's version.
    pub version: String,
    /// Tasks waiting.
    pub queued: u64,
    /// Tasks running.
    pub running: usize,
    /// Whether new tasks are kept queued.
    pub paused: bool,
    /// The most tasks run at once.
    pub concurrency: usize,
    /// Memory and CPUs.
    pub capacity: Capacity,
    /// Whether the console (noVNC) is served.
    pub console: bool,
    /// Whether the UI's terminal (xterm.js) is served; the shell's websocket works without.
    #[serde(default)]
    pub terminal: bool,
    /// Paused VMs ready in the warm pool (`warmPool` in the configuration; 0 without one).
    #[serde(default)]
    pub warm_pool_ready: usize,
}

/// One broken rule of a document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Violation {
    /// Where, as a JSON pointer.
    pub pointer: String,
    /// What rule.
    pub rule: String,
}

/// An error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Error {
    /// What went wrong.
    pub error: String,
    /// Every broken rule of a malformed payload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<Violation>,
}

/// The failed VMs this host keeps for debugging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeptList {
    /// Oldest first.
    pub kept: Vec<KeptVm>,
}

/// One kept VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeptVm {
    /// Its name: what `/api/kept/{name}/…` and `taskvm debug` take.
    pub name: String,
    /// The id of the task whose run failed in it (none: kept by another provider on this
    /// host's state directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Bytes its files take.
    pub size: u64,
    /// When it was kept (seconds since the Unix epoch).
    pub kept_at: u64,
    /// When it is deleted (seconds since the Unix epoch).
    pub expires_at: u64,
    /// The failed task's command.
    pub command: Vec<String>,
}

/// Whether `name` can be a kept VM's (letters, digits, `-`, `_` and `.`, not first; at most
/// 128 bytes): anything else is not looked up, nor put in a URL.
pub fn is_kept_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A kept VM deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeptDeleted {
    /// Its name.
    pub deleted: String,
}

/// A script to run in a resumed kept VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecRequest {
    /// Run as `sh -c SCRIPT`.
    #[schemars(length(max = 65536))]
    pub script: String,
}

/// How a script in a resumed kept VM ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecAnswer {
    /// Its exit code (128 + signal).
    pub exit_code: i32,
    /// Its output (at most 1 MiB of it).
    pub output: String,
    /// Whether output past 1 MiB was left out.
    pub truncated: bool,
}

/// The JSON Schemas of the API's bodies (each with its own `$defs`), named as the OpenAPI
/// document's components.
pub fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        ("Error", schemars::schema_for!(Error).to_value()),
        ("Created", schemars::schema_for!(Created).to_value()),
        ("TaskList", schemars::schema_for!(TaskList).to_value()),
        ("Task", schemars::schema_for!(Task).to_value()),
        ("Canceled", schemars::schema_for!(Canceled).to_value()),
        ("Health", schemars::schema_for!(Health).to_value()),
        ("KeptList", schemars::schema_for!(KeptList).to_value()),
        ("KeptDeleted", schemars::schema_for!(KeptDeleted).to_value()),
        ("ExecRequest", schemars::schema_for!(ExecRequest).to_value()),
        ("ExecAnswer", schemars::schema_for!(ExecAnswer).to_value()),
    ]
}
