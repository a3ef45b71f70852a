//! A VM's runtime directory, which is also its jail's root: owned by root (mode 0711), so
//! that no name in it can be changed by QEMU. Root makes every file QEMU uses in it (the
//! overlay, the serial console, QEMU's messages, the QMP socket) and hands them over as
//! descriptors; the one directory QEMU may write, `run/` (0700, QEMU's user), holds what QEMU
//! makes itself (the VNC socket, a screendump), and root opens nothing there by a name
//! without `O_NOFOLLOW` and a check of what it got. Removed with everything in it on drop.

use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags};

/// The directory QEMU may write in, relative to the runtime directory (`/run` in the jail).
pub const SCRATCH: &str = "run";

/// The directory of one VM.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
    /// Who QEMU runs as (uid, gid): the owner of `run/` and of what QEMU makes in it.
    owner: (u32, u32),
}

impl RuntimeDir {
    /// Creates `parent/name` (root's, 0711) with `run/` in it owned by `owner` (uid, gid;
    /// None: this process's own user).
    pub fn create(parent: &Path, name: &str, owner: Option<(u32, u32)>) -> io::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
        let path = parent.join(name);
        fs::DirBuilder::new().mode(0o711).create(&path)?;
        let owner = owner.unwrap_or_else(|| {
            (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            )
        });
        let dir = RuntimeDir { path, owner };
        // The umask may have taken bits away; other users must pass through to `run/`.
        fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o711))?;
        let scratch = dir.path.join(SCRATCH);
        fs::DirBuilder::new().mode(0o700).create(&scratch)?;
        std::os::unix::fs::chown(&scratch, Some(owner.0), Some(owner.1))?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Who QEMU runs as (uid, gid).
    pub fn owner(&self) -> (u32, u32) {
        self.owner
    }

    /// The QMP socket (root's; QEMU gets its listening descriptor).
    pub fn qmp_socket(&self) -> PathBuf {
        self.path.join("qmp.sock")
    }

    /// The VNC socket, which QEMU makes in `run/`.
    pub fn vnc_socket(&self) -> PathBuf {
        self.path.join(SCRATCH).join("vnc.sock")
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

    /// Creates the new file `name` (0600, root's) for writing; fails if anything has the name.
    pub fn create_file(&self, name: &str) -> io::Result<fs::File> {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(OFlags::NOFOLLOW.bits() as i32)
            .open(self.path.join(name))
    }

    /// Where QEMU's VNC server (`run/vnc.sock`) can be reached.
    pub fn vnc(&self) -> VncEndpoint {
        VncEndpoint {
            runtime: self.path.clone(),
            owner_uid: self.owner.0,
        }
    }

    /// The contents of the regular file `name` QEMU wrote in `run/` (e.g. a screendump), at
    /// most `limit` bytes.
    pub fn read_scratch_file(&self, name: &str, limit: u64) -> io::Result<Vec<u8>> {
        let fd = open_scratch(
            &self.path,
            self.owner.0,
            name,
            OFlags::RDONLY,
            FileType::RegularFile,
        )?;
        let mut bytes = Vec::new();
        fs::File::from(fd).take(limit).read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Removes `name` from `run/` (a screendump read back), whatever it is.
    pub fn remove_scratch(&self, name: &str) {
        if let Ok(scratch) = open_scratch_dir(&self.path) {
            let _ = rustix::fs::unlinkat(&scratch, name, rustix::fs::AtFlags::empty());
        }
    }
}

/// A VM's VNC server, for screenshots and the console. Every connection goes through a
/// descriptor of the socket file QEMU made in `run/`, checked before use, never through a name
/// QEMU could have pointed elsewhere (a link to another socket of the host is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VncEndpoint {
    runtime: PathBuf,
    owner_uid: u32,
}

impl VncEndpoint {
    /// Connects to the VNC server.
    pub fn connect(&self) -> io::Result<tokio::net::UnixStream> {
        let socket = open_scratch(
            &self.runtime,
            self.owner_uid,
            "vnc.sock",
            OFlags::PATH,
            FileType::Socket,
        )?;
        let through = format!("/proc/self/fd/{}", socket.as_fd().as_raw_fd());
        let stream = std::os::unix::net::UnixStream::connect(through)?;
        stream.set_nonblocking(true)?;
        tokio::net::UnixStream::from_std(stream)
    }

    /// The socket's path on the host, for messages.
    pub fn path(&self) -> PathBuf {
        self.runtime.join(SCRATCH).join("vnc.sock")
    }
}

/// `runtime/run/` itself, as a directory descriptor (its name is in root's directory, so it is
/// the one root made; `O_NOFOLLOW` all the same).
fn open_scratch_dir(runtime: &Path) -> rustix::io::Result<OwnedFd> {
    rustix::fs::open(
        runtime.join(SCRATCH),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens `name` in `runtime/run/` without following a link, and checks that it is a `kind` that
/// QEMU's user `owner_uid` made (a link, another user's file or a hard link to one is refused).
fn open_scratch(
    runtime: &Path,
    owner_uid: u32,
    name: &str,
    flags: OFlags,
    kind: FileType,
) -> io::Result<OwnedFd> {
    let scratch = open_scratch_dir(runtime)?;
    let fd = rustix::fs::openat(
        &scratch,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    let stat = rustix::fs::fstat(&fd)?;
    let found = FileType::from_raw_mode(stat.st_mode);
    if found != kind || stat.st_uid != owner_uid || stat.st_nlink != 1 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}/{SCRATCH}/{name} is not a {kind:?} of QEMU's user (found a {found:?} of uid \
                 {}, {} links): refused",
                runtime.display(),
                stat.st_uid,
                stat.st_nlink
            ),
        ));
    }
    Ok(fd)
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        remove_jail_dir(&self.path);
    }
}

/// Removes a runtime directory. `remove_dir_all` does not follow links, so what QEMU left in
/// `run/` cannot lead it elsewhere; mount points left by nothing (the jail's mounts live only in
/// QEMU's namespace) are plain files and directories here.
pub fn remove_jail_dir(path: &Path) {
    let _ = fs::remove_dir_all(path);
}
