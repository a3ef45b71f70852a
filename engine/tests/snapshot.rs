//! Snapshots with real VMs under TCG (root only): save a VM at agent-ready, restore two copies
//! at once, and check that each is a VM of its own — files, random numbers, clock, machine-id —
//! and that neither the cached image nor the snapshot changes.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use engine::network::session::{GuestSession, SessionConfig};
use engine::{VirtualMachine, VmSettings};
use schemas::protocol::{ActionKind, Execute};
use testkit::images::sha256_file;

mod common;

use common::{resolved, Fixture};

/// Settings of a VM called `name` (unique per test process) at the default guest address.
fn settings(fixture: &Fixture, name: &str) -> VmSettings {
    let name = format!("{name}-{}", std::process::id());
    fixture.settings(&name, engine::network::DEFAULT_GUEST_ADDRESS)
}

/// Boots a VM, waits for agent-ready, and saves it (no task was ever set).
async fn make_snapshot(fixture: &Fixture) -> engine::snapshot::Snapshot {
    let lease = fixture.lease();
    let machine = resolved(&lease);
    engine::snapshot::build(
        lease,
        &machine,
        &settings(fixture, "saved"),
        &fixture.scratch.path().join("snapshot"),
        Duration::from_secs(60),
    )
    .await
    .unwrap()
}

const PROBE: &str = "echo $1 > /tmp/mine; sleep 1; echo file=$(cat /tmp/mine); \
     echo random=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
     echo clock=$(date +%s); echo id=$(cat /etc/machine-id)";

/// Restores a copy and runs the probe in it; returns (start → first output, log).
async fn restore_and_probe(
    fixture: &Fixture,
    snapshot: &engine::snapshot::Snapshot,
    name: &str,
) -> (Duration, String, u64) {
    let lease = fixture.lease();
    let machine = resolved(&lease);
    let started = Instant::now();
    let vm = VirtualMachine::restore(lease, &machine, &settings(fixture, name), snapshot)
        .await
        .unwrap();
    let (session, mut log) = GuestSession::new(SessionConfig::new(name));
    session.set_task(Execute {
        command: vec![
            "sh".into(),
            "-c".into(),
            PROBE.into(),
            "sh".into(),
            name.into(),
        ],
        ..Execute::default()
    });
    vm.set_http_handler(session.handler());
    let mut text = String::new();
    let first = tokio::time::timeout(Duration::from_secs(60), log.recv())
        .await
        .unwrap_or_else(|_| panic!("no output after restore; serial:\n{}", vm.serial_output()))
        .unwrap();
    let first_output = started.elapsed();
    text.push_str(&String::from_utf8_lossy(&first));
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), log.recv())
        .await
        .unwrap()
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let host_clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let report = session.wait_report().await;
    assert_eq!(report.exit_code, 0, "{text}");
    session.perform(ActionKind::Shutdown).await.ok();
    drop(vm);
    (first_output, text, host_clock)
}

fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_restored_copies_are_each_a_vm_of_their_own() {
    let fixture = Fixture::new();
    let snapshot = make_snapshot(&fixture).await;
    // The save waited until the agent had left the request the stop of its service cut off:
    // no restored copy can be left waiting on a connection of the saved VM's.
    let console = std::fs::read_to_string(snapshot.dir().join("serial.log")).unwrap();
    assert_eq!(
        console.matches(schemas::protocol::marker::CUT_OFF).count(),
        1,
        "{console}"
    );
    // The RAM is in its own file, the stream holds the devices only.
    assert_eq!(snapshot.ram(), engine::snapshot::SavedRam::File);
    let state_size = std::fs::metadata(snapshot.state_path()).unwrap().len();
    assert!(state_size < 1 << 20, "state.bin holds {state_size} bytes");
    let ram = std::fs::metadata(snapshot.ram_path()).unwrap();
    assert_eq!(ram.len(), 256 << 20, "ram.bin is the guest's RAM");
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&ram) * 512 < 200 << 20,
        "ram.bin leaves zero pages out"
    );
    let image_disk = fixture.lease().disk_path();
    let before = [
        sha256_file(&image_disk),
        sha256_file(&snapshot.state_path()),
        sha256_file(&snapshot.disk_path()),
        sha256_file(&snapshot.ram_path()),
    ];
    // The snapshot's clock is behind by now; the restored guests must not be.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let snapshot = Arc::new(snapshot);
    let (a, b) = tokio::join!(
        restore_and_probe(&fixture, &snapshot, "copy-a"),
        restore_and_probe(&fixture, &snapshot, "copy-b"),
    );
    let ((first_a, log_a, host_a), (first_b, log_b, host_b)) = (a, b);
    println!("restore -> first output: {first_a:?} and {first_b:?}");
    assert_eq!(field(&log_a, "file"), "copy-a", "{log_a}");
    assert_eq!(field(&log_b, "file"), "copy-b", "{log_b}");
    assert_ne!(field(&log_a, "random"), field(&log_b, "random"));
    assert_eq!(field(&log_a, "random").len(), 64);
    assert_ne!(field(&log_a, "id"), field(&log_b, "id"));
    assert_eq!(field(&log_a, "id").len(), 32);
    for (log, host) in [(&log_a, host_a), (&log_b, host_b)] {
        let guest: u64 = field(log, "clock").parse().unwrap();
        assert!(
            host.abs_diff(guest) <= 1,
            "guest clock {guest}, host {host}"
        );
    }
    let after = [
        sha256_file(&image_disk),
        sha256_file(&snapshot.state_path()),
        sha256_file(&snapshot.disk_path()),
        sha256_file(&snapshot.ram_path()),
    ];
    assert_eq!(before, after, "image and snapshot unchanged");

    // The RAM file is filled while QEMU starts, and the state is loaded only once it is whole:
    // until the guest runs, QEMU must not have written one page of the mapping (a page written
    // before the copy ended would be the VM's own, holding zeros instead of the snapshot's).
    let lease = fixture.lease();
    let machine = resolved(&lease);
    let paused =
        VirtualMachine::restore_paused(lease, &machine, &settings(&fixture, "copy-c"), &snapshot)
            .await
            .unwrap();
    assert_eq!(ram_pages_of_its_own_kib(paused.pid()), Some(0));
    let (session, _log) = GuestSession::new(SessionConfig::new("copy-c"));
    session.set_task(Execute {
        command: vec!["true".into()],
        ..Execute::default()
    });
    paused.set_http_handler(session.handler());
    paused.resume().await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), session.wait_taken())
        .await
        .unwrap()
        .unwrap();
    let written = ram_pages_of_its_own_kib(paused.pid()).unwrap();
    assert!(written > 0, "a running guest writes pages of its own");
}

/// The kB of a QEMU's snapshot-RAM mapping that are its own (written, copied on write), from
/// `/proc/PID/smaps`; None when it has no such mapping.
fn ram_pages_of_its_own_kib(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mapping = smaps.find("memfd:taskvm-snapshot-ram")?;
    engine::host::procfs::field_number(&smaps[mapping..], "Anonymous:")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_state_fails_the_restore_with_a_reason() {
    let fixture = Fixture::new();
    let snapshot = make_snapshot(&fixture).await;
    let state = snapshot.state_path();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).unwrap();
    let length = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(length / 2)
        .unwrap();
    let lease = fixture.lease();
    let machine = resolved(&lease);
    let started = Instant::now();
    let error = VirtualMachine::restore(lease, &machine, &settings(&fixture, "broken"), &snapshot)
        .await
        .err()
        .expect("a truncated state does not restore");
    assert!(started.elapsed() < Duration::from_secs(30));
    println!("{error}");

    // A RAM file of another size than the machine's RAM is refused before any QEMU starts.
    let ram = snapshot.ram_path();
    std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ram)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let lease = fixture.lease();
    let error = VirtualMachine::restore(lease, &machine, &settings(&fixture, "short"), &snapshot)
        .await
        .err()
        .expect("a short RAM file does not restore")
        .to_string();
    assert!(
        error.contains("ram.bin") && error.contains("the machine has 268435456"),
        "{error}"
    );
}
