//! The task's disks: found by their virtio serial number, their block device's cached buffers
//! dropped (a VM restored from a snapshot may hold the blocks of the blank disk that was in
//! the slot when the snapshot was taken), mounted before the command runs and unmounted before
//! the VM powers off, so a cache is never left half-written.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use protocol::GuestMount;
use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};

/// `_IO(0x12, 97)`: flush a block device's buffer cache.
const BLKFLSBUF: rustix::ioctl::Opcode = 0x1261;
/// The file system of every task disk.
const FILE_SYSTEM: &str = "ext4";

/// Mounts `mounts` in order; returns those mounted, or why one failed (the ones before it
/// unmounted again).
pub fn mount_all(mounts: &[GuestMount]) -> Result<Vec<PathBuf>, String> {
    let mut mounted = Vec::new();
    for wanted in mounts {
        match mount_one(wanted) {
            Ok(path) => mounted.push(path),
            Err(error) => {
                unmount_all(&mounted);
                return Err(format!("cannot mount {}: {error}", wanted.path));
            }
        }
    }
    Ok(mounted)
}

/// Unmounts `mounted`, last first; a busy one (a process the command left behind still uses
/// it) is detached after its data is synced. Returns what could not be done.
pub fn unmount_all(mounted: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    for path in mounted.iter().rev() {
        if unmount(path, UnmountFlags::empty()).is_ok() {
            continue;
        }
        rustix::fs::sync();
        if let Err(error) = unmount(path, UnmountFlags::DETACH) {
            problems.push(format!("unmounting {}: {error}", path.display()));
        }
    }
    problems
}

fn mount_one(wanted: &GuestMount) -> io::Result<PathBuf> {
    let path = Path::new(&wanted.path);
    if !path.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path",
        ));
    }
    let device = device_with_serial(&wanted.serial)?;
    flush_buffers(&device)?;
    fs::create_dir_all(path)?;
    let flags = if wanted.read_only {
        MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID
    } else {
        MountFlags::NODEV | MountFlags::NOSUID
    };
    // No background zeroing of inode tables (mkfs left them to the kernel): on one vCPU it
    // would compete with the command.
    let data = if wanted.read_only {
        None
    } else {
        Some(c"noinit_itable")
    };
    mount(&device, path, FILE_SYSTEM, flags, data)?;
    Ok(path.to_owned())
}

/// `/dev/vdX` whose virtio serial number is `serial`.
fn device_with_serial(serial: &str) -> io::Result<PathBuf> {
    for entry in fs::read_dir("/sys/block")?.flatten() {
        let found = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if found.trim_end() == serial {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no disk with serial {serial:?}"),
    ))
}

#[allow(unsafe_code)]
fn flush_buffers(device: &Path) -> io::Result<()> {
    let file = fs::File::open(device)?;
    // SAFETY: BLKFLSBUF takes no argument.
    unsafe {
        rustix::ioctl::ioctl(&file, rustix::ioctl::NoArg::<BLKFLSBUF>::new())?;
    }
    Ok(())
}
