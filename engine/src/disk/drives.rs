//! What a VM's disks come from. A task's VM boots a cached image ([`BootSource::Image`]); an
//! image build may also start from the host's own files ([`BootSource::Files`]): an existing
//! disk of any distribution, or a fresh empty one for an installer. Besides the root disk a
//! VM may have [`ExtraDrive`]s: a cloud-init seed, an installer ISO.
//!
//! Files of the host's are never written and never need to be readable by the sandbox user:
//! the engine opens them itself and hands QEMU the open descriptor (`-add-fd`, referred to as
//! `/dev/fdset/N`), as it does for every layer of the root disk. Kernel and initrd, which QEMU
//! reads by name, are shown read-only in the VM's jail (or, without a jail, copied into the
//! VM's runtime directory).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use image_manager::Lease;

/// Where a VM's root disk and direct-boot files come from.
#[derive(Debug)]
pub enum BootSource {
    /// A cached image (held until the VM is dropped).
    Image(Lease),
    /// Files of the host's.
    Files(HostFiles),
}

impl From<Lease> for BootSource {
    fn from(lease: Lease) -> Self {
        BootSource::Image(lease)
    }
}

/// A root disk and direct-boot files outside the image cache.
#[derive(Debug, Clone)]
pub struct HostFiles {
    /// The root disk's origin.
    pub disk: HostDisk,
    /// The kernel, when the machine boots directly.
    pub kernel: Option<PathBuf>,
    /// The initrd, when the machine's `boot.initrd` is set.
    pub initrd: Option<PathBuf>,
}

/// The origin of a VM's root disk when it does not come from the cache.
#[derive(Debug, Clone)]
pub enum HostDisk {
    /// An existing disk, read-only: the VM writes to an overlay on it.
    Existing {
        /// The disk file.
        path: PathBuf,
        /// Its format (`raw` or `qcow2`).
        format: String,
    },
    /// A new empty disk of this many bytes.
    Empty {
        /// Size in bytes.
        size: u64,
    },
}

impl BootSource {
    /// The layers below the VM's overlay, top first, with their formats: an image's layer and
    /// disk, or a disk of the host's (none for a fresh empty disk).
    pub fn base_layers(&self) -> Vec<(PathBuf, String)> {
        match self {
            BootSource::Image(lease) => {
                let mut layers = Vec::new();
                if let Some(layer) = lease.layer_path() {
                    layers.push((layer, "qcow2".to_owned()));
                }
                layers.push((lease.disk_path(), "raw".to_owned()));
                layers
            }
            BootSource::Files(files) => match &files.disk {
                HostDisk::Existing { path, format } => vec![(path.clone(), format.clone())],
                HostDisk::Empty { .. } => Vec::new(),
            },
        }
    }

    /// The cached image's lease, when the VM runs one.
    pub fn lease(&self) -> Option<&Lease> {
        match self {
            BootSource::Image(lease) => Some(lease),
            BootSource::Files(_) => None,
        }
    }

    /// The kernel for direct boot named `name` in the machine definition.
    pub fn kernel(&self, name: &str) -> Option<PathBuf> {
        match self {
            BootSource::Image(lease) => Some(lease.dir().join(name)),
            BootSource::Files(files) => files.kernel.clone(),
        }
    }

    /// The initrd named `name` in the machine definition.
    pub fn initrd(&self, name: &str) -> Option<PathBuf> {
        match self {
            BootSource::Image(lease) => Some(lease.dir().join(name)),
            BootSource::Files(files) => files.initrd.clone(),
        }
    }
}

/// How a guest sees an extra drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveMedia {
    /// A disk (virtio-blk).
    Disk,
    /// A CD-ROM (IDE on pc and q35; a read-only virtio disk on microvm).
    Cdrom,
}

/// A drive besides the root disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraDrive {
    /// The file on the host.
    pub path: PathBuf,
    /// Its format (`raw`, `qcow2`).
    pub format: String,
    /// Disk or CD-ROM.
    pub media: DriveMedia,
    /// Whether the guest may write to it (the file is opened read-write then).
    pub writable: bool,
    /// Whether the firmware boots from it before the root disk (an installer).
    pub boot_first: bool,
    /// The virtio serial number the guest finds it by (a task's mount slot).
    pub serial: Option<String>,
}

impl ExtraDrive {
    /// A read-only disk, e.g. a cloud-init seed.
    pub fn read_only_disk(path: impl Into<PathBuf>, format: &str) -> Self {
        ExtraDrive {
            path: path.into(),
            format: format.to_owned(),
            media: DriveMedia::Disk,
            writable: false,
            boot_first: false,
            serial: None,
        }
    }

    /// A disk in a task's mount slot: raw, found by the guest by `serial`.
    pub fn slot_disk(path: impl Into<PathBuf>, serial: String, writable: bool) -> Self {
        ExtraDrive {
            path: path.into(),
            format: "raw".to_owned(),
            media: DriveMedia::Disk,
            writable,
            boot_first: false,
            serial: Some(serial),
        }
    }

    /// An installer's CD-ROM, booted first.
    pub fn installer_cdrom(path: impl Into<PathBuf>) -> Self {
        ExtraDrive {
            path: path.into(),
            format: "raw".to_owned(),
            media: DriveMedia::Cdrom,
            writable: false,
            boot_first: true,
            serial: None,
        }
    }

    /// Opens the file the way QEMU will use it.
    pub(crate) fn open(&self) -> io::Result<File> {
        open_for_qemu(&self.path, self.writable)
    }
}

/// Opens `path` for QEMU (read-only unless `writable`), with an error naming the path.
pub(crate) fn open_for_qemu(path: &Path, writable: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", path.display())))
}
