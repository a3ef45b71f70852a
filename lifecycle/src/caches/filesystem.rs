//! The file system of a cache copy: made with `mkfs.ext4` on a sparse raw file, and checked
//! with `e2fsck -p` — what a guest wrote, so as `nobody` on a descriptor of the disk, never as
//! root.

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::CacheError;

/// The user and group `e2fsck` runs as (`nobody`).
const CHECKER_ID: u32 = 65_534;
/// How long `e2fsck` may take on one copy (a guest wrote what it reads); past it the copy is
/// made afresh.
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// Exit statuses of `e2fsck -p` below this mean the file system is usable.
const E2FSCK_UNCORRECTED: i32 = 4;

/// A new empty file system of `size` bytes on `disk` for cache `name`.
pub(super) fn format(disk: &Path, size: u64, name: &str) -> Result<(), CacheError> {
    let _ = fs::remove_file(disk);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(disk)
        .and_then(|file| file.set_len(size))
        .map_err(|source| CacheError::Io {
            name: name.to_owned(),
            path: disk.to_owned(),
            source,
        });
    file?;
    let output = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
        ])
        .arg("-L")
        .arg(label(name))
        .arg(disk)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| CacheError::Format {
            name: name.to_owned(),
            reason: format!("cannot run mkfs.ext4: {error}"),
        })?;
    if !output.status.success() {
        let _ = fs::remove_file(disk);
        return Err(CacheError::Format {
            name: name.to_owned(),
            reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// `e2fsck -p` of `disk` as an unprivileged user on an inherited descriptor; the reason when
/// the file system is not usable.
pub(super) fn check(disk: &Path) -> Result<(), String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(|error| error.to_string())?;
    // The checker reopens the disk through /proc, which asks the file's owner.
    rustix::fs::fchown(
        &file,
        Some(rustix::fs::Uid::from_raw(CHECKER_ID)),
        Some(rustix::fs::Gid::from_raw(CHECKER_ID)),
    )
    .map_err(|error| error.to_string())?;
    let fd = file.as_raw_fd();
    let mut command = Command::new("e2fsck");
    command
        .args(["-p", "-f"])
        .arg(format!("/proc/self/fd/{fd}"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .uid(CHECKER_ID)
        .gid(CHECKER_ID)
        .current_dir("/");
    // SAFETY: only clears the close-on-exec flag of a descriptor this process owns, between
    // fork and exec, without allocating.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            let borrowed = std::os::fd::BorrowedFd::borrow_raw(fd);
            rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
    let ran = run_bounded(&mut command, CHECK_TIMEOUT);
    let _ = rustix::fs::fchown(
        &file,
        Some(rustix::fs::Uid::ROOT),
        Some(rustix::fs::Gid::ROOT),
    );
    let ran = ran.map_err(|error| format!("cannot run e2fsck: {error}"))?;
    let last = schemas::shown::escaped(&ran.last_line);
    match ran.status.and_then(|status| status.code()) {
        Some(code) if code < E2FSCK_UNCORRECTED => Ok(()),
        Some(code) => Err(format!("e2fsck exit {code}: {last}")),
        None if ran.timed_out => Err(format!(
            "e2fsck did not finish within {} s (fixed)",
            CHECK_TIMEOUT.as_secs()
        )),
        None => Err(format!("e2fsck ended by a signal: {last}")),
    }
}

/// How a bounded run ended.
struct Ran {
    /// The exit status; None when it was killed at the deadline.
    status: Option<std::process::ExitStatus>,
    /// Whether the deadline killed it.
    timed_out: bool,
    /// The last line of its standard output (at most [`TAIL`] bytes of it are ever held).
    last_line: String,
}

/// Bytes of a checker's output held at a time: the rest is read and dropped.
const TAIL: usize = 4096;

/// Runs `command` (its standard output read, its standard error dropped) for at most
/// `timeout`, then kills it; holds only the tail of what it prints.
fn run_bounded(command: &mut Command, timeout: Duration) -> std::io::Result<Ran> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut tail: Vec<u8> = Vec::new();
        let Some(mut stdout) = stdout else {
            return tail;
        };
        let mut buffer = [0u8; TAIL];
        while let Ok(read) = stdout.read(&mut buffer) {
            if read == 0 {
                break;
            }
            tail.extend_from_slice(&buffer[..read]);
            if tail.len() > TAIL {
                tail.drain(..tail.len() - TAIL);
            }
        }
        tail
    });
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait()? {
            break (Some(status), false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let tail = reader.join().unwrap_or_default();
    let text = String::from_utf8_lossy(&tail);
    let last_line = text.lines().last().unwrap_or_default().to_owned();
    Ok(Ran {
        status,
        timed_out,
        last_line,
    })
}

/// The file system label of cache `name` (ext4 labels hold 16 bytes).
fn label(name: &str) -> String {
    name.chars().take(16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_run_is_killed_at_its_deadline_and_holds_only_the_tail_of_its_output() {
        let started = Instant::now();
        let ran = run_bounded(
            Command::new("sh").args(["-c", "echo early; exec sleep 30"]),
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(ran.timed_out && ran.status.is_none());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(ran.last_line, "early");
        // 64 MiB of output, of which only the last line is kept.
        let ran = run_bounded(
            Command::new("sh").args([
                "-c",
                "head -c 67108864 /dev/zero | tr '\\0' x; echo; echo last",
            ]),
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(ran.status.and_then(|status| status.code()), Some(0));
        assert_eq!(ran.last_line, "last");
    }
}
