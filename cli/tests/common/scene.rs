//! `taskvm run` as its tests drive it: a scene of a test's own directories (state, artifacts)
//! beside the shared image cache, runs to their end or in the background, and what a VM could
//! leave behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::taskvm_command;
use testkit::guest::{display_image, minimal_image};
use testkit::process::{root_scratch, shared_cache};

/// A test's own directories: state (VM records, runtime dirs) and artifacts. The image cache
/// is shared by all tests of a run, as a worker's would be.
pub struct Scene {
    pub scratch: tempfile::TempDir,
}

impl Scene {
    pub fn new() -> Scene {
        Scene {
            scratch: root_scratch(
                "taskvm run needs root (network namespaces, taps, the sandbox user)",
            ),
        }
    }

    pub fn state(&self) -> PathBuf {
        self.scratch.path().join("state")
    }

    pub fn artifacts(&self, name: &str) -> PathBuf {
        self.scratch.path().join("artifacts").join(name)
    }

    /// An example payload with its image pointed at the test images of this checkout.
    pub fn example(&self, name: &str) -> PathBuf {
        let text = std::fs::read_to_string(repo_file(&format!("examples/{name}.json"))).unwrap();
        self.payload(name, &with_test_images(&text))
    }

    pub fn payload(&self, name: &str, text: &str) -> PathBuf {
        let path = self.scratch.path().join(format!("{name}.json"));
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn command(&self, payload: &Path, artifacts: &str, cache: &Path) -> Command {
        let mut command = taskvm_command(&[]);
        command
            .arg("run")
            .arg(payload)
            .arg("--cache")
            .arg(cache)
            .arg("--state")
            .arg(self.state())
            .arg("--artifacts")
            .arg(self.artifacts(artifacts))
            .arg("--accel")
            .arg("tcg");
        command
    }

    pub fn run(&self, payload: &Path, artifacts: &str) -> Run {
        self.run_with_cache(payload, artifacts, &shared_cache())
    }

    /// Runs `payload` with the configuration file `config` (JSON text).
    pub fn run_configured(&self, payload: &Path, artifacts: &str, config: &str) -> Run {
        let config = self.payload(&format!("{artifacts}-config"), config);
        let mut command = self.command(payload, artifacts, &shared_cache());
        command.arg("--config").arg(&config);
        self.run_to_end(command, artifacts)
    }

    pub fn run_with_cache(&self, payload: &Path, artifacts: &str, cache: &Path) -> Run {
        self.run_to_end(self.command(payload, artifacts, cache), artifacts)
    }

    /// Runs `command` to its end: its output, how long it took and the task's log.
    fn run_to_end(&self, mut command: Command, artifacts: &str) -> Run {
        let started = Instant::now();
        let output = command.output().expect("run taskvm");
        Run {
            output,
            took: started.elapsed(),
            log: std::fs::read_to_string(self.artifacts(artifacts).join("live.log"))
                .unwrap_or_default(),
        }
    }

    /// Starts `taskvm run` and waits until the guest printed `marker`.
    pub fn start_until(&self, payload: &Path, artifacts: &str, marker: &str) -> (Running, String) {
        let mut child = Running(
            self.command(payload, artifacts, &shared_cache())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stderr = child.0.stderr.take().unwrap();
        let (names, vm_name) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("taskvm: VM ") {
                    let _ = names.send(rest.split(':').next().unwrap_or_default().to_owned());
                }
            }
        });
        let stdout = child.0.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let line = lines.next().expect("the guest printed the marker").unwrap();
            if line.contains(marker) {
                break;
            }
            assert!(Instant::now() < deadline, "no marker");
        }
        std::thread::spawn(move || lines.for_each(drop));
        let name = vm_name.recv_timeout(Duration::from_secs(10)).unwrap();
        (child, name)
    }

    /// Starts a task that prints STARTED and sleeps; returns once it printed.
    pub fn start_sleeper(&self, name: &str) -> (Running, String) {
        let payload = self.payload(
            name,
            &with_test_images(
                r#"{"image": "file:///usr/share/taskvm/images/minimal.tar.zst",
                    "command": ["sh", "-c", "echo STARTED; sleep 600"], "maxRunTime": 600}"#,
            ),
        );
        self.start_until(&payload, name, "STARTED")
    }

    /// What a VM of this scene could have left: records, runtime dirs, processes, namespaces.
    pub fn leftovers(&self, vm: Option<&str>) -> Vec<String> {
        let mut found = Vec::new();
        for dir in ["vms", "run"] {
            if let Ok(entries) = std::fs::read_dir(self.state().join(dir)) {
                for entry in entries.flatten() {
                    found.push(format!("{dir}/{}", entry.file_name().to_string_lossy()));
                }
            }
        }
        found.extend(processes_mentioning(&self.scratch.path().to_string_lossy()));
        if let Some(vm) = vm {
            let namespace = format!("taskvm-{vm}");
            if Path::new("/run/netns").join(&namespace).exists() {
                found.push(namespace);
            }
        }
        found
    }
}

/// A `taskvm run` in the background, killed if the test fails before it ends.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub struct Run {
    pub output: Output,
    pub took: Duration,
    pub log: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// The VM's name, from the `VM NAME: …` line.
    pub fn vm(&self) -> Option<String> {
        self.stderr()
            .lines()
            .find_map(|line| line.strip_prefix("taskvm: VM "))
            .map(|rest| rest.split(':').next().unwrap_or_default().to_owned())
    }

    pub fn explain(&self) -> String {
        format!(
            "exit {:?} after {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code(),
            self.took,
            self.stdout(),
            self.stderr()
        )
    }
}

pub fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

pub fn with_test_images(payload: &str) -> String {
    let dir = minimal_image().parent().unwrap().canonicalize().unwrap();
    assert!(display_image().is_file());
    payload.replace(
        "file:///usr/share/taskvm/images/",
        &format!("file://{}/", dir.display()),
    )
}

pub fn processes_mentioning(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(text) && cmdline.contains("qemu") {
            found.push(format!(
                "process {}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// Waits up to `patience` for `check` to hold.
pub fn eventually(patience: Duration, check: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}
