//! A VM whose disk is kept: booted like a task's VM (sandbox, isolated network, metadata
//! service) from a new overlay on a leased image, and packaged afterwards into a new image
//! with the image manager's writer. The base image is never written: every change lands in the
//! overlay, which `package` flattens into the new image's raw disk.

use std::path::Path;

use image_manager::{pack, Digest, Lease, PackInputs};
use schemas::{Machine, ResolvedMachine};
use thiserror::Error;

use crate::vm::{VirtualMachine, VmError, VmSettings};

/// Why packaging failed.
#[derive(Debug, Error)]
pub enum PackageError {
    /// The VM is still running: its disk is not settled.
    #[error("the VM is still running; packaging needs it powered off")]
    Running,
    /// The machine definition could not be written.
    #[error("writing machine.json: {0}")]
    Machine(std::io::Error),
    /// Flattening or compressing failed.
    #[error(transparent)]
    Pack(#[from] image_manager::ImageError),
}

/// A VM booted to be changed and packaged.
pub struct MutableImage {
    vm: VirtualMachine,
    ended: bool,
}

impl MutableImage {
    /// Boots `lease`'s image as `machine` on a fresh overlay.
    pub async fn boot(
        lease: Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
    ) -> Result<MutableImage, VmError> {
        let vm = VirtualMachine::start(lease, machine, settings).await?;
        Ok(MutableImage { vm, ended: false })
    }

    /// The running VM.
    pub fn vm(&self) -> &VirtualMachine {
        &self.vm
    }

    /// The running VM, to wait on or stop.
    pub fn vm_mut(&mut self) -> &mut VirtualMachine {
        &mut self.vm
    }

    /// Waits for the VM to end and returns how.
    pub async fn wait(&mut self) -> crate::ExitKind {
        let kind = self.vm.wait().await;
        self.ended = true;
        kind
    }

    /// Packages the disk as the guest left it, with `machine` as the new image's
    /// `machine.json` and the base image's kernel and initrd when `machine` boots directly.
    /// Writes `output` atomically (a temporary file renamed at the end); the same disk gives
    /// the same bytes.
    pub fn package(
        &self,
        machine: &Machine,
        output: &Path,
        level: i32,
    ) -> Result<Digest, PackageError> {
        if !self.ended {
            return Err(PackageError::Running);
        }
        let staging = tempfile::Builder::new()
            .prefix(".taskvm-package-")
            .tempdir_in(
                output
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new(".")),
            )
            .map_err(PackageError::Machine)?;
        let machine_path = staging.path().join("machine.json");
        let text = serde_json::to_vec_pretty(machine)
            .map_err(|error| PackageError::Machine(error.into()))?;
        std::fs::write(&machine_path, text).map_err(PackageError::Machine)?;
        let lease = self.vm.lease();
        let boots = machine.boot.is_some();
        let inputs = PackInputs {
            disk: self.vm.overlay(),
            disk_format: Some("qcow2".to_owned()),
            machine: machine_path,
            kernel: boots.then(|| lease.kernel_path()).flatten(),
            initrd: machine
                .boot
                .as_ref()
                .and_then(|boot| boot.initrd.as_ref())
                .and_then(|_| lease.initrd_path()),
            level,
        };
        Ok(pack(&inputs, output)?)
    }
}
