//! The snapshot store: one snapshot per key under `STATE/snapshots/KEY/`, where the key is
//! the sha256 of everything a restore depends on — the image's digest, the resolved machine,
//! the QEMU build, the accelerator, the host TSC (it is on the kernel command line) and the
//! network settings (the guest's address and gateway are too). A changed part gives a new key,
//! hence a new snapshot. The first task of a key builds it while concurrent ones wait on the
//! key's lock (then use it); later ones restore it. Snapshots whose image left the cache are
//! removed by [`SnapshotStore::sweep`].

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::format::Snapshot;
use crate::disk::slots::SlotLayout;
use crate::network::NetworkSettings;
use crate::{Accelerator, VmError};
use image_manager::Lease;
use schemas::ResolvedMachine;
use sha2::{Digest, Sha256};

/// File in a snapshot directory naming its image's cache entry (whose `disk.img` backs the
/// snapshot's disk), for the sweep.
const IMAGE_FILE: &str = "image";

/// File beside the snapshots remembering what the QEMU binary says its version is.
const QEMU_VERSION_FILE: &str = "qemu-version";

/// Where snapshots live, and what a key is made of besides the task's own parts.
pub struct SnapshotStore {
    root: PathBuf,
    qemu: String,
    qemu_version: std::sync::OnceLock<String>,
}

/// A snapshot got from the store.
pub struct Got {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Whether this call built it.
    pub built: bool,
}

impl SnapshotStore {
    /// The store under `state_dir`, for VMs of `qemu`.
    pub fn open(state_dir: &Path, qemu: &str) -> std::io::Result<SnapshotStore> {
        let root = snapshots_dir(state_dir);
        fs::create_dir_all(&root)?;
        Ok(SnapshotStore {
            root,
            qemu: qemu.to_owned(),
            qemu_version: std::sync::OnceLock::new(),
        })
    }

    /// The key of a VM of `machine` on `lease` with these settings.
    pub fn key(
        &self,
        lease: &Lease,
        machine: &ResolvedMachine,
        accelerator: Accelerator,
        tsc_khz: Option<u64>,
        network: &NetworkSettings,
        slots: Option<SlotLayout>,
    ) -> String {
        let mut parts = serde_json::json!({
            // The engine's command-line layout (2: the jail's `-blockdev` chain on descriptors;
            // 3: guest RAM in `ram.bin`, a backend object mapped private).
            "layout": 3,
            "image": lease.digest().hex(),
            "machine": machine,
            "qemu": self.qemu_version(),
            "accelerator": format!("{accelerator:?}"),
            "tscKhz": tsc_khz,
            "guestAddress": network.guest_address.to_string(),
            "egress": network.egress,
        });
        // Only VMs with mount slots have them in their key: the keys of others stay as they were.
        if let Some(slots) = slots {
            parts["slots"] = serde_json::json!({ "count": slots.count, "size": slots.size });
        }
        hex::encode(Sha256::digest(parts.to_string().as_bytes()))
    }

    /// `qemu --version`, asked once per installed binary (remembered in `qemu-version`).
    fn qemu_version(&self) -> &str {
        self.qemu_version.get_or_init(|| {
            crate::qemu::version::remembered_qemu_version(
                &self.qemu,
                &self.root.join(QEMU_VERSION_FILE),
            )
        })
    }

    /// The snapshot of `key`, built with `build` (given the directory to create) when there
    /// is none yet. One builder per key at a time, across processes.
    pub async fn get_or_build<F, Fut>(&self, key: &str, build: F) -> Result<Got, VmError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<Snapshot, VmError>>,
    {
        let setup = |error: std::io::Error| VmError::Setup(error);
        let lock_path = self.root.join(format!("{key}.lock"));
        let _lock = tokio::task::spawn_blocking(move || -> std::io::Result<fs::File> {
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(lock_path)?;
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
            Ok(file)
        })
        .await
        .map_err(|error| setup(std::io::Error::other(error.to_string())))?
        .map_err(setup)?;
        let dir = self.root.join(key);
        if let Ok(snapshot) = Snapshot::open(&dir) {
            return Ok(Got {
                snapshot,
                built: false,
            });
        }
        // Leftovers of a crashed build or a discarded snapshot.
        let _ = fs::remove_dir_all(&dir);
        let building = self.root.join(format!("{key}.building"));
        let _ = fs::remove_dir_all(&building);
        if let Err(error) = build(building.clone()).await {
            let _ = fs::remove_dir_all(&building);
            return Err(error);
        }
        fs::rename(&building, &dir).map_err(setup)?;
        Ok(Got {
            snapshot: Snapshot::open(&dir).map_err(setup)?,
            built: true,
        })
    }

    /// Records which image a snapshot being built in `dir` belongs to.
    pub fn label(dir: &Path, lease: &Lease) -> std::io::Result<()> {
        fs::write(
            dir.join(IMAGE_FILE),
            lease.dir().as_os_str().as_encoded_bytes(),
        )
    }

    /// Removes the snapshot of `key` (it did not restore); the next task rebuilds it.
    pub fn discard(&self, key: &str) {
        let _ = fs::remove_dir_all(self.root.join(key));
    }

    /// Remembers that no snapshot can be made for `key` (for `auto`).
    pub fn mark_unusable(&self, key: &str, reason: &str) {
        let _ = fs::write(self.root.join(format!("{key}.unusable")), reason);
    }

    /// Whether `key` was marked unusable.
    pub fn is_unusable(&self, key: &str) -> bool {
        self.root.join(format!("{key}.unusable")).exists()
    }

    /// Removes snapshots whose image left its cache; returns how many.
    pub fn sweep(&self) -> usize {
        sweep_snapshots(&self.root)
    }
}

/// The snapshots directory of a state directory.
pub fn snapshots_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("snapshots")
}

/// Removes the snapshots under `root` whose image entry is gone (after a garbage collection of
/// whichever cache held it); returns how many.
pub fn sweep_snapshots(root: &Path) -> usize {
    let Ok(entries) = fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        // A build in progress is its builder's, under the key's lock.
        let building = path.extension().is_some_and(|ext| ext == "building");
        if !path.is_dir() || building {
            continue;
        }
        let entry = fs::read_to_string(path.join(IMAGE_FILE)).unwrap_or_default();
        let cached = !entry.is_empty() && Path::new(&entry).is_dir();
        if !cached && fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// How long building a snapshot may wait for the agent.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
