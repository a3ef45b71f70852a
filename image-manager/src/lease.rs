//! A lease: the right to use one cached image until dropped. While any lease on an image is
//! alive, garbage collection leaves the image alone.

use std::fs::FileTimes;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use schemas::{migrate_machine_definition, parse_json, Machine};

use crate::error::ImageError;
use crate::layout::{DISK_IMG, LAYER_QCOW2, MACHINE_JSON};
use crate::lock::FileLock;
use crate::reference::Digest;

/// A cached image in use. Dropping it records the last use and lets GC consider the image.
#[derive(Debug)]
pub struct Lease {
    digest: Digest,
    dir: PathBuf,
    machine: Machine,
    has_layer: bool,
    lock: FileLock,
}

impl Lease {
    pub(crate) fn new(digest: Digest, dir: PathBuf, lock: FileLock) -> Result<Self, ImageError> {
        touch(&lock);
        let machine_path = dir.join(MACHINE_JSON);
        let text = std::fs::read_to_string(&machine_path)
            .map_err(|e| ImageError::io_at("read", &machine_path, e))?;
        let machine = parse_json(&text)
            .and_then(|value| migrate_machine_definition(&value))
            .map_err(ImageError::Machine)?;
        let has_layer = dir.join(LAYER_QCOW2).is_file();
        Ok(Lease {
            digest,
            dir,
            machine,
            has_layer,
            lock,
        })
    }

    /// The image's digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The image's directory (read-only by convention: never write into it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image's machine definition.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// The raw base disk.
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join(DISK_IMG)
    }

    /// The qcow2 layer on the base disk, when the image has one.
    pub fn layer_path(&self) -> Option<PathBuf> {
        self.has_layer.then(|| self.dir.join(LAYER_QCOW2))
    }

    /// The disk a VM's overlay should be backed by: the layer if any, else the raw disk.
    pub fn boot_disk(&self) -> (PathBuf, &'static str) {
        match self.layer_path() {
            Some(layer) => (layer, "qcow2"),
            None => (self.disk_path(), "raw"),
        }
    }

    /// The kernel for direct boot, when `machine.json` names one.
    pub fn kernel_path(&self) -> Option<PathBuf> {
        let boot = self.machine.boot.as_ref()?;
        Some(self.dir.join(&boot.kernel))
    }

    /// The initrd for direct boot, when `machine.json` names one.
    pub fn initrd_path(&self) -> Option<PathBuf> {
        let initrd = self.machine.boot.as_ref()?.initrd.as_ref()?;
        Some(self.dir.join(initrd))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        touch(&self.lock);
    }
}

/// Records "used now" as the lock file's modification time.
fn touch(lock: &FileLock) {
    let now = SystemTime::now();
    let _ = lock
        .file()
        .set_times(FileTimes::new().set_modified(now).set_accessed(now));
}
