//! Writable caches kept between tasks (payload `mounts`, `{"cache": NAME, …}`), generic-worker's
//! way: a task gets a copy of cache NAME that no other running task holds; a copy is an ext4
//! file system on a sparse raw disk of `mounts.diskSize`, made once, and up to
//! `mounts.cacheCopies` copies are kept per name. A task finding every kept copy busy gets a
//! fresh one that is discarded after it.
//!
//! On disk, under the cache directory (root's, 0700): `NAME/N.raw` the copy's disk, `NAME/N.lock`
//! held (`flock`) while a task has copy N, and `NAME/N.dirty` while a copy is out. A copy found
//! dirty when checked out — its task's worker was killed, or its VM did not power off after
//! unmounting — is checked with `e2fsck -p` first and made afresh when that cannot repair it,
//! so a corrupt cache is never handed over. The check reads what a guest wrote, so it runs as
//! an unprivileged user on a descriptor of the disk, never as root.
//!
//! # Layout
//! - this module: [`CacheStore`] and its check-out, [`CheckedOut`] and its release.
//! - `filesystem`: a copy's file system made (`mkfs.ext4`) and checked (`e2fsck`).
//! - `inventory`: the kept copies listed ([`CopyInfo`]), removed, and trimmed to the budget.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use self::inventory::evicted_note;
pub use self::inventory::CopyInfo;

mod filesystem;
mod inventory;

/// Why a cache could not be handed out.
#[derive(Debug, Error)]
pub enum CacheError {
    /// A file of the cache directory could not be made or used.
    #[error("cache {name}: {path}: {source}")]
    Io {
        /// The cache.
        name: String,
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// `mkfs.ext4` failed.
    #[error("cache {name}: making its file system failed: {reason}")]
    Format {
        /// The cache.
        name: String,
        /// mkfs's words.
        reason: String,
    },
}

/// The caches of one worker.
#[derive(Debug, Clone)]
pub struct CacheStore {
    root: PathBuf,
    disk_size: u64,
    copies: u32,
    budget: u64,
}

/// The lock file `path` (made 0600 when missing), held exclusively if no task holds it now.
fn lock_if_free(path: &Path) -> io::Result<Option<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    let free = rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive);
    Ok(free.is_ok().then_some(file))
}

/// A copy of a cache, held by one task until [`CheckedOut::release`] (or drop, which leaves it
/// marked dirty: checked before its next use).
#[derive(Debug)]
pub struct CheckedOut {
    name: String,
    disk: PathBuf,
    dirty: Option<PathBuf>,
    lock: Option<File>,
    /// Whether the copy was made for this task (every kept one was busy): discarded after it.
    throwaway: bool,
    /// What happened to the copy on the way out (made, checked), for the task log.
    pub notes: Vec<String>,
}

impl CacheStore {
    /// The caches under `root` (made when missing), each copy a disk of `disk_size` bytes,
    /// `copies` kept per name. Throwaway copies a killed worker left are removed.
    pub fn open(root: &Path, disk_size: u64, copies: u32, budget: u64) -> io::Result<CacheStore> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)?;
        let store = CacheStore {
            root: root.to_owned(),
            disk_size,
            copies: copies.max(1),
            budget,
        };
        store.sweep_throwaways();
        Ok(store)
    }

    /// The store `config` names: `mounts.cacheDir`, else `STATE_DIR/caches`.
    pub fn for_config(config: &schemas::WorkerConfig) -> io::Result<CacheStore> {
        let mounts = &config.mounts;
        let root = mounts
            .cache_dir
            .clone()
            .unwrap_or_else(|| config.state_dir.join("caches"));
        CacheStore::open(
            &root,
            mounts.disk_size,
            mounts.cache_copies,
            mounts.cache_budget,
        )
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A copy of cache `name` for one task: a free kept copy (checked first when dirty, made
    /// when missing), else a fresh throwaway one. Blocking (mkfs, e2fsck): call off the async
    /// threads.
    pub fn check_out(&self, name: &str) -> Result<CheckedOut, CacheError> {
        let evicted = self.gc(self.budget);
        let dir = self.root.join(name);
        let io = |path: &Path| {
            let name = name.to_owned();
            let path = path.to_owned();
            move |source| CacheError::Io { name, path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        for copy in 0..self.copies {
            let lock_path = dir.join(format!("{copy}.lock"));
            let Some(lock) = lock_if_free(&lock_path).map_err(io(&lock_path))? else {
                continue;
            };
            let mut out = CheckedOut {
                name: name.to_owned(),
                disk: dir.join(format!("{copy}.raw")),
                dirty: Some(dir.join(format!("{copy}.dirty"))),
                lock: Some(lock),
                throwaway: false,
                notes: Vec::new(),
            };
            self.make_usable(&mut out)?;
            out.notes.splice(0..0, evicted.iter().map(evicted_note));
            return Ok(out);
        }
        let disk = dir.join(format!(
            ".fresh-{}-{:016x}.raw",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut out = CheckedOut {
            name: name.to_owned(),
            disk,
            dirty: None,
            lock: None,
            throwaway: true,
            notes: evicted
                .iter()
                .map(evicted_note)
                .chain([format!(
                    "cache {name}: all {} kept copies are in use; this task gets a fresh one, \
                 discarded after it (mounts.cacheCopies keeps more)",
                    self.copies
                )])
                .collect(),
        };
        filesystem::format(&out.disk, self.disk_size, name)?;
        out.notes.push(format!("cache {name}: made"));
        Ok(out)
    }

    /// Makes `out`'s kept copy usable: made when missing or of another size, checked when
    /// dirty (made afresh when the check cannot repair it); then marked dirty until released.
    fn make_usable(&self, out: &mut CheckedOut) -> Result<(), CacheError> {
        let name = out.name.clone();
        let dirty = out.dirty.clone().unwrap_or_default();
        let size = fs::metadata(&out.disk).map(|meta| meta.len()).ok();
        if size != Some(self.disk_size) {
            filesystem::format(&out.disk, self.disk_size, &name)?;
            out.notes.push(format!("cache {name}: made"));
        } else if dirty.exists() {
            match filesystem::check(&out.disk) {
                Ok(()) => out.notes.push(format!(
                    "cache {name}: its last task did not end cleanly; e2fsck found it usable"
                )),
                Err(reason) => {
                    out.notes.push(format!(
                        "cache {name}: its last task did not end cleanly and e2fsck could not \
                         repair it ({reason}); it starts empty"
                    ));
                    filesystem::format(&out.disk, self.disk_size, &name)?;
                }
            }
        }
        File::create(&dirty).map_err(|source| CacheError::Io {
            name,
            path: dirty.clone(),
            source,
        })?;
        Ok(())
    }

    /// Removes the throwaway copies of workers that are gone.
    fn sweep_throwaways(&self) {
        let Ok(names) = fs::read_dir(&self.root) else {
            return;
        };
        for dir in names.flatten() {
            let Ok(files) = fs::read_dir(dir.path()) else {
                continue;
            };
            for file in files.flatten() {
                let file_name = file.file_name().to_string_lossy().into_owned();
                let Some(rest) = file_name.strip_prefix(".fresh-") else {
                    continue;
                };
                let pid: Option<u32> = rest.split('-').next().and_then(|pid| pid.parse().ok());
                let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                if !alive {
                    let _ = fs::remove_file(file.path());
                }
            }
        }
    }
}

impl CheckedOut {
    /// The cache's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The copy's disk, for the VM.
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// Gives the copy back after its VM is gone: `clean` when the guest unmounted it and
    /// powered off (no check needed next time), `purge` to discard what it holds.
    pub fn release(mut self, clean: bool, purge: bool) {
        if let Some(lock) = &self.lock {
            let _ = lock.set_modified(std::time::SystemTime::now());
        }
        if purge {
            let _ = fs::remove_file(&self.disk);
        }
        if clean || purge {
            if let Some(dirty) = self.dirty.take() {
                let _ = fs::remove_file(dirty);
            }
        }
    }
}

impl Drop for CheckedOut {
    fn drop(&mut self) {
        if self.throwaway {
            let _ = fs::remove_file(&self.disk);
        }
        // The dirty marker stays unless released clean; the lock goes with the file.
        self.lock.take();
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    const SIZE: u64 = 64 << 20;

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn busy_copies_are_never_shared_and_a_throwaway_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let store = CacheStore::open(root.path(), SIZE, 2, u64::MAX).unwrap();
        let first = store.check_out("deps").unwrap();
        let second = store.check_out("deps").unwrap();
        let third = store.check_out("deps").unwrap();
        assert_ne!(first.disk(), second.disk());
        assert!(third.throwaway, "{:?}", third.notes);
        assert!(
            third.notes[0].contains("mounts.cacheCopies"),
            "{:?}",
            third.notes
        );
        let throwaway = third.disk().to_owned();
        assert_eq!(fs::metadata(&throwaway).unwrap().len(), SIZE);
        third.release(true, false);
        assert!(!throwaway.exists());
        let first_disk = first.disk().to_owned();
        first.release(true, false);
        second.release(true, false);
        // Free again: the first copy, kept, with no dirty marker.
        let again = store.check_out("deps").unwrap();
        assert_eq!(again.disk(), first_disk);
        assert!(again.notes.is_empty(), "{:?}", again.notes);
        drop(again);
        assert_eq!(
            files(&root.path().join("deps")),
            ["0.dirty", "0.lock", "0.raw", "1.lock", "1.raw"]
        );
    }

    #[test]
    fn a_dirty_copy_is_checked_and_a_broken_one_made_afresh() {
        let root = tempfile::tempdir().unwrap();
        let store = CacheStore::open(root.path(), SIZE, 1, u64::MAX).unwrap();
        let out = store.check_out("deps").unwrap();
        let disk = out.disk().to_owned();
        drop(out); // as if its worker died: left dirty
        let out = store.check_out("deps").unwrap();
        assert!(
            out.notes[0].contains("e2fsck found it usable"),
            "{:?}",
            out.notes
        );
        drop(out);
        // Overwrite the superblock and its first backups: beyond what e2fsck -p repairs.
        let file = OpenOptions::new().write(true).open(&disk).unwrap();
        use std::os::unix::fs::FileExt;
        let junk = vec![0xa5u8; 1 << 20];
        file.write_all_at(&junk, 0).unwrap();
        drop(file);
        let out = store.check_out("deps").unwrap();
        assert!(out.notes[0].contains("could not repair"), "{:?}", out.notes);
        let status = Command::new("e2fsck")
            .args(["-n", "-f"])
            .arg(out.disk())
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
        let meta = fs::metadata(out.disk()).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (meta.uid(), meta.gid()),
            (0, 0),
            "the check gave the disk back to root"
        );
    }
}
