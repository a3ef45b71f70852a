//! A long-running taskvm process under test (`serve`, `worker`): its standard error read line
//! by line on a thread and kept for assertions, signals, a bounded wait for its exit, and a
//! kill when the test drops it. Also the checks the tests of such processes share.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A spawned process whose standard error is being collected.
pub struct Spawned {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Spawned {
    /// Spawns `command` (stdin and stdout to /dev/null, stderr collected), calling `on_line`
    /// with each line of its standard error as it comes.
    pub fn spawn(command: &mut Command, on_line: impl Fn(&str) + Send + 'static) -> Spawned {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    on_line(&line);
                    if let Ok(mut lines) = lines.lock() {
                        lines.push(line);
                    }
                }
            });
        }
        Spawned { child, lines }
    }

    /// The lines of standard error so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .map(|lines| lines.clone())
            .unwrap_or_default()
    }

    /// Whether a line so far contains `text`.
    pub fn said(&self, text: &str) -> bool {
        self.lines().iter().any(|line| line.contains(text))
    }

    /// Waits until a line contains `text`; panics with every line after `patience`.
    pub fn wait_said(&self, text: &str, patience: Duration) {
        let deadline = Instant::now() + patience;
        while !self.said(text) {
            assert!(
                Instant::now() < deadline,
                "the process never said {text:?}: {:#?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a pid");
        rustix::process::kill_process(pid, signal).expect("kill");
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the exit; panics with every line after `patience`.
    pub fn wait_exit(&mut self, patience: Duration) -> ExitStatus {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit: {:#?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A scratch directory QEMU's sandbox user can reach (0755); `why` says why the test needs
/// root, which it asserts.
pub fn root_scratch(why: &str) -> tempfile::TempDir {
    assert!(rustix::process::geteuid().is_root(), "{why}");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    dir
}

/// The image cache every VM test of a run shares, as a worker's tasks would (fetches are
/// single-flight across processes): `$TMPDIR/taskvm-test-cache`.
pub fn shared_cache() -> PathBuf {
    std::env::temp_dir().join("taskvm-test-cache")
}

/// `file://` and the canonical path.
pub fn file_url(path: PathBuf) -> String {
    format!(
        "file://{}",
        path.canonicalize().expect("an existing path").display()
    )
}

/// How many QEMU processes run with their runtime directory below `dir`.
pub fn qemu_processes_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter(|entry| {
                    let is_qemu =
                        std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| {
                            String::from_utf8_lossy(&cmdline).contains("qemu-system")
                        });
                    // Its standard error is `qemu.log` in its runtime directory, opened by the
                    // engine on the host's side: the path is the host's even for a jailed QEMU.
                    is_qemu
                        && std::fs::read_link(entry.path().join("fd/2"))
                            .is_ok_and(|stderr| stderr.starts_with(dir))
                })
                .count()
        })
        .unwrap_or(0)
}

/// What the children this process has waited for used: the largest peak resident set of any
/// one of them and their CPU time added up (`getrusage(RUSAGE_CHILDREN)`). Each test runs in
/// a process of its own under nextest, so this covers the processes that test started.
pub fn children_usage() -> ChildrenUsage {
    // SAFETY: getrusage only writes into the zeroed struct it is given.
    #[allow(unsafe_code)]
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    ChildrenUsage {
        peak_rss_bytes: usage.ru_maxrss as u64 * 1024,
        cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
    }
}

/// See [`children_usage`].
#[derive(Debug, Clone, Copy)]
pub struct ChildrenUsage {
    /// The largest peak RSS of one waited-for child, in bytes.
    pub peak_rss_bytes: u64,
    /// User plus system CPU time of all waited-for children, in seconds.
    pub cpu_seconds: f64,
}

/// Times `child`'s standard output (piped) from `started` to its first byte, then drains the
/// rest and waits: that time and the exit status.
pub fn first_output_of(child: &mut Child, started: Instant) -> (Duration, ExitStatus) {
    use std::io::Read;
    let mut stdout = child.stdout.take().expect("a piped stdout");
    let mut byte = [0u8; 1];
    let _ = stdout.read(&mut byte);
    let first = started.elapsed();
    let _ = std::io::copy(&mut stdout, &mut std::io::sink());
    (first, child.wait().expect("the child ends"))
}
