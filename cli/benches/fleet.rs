//! `make bench`: `taskvm worker --capacity 2` on the local Taskcluster deployment (`make bench`
//! brings it up) against `taskvm run` of the same payloads, two at a time, in one run:
//! tasks per minute each, and the queue's added time per task (claim → resolution as the queue
//! records it, minus the lifecycle's own time in the log). `TASKVM_BENCH_FLEET_TASKS` sets the
//! number of tasks (default 20). Needs root and the deployment's env file.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use taskcluster_provider::client::{Credentials, Service};
use testkit::guest::minimal_image;
use testkit::stats::median;

const TASKVM: &str = env!("CARGO_BIN_EXE_taskvm");

fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("fleet benchmark skipped: taskvm needs root");
        return;
    }
    let env_file = std::env::var("TC_LOCAL_ENV").unwrap_or_else(|_| "/tmp/tc-local/env.sh".into());
    let Ok(text) = std::fs::read_to_string(&env_file) else {
        println!("fleet benchmark skipped: {env_file} is missing (run it through scripts/with-tc-local.sh)");
        return;
    };
    let var = |name: &str| {
        text.lines()
            .filter_map(|line| line.strip_prefix("export ").unwrap_or(line).split_once('='))
            .find(|(key, _)| key.trim() == name)
            .map(|(_, value)| value.trim().trim_matches(['"', '\'']).to_owned())
            .unwrap_or_else(|| panic!("{name} is not in {env_file}"))
    };
    let root_url = var("TASKCLUSTER_ROOT_URL");
    let tasks: usize = std::env::var("TASKVM_BENCH_FLEET_TASKS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20);
    let scratch = testkit::process::root_scratch("VMs need root");
    let state = scratch.path().join("state");
    let cache = scratch.path().join("cache");
    let image = minimal_image().canonicalize().expect("image");
    let payload = json!({
        "image": format!("file://{}", image.display()),
        "command": ["echo", "first output"],
        "maxRunTime": 60
    });
    let payload_file = scratch.path().join("task.json");
    std::fs::write(&payload_file, payload.to_string()).expect("payload");
    println!("fleet benchmark: {tasks} tasks, capacity 2, TCG, minimal image, `echo first output`");

    let run_once = |state: &PathBuf| {
        let status = Command::new(TASKVM)
            .arg("run")
            .arg(&payload_file)
            .arg("--state")
            .arg(state)
            .arg("--cache")
            .arg(&cache)
            .args(["--accel", "tcg"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("taskvm run");
        assert!(status.success());
    };
    run_once(&state); // fills the cache, makes the snapshot
    let started = Instant::now();
    std::thread::scope(|scope| {
        for half in 0..2 {
            let count = tasks / 2 + usize::from(half < tasks % 2);
            let state = &state;
            scope.spawn(move || (0..count).for_each(|_| run_once(state)));
        }
    });
    let run_wall = started.elapsed();

    let credentials = Credentials::new(
        var("TC_LOCAL_ADMIN_CLIENT_ID"),
        var("TC_LOCAL_ADMIN_ACCESS_TOKEN"),
    );
    let admin = Service::new(
        &root_url,
        "queue",
        Some(&credentials),
        Duration::from_secs(60),
    )
    .expect("queue");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let task_queue_id = format!("proj-taskvm/bench-{}", std::process::id());
    // The tasks are queued first and the clock starts when the worker is ready to claim, as
    // the two `taskvm run`s start with their tasks at hand.
    let ids: Vec<String> = (0..tasks)
        .map(|_| {
            let task_id = slugid::nice();
            let now = chrono::Utc::now();
            let definition = json!({
                "taskQueueId": task_queue_id, "schedulerId": "taskvm-bench", "taskGroupId": task_id,
                "created": now.to_rfc3339(), "deadline": (now + chrono::Duration::hours(1)).to_rfc3339(),
                "expires": (now + chrono::Duration::days(1)).to_rfc3339(), "payload": payload,
                "metadata": { "name": "bench", "description": "bench", "owner": "taskvm@example.com", "source": "http://localhost/" }
            });
            runtime
                .block_on(admin.call(Method::PUT, &["task", &task_id], Some(&definition)))
                .expect("createTask");
            task_id
        })
        .collect();
    let mut worker = Command::new(TASKVM)
        .arg("worker")
        .args([
            "--task-queue-id",
            &task_queue_id,
            "--worker-group",
            "local",
            "--worker-id",
            "bench",
        ])
        .arg("--config")
        .arg({
            let config = state.with_extension("json");
            std::fs::write(&config, testkit::guest::config_allowing_test_images(""))
                .expect("write config");
            config
        })
        .args(["--capacity", "2", "--accel", "tcg", "--state"])
        .arg(&state)
        .arg("--cache")
        .arg(&cache)
        .env("TASKCLUSTER_ROOT_URL", &root_url)
        .env("TASKCLUSTER_CLIENT_ID", var("TC_LOCAL_WORKER_CLIENT_ID"))
        .env(
            "TASKCLUSTER_ACCESS_TOKEN",
            var("TC_LOCAL_WORKER_ACCESS_TOKEN"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("taskvm worker");
    let mut said = std::io::BufReader::new(worker.stderr.take().expect("stderr"));
    loop {
        let mut line = String::new();
        let read = std::io::BufRead::read_line(&mut said, &mut line).expect("worker output");
        assert!(read > 0, "the worker ended before claiming");
        if line.contains("claiming from") {
            break;
        }
    }
    let started = chrono::Utc::now();
    // The worker says when it has resolved each run: waiting for those lines puts no load on
    // the queue while it works (polling every task's status would, on the same two cores).
    let mut resolved = 0;
    while resolved < ids.len() {
        let mut line = String::new();
        let read = std::io::BufRead::read_line(&mut said, &mut line).expect("worker output");
        assert!(read > 0, "the worker ended before resolving every task");
        if line.contains(" run 0 resolved ") {
            resolved += 1;
        }
    }
    // The rest of its output is drained so that it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut said, &mut std::io::sink()));
    let mut statuses = Vec::new();
    for id in &ids {
        let status: Value = runtime
            .block_on(admin.call(Method::GET, &["task", id, "status"], None))
            .expect("status")["status"]
            .clone();
        assert_eq!(status["state"], "completed", "task {id}: {status}");
        statuses.push(status);
    }
    // From the worker's readiness to the last resolution the queue recorded.
    let last_resolved = statuses
        .iter()
        .filter_map(|status| status["runs"][0]["resolved"].as_str())
        .filter_map(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
        .max()
        .expect("resolutions");
    let fleet_wall = (last_resolved.with_timezone(&chrono::Utc) - started)
        .to_std()
        .unwrap_or_default();
    let _ = Command::new("kill").arg(worker.id().to_string()).status();
    let _ = worker.wait();

    // The queue's view of each run (started → resolved) against the lifecycle's own total.
    let mut added = Vec::new();
    for (id, status) in ids.iter().zip(&statuses) {
        let run = &status["runs"][0];
        let time = |field: &str| {
            chrono::DateTime::parse_from_rfc3339(run[field].as_str().expect("time"))
                .expect("rfc3339")
        };
        let queue_seconds = (time("resolved") - time("started")).num_milliseconds() as f64 / 1000.0;
        let url = format!(
            "{root_url}/api/queue/v1/task/{id}/runs/0/artifacts/public/logs/live_backing.log"
        );
        let log = reqwest::blocking::get(url)
            .and_then(|r| r.text())
            .unwrap_or_default();
        let own = log
            .lines()
            .rev()
            .find_map(|line| line.split("resolved completed in ").nth(1))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|seconds| seconds.parse::<f64>().ok())
            .unwrap_or(0.0);
        added.push(Duration::from_secs_f64((queue_seconds - own).max(0.0)));
    }
    let per_minute = |wall: Duration| tasks as f64 * 60.0 / wall.as_secs_f64();
    println!(
        "throughput: taskvm run x2 {:.1} tasks/min ({:.2} s), taskvm worker --capacity 2 {:.1} \
         tasks/min ({:.2} s, ready to claim to last resolution) -> {:.2}x",
        per_minute(run_wall),
        run_wall.as_secs_f64(),
        per_minute(fleet_wall),
        fleet_wall.as_secs_f64(),
        run_wall.as_secs_f64() / fleet_wall.as_secs_f64()
    );
    println!(
        "queue's added time per task (claim -> resolution minus the lifecycle's own time: \
         uploads, report): median {:.0} ms",
        median(&added).as_secs_f64() * 1000.0
    );
}
