//! `GET /api/health` and the Prometheus text at `/metrics`.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{ApiResult, Shared};
use crate::store::TaskState;
use crate::wire::{Capacity, Health};

/// `GET /api/health`.
pub async fn health(State(app): Shared) -> ApiResult<Json<Health>> {
    let counts = app.scheduler.store().counts()?;
    let capacity = app.scheduler.capacity();
    Ok(Json(Health {
        status: "ok".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        queued: count_of(&counts, TaskState::Queued),
        running: app.scheduler.running_count(),
        paused: app.scheduler.paused(),
        concurrency: app.scheduler.concurrency(),
        capacity: Capacity {
            total: capacity.total(),
            used: capacity.used(),
        },
        console: app.novnc_dir.is_some(),
        terminal: app.xterm_dir.is_some(),
        warm_pool_ready: app.scheduler.host().pool.ready(),
    }))
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
    let mut out = crate::metrics::Exposition::default();
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
