//! An interactive task on Taskcluster: the worker publishes its shell's URL as a private
//! artifact, `taskvm shell --url` works in the running VM, and the URL dies with the task.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use taskcluster_provider::client::Service;

use crate::common::taskvm_command;
use crate::deployment::*;

/// Run 0's `private/taskvm/shell.json` of `task_id`, read with `admin`'s credentials.
fn shell_artifact(admin: &Service, task_id: &str) -> Result<Value, impl std::fmt::Display> {
    runtime().block_on(admin.call(
        Method::GET,
        &[
            "task",
            task_id,
            "runs",
            "0",
            "artifacts",
            "private/taskvm/shell.json",
        ],
        None,
    ))
}

/// `taskvm shell --url URL` with `keys` on its standard input.
fn shell(url: &str, keys: &str) -> std::process::Output {
    let mut command = taskvm_command(&["shell", "--url", url]);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(keys.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn an_interactive_task_publishes_a_shell_that_works_in_its_vm_until_it_ends() {
    let deployment = Deployment::get();
    let dir = scratch();
    let queue_id = own_queue("interactive");
    let mut payload = script(
        "echo hello > /tmp/state.txt; echo shell-ready; \
         while [ ! -e /tmp/done ]; do sleep 1; done; echo released",
        150,
    );
    payload["interactive"] = Value::Bool(true);
    let task_id = create_task(&deployment, &queue_id, payload);
    let mut worker = Worker::start(
        &deployment,
        &queue_id,
        &dir.path().join("w"),
        &["--livelog-listen", "127.0.0.1:0"],
    );
    let admin = deployment.admin();
    let deadline = Instant::now() + Duration::from_secs(240);
    let url = loop {
        let found = shell_artifact(&admin, &task_id);
        if let Ok(found) = found {
            break found["url"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no shell artifact");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        url.starts_with("ws://127.0.0.1:") && url.contains("/shell/"),
        "{url}"
    );
    // Private: the public, unauthenticated read is refused.
    let (code, _) = artifact(&deployment, &task_id, 0, "private/taskvm/shell.json");
    assert_eq!(code, 403);

    // The shell opens once the VM runs; until then the worker says it is not running yet.
    let deadline = Instant::now() + Duration::from_secs(240);
    let output = loop {
        let output = shell(&url, "cat /tmp/state.txt; echo $((6*7)); touch /tmp/done\n");
        if output.status.success() {
            break output;
        }
        let said = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(said.contains("409") && Instant::now() < deadline, "{said}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let seen = String::from_utf8_lossy(&output.stdout);
    assert!(
        seen.contains("hello") && seen.lines().any(|line| line.trim() == "42"),
        "{seen}"
    );
    // What the shell did, the task saw: it completes.
    let status = wait_resolved(&deployment, &task_id, Duration::from_secs(120));
    assert_eq!(status["state"], "completed", "{status:#}");
    let (_, log) = artifact(&deployment, &task_id, 0, "public/logs/live_backing.log");
    assert!(String::from_utf8_lossy(&log).contains("released"));

    // The URL died with the task; a guessed one never worked.
    let after = shell(&url, "true\n");
    assert_eq!(after.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&after.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&after.stderr).contains("/shell/"),
        "the secret path is never printed"
    );
    worker.signal(rustix::process::Signal::TERM);
    assert!(worker.wait_exit(Duration::from_secs(60)).success());
}

#[test]
fn an_interactive_task_on_a_worker_without_an_http_address_gets_an_error_artifact() {
    let deployment = Deployment::get();
    let dir = scratch();
    let queue_id = own_queue("no-shells");
    let mut payload = script("echo ran", 60);
    payload["interactive"] = Value::Bool(true);
    let task_id = create_task(&deployment, &queue_id, payload);
    let mut worker = Worker::start(&deployment, &queue_id, &dir.path().join("w"), &[]);
    let status = wait_resolved(&deployment, &task_id, Duration::from_secs(240));
    assert_eq!(status["state"], "completed", "{status:#}");
    let read = shell_artifact(&deployment.admin(), &task_id);
    let error = read.expect_err("an error artifact").to_string();
    assert!(
        error.contains("424") && error.contains("offers no shells"),
        "{error}"
    );
    worker.signal(rustix::process::Signal::TERM);
    assert!(worker.wait_exit(Duration::from_secs(60)).success());
}
