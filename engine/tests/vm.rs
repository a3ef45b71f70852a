//! VirtualMachine against real QEMU under TCG with the minimal test image.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use engine::sandbox::cgroup::CgroupLimits;
use engine::sandbox::jail::JailSettings;
use engine::{ExitKind, VirtualMachine};
use testkit::guest::display_image;
use testkit::images::sha256_file;

const READY: &str = schemas::protocol::marker::READY;

mod common;
use common::{resolved_with, Fixture};

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread")]
async fn boots_sandboxed_to_the_agent_and_leaves_nothing_behind() {
    let fixture = Fixture::new();
    let lease = fixture.lease();
    let base = lease.disk_path();
    let base_digest = sha256_file(&base);
    let machine = resolved_with(&lease, |_| {});
    let mut vm = VirtualMachine::start(lease, &machine, &fixture.settings_without_network("boot"))
        .await
        .unwrap();
    assert!(
        vm.wait_for_serial(READY, Duration::from_secs(60)).await,
        "serial:\n{}",
        vm.serial_output()
    );

    let pid = vm.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    if rustix::process::geteuid().is_root() {
        // A user of the VM range, the same for real, effective and saved ids, and as group.
        let range = JailSettings::default().ids;
        for key in ["Uid:", "Gid:"] {
            let line = status.lines().find(|l| l.starts_with(key)).unwrap();
            let ids: Vec<u32> = line
                .split_whitespace()
                .skip(1)
                .map(|id| id.parse().unwrap())
                .collect();
            assert!(
                ids.iter().all(|id| *id == ids[0] && range.contains(*id)),
                "{line}"
            );
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(environ.is_empty(), "QEMU gets no environment: {environ:?}");
        assert!(status.contains("NoNewPrivs:\t1"), "no new privileges");
        let own_net = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        let own_mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert_ne!(own_net, std::fs::read_link("/proc/self/ns/net").unwrap());
        assert_ne!(own_mnt, std::fs::read_link("/proc/self/ns/mnt").unwrap());
        let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
        assert_eq!(root, Path::new("/"), "its own root, seen from outside as /");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "no core dumps of guest memory: {core}"
    );
    assert!(
        status.contains("Seccomp:\t2"),
        "QEMU runs under its seccomp sandbox"
    );
    let meta = std::fs::metadata(vm.runtime_dir()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o711);
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        rustix::process::geteuid().as_raw(),
        "the runtime directory is the worker's: QEMU changes no name in it"
    );

    let groups = if rustix::process::geteuid().is_root() {
        let groups_line = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        assert_eq!(groups_line.trim(), "Groups:", "no supplementary groups");
        let cgroup = vm.cgroup().expect("a control group when root");
        assert!(cgroup.contains(pid), "QEMU is in its group");
        let limits = CgroupLimits::for_machine(
            u64::from(machine.memory_mib()),
            u64::from(machine.topology().vcpus()),
        );
        let memory: u64 = cgroup
            .dirs()
            .iter()
            .find_map(|dir| {
                std::fs::read_to_string(dir.join("memory.max"))
                    .or_else(|_| std::fs::read_to_string(dir.join("memory.limit_in_bytes")))
                    .ok()
            })
            .expect("a memory limit file")
            .trim()
            .parse()
            .unwrap();
        assert_eq!(memory, limits.memory_bytes);
        let pids = cgroup
            .dirs()
            .iter()
            .find_map(|dir| std::fs::read_to_string(dir.join("pids.max")).ok())
            .expect("a pids limit file");
        assert_eq!(pids.trim(), limits.pids.to_string());
        cgroup.dirs().to_vec()
    } else {
        Vec::new()
    };

    let runtime = vm.runtime_dir().to_path_buf();
    vm.kill().await;
    assert_eq!(vm.wait().await, ExitKind::Killed);
    drop(vm);
    assert!(!runtime.exists(), "runtime directory removed");
    assert!(!process_exists(pid), "QEMU gone");
    for group in groups {
        assert!(!group.exists(), "{} removed", group.display());
    }
    assert_eq!(
        sha256_file(&base),
        base_digest,
        "the cached image is byte-identical"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_a_booting_vm_kills_it_and_removes_its_files() {
    let fixture = Fixture::new();
    let lease = fixture.lease();
    let machine = resolved_with(&lease, |_| {});
    let vm = VirtualMachine::start(lease, &machine, &fixture.settings_without_network("drop"))
        .await
        .unwrap();
    let (pid, runtime) = (vm.pid(), vm.runtime_dir().to_path_buf());
    let groups = vm.cgroup().map_or(Vec::new(), |g| g.dirs().to_vec());
    drop(vm);
    for group in groups {
        assert!(!group.exists(), "{} removed", group.display());
    }
    for _ in 0..200 {
        if !process_exists(pid)
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains(") Z "),
        "QEMU still running: {state}"
    );
    assert!(!runtime.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn suspend_and_resume() {
    let fixture = Fixture::new();
    let lease = fixture.lease();
    let machine = resolved_with(&lease, |_| {});
    let mut vm = VirtualMachine::start(lease, &machine, &fixture.settings_without_network("pause"))
        .await
        .unwrap();
    assert!(vm.wait_for_serial(READY, Duration::from_secs(60)).await);
    vm.suspend().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), (false, "paused".to_owned()));
    vm.resume().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), (true, "running".to_owned()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vnc_screenshot_equals_the_qmp_screendump_pixel_for_pixel() {
    let fixture = Fixture::new();
    let lease = fixture.lease_of(&display_image());
    let machine = resolved_with(&lease, |_| {});
    let mut vm =
        VirtualMachine::start(lease, &machine, &fixture.settings_without_network("screen"))
            .await
            .unwrap();
    assert!(
        vm.wait_for_serial(READY, Duration::from_secs(90)).await,
        "serial:\n{}",
        vm.serial_output()
    );
    // The banner is drawn before the marker; a paused guest keeps the frame (and the
    // text cursor's blink phase, which follows the guest clock) still for both readers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    vm.suspend().await.unwrap();

    let through_vnc = vm.screenshot(Duration::from_secs(10)).await.unwrap();
    let dump = vm.screendump().await.unwrap();
    let oracle = screen_of_ppm(&dump);
    assert_eq!(through_vnc.dimensions(), oracle.dimensions());
    assert_eq!(through_vnc.dimensions(), (720, 400), "VGA text mode");
    let differing = through_vnc
        .rgba()
        .chunks_exact(4)
        .zip(oracle.rgba().chunks_exact(4))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 0, "pixels that differ from the screendump");
    // Not a blank screen that would match anything: the banner's red bar is there.
    assert_eq!(through_vnc.pixel(360, 8), Some([168, 0, 0, 255]));

    let png = engine::qemu::screenshot::encode_png(&through_vnc).unwrap();
    let decoded = engine::qemu::screenshot::Screen::decode_png(&png).unwrap();
    assert_eq!(decoded, through_vnc, "the PNG holds the same pixels");
}

/// QEMU's `screendump` as a screen of RGBA pixels.
fn screen_of_ppm(ppm: &[u8]) -> engine::qemu::screenshot::Screen {
    let ppm = testkit::ppm::read(ppm);
    let rgba = ppm
        .rgb
        .chunks_exact(3)
        .flat_map(|rgb| [rgb[0], rgb[1], rgb[2], 0xff])
        .collect();
    engine::qemu::screenshot::Screen::new(ppm.width as u32, ppm.height as u32, rgba)
        .expect("the PPM's pixels fill it")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_panic_is_reported_as_such() {
    let fixture = Fixture::new();
    let lease = fixture.lease();
    // No stage 1: the kernel cannot mount its root and panics.
    let machine = resolved_with(&lease, |m| {
        let boot = m.boot.as_mut().unwrap();
        boot.append = Some(format!(
            "{} rdinit=/nonexistent",
            boot.append.clone().unwrap_or_default()
        ));
    });
    let mut vm = VirtualMachine::start(lease, &machine, &fixture.settings_without_network("panic"))
        .await
        .unwrap();
    let kind = tokio::time::timeout(Duration::from_secs(60), vm.wait())
        .await
        .expect("the panicking guest ended");
    assert_eq!(kind, ExitKind::Panicked, "serial:\n{}", vm.serial_output());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_qemu_that_cannot_start_reports_its_stderr_and_argv() {
    let fixture = Fixture::new();
    let lease = fixture.lease();
    let machine = resolved_with(&lease, |m| m.memory = Some(1024));
    let mut settings = fixture.settings_without_network("bad");
    settings.qemu = "/bin/false".into();
    let error = VirtualMachine::start(lease, &machine, &settings)
        .await
        .err()
        .expect("cannot start");
    let text = error.to_string();
    assert!(
        text.contains("QEMU did not start") && text.contains("argv: /bin/false -nodefaults"),
        "{text}"
    );
    assert!(
        !fixture.scratch.path().join("run/bad").exists(),
        "nothing left behind"
    );
}

/// Not a test by itself: the owner process of `kill_9_of_the_owner_then_a_sweep_cleans_up`,
/// run as a child of that test (it starts a VM and waits to be killed).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by kill_9_of_the_owner_then_a_sweep_cleans_up"]
async fn owner_process_for_the_kill_9_test() {
    let Ok(scratch) = std::env::var("TASKVM_TEST_OWNER_DIR") else {
        return;
    };
    let fixture = Fixture::within(Path::new(&scratch));
    let lease = fixture.lease();
    let machine = resolved_with(&lease, |_| {});
    let mut settings = fixture.settings_without_network("owned");
    if let Some(jail) = settings.jail.as_mut() {
        *jail = owned_jail(Path::new(&scratch));
    }
    settings.runtime_parent = Path::new(&scratch).join("run");
    settings.state_dir = Some(Path::new(&scratch).join("state"));
    if rustix::process::geteuid().is_root() {
        settings.network = Some(engine::network::NetworkSettings::default());
    }
    let _vm = VirtualMachine::start(lease, &machine, &settings)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
}

/// The kill -9 test's jail: a range of one id (outside the default range, so no other test's
/// VM has it), locked in the test's own directory.
fn owned_jail(scratch: &Path) -> JailSettings {
    JailSettings {
        ids: engine::sandbox::ids::IdRange::new(1_879_000_000, 1).unwrap(),
        id_locks: scratch.join("ids"),
        namespaces: true,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_owner_then_a_sweep_cleans_up() {
    let scratch = tempfile::tempdir().unwrap();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut owner = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "owner_process_for_the_kill_9_test",
            "--ignored",
            "--nocapture",
        ])
        .env("TASKVM_TEST_OWNER_DIR", scratch.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = scratch.path().join("state");
    let record_path = engine::sandbox::records::records_dir(&state).join("owned.record");
    let mut pid = None;
    for _ in 0..600 {
        let text = std::fs::read_to_string(&record_path).unwrap_or_default();
        if let Some(found) = text
            .lines()
            .find_map(|l| l.strip_prefix("pid="))
            .filter(|p| !p.is_empty())
        {
            pid = found.parse::<u32>().ok();
            if scratch.path().join("run/owned/qmp.sock").exists() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let qemu_pid = pid.expect("the owner recorded its QEMU");
    let root = rustix::process::geteuid().is_root();
    if root {
        // The one id of the range is the owner's VM's: no second VM gets it meanwhile.
        let fixture = Fixture::new();
        let lease = fixture.lease();
        let mut settings = fixture.settings_without_network("second");
        settings.jail = Some(owned_jail(scratch.path()));
        let error =
            VirtualMachine::start(lease, &resolved_with(&fixture.lease(), |_| {}), &settings)
                .await
                .err()
                .expect("the range's only id is held");
        assert!(error.to_string().contains("sandbox.idRange"), "{error}");
    }
    owner.kill().unwrap(); // SIGKILL: no destructor runs
    owner.wait().unwrap();
    assert!(
        scratch.path().join("run/owned").exists(),
        "the dead owner left its runtime dir"
    );

    let report = engine::sandbox::records::sweep(&state).unwrap();
    assert_eq!(report.records, 1);
    assert_eq!(report.removed_dirs, [scratch.path().join("run/owned")]);
    if rustix::process::geteuid().is_root() {
        assert_eq!(
            report.removed_namespaces,
            ["taskvm-owned"],
            "the VM's network swept"
        );
        assert!(!Path::new("/run/netns/taskvm-owned").exists());
        assert!(!report.removed_cgroups.is_empty(), "the VM's groups swept");
        for group in &report.removed_cgroups {
            assert!(!group.exists());
        }
    }
    for _ in 0..100 {
        if !process_exists(qemu_pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!process_exists(qemu_pid), "QEMU of the dead owner is gone");
    assert!(!scratch.path().join("run/owned").exists());
    if root {
        assert_eq!(report.freed_ids, [1_879_000_000], "the VM's user swept");
        assert!(engine::sandbox::ids::processes_of(1_879_000_000).is_empty());
        // The next VM gets the freed id and runs as it.
        let fixture = Fixture::new();
        let lease = fixture.lease();
        let machine = resolved_with(&lease, |_| {});
        let mut settings = fixture.settings_without_network("next");
        settings.jail = Some(owned_jail(scratch.path()));
        let vm = VirtualMachine::start(lease, &machine, &settings)
            .await
            .unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
        assert!(status.contains("Uid:\t1879000000\t"), "{status}");
    }
    assert_eq!(
        std::fs::read_dir(engine::sandbox::records::records_dir(&state))
            .unwrap()
            .count(),
        0
    );
}

/// With `namespaces` off (what `sandbox.allowWeakIsolation` gives a host that cannot make
/// them), QEMU keeps a user of its own, an empty environment and its descriptors, but runs in
/// the host's namespaces and reads its boot files by their host paths.
#[tokio::test(flavor = "multi_thread")]
async fn weaker_isolation_keeps_the_vms_own_user_without_namespaces() {
    if !rustix::process::geteuid().is_root() {
        return;
    }
    let fixture = Fixture::new();
    let lease = fixture.lease();
    let machine = resolved_with(&lease, |_| {});
    let mut settings = fixture.settings_without_network("weak");
    if let Some(jail) = settings.jail.as_mut() {
        jail.namespaces = false;
    }
    let mut vm = VirtualMachine::start(lease, &machine, &settings)
        .await
        .unwrap();
    assert!(
        vm.wait_for_serial(READY, Duration::from_secs(60)).await,
        "serial:\n{}",
        vm.serial_output()
    );
    let pid = vm.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(JailSettings::default().ids.contains(uid), "{uid}");
    assert!(std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .is_empty());
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap(),
        "the host's mount namespace"
    );
    vm.kill().await;
}
