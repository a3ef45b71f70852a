//! Interactive shells in a running task's VM: the websocket (its client, as `taskvm shell`
//! uses it), `taskvm shell` on a pipe and on a terminal, and "Open shell" in the web UI.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::taskvm_command;
use crate::server::*;

/// A task that leaves a file and a process behind, then sleeps.
fn sleeper() -> Value {
    script_task(
        "echo hello > /tmp/state.txt; sleep 1000 & echo shell-ready; sleep 150",
        180,
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Reads `output` until it holds `wanted` (or the patience runs out).
async fn read_until(
    output: &mut serve::shell_client::ShellOutput,
    wanted: &str,
    patience: Duration,
) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + patience;
    while !seen.contains(wanted) {
        match tokio::time::timeout_at(deadline, output.next()).await {
            Ok(Some(bytes)) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            Ok(None) => panic!("the shell ended before {wanted:?}: {seen}"),
            Err(_) => panic!("no {wanted:?} in time: {seen}"),
        }
    }
    seen
}

#[test]
fn a_shell_runs_in_the_tasks_own_vm_resizes_and_is_bounded_in_number() {
    let dir = scratch();
    let server = Server::start(&dir.path().join("state"), &[]);
    let id = server.submit(&sleeper());
    server.wait_log(&id, "shell-ready");
    assert_eq!(server.task(&id)["shell"], true);
    let patience = Duration::from_secs(30);
    runtime().block_on(async {
        let (mut input, mut output) =
            serve::shell_client::connect(&server.base, None, &id, 30, 100)
                .await
                .expect("a shell");
        // The task's own machine: its file and its background process.
        input
            .keys(b"cat /tmp/state.txt; stty size\n")
            .await
            .unwrap();
        let seen = read_until(&mut output, "30 100", patience).await;
        assert!(seen.contains("hello"), "{seen}");
        input.resize(40, 120).await.unwrap();
        input.keys(b"stty size\n").await.unwrap();
        read_until(&mut output, "40 120", patience).await;

        // At most four at once; a fifth is refused, and a closed one frees its place.
        let mut more = Vec::new();
        for _ in 0..3 {
            more.push(
                serve::shell_client::connect(&server.base, None, &id, 24, 80)
                    .await
                    .expect("shells two to four"),
            );
        }
        let fifth = serve::shell_client::connect(&server.base, None, &id, 24, 80).await;
        let refused = fifth.err().expect("a fifth shell is refused").to_string();
        assert!(
            refused.contains("503") && refused.contains("4 shells open"),
            "{refused}"
        );
        let (closed, _) = more.pop().unwrap();
        closed.close().await;
        let deadline = Instant::now() + patience;
        loop {
            match serve::shell_client::connect(&server.base, None, &id, 24, 80).await {
                Ok(again) => {
                    more.push(again);
                    break;
                }
                Err(error) => assert!(Instant::now() < deadline, "{error}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // The shell's exit closes the websocket.
        input.keys(b"exit\n").await.unwrap();
        let ended =
            tokio::time::timeout(patience, async { while output.next().await.is_some() {} });
        ended
            .await
            .expect("the websocket closes when the shell exits");
    });
    // The task went on untouched.
    assert_eq!(server.task(&id)["state"], "running");
    let (status, _) = server.post(&format!("/api/tasks/{id}/cancel"), &json!({}));
    assert_eq!(status, 202);
    server.wait_resolved(&id);
    let done = taskvm_command(&["shell", &id, "--server", &server.base])
        .output()
        .unwrap();
    assert_eq!(done.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&done.stderr).contains("no running VM"),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
}

#[test]
fn taskvm_shell_works_from_a_pipe_and_from_a_terminal() {
    let dir = scratch();
    let server = Server::start(&dir.path().join("state"), &[]);
    let id = server.submit(&sleeper());
    server.wait_log(&id, "shell-ready");

    // A script's pipe: the input as it is, its end ends the shell.
    let mut piped = taskvm_command(&["shell", &id, "--server", &server.base]);
    piped.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = piped.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo $((6*7)); stty size\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.lines().any(|line| line.trim() == "42") && text.contains("24 80"),
        "{text}"
    );

    // A terminal (script(1) gives taskvm shell one): keys pass through raw.
    let taskvm = env!("CARGO_BIN_EXE_taskvm");
    let mut terminal = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!("{taskvm} shell {id} --server {}", server.base))
        .arg("/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut keys = terminal.stdin.take().unwrap();
    let mut screen = terminal.stdout.take().unwrap();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(read) = screen.read(&mut buffer) {
            if read == 0 || seen_tx.send(buffer[..read].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let wait_for = |seen: &mut String, wanted: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !seen.contains(wanted) {
            let left = deadline.saturating_duration_since(Instant::now());
            match seen_rx.recv_timeout(left) {
                Ok(bytes) => seen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => panic!("no {wanted:?}: {seen}"),
            }
        }
    };
    wait_for(&mut seen, "# ");
    keys.write_all(b"echo $((6*7))\r").unwrap();
    wait_for(&mut seen, "\n42\r");
    keys.write_all(b"exit\r").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = terminal.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "taskvm shell did not end: {seen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}: {seen}");
}

#[test]
fn open_shell_in_the_web_ui_types_into_the_guest() {
    let dir = scratch();
    let server = Server::start(&dir.path().join("state"), &[]);
    let id = server.submit(&sleeper());
    server.wait_log(&id, "shell-ready");
    browse_shell(
        &server,
        &format!("/tasks/{id}"),
        "#open-shell",
        "echo $((6*7))",
        "42",
    );
}
