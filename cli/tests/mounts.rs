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

/// Runs `payloads` (name, payload) at once; each one's exit code, stdout and log.
fn run_at_once(scene: &Scene, payloads: &[(&str, PathBuf)]) -> Vec<(Option<i32>, String, String)> {
    let runs: Vec<Running> = payloads
        .iter()
        .map(|(name, payload)| {
            Running(
                scene
                    .command(payload, name, &shared_cache())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    runs.into_iter()
        .zip(payloads)
        .map(|(mut run, (name, _))| {
            let mut stdout = String::new();
            run.0
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut stdout)
                .unwrap();
            let code = run.0.wait().unwrap().code();
            let log =
                std::fs::read_to_string(scene.artifacts(name).join("live.log")).unwrap_or_default();
            (code, stdout, log)
        })
        .collect()
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

    // What an operator sees and does.
    let state = scene.state();
    let cache = |args: &[&str]| {
        let output = common::taskvm_command(&["cache"])
            .args(args)
            .arg("--state")
            .arg(&state)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.code(), text)
    };
    let (code, listed) = cache(&["ls"]);
    assert_eq!(code, Some(0), "{listed}");
    let row = listed
        .lines()
        .find(|line| line.starts_with("deps "))
        .expect(&listed);
    assert!(row.contains(" no ") && row.contains(" ago"), "{listed}");
    let (code, said) = cache(&["rm", "nothing-here"]);
    assert_eq!(
        (code, said.trim()),
        (Some(1), "taskvm: no cache \"nothing-here\"")
    );
    let (code, said) = cache(&["gc", "--max-size", "0"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("removed deps copy 0"), "{said}");
    assert!(copies(&scene).is_empty());
}

#[test]
fn concurrent_tasks_naming_one_cache_each_get_their_own_copy() {
    let scene = Scene::new();
    let names = ["left", "right"];
    let payloads: Vec<(&str, PathBuf)> = names
        .iter()
        .map(|name| {
            let script = format!(
                "test -e /deps/owner && echo FOUND-$(cat /deps/owner); echo {name} > \
                 /deps/owner; sleep 4; echo OWNER-$(cat /deps/owner)"
            );
            (*name, cache_task(&scene, name, &script, ""))
        })
        .collect();
    for ((code, stdout, log), name) in run_at_once(&scene, &payloads).into_iter().zip(names) {
        assert_eq!(code, Some(0), "{name}: {log}");
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

/// A tar.zst of a small source tree of this run's own: a file, an executable script, an empty
/// directory and a symbolic link (which content leaves out); its sha256.
fn source_tree(path: &Path) -> String {
    use testkit::images::Entry;
    // Content of its own, so that this run unpacks it even when the shared cache has another's.
    let nonce = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
    let tar = testkit::images::tar_bytes(&[
        Entry::special("src/", tar::EntryType::Directory, None).with_mode(0o755),
        Entry::file("src/main.c", "int main(void) { return 0; }\n"),
        Entry::file("bin/run.sh", "#!/bin/sh\necho RUN-OK\n").with_mode(0o755),
        Entry::special("empty/", tar::EntryType::Directory, None).with_mode(0o755),
        Entry::special("link", tar::EntryType::Symlink, Some("/etc/passwd")),
        Entry::file("nonce", nonce),
    ]);
    std::fs::write(path, testkit::images::zstd_bytes(&tar)).unwrap();
    testkit::images::sha256_file(path)
}

fn content_task(scene: &Scene, name: &str, archive: &Path, sha256: &str, script: &str) -> PathBuf {
    let command = serde_json::to_string(&["sh", "-c", script]).unwrap();
    scene.payload(
        name,
        &with_test_images(&format!(
            r#"{{"image": "file:///usr/share/taskvm/images/minimal.tar.zst",
                "command": {command}, "maxRunTime": 300, "screenshot": false,
                "mounts": [
                  {{"content": {{"url": "file://{}", "sha256": "{sha256}"}}, "format": "tar.zst",
                    "path": "/src"}},
                  {{"cache": "deps", "path": "/deps"}}
                ]}}"#,
            archive.display()
        )),
    )
}

#[test]
fn content_is_mounted_read_only_shared_and_hostile_archives_are_malformed() {
    let scene = Scene::new();
    let archive = scene.scratch.path().join("src.tar.zst");
    let sha256 = source_tree(&archive);
    let script = "cat /src/src/main.c; /src/bin/run.sh; test -e /src/link || echo NO-LINK; \
                  test -d /src/empty && echo EMPTY-DIR; touch /src/x 2>/dev/null || echo READ-ONLY; \
                  echo cached > /deps/marker && echo WROTE-CACHE";
    let names = ["first", "second"];
    let payloads: Vec<(&str, PathBuf)> = names
        .iter()
        .map(|name| (*name, content_task(&scene, name, &archive, &sha256, script)))
        .collect();
    let mut unpacked = 0;
    for ((code, stdout, log), name) in run_at_once(&scene, &payloads).into_iter().zip(names) {
        assert_eq!(code, Some(0), "{name}: {log}");
        for expected in [
            "int main(void)",
            "RUN-OK",
            "NO-LINK",
            "EMPTY-DIR",
            "READ-ONLY",
            "WROTE-CACHE",
        ] {
            assert!(
                stdout.contains(expected),
                "{name}: no {expected} in {stdout}\n{log}"
            );
        }
        assert!(
            log.contains(&format!("content sha256:{sha256} at /src (read-only")),
            "{log}"
        );
        if log.contains("unpacked now; 1 links or special files left out") {
            unpacked += 1;
        }
    }
    assert_eq!(unpacked, 1, "unpacked once for both tasks");

    // Hostile archives: a name leaving the tree, a digest that does not match, a metadata
    // bomb.
    let hostile = scene.scratch.path().join("hostile.tar.zst");
    let entries = [testkit::images::Entry::file("../escape", "x")];
    std::fs::write(&hostile, testkit::images::image(&entries)).unwrap();
    let hostile_sha = testkit::images::sha256_file(&hostile);
    // A GNU long name declaring 3 GiB (about 100 KB compressed): refused before it is read.
    let bomb = scene.scratch.path().join("bomb.tar.zst");
    testkit::images::metadata_bomb_image(b'L', 3 << 30, &bomb);
    let bomb_sha = testkit::images::sha256_file(&bomb);
    let zeros = "0".repeat(64);
    for (name, archive, sha, expected) in [
        ("escape", &hostile, hostile_sha.as_str(), "forbidden name"),
        ("mismatch", &hostile, zeros.as_str(), "sha256 mismatch"),
        ("bomb", &bomb, bomb_sha.as_str(), "refused tar header"),
    ] {
        let payload = content_task(&scene, name, archive, sha, "echo SHOULD-NOT-RUN");
        let run = scene.run(&payload, name);
        assert_eq!(run.code(), Some(2), "{}", run.explain());
        assert!(run.log.contains(expected), "{name}: {}", run.log);
        assert!(!run.stdout().contains("SHOULD-NOT-RUN"));
    }
    let content_dir = shared_cache().join("content");
    assert!(!content_dir.join("escape").exists());
    let building: Vec<_> = std::fs::read_dir(&content_dir)
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".building"))
        .collect();
    assert!(
        building.is_empty(),
        "no work directory is left: {building:?}"
    );
}
