//! Saving a paused VM into a snapshot directory, and waiting for a migration (a save, or the
//! load of a restore) to complete.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use super::format::{SavedRam, Snapshot, SnapshotFile};
use crate::memory::GuestMemory;
use crate::vm::{read_bounded, VirtualMachine, VmError, LOG_LIMIT};

/// Migration bandwidth: QEMU 7.2 caps it at 128 MiB/s unless told otherwise.
const MIGRATION_BANDWIDTH: u64 = 100 << 30;
/// How long saving or loading a state may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

impl VirtualMachine {
    /// Saves the paused VM into the new directory `dir` (see [`crate::snapshot`]) and ends it.
    /// Call it at agent-ready, before the guest received anything of a task, and with the
    /// guest not in the middle of a request to its metadata service (stop the service first:
    /// [`crate::network::VmNetwork::stop_service`]).
    pub async fn snapshot(mut self, dir: &Path) -> Result<Snapshot, VmError> {
        let failed = |what: &str, error: &dyn std::fmt::Display| {
            VmError::Snapshot(format!("{what}: {error}"))
        };
        fs::create_dir(dir).map_err(|e| failed(&format!("creating {}", dir.display()), &e))?;
        self.suspend().await?;
        self.qmp
            .set_migration_bandwidth(MIGRATION_BANDWIDTH)
            .await
            .map_err(VmError::Qmp)?;
        let ram = match &self.memory {
            GuestMemory::Default => SavedRam::Stream,
            GuestMemory::ForSaving(_) => SavedRam::File,
            GuestMemory::Snapshot(_) | GuestMemory::Anonymous => SavedRam::StreamObject,
        };
        if self.memory.in_object() {
            self.qmp
                .ignore_shared_memory()
                .await
                .map_err(VmError::Qmp)?;
        }
        // In the root-owned runtime directory, so the name stays root's; QEMU's user may
        // connect to it alone.
        let socket = self.runtime.path().join("migrate.sock");
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(|e| failed("listening for the migration stream", &e))?;
        let (uid, gid) = self.runtime.owner();
        std::os::unix::fs::chown(&socket, Some(uid), Some(gid))
            .map_err(|e| failed("handing the socket to QEMU's user", &e))?;
        let state = Snapshot::path_in(dir, SnapshotFile::State);
        let uri = if self.jailed {
            "unix:/migrate.sock".to_owned()
        } else {
            format!("unix:{}", socket.display())
        };
        self.qmp.migrate(&uri).await.map_err(VmError::Qmp)?;
        let copy = async {
            let (mut stream, _) = listener.accept().await?;
            let mut file = tokio::fs::File::create(&state).await?;
            let bytes = tokio::io::copy(&mut stream, &mut file).await?;
            file.sync_all().await?;
            io::Result::Ok(bytes)
        };
        tokio::time::timeout(MIGRATION_TIMEOUT, copy)
            .await
            .map_err(|_| failed("the migration stream", &"timed out"))?
            .map_err(|e| failed("the migration stream", &e))?;
        self.wait_migration("saving").await?;
        self.kill().await;
        if let GuestMemory::ForSaving(file) = &self.memory {
            // QEMU is gone: nothing changes the memory file any more.
            file.save(&Snapshot::path_in(dir, SnapshotFile::Ram))
                .map_err(|e| failed("keeping the RAM", &e))?;
        }
        Snapshot::write_ram_placement(dir, ram)
            .map_err(|e| failed("recording where the RAM is", &e))?;
        let disk = Snapshot::path_in(dir, SnapshotFile::Disk);
        fs::rename(self.runtime.overlay(), &disk).map_err(|e| failed("keeping the disk", &e))?;
        for file in [&disk, &state] {
            fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .map_err(|e| failed("making the snapshot read-only", &e))?;
        }
        Snapshot::write_identity(dir, &self.uuid, &self.mac)
            .map_err(|e| failed("writing the identity", &e))?;
        // The console up to the snapshot, which every restored copy's console continues.
        fs::write(
            Snapshot::path_in(dir, SnapshotFile::Console),
            read_bounded(&self.runtime.serial_log(), LOG_LIMIT),
        )
        .map_err(|e| failed("keeping the console", &e))?;
        let saved = Snapshot::open(dir).map_err(|e| failed("reopening", &e));
        self.release().await;
        saved
    }

    /// Polls `query-migrate` until the migration completed; fails if it failed.
    pub(crate) async fn wait_migration(&self, what: &str) -> Result<(), VmError> {
        let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let info = self.qmp.query_migrate().await.map_err(VmError::Qmp)?;
            match info.status.as_deref() {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    return Err(VmError::Snapshot(format!(
                        "{what} the state failed: {}",
                        info.error.unwrap_or_else(|| "no reason given".into())
                    )))
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(VmError::Snapshot(format!("{what} the state timed out")))
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
}
