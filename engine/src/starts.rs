//! The ways a VM starts: a boot, a boot whose RAM will be saved, a restore from a snapshot
//! (running or paused). Each is [`launch`] with its disk source, state and guest memory.

use std::fs;

use image_manager::Lease;
use schemas::ResolvedMachine;

use crate::disk::drives::BootSource;
use crate::launch::launch;
use crate::memory::{self, GuestMemory, MemoryFile};
use crate::snapshot::format::{SavedRam, Snapshot, SnapshotFile};
use crate::vm::{VirtualMachine, VmError, VmSettings};

/// The guest's RAM in bytes.
fn machine_memory_bytes(machine: &ResolvedMachine) -> u64 {
    u64::from(machine.memory_mib()) << 20
}

impl VirtualMachine {
    /// Starts a VM of `machine` on the leased image whose RAM [`VirtualMachine::snapshot`]
    /// saves as `ram` says: for [`SavedRam::File`], a memory file it saves as `ram.bin`.
    pub(crate) async fn start_for_snapshot(
        ram: SavedRam,
        lease: Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
    ) -> Result<Self, VmError> {
        let memory = match ram {
            SavedRam::Stream => GuestMemory::Default,
            SavedRam::StreamObject => GuestMemory::Anonymous,
            SavedRam::File => GuestMemory::ForSaving(
                MemoryFile::for_saving(machine_memory_bytes(machine)).map_err(VmError::Setup)?,
            ),
        };
        launch(lease.into(), machine, settings, None, memory).await
    }

    /// Starts a VM of `machine` on the leased image (the lease is held until the VM is dropped)
    /// and waits until QEMU answers on QMP.
    pub async fn start(
        lease: Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
    ) -> Result<Self, VmError> {
        launch(lease.into(), machine, settings, None, GuestMemory::Default).await
    }

    /// Starts a VM of `machine` whose root disk and boot files come from `source`: a cached
    /// image, or files of the host's (an existing disk, read-only under the VM's overlay, or a
    /// fresh empty disk). Files of the host's need not be readable by the sandbox user.
    pub async fn start_from(
        source: BootSource,
        machine: &ResolvedMachine,
        settings: &VmSettings,
    ) -> Result<Self, VmError> {
        launch(source, machine, settings, None, GuestMemory::Default).await
    }

    /// Starts a VM from `snapshot` (made of the same image and machine, see
    /// [`crate::snapshot`]) instead of booting it, and resumes it once the state is loaded.
    /// Its disk is a new overlay on the snapshot's; its network is its own, as for a boot.
    pub async fn restore(
        lease: Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
        snapshot: &Snapshot,
    ) -> Result<Self, VmError> {
        let vm = Self::restore_paused(lease, machine, settings, snapshot).await?;
        vm.resume().await?;
        Ok(vm)
    }

    /// Like [`VirtualMachine::restore`], but leaves the loaded guest paused (0 % CPU) until
    /// [`VirtualMachine::resume`]: a VM kept ready in a warm pool.
    pub async fn restore_paused(
        lease: Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
        snapshot: &Snapshot,
    ) -> Result<Self, VmError> {
        let memory = match snapshot.ram() {
            SavedRam::Stream => GuestMemory::Default,
            SavedRam::StreamObject => GuestMemory::Anonymous,
            SavedRam::File => GuestMemory::Snapshot(
                memory::loaded(&snapshot.ram_path(), machine_memory_bytes(machine)).map_err(
                    |error| {
                        VmError::Snapshot(format!(
                            "loading {}: {error}",
                            snapshot.ram_path().display()
                        ))
                    },
                )?,
            ),
        };
        let mut vm = launch(lease.into(), machine, settings, Some(snapshot), memory).await?;
        vm.wait_migration("loading").await?;
        let console = fs::read_to_string(Snapshot::path_in(snapshot.dir(), SnapshotFile::Console))
            .unwrap_or_default();
        vm.earlier_console = format!(
            "{console}\n[taskvm: restored from the snapshot in {}]\n",
            snapshot.dir().display()
        );
        Ok(vm)
    }
}
