//! Kept VMs through `taskvm serve`: a failed task of the queue keeps its VM, `/api/kept`
//! lists it, and `taskvm kept ls --server`, `taskvm debug --server` (a script, and a shell
//! from a pipe) and the task's page ("Resume for debugging") work in fresh copies of it that
//! hold host capacity while they run; a crash while one runs leaves nothing the next start
//! does not sweep.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::guest::config_allowing_test_images;
use testkit::process::qemu_processes_under;

use crate::common::taskvm_command;
use crate::server::*;

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn a_failed_queue_task_is_kept_listed_and_resumed_through_the_server() {
    let dir = scratch();
    let config = config_allowing_test_images(r#""kept": {"ttl": 3600}"#);
    let server = Server::start_configured(&dir.path().join("state"), &config, &[]);
    let mut payload = script_task(
        "echo kept > /tmp/state.txt; sleep 1000 & echo $! > /tmp/sleeper; echo pid=$!; exit 1",
        60,
    );
    payload["debug"] = json!({ "keepOnFailure": true });
    let id = server.submit(&payload);
    let task = server.wait_resolved(&id);
    assert_eq!(task["resolution"], "failed", "{task:#}");
    let log = server.log_now(&id);
    assert!(log.contains("the failed VM is kept as"), "{log}");
    let pid = log
        .lines()
        .find_map(|line| line.strip_prefix("pid="))
        .unwrap_or_else(|| panic!("{log}"))
        .to_owned();

    let (status, listed) = server.get("/api/kept");
    assert_eq!(status, 200, "{listed}");
    let name = listed["kept"][0]["name"].as_str().unwrap().to_owned();
    assert_eq!(listed["kept"][0]["taskId"], id.as_str(), "{listed:#}");
    assert!(listed["kept"][0]["command"][2]
        .as_str()
        .unwrap()
        .contains("sleep 1000"));
    let ls = taskvm_command(&["kept", "ls", "--server", &server.base])
        .output()
        .unwrap();
    assert!(said(&ls).contains(&name), "{}", said(&ls));

    let probe = "cat /tmp/state.txt; kill -0 $(cat /tmp/sleeper) && echo alive-$(cat /tmp/sleeper)";
    let exec = taskvm_command(&["debug", &name, "--server", &server.base, "--exec", probe])
        .output()
        .unwrap();
    assert_eq!(exec.status.code(), Some(0), "{}", said(&exec));
    assert!(
        said(&exec).contains("kept\n") && said(&exec).contains(&format!("alive-{pid}\n")),
        "{}",
        said(&exec)
    );

    let mut shell = taskvm_command(&["debug", &name, "--server", &server.base]);
    shell.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = shell.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo $((6*7)); cat /tmp/state.txt\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.lines().any(|line| line.trim() == "42"), "{text}");

    let unknown = taskvm_command(&[
        "debug",
        "no-such-vm",
        "--server",
        &server.base,
        "--exec",
        "true",
    ])
    .output()
    .unwrap();
    assert_eq!(unknown.status.code(), Some(3));
    assert!(said(&unknown).contains("404"), "{}", said(&unknown));
    // A script over the limit is refused before anything is resumed.
    let long = "true;".repeat(14_000);
    let (status, refused) = server.post(
        &format!("/api/kept/{name}/exec"),
        &json!({ "script": long }),
    );
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("at most 65536 bytes"),
        "{refused}"
    );

    // The failed task's page resumes it: a shell in the web UI finds the task's file.
    browse_shell(
        &server,
        &format!("/tasks/{id}"),
        "#resume-kept",
        "cat /tmp/state.txt",
        "kept",
    );
    // Every copy was discarded: nothing holds the host's capacity any more.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.get("/api/health").1["capacity"]["used"]["memoryMib"] != 0 {
        assert!(
            Instant::now() < deadline,
            "a resumed copy still holds capacity"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    crash_while_resumed_leaves_nothing_unswept(server, &config, &name);
}

/// A kill -9 of the server while a copy of kept VM `name` runs: its next start sweeps the copy
/// (process, network, files) and keeps the kept VM.
fn crash_while_resumed_leaves_nothing_unswept(server: Server, config: &str, name: &str) {
    let state = server.state.clone();
    let mut shell = taskvm_command(&["debug", name, "--server", &server.base]);
    shell.stdin(Stdio::piped()).stdout(Stdio::null());
    let mut child = shell.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.get("/api/health").1["capacity"]["used"]["memoryMib"] == 0 {
        assert!(Instant::now() < deadline, "the copy never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(qemu_processes_under(&state), 1);
    server.crash();
    let _ = child.kill();
    let _ = child.wait();

    let server = Server::start_configured(&state, config, &[]);
    assert_eq!(
        qemu_processes_under(&state),
        0,
        "{:?}",
        server.process.lines()
    );
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    // Copies are named NAME-debug-…; other tests' copies have other names.
    let copy = format!("{name}-debug-");
    assert!(!namespaces.contains(&copy), "{namespaces}");
    let leftovers: Vec<String> = walk(&state)
        .into_iter()
        .filter(|path| path.contains(&copy))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let (_, listed) = server.get("/api/kept");
    assert_eq!(listed["kept"][0]["name"], name, "{listed:#}");

    // Deleted through the server, with everything it held.
    let removed = taskvm_command(&["kept", "rm", name, "--server", &server.base])
        .output()
        .unwrap();
    assert_eq!(removed.status.code(), Some(0), "{}", said(&removed));
    assert!(!state.join("kept").join(name).exists());
    assert_eq!(server.get("/api/kept").1["kept"], json!([]));
    let again = taskvm_command(&["kept", "rm", name, "--server", &server.base])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(3));
    assert!(said(&again).contains("404"), "{}", said(&again));
}

/// Every path under `dir`.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        paths.push(path.to_string_lossy().into_owned());
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            paths.extend(walk(&path));
        }
    }
    paths
}

#[test]
fn the_server_deletes_a_kept_vm_when_its_time_is_up_unasked() {
    let dir = scratch();
    let server = Server::start_configured(
        &dir.path().join("state"),
        &config_allowing_test_images(r#""kept": {"ttl": 4}"#),
        &[],
    );
    let mut payload = script_task("exit 1", 60);
    payload["debug"] = json!({ "keepOnFailure": true });
    let id = server.submit(&payload);
    server.wait_resolved(&id);
    let log = server.log_now(&id);
    assert!(log.contains("the failed VM is kept as"), "{log}");
    let kept = dir.path().join("state/kept");
    // Nobody lists or keeps anything: the server's own sweep deletes it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_dir(&kept).map_or(0, |entries| entries.count()) > 0 {
        assert!(std::time::Instant::now() < deadline, "still kept: {log}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    server.process.wait_said(
        "deleted (its kept.ttl passed",
        std::time::Duration::from_secs(5),
    );
}
