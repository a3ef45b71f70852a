//! The HTTP API under `/api` (JSON; the OpenAPI document is `/api/openapi.json`) and the
//! Prometheus text at `/metrics`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use schemas::{limit_violation, parse_payload, resolve_machine, MachineLayers, Violation};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use super::scheduler::{Cancel, Scheduler};
use super::store::{RunRecord, StoreError, TaskRecord, TaskState};

/// What every handler shares.
pub struct App {
    /// The task runner (and through it the store).
    pub scheduler: Arc<Scheduler>,
    /// Where noVNC's files are (None: the console is unavailable).
    pub novnc_dir: Option<PathBuf>,
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
        super::say(&error.to_string());
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if !self.violations.is_empty() {
            body["violations"] = self
                .violations
                .iter()
                .map(|violation| json!({ "pointer": violation.pointer, "rule": violation.rule }))
                .collect();
        }
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

/// The summary of a task in lists and answers.
fn summary(record: &TaskRecord) -> Value {
    let latest = record.latest_run();
    json!({
        "taskId": record.task_id,
        "state": record.state,
        "created": record.created,
        "resolution": latest.and_then(|run| run.resolution.clone()),
        "runs": record.runs.len(),
        "image": record.payload.get("image"),
    })
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
        Json(json!({ "taskId": task_id, "state": TaskState::Queued, "links": links(&task_id) })),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

fn links(task_id: &str) -> Value {
    json!({
        "self": format!("/api/tasks/{task_id}"),
        "log": format!("/api/tasks/{task_id}/log"),
        "screenshot": format!("/api/tasks/{task_id}/screenshot"),
        "cancel": format!("/api/tasks/{task_id}/cancel"),
        "page": format!("/tasks/{task_id}"),
    })
}

/// `GET /api/tasks?state=S&limit=N`: newest first.
pub async fn list(
    State(app): Shared,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
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
    Ok(Json(
        json!({ "tasks": tasks.iter().map(summary).collect::<Vec<_>>() }),
    ))
}

/// `GET /api/tasks/{id}`: the task, its payload and every run.
pub async fn show(State(app): Shared, Path(task_id): Path<String>) -> ApiResult<Json<Value>> {
    let record = task(&app, &task_id)?;
    let mut body = serde_json::to_value(&record)
        .map_err(|error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    body["resolution"] = json!(record.latest_run().and_then(|run| run.resolution.clone()));
    body["links"] = links(&task_id);
    body["console"] = json!(app
        .scheduler
        .live_vm(&task_id)
        .is_some_and(|live| live.has_display));
    Ok(Json(body))
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
        Json(json!({ "taskId": task_id, "state": state, "message": message })),
    )
        .into_response())
}

/// `GET /api/tasks/{id}/log[?run=N]`: the run's log, streamed while the run goes on (a
/// queued task's stream waits for its first run).
pub async fn log(
    State(app): Shared,
    Path(task_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let record = task(&app, &task_id)?;
    let run_id = chosen_run(&record, &query)?.map(|run| run.run_id);
    let tail = Tail {
        app: app.clone(),
        task_id,
        run_id,
        next_run: 0,
        fixed_run: query.contains_key("run"),
        file: None,
        draining: false,
    };
    let stream = futures::stream::unfold(tail, |mut tail| async move {
        tail.next_chunk().await.map(|chunk| (chunk, tail))
    });
    Ok(text_stream(stream, "text/plain; charset=utf-8"))
}

fn text_stream(
    stream: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    content_type: &'static str,
) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Follows one run's `live.log` like `tail -f`, to the end of the run.
struct Tail {
    app: Arc<App>,
    task_id: String,
    run_id: Option<u32>,
    /// The first run a follower without a run may take (the one after those it printed).
    next_run: u32,
    fixed_run: bool,
    file: Option<tokio::fs::File>,
    draining: bool,
}

impl Tail {
    async fn next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
        let pause = Duration::from_millis(100);
        loop {
            let scheduler = &self.app.scheduler;
            let Some(run_id) = self.run_id else {
                // Queued: wait for the first run (or the end, for a task canceled meanwhile).
                let record = scheduler.store().get(&self.task_id).ok()??;
                let next = record.runs.iter().find(|run| run.run_id >= self.next_run);
                match next {
                    Some(run) => self.run_id = Some(run.run_id),
                    // A paused server starts nothing: there is no log to wait for.
                    None if record.state.is_resolved() || scheduler.paused() => return None,
                    None => tokio::time::sleep(pause * 2).await,
                }
                continue;
            };
            let running = scheduler.is_running(&self.task_id, run_id);
            let Some(file) = &mut self.file else {
                let path = scheduler.run_dir(&self.task_id, run_id).join("live.log");
                match tokio::fs::File::open(&path).await {
                    Ok(file) => self.file = Some(file),
                    Err(_) if running => tokio::time::sleep(pause).await,
                    Err(_) => return self.next_run_or_end(run_id),
                }
                continue;
            };
            let mut buffer = vec![0u8; 64 * 1024];
            match file.read(&mut buffer).await {
                Ok(0) if self.draining => return self.next_run_or_end(run_id),
                Ok(0) if !running => self.draining = true,
                Ok(0) => tokio::time::sleep(pause).await,
                Ok(read) => {
                    buffer.truncate(read);
                    return Some(Ok(Bytes::from(buffer)));
                }
                Err(error) => return Some(Err(error)),
            }
        }
    }

    /// After a run ends: a task queued again (a worker shutdown) goes on with its next run,
    /// unless the client asked for one run.
    fn next_run_or_end(&mut self, run_id: u32) -> Option<std::io::Result<Bytes>> {
        let record = self.app.scheduler.store().get(&self.task_id).ok()??;
        if self.fixed_run || record.state.is_resolved() {
            return None;
        }
        self.run_id = None;
        self.next_run = run_id + 1;
        self.file = None;
        self.draining = false;
        let note = format!("\n[taskvm] run {run_id} ended; the task was queued again\n");
        Some(Ok(Bytes::from(note)))
    }
}

/// `GET /api/tasks/{id}/artifacts/{name}[?run=N]`: one file of a resolved run. Only names
/// the run recorded are served.
pub async fn artifact(
    State(app): Shared,
    Path((task_id, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let record = task(&app, &task_id)?;
    let run = chosen_run(&record, &query)?.ok_or_else(|| ApiError::not_found("artifact"))?;
    if run.resolution.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "artifacts are listed when the run ends; follow /log meanwhile",
        ));
    }
    let file = run
        .artifacts
        .iter()
        .find(|file| file.name == name)
        .ok_or_else(|| ApiError::not_found("artifact"))?;
    let path = app.scheduler.run_dir(&task_id, run.run_id).join(&file.name);
    let opened = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::new(StatusCode::GONE, "the artifact's file is gone"))?;
    let stream = lifecycle::artifacts::file_chunks(opened);
    let mut response = text_stream(stream, lifecycle::artifacts::content_type(&file.name));
    if let Ok(length) = HeaderValue::from_str(&file.size.to_string()) {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, length);
    }
    Ok(response)
}

/// `GET /api/tasks/{id}/screenshot`: a fresh PNG of the running VM's screen, or the one
/// taken at the end of the run.
pub async fn screenshot(State(app): Shared, Path(task_id): Path<String>) -> ApiResult<Response> {
    let record = task(&app, &task_id)?;
    if let Some(live) = app.scheduler.live_vm(&task_id) {
        if !live.has_display {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "the machine has no display (graphics \"none\")",
            ));
        }
        let image = engine::screenshot::capture(&live.vnc, Duration::from_secs(10))
            .await
            .map_err(|error| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no screenshot: {error}"),
                )
            })?;
        let png = engine::screenshot::encode_png(&image).map_err(|error| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no screenshot: {error}"),
            )
        })?;
        return Ok(png_response(png));
    }
    let taken = record.runs.iter().rev().find(|run| {
        run.artifacts
            .iter()
            .any(|file| file.name == "screenshot.png")
    });
    let Some(run) = taken else {
        return Err(ApiError::not_found(
            "screenshot (the task has no running VM and kept none)",
        ));
    };
    let path = app
        .scheduler
        .run_dir(&task_id, run.run_id)
        .join("screenshot.png");
    let png = tokio::fs::read(path)
        .await
        .map_err(|_| ApiError::new(StatusCode::GONE, "the screenshot's file is gone"))?;
    Ok(png_response(png))
}

fn png_response(png: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        png,
    )
        .into_response()
}

/// `GET /api/tasks/{id}/console`: a websocket to the running VM's VNC server.
pub async fn console(
    State(app): Shared,
    Path(task_id): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    task(&app, &task_id)?;
    let live = app
        .scheduler
        .live_vm(&task_id)
        .filter(|live| live.has_display)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "the task has no running VM with a display",
            )
        })?;
    let upgrade = upgrade.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "this is a websocket (RFB for noVNC)",
        )
    })?;
    let vnc = super::console::connect(&live.vnc).await.map_err(|error| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the VM's VNC server: {error}"),
        )
    })?;
    Ok(upgrade
        .protocols(["binary"])
        .max_message_size(16 << 20)
        .on_upgrade(move |socket| super::console::bridge(socket, vnc)))
}

/// `GET /api/health`.
pub async fn health(State(app): Shared) -> ApiResult<Json<Value>> {
    let counts = app.scheduler.store().counts()?;
    let capacity = app.scheduler.capacity();
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "queued": count_of(&counts, TaskState::Queued),
        "running": app.scheduler.running_count(),
        "paused": app.scheduler.paused(),
        "concurrency": app.scheduler.concurrency(),
        "capacity": { "total": capacity.total(), "used": capacity.used() },
        "console": app.novnc_dir.is_some(),
    })))
}

/// The count of `state` in [`Store::counts`]'s answer.
fn count_of(counts: &[(TaskState, u64)], state: TaskState) -> u64 {
    counts
        .iter()
        .find(|(found, _)| *found == state)
        .map_or(0, |(_, count)| *count)
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(State(app): Shared) -> ApiResult<Response> {
    let store = app.scheduler.store();
    let counts = store.counts()?;
    let mut out = super::metrics::Exposition::default();
    out.family("taskvm_tasks", "gauge", "Tasks by state.");
    for (state, count) in &counts {
        out.sample(
            &format!("taskvm_tasks{{state=\"{}\"}}", state.as_str()),
            count,
        );
    }
    out.family("taskvm_tasks_queued", "gauge", "Tasks waiting to run.")
        .sample("taskvm_tasks_queued", count_of(&counts, TaskState::Queued));
    out.family(
        "taskvm_tasks_running",
        "gauge",
        "Tasks whose run is under way.",
    )
    .sample("taskvm_tasks_running", app.scheduler.running_count());
    out.family(
        "taskvm_runs_resolved_total",
        "counter",
        "Runs resolved, by resolution.",
    );
    for (resolution, count) in store.resolutions()? {
        out.sample(
            &format!("taskvm_runs_resolved_total{{resolution=\"{resolution}\"}}"),
            count,
        );
    }
    let totals = app.scheduler.totals();
    out.family(
        "taskvm_stage_seconds",
        "summary",
        "Time spent in each stage of a run, since the server started.",
    );
    for (stage, (seconds, count)) in &totals.stages {
        out.sample(
            &format!("taskvm_stage_seconds_sum{{stage=\"{stage}\"}}"),
            format!("{seconds:.6}"),
        )
        .sample(
            &format!("taskvm_stage_seconds_count{{stage=\"{stage}\"}}"),
            count,
        );
    }
    out.family(
        "taskvm_run_seconds",
        "summary",
        "Runs from start to resolution.",
    )
    .sample("taskvm_run_seconds_sum", format!("{:.6}", totals.total.0))
    .sample("taskvm_run_seconds_count", totals.total.1);
    let capacity = app.scheduler.capacity();
    out.family(
        "taskvm_capacity_memory_mib",
        "gauge",
        "Host memory for VMs.",
    )
    .sample(
        "taskvm_capacity_memory_mib{kind=\"total\"}",
        capacity.total().memory_mib,
    )
    .sample(
        "taskvm_capacity_memory_mib{kind=\"used\"}",
        capacity.used().memory_mib,
    );
    out.family("taskvm_capacity_cpus", "gauge", "Host vCPUs for VMs.")
        .sample(
            "taskvm_capacity_cpus{kind=\"total\"}",
            capacity.total().cpus,
        )
        .sample("taskvm_capacity_cpus{kind=\"used\"}", capacity.used().cpus);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out.into_text(),
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
