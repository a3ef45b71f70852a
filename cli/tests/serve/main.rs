//! `taskvm serve` and `taskvm submit` as users run them: a real server on loopback, real VMs
//! under TCG, the real SQLite database; the web UI in headless Chromium; schemathesis against
//! the OpenAPI document; interactive shells (`shell`).

use std::process::Command;
use std::time::{Duration, Instant};

#[path = "../common/mod.rs"]
mod common;
mod kept;
mod server;
mod shell;

use common::taskvm_command;
use engine::qemu::screenshot::Screen;
use server::*;

use serde_json::{json, Value};
use testkit::guest::{config_allowing_test_images, display_image, minimal_image};
use testkit::process::{file_url, qemu_processes_under, shared_cache, Spawned};

#[test]
fn submit_follow_prints_the_log_and_exits_as_taskvm_run_with_artifacts_and_metrics() {
    let dir = scratch();
    let server = Server::start(&dir.path().join("state"), &["--concurrency", "2"]);

    // Completed, followed to the end by `taskvm submit --follow`.
    let payload = json!({
        "image": minimal(),
        "command": ["sh", "-c", "echo first line; mkdir -p /out/sub; echo data > /out/sub/a.txt; echo report > /report.txt; echo last line"],
        "maxRunTime": 60,
        "artifacts": [
            { "name": "report.txt", "path": "/report.txt", "type": "file" },
            { "name": "out", "path": "/out", "type": "directory" }
        ]
    });
    let path = write_payload(dir.path(), "ok.json", &payload);
    let output = submit_cli(&server, &path, true);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let first = stdout.find("first line").expect("the guest's output");
    assert!(stdout[first..].contains("last line"), "{stdout}");
    assert!(stdout.contains("[taskvm] resolved completed"), "{stdout}");
    assert!(stderr.contains("resolved completed"), "{stderr}");

    let task_id = server.get("/api/tasks?state=completed").1["tasks"][0]["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let task = server.task(&task_id);
    assert_eq!(task["resolution"], "completed");
    let run = &task["runs"][0];
    assert_eq!(run["exitCode"], 0);
    let names: Vec<&str> = run["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|file| file["name"].as_str().unwrap())
        .collect();
    for expected in ["live.log", "serial.log", "report.txt"] {
        assert!(names.contains(&expected), "{names:?}");
    }
    for file in run["artifacts"].as_array().unwrap() {
        let name = file["name"].as_str().unwrap();
        let (status, bytes) = server.get_bytes(&format!("/api/tasks/{task_id}/artifacts/{name}"));
        assert_eq!(status, 200, "{name}");
        assert_eq!(bytes.len() as u64, file["size"].as_u64().unwrap(), "{name}");
    }
    let (_, report) = server.get_bytes(&format!("/api/tasks/{task_id}/artifacts/report.txt"));
    assert_eq!(report, b"report\n");
    // Only recorded names are served: no way out of the run's directory.
    for hostile in [
        "..%2F..%2F..%2Fqueue.sqlite",
        "../../../queue.sqlite",
        "%2Fetc%2Fpasswd",
        "sub/../../../../etc/passwd",
        "nonexistent",
    ] {
        let (status, _) = server.get_bytes(&format!("/api/tasks/{task_id}/artifacts/{hostile}"));
        assert_eq!(status, 404, "{hostile}");
    }
    // The log endpoint gives the whole log of a resolved task at once.
    let (status, log) = server.get_bytes(&format!("/api/tasks/{task_id}/log"));
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&log).contains("last line"));

    // Failed: exit 3 → exit status 1, as `taskvm run`.
    let failing = write_payload(
        dir.path(),
        "fail.json",
        &script_task("echo failing; exit 3", 60),
    );
    let output = submit_cli(&server, &failing, true);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("failing"));

    // Malformed: refused at submission with every pointer, exit 2, nothing queued.
    let bad = json!({ "image": 5, "command": [], "maxRunTime": "soon", "extra": true });
    let malformed = write_payload(dir.path(), "bad.json", &bad);
    let before = server.get("/api/tasks").1["tasks"]
        .as_array()
        .unwrap()
        .len();
    let output = submit_cli(&server, &malformed, true);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for pointer in ["/image", "/maxRunTime", "/extra"] {
        assert!(stderr.contains(pointer), "{pointer} in {stderr}");
    }
    assert_eq!(
        server.get("/api/tasks").1["tasks"]
            .as_array()
            .unwrap()
            .len(),
        before
    );
    let over = json!({ "image": minimal(), "command": ["true"], "maxRunTime": 5, "machine": { "memory": 999999 } });
    let (status, body) = server.post("/api/tasks", &over);
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["violations"][0]["pointer"], "/machine/memory",
        "{body}"
    );

    // Bad requests: not JSON, not declared JSON, too large.
    let raw = |content_type: &str, body: Vec<u8>| {
        server
            .http
            .post(server.url("/api/tasks"))
            .header("content-type", content_type)
            // The server closes after refusing a body it did not read.
            .header("connection", "close")
            .body(body)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(raw("application/json", b"{not json".to_vec()), 400);
    assert_eq!(raw("text/plain", b"{}".to_vec()), 415);
    assert_eq!(raw("application/json", vec![b' '; 2 << 20]), 413);
    assert_eq!(server.get("/api/tasks/0123456789abcdef").0, 404);
    assert_eq!(server.get("/api/tasks/../../etc/passwd").0, 404);
    assert_eq!(server.get("/api/tasks?state=bogus").0, 400);

    // Metrics count what happened.
    let (status, metrics) = server.get_bytes("/metrics");
    assert_eq!(status, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    for line in [
        "taskvm_runs_resolved_total{resolution=\"completed\"} 1",
        "taskvm_runs_resolved_total{resolution=\"failed\"} 1",
        "taskvm_tasks_queued 0",
        "taskvm_tasks_running 0",
        "taskvm_stage_seconds_count{stage=\"boot\"} 2",
        "taskvm_run_seconds_count 2",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let (status, health) = server.get("/api/health");
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    let (status, openapi) = server.get("/api/openapi.json");
    assert_eq!(status, 200);
    assert_eq!(openapi["openapi"], "3.1.0");

    let (status, took) = server.terminate();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn tasks_past_the_hosts_memory_wait_for_capacity_and_all_complete() {
    let dir = scratch();
    let state = dir.path().join("state");
    // Four slots and eight vCPUs, but memory for two 256 MiB VMs: two tasks wait, none fails.
    let server = Server::start(
        &state,
        &["--concurrency", "4", "--memory", "600", "--cpus", "8"],
    );
    let tasks: Vec<String> = (0..4)
        .map(|index| server.submit(&script_task(&format!("sleep 3; echo done {index}"), 60)))
        .collect();
    let mut most = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while tasks.iter().any(|task| {
        matches!(
            server.task(task)["state"].as_str(),
            Some("queued" | "running")
        )
    }) {
        most = most.max(qemu_processes_under(&state));
        assert!(
            std::time::Instant::now() < deadline,
            "the tasks never ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for task in &tasks {
        assert_eq!(server.task(task)["resolution"], "completed");
    }
    assert!(most <= 2, "{most} VMs at once with memory for two");
    assert!(most >= 1);
}

#[test]
fn concurrency_and_host_capacity_bound_the_vms_and_cancel_works_queued_and_running() {
    let dir = scratch();
    let state = dir.path().join("state");
    // Two slots, but memory for one 256 MiB VM only.
    let server = Server::start(&state, &["--concurrency", "2", "--memory", "400"]);
    let long = script_task("echo started; sleep 100", 150);
    let first = server.submit(&long);
    let second = server.submit(&long);
    let c = server.submit(&long);
    // Both claimed tasks fetch their image, then queue for host capacity in the order they
    // get there: on a busy host the second one submitted may get there first. Whichever
    // starts is `a`; the other (`b`) holds the second slot and waits for memory, and c waits
    // for a slot.
    let submitted_first = first.clone();
    let (a, b) = server.wait_first_log([first, second], "started");
    let order = if a == submitted_first {
        "first"
    } else {
        "second"
    };
    eprintln!("the task submitted {order} reached host capacity first");
    server.wait_for(&b, Duration::from_secs(30), |task| {
        task["state"] == "running"
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(server.task(&c)["state"], "queued");
    assert!(
        !server.log_now(&b).contains("VM task-"),
        "{}",
        server.log_now(&b)
    );
    assert_eq!(qemu_processes_under(&state), 1);
    let (_, health) = server.get("/api/health");
    assert_eq!(health["capacity"]["used"]["memoryMib"], 256, "{health}");

    // Canceling the queued one resolves it at once, without a VM.
    let (status, body) = server.post(&format!("/api/tasks/{c}/cancel"), &json!({}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.task(&c)["resolution"], "exception/canceled");
    let (status, _) = server.post(&format!("/api/tasks/{c}/cancel"), &json!({}));
    assert_eq!(status, 409);

    // Canceling the running one kills its VM; b gets the memory and starts.
    let canceled_at = Instant::now();
    let (status, body) = server.post(&format!("/api/tasks/{a}/cancel"), &json!({}));
    assert_eq!(status, 202, "{body}");
    let a_done = server.wait_resolved(&a);
    assert_eq!(a_done["resolution"], "exception/canceled", "{a_done}");
    assert!(canceled_at.elapsed() < Duration::from_secs(15));
    server.wait_log(&b, "started");
    assert!(
        server.log_now(&b).contains("for host capacity"),
        "{}",
        server.log_now(&b)
    );
    assert_eq!(qemu_processes_under(&state), 1);

    // A task canceled while it waits to start never gets a VM either.
    let d = server.submit(&long);
    server.wait_for(&d, Duration::from_secs(30), |task| {
        task["state"] == "running"
    });
    let (status, _) = server.post(&format!("/api/tasks/{d}/cancel"), &json!({}));
    assert_eq!(status, 202);
    assert_eq!(server.wait_resolved(&d)["resolution"], "exception/canceled");
    assert!(!server.log_now(&d).contains("VM task-"));

    let (status, _) = server.post(&format!("/api/tasks/{b}/cancel"), &json!({}));
    assert_eq!(status, 202);
    assert_eq!(server.wait_resolved(&b)["resolution"], "exception/canceled");
    let (status, _) = server.terminate();
    assert!(status.success());
    assert_eq!(qemu_processes_under(&state), 0);
}

#[test]
fn file_images_are_refused_unless_a_regular_file_below_an_allowed_directory() {
    let dir = scratch();
    let allowed = dir.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let fifo = allowed.join("fifo.tar.zst");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let link = allowed.join("link.tar.zst");
    std::os::unix::fs::symlink(minimal_image(), &link).unwrap();
    std::fs::create_dir(allowed.join("a-directory")).unwrap();
    let config = format!(
        r#"{{"images": {{"fileDirs": [{:?}]}}}}"#,
        allowed.display().to_string()
    );
    let server = Server::start_configured(&dir.path().join("state"), &config, &[]);
    let outside = file_url(minimal_image());
    for (image, expected) in [
        (file_url(fifo.clone()), "a FIFO, not a regular file"),
        (
            "file:///dev/zero".to_owned(),
            "not below a directory of images.fileDirs",
        ),
        (format!("file://{}", link.display()), "a symbolic link"),
        (
            file_url(allowed.join("a-directory")),
            "a directory, not a regular file",
        ),
        (outside, "not below a directory of images.fileDirs"),
    ] {
        let submitted = Instant::now();
        let task = server.submit(&json!({"image": image, "command": ["true"], "maxRunTime": 60}));
        let done = server.wait_for(&task, Duration::from_secs(30), |task| {
            task["state"] != "queued" && task["state"] != "running"
        });
        let took = submitted.elapsed();
        let run = &done["runs"][0];
        eprintln!(
            "{image}: {} after {took:?}: {}",
            run["resolution"], run["reason"]
        );
        assert_eq!(run["resolution"], "exception/malformed-payload", "{done:#}");
        assert!(
            run["reason"].as_str().unwrap().contains(expected),
            "{done:#}"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    let (status, _) = server.terminate();
    assert!(status.success());
}

#[test]
fn at_most_concurrency_tasks_run_and_the_rest_run_in_submission_order() {
    let dir = scratch();
    let server = Server::start(&dir.path().join("state"), &["--concurrency", "2"]);
    let ids: Vec<String> = (0..4)
        .map(|index| server.submit(&script_task(&format!("echo task {index}; sleep 2"), 60)))
        .collect();
    let mut most = 0;
    let mut started_order = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (_, running) = server.get("/api/tasks?state=running");
        let running: Vec<String> = running["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|task| task["taskId"].as_str().unwrap().to_owned())
            .collect();
        most = most.max(running.len());
        for id in running {
            if !started_order.contains(&id) {
                started_order.push(id);
            }
        }
        let resolved = ids
            .iter()
            .filter(|id| server.task(id)["resolution"] == "completed")
            .count();
        if resolved == ids.len() {
            break;
        }
        assert!(Instant::now() < deadline, "tasks did not complete");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(most <= 2, "{most} tasks ran at once");
    assert_eq!(most, 2, "two slots were never both used");
    // The two first may start in either order; the last two start after them.
    assert_eq!(started_order.len(), 4, "{started_order:?}");
    let position = |id: &String| started_order.iter().position(|seen| seen == id).unwrap();
    assert!(
        position(&ids[2]) >= 2 && position(&ids[3]) >= 2,
        "{started_order:?}"
    );
}

#[test]
fn a_restart_requeues_the_running_task_after_sigterm_and_after_kill_9() {
    let dir = scratch();
    let state = dir.path().join("state");
    let server = Server::start(&state, &[]);
    let id = server.submit(&script_task("echo attempt; sleep 6; echo finished", 90));
    server.wait_log(&id, "attempt");

    // SIGTERM: the running task is resolved worker-shutdown and queued again; exit 0.
    let (status, took) = server.terminate();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(qemu_processes_under(&state), 0);

    // Restarted: it runs again; kill -9 it mid-run.
    let server = Server::start(&state, &[]);
    server.wait_for(&id, Duration::from_secs(60), |task| {
        task["runs"].as_array().unwrap().len() == 2 && task["state"] == "running"
    });
    server.wait_log(&id, "attempt");
    server.crash();

    // The next start sweeps the VM, resolves the interrupted run and runs the task again.
    let server = Server::start(&state, &[]);
    assert!(server.said("queued again"));
    let done = server.wait_resolved(&id);
    assert_eq!(done["resolution"], "completed", "{done:#}");
    let runs: Vec<&str> = done["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["resolution"].as_str().unwrap())
        .collect();
    assert_eq!(
        runs,
        [
            "exception/worker-shutdown",
            "exception/worker-shutdown",
            "completed"
        ]
    );
    let (_, log) = server.get_bytes(&format!("/api/tasks/{id}/log"));
    assert!(String::from_utf8_lossy(&log).contains("finished"));
    let (status, _) = server.terminate();
    assert!(status.success());
    assert_eq!(qemu_processes_under(&state), 0);
    // No VM record, runtime directory (overlay, sockets) or namespace is left.
    for kept in ["run", "vms"] {
        let left: Vec<_> = std::fs::read_dir(state.join(kept))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "{kept}: {left:?}");
    }
}

#[test]
fn off_loopback_every_request_needs_the_token_and_on_loopback_foreign_hosts_are_refused() {
    let dir = scratch();
    // A namespace of our own with an address that is not loopback.
    let namespace = format!("taskvm-test-serve-{}", std::process::id());
    let ip = |args: &[&str]| {
        let status = Command::new("ip").args(args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    };
    ip(&["netns", "add", &namespace]);
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _remove = Remove(namespace.clone());
    ip(&["-n", &namespace, "link", "set", "lo", "up"]);
    ip(&[
        "-n", &namespace, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    ip(&["-n", &namespace, "link", "set", "d1", "up"]);
    ip(&[
        "-n",
        &namespace,
        "addr",
        "add",
        "10.251.0.1/24",
        "dev",
        "d0",
    ]);
    ip(&["-n", &namespace, "link", "set", "d0", "up"]);

    let mut command = Command::new("ip");
    command.args(["netns", "exec", &namespace, env!("CARGO_BIN_EXE_taskvm")]);
    let mut args = vec![
        "serve",
        "--listen",
        "10.251.0.1:8080",
        "--paused",
        "--accel",
        "tcg",
    ];
    args.extend(["--state"]);
    let state = dir.path().join("state");
    let state_text = state.to_string_lossy().into_owned();
    args.push(&state_text);
    command.args(&args);
    let (token_tx, token_rx) = std::sync::mpsc::channel();
    let server = Spawned::spawn(&mut command, move |line| {
        if let Some(rest) = line.split("access token (shown once): ").nth(1) {
            let _ = token_tx.send(rest.split_whitespace().next().map(str::to_owned));
        }
    });
    let token = token_rx
        .recv_timeout(Duration::from_secs(60))
        .ok()
        .flatten()
        .expect("the token is printed");
    let curl = |extra: &[&str], path: &str| -> String {
        let output = Command::new("ip")
            .args([
                "netns",
                "exec",
                &namespace,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(extra)
            .arg(format!("http://10.251.0.1:8080{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while curl(&[], "/api/health") == "000" {
        assert!(Instant::now() < deadline, "the server did not answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(curl(&[], "/api/health"), "401");
    assert_eq!(curl(&[], "/"), "401");
    assert_eq!(curl(&[], "/api/tasks/0123456789abcdef/console"), "401");
    assert_eq!(curl(&[], "/api/tasks/0123456789abcdef/shell"), "401");
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(curl(&["-H", &bearer], "/api/health"), "200");
    assert_eq!(
        curl(&["-H", "Authorization: Bearer wrong"], "/api/health"),
        "401"
    );
    assert_eq!(curl(&[], &format!("/?token={token}")), "200");
    let cookie = format!("Cookie: taskvm_token={token}");
    assert_eq!(curl(&["-H", &cookie], "/api/tasks"), "200");
    drop(server);

    // On loopback: no token, but a rebinding Host or a foreign Origin is refused.
    let server = Server::start(&dir.path().join("state2"), &["--paused"]);
    let with_headers = |headers: &[(&str, &str)]| {
        let mut request = server.http.get(server.url("/api/health"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().unwrap().status().as_u16()
    };
    assert_eq!(with_headers(&[]), 200);
    assert_eq!(with_headers(&[("host", "evil.example")]), 403);
    assert_eq!(with_headers(&[("origin", "http://evil.example")]), 403);
    let cross = server
        .http
        .post(server.url("/api/tasks"))
        .header("origin", "http://evil.example")
        .header("content-type", "application/json")
        .body(script_task("true", 5).to_string())
        .send()
        .unwrap();
    assert_eq!(cross.status().as_u16(), 403);
}

#[test]
fn the_web_ui_shows_the_log_a_screenshot_and_a_novnc_console_of_the_guests_screen() {
    let script = test_tool("cli/tests/ui/console.mjs");
    test_tool("cli/tests/ui/node_modules/playwright-core");
    let dir = scratch();
    let server = Server::start(&dir.path().join("state"), &[]);
    let payload = json!({
        "image": file_url(display_image()),
        "command": ["sh", "-c", "echo 'taskvm console test' > /dev/tty0; echo console-ready; sleep 100"],
        "maxRunTime": 150,
        "screenshot": true
    });
    let id = server.submit(&payload);
    let output = Command::new("node")
        .arg(&script)
        .arg(&server.base)
        .arg(&id)
        .arg("console-ready")
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let findings: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|_| panic!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr)));
    assert!(findings.get("error").is_none(), "{}", findings["error"]);
    assert_eq!(findings["listed"], true);
    assert_eq!(findings["logLine"], true);
    assert_eq!(findings["problems"], json!([]), "page errors");
    let (width, height) = (
        findings["screenshot"]["width"].as_u64().unwrap(),
        findings["screenshot"]["height"].as_u64().unwrap(),
    );
    assert!(width >= 640 && height >= 400, "{width}x{height}");

    // The console's canvas shows what the VM's screen shows now.
    let png = findings["canvas"]["png"].as_str().unwrap();
    let png = png.strip_prefix("data:image/png;base64,").unwrap();
    use base64::Engine as _;
    let canvas = Screen::decode_png(
        &base64::engine::general_purpose::STANDARD
            .decode(png)
            .unwrap(),
    )
    .unwrap();
    let (status, fresh) = server.get_bytes(&format!("/api/tasks/{id}/screenshot"));
    assert_eq!(status, 200);
    let fresh = Screen::decode_png(&fresh).unwrap();
    assert_eq!(canvas.dimensions(), fresh.dimensions());
    let differing = canvas
        .rgba()
        .chunks_exact(4)
        .zip(fresh.rgba().chunks_exact(4))
        .filter(|(a, b)| a[..3].iter().zip(&b[..3]).any(|(x, y)| x.abs_diff(*y) > 16))
        .count();
    let (width, height) = canvas.dimensions();
    let total = (width * height) as usize;
    // A blinking cursor may differ; the rest must match.
    assert!(
        differing * 100 < total,
        "{differing} of {total} pixels differ"
    );
    let lit = canvas
        .rgba()
        .chunks_exact(4)
        .filter(|pixel| pixel[..3].iter().any(|channel| *channel > 64))
        .count();
    assert!(
        lit * 50 > total,
        "the canvas is nearly blank ({lit} lit pixels)"
    );

    let (status, _) = server.post(&format!("/api/tasks/{id}/cancel"), &json!({}));
    assert_eq!(status, 202);
    assert_eq!(
        server.wait_resolved(&id)["resolution"],
        "exception/canceled"
    );
}

#[test]
fn schemathesis_finds_no_server_error_in_the_api() {
    let schemathesis = test_tool("target/pyenv/bin/schemathesis");
    let dir = scratch();
    let state = dir.path().join("state");
    // One resolved task with artifacts and a screenshot, so that those routes have data…
    let server = Server::start(&state, &[]);
    let shot = json!({
        "image": file_url(display_image()),
        "command": ["sh", "-c", "echo drawn > /dev/tty0; echo hi > /a.txt"],
        "maxRunTime": 60,
        "screenshot": true,
        "artifacts": [{ "name": "a.txt", "path": "/a.txt", "type": "file" }]
    });
    let id = server.submit(&shot);
    assert_eq!(server.wait_resolved(&id)["resolution"], "completed");
    server.terminate();
    // …then paused, so that the payloads schemathesis makes up are kept, never fetched.
    let server = Server::start(&state, &["--paused"]);
    // Schemathesis reaches the artifact route only when its random walk finds this task's id;
    // every file the task has is checked here on each run: its content type is documented.
    let (_, document) = server.get("/api/openapi.json");
    let documented = &document["paths"]["/api/tasks/{taskId}/artifacts/{name}"]["get"]["responses"]
        ["200"]["content"];
    for name in ["a.txt", "live.log", "serial.log", "screenshot.png"] {
        let response = server
            .http
            .get(server.url(&format!("/api/tasks/{id}/artifacts/{name}")))
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{name}");
        let content_type = response.headers()["content-type"].to_str().unwrap();
        let media_type = content_type.split(';').next().unwrap().trim();
        assert!(
            documented.get(media_type).is_some(),
            "{name} is served as {content_type}, which the document does not name: {documented}"
        );
    }
    let output = Command::new(schemathesis)
        .current_dir(dir.path())
        .args(["run", &server.url("/api/openapi.json")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "30",
            "--request-timeout",
            "10",
        ])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("passed"), "{stdout}");
    // The server is still well.
    assert_eq!(server.get("/api/health").0, 200);
    let (status, _) = server.terminate();
    assert!(status.success());
}

#[test]
fn log_format_json_writes_one_object_per_line_with_the_task_span() {
    let dir = scratch();
    let state = dir.path().join("state");
    let config = state.with_extension("json");
    std::fs::write(&config, config_allowing_test_images("")).unwrap();
    let mut command = taskvm_command(&[]);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--accel", "tcg"])
        .args(["--start", "boot", "--log-format", "json", "--config"])
        .arg(&config)
        .arg("--state")
        .arg(&state)
        .arg("--cache")
        .arg(shared_cache());
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let process = Spawned::spawn(&mut command, move |line| {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            return;
        };
        let message = event["fields"]["message"].as_str().unwrap_or_default();
        if let Some(rest) = message.strip_prefix("listening on ") {
            let _ = address_tx.send(rest.trim_end_matches('/').to_owned());
        }
    });
    let base = address_rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("serve did not start: {:?}", process.lines()));
    let server = Server {
        process,
        base,
        state: state.clone(),
        http: reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap(),
    };
    let id = server.submit(&script_task("echo hello", 60));
    let done = server.wait_resolved(&id);
    assert_eq!(done["resolution"], "completed", "{done:#}");
    let resolved = format!("task {id} run 0 resolved completed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.said(&resolved) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let lines = server.process.lines();
    let (status, _) = server.terminate();
    assert!(status.success(), "{status:?}");

    let events: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect();
    for event in &events {
        assert_eq!(event["level"], "INFO", "{event}");
        assert!(event["timestamp"].is_string(), "{event}");
    }
    for message in [format!("task {id} run 0 started"), resolved] {
        let event = events
            .iter()
            .find(|event| event["fields"]["message"] == message.as_str())
            .unwrap_or_else(|| panic!("no {message:?} in {lines:#?}"));
        assert_eq!(event["span"]["name"], "task", "{event}");
        assert_eq!(event["span"]["task_id"], id.as_str(), "{event}");
        assert_eq!(event["span"]["run_id"], 0, "{event}");
    }
}
