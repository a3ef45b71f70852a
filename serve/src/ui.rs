//! The web UI: two plain pages (the task list with a submit form, and a task's page with its
//! live log, screenshot, artifacts, cancel button, console and shell) built into the binary,
//! and the files of noVNC (the console) and xterm.js (the shell's terminal) served from their
//! directories.

use std::path::{Component, Path as FsPath};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::api::{ApiError, App};

/// The UI's routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(|| async { page(INDEX) }))
        .route("/tasks/{task_id}", get(|| async { task_page() }))
        .route("/ui/{file}", get(asset))
        .route("/novnc/{*path}", get(novnc))
        .route("/xterm/{*path}", get(xterm))
}

const INDEX: &str = include_str!("../ui/index.html");
const TASK: &str = include_str!("../ui/task.html");

fn page(html: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; style-src 'self'; \
                 frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        html,
    )
        .into_response()
}

/// The task page's policy: xterm.js sets its terminal's styles in a `<style>` element of its
/// own, so styles (never scripts) may be inline there.
fn task_page() -> Response {
    let mut response = page(TASK);
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; \
             style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    response
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "style.css" => (include_str!("../ui/style.css"), "text/css; charset=utf-8"),
        "common.js" => (
            include_str!("../ui/common.js"),
            "text/javascript; charset=utf-8",
        ),
        "index.js" => (
            include_str!("../ui/index.js"),
            "text/javascript; charset=utf-8",
        ),
        "task.js" => (
            include_str!("../ui/task.js"),
            "text/javascript; charset=utf-8",
        ),
        "terminal.js" => (
            include_str!("../ui/terminal.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return ApiError::new(StatusCode::NOT_FOUND, "no such file").into_response(),
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// A file of noVNC.
async fn novnc(State(app): State<Arc<App>>, Path(path): Path<String>) -> Response {
    match &app.novnc_dir {
        Some(dir) => library_file(dir, &path).await,
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "noVNC is not installed (make deps installs Debian's novnc; or pass --novnc DIR)",
        )
        .into_response(),
    }
}

/// A file of xterm.js's package.
async fn xterm(State(app): State<Arc<App>>, Path(path): Path<String>) -> Response {
    match &app.xterm_dir {
        Some(dir) => library_file(dir, &path).await,
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "xterm.js is not installed (make deps installs it; or pass --xterm DIR)",
        )
        .into_response(),
    }
}

/// A file of a library's directory: plain relative names only (no `..`, no hidden files) of
/// the kinds a page loads.
async fn library_file(dir: &FsPath, path: &str) -> Response {
    let relative = FsPath::new(path);
    let plain = relative.components().all(|component| match component {
        Component::Normal(name) => !name.to_string_lossy().starts_with('.'),
        _ => false,
    });
    let content_type = match relative
        .extension()
        .and_then(|extension| extension.to_str())
    {
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => "",
    };
    if !plain || content_type.is_empty() {
        return ApiError::new(StatusCode::NOT_FOUND, "no such file").into_response();
    }
    match tokio::fs::read(dir.join(relative)).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "max-age=3600"),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => ApiError::new(StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}
