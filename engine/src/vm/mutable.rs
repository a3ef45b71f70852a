//! A VM whose disk is kept: booted like a task's VM (sandbox, isolated network, metadata
//! service) from a new overlay on a leased image or on a disk of the host's, or from a fresh
//! empty disk, and packaged afterwards into a new image with the image manager's writer. The
//! base is never written: every change lands in the overlay, which `package` flattens into
//! the new image's raw disk.

use std::path::Path;

use image_manager::{pack_with_progress, Digest, PackInputs, PackProgress};
use schemas::{Machine, ResolvedMachine};
use thiserror::Error;

use crate::disk::drives::BootSource;
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
    /// The disk could not be prepared for reading on the host.
    #[error("settling the disk: {0}")]
    Disk(std::io::Error),
    /// The machine boots directly but the source has no such kernel or initrd.
    #[error("the machine boots directly but the base has no {0}")]
    BootFile(&'static str),
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
    /// Boots `source` (a leased image, or files of the host's) as `machine` on a fresh
    /// overlay, or a fresh disk.
    pub async fn boot(
        source: impl Into<BootSource>,
        machine: &ResolvedMachine,
        settings: &VmSettings,
    ) -> Result<MutableImage, VmError> {
        let vm = VirtualMachine::start_from(source.into(), machine, settings).await?;
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

    /// Ends the VM and removes everything it had ([`VirtualMachine::release`]); the packaged
    /// image, written elsewhere, stays.
    pub async fn release(self) {
        self.vm.release().await;
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
    /// the same bytes. `progress` hears how far flattening and compressing are.
    pub fn package(
        &self,
        machine: &Machine,
        output: &Path,
        level: i32,
        progress: &(dyn Fn(PackProgress) + Sync),
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
        let source = self.vm.source();
        let (kernel, initrd) = match &machine.boot {
            None => (None, None),
            Some(boot) => {
                let kernel = source
                    .kernel(&boot.kernel)
                    .ok_or(PackageError::BootFile("kernel"))?;
                let initrd = match &boot.initrd {
                    Some(name) => Some(
                        source
                            .initrd(name)
                            .ok_or(PackageError::BootFile("initrd"))?,
                    ),
                    None => None,
                };
                (Some(kernel), initrd)
            }
        };
        let inputs = PackInputs {
            disk: self.vm.settled_disk().map_err(PackageError::Disk)?,
            disk_format: Some("qcow2".to_owned()),
            machine: machine_path,
            kernel,
            initrd,
            level,
        };
        Ok(pack_with_progress(&inputs, output, progress)?)
    }
}
