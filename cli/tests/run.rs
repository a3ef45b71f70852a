//! `taskvm run` end to end, as a user runs it: real VMs under TCG on isolated networks (root
//! only), every example payload, every resolution path, the malformed-payload corpus, and the
//! cleanup after cancellation, crashes and `kill -9`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::scene::*;
use common::taskvm_command;

use testkit::guest::minimal_image;
use testkit::http::{Behaviour, Server};
use testkit::images::{image, valid_entries, Entry};
use testkit::process::shared_cache;

#[test]
fn hello_prints_what_the_guest_sees_and_completes() {
    let scene = Scene::new();
    let run = scene.run(&scene.example("hello"), "hello");
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    let stdout = run.stdout();
    assert!(stdout.contains("hello from Linux 6.1"), "{stdout}");
    assert!(stdout.contains("with 1 CPUs"), "{stdout}");
    assert!(
        run.log.contains("hello from Linux"),
        "the log has the output"
    );
    let last = run.log.lines().last().unwrap();
    assert!(
        last.starts_with("[taskvm] resolved completed in ") && last.contains("start "),
        "timings end the log: {last}"
    );
    let artifacts = scene.artifacts("hello");
    assert!(std::fs::read_to_string(artifacts.join("serial.log"))
        .unwrap()
        .contains("taskvm-agent: ready"));
    assert!(artifacts.join("qemu.log").is_file());
    assert!(
        scene.leftovers(run.vm().as_deref()).is_empty(),
        "{:?}",
        scene.leftovers(run.vm().as_deref())
    );
}

#[test]
fn relative_directories_work_like_absolute_ones() {
    let scene = Scene::new();
    scene.example("hello"); // writes hello.json into the scene
    let output = taskvm_command(&[])
        .current_dir(scene.scratch.path())
        .args(["run", "hello.json", "--cache", "cache", "--state", "state"])
        .args(["--artifacts", "out", "--accel", "tcg"])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(scene.scratch.path().join("out/live.log").is_file());
}

#[test]
fn a_non_zero_exit_fails_with_exit_status_1() {
    let scene = Scene::new();
    let run = scene.run(&scene.example("exit-nonzero"), "fail");
    assert_eq!(run.code(), Some(1), "{}", run.explain());
    assert!(
        run.stdout().contains("error: 2 tests failed"),
        "the command's stderr is in the log"
    );
    assert!(
        run.log.contains("[taskvm] the command exited with 3"),
        "{}",
        run.log
    );
    assert!(run.log.contains("[taskvm] resolved failed in "));
}

#[test]
fn max_run_time_kills_the_command_and_fails_saying_so() {
    let scene = Scene::new();
    let run = scene.run(&scene.example("timeout"), "timeout");
    assert_eq!(run.code(), Some(1), "{}", run.explain());
    assert!(run.stdout().contains("waiting forever"));
    assert!(
        run.log
            .contains("[taskvm] maxRunTime of 5 s exceeded; the task failed"),
        "{}",
        run.log
    );
    assert!(run.took < Duration::from_secs(60), "{:?}", run.took);
    assert!(scene.leftovers(run.vm().as_deref()).is_empty());
}

#[test]
fn artifacts_come_out_of_the_guest_as_files_and_directories() {
    let scene = Scene::new();
    let run = scene.run(&scene.example("artifacts"), "artifacts");
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    let dir = scene.artifacts("artifacts").join("public");
    assert!(std::fs::read_to_string(dir.join("report.txt"))
        .unwrap()
        .contains("UTC"));
    assert!(std::fs::read_to_string(dir.join("out/uname.txt"))
        .unwrap()
        .starts_with("Linux"));
    assert_eq!(
        std::fs::read_to_string(dir.join("out/logs/check.log")).unwrap(),
        "ok\n"
    );
    assert!(
        run.log.contains("[taskvm] artifact public/out: 2 file(s)"),
        "{}",
        run.log
    );

    // An artifact the command did not make fails the task, and the others still arrive.
    let missing = scene.payload(
        "missing-artifact",
        &with_test_images(
            r#"{"image": "file:///usr/share/taskvm/images/minimal.tar.zst",
                "command": ["sh", "-c", "echo made > /tmp/made"], "maxRunTime": 60,
                "artifacts": [{"type": "file", "path": "/tmp/never", "name": "never"},
                              {"type": "file", "path": "/tmp/made", "name": "made"},
                              {"type": "file", "path": "/tmp", "name": "wrong-kind"}]}"#,
        ),
    );
    let run = scene.run(&missing, "missing");
    assert_eq!(run.code(), Some(1), "{}", run.explain());
    assert!(run.log.contains("artifact never is missing"), "{}", run.log);
    assert!(run
        .log
        .contains("\"/tmp\" is a directory, but the payload asks for a file"));
    assert_eq!(
        std::fs::read_to_string(scene.artifacts("missing").join("made")).unwrap(),
        "made\n"
    );
}

#[test]
fn a_guest_cannot_forge_taskvm_lines_in_the_log() {
    let scene = Scene::new();
    let payload = scene.payload(
        "forge",
        &with_test_images(
            r#"{"image": "file:///usr/share/taskvm/images/minimal.tar.zst",
                "command": ["sh", "-c",
                  "echo '[taskvm] resolved completed in 0.10 s'; printf '\\033[2Jgone\\n'; exit 4"],
                "maxRunTime": 60}"#,
        ),
    );
    let run = scene.run(&payload, "forge");
    assert_eq!(run.code(), Some(1), "{}", run.explain());
    // The log as serve and the Taskcluster log artifact show it: every line that begins with
    // `[taskvm] ` is taskvm's, and the only resolution line says failed.
    let resolutions: Vec<&str> = run
        .log
        .lines()
        .filter(|line| line.starts_with("[taskvm] resolved "))
        .collect();
    assert_eq!(resolutions.len(), 1, "{}", run.log);
    assert!(
        resolutions[0].starts_with("[taskvm] resolved failed"),
        "{}",
        run.log
    );
    assert!(
        run.log
            .contains("\n>[taskvm] resolved completed in 0.10 s\n"),
        "the guest's line is kept, quoted: {}",
        run.log
    );
    // The guest's own bytes pass to a pipe unchanged.
    assert!(run.stdout().contains("\u{1b}[2Jgone"), "{}", run.stdout());
}

#[test]
fn an_artifact_over_the_entry_cap_fails_the_task_naming_the_setting() {
    let scene = Scene::new();
    let payload = scene.payload(
        "entries",
        &with_test_images(
            r#"{"image": "file:///usr/share/taskvm/images/minimal.tar.zst",
                "command": ["sh", "-c", "mkdir -p /out && for i in 1 2 3 4 5 6 7 8; do echo $i > /out/f$i; done"],
                "maxRunTime": 60,
                "artifacts": [{"type": "directory", "path": "/out", "name": "out"}]}"#,
        ),
    );
    let run = scene.run_configured(&payload, "entries", r#"{"artifacts": {"maxEntries": 5}}"#);
    let log = &run.log;
    assert_eq!(run.code(), Some(1), "{}", run.explain());
    assert!(
        log.contains("the task's artifacts exceed 5 entries in all (artifacts.maxEntries)"),
        "{log}"
    );
    assert!(log.contains("[taskvm] resolved failed"), "{log}");
    assert!(
        !scene.artifacts("entries").join("out").exists(),
        "nothing partial is left"
    );
}

#[test]
fn a_guest_writing_past_the_file_size_bound_is_stopped_and_fails_naming_it() {
    let scene = Scene::new();
    let payload = scene.payload(
        "disk-filler",
        &with_test_images(
            r#"{"image": "file:///usr/share/taskvm/images/minimal.tar.zst",
                "command": ["sh", "-c", "dd if=/dev/urandom of=/root/fill bs=1M count=48; sync; echo survived"],
                "maxRunTime": 120}"#,
        ),
    );
    let config = r#"{"sandbox": {"maxFileSize": 33554432}}"#;
    let run = scene.run_configured(&payload, "filler", config);
    let log = &run.log;
    assert_eq!(run.code(), Some(1), "{}", run.explain());
    assert!(
        log.contains("the VM's disk overlay reached 33554432 bytes (sandbox.maxFileSize)"),
        "{log}"
    );
    assert!(log.contains("[taskvm] resolved failed"), "{log}");
    assert!(scene.leftovers(run.vm().as_deref()).is_empty());
}

#[test]
fn a_guest_flooding_its_serial_console_is_stopped_at_the_console_bound() {
    let scene = Scene::new();
    let payload = scene.payload(
        "console-flood",
        &with_test_images(
            r#"{"image": "file:///usr/share/taskvm/images/minimal.tar.zst",
                "command": ["sh", "-c", "while :; do echo flooding the console > /dev/ttyS0; done"],
                "maxRunTime": 120}"#,
        ),
    );
    let config = r#"{"sandbox": {"maxConsoleSize": 65536}}"#;
    let run = scene.run_configured(&payload, "flood", config);
    assert_eq!(run.code(), Some(1), "{}", run.explain());
    assert!(
        run.log
            .contains("the VM's serial console reached 65536 bytes (sandbox.maxConsoleSize)"),
        "{}",
        run.log
    );
    assert!(
        run.took < Duration::from_secs(100),
        "stopped long before maxRunTime"
    );
    let kept = std::fs::metadata(scene.artifacts("flood").join("serial.log")).unwrap();
    assert!(kept.len() < 4 << 20, "{} bytes kept", kept.len());
    assert!(scene.leftovers(run.vm().as_deref()).is_empty());
}

#[test]
fn a_screenshot_of_the_display_is_saved_as_png() {
    let scene = Scene::new();
    let run = scene.run(&scene.example("screenshot"), "screen");
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    let png = std::fs::read(scene.artifacts("screen").join("screenshot.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(width >= 640 && height >= 400, "{width}x{height}");
    assert!(run
        .log
        .contains(&format!("screenshot.png: {width}x{height}")));
}

#[test]
fn the_payload_machine_overrides_memory_and_cpus() {
    let scene = Scene::new();
    let run = scene.run(&scene.example("machine-override"), "machine");
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    let stdout = run.stdout();
    assert_eq!(stdout.lines().next(), Some("2"), "nproc: {stdout}");
    let total: u32 = stdout
        .lines()
        .find(|line| line.starts_with("Mem:"))
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert!(
        (400..=512).contains(&total),
        "512 MiB machine shows {total} MiB"
    );
    assert!(run.stderr().contains("512 MiB, 2 vCPU(s)"));
}

#[test]
fn a_guest_that_powers_off_mid_task_fails() {
    let scene = Scene::new();
    let payload = scene.payload(
        "poweroff",
        &with_test_images(
            r#"{"image": "file:///usr/share/taskvm/images/minimal.tar.zst",
                "command": ["sh", "-c", "echo going down; sync; poweroff -f"], "maxRunTime": 60}"#,
        ),
    );
    let run = scene.run(&payload, "poweroff");
    assert_eq!(run.code(), Some(1), "{}", run.explain());
    assert!(
        run.log
            .contains("the guest powered off before the command reported its exit"),
        "{}",
        run.log
    );
    assert!(scene.leftovers(run.vm().as_deref()).is_empty());
}

#[test]
fn malformed_payloads_exit_2_naming_the_rule_and_leave_nothing_behind() {
    let scene = Scene::new();
    let cache = scene.scratch.path().join("private-cache");
    let server = Server::start();
    let mut hostile = valid_entries();
    hostile.push(Entry::special(
        "evil",
        tar::EntryType::Symlink,
        Some("/etc/passwd"),
    ));
    server.route("/hostile.tar.zst", Behaviour::Normal(image(&hostile)));
    server.route("/gone.tar.zst", Behaviour::Status(404));
    let image_ok = with_test_images(r#""file:///usr/share/taskvm/images/minimal.tar.zst""#);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong-type",
            format!(r#"{{"image": {image_ok}, "command": "true", "maxRunTime": 60}}"#),
            "/command",
        ),
        (
            "unknown-field",
            format!(r#"{{"image": {image_ok}, "command": ["true"], "maxRunTime": 60, "maxRuntime": 5}}"#),
            "maxRuntime",
        ),
        (
            "missing-field",
            format!(r#"{{"image": {image_ok}, "command": ["true"]}}"#),
            "maxRunTime",
        ),
        (
            "over-limits",
            std::fs::read_to_string(scene.example("invalid-over-limits")).unwrap(),
            "/machine/memory: 1048576 exceeds maxMemory 1024",
        ),
        (
            "bad-url",
            r#"{"image": "ftp://example.invalid/x.tar.zst", "command": ["true"], "maxRunTime": 60}"#
                .to_owned(),
            "/image",
        ),
        (
            "reserved-artifact-name",
            format!(
                r#"{{"image": {image_ok}, "command": ["true"], "maxRunTime": 60,
                    "artifacts": [{{"type": "file", "path": "/x", "name": "live.log"}}]}}"#
            ),
            "/artifacts/0/name: artifact name \"live.log\" is taskvm's own",
        ),
        (
            "missing-file",
            r#"{"image": "file:///nonexistent/image.tar.zst", "command": ["true"], "maxRunTime": 60}"#
                .to_owned(),
            "No such file",
        ),
        (
            "http-404",
            format!(
                r#"{{"image": "{}", "command": ["true"], "maxRunTime": 60}}"#,
                server.url("/gone.tar.zst")
            ),
            "HTTP 404",
        ),
        (
            "hostile-image",
            format!(
                r#"{{"image": "{}", "command": ["true"], "maxRunTime": 60}}"#,
                server.url("/hostile.tar.zst")
            ),
            "\"evil\" is a symbolic link",
        ),
        ("not-json", "{ this is not json".to_owned(), "JSON"),
    ];
    for (name, text, expected) in &cases {
        let payload = scene.payload(name, text);
        let run = scene.run_with_cache(&payload, name, &cache);
        assert_eq!(run.code(), Some(2), "{name}: {}", run.explain());
        assert!(
            run.stderr().contains(expected),
            "{name}: want {expected:?}\n{}",
            run.explain()
        );
        assert!(run.log.contains(expected), "{name}: the log says why too");
        assert!(run.vm().is_none(), "{name}: no VM was started");
    }
    assert!(
        scene.leftovers(None).is_empty(),
        "{:?}",
        scene.leftovers(None)
    );
    for dir in ["tmp", "sha256"] {
        let left: Vec<_> = std::fs::read_dir(cache.join(dir))
            .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "cache {dir}/ holds {left:?}");
    }
}

#[test]
fn sigterm_cancels_the_task_and_removes_everything() {
    let scene = Scene::new();
    let (mut child, vm) = scene.start_sleeper("cancel");
    let started = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let log = std::fs::read_to_string(scene.artifacts("cancel").join("live.log")).unwrap();
    assert!(
        log.contains("[taskvm] the task was canceled; the VM was killed"),
        "{log}"
    );
    assert!(log.contains("resolved exception/canceled"), "{log}");
    assert!(
        scene.leftovers(Some(&vm)).is_empty(),
        "{:?}",
        scene.leftovers(Some(&vm))
    );
}

/// QEMU's pid, from the VM's record.
fn qemu_pid(scene: &Scene, vm: &str) -> i32 {
    let record =
        std::fs::read_to_string(scene.state().join("vms").join(format!("{vm}.record"))).unwrap();
    record
        .lines()
        .find_map(|line| line.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_qemu_crash_mid_task_is_an_internal_error() {
    let scene = Scene::new();
    let (mut child, vm) = scene.start_sleeper("crash");
    let pid = qemu_pid(&scene, &vm);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(3));
    let log = std::fs::read_to_string(scene.artifacts("crash").join("live.log")).unwrap();
    assert!(log.contains("QEMU ended unexpectedly"), "{log}");
    assert!(log.contains("resolved exception/internal-error"), "{log}");
    assert!(
        scene.leftovers(Some(&vm)).is_empty(),
        "{:?}",
        scene.leftovers(Some(&vm))
    );
}

#[test]
fn kill_9_mid_task_then_the_next_run_sweeps_everything() {
    let scene = Scene::new();
    let (mut child, vm) = scene.start_sleeper("killed");
    let qemu = qemu_pid(&scene, &vm);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // QEMU dies with its parent (PR_SET_PDEATHSIG); the namespace, record and directory stay.
    assert!(
        eventually(Duration::from_secs(10), || !Path::new(&format!(
            "/proc/{qemu}"
        ))
        .exists()),
        "QEMU outlived the worker"
    );
    let before = scene.leftovers(Some(&vm));
    assert!(before.contains(&format!("taskvm-{vm}")), "{before:?}");
    assert!(before.contains(&format!("vms/{vm}.record")), "{before:?}");

    let run = scene.run(&scene.example("hello"), "after");
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    assert!(run.stderr().contains("swept 1 VM(s)"), "{}", run.explain());
    assert!(
        scene.leftovers(Some(&vm)).is_empty(),
        "{:?}",
        scene.leftovers(Some(&vm))
    );
}

#[test]
fn a_host_that_cannot_run_vms_says_what_is_wrong_before_any_task() {
    let scene = Scene::new();
    // VMs' ids would be those of a real account (nobody, 65534).
    let run = scene.run_configured(
        &scene.example("hello"),
        "colliding-ids",
        r#"{"sandbox": {"idRange": {"first": 65534, "count": 1}}}"#,
    );
    assert_eq!(run.code(), Some(3), "{}", run.explain());
    assert!(
        run.stderr()
            .contains("sandbox.idRange (65534..65535) holds user \"nobody\""),
        "{}",
        run.explain()
    );
    assert!(!run.stdout().contains("hello from"), "{}", run.explain());
    assert!(scene.leftovers(None).is_empty());
}

/// `accel = auto` never boots a task's kernel to decide: a kernel that hangs on purpose would
/// push every later task onto TCG. With no trusted kernel on this host (no
/// `sandbox.probeKernel`, no `/boot/vmlinuz-RELEASE`), `auto` says so and uses TCG, although
/// the task's image has a kernel, and no verdict is stored.
#[test]
fn auto_never_probes_kvm_with_the_tasks_kernel() {
    let scene = Scene::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    if Path::new(&format!("/boot/vmlinuz-{}", release.trim())).exists()
        || !Path::new("/dev/kvm").exists()
    {
        eprintln!("this host has its own kernel to probe with, or no KVM: nothing to show here");
        return;
    }
    let output = taskvm_command(&[])
        .arg("run")
        .arg(scene.example("hello"))
        .arg("--cache")
        .arg(shared_cache())
        .arg("--state")
        .arg(scene.state())
        .arg("--artifacts")
        .arg(scene.artifacts("auto"))
        .arg("--accel")
        .arg("auto")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("no trusted kernel to probe it with"),
        "{stderr}"
    );
    assert!(
        !scene.state().join("accel.json").exists(),
        "no verdict from a task's kernel"
    );
}

/// QEMU reads nothing of the cache by its name (its disk layers are descriptors, its boot
/// files are shown in its jail by root), so a cache only root can reach works.
#[test]
fn a_cache_only_root_can_reach_serves_jailed_vms() {
    let scene = Scene::new();
    let private = scene.scratch.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let run = scene.run_with_cache(&scene.example("hello"), "private", &private.join("cache"));
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    assert!(run.stdout().contains("hello from"), "{}", run.explain());
    assert!(scene.leftovers(None).is_empty());
}

#[test]
fn a_run_whose_terminal_went_away_still_resolves_and_cleans_up() {
    let scene = Scene::new();
    let mut child = Running(
        scene
            .command(&scene.example("hello"), "no-terminal", &shared_cache())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Every write to stdout or stderr now fails with EPIPE.
    drop(child.0.stdout.take());
    drop(child.0.stderr.take());
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "taskvm run hung without a terminal"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0));
    let log = std::fs::read_to_string(scene.artifacts("no-terminal").join("live.log")).unwrap();
    assert!(log.contains("hello from Linux"), "{log}");
    assert!(log.contains("[taskvm] resolved completed"), "{log}");
    assert!(
        scene.leftovers(None).is_empty(),
        "{:?}",
        scene.leftovers(None)
    );
}

#[test]
fn without_root_or_capabilities_taskvm_run_says_what_it_needs() {
    use std::os::unix::process::CommandExt;
    let scene = Scene::new();
    // A copy the unprivileged user can surely reach, wherever the checkout is.
    let binary = scene.scratch.path().join("taskvm");
    std::fs::copy(env!("CARGO_BIN_EXE_taskvm"), &binary).unwrap();
    let output = Command::new(&binary)
        .arg("run")
        .arg(scene.example("hello"))
        .arg("--state")
        .arg(scene.state())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("needs root or CAP_NET_ADMIN") && stderr.contains("uid 65534"),
        "{stderr}"
    );
    assert!(!scene.state().exists(), "nothing was created");
}

#[test]
fn the_first_task_makes_a_snapshot_and_later_ones_restore_it() {
    let scene = Scene::new();
    let hello = scene.example("hello");
    let first = scene.run(&hello, "first");
    assert_eq!(first.code(), Some(0), "{}", first.explain());
    assert!(
        first.log.contains("made for this image and machine"),
        "{}",
        first.log
    );
    let second = scene.run(&hello, "second");
    assert_eq!(second.code(), Some(0), "{}", second.explain());
    assert!(
        !second.log.contains("made for this image"),
        "{}",
        second.log
    );
    assert!(second.log.contains("(start snapshot, "), "{}", second.log);
    assert!(second.stdout().contains("hello from Linux 6.1"));
    assert!(
        std::fs::read_to_string(scene.artifacts("second").join("serial.log"))
            .unwrap()
            .contains("taskvm-agent: ready"),
        "a restored VM's console continues the snapshot's"
    );

    let booted = scene
        .command(&hello, "booted", &shared_cache())
        .args(["--start", "boot"])
        .output()
        .unwrap();
    assert_eq!(booted.status.code(), Some(0));
    let log = std::fs::read_to_string(scene.artifacts("booted").join("live.log")).unwrap();
    assert!(log.contains("(start boot, "), "{log}");

    // Another machine is another key, so another snapshot.
    let bigger = scene.run(&scene.example("machine-override"), "bigger");
    assert_eq!(bigger.code(), Some(0), "{}", bigger.explain());
    assert!(
        bigger.log.contains("made for this image and machine"),
        "{}",
        bigger.log
    );
    assert_eq!(snapshot_dirs(&scene).len(), 2);
}

fn snapshot_dirs(scene: &Scene) -> Vec<PathBuf> {
    std::fs::read_dir(scene.state().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect()
}

#[test]
fn a_snapshot_that_does_not_restore_is_discarded_and_the_task_booted() {
    let scene = Scene::new();
    let hello = scene.example("hello");
    assert_eq!(scene.run(&hello, "first").code(), Some(0));
    let [snapshot] = snapshot_dirs(&scene).try_into().unwrap();
    let state = snapshot.join("state.bin");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).unwrap();
    let length = std::fs::metadata(&state).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap();
    file.set_len(length / 3).unwrap();

    let run = scene.run(&hello, "corrupt");
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    assert_eq!(
        run.log.matches("did not restore").count(),
        1,
        "one warning: {}",
        run.log
    );
    assert!(run.log.contains("booting instead") && run.log.contains("(start boot, "));
    assert!(run.stdout().contains("hello from Linux"));
    let again = scene.run(&hello, "again");
    assert!(
        again.log.contains("made for this image and machine"),
        "rebuilt: {}",
        again.log
    );
    assert!(scene.leftovers(run.vm().as_deref()).is_empty());
}

#[test]
fn concurrent_first_tasks_make_one_snapshot() {
    let scene = Scene::new();
    let hello = scene.example("hello");
    let runs: Vec<Running> = ["one", "two"]
        .iter()
        .map(|name| {
            Running(
                scene
                    .command(&hello, name, &shared_cache())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    for (mut run, name) in runs.into_iter().zip(["one", "two"]) {
        let code = run.0.wait().unwrap().code();
        let log = std::fs::read_to_string(scene.artifacts(name).join("live.log"));
        assert_eq!(code, Some(0), "{name}: {log:?}");
    }
    let made: usize = ["one", "two"]
        .iter()
        .map(|name| {
            std::fs::read_to_string(scene.artifacts(name).join("live.log"))
                .unwrap()
                .matches("made for this image and machine")
                .count()
        })
        .sum();
    assert_eq!(made, 1, "one builder, one waiter");
    assert_eq!(snapshot_dirs(&scene).len(), 1);
}

#[test]
fn image_warm_makes_the_snapshot_ahead_and_gc_removes_it_with_its_image() {
    let scene = Scene::new();
    let cache = scene.scratch.path().join("private-cache");
    let warm = taskvm_command(&[])
        .args(["image", "warm"])
        .arg(minimal_image())
        .arg("--cache")
        .arg(&cache)
        .arg("--state")
        .arg(scene.state())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&warm.stdout);
    assert_eq!(
        warm.status.code(),
        Some(0),
        "{said}{}",
        String::from_utf8_lossy(&warm.stderr)
    );
    assert!(
        said.starts_with("snapshot ") && said.contains("made in"),
        "{said}"
    );

    let run = scene.run_with_cache(&scene.example("hello"), "after-warm", &cache);
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    assert!(!run.log.contains("made for this image"), "{}", run.log);
    assert!(run.log.contains("(start snapshot, "), "{}", run.log);

    let gc = taskvm_command(&[])
        .args([
            "image",
            "gc",
            "--max-size",
            "0",
            "--min-free",
            "0",
            "--cache",
        ])
        .arg(&cache)
        .arg("--state")
        .arg(scene.state())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&gc.stdout);
    assert_eq!(gc.status.code(), Some(0), "{said}");
    assert!(
        said.contains("removed 1 snapshot(s) of removed images"),
        "{said}"
    );
    assert!(snapshot_dirs(&scene).is_empty());
}

#[test]
fn a_second_run_on_the_same_state_leaves_the_first_runs_vm_alone() {
    let scene = Scene::new();
    let (mut first, vm) = scene.start_sleeper("long");
    let qemu = qemu_pid(&scene, &vm);
    // Its start-up sweep must see a live owner, not a leftover.
    let second = scene.run(&scene.example("hello"), "second");
    assert_eq!(second.code(), Some(0), "{}", second.explain());
    assert!(!second.stderr().contains("swept"), "{}", second.explain());
    assert!(
        Path::new(&format!("/proc/{qemu}")).exists(),
        "the first VM still runs"
    );
    assert!(Path::new("/run/netns")
        .join(format!("taskvm-{vm}"))
        .exists());
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&first.0),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert_eq!(first.0.wait().unwrap().code(), Some(3));
    assert!(
        scene.leftovers(Some(&vm)).is_empty(),
        "{:?}",
        scene.leftovers(Some(&vm))
    );
}
