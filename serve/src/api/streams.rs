//! The API's streams and files: a run's log followed while it runs, its artifacts, the
//! screenshot of a running VM and its console (VNC over a WebSocket).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio::io::AsyncReadExt;

use super::{chosen_run, task, ApiError, ApiResult, App, Shared};

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
        activity: app.scheduler.activity(),
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

/// The longest a log follower waits without being told of anything before it looks again.
const SAFETY_NET: Duration = Duration::from_secs(2);

/// Follows one run's `live.log` like `tail -f`, to the end of the run, reading on when the
/// scheduler says a run started or ended or a log grew.
struct Tail {
    app: Arc<App>,
    task_id: String,
    run_id: Option<u32>,
    /// The first run a follower without a run may take (the one after those it printed).
    next_run: u32,
    fixed_run: bool,
    file: Option<tokio::fs::File>,
    draining: bool,
    /// Runs starting and ending, logs growing: waited on between reads.
    activity: tokio::sync::watch::Receiver<u64>,
}

impl Tail {
    /// Waits until the scheduler says something happened (a run started or ended, a log
    /// grew) since the last look; the timeout is a safety net, not the pace.
    async fn wait_for_activity(&mut self) {
        let _ = tokio::time::timeout(SAFETY_NET, self.activity.changed()).await;
    }

    async fn next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            // Seen now: whatever happens from here on ends the next wait at once.
            self.activity.borrow_and_update();
            let scheduler = &self.app.scheduler;
            let Some(run_id) = self.run_id else {
                // Queued: wait for the first run (or the end, for a task canceled meanwhile).
                let record = scheduler.store().get(&self.task_id).ok()??;
                let next = record.runs.iter().find(|run| run.run_id >= self.next_run);
                match next {
                    Some(run) => self.run_id = Some(run.run_id),
                    // A paused server starts nothing: there is no log to wait for.
                    None if record.state.is_resolved() || scheduler.paused() => return None,
                    None => self.wait_for_activity().await,
                }
                continue;
            };
            let running = scheduler.is_running(&self.task_id, run_id);
            let Some(file) = &mut self.file else {
                let path = scheduler.run_dir(&self.task_id, run_id).join("live.log");
                match tokio::fs::File::open(&path).await {
                    Ok(file) => self.file = Some(file),
                    Err(_) if running => self.wait_for_activity().await,
                    Err(_) => return self.next_run_or_end(run_id),
                }
                continue;
            };
            let mut buffer = vec![0u8; 64 * 1024];
            match file.read(&mut buffer).await {
                Ok(0) if self.draining => return self.next_run_or_end(run_id),
                Ok(0) if !running => self.draining = true,
                Ok(0) => self.wait_for_activity().await,
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
        let image = engine::qemu::screenshot::capture(&live.vnc, Duration::from_secs(10))
            .await
            .map_err(|error| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no screenshot: {error}"),
                )
            })?;
        let png = engine::qemu::screenshot::encode_png(&image).map_err(|error| {
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
    let vnc = crate::console::connect(&live.vnc).await.map_err(|error| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the VM's VNC server: {error}"),
        )
    })?;
    Ok(upgrade
        .protocols(["binary"])
        .max_message_size(16 << 20)
        .on_upgrade(move |socket| crate::console::bridge(socket, vnc)))
}

/// Opens a login shell of `shells` on a terminal of the size `query` asks for
/// ([`crate::shell::terminal_size`]); 503 saying why when none opens.
pub(super) async fn open_shell(
    shells: &lifecycle::Shells,
    query: &HashMap<String, String>,
) -> ApiResult<lifecycle::ShellStream> {
    let (rows, cols) = crate::shell::terminal_size(query);
    shells.open(rows, cols).await.map_err(|error| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no shell: {error}"),
        )
    })
}

/// `GET /api/tasks/{id}/shell[?rows=R&cols=C]`: a websocket to a new login shell in the
/// running VM (see [`crate::shell`]); the terminal starts at R × C (default 24 × 80).
pub async fn shell(
    State(app): Shared,
    Path(task_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    task(&app, &task_id)?;
    let live = app
        .scheduler
        .live_vm(&task_id)
        .ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "the task has no running VM"))?;
    let upgrade = upgrade.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "this is a websocket (a terminal: binary input, {\"rows\",\"cols\"} text to resize)",
        )
    })?;
    let shell = open_shell(&live.shells, &query).await?;
    Ok(upgrade
        .max_message_size(crate::shell::MAX_MESSAGE)
        .on_upgrade(move |socket| crate::shell::bridge(socket, shell)))
}
