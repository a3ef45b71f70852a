//! `taskvm worker` against a real Taskcluster deployment on this machine (`tc-local`, which
//! `make test` brings up with `TASK_CLAIM_TIMEOUT=15`): tasks created with the admin client,
//! real VMs under TCG, artifacts read back from the queue.

#[path = "../common/mod.rs"]
mod common;
mod deployment;
mod fleet;
mod interactive;
mod livelog;

use std::time::{Duration, Instant};

use deployment::*;
use serde_json::json;
use testkit::guest::{display_image, minimal_image};
use testkit::process::{file_url, qemu_processes_under};

#[test]
fn a_worker_resolves_each_kind_of_task_and_publishes_its_artifacts() {
    let deployment = Deployment::get();
    let dir = scratch();
    let queue_id = own_queue("kinds");
    let completed = create_task(
        &deployment,
        &queue_id,
        json!({
            "image": file_url(minimal_image()),
            "command": ["sh", "-c", "echo hello from the queue; mkdir -p /out/sub; echo one > /out/a.txt; echo two > /out/sub/b.txt; echo report > /report.txt"],
            "maxRunTime": 60,
            "artifacts": [
                { "type": "file", "path": "/report.txt", "name": "public/report.txt" },
                { "type": "directory", "path": "/out", "name": "public/out" },
                { "type": "file", "path": "/nonexistent", "name": "public/missing.txt" }
            ]
        }),
    );
    let failed = create_task(
        &deployment,
        &queue_id,
        script("echo about to fail; exit 3", 60),
    );
    let timeout = create_task(
        &deployment,
        &queue_id,
        script("echo sleeping; sleep 300", 5),
    );
    let malformed = create_task(&deployment, &queue_id, json!({ "image": 7, "command": [] }));
    let screenshot = create_task(
        &deployment,
        &queue_id,
        json!({
            "image": file_url(display_image()),
            "command": ["sh", "-c", "echo on screen > /dev/tty0; echo drew"],
            "maxRunTime": 60,
            "screenshot": true
        }),
    );
    let mut worker = Worker::start(
        &deployment,
        &queue_id,
        &dir.path().join("w1"),
        &["--capacity", "2"],
    );

    let patience = Duration::from_secs(240);
    let status = wait_resolved(&deployment, &completed, patience);
    // The missing artifact makes the task fail, as `taskvm run` would; the others arrive.
    assert_eq!(status["runs"][0]["state"], "failed", "{status:#}");
    let (code, log) = artifact(&deployment, &completed, 0, "public/logs/live_backing.log");
    assert_eq!(code, 200);
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("hello from the queue"), "{log}");
    assert!(
        log.contains("artifact public/missing.txt is missing"),
        "{log}"
    );
    assert_eq!(
        artifact(&deployment, &completed, 0, "public/report.txt"),
        (200, b"report\n".to_vec())
    );
    let names = artifact_names(&deployment, &completed, 0);
    for name in [
        "public/logs/serial.log",
        "public/out/a.txt",
        "public/out/sub/b.txt",
        "public/missing.txt",
    ] {
        assert!(
            names.iter().any(|found| found == name),
            "{name} in {names:?}"
        );
    }
    assert_eq!(
        artifact(&deployment, &completed, 0, "public/out/sub/b.txt").1,
        b"two\n"
    );
    assert_eq!(
        artifact(&deployment, &completed, 0, "public/missing.txt").0,
        424
    );

    let status = wait_resolved(&deployment, &failed, patience);
    assert_eq!(status["runs"][0]["state"], "failed", "{status:#}");
    let log = artifact(&deployment, &failed, 0, "public/logs/live_backing.log").1;
    assert!(String::from_utf8_lossy(&log).contains("the command exited with 3"));

    let status = wait_resolved(&deployment, &timeout, patience);
    assert_eq!(status["runs"][0]["state"], "failed", "{status:#}");
    let log = artifact(&deployment, &timeout, 0, "public/logs/live_backing.log").1;
    assert!(String::from_utf8_lossy(&log).contains("maxRunTime of 5 s exceeded"));

    let status = wait_resolved(&deployment, &malformed, patience);
    assert_eq!(status["runs"][0]["state"], "exception", "{status:#}");
    assert_eq!(status["runs"][0]["reasonResolved"], "malformed-payload");
    let log = artifact(&deployment, &malformed, 0, "public/logs/live_backing.log").1;
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("/image"), "{log}");

    let status = wait_resolved(&deployment, &screenshot, patience);
    assert_eq!(status["runs"][0]["state"], "completed", "{status:#}");
    let (code, png) = artifact(&deployment, &screenshot, 0, "public/screenshot.png");
    assert_eq!(code, 200);
    assert!(png.starts_with(b"\x89PNG"));

    // The worker kept running through all of it, one line per claim and resolution.
    for task_id in [&completed, &failed, &timeout, &malformed, &screenshot] {
        assert!(worker.said(&format!("claimed task {task_id} run 0")));
        assert!(worker.said(&format!("task {task_id} run 0 resolved")));
    }
    assert!(worker.process.is_running(), "{:#?}", worker.process.lines());
}

#[test]
fn two_workers_run_each_task_once_and_a_killed_workers_claim_expires_to_the_other() {
    let deployment = Deployment::get();
    let dir = scratch();
    let queue_id = own_queue("fleet");
    let tasks: Vec<String> = (0..4)
        .map(|index| {
            create_task(
                &deployment,
                &queue_id,
                script(&format!("echo task {index}; sleep 2"), 60),
            )
        })
        .collect();
    let first = Worker::start(&deployment, &queue_id, &dir.path().join("a"), &[]);
    let second = Worker::start(&deployment, &queue_id, &dir.path().join("b"), &[]);
    for task_id in &tasks {
        let status = wait_resolved(&deployment, task_id, Duration::from_secs(240));
        let runs = status["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 1, "{status:#}");
        assert_eq!(runs[0]["state"], "completed", "{status:#}");
    }
    let ran_on_first = tasks
        .iter()
        .filter(|id| first.said(&format!("claimed task {id}")))
        .count();
    let ran_on_second = tasks
        .iter()
        .filter(|id| second.said(&format!("claimed task {id}")))
        .count();
    assert_eq!(
        ran_on_first + ran_on_second,
        4,
        "each task claimed exactly once"
    );

    // kill -9 whichever worker claims the next task mid-run: the claim expires
    // (TASK_CLAIM_TIMEOUT=15) and the other worker runs the task's next run.
    let long = create_task(
        &deployment,
        &queue_id,
        script("echo long task; sleep 8; echo done", 120),
    );
    let claimed = format!("claimed task {long} run 0");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !first.said(&claimed) && !second.said(&claimed) {
        assert!(Instant::now() < deadline, "nobody claimed {long}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (mut killed, survivor, killed_state) = if first.said(&claimed) {
        (first, second, dir.path().join("a"))
    } else {
        (second, first, dir.path().join("b"))
    };
    std::thread::sleep(Duration::from_secs(3));
    killed.signal(rustix::process::Signal::KILL);
    killed.wait_exit(Duration::from_secs(10));
    drop(killed);
    let status = wait_resolved(&deployment, &long, Duration::from_secs(240));
    let runs = status["runs"].as_array().unwrap();
    assert_eq!(runs[0]["state"], "exception", "{status:#}");
    assert_eq!(runs[0]["reasonResolved"], "claim-expired", "{status:#}");
    assert_eq!(runs.last().unwrap()["state"], "completed", "{status:#}");
    assert!(survivor.said(&format!("claimed task {long} run 1")));
    let log = artifact(&deployment, &long, 1, "public/logs/live_backing.log").1;
    assert!(String::from_utf8_lossy(&log).contains("done"));

    // The killed worker's next start leaves nothing of it behind.
    let restarted = Worker::start(&deployment, &queue_id, &killed_state, &[]);
    restarted.wait_said("claiming from", Duration::from_secs(60));
    assert!(
        restarted.said("swept 1 VM(s)"),
        "{:#?}",
        restarted.process.lines()
    );
    assert_eq!(qemu_processes_under(&restarted.state), 0);
    for kept in ["run", "vms"] {
        let left: Vec<_> = std::fs::read_dir(restarted.state.join(kept))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "{kept}: {left:?}");
    }
    let worker_id = killed_state
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!restarted
        .state
        .join("worker/local")
        .join(worker_id)
        .exists());
    assert!(restarted.said("a previous worker left"));
}

#[test]
fn sigterm_lets_the_running_task_finish_or_resolves_it_worker_shutdown_after_the_grace() {
    let deployment = Deployment::get();
    let dir = scratch();
    let queue_id = own_queue("shutdown");

    // Within the grace: the task finishes and is completed; the worker exits 0.
    let short = create_task(
        &deployment,
        &queue_id,
        script("echo short; sleep 4; echo finished", 60),
    );
    let mut worker = Worker::start(
        &deployment,
        &queue_id,
        &dir.path().join("s1"),
        &["--shutdown-grace", "60"],
    );
    worker.wait_said(
        &format!("claimed task {short} run 0"),
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_secs(2));
    let signalled = Instant::now();
    worker.signal(rustix::process::Signal::TERM);
    let exit = worker.wait_exit(Duration::from_secs(65));
    assert!(exit.success(), "{exit:?}");
    assert!(signalled.elapsed() < Duration::from_secs(65));
    assert_eq!(status(&deployment, &short)["runs"][0]["state"], "completed");

    // Past the grace: resolved exception/worker-shutdown (the queue retries it), exit 0 in
    // grace + 5 s.
    let long = create_task(&deployment, &queue_id, script("echo long; sleep 100", 150));
    let mut worker = Worker::start(
        &deployment,
        &queue_id,
        &dir.path().join("s2"),
        &["--shutdown-grace", "3"],
    );
    worker.wait_said(
        &format!("claimed task {long} run 0"),
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_secs(4));
    let signalled = Instant::now();
    worker.signal(rustix::process::Signal::TERM);
    let exit = worker.wait_exit(Duration::from_secs(30));
    assert!(exit.success(), "{exit:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "{:?}",
        signalled.elapsed()
    );
    let status = status(&deployment, &long);
    assert_eq!(status["runs"][0]["state"], "exception", "{status:#}");
    assert_eq!(
        status["runs"][0]["reasonResolved"], "worker-shutdown",
        "{status:#}"
    );
    assert_eq!(qemu_processes_under(&dir.path().join("s2")), 0);
}

#[test]
fn a_cache_needs_its_scope_and_outlives_its_task_on_the_worker() {
    let deployment = Deployment::get();
    let dir = scratch();
    let queue_id = own_queue("caches");
    let cached = |text: &str| {
        let mut payload = script(text, 60);
        payload["mounts"] = json!([{ "cache": "deps", "path": "/deps" }]);
        payload
    };
    let unscoped = create_task(&deployment, &queue_id, cached("echo RAN"));
    let writer = create_task_with_scopes(
        &deployment,
        &queue_id,
        cached("echo from-the-first > /deps/marker"),
        &["taskvm:cache:deps"],
    );
    let mut worker = Worker::start(&deployment, &queue_id, &dir.path().join("w"), &[]);
    let status = wait_resolved(&deployment, &unscoped, Duration::from_secs(240));
    assert_eq!(
        status["runs"][0]["reasonResolved"], "malformed-payload",
        "{status:#}"
    );
    let (_, log) = artifact(&deployment, &unscoped, 0, "public/logs/live_backing.log");
    let log = String::from_utf8_lossy(&log);
    assert!(
        log.contains("the task's scopes do not include taskvm:cache:deps") && !log.contains("RAN"),
        "{log}"
    );
    let status = wait_resolved(&deployment, &writer, Duration::from_secs(240));
    assert_eq!(status["state"], "completed", "{status:#}");
    let reader = create_task_with_scopes(
        &deployment,
        &queue_id,
        cached("cat /deps/marker"),
        &["taskvm:cache:*"],
    );
    let status = wait_resolved(&deployment, &reader, Duration::from_secs(240));
    assert_eq!(status["state"], "completed", "{status:#}");
    let (_, log) = artifact(&deployment, &reader, 0, "public/logs/live_backing.log");
    assert!(
        String::from_utf8_lossy(&log).contains("from-the-first"),
        "{}",
        String::from_utf8_lossy(&log)
    );
    assert!(
        dir.path()
            .join("w/caches/taskcluster")
            .join(&queue_id)
            .join("deps/0.raw")
            .is_file(),
        "the pool's own caches"
    );
    worker.signal(rustix::process::Signal::TERM);
    assert!(worker.wait_exit(Duration::from_secs(60)).success());
}
