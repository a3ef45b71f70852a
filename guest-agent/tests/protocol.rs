//! The agent binary against a real HTTP peer on loopback: task, streamed log, reports and
//! actions, as it would run inside a VM (service mode, no power-off).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::metadata::{MetadataPeer, Seen};

const WAIT: Duration = Duration::from_secs(20);

fn agent(url: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_taskvm-agent"))
        .env("TASKVM_METADATA_URL", url)
        .env("TASKVM_AGENT_NO_POWEROFF", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start agent")
}

fn task(command: &[&str]) -> String {
    serde_json::json!({"command": command, "env": {"GREETING": "hello from env"}}).to_string()
}

fn reported(seen: &Seen) -> bool {
    !seen.reports.is_empty()
}

/// Sends `shutdown` and waits for the agent to exit.
fn shut_down(peer: &MetadataPeer, mut child: Child) -> String {
    peer.push_action(r#"{"id": "bye", "type": "shutdown"}"#);
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "agent did not exit after shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    out
}

#[test]
fn runs_the_command_streams_output_and_reports_success() {
    let peer = MetadataPeer::start(&task(&["sh", "-c", "echo hello; echo \"$GREETING\" >&2"]));
    let child = agent(peer.url());
    let seen = peer.wait_for(WAIT, reported);
    assert_eq!(
        String::from_utf8_lossy(&seen.log),
        "hello\nhello from env\n"
    );
    assert_eq!(
        seen.reports,
        [("success".to_owned(), r#"{"exitCode":0}"#.to_owned())]
    );
    let console = shut_down(&peer, child);
    assert_eq!(
        console,
        "taskvm-agent: ready\ntaskvm-agent: running\ntaskvm-agent: done exit=0\n"
    );
}

#[test]
fn a_non_zero_exit_is_reported_as_failed() {
    let peer = MetadataPeer::start(&task(&["sh", "-c", "exit 3"]));
    let child = agent(peer.url());
    let seen = peer.wait_for(WAIT, reported);
    assert_eq!(
        seen.reports,
        [("failed".to_owned(), r#"{"exitCode":3}"#.to_owned())]
    );
    shut_down(&peer, child);
}

#[test]
fn a_missing_program_is_exit_127_with_a_message_in_the_log() {
    let peer = MetadataPeer::start(&task(&["/no/such/program"]));
    let child = agent(peer.url());
    let seen = peer.wait_for(WAIT, reported);
    assert_eq!(seen.reports[0].1, r#"{"exitCode":127}"#);
    assert!(String::from_utf8_lossy(&seen.log).contains("cannot run \"/no/such/program\""));
    shut_down(&peer, child);
}

#[test]
fn output_streams_while_the_command_runs() {
    let peer = MetadataPeer::start(&task(&["sh", "-c", "echo first; sleep 3; echo second"]));
    let child = agent(peer.url());
    let seen = peer.wait_for(WAIT, |seen| !seen.log.is_empty());
    assert_eq!(String::from_utf8_lossy(&seen.log), "first\n");
    assert!(
        seen.reports.is_empty(),
        "the first line arrived before the command ended"
    );
    let seen = peer.wait_for(WAIT, reported);
    assert_eq!(String::from_utf8_lossy(&seen.log), "first\nsecond\n");
    shut_down(&peer, child);
}

#[test]
fn a_tty_command_sees_a_terminal() {
    let peer = MetadataPeer::start(
        &serde_json::json!({"command": ["sh", "-c", "test -t 1 && echo tty"], "tty": true})
            .to_string(),
    );
    let child = agent(peer.url());
    let seen = peer.wait_for(WAIT, reported);
    assert_eq!(seen.reports[0].1, r#"{"exitCode":0}"#);
    assert!(String::from_utf8_lossy(&seen.log).contains("tty"));
    shut_down(&peer, child);
}

#[test]
fn artifacts_and_folders_are_sent_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let script = format!(
        "mkdir -p {root}/out/sub && echo one > {root}/out/a.txt && echo two > {root}/out/sub/b.txt"
    );
    let peer = MetadataPeer::start(&task(&["sh", "-c", &script]));
    let child = agent(peer.url());
    peer.wait_for(WAIT, reported);
    peer.push_action(&format!(
        r#"{{"id": "f", "type": "get-artifact", "path": "{root}/out/a.txt"}}"#
    ));
    peer.push_action(&format!(
        r#"{{"id": "d", "type": "get-artifact", "path": "{root}/out"}}"#
    ));
    peer.push_action(&format!(
        r#"{{"id": "l", "type": "list-folder", "path": "{root}/out"}}"#
    ));
    peer.push_action(r#"{"id": "m", "type": "get-artifact", "path": "/no/such/file"}"#);
    let seen = peer.wait_for(WAIT, |seen| seen.replies.len() == 4);

    assert_eq!(
        seen.replies["f"],
        ("application/octet-stream".to_owned(), b"one\n".to_vec())
    );
    let (kind, tar_bytes) = &seen.replies["d"];
    assert_eq!(kind, "application/x-tar");
    let mut names: Vec<String> = tar::Archive::new(tar_bytes.as_slice())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    names.sort();
    assert!(
        names.contains(&"a.txt".to_owned()) && names.contains(&"sub/b.txt".to_owned()),
        "{names:?}"
    );
    let listing: serde_json::Value = serde_json::from_slice(&seen.replies["l"].1).unwrap();
    assert_eq!(listing["entries"][0]["name"], "a.txt");
    assert_eq!(listing["entries"][1]["directory"], true);
    let error: serde_json::Value = serde_json::from_slice(&seen.replies["m"].1).unwrap();
    assert!(error["error"].as_str().unwrap().contains("/no/such/file"));
    shut_down(&peer, child);
}

#[test]
fn kill_process_ends_the_command_with_its_signal() {
    let peer = MetadataPeer::start(&task(&["sh", "-c", "echo started; sleep 100"]));
    let child = agent(peer.url());
    peer.wait_for(WAIT, |seen| !seen.log.is_empty());
    peer.push_action(r#"{"id": "k", "type": "kill-process", "signal": 9}"#);
    let seen = peer.wait_for(WAIT, reported);
    assert_eq!(
        seen.reports[0],
        ("failed".to_owned(), r#"{"exitCode":137}"#.to_owned())
    );
    shut_down(&peer, child);
}

#[test]
fn the_agent_waits_for_a_service_that_is_not_up_yet() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let child = agent(&url);
    std::thread::sleep(Duration::from_millis(500));
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let peer = MetadataPeer::serve(listener, &task(&["true"]));
    let seen = peer.wait_for(WAIT, reported);
    assert_eq!(seen.reports[0].0, "success");
    shut_down(&peer, child);
}
