//! The local Taskcluster deployment as the worker tests see it: its clients, tasks made
//! with the admin client, their status and artifacts, and a running `taskvm worker`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::taskvm_command;

use reqwest::Method;
use serde_json::{json, Value};
use taskcluster_provider::client::{Credentials, Service};
use testkit::guest::minimal_image;
use testkit::process::{file_url, root_scratch, shared_cache, Spawned};

/// The deployment `tc-local up` started: its env file, or the variables already set.
pub struct Deployment {
    pub root_url: String,
    pub vars: BTreeMap<String, String>,
}

impl Deployment {
    pub fn get() -> Deployment {
        let file = std::env::var("TC_LOCAL_ENV").unwrap_or_else(|_| "/tmp/tc-local/env.sh".into());
        let text = std::fs::read_to_string(&file).unwrap_or_else(|error| {
            panic!(
                "{file}: {error} — the local Taskcluster deployment is not up; `make test` brings \
                 it up (../shared/taskcluster/tc-local up)"
            )
        });
        let vars: BTreeMap<String, String> = text
            .lines()
            .filter_map(|line| line.strip_prefix("export ").unwrap_or(line).split_once('='))
            .map(|(key, value)| {
                (
                    key.trim().to_owned(),
                    value.trim().trim_matches(['"', '\'']).to_owned(),
                )
            })
            .collect();
        Deployment {
            root_url: vars["TASKCLUSTER_ROOT_URL"].clone(),
            vars,
        }
    }

    pub fn admin(&self) -> Service {
        self.admin_of("queue")
    }

    /// The admin client of `service` (`queue`, `auth`, `worker-manager`).
    pub fn admin_of(&self, service: &str) -> Service {
        let credentials = Credentials::new(
            self.vars["TC_LOCAL_ADMIN_CLIENT_ID"].clone(),
            self.vars["TC_LOCAL_ADMIN_ACCESS_TOKEN"].clone(),
        );
        Service::new(
            &self.root_url,
            service,
            Some(&credentials),
            Duration::from_secs(60),
        )
        .unwrap()
    }

    /// An admin call; panics on a refusal.
    pub fn call(
        &self,
        service: &str,
        method: Method,
        path: &[&str],
        body: Option<&Value>,
    ) -> Value {
        runtime()
            .block_on(self.admin_of(service).call(method.clone(), path, body))
            .unwrap_or_else(|error| panic!("{service} {method} {path:?}: {error}"))
    }
}

/// A task queue of this test's own, so that tests running at once never take each other's tasks.
pub fn own_queue(name: &str) -> String {
    format!("proj-taskvm/{name}-{}", std::process::id())
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn slug() -> String {
    slugid::nice()
}

pub fn create_task(deployment: &Deployment, task_queue_id: &str, payload: Value) -> String {
    create_task_with_scopes(deployment, task_queue_id, payload, &[])
}

pub fn create_task_with_scopes(
    deployment: &Deployment,
    task_queue_id: &str,
    payload: Value,
    scopes: &[&str],
) -> String {
    let task_id = slug();
    let now = chrono::Utc::now();
    let definition = json!({
        "taskQueueId": task_queue_id,
        "schedulerId": "taskvm-tests",
        "taskGroupId": task_id,
        "created": now.to_rfc3339(),
        "deadline": (now + chrono::Duration::hours(1)).to_rfc3339(),
        "expires": (now + chrono::Duration::days(1)).to_rfc3339(),
        "retries": 2,
        "payload": payload,
        "scopes": scopes,
        "metadata": {
            "name": "taskvm test", "description": "a worker test", "owner": "taskvm@example.com",
            "source": "http://localhost/taskvm"
        }
    });
    runtime()
        .block_on(
            deployment
                .admin()
                .call(Method::PUT, &["task", &task_id], Some(&definition)),
        )
        .unwrap_or_else(|error| panic!("createTask: {error}"));
    task_id
}

pub fn status(deployment: &Deployment, task_id: &str) -> Value {
    runtime()
        .block_on(
            deployment
                .admin()
                .call(Method::GET, &["task", task_id, "status"], None),
        )
        .unwrap_or_else(|error| panic!("status: {error}"))["status"]
        .clone()
}

/// Waits for the task's state to be resolved (`completed`, `failed` or `exception`).
pub fn wait_resolved(deployment: &Deployment, task_id: &str, patience: Duration) -> Value {
    let deadline = Instant::now() + patience;
    loop {
        let status = status(deployment, task_id);
        if matches!(
            status["state"].as_str(),
            Some("completed" | "failed" | "exception")
        ) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "task {task_id} never resolved: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A public artifact's bytes, as anyone reads it (following the redirect to storage).
pub fn artifact(deployment: &Deployment, task_id: &str, run: u64, name: &str) -> (u16, Vec<u8>) {
    let url = format!(
        "{}/api/queue/v1/task/{task_id}/runs/{run}/artifacts/{name}",
        deployment.root_url
    );
    let response = reqwest::blocking::get(url).unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().unwrap().to_vec())
}

pub fn artifact_names(deployment: &Deployment, task_id: &str, run: u64) -> Vec<String> {
    let listed = runtime()
        .block_on(deployment.admin().call(
            Method::GET,
            &["task", task_id, "runs", &run.to_string(), "artifacts"],
            None,
        ))
        .unwrap();
    listed["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|artifact| artifact["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A running `taskvm worker`.
pub struct Worker {
    pub process: Spawned,
    pub state: PathBuf,
}

impl Worker {
    pub fn start(
        deployment: &Deployment,
        task_queue_id: &str,
        state: &Path,
        extra: &[&str],
    ) -> Worker {
        let mut command = worker_command(deployment, state, extra);
        command
            .args(["--task-queue-id", task_queue_id, "--worker-group", "local"])
            .args(["--worker-id", state.file_name().unwrap().to_str().unwrap()])
            .env(
                "TASKCLUSTER_CLIENT_ID",
                &deployment.vars["TC_LOCAL_WORKER_CLIENT_ID"],
            )
            .env(
                "TASKCLUSTER_ACCESS_TOKEN",
                &deployment.vars["TC_LOCAL_WORKER_ACCESS_TOKEN"],
            );
        Worker {
            process: Spawned::spawn(&mut command, |_| {}),
            state: state.to_owned(),
        }
    }

    /// A worker of worker-manager pool `pool`, group `local`, id the state directory's name,
    /// registering with `secret` and holding no client credentials.
    pub fn start_in_pool(
        deployment: &Deployment,
        pool: &str,
        state: &Path,
        secret: &str,
        extra: &[&str],
    ) -> Worker {
        let mut command = worker_command(deployment, state, extra);
        command
            .args(["--worker-pool-id", pool, "--worker-group", "local"])
            .args(["--worker-id", state.file_name().unwrap().to_str().unwrap()])
            .env("TASKVM_STATIC_SECRET", secret)
            .env_remove("TASKCLUSTER_CLIENT_ID")
            .env_remove("TASKCLUSTER_ACCESS_TOKEN");
        Worker {
            process: Spawned::spawn(&mut command, |_| {}),
            state: state.to_owned(),
        }
    }

    pub fn said(&self, text: &str) -> bool {
        self.process.said(text)
    }

    pub fn wait_said(&self, text: &str, patience: Duration) {
        self.process.wait_said(text, patience);
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        self.process.signal(signal);
    }

    pub fn wait_exit(&mut self, patience: Duration) -> std::process::ExitStatus {
        self.process.wait_exit(patience)
    }
}

/// `taskvm worker` with the test configuration, state directory, shared cache and `extra`.
fn worker_command(deployment: &Deployment, state: &Path, extra: &[&str]) -> std::process::Command {
    let config = state.with_extension("json");
    std::fs::write(
        &config,
        testkit::guest::config_allowing_test_images(r#""start": "boot""#),
    )
    .unwrap();
    let mut command = taskvm_command(&[]);
    command
        .arg("worker")
        .args(["--accel", "tcg", "--config"])
        .arg(&config)
        .arg("--state")
        .arg(state)
        .arg("--cache")
        .arg(shared_cache())
        .args(extra)
        .env("TASKCLUSTER_ROOT_URL", &deployment.root_url)
        .env_remove("TASKCLUSTER_CERTIFICATE");
    command
}

pub fn scratch() -> tempfile::TempDir {
    root_scratch("the worker runs VMs: tests need root")
}

pub fn script(text: &str, max_run_time: u32) -> Value {
    json!({ "image": file_url(minimal_image()), "command": ["sh", "-c", text], "maxRunTime": max_run_time })
}
