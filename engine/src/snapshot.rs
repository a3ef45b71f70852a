//! A VM saved at agent-ready, before it received any task data, and restored as many times
//! as wanted: the migration stream of the paused VM (`state.bin`), the disk overlay as it was
//! then (`disk.qcow2`, read-only; each restored VM gets its own overlay on top) and the
//! identity its devices were created with (`identity`: UUID and MAC, which a restore must
//! reuse) and its console up to then (`serial.log`, which a restored VM's console continues). QEMU writes the stream to a unix socket the engine listens on and reads it back
//! from an inherited descriptor (`-incoming fd:N`): both work under the full `-sandbox`.
//!
//! The plain stream was chosen over a file-backed RAM object with `x-ignore-shared`: for the
//! small guests tasks boot (256 MiB) it is ~66 MB and loads in ~0.1 s, needs no second
//! memory backend on the command line (which every restore would have to match) and works
//! for any machine. A restore is only valid for the same image, machine, QEMU and kernel
//! command line; the caller keys snapshots by those.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use image_manager::Lease;
use schemas::ResolvedMachine;

use crate::session::{GuestSession, SessionConfig};
use crate::vm::{VirtualMachine, VmError, VmSettings};

/// What the agent prints on the console once it is up and asks for its task.
pub const AGENT_READY: &str = schemas::protocol::marker::READY;

/// Boots a VM of `machine` on `lease` (with `settings`, which must give it a network), waits
/// until its agent is up — no task is ever set, so it holds no task data — and saves it into
/// the new directory `dir`. Gives up after `ready_timeout` (an image without our agent).
pub async fn build(
    lease: Lease,
    machine: &ResolvedMachine,
    settings: &VmSettings,
    dir: &Path,
    ready_timeout: Duration,
) -> Result<Snapshot, VmError> {
    let mut vm = VirtualMachine::start(lease, machine, settings).await?;
    let (session, _log) = GuestSession::new(SessionConfig::new(&settings.name));
    vm.set_http_handler(session.handler());
    if !vm.wait_for_serial(AGENT_READY, ready_timeout).await {
        return Err(VmError::Snapshot(format!(
            "the guest's agent did not report ready within {} s",
            ready_timeout.as_secs()
        )));
    }
    // Let its first request arrive, then close the service under it: the agent is then in
    // its retry loop, with no request open, and finds the restored VM's service at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    match vm.network_mut() {
        Some(network) => network.stop_service(),
        None => {
            return Err(VmError::Snapshot(
                "a snapshot needs the VM's own network".into(),
            ))
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    vm.snapshot(dir).await
}

/// File names inside a snapshot directory.
const STATE: &str = "state.bin";
const DISK: &str = "disk.qcow2";
const IDENTITY: &str = "identity";
const CONSOLE: &str = "serial.log";

/// A saved VM on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    dir: PathBuf,
    uuid: String,
    mac: String,
}

impl Snapshot {
    /// Opens the snapshot in `dir`; fails unless all its files are there.
    pub fn open(dir: &Path) -> io::Result<Snapshot> {
        let identity = fs::read_to_string(dir.join(IDENTITY))?;
        let mut lines = identity.lines();
        let (Some(uuid), Some(mac)) = (lines.next(), lines.next()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: no UUID and MAC", dir.join(IDENTITY).display()),
            ));
        };
        for file in [STATE, DISK] {
            let path = dir.join(file);
            if !fs::metadata(&path)?.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a file", path.display()),
                ));
            }
        }
        Ok(Snapshot {
            dir: dir.to_owned(),
            uuid: uuid.to_owned(),
            mac: mac.to_owned(),
        })
    }

    /// Writes the identity file of a snapshot being made in `dir`.
    pub(crate) fn write_identity(dir: &Path, uuid: &str, mac: &str) -> io::Result<()> {
        fs::write(dir.join(IDENTITY), format!("{uuid}\n{mac}\n"))
    }

    /// The snapshot's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The migration stream.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// The disk overlay at snapshot time (qcow2 on the image's disk).
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join(DISK)
    }

    /// The UUID the VM had.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// The MAC the VM had.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// Where `file` of a snapshot in `dir` goes.
    pub(crate) fn path_in(dir: &Path, file: SnapshotFile) -> PathBuf {
        dir.join(match file {
            SnapshotFile::State => STATE,
            SnapshotFile::Disk => DISK,
            SnapshotFile::Console => CONSOLE,
        })
    }
}

/// The files a snapshot is made of.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SnapshotFile {
    State,
    Disk,
    Console,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_needs_all_its_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Snapshot::open(dir.path()).is_err());
        Snapshot::write_identity(dir.path(), "u-u-i-d", "02:00:00:00:00:01").unwrap();
        assert!(Snapshot::open(dir.path()).is_err(), "no state yet");
        fs::write(Snapshot::path_in(dir.path(), SnapshotFile::State), b"s").unwrap();
        fs::write(Snapshot::path_in(dir.path(), SnapshotFile::Disk), b"d").unwrap();
        let snapshot = Snapshot::open(dir.path()).unwrap();
        assert_eq!(snapshot.uuid(), "u-u-i-d");
        assert_eq!(snapshot.mac(), "02:00:00:00:00:01");
        fs::write(dir.path().join(IDENTITY), "only-one-line\n").unwrap();
        assert!(Snapshot::open(dir.path()).is_err());
    }
}
