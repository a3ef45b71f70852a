//! A VM's private runtime directory: its sockets, logs and disk overlay, mode 0700, owned by
//! the user QEMU runs as, and removed with everything in it when dropped.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The directory of one VM.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Creates `parent/name` (0700), owned by `owner` when given (uid, gid).
    pub fn create(parent: &Path, name: &str, owner: Option<(u32, u32)>) -> io::Result<Self> {
        fs::create_dir_all(parent)?;
        let path = parent.join(name);
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        let dir = RuntimeDir { path };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir.path, Some(uid), Some(gid))?;
        }
        fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o700))?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.path.join("qmp.sock")
    }

    /// The VNC socket.
    pub fn vnc_socket(&self) -> PathBuf {
        self.path.join("vnc.sock")
    }

    /// The serial console's log.
    pub fn serial_log(&self) -> PathBuf {
        self.path.join("serial.log")
    }

    /// QEMU's own standard error.
    pub fn qemu_log(&self) -> PathBuf {
        self.path.join("qemu.log")
    }

    /// The disk overlay.
    pub fn overlay(&self) -> PathBuf {
        self.path.join("disk.qcow2")
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
