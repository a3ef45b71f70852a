//! Kept VMs through `taskvm serve`: a failed task of the queue keeps its VM, `/api/kept`
//! lists it, and `taskvm kept ls --server` and `taskvm debug --server` (a script, and a shell
//! from a pipe) work in fresh copies of it that hold host capacity while they run.

use std::io::Write;
use std::process::{Output, Stdio};

use serde_json::json;
use testkit::guest::config_allowing_test_images;

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
    let server = Server::start_configured(
        &dir.path().join("state"),
        &config_allowing_test_images(r#""kept": {"ttl": 3600}"#),
        &[],
    );
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
    // Every copy was discarded: nothing holds the host's capacity any more.
    let (_, health) = server.get("/api/health");
    assert_eq!(health["capacity"]["used"]["memoryMib"], 0, "{health:#}");
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
