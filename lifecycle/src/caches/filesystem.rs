//! The file system of a cache copy: made with `mkfs.ext4` on a sparse raw file, and checked
//! with `e2fsck -p` — what a guest wrote, so as `nobody` on a descriptor of the disk, never as
//! root.

use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::CacheError;

/// The user and group `e2fsck` runs as (`nobody`).
const CHECKER_ID: u32 = 65_534;
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
    let output = command.output();
    let _ = rustix::fs::fchown(
        &file,
        Some(rustix::fs::Uid::ROOT),
        Some(rustix::fs::Gid::ROOT),
    );
    let output = output.map_err(|error| format!("cannot run e2fsck: {error}"))?;
    match output.status.code() {
        Some(code) if code < E2FSCK_UNCORRECTED => Ok(()),
        code => {
            let said = String::from_utf8_lossy(&output.stdout);
            let last = said.lines().last().unwrap_or_default();
            Err(format!(
                "e2fsck exit {}: {}",
                code.map_or("by a signal".to_owned(), |code| code.to_string()),
                schemas::shown::escaped(last)
            ))
        }
    }
}

/// The file system label of cache `name` (ext4 labels hold 16 bytes).
fn label(name: &str) -> String {
    name.chars().take(16).collect()
}
