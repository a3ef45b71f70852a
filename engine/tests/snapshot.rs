//! Snapshots with real VMs under TCG (root only): save a VM at agent-ready, restore two copies
//! at once, and check that each is a VM of its own — files, random numbers, clock, machine-id —
//! and that neither the cached image nor the snapshot changes.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use engine::network::NetworkSettings;
use engine::process::lookup_user;
use engine::session::{GuestSession, SessionConfig};
use engine::{Accelerator, Netdev, VirtualMachine, VmSettings};
use image_manager::{Cache, ImageRequest, Lease};
use schemas::config::CacheConfig;
use schemas::protocol::{ActionKind, Execute};
use schemas::{resolve_machine, MachineLayers, MachineLimits, ResolvedMachine};
use testkit::guest::{host_tsc_khz, minimal_image};
use testkit::images::sha256_file;

struct Fixture {
    scratch: tempfile::TempDir,
    cache: Cache,
}

impl Fixture {
    fn new() -> Fixture {
        assert!(
            rustix::process::geteuid().is_root(),
            "VM networks need root"
        );
        let scratch = tempfile::tempdir().unwrap();
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cache = Cache::open(CacheConfig {
            dir: scratch.path().join("cache"),
            ..CacheConfig::default()
        })
        .unwrap();
        Fixture { scratch, cache }
    }

    fn lease(&self) -> Lease {
        let request = ImageRequest::parse(minimal_image().to_str().unwrap(), None).unwrap();
        self.cache.fetch(&request, &|_| {}).unwrap().0
    }

    fn settings(&self, name: &str) -> VmSettings {
        VmSettings {
            runtime_parent: self.scratch.path().join("run"),
            name: format!("{name}-{}", std::process::id()),
            accelerator: Accelerator::Tcg,
            run_as: Some(lookup_user("nobody").unwrap()),
            netdev: Netdev::RestrictedUser,
            qemu: "qemu-system-x86_64".into(),
            tsc_khz: host_tsc_khz(),
            start_timeout: Duration::from_secs(10),
            state_dir: Some(self.scratch.path().join("state")),
            cgroups: None,
            network: Some(NetworkSettings::default()),
        }
    }
}

fn resolved(lease: &Lease) -> ResolvedMachine {
    let limits = MachineLimits {
        max_memory: 1024,
        max_cpus: 1,
        default_threads: 1,
    };
    let layers = MachineLayers {
        image: Some(lease.machine()),
        ..MachineLayers::default()
    };
    resolve_machine(layers, &limits).unwrap()
}

/// Boots a VM, waits for agent-ready, and saves it (no task was ever set).
async fn make_snapshot(fixture: &Fixture) -> engine::snapshot::Snapshot {
    let lease = fixture.lease();
    let machine = resolved(&lease);
    engine::snapshot::build(
        lease,
        &machine,
        &fixture.settings("saved"),
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
    let vm = VirtualMachine::restore(lease, &machine, &fixture.settings(name), snapshot)
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
    let image_disk = fixture.lease().disk_path();
    let before = [
        sha256_file(&image_disk),
        sha256_file(&snapshot.state_path()),
        sha256_file(&snapshot.disk_path()),
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
    ];
    assert_eq!(before, after, "image and snapshot unchanged");
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
    let error = VirtualMachine::restore(lease, &machine, &fixture.settings("broken"), &snapshot)
        .await
        .err()
        .expect("a truncated state does not restore");
    assert!(started.elapsed() < Duration::from_secs(30));
    println!("{error}");
}
