//! `make bench`: resuming a kept failed VM for debugging, measured against booting a task in
//! the same run.
//!
//! - resume: from starting `taskvm debug NAME` to the shell's prompt on its stdout (the kept
//!   VM restored on a fresh network, its agent asked for a login shell), over
//!   `TASKVM_BENCH_TASKS` resumes (default 10) of one kept VM;
//! - baselines: from starting `taskvm run` to the task's first output, booting (`--start
//!   boot`) and restoring the image's snapshot (`--start snapshot`), as many times.
//!
//! Needs root (each VM gets a network namespace).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::guest::minimal_image;
use testkit::stats::percentile;

fn main() {
    if !rustix::process::geteuid().is_root() {
        println!("debug benchmark skipped: VMs need root");
        return;
    }
    let rounds = testkit::stats::bench_rounds();
    let scratch = testkit::process::root_scratch("VMs need root");
    let bench = Bench {
        image: minimal_image().canonicalize().expect("image"),
        scratch: scratch.path().to_owned(),
    };
    println!("debug benchmark: {rounds} rounds, TCG, minimal image");
    let name = bench.keep_a_failed_vm();
    let mut resumed = Vec::new();
    let mut booted = Vec::new();
    let mut restored = Vec::new();
    for _ in 0..rounds {
        resumed.push(bench.resume_to_prompt(&name));
        booted.push(bench.first_output("boot"));
        restored.push(bench.first_output("snapshot"));
    }
    let resume = percentile(&resumed, 50);
    let boot = percentile(&booted, 50);
    let restore = percentile(&restored, 50);
    println!(
        "resume a kept VM -> shell prompt (taskvm debug): median {:.3} s, p95 {:.3} s",
        resume.as_secs_f64(),
        percentile(&resumed, 95).as_secs_f64()
    );
    println!(
        "baseline taskvm run -> first output: boot median {:.3} s, snapshot restore median {:.3} s",
        boot.as_secs_f64(),
        restore.as_secs_f64()
    );
    println!(
        "resume -> prompt over boot -> first output: {:.2}x; over snapshot restore -> first output: {:.2}x",
        resume.as_secs_f64() / boot.as_secs_f64(),
        resume.as_secs_f64() / restore.as_secs_f64()
    );
}

struct Bench {
    image: PathBuf,
    scratch: PathBuf,
}

impl Bench {
    fn payload(&self, name: &str, script: &str, keep: bool) -> PathBuf {
        let payload = serde_json::json!({
            "image": format!("file://{}", self.image.display()),
            "command": ["sh", "-c", script],
            "maxRunTime": 60,
            "debug": { "keepOnFailure": keep },
        });
        let path = self.scratch.join(format!("{name}.json"));
        std::fs::write(&path, payload.to_string()).expect("payload");
        path
    }

    fn taskvm(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_taskvm"));
        command
            .args(args)
            .arg("--cache")
            .arg(self.scratch.join("cache"))
            .arg("--state")
            .arg(self.scratch.join("state"))
            .arg("--accel")
            .arg("tcg");
        command
    }

    /// Runs a task that fails with a file and a background process; returns its kept VM.
    fn keep_a_failed_vm(&self) -> String {
        let payload = self.payload(
            "failing",
            "echo kept > /tmp/state.txt; sleep 1000 & exit 1",
            true,
        );
        let output = self
            .taskvm(&["run", &payload.to_string_lossy(), "--start", "boot"])
            .output()
            .expect("taskvm run");
        let said = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        said.lines()
            .find_map(|line| line.split("the failed VM is kept as ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("not kept: {said}"))
            .to_owned()
    }

    /// `taskvm debug NAME` from its start to the shell's prompt (`#`) on its stdout.
    fn resume_to_prompt(&self, name: &str) -> Duration {
        let started = Instant::now();
        let mut child = self
            .taskvm(&["debug", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("taskvm debug");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        let prompt = loop {
            let read = stdout.read(&mut chunk).expect("output");
            assert!(read > 0, "no prompt: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&chunk[..read]);
            if seen.contains(&b'#') {
                break started.elapsed();
            }
        };
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"exit\n").expect("typed");
        drop(stdin);
        let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        let status = child.wait().expect("wait");
        assert!(status.success(), "taskvm debug: {status}");
        prompt
    }

    /// `taskvm run` of a task that prints at once, started with `start`: to its first output.
    fn first_output(&self, start: &str) -> Duration {
        let payload = self.payload("echo", "echo first output", false);
        let started = Instant::now();
        let mut child = self
            .taskvm(&["run", &payload.to_string_lossy(), "--start", start])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("taskvm run");
        let (first, status) = testkit::process::first_output_of(&mut child, started);
        assert!(status.success(), "the task completed");
        first
    }
}
