//! The per-VM disk: a qcow2 overlay whose backing file is the leased image's disk (or a disk
//! of the host's), or a fresh empty qcow2. Creating it costs the same whatever the base's
//! size; the base is only ever read.

use std::io;
use std::path::Path;
use std::process::Command;

/// Creates `overlay` (qcow2) on `base` of format `base_format`, with explicit formats.
pub fn create_overlay(base: &Path, base_format: &str, overlay: &Path) -> io::Result<()> {
    let mut command = Command::new("qemu-img");
    command
        .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
        .arg(base)
        .arg(overlay);
    run(
        command,
        &format!("qemu-img create overlay on {}", base.display()),
    )
}

/// Creates `disk`, an empty qcow2 of `size` bytes.
pub fn create_empty_disk(disk: &Path, size: u64) -> io::Result<()> {
    let mut command = Command::new("qemu-img");
    command
        .args(["create", "-q", "-f", "qcow2"])
        .arg(disk)
        .arg(size.to_string());
    run(command, &format!("qemu-img create a {size}-byte disk"))
}

fn run(mut command: Command, what: &str) -> io::Result<()> {
    let output = command.output()?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(io::Error::other(format!("{what}: {}", stderr.trim())))
    }
}
