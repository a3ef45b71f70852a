//! Read-only content for a task's `mounts` (`{"content": {url, sha256}, "format": …}`): an
//! archive fetched once, pinned by its sha256, turned into an ext4 file system image that
//! any number of VMs attach read-only at once. Content-addressed: `ROOT/SHA256.FORMAT.ext4`.
//!
//! The archive is as hostile as an image tarball and is read under the same rules: the source
//! opened as images are (file policy, stall and download timeouts), the compressed bytes
//! bounded by `cache.maxCompressedSize` and checked against the pin before a byte is
//! unpacked, then read entry by entry ([`tree`]: a tar by `untar`, with bounded metadata; a
//! zip by the `zip` crate once its end records show a central directory of bounded size and entries). Only plain
//! relative names, regular files and directories are unpacked (links and special files are left
//! out and counted), into a fresh directory of root's; files keep only their executable bit.
//! Entries and bytes are bounded ([`MAX_ENTRIES`], the mount's disk size). `mkfs.ext4 -d` then
//! copies the tree into the image, which is padded (sparse) to the mount's disk size.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use schemas::config::CacheConfig;
pub use schemas::payload::ContentFormat;
use sha2::{Digest as _, Sha256};

use self::tree::{Tree, Unpacked};
use crate::error::{ArchiveError, ImageError};
use crate::lock::FileLock;
use crate::reference::Digest;
use crate::reference::{FilePolicy, ImageRequest};
use crate::source::{open, read_error, Opened};

mod tree;

/// Most entries one content archive may unpack to.
pub const MAX_ENTRIES: u64 = 262_144;

/// The name of `format` in payloads and file names.
pub fn format_name(format: ContentFormat) -> &'static str {
    match format {
        ContentFormat::TarZst => "tar.zst",
        ContentFormat::TarGz => "tar.gz",
        ContentFormat::Zip => "zip",
    }
}

/// The content images of a host.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
    limits: CacheConfig,
    budget: u64,
}

/// What a content archive unpacked to, held (a shared lock) so that no collection removes it
/// until dropped.
#[derive(Debug)]
pub struct ContentImage {
    /// The ext4 image, to attach read-only.
    pub path: PathBuf,
    /// Whether this call made it.
    pub made: bool,
    /// Entries left out (links, special files).
    pub left_out: u64,
    _held: FileLock,
}

impl ContentStore {
    /// The store under `root` (made when missing), fetching under the image cache's `limits`;
    /// after making an image, the least recently used others are removed until all take at
    /// most `budget` bytes on disk (a VM using one keeps it open: removing it is safe).
    pub fn open(root: &Path, limits: CacheConfig, budget: u64) -> io::Result<ContentStore> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)?;
        Ok(ContentStore {
            root: root.to_owned(),
            limits,
            budget,
        })
    }

    /// The image of the archive at `url` with `sha256`, made when missing (one maker per
    /// digest at a time, across processes), its file system `disk_size` bytes at most.
    /// Blocking.
    pub fn get(
        &self,
        url: &str,
        sha256: &str,
        format: ContentFormat,
        policy: &FilePolicy,
        disk_size: u64,
    ) -> Result<ContentImage, ImageError> {
        let request = ImageRequest::parse(url, Some(sha256))?;
        request.check_file_policy(policy)?;
        let pinned = request
            .pinned
            .clone()
            .ok_or_else(|| ImageError::BadReference {
                reference: url.to_owned(),
                reason: "content needs its sha256".into(),
            })?;
        let name = format!("{}.{}.ext4", pinned.hex(), format_name(format));
        let path = self.root.join(&name);
        let lock_path = self.root.join(format!("{name}.lock"));
        let ready = || fs::metadata(&path).is_ok_and(|meta| meta.len() == disk_size);
        // Shared while it is used (tasks share it), exclusive only to make it. Between the two
        // a collection may remove it: then it is made again, a few times at most.
        let mut made = None;
        for _ in 0..3 {
            let shared = FileLock::shared(&lock_path)?;
            if ready() {
                let _ = shared.file().set_modified(std::time::SystemTime::now());
                let (made, left_out) = made.unwrap_or((false, 0));
                if made {
                    self.gc();
                }
                return Ok(ContentImage {
                    path,
                    made,
                    left_out,
                    _held: shared,
                });
            }
            drop(shared);
            let _making = FileLock::exclusive(&lock_path)?;
            if !ready() {
                made = Some(self.make_in_work_dir(&request, format, disk_size, &name, &path)?);
            }
        }
        Err(ImageError::io(
            "the content",
            io::Error::other("it was removed as soon as it was made, three times"),
        ))
    }

    /// [`ContentStore::make`] in a fresh work directory of its own, removed afterwards.
    fn make_in_work_dir(
        &self,
        request: &ImageRequest,
        format: ContentFormat,
        disk_size: u64,
        name: &str,
        path: &Path,
    ) -> Result<(bool, u64), ImageError> {
        let expected = request.pinned.as_ref().map(Digest::hex).unwrap_or_default();
        let work = self.root.join(format!("{name}.building"));
        let _ = fs::remove_dir_all(&work);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&work)
            .map_err(|error| ImageError::io(work.display().to_string(), error))?;
        let made = self.make(request, expected, format, disk_size, &work, path);
        let _ = fs::remove_dir_all(&work);
        made
    }

    /// Removes the least recently used images no task holds while they take more than the
    /// budget on disk.
    fn gc(&self) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        let mut images: Vec<(std::time::SystemTime, PathBuf, u64)> = entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "ext4"))
            .filter_map(|path| {
                let bytes = fs::metadata(&path).ok()?.blocks() * 512;
                let lock = PathBuf::from(format!("{}.lock", path.display()));
                let used = fs::metadata(&lock).and_then(|meta| meta.modified()).ok()?;
                Some((used, path, bytes))
            })
            .collect();
        let mut total: u64 = images.iter().map(|(_, _, bytes)| bytes).sum::<u64>();
        images.sort();
        for (_, path, bytes) in images {
            if total <= self.budget {
                break;
            }
            let lock = PathBuf::from(format!("{}.lock", path.display()));
            let free = matches!(FileLock::try_exclusive(&lock), Ok(Some(_held)))
                && fs::remove_file(&path).is_ok();
            if free {
                total = total.saturating_sub(bytes);
            }
        }
    }

    fn make(
        &self,
        request: &ImageRequest,
        expected: &str,
        format: ContentFormat,
        disk_size: u64,
        work: &Path,
        path: &Path,
    ) -> Result<(bool, u64), ImageError> {
        let archive = work.join("archive");
        self.download(request, expected, &archive)?;
        let file = File::open(&archive).map_err(|error| ImageError::io("the archive", error))?;
        let mut tree = Tree::create(&work.join("tree"), disk_size)?;
        match format {
            ContentFormat::TarZst => {
                let mut decoder = zstd::stream::read::Decoder::new(file)
                    .map_err(|error| ImageError::io("zstd", error))?;
                decoder
                    .window_log_max(27)
                    .map_err(|error| ImageError::io("zstd", error))?;
                tree.unpack_tar(decoder)?;
            }
            ContentFormat::TarGz => tree.unpack_tar(flate2::read::GzDecoder::new(file))?,
            ContentFormat::Zip => tree.unpack_zip(file)?,
        }
        let unpacked = tree.finish();
        let tree = work.join("tree");
        let image = work.join("image.ext4");
        make_file_system(&tree, &unpacked, &image, disk_size)?;
        fs::rename(&image, path).map_err(|error| ImageError::io("keeping the content", error))?;
        Ok((true, unpacked.left_out))
    }

    /// The archive's bytes into `to`, bounded in size and time, checked against `expected`.
    fn download(
        &self,
        request: &ImageRequest,
        expected: &str,
        to: &Path,
    ) -> Result<(), ImageError> {
        let stall = Duration::from_secs(u64::from(self.limits.stall_timeout));
        let Opened::Body { mut reader, .. } = open(&request.source, None, stall)? else {
            return Err(ImageError::io(
                "the content",
                io::Error::other("the source answered not-modified to a first request"),
            ));
        };
        let deadline =
            Instant::now() + Duration::from_secs(u64::from(self.limits.download_timeout));
        let mut out = File::create(to).map_err(|error| ImageError::io("the archive", error))?;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(read_error(&request.reference, &error, stall)),
            };
            total += n as u64;
            if total > self.limits.max_compressed_size {
                return Err(ArchiveError::CompressedTooLarge {
                    limit: self.limits.max_compressed_size,
                }
                .into());
            }
            if Instant::now() > deadline {
                return Err(ImageError::TooSlow {
                    url: request.reference.clone(),
                    seconds: self.limits.download_timeout,
                });
            }
            hasher.update(&buffer[..n]);
            out.write_all(&buffer[..n])
                .map_err(|error| ImageError::io("the archive", error))?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            return Err(ImageError::DigestMismatch {
                expected: expected.to_owned(),
                actual,
            });
        }
        Ok(())
    }
}

/// `mkfs.ext4 -d tree` into `image`, sized for what was unpacked, then padded to `disk_size`.
fn make_file_system(
    tree: &Path,
    unpacked: &Unpacked,
    image: &Path,
    disk_size: u64,
) -> Result<(), ImageError> {
    let inodes = unpacked.files + unpacked.directories + 1024;
    // Data, a block per directory, 256 bytes per inode, the journal-less metadata, and slack.
    let needed = unpacked.blocks_bytes
        + unpacked.directories * 4096
        + inodes * 256
        + (unpacked.blocks_bytes / 8)
        + (16 << 20);
    let size = needed.div_ceil(1 << 20) << 20;
    if size > disk_size {
        return Err(ArchiveError::ContentTooLarge { limit: disk_size }.into());
    }
    let output = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .args(["-L", "content", "-d"])
        .arg(tree)
        .arg(image)
        .arg(format!("{}k", size / 1024))
        .stdin(Stdio::null())
        .output()
        .map_err(|error| ImageError::io("running mkfs.ext4", error))?;
    if !output.status.success() {
        return Err(ImageError::io(
            "making the content's file system",
            io::Error::other(String::from_utf8_lossy(&output.stderr).trim().to_owned()),
        ));
    }
    File::options()
        .write(true)
        .open(image)
        .and_then(|file| file.set_len(disk_size))
        .map_err(|error| ImageError::io("padding the content's disk", error))?;
    Ok(())
}
