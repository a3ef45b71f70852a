//! Failed VMs kept for debugging, with `taskvm run`, `taskvm kept` and `taskvm debug`, on real
//! VMs under TCG (root only): a failed task's VM is kept, resumed twice from the moment it
//! failed (its file and its background process, same PID), deleted when its time is up; tasks
//! that succeed or do not ask keep nothing.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

mod common;
use common::scene::*;
use common::taskvm_command;

use testkit::process::shared_cache;

const FAILING: &str =
    "echo kept > /tmp/state.txt; sleep 1000 & echo $! > /tmp/sleeper; echo pid=$!; exit 1";

fn task(scene: &Scene, name: &str, script: &str, keep: bool) -> PathBuf {
    let command = serde_json::to_string(&["sh", "-c", script]).unwrap();
    let debug = if keep {
        r#", "debug": {"keepOnFailure": true}"#
    } else {
        ""
    };
    scene.payload(
        name,
        &with_test_images(&format!(
            r#"{{"image": "file:///usr/share/taskvm/images/minimal.tar.zst",
                "command": {command}, "maxRunTime": 60{debug}}}"#
        )),
    )
}

/// `taskvm ARGS` on the scene's state, cache and configuration.
fn taskvm_on(scene: &Scene, config: &PathBuf, args: &[&str]) -> Output {
    let mut command = taskvm_command(args);
    command
        .arg("--state")
        .arg(scene.state())
        .arg("--cache")
        .arg(shared_cache())
        .arg("--config")
        .arg(config);
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn a_failed_vm_is_kept_resumed_as_it_failed_and_deleted_when_its_time_is_up() {
    let scene = Scene::new();
    let config_text = r#"{"kept": {"ttl": 3600}}"#;
    let config = scene.payload("kept-config", config_text);
    // The same host with a ttl that is up at once: it applies to the VMs already kept.
    let expiring = scene.payload("expiring-config", r#"{"kept": {"ttl": 1}}"#);
    let run = scene.run_configured(
        &task(&scene, "failing", FAILING, true),
        "failing",
        config_text,
    );
    assert_eq!(run.code(), Some(1), "{}", run.explain());
    let name = run
        .log
        .lines()
        .find_map(|line| line.split("the failed VM is kept as ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("not kept: {}", run.log))
        .to_owned();
    let pid = run
        .log
        .lines()
        .find_map(|line| line.strip_prefix("pid="))
        .unwrap_or_else(|| panic!("{}", run.log))
        .to_owned();

    let listed = taskvm_on(&scene, &config, &["kept", "ls"]);
    assert!(
        text(&listed).contains(&name) && text(&listed).contains("sleep 1000"),
        "{}",
        text(&listed)
    );

    // Resumed: the command's file and its process, same PID; what a resume does is gone at
    // the next one.
    let probe =
        "cat /tmp/state.txt; kill -0 $(cat /tmp/sleeper) && echo alive-$(cat /tmp/sleeper); \
                 test -e /tmp/resumed && echo seen-before; touch /tmp/resumed";
    for _ in 0..2 {
        let resumed = taskvm_on(
            &scene,
            &config,
            &["debug", &name, "--accel", "tcg", "--exec", probe],
        );
        let said = text(&resumed);
        assert_eq!(resumed.status.code(), Some(0), "{said}");
        assert!(
            said.contains("kept\n") && said.contains(&format!("alive-{pid}\n")),
            "{said}"
        );
        assert!(!said.contains("seen-before"), "{said}");
    }
    // A script's exit status is the command's.
    let failed = taskvm_on(
        &scene,
        &config,
        &["debug", &name, "--accel", "tcg", "--exec", "exit 7"],
    );
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    assert!(text(&failed).contains("exit status 7"), "{}", text(&failed));
    assert!(
        scene.leftovers(None).is_empty(),
        "{:?}",
        scene.leftovers(None)
    );

    // Its image is pinned in the cache (no collection removes it) while it is kept.
    let kept_dir = scene.state().join("kept").join(&name);
    assert!(kept_dir.is_dir());
    let pin_of = |dir: &std::path::Path| {
        std::fs::read_dir(shared_cache().join("pins"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|pin| {
                std::fs::read_to_string(pin.path())
                    .is_ok_and(|holder| std::path::Path::new(&holder) == dir)
            })
    };
    assert!(pin_of(&kept_dir.canonicalize().unwrap()) || pin_of(&kept_dir));

    // Its time is up: deleted with everything it held.
    std::thread::sleep(Duration::from_secs(2));
    let listed = taskvm_on(&scene, &expiring, &["kept", "ls"]);
    assert!(
        !text(&listed).contains("sleep 1000") && text(&listed).contains(&format!("deleted {name}")),
        "{}",
        text(&listed)
    );
    assert!(!kept_dir.exists());
    let gone = taskvm_on(
        &scene,
        &config,
        &["debug", &name, "--accel", "tcg", "--exec", "true"],
    );
    assert_eq!(gone.status.code(), Some(3));
    assert!(text(&gone).contains("no kept VM named"), "{}", text(&gone));
}

#[test]
fn nothing_is_kept_when_the_task_succeeds_or_does_not_ask() {
    let scene = Scene::new();
    let passing = scene.run(&task(&scene, "passing", "echo fine", true), "passing");
    assert_eq!(passing.code(), Some(0), "{}", passing.explain());
    let unasked = scene.run(&task(&scene, "unasked", FAILING, false), "unasked");
    assert_eq!(unasked.code(), Some(1), "{}", unasked.explain());
    for run in [&passing, &unasked] {
        assert!(!run.log.contains("the failed VM is kept"), "{}", run.log);
    }
    let kept = std::fs::read_dir(scene.state().join("kept"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(kept, 0);
}
