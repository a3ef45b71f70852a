//! The HTTP API under `/api` (JSON; the OpenAPI document is `/api/openapi.json`) and the
//! Prometheus text at `/metrics`.
//!
//! # Layout
//! - here: what every handler shares ([`App`], [`ApiError`]) and the task resources (submit,
//!   list, show, cancel).
//! - [`streams`]: the log followed while a run goes on, artifacts, screenshot, console, shell.
//! - [`kept`]: failed VMs kept for debugging, listed and resumed.
//! - [`metrics`]: health and Prometheus metrics.
//!
//! Every JSON body is a type of [`crate::wire`].

pub mod kept;
mod metrics;
mod streams;

pub use metrics::{health, metrics};
pub use streams::{artifact, console, log, screenshot, shell};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use schemas::{limit_violation, parse_payload, resolve_machine, MachineLayers, Violation};
use serde_json::Value;

use super::scheduler::{Cancel, Scheduler};
use super::store::{RunRecord, StoreError, TaskRecord, TaskState};
use crate::wire;

/// What every handler shares.
pub struct App {
    /// The task runner (and through it the store).
    pub scheduler: Arc<Scheduler>,
    /// Where noVNC's files are (None: the console is unavailable).
    pub novnc_dir: Option<PathBuf>,
    /// Where xterm.js's package is (None: the UI has no terminal).
    pub xterm_dir: Option<PathBuf>,
}

/// The shared state handlers take.
pub type Shared = State<Arc<App>>;

/// An error answer: `{"error": "...", "violations": [{"pointer", "rule"}]}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    violations: Vec<Violation>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            violations: Vec::new(),
        }
    }

    fn not_found(what: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, format!("no such {what}"))
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::info!("{}", error.to_string());
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = wire::Error {
            error: self.message,
            violations: self
                .violations
                .into_iter()
                .map(|violation| wire::Violation {
                    pointer: violation.pointer,
                    rule: violation.rule,
                })
                .collect(),
        };
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Task ids are 16 lowercase hex digits; anything else names no task.
fn valid_id(task_id: &str) -> ApiResult<()> {
    let ok = task_id.len() == 16 && task_id.bytes().all(|byte| byte.is_ascii_hexdigit());
    if ok {
        Ok(())
    } else {
        Err(ApiError::not_found("task"))
    }
}

fn task(app: &App, task_id: &str) -> ApiResult<TaskRecord> {
    valid_id(task_id)?;
    app.scheduler
        .store()
        .get(task_id)?
        .ok_or_else(|| ApiError::not_found("task"))
}

/// The run `?run=N` names, or the newest.
fn chosen_run<'a>(
    record: &'a TaskRecord,
    query: &HashMap<String, String>,
) -> ApiResult<Option<&'a RunRecord>> {
    match query.get("run") {
        None => Ok(record.latest_run()),
        Some(text) => {
            let run_id: u64 = text.parse().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "run must be a run number (0, 1, …)",
                )
            })?;
            record
                .runs
                .iter()
                .find(|run| u64::from(run.run_id) == run_id)
                .map(Some)
                .ok_or_else(|| ApiError::not_found("run"))
        }
    }
}

/// `POST /api/tasks`: a payload in, a task id out.
pub async fn submit(State(app): Shared, headers: HeaderMap, body: Bytes) -> ApiResult<Response> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim_start().starts_with("application/json"));
    if !json_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the payload as Content-Type: application/json",
        ));
    }
    let value: Value = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {error}"),
        )
    })?;
    let payload = parse_payload(&value).map_err(|violations| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: "the payload is malformed".to_owned(),
        violations: violations.as_slice().to_vec(),
    })?;
    // The payload's own machine against this host's limits, as `taskvm run` checks first.
    let limits = &app.scheduler.host().config.limits;
    resolve_machine(
        MachineLayers {
            payload: payload.machine.as_ref(),
            ..MachineLayers::default()
        },
        limits,
    )
    .map_err(|error| {
        let violation = limit_violation(&error, "/machine");
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: "the payload asks for more than this host allows".to_owned(),
            violations: violation.as_slice().to_vec(),
        }
    })?;
    let task_id = hex::encode(rand::random::<[u8; 8]>());
    app.scheduler.store().submit(&task_id, &value.to_string())?;
    app.scheduler.wake();
    let location = format!("/api/tasks/{task_id}");
    let mut response = (
        StatusCode::CREATED,
        Json(wire::Created {
            links: wire::Links::of(&task_id),
            task_id: task_id.clone(),
            state: TaskState::Queued,
        }),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// `GET /api/tasks?state=S&limit=N`: newest first.
pub async fn list(
    State(app): Shared,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<wire::TaskList>> {
    let state = match query.get("state") {
        None => None,
        Some(name) => Some(TaskState::from_name(name).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "state must be queued, running, completed, failed or exception",
            )
        })?),
    };
    let limit = match query.get("limit") {
        None => 100,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=1000).contains(limit))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "limit must be a number from 1 to 1000",
                )
            })?,
    };
    let tasks = app.scheduler.store().list(state, limit)?;
    Ok(Json(wire::TaskList {
        tasks: tasks.iter().map(wire::TaskSummary::of).collect(),
    }))
}

/// `GET /api/tasks/{id}`: the task, its payload and every run.
pub async fn show(State(app): Shared, Path(task_id): Path<String>) -> ApiResult<Json<wire::Task>> {
    let record = task(&app, &task_id)?;
    let live = app.scheduler.live_vm(&task_id);
    let console = live.as_ref().is_some_and(|live| live.has_display);
    Ok(Json(wire::Task {
        resolution: record.latest_run().and_then(|run| run.resolution.clone()),
        links: wire::Links::of(&task_id),
        console,
        shell: live.is_some(),
        task_id: record.task_id,
        state: record.state,
        created: record.created,
        payload: record.payload,
        runs: record.runs,
    }))
}

/// `POST /api/tasks/{id}/cancel`.
pub async fn cancel(State(app): Shared, Path(task_id): Path<String>) -> ApiResult<Response> {
    valid_id(&task_id)?;
    let (status, state, message) = match app.scheduler.cancel(&task_id)? {
        Cancel::Dequeued => (
            StatusCode::OK,
            TaskState::Exception,
            "canceled before it started",
        ),
        Cancel::Stopping => (
            StatusCode::ACCEPTED,
            TaskState::Running,
            "the VM is being stopped; the task resolves exception/canceled",
        ),
        Cancel::AlreadyResolved => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "the task is resolved already",
            ))
        }
        Cancel::Unknown => return Err(ApiError::not_found("task")),
    };
    Ok((
        status,
        Json(wire::Canceled {
            task_id,
            state,
            message: message.to_owned(),
        }),
    )
        .into_response())
}

/// `GET /api/openapi.json`.
pub async fn openapi() -> Json<Value> {
    Json(super::openapi::document())
}

/// Any other path under `/api`.
pub async fn no_route() -> ApiError {
    ApiError::not_found("API route")
}
