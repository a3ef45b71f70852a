//! A `taskvm serve` as the tests run it: on 127.0.0.1 with its own state, its API called
//! with a blocking client; the tools the UI tests need.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::taskvm_command;
use serde_json::{json, Value};
use testkit::guest::{config_allowing_test_images, minimal_image};
use testkit::process::{file_url, root_scratch, shared_cache, Spawned};

/// A `taskvm serve` on 127.0.0.1 with its own state directory.
pub struct Server {
    pub process: Spawned,
    pub base: String,
    pub state: PathBuf,
    pub http: reqwest::blocking::Client,
}

/// A test's scratch directory (reachable by QEMU's sandbox user).
pub fn scratch() -> tempfile::TempDir {
    root_scratch(
        "taskvm serve runs VMs: tests need root (network namespaces, taps, the sandbox user)",
    )
}

impl Server {
    pub fn start(state: &Path, extra: &[&str]) -> Server {
        Server::start_configured(state, &config_allowing_test_images(""), extra)
    }

    /// A server with the configuration file `config` (JSON).
    pub fn start_configured(state: &Path, config: &str, extra: &[&str]) -> Server {
        let path = state.with_extension("json");
        std::fs::write(&path, config).unwrap();
        let path = path.to_string_lossy().into_owned();
        let mut args = vec!["--config", path.as_str()];
        args.extend_from_slice(extra);
        Server::start_with(taskvm_command(&[]), state, &args)
    }

    pub fn start_with(mut command: Command, state: &Path, extra: &[&str]) -> Server {
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--accel",
                "tcg",
                "--start",
                "boot",
            ])
            .arg("--state")
            .arg(state)
            .arg("--cache")
            .arg(shared_cache())
            .args(extra);
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let process = Spawned::spawn(&mut command, move |line| {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let _ = address_tx.send(rest.trim_end_matches('/').to_owned());
            }
        });
        let base = address_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("serve did not start: {:?}", process.lines()));
        Server {
            process,
            base,
            state: state.to_owned(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().unwrap();
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    pub fn get_bytes(&self, path: &str) -> (u16, Vec<u8>) {
        let response = self.http.get(self.url(path)).send().unwrap();
        let status = response.status().as_u16();
        (status, response.bytes().unwrap().to_vec())
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    pub fn submit(&self, payload: &Value) -> String {
        let (status, body) = self.post("/api/tasks", payload);
        assert_eq!(status, 201, "{body}");
        body["taskId"].as_str().unwrap().to_owned()
    }

    pub fn task(&self, task_id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/tasks/{task_id}"));
        assert_eq!(status, 200, "{body}");
        body
    }

    pub fn wait_for(
        &self,
        task_id: &str,
        patience: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + patience;
        loop {
            let task = self.task(task_id);
            if done(&task) {
                return task;
            }
            assert!(
                Instant::now() < deadline,
                "task {task_id} never got there: {task:#}\nserver: {:#?}",
                self.process.lines()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_resolved(&self, task_id: &str) -> Value {
        self.wait_for(task_id, Duration::from_secs(180), |task| {
            !matches!(task["state"].as_str(), Some("queued" | "running"))
        })
    }

    /// The log text of the newest run so far (what the log file holds now).
    pub fn log_now(&self, task_id: &str) -> String {
        let task = self.task(task_id);
        let Some(run) = task["runs"].as_array().and_then(|runs| runs.last()) else {
            return String::new();
        };
        let path = self
            .state
            .join("serve/tasks")
            .join(task_id)
            .join(run["runId"].to_string())
            .join("live.log");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    pub fn wait_log(&self, task_id: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.log_now(task_id).contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} never appeared in the log of {task_id}: {}",
                self.log_now(task_id)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the log of one of `tasks` shows `text`; returns that one, then the other.
    pub fn wait_first_log(&self, tasks: [String; 2], text: &str) -> (String, String) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let [one, other] = &tasks;
            if self.log_now(one).contains(text) {
                return (one.clone(), other.clone());
            }
            if self.log_now(other).contains(text) {
                return (other.clone(), one.clone());
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} never appeared in the logs of {tasks:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn said(&self, text: &str) -> bool {
        self.process.said(text)
    }

    /// SIGTERM, then the exit status and how long it took.
    pub fn terminate(mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        self.process.signal(rustix::process::Signal::TERM);
        let status = self.process.wait_exit(Duration::from_secs(60));
        (status, started.elapsed())
    }

    /// kill -9, as a crash.
    pub fn crash(mut self) {
        self.process.signal(rustix::process::Signal::KILL);
        self.process.wait_exit(Duration::from_secs(10));
    }
}

pub fn minimal() -> String {
    file_url(minimal_image())
}

/// A payload running `script` on the minimal image.
pub fn script_task(script: &str, max_run_time: u32) -> Value {
    json!({ "image": minimal(), "command": ["sh", "-c", script], "maxRunTime": max_run_time })
}

pub fn write_payload(dir: &Path, name: &str, payload: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, payload.to_string()).unwrap();
    path
}

pub fn submit_cli(server: &Server, payload: &Path, follow: bool) -> Output {
    let mut command = taskvm_command(&[]);
    command
        .arg("submit")
        .arg(payload)
        .arg("--server")
        .arg(&server.base);
    if follow {
        command.arg("--follow");
    }
    command.output().unwrap()
}

/// The test tools `make test` installs (`scripts/test-tools.sh`).
pub fn test_tool(relative: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    assert!(
        path.exists(),
        "{} is missing: run `make test-tools` (make test does)",
        path.display()
    );
    path
}

/// Drives a shell button of a page of `server` in headless Chromium (`cli/tests/ui/shell.mjs`):
/// opens `page`, clicks `button`, types `command` and waits for `answer` in the terminal; the
/// findings, judged here: connected, answered, no page error.
pub fn browse_shell(server: &Server, page: &str, button: &str, command: &str, answer: &str) {
    let script = test_tool("cli/tests/ui/shell.mjs");
    test_tool("cli/tests/ui/node_modules/playwright-core");
    test_tool("serve/ui/terminal/node_modules/@xterm/xterm/lib/xterm.mjs");
    let output = Command::new("node")
        .arg(&script)
        .arg(&server.base)
        .args([page, button, command, answer])
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let findings: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|_| panic!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr)));
    assert!(
        findings.get("error").is_none(),
        "{}\n{}",
        findings["error"],
        findings["screen"]
    );
    assert_eq!(findings["connected"], true);
    assert_eq!(findings["answered"], true, "{}", findings["screen"]);
    assert_eq!(findings["problems"], json!([]), "page errors");
}
