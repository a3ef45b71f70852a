//! The failed VMs this host keeps for debugging (`lifecycle::kept`): listed, and resumed — a
//! fresh copy per shell or script, holding host capacity like a task, discarded when the
//! shell or script ends or after `kept.resumeTime`. The kept VM itself never changes.

use std::collections::HashMap;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use lifecycle::kept::{resume, ExecError, KeptError, KeptStore, Resumed};
use schemas::protocol::EXEC_SCRIPT_LIMIT;

use super::{ApiError, ApiResult, App, Shared};
use crate::wire::{ExecAnswer, ExecRequest, KeptDeleted, KeptList, KeptVm};

/// `GET /api/kept`: the kept VMs (the limits applied first).
pub async fn list(State(app): Shared) -> ApiResult<Json<KeptList>> {
    let store = KeptStore::for_config(&app.scheduler.host().config);
    store.trim();
    let kept = store
        .list()
        .into_iter()
        .map(|vm| KeptVm {
            expires_at: store.expires_at(&vm.meta),
            name: vm.meta.name,
            task_id: vm.meta.task,
            size: vm.size,
            kept_at: vm.meta.kept_at,
            command: vm.meta.payload.command,
        })
        .collect();
    Ok(Json(KeptList { kept }))
}

/// `DELETE /api/kept/{name}`: deletes kept VM `name` with everything it held (copies running
/// now go on until they end).
pub async fn remove(State(app): Shared, Path(name): Path<String>) -> ApiResult<Json<KeptDeleted>> {
    if !crate::wire::is_kept_name(&name) {
        return Err(ApiError::not_found("kept VM"));
    }
    let store = KeptStore::for_config(&app.scheduler.host().config);
    match store.remove(&name) {
        Ok(()) => {
            tracing::info!("kept VM {name} deleted on request");
            Ok(Json(KeptDeleted { deleted: name }))
        }
        Err(KeptError::Unknown(_)) => Err(ApiError::not_found("kept VM")),
        Err(error) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{name} was not deleted: {error}"),
        )),
    }
}

/// Resumes a copy of kept VM `name`.
async fn resumed(app: &App, name: &str) -> ApiResult<Resumed> {
    if !crate::wire::is_kept_name(name) {
        return Err(ApiError::not_found("kept VM"));
    }
    let host = app.scheduler.host();
    resume(host, name, Some(app.scheduler.capacity()))
        .await
        .map_err(|error| match error {
            KeptError::Unknown(_) => ApiError::not_found("kept VM"),
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{name} cannot be resumed: {other}"),
            ),
        })
}

/// `GET /api/kept/{name}/shell[?rows=R&cols=C]`: a websocket to a shell in a fresh copy of
/// kept VM `name` (a terminal of R × C, default 24 × 80), discarded when the shell ends or
/// `kept.resumeTime` is over.
pub async fn shell(
    State(app): Shared,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let upgrade = upgrade.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "this is a websocket (a terminal, as /api/tasks/{id}/shell)",
        )
    })?;
    let resumed = resumed(&app, &name).await?;
    let shell = super::streams::open_shell(&resumed.shells(), &query).await?;
    Ok(upgrade
        .max_message_size(crate::shell::MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            let until = resumed.until;
            tokio::select! {
                () = crate::shell::bridge(socket, shell) => {}
                () = tokio::time::sleep_until(until) => {}
            }
            drop(resumed);
        }))
}

/// `POST /api/kept/{name}/exec` `{"script"}`: runs the script in a fresh copy of kept VM
/// `name` and answers how it ended; the copy is discarded.
pub async fn exec(
    State(app): Shared,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<ExecAnswer>> {
    let request: ExecRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("not a script ({{\"script\": \"…\"}}): {error}"),
        )
    })?;
    if request.script.len() > EXEC_SCRIPT_LIMIT {
        let error = ExecError::TooLong(request.script.len());
        return Err(ApiError::new(StatusCode::BAD_REQUEST, error.to_string()));
    }
    let resumed = resumed(&app, &name).await?;
    let result = resumed.exec(&request.script).await.map_err(|error| {
        let status = match error {
            ExecError::TimeUp => StatusCode::GATEWAY_TIMEOUT,
            ExecError::TooLong(_) => StatusCode::BAD_REQUEST,
            ExecError::Unanswered | ExecError::Unreadable => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, error.to_string())
    })?;
    drop(resumed);
    Ok(Json(ExecAnswer {
        exit_code: result.exit_code,
        output: result.output,
        truncated: result.truncated,
    }))
}
