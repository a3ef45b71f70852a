//! The per-VM disk: a qcow2 overlay whose backing file is the leased image's disk. Creating
//! it costs the same whatever the base's size; the cached image is only ever read.

use std::io;
use std::path::Path;
use std::process::Command;

/// Creates `overlay` (qcow2) on `base` of format `base_format`, with explicit formats.
pub fn create_overlay(base: &Path, base_format: &str, overlay: &Path) -> io::Result<()> {
    let output = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
        .arg(base)
        .arg(overlay)
        .output()?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(io::Error::other(format!(
            "qemu-img create overlay on {}: {}",
            base.display(),
            stderr.trim()
        )))
    }
}
