//! Payload `mounts` end to end with `taskvm run`, on real VMs under TCG (root only): a cache
//! outlives its task across snapshot starts, concurrent tasks get their own copies, an exit
//! status can purge it, a mount that cannot be made stops the command from running, and a
//! worker killed mid-write leaves a cache that is checked before anyone uses it again.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::scene::*;

use testkit::process::shared_cache;

/// A payload of the minimal test image running `script`, with cache `deps` at `/deps` and
/// `extra` fields (JSON members, or empty).
fn cache_task(scene: &Scene, name: &str, script: &str, extra: &str) -> PathBuf {
    let command = serde_json::to_string(&["sh", "-c", script]).unwrap();
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    scene.payload(
        name,
        &with_test_images(&format!(
            r#"{{"image": "file:///usr/share/taskvm/images/minimal.tar.zst",
                "command": {command}, "maxRunTime": 300, "screenshot": false,
                "mounts": [{{"cache": "deps", "path": "/deps"}}]{extra}}}"#
        )),
    )
}

/// `e2fsck -n -f` of a cache disk: whether the file system is consistent, and what it said.
fn consistent(disk: &Path) -> (bool, String) {
    let output = Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(disk)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

fn copies(scene: &Scene) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(scene.state().join("caches/deps"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".raw"))
        .collect();
    names.sort();
    names
}

#[test]
fn a_cache_outlives_its_task_across_snapshot_starts_and_is_purged_on_request() {
    let scene = Scene::new();
    let write = cache_task(
        &scene,
        "write",
        "echo one > /deps/marker && dd if=/dev/zero of=/deps/big bs=1M count=100 2>/dev/null \
         && sync && echo WROTE",
        "",
    );
    let run = scene.run(&write, "write");
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    assert!(run.stdout().contains("WROTE"), "{}", run.explain());
    assert!(run.log.contains("cache deps: made"), "{}", run.log);

    let read = cache_task(&scene, "read", "cat /deps/marker; wc -c < /deps/big", "");
    let run = scene.run(&read, "read");
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    assert!(
        run.log.contains("(start snapshot, "),
        "a task with mounts restores a snapshot: {}",
        run.log
    );
    let stdout = run.stdout();
    assert!(
        stdout.contains("one") && stdout.contains("104857600"),
        "{stdout}"
    );

    let purge = cache_task(
        &scene,
        "purge",
        "ls /deps; exit 3",
        r#""onExitStatus": {"purgeCaches": [3]}"#,
    );
    let run = scene.run(&purge, "purge");
    assert_eq!(run.code(), Some(1), "{}", run.explain());
    assert!(
        run.log.contains("cache deps purged (exit status 3"),
        "{}",
        run.log
    );

    let empty = cache_task(
        &scene,
        "empty",
        "test -e /deps/marker && echo STILL-THERE || echo EMPTY",
        "",
    );
    let run = scene.run(&empty, "empty");
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    assert!(run.stdout().contains("EMPTY"), "{}", run.explain());

    let [copy] = copies(&scene).try_into().unwrap();
    let (ok, said) = consistent(&scene.state().join("caches/deps").join(copy));
    assert!(ok, "{said}");
    assert!(
        scene.leftovers(None).is_empty(),
        "{:?}",
        scene.leftovers(None)
    );
    let snapshots = std::fs::read_dir(scene.state().join("snapshots")).unwrap();
    let slots: Vec<_> = snapshots
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".slots"))
        .collect();
    assert!(
        slots.is_empty(),
        "the build's blank disks are removed: {slots:?}"
    );
}

#[test]
fn concurrent_tasks_naming_one_cache_each_get_their_own_copy() {
    let scene = Scene::new();
    let names = ["left", "right"];
    let runs: Vec<Running> = names
        .iter()
        .map(|name| {
            let payload = cache_task(
                &scene,
                name,
                &format!(
                    "test -e /deps/owner && echo FOUND-$(cat /deps/owner); echo {name} > \
                     /deps/owner; sleep 4; echo OWNER-$(cat /deps/owner)"
                ),
                "",
            );
            Running(
                scene
                    .command(&payload, name, &shared_cache())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    for (mut run, name) in runs.into_iter().zip(names) {
        let mut stdout = String::new();
        run.0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        let status = run.0.wait().unwrap();
        let log =
            std::fs::read_to_string(scene.artifacts(name).join("live.log")).unwrap_or_default();
        assert_eq!(status.code(), Some(0), "{name}: {log}");
        assert!(
            stdout.contains(&format!("OWNER-{name}")),
            "{name}: {stdout}\n{log}"
        );
        assert!(
            !stdout.contains("FOUND-"),
            "{name} saw another task's copy: {stdout}"
        );
    }
    assert_eq!(copies(&scene), ["0.raw", "1.raw"]);
}

#[test]
fn a_mount_that_cannot_be_made_fails_the_task_without_running_its_command() {
    let scene = Scene::new();
    let payload = scene.payload(
        "unmountable",
        &with_test_images(
            r#"{"image": "file:///usr/share/taskvm/images/minimal.tar.zst",
                "command": ["sh", "-c", "echo SHOULD-NOT-RUN"], "maxRunTime": 60,
                "screenshot": false, "mounts": [{"cache": "deps", "path": "/etc/passwd"}]}"#,
        ),
    );
    let run = scene.run(&payload, "unmountable");
    assert_eq!(run.code(), Some(1), "{}", run.explain());
    assert!(
        !run.stdout().contains("SHOULD-NOT-RUN"),
        "{}",
        run.explain()
    );
    assert!(
        run.log
            .contains("the command did not run: cannot mount /etc/passwd"),
        "{}",
        run.log
    );
}

#[test]
fn a_worker_killed_mid_write_leaves_a_cache_that_is_checked_before_its_next_use() {
    let scene = Scene::new();
    let writer = cache_task(
        &scene,
        "writer",
        "echo WRITING; while true; do dd if=/dev/urandom of=/deps/f bs=64k count=32 2>/dev/null; \
         mkdir -p /deps/d$$; done",
        "",
    );
    let (mut running, vm) = scene.start_until(&writer, "writer", "WRITING");
    std::thread::sleep(Duration::from_secs(2));
    running.0.kill().unwrap(); // SIGKILL: the worker gets no chance to clean up
    running.0.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(20), || processes_mentioning(&vm)
            .is_empty()),
        "QEMU dies with its worker"
    );
    let next = cache_task(&scene, "next", "ls /deps > /dev/null && echo LISTED", "");
    let run = scene.run(&next, "next");
    assert_eq!(run.code(), Some(0), "{}", run.explain());
    assert!(run.stdout().contains("LISTED"), "{}", run.explain());
    assert!(
        run.log.contains("its last task did not end cleanly"),
        "the copy was checked: {}",
        run.log
    );
    let [copy] = copies(&scene).try_into().unwrap();
    let (ok, said) = consistent(&scene.state().join("caches/deps").join(copy));
    assert!(ok, "{said}");
}
