//! A failed task's VM kept and resumed (root only, TCG): the VM whose command failed is
//! saved — its memory and its disk — after its agent reported, restored on a fresh network,
//! and a shell in it finds the command's file and its background process, same PID: the
//! engine's half of issue 24's "keep a failed VM frozen".

use std::time::Duration;

use engine::network::session::{GuestSession, SessionConfig};
use engine::{VirtualMachine, VmSettings};
use schemas::protocol::{ActionKind, Execute};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

use common::{resolved, Fixture};

fn settings(fixture: &Fixture, name: &str) -> VmSettings {
    let name = format!("{name}-{}", std::process::id());
    fixture.settings(&name, engine::network::DEFAULT_GUEST_ADDRESS)
}

const FAILING: &str = "echo kept > /tmp/state.txt; sleep 1000 & echo $! > /tmp/sleeper; \
     echo pid=$(cat /tmp/sleeper); exit 1";

/// Reads the shell until its output holds `wanted`.
async fn read_until(shell: &mut engine::network::shell::ShellStream, wanted: &str) -> String {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(wanted) {
        let read = tokio::time::timeout(Duration::from_secs(30), shell.read(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("no {wanted:?}: {}", String::from_utf8_lossy(&seen)))
            .unwrap();
        assert!(
            read > 0,
            "the shell ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_vm_saved_after_its_report_resumes_with_its_files_and_processes() {
    let fixture = Fixture::new();
    let lease = fixture.lease();
    let machine = resolved(&lease);
    let mut vm = VirtualMachine::start(lease, &machine, &settings(&fixture, "failing"))
        .await
        .unwrap();
    let (session, mut log) = GuestSession::new(SessionConfig::new("failing"));
    session.set_task(Execute {
        command: vec!["sh".into(), "-c".into(), FAILING.into()],
        ..Execute::default()
    });
    vm.set_http_handler(session.handler());
    let report = tokio::time::timeout(Duration::from_secs(120), session.wait_report())
        .await
        .unwrap_or_else(|_| panic!("no report; serial:\n{}", vm.serial_output()));
    assert_eq!(report.exit_code, 1);
    let mut text = String::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(5), log.recv()).await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let pid = text
        .lines()
        .find_map(|line| line.strip_prefix("pid="))
        .unwrap_or_else(|| panic!("no pid in {text}"))
        .to_owned();

    // Keep it: the service goes first (the agent's poll is cut and it retries), then the save.
    vm.network_mut().unwrap().stop_service().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kept = fixture.scratch.path().join("kept");
    let snapshot = vm.snapshot(&kept).await.unwrap();

    // Resume it on a network of its own, with a new session (no task: its agent serves
    // actions, as it did when it was saved).
    let lease = fixture.lease();
    let resumed =
        VirtualMachine::restore(lease, &machine, &settings(&fixture, "resumed"), &snapshot)
            .await
            .unwrap();
    let (session, _log) = GuestSession::new(SessionConfig::new("resumed"));
    resumed.set_http_handler(session.handler());
    let mut shell = session
        .open_shell(24, 80, Duration::from_secs(30))
        .await
        .unwrap_or_else(|error| panic!("{error}; serial:\n{}", resumed.serial_output()));
    // Answers that the typed line itself does not contain.
    let keys = format!("cat /tmp/state.txt; kill -0 {pid} && echo $((40+2))-alive\n");
    shell
        .write_all(&schemas::protocol::shell::input(keys.as_bytes()))
        .await
        .unwrap();
    let seen = read_until(&mut shell, "42-alive").await;
    assert!(seen.contains("kept"), "{seen}");
    drop(shell);
    session.perform(ActionKind::Shutdown).await.ok();
}
