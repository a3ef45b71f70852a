//! The content-addressed image cache on disk.
//!
//! ```text
//! CACHE/sha256/<hex>/          a complete, validated image (never modified once there)
//! CACHE/leases/<hex>.lock      shared-locked by every lease; mtime = last use
//! CACHE/refs/<hash of ref>.json  reference → digest, with HTTP/file validators
//! CACHE/locks/<key>.lock       exclusive while one fetch of a reference or digest runs
//! CACHE/tmp/<random>/          unpacks in progress, each locked while its owner lives
//! ```
//!
//! An entry appears by an atomic rename of a fully written, validated and fsynced directory,
//! so a crash at any instant leaves either no entry or a complete one. Whatever a crashed
//! process left in `tmp/` is unlocked and removed by the next `Cache::open`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rand::Rng;
use schemas::config::CacheConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::disk_check::check_disks;
use crate::error::ImageError;
use crate::lease::Lease;
use crate::lock::FileLock;
use crate::pipeline::{stream_into, Progress};
use crate::reference::{Digest, ImageRequest};
use crate::source::{open, Opened, Validators};

/// Attempts of one fetch when errors are transient (5xx, resets, stalls).
const ATTEMPTS: u32 = 4;
/// First back-off between attempts; doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// An image cache rooted at a directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    limits: CacheConfig,
}

/// What a reference was last seen to point at.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RefRecord {
    reference: String,
    digest: String,
    validators: Validators,
    /// When the reference was last checked against its source (ns since the epoch).
    validated_at: u128,
}

/// One cached image, as `taskvm image ls` shows it.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    /// Its digest.
    pub digest: Digest,
    /// References known to point at it.
    pub references: Vec<String>,
    /// Bytes allocated on disk (holes excluded).
    pub allocated_bytes: u64,
    /// When a lease last began or ended.
    pub last_used: SystemTime,
    /// Whether a lease holds it now.
    pub in_use: bool,
    /// Whether something outside the cache pins it (a kept failed VM): garbage collection
    /// leaves it.
    pub pinned: bool,
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Removed entries and the bytes each freed.
    pub removed: Vec<(Digest, u64)>,
    /// Entries that would have been removed but were leased.
    pub skipped_in_use: usize,
    /// Entries that would have been removed but are pinned (a kept failed VM needs them).
    pub skipped_pinned: usize,
    /// Allocated bytes of the cache afterwards.
    pub cache_bytes: u64,
    /// Free bytes on the cache's file system afterwards.
    pub free_bytes: u64,
}

/// How a fetch was satisfied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchKind {
    /// Already cached by digest, or revalidated without a download.
    Hit,
    /// Downloaded (or read) and unpacked.
    Downloaded,
}

impl Cache {
    /// Opens (creating if needed) the cache at `limits.dir`, and removes what crashed
    /// processes left in `tmp/`.
    pub fn open(limits: CacheConfig) -> Result<Self, ImageError> {
        let cache = Cache {
            root: limits.dir.clone(),
            limits,
        };
        for dir in ["sha256", "leases", "refs", "locks", "tmp"] {
            let path = cache.root.join(dir);
            fs::create_dir_all(&path).map_err(|e| ImageError::io_at("create", &path, e))?;
        }
        cache.sweep_tmp()?;
        Ok(cache)
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The caps applied to images.
    pub fn limits(&self) -> &CacheConfig {
        &self.limits
    }

    fn entry_dir(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    fn lease_lock_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("leases")
            .join(format!("{}.lock", digest.hex()))
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        let key = hex::encode(Sha256::digest(reference.as_bytes()));
        self.root.join("refs").join(format!("{key}.json"))
    }

    /// Removes everything in `tmp/` whose owner is gone: a staging directory whose lock file
    /// nobody holds, and any directory without a lock file (its owner died mid-removal).
    fn sweep_tmp(&self) -> Result<(), ImageError> {
        let tmp = self.root.join("tmp");
        let entries = fs::read_dir(&tmp).map_err(|e| ImageError::io_at("read", &tmp, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "lock") {
                if let Ok(Some(_owner_gone)) = FileLock::try_exclusive(&path) {
                    remove_path(&path.with_extension(""));
                    let _ = fs::remove_file(&path);
                }
            } else if !path.with_extension("lock").exists() {
                remove_path(&path);
            }
        }
        Ok(())
    }

    /// A lease on the cached image `digest`, if it is cached.
    pub fn lease(&self, digest: &Digest) -> Result<Option<Lease>, ImageError> {
        let dir = self.entry_dir(digest);
        // Checked before locking so that a miss leaves no lock file behind…
        if !dir.is_dir() {
            return Ok(None);
        }
        let lock = FileLock::shared(&self.lease_lock_path(digest))?;
        // …and after, because GC may have removed the entry in between.
        if !dir.is_dir() {
            return Ok(None);
        }
        Lease::new(digest.clone(), dir, lock).map(Some)
    }

    /// Fetches the image `request` names (or finds it cached) and leases it.
    ///
    /// Concurrent fetches of one reference or digest, in this process or others, share one
    /// download: the first holds the reference's lock, the others wait for it and then find
    /// the entry. `progress` is called from another thread as bytes arrive.
    pub fn fetch(
        &self,
        request: &ImageRequest,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<(Lease, FetchKind), ImageError> {
        let asked_at = now_nanos();
        if let Some(pinned) = &request.pinned {
            if let Some(lease) = self.lease(pinned)? {
                return Ok((lease, FetchKind::Hit));
            }
        }
        let lock_key = match &request.pinned {
            Some(pinned) => format!("sha256-{}", pinned.hex()),
            None => format!(
                "ref-{}",
                hex::encode(Sha256::digest(request.reference.as_bytes()))
            ),
        };
        let _fetching =
            FileLock::exclusive(&self.root.join("locks").join(format!("{lock_key}.lock")))?;

        if let Some(pinned) = &request.pinned {
            if let Some(lease) = self.lease(pinned)? {
                return Ok((lease, FetchKind::Hit));
            }
        }
        let known = if request.pinned.is_none() {
            self.read_ref(&request.reference)
        } else {
            None
        };
        if let Some(record) = &known {
            // Someone validated it while this request waited for the lock: share that answer.
            if record.validated_at >= asked_at {
                if let Some(lease) = self.lease(&Digest::parse(&record.digest)?)? {
                    return Ok((lease, FetchKind::Hit));
                }
            }
        }

        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match self.fetch_once(request, known.as_ref(), progress) {
                Err(error) if error.is_transient() && attempt < ATTEMPTS => {
                    std::thread::sleep(backoff);
                    backoff *= 2;
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    fn fetch_once(
        &self,
        request: &ImageRequest,
        known: Option<&RefRecord>,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<(Lease, FetchKind), ImageError> {
        let stall = Duration::from_secs(u64::from(self.limits.stall_timeout));
        let cached_known = known.filter(|record| {
            Digest::parse(&record.digest).is_ok_and(|digest| self.entry_dir(&digest).is_dir())
        });
        let opened = open(&request.source, cached_known.map(|r| &r.validators), stall)?;
        let (reader, length, validators) = match opened {
            Opened::NotModified => {
                let record = cached_known.ok_or_else(|| {
                    ImageError::io(
                        "revalidate",
                        std::io::Error::other("304 without a cached entry"),
                    )
                })?;
                let digest = Digest::parse(&record.digest)?;
                self.write_ref(&request.reference, &digest, &record.validators)?;
                if let Some(lease) = self.lease(&digest)? {
                    return Ok((lease, FetchKind::Hit));
                }
                return Err(ImageError::NotCached(digest.hex().to_owned()));
            }
            Opened::Body {
                reader,
                length,
                validators,
            } => (reader, length, validators),
        };

        let staging = Staging::new(&self.root.join("tmp"))?;
        let streamed = stream_into(
            reader,
            length,
            &request.reference,
            staging.path(),
            &self.limits,
            progress,
        )?;
        if let Some(pinned) = &request.pinned {
            if *pinned != streamed.digest {
                return Err(ImageError::DigestMismatch {
                    expected: pinned.hex().to_owned(),
                    actual: streamed.digest.hex().to_owned(),
                });
            }
        }
        check_disks(
            staging.path(),
            streamed.unpacked.files.has_layer,
            &self.limits,
        )?;
        self.commit(staging, &streamed.digest)?;
        self.write_ref(&request.reference, &streamed.digest, &validators)?;
        let lease = self
            .lease(&streamed.digest)?
            .ok_or_else(|| ImageError::NotCached(streamed.digest.hex().to_owned()))?;
        Ok((lease, FetchKind::Downloaded))
    }

    /// Makes a validated staging directory the entry for `digest`: fsync, then rename.
    fn commit(&self, staging: Staging, digest: &Digest) -> Result<(), ImageError> {
        sync_dir_tree(staging.path())?;
        // The lease lock file exists before the entry does, so a lease never races its creation.
        drop(FileLock::shared(&self.lease_lock_path(digest))?);
        let target = self.entry_dir(digest);
        match fs::rename(staging.path(), &target) {
            Ok(()) => {
                staging.disarm();
                sync_dir(&self.root.join("sha256"))
            }
            // Another process committed the same image first: keep theirs, drop ours.
            Err(_) if target.is_dir() => Ok(()),
            Err(error) => Err(ImageError::io_at("commit", &target, error)),
        }
    }

    fn read_ref(&self, reference: &str) -> Option<RefRecord> {
        let text = fs::read(self.ref_path(reference)).ok()?;
        serde_json::from_slice::<RefRecord>(&text)
            .ok()
            .filter(|record| record.reference == reference)
    }

    fn write_ref(
        &self,
        reference: &str,
        digest: &Digest,
        validators: &Validators,
    ) -> Result<(), ImageError> {
        let record = RefRecord {
            reference: reference.to_owned(),
            digest: digest.hex().to_owned(),
            validators: validators.clone(),
            validated_at: now_nanos(),
        };
        let path = self.ref_path(reference);
        let text = serde_json::to_vec_pretty(&record)
            .map_err(|e| ImageError::io("encode reference record", std::io::Error::other(e)))?;
        write_atomically(&path, &text)
    }

    /// Every cached image, least recently used first.
    pub fn list(&self) -> Result<Vec<EntryInfo>, ImageError> {
        let sha_dir = self.root.join("sha256");
        let mut references: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let refs_dir = self.root.join("refs");
        for entry in fs::read_dir(&refs_dir)
            .map_err(|e| ImageError::io_at("read", &refs_dir, e))?
            .flatten()
        {
            if let Some(record) = fs::read(entry.path())
                .ok()
                .and_then(|text| serde_json::from_slice::<RefRecord>(&text).ok())
            {
                references
                    .entry(record.digest)
                    .or_default()
                    .push(record.reference);
            }
        }
        let mut entries = Vec::new();
        for entry in fs::read_dir(&sha_dir)
            .map_err(|e| ImageError::io_at("read", &sha_dir, e))?
            .flatten()
        {
            let Ok(digest) = Digest::parse(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            let lock_path = self.lease_lock_path(&digest);
            let last_used = fs::metadata(&lock_path)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let in_use = matches!(FileLock::try_exclusive(&lock_path), Ok(None));
            let pinned = crate::pins::is_pinned(&self.root, &digest);
            entries.push(EntryInfo {
                pinned,
                references: references.remove(digest.hex()).unwrap_or_default(),
                allocated_bytes: allocated_bytes(&entry.path()),
                last_used,
                in_use,
                digest,
            });
        }
        entries.sort_by_key(|entry| entry.last_used);
        Ok(entries)
    }

    /// Keeps image `digest` out of garbage collection for as long as the path `holder` exists
    /// (a kept failed VM's directory: deleting it releases the pin).
    pub fn pin(&self, digest: &Digest, holder: &Path) -> Result<(), ImageError> {
        crate::pins::pin(&self.root, digest, holder)
    }

    /// Removes least-recently-used images until the cache holds at most `max_size` bytes and
    /// its file system has at least `min_free` bytes free. Leased and pinned images are never
    /// removed.
    pub fn gc(&self, max_size: u64, min_free: u64) -> Result<GcReport, ImageError> {
        let entries = self.list()?;
        let mut report = GcReport {
            cache_bytes: entries.iter().map(|e| e.allocated_bytes).sum(),
            free_bytes: free_bytes(&self.root)?,
            ..GcReport::default()
        };
        for entry in entries {
            if report.cache_bytes <= max_size && report.free_bytes >= min_free {
                break;
            }
            let lock_path = self.lease_lock_path(&entry.digest);
            let Some(_exclusive) = FileLock::try_exclusive(&lock_path)? else {
                report.skipped_in_use += 1;
                continue;
            };
            // Checked under the lock: a pin is made while its holder still leases the image.
            if crate::pins::is_pinned(&self.root, &entry.digest) {
                report.skipped_pinned += 1;
                continue;
            }
            // Out of the index first (atomic), then off the disk.
            let doomed = self
                .root
                .join("tmp")
                .join(format!("gc-{}", entry.digest.hex()));
            let dir = self.entry_dir(&entry.digest);
            fs::rename(&dir, &doomed).map_err(|e| ImageError::io_at("remove", &dir, e))?;
            remove_path(&doomed);
            let _ = fs::remove_file(&lock_path);
            self.forget_refs_to(&entry.digest);
            report.cache_bytes = report.cache_bytes.saturating_sub(entry.allocated_bytes);
            report.free_bytes = free_bytes(&self.root)?;
            report.removed.push((entry.digest, entry.allocated_bytes));
        }
        Ok(report)
    }

    /// Garbage collection with the configured bounds.
    pub fn gc_configured(&self) -> Result<GcReport, ImageError> {
        self.gc(self.limits.max_size, self.limits.min_free)
    }

    fn forget_refs_to(&self, digest: &Digest) {
        let Ok(entries) = fs::read_dir(self.root.join("refs")) else {
            return;
        };
        for entry in entries.flatten() {
            let points_here = fs::read(entry.path())
                .ok()
                .and_then(|text| serde_json::from_slice::<RefRecord>(&text).ok())
                .is_some_and(|record| record.digest == digest.hex());
            if points_here {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// A private directory under `tmp/` that an unpack writes into, removed on drop unless
/// committed. Its lock file (`<dir>.lock`) is created and locked *before* the directory, so a
/// sweep never sees the directory without a live lock while its owner lives.
pub(crate) struct Staging {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: FileLock,
}

impl Staging {
    pub(crate) fn new(tmp: &Path) -> Result<Self, ImageError> {
        let path = tmp.join(format!("unpack-{:016x}", rand::rng().random::<u64>()));
        let lock_path = path.with_extension("lock");
        let lock = FileLock::exclusive(&lock_path)?;
        if let Err(error) = fs::create_dir(&path) {
            let _ = fs::remove_file(&lock_path);
            return Err(ImageError::io_at("create", &path, error));
        }
        Ok(Staging {
            path,
            lock_path,
            _lock: lock,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The directory was renamed into place: only the lock file remains to remove.
    fn disarm(mut self) {
        self.path = PathBuf::new();
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            remove_path(&self.path);
        }
        let _ = fs::remove_file(&self.lock_path);
    }
}

fn remove_path(path: &Path) {
    let _ = fs::remove_dir_all(path).or_else(|_| fs::remove_file(path));
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos())
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let temporary = path.with_extension(format!("tmp-{:08x}", rand::rng().random::<u32>()));
    let outcome = File::create(&temporary)
        .and_then(|mut file| {
            std::io::Write::write_all(&mut file, bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temporary, path));
    if outcome.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    outcome.map_err(|e| ImageError::io_at("write", path, e))
}

fn sync_dir(path: &Path) -> Result<(), ImageError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| ImageError::io_at("sync", path, e))
}

fn sync_dir_tree(dir: &Path) -> Result<(), ImageError> {
    for entry in fs::read_dir(dir)
        .map_err(|e| ImageError::io_at("read", dir, e))?
        .flatten()
    {
        let path = entry.path();
        File::open(&path)
            .and_then(|file| file.sync_all())
            .map_err(|e| ImageError::io_at("sync", &path, e))?;
    }
    sync_dir(dir)
}

fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.metadata().ok())
                .map(|metadata| metadata.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

fn free_bytes(path: &Path) -> Result<u64, ImageError> {
    let stat =
        rustix::fs::statvfs(path).map_err(|e| ImageError::io_at("statvfs", path, e.into()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}
