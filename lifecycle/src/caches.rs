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

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

/// The user and group `e2fsck` runs as (`nobody`).
const CHECKER_ID: u32 = 65_534;
/// Exit statuses of `e2fsck -p` below this mean the file system is usable.
const E2FSCK_UNCORRECTED: i32 = 4;

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

/// One kept copy, as `taskvm cache ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInfo {
    /// The cache's name.
    pub name: String,
    /// The copy's number.
    pub copy: u32,
    /// Bytes it takes on the host's disk.
    pub bytes: u64,
    /// When a task last gave it back (or took it).
    pub last_used: std::time::SystemTime,
    /// Whether a task holds it now.
    pub in_use: bool,
    /// Whether it is checked before its next use (its last task did not end cleanly).
    pub dirty: bool,
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
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&lock_path)
                .map_err(io(&lock_path))?;
            let free =
                rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                    .is_ok();
            if !free {
                continue;
            }
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
        self.format(&out.disk, name)?;
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
            self.format(&out.disk, &name)?;
            out.notes.push(format!("cache {name}: made"));
        } else if dirty.exists() {
            match check(&out.disk) {
                Ok(()) => out.notes.push(format!(
                    "cache {name}: its last task did not end cleanly; e2fsck found it usable"
                )),
                Err(reason) => {
                    out.notes.push(format!(
                        "cache {name}: its last task did not end cleanly and e2fsck could not \
                         repair it ({reason}); it starts empty"
                    ));
                    self.format(&out.disk, &name)?;
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

    /// A new empty file system on `disk`.
    fn format(&self, disk: &Path, name: &str) -> Result<(), CacheError> {
        let _ = fs::remove_file(disk);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(disk)
            .and_then(|file| file.set_len(self.disk_size))
            .map_err(|source| CacheError::Io {
                name: name.to_owned(),
                path: disk.to_owned(),
                source,
            });
        file?;
        let output = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
            ])
            .arg("-L")
            .arg(label(name))
            .arg(disk)
            .stdin(Stdio::null())
            .output()
            .map_err(|error| CacheError::Format {
                name: name.to_owned(),
                reason: format!("cannot run mkfs.ext4: {error}"),
            })?;
        if !output.status.success() {
            let _ = fs::remove_file(disk);
            return Err(CacheError::Format {
                name: name.to_owned(),
                reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    /// Every kept copy, by name then number.
    pub fn list(&self) -> Vec<CopyInfo> {
        let mut found = Vec::new();
        let Ok(names) = fs::read_dir(&self.root) else {
            return found;
        };
        for entry in names.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(files) = fs::read_dir(entry.path()) else {
                continue;
            };
            for file in files.flatten() {
                let file_name = file.file_name().to_string_lossy().into_owned();
                let Some(copy) = file_name.strip_suffix(".raw").and_then(|n| n.parse().ok()) else {
                    continue;
                };
                let Ok(meta) = file.metadata() else { continue };
                let dir = entry.path();
                let lock = dir.join(format!("{copy}.lock"));
                use std::os::unix::fs::MetadataExt;
                found.push(CopyInfo {
                    name: name.clone(),
                    copy,
                    bytes: meta.blocks() * 512,
                    last_used: fs::metadata(&lock)
                        .and_then(|meta| meta.modified())
                        .or_else(|_| meta.modified())
                        .unwrap_or(std::time::UNIX_EPOCH),
                    in_use: Self::held(&lock).is_none(),
                    dirty: dir.join(format!("{copy}.dirty")).exists(),
                });
            }
        }
        found.sort_by(|a, b| (&a.name, a.copy).cmp(&(&b.name, b.copy)));
        found
    }

    /// Removes every copy of cache `name` that no task holds; returns how many were
    /// removed and how many are in use (left alone).
    pub fn remove(&self, name: &str) -> (usize, usize) {
        let (mut removed, mut busy) = (0, 0);
        for info in self.list().into_iter().filter(|info| info.name == name) {
            match self.remove_copy(&info) {
                true => removed += 1,
                false => busy += 1,
            }
        }
        if removed > 0 && busy == 0 {
            let _ = fs::remove_dir_all(self.root.join(name));
        }
        (removed, busy)
    }

    /// Removes least recently used copies no task holds until the kept copies take at most
    /// `budget` bytes; returns those removed.
    pub fn gc(&self, budget: u64) -> Vec<CopyInfo> {
        let mut copies = self.list();
        let mut total: u64 = copies.iter().map(|info| info.bytes).sum();
        copies.sort_by_key(|info| info.last_used);
        let mut removed = Vec::new();
        for info in copies {
            if total <= budget {
                break;
            }
            if !info.in_use && self.remove_copy(&info) {
                total = total.saturating_sub(info.bytes);
                removed.push(info);
            }
        }
        removed
    }

    /// Removes one copy unless a task holds it; whether it was removed.
    fn remove_copy(&self, info: &CopyInfo) -> bool {
        let dir = self.root.join(&info.name);
        let Some(_lock) = Self::held(&dir.join(format!("{}.lock", info.copy))) else {
            return false;
        };
        let _ = fs::remove_file(dir.join(format!("{}.raw", info.copy)));
        let _ = fs::remove_file(dir.join(format!("{}.dirty", info.copy)));
        true
    }

    /// The copy's lock, held, when no task holds it.
    fn held(lock: &Path) -> Option<File> {
        let file = OpenOptions::new().write(true).open(lock).ok()?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
        Some(file)
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

/// `e2fsck -p` of `disk` as an unprivileged user on an inherited descriptor; the reason when
/// the file system is not usable.
fn check(disk: &Path) -> Result<(), String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(|error| error.to_string())?;
    // The checker reopens the disk through /proc, which asks the file's owner.
    rustix::fs::fchown(
        &file,
        Some(rustix::fs::Uid::from_raw(CHECKER_ID)),
        Some(rustix::fs::Gid::from_raw(CHECKER_ID)),
    )
    .map_err(|error| error.to_string())?;
    let fd = file.as_raw_fd();
    let mut command = Command::new("e2fsck");
    command
        .args(["-p", "-f"])
        .arg(format!("/proc/self/fd/{fd}"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .uid(CHECKER_ID)
        .gid(CHECKER_ID)
        .current_dir("/");
    // SAFETY: only clears the close-on-exec flag of a descriptor this process owns, between
    // fork and exec, without allocating.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            let borrowed = std::os::fd::BorrowedFd::borrow_raw(fd);
            rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
    let output = command.output();
    let _ = rustix::fs::fchown(
        &file,
        Some(rustix::fs::Uid::ROOT),
        Some(rustix::fs::Gid::ROOT),
    );
    let output = output.map_err(|error| format!("cannot run e2fsck: {error}"))?;
    match output.status.code() {
        Some(code) if code < E2FSCK_UNCORRECTED => Ok(()),
        code => {
            let said = String::from_utf8_lossy(&output.stdout);
            let last = said.lines().last().unwrap_or_default();
            Err(format!(
                "e2fsck exit {}: {}",
                code.map_or("by a signal".to_owned(), |code| code.to_string()),
                schemas::shown::escaped(last)
            ))
        }
    }
}

/// The task log's line for a copy removed to keep the budget.
fn evicted_note(info: &CopyInfo) -> String {
    format!(
        "cache {} copy {} removed, least recently used, to keep the caches within \
         mounts.cacheBudget",
        info.name, info.copy
    )
}

/// The file system label of cache `name` (ext4 labels hold 16 bytes).
fn label(name: &str) -> String {
    name.chars().take(16).collect()
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn gc_removes_the_least_recently_used_free_copies_down_to_the_budget() {
        let root = tempfile::tempdir().unwrap();
        let store = CacheStore::open(root.path(), SIZE, 1, u64::MAX).unwrap();
        for name in ["old", "mid", "new"] {
            store.check_out(name).unwrap().release(true, false);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let held = store.check_out("old").unwrap(); // in use, and now the most recent
        let listed = store.list();
        assert_eq!(listed.len(), 3, "{listed:?}");
        assert!(listed.iter().all(|info| info.bytes > 0));
        assert!(
            listed
                .iter()
                .find(|info| info.name == "old")
                .unwrap()
                .in_use
        );
        let one = listed[0].bytes;
        let removed = store.gc(one);
        let names: Vec<&str> = removed.iter().map(|info| info.name.as_str()).collect();
        assert_eq!(names, ["mid", "new"], "oldest first, the held one spared");
        assert_eq!(store.gc(0).len(), 0, "nothing free is left");
        assert_eq!(store.remove("old"), (0, 1), "a held copy is not removed");
        held.release(true, false);
        assert_eq!(store.remove("old"), (1, 0));
        assert!(store.list().is_empty());
    }
}
