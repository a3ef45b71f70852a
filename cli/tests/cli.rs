//! The `taskvm` binary as a user runs it: output and exit codes.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::taskvm;

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

#[test]
fn every_example_payload_is_valid() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_file("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "json") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let output = taskvm(&["validate", path.to_str().unwrap()]);
            let expect_ok = !name.starts_with("invalid-");
            assert_eq!(
                output.status.success(),
                expect_ok,
                "{name}: {}",
                stdout(&output)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "examples/ has payloads");
}

#[test]
fn validate_prints_ok_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let task = write(
        dir.path(),
        "task.json",
        r#"{"image": "https://x/y.tar.zst", "command": ["true"], "maxRunTime": 5}"#,
    );
    let output = taskvm(&["validate", task.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(stdout(&output), "ok\n");
}

#[test]
fn validate_prints_every_pointer_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let task = write(
        dir.path(),
        "task.json",
        r#"{"image": "ftp://x", "command": [], "env": {"A": 1}, "machine": {"memory": 0},
            "artifacts": [{"type": "file", "path": "/a", "name": "../a"}], "colour": 1}"#,
    );
    let output = taskvm(&["validate", task.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let pointers: Vec<String> = stdout(&output)
        .lines()
        .map(|line| line.split(": ").next().unwrap().to_owned())
        .collect();
    assert_eq!(
        pointers,
        [
            "/artifacts/0/name",
            "/colour",
            "/command",
            "/env/A",
            "/image",
            "/machine/memory",
            "/maxRunTime"
        ]
    );
}

#[test]
fn validate_applies_the_configured_limits() {
    let dir = tempfile::tempdir().unwrap();
    let task = write(
        dir.path(),
        "task.json",
        r#"{"image": "https://x/y.tar.zst", "command": ["true"], "maxRunTime": 5,
            "machine": {"memory": 65536, "cores": 2}}"#,
    );
    let config = write(
        dir.path(),
        "config.toml",
        "[limits]\nmaxMemory = 8192\nmaxCPUs = 8\ndefaultThreads = 1\n",
    );
    let output = taskvm(&[
        "validate",
        task.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stdout(&output),
        "/machine/memory: 65536 exceeds maxMemory 8192\n"
    );

    let roomy = write(
        dir.path(),
        "roomy.json",
        r#"{"limits": {"maxMemory": 65536, "maxCPUs": 2, "defaultThreads": 1}}"#,
    );
    let output = taskvm(&[
        "validate",
        task.to_str().unwrap(),
        "--config",
        roomy.to_str().unwrap(),
    ]);
    assert_eq!(stdout(&output), "ok\n");
}

#[test]
fn a_bad_configuration_is_reported_before_the_payload() {
    let dir = tempfile::tempdir().unwrap();
    let task = write(dir.path(), "task.json", "{}");
    let config = write(dir.path(), "config.toml", "concurency = 2\n");
    let output = taskvm(&[
        "validate",
        task.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/concurency: unknown field"), "{stderr}");
}

#[test]
fn configurations_validate_with_each_queue_provider() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "worker.toml",
        r#"concurrency = 2
accel = "tcg"
[cache]
dir = "/var/cache/taskvm"
maxSize = 10737418240
[queue]
provider = "taskcluster"
taskQueueId = "proj-taskvm/ci"
workerGroup = "local"
workerId = "w1"
capacity = 2
"#,
    );
    let output = taskvm(&["validate", "--kind", "config", good.to_str().unwrap()]);
    assert_eq!(
        stdout(&output),
        "ok\n",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let embedded = write(
        dir.path(),
        "serve.json",
        r#"{"queue": {"provider": "embedded", "listen": "127.0.0.1:9000"}}"#,
    );
    let output = taskvm(&["validate", "--kind", "config", embedded.to_str().unwrap()]);
    assert_eq!(stdout(&output), "ok\n");

    let bad = write(
        dir.path(),
        "bad.json",
        r#"{"queue": {"provider": "embedded", "lisen": "x"}, "accel": "hvf"}"#,
    );
    let output = taskvm(&["validate", "--kind", "config", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let text = stdout(&output);
    assert!(text.contains("/accel: "), "{text}");
    assert!(text.contains("/queue"), "{text}");
}

#[test]
fn validate_checks_machine_json_files() {
    let output = taskvm(&[
        "validate",
        "--kind",
        "machine",
        repo_file("schemas/tests/fixtures/taskcluster-worker-v1-machine.json")
            .to_str()
            .unwrap(),
    ]);
    assert_eq!(stdout(&output), "ok\n");
    let dir = tempfile::tempdir().unwrap();
    let unversioned = write(dir.path(), "machine.json", r#"{"memory": 512}"#);
    let output = taskvm(&[
        "validate",
        "--kind",
        "machine",
        unversioned.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(stdout(&output), "/version: required\n");
}

#[test]
fn unreadable_and_non_json_files_are_malformed_not_crashes() {
    let output = taskvm(&["validate", "/nonexistent/task.json"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stdout(&output).contains("cannot read /nonexistent/task.json"));
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("task.json");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    let output = taskvm(&["validate", binary.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn schema_prints_the_committed_schema_files() {
    for name in ["payload", "machine", "limits", "config"] {
        let output = taskvm(&["schema", name]);
        assert!(output.status.success());
        let committed =
            std::fs::read_to_string(repo_file(&format!("schemas/json/{name}.schema.json")))
                .unwrap();
        assert_eq!(stdout(&output), committed, "{name}");
    }
}

#[test]
fn version_and_help_work() {
    let output = taskvm(&["--version"]);
    assert!(stdout(&output).starts_with("taskvm "));
    let output = taskvm(&["--help"]);
    let help = stdout(&output);
    assert!(
        help.contains("validate") && help.contains("schema"),
        "{help}"
    );
    let output = taskvm(&["schema", "nonsense"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn submit_refuses_an_answer_larger_than_its_bound() {
    use std::io::{Read, Write};
    // A server that answers the submission with 201 and a body that does not end for 64 MiB.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 4096];
        let _ = stream.read(&mut request);
        let _ = stream.write_all(
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
        );
        let chunk = vec![b'['; 1 << 20];
        let mut sent = 0;
        for _ in 0..64 {
            if stream.write_all(&chunk).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let dir = tempfile::tempdir().unwrap();
    let payload = write(dir.path(), "task.json", "{}");
    let output = taskvm(&[
        "submit",
        payload.to_str().unwrap(),
        "--server",
        &format!("http://{address}"),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("larger than 8 MiB"), "{stderr}");
    let sent = server.join().unwrap();
    assert!(
        sent < 64,
        "the client read the whole 64 MiB ({sent} MiB sent)"
    );
}
