//! Building an image tarball (`taskvm image pack`) and checking one without caching it
//! (`taskvm image verify`).
//!
//! Packing is reproducible: entries in a fixed order (`machine.json` first, then by name),
//! fixed owners, modes and times, holes found by content (the disk passes through
//! `qemu-img convert`, which leaves zero blocks unallocated), and zstd's multi-threaded mode,
//! whose output does not depend on the number of threads.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use schemas::config::CacheConfig;
use schemas::{migrate_machine_definition, parse_json};
use sha2::{Digest as _, Sha256};

use crate::cache::Staging;
use crate::disk_check::check_disks;
use crate::error::ImageError;
use crate::layout::{DISK_IMG, MACHINE_JSON};
use crate::pipeline::{stream_into, Progress, Streamed};
use crate::qemu_img;
use crate::reference::Digest;

/// What goes into an image.
#[derive(Debug, Clone)]
pub struct PackInputs {
    /// The root disk, in any format qemu-img reads.
    pub disk: PathBuf,
    /// The disk's format (`raw`, `qcow2`, …); detected from its header when unset.
    pub disk_format: Option<String>,
    /// The machine definition.
    pub machine: PathBuf,
    /// Kernel for direct boot; required exactly when `machine.json` has `boot`.
    pub kernel: Option<PathBuf>,
    /// Initrd for direct boot; required exactly when `boot.initrd` is set.
    pub initrd: Option<PathBuf>,
    /// zstd level (1–19).
    pub level: i32,
}

/// How far a [`pack_with_progress`] is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PackProgress {
    /// Flattening the disk into raw: bytes of the disk's virtual size done, of `total`.
    Flattening {
        /// Bytes done.
        done: u64,
        /// The disk's virtual size.
        total: u64,
    },
    /// Writing the archive: bytes of the entries' data read so far, of `total`.
    Compressing {
        /// Bytes read (holes of the sparse disk count as read once passed).
        done: u64,
        /// The entries' sizes, holes included.
        total: u64,
        /// Compressed bytes written so far.
        written: u64,
    },
}

/// How often the archive writer's position is looked at for progress.
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Packs `inputs` into `output` (written to a temporary file, renamed at the end) and
/// returns the digest of the compressed bytes.
pub fn pack(inputs: &PackInputs, output: &Path) -> Result<Digest, ImageError> {
    pack_with_progress(inputs, output, &|_| {})
}

/// [`pack`], telling `progress` how far flattening and compressing are (from other threads,
/// a few times a second).
pub fn pack_with_progress(
    inputs: &PackInputs,
    output: &Path,
    progress: &(dyn Fn(PackProgress) + Sync),
) -> Result<Digest, ImageError> {
    let machine_text = fs::read_to_string(&inputs.machine)
        .map_err(|e| ImageError::io_at("read", &inputs.machine, e))?;
    let machine = parse_json(&machine_text)
        .and_then(|value| migrate_machine_definition(&value))
        .map_err(ImageError::Machine)?;
    let boot_files = boot_files(&machine, inputs)?;

    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let staging = Staging::new(parent)?;
    let disk = staging.path().join(DISK_IMG);
    let format = match &inputs.disk_format {
        Some(format) => format.clone(),
        None => detect_format(&inputs.disk)?,
    };
    let total = qemu_img::info(&inputs.disk, &format).map_or(0, |info| info.virtual_size);
    qemu_img::convert_to_raw(&inputs.disk, &format, &disk, &|fraction| {
        progress(PackProgress::Flattening {
            done: (fraction * total as f64) as u64,
            total,
        });
    })?;
    let mut files = vec![
        (MACHINE_JSON.to_owned(), inputs.machine.clone()),
        (DISK_IMG.to_owned(), disk),
    ];
    files.extend(boot_files);
    files[1..].sort();

    let temporary = staging.path().join("image.tar.zst");
    let digest = write_archive(&files, &temporary, inputs.level, progress)?;
    fs::rename(&temporary, output).map_err(|e| ImageError::io_at("rename into", output, e))?;
    Ok(digest)
}

fn boot_files(
    machine: &schemas::Machine,
    inputs: &PackInputs,
) -> Result<Vec<(String, PathBuf)>, ImageError> {
    let mismatch =
        |reason: &str| ImageError::Machine(schemas::Violations::one("/boot", reason.to_owned()));
    let boot = machine.boot.as_ref();
    let mut files = Vec::new();
    match (boot.map(|b| &b.kernel), &inputs.kernel) {
        (Some(name), Some(path)) => files.push((name.clone(), path.clone())),
        (None, None) => {}
        (Some(_), None) => return Err(mismatch("machine.json names a kernel: pass --kernel")),
        (None, Some(_)) => {
            return Err(mismatch(
                "--kernel given but machine.json has no boot.kernel",
            ))
        }
    }
    match (boot.and_then(|b| b.initrd.as_ref()), &inputs.initrd) {
        (Some(name), Some(path)) => files.push((name.clone(), path.clone())),
        (None, None) => {}
        (Some(_), None) => return Err(mismatch("machine.json names an initrd: pass --initrd")),
        (None, Some(_)) => {
            return Err(mismatch(
                "--initrd given but machine.json has no boot.initrd",
            ))
        }
    }
    Ok(files)
}

/// `qcow2` or `raw`, from the disk file's first bytes.
pub fn detect_format(disk: &Path) -> Result<String, ImageError> {
    let mut head = [0u8; 4];
    let mut file = File::open(disk).map_err(|e| ImageError::io_at("open", disk, e))?;
    let n = io::Read::read(&mut file, &mut head).map_err(|e| ImageError::io_at("read", disk, e))?;
    Ok(if n == 4 && &head == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    }
    .to_owned())
}

fn write_archive(
    files: &[(String, PathBuf)],
    path: &Path,
    level: i32,
    progress: &(dyn Fn(PackProgress) + Sync),
) -> Result<Digest, ImageError> {
    let file = File::create(path).map_err(|e| ImageError::io_at("create", path, e))?;
    let written_watch = file
        .try_clone()
        .map_err(|e| ImageError::io_at("open", path, e))?;
    let hashing = HashingWriter {
        inner: file,
        hasher: Sha256::new(),
    };
    let fail = |e: io::Error| ImageError::io_at("write", path, e);
    let mut encoder = zstd::stream::write::Encoder::new(hashing, level).map_err(fail)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    encoder.multithread(threads).map_err(fail)?;
    let mut builder = tar::Builder::new(encoder);
    builder.mode(tar::HeaderMode::Deterministic);
    builder.sparse(true);
    builder.follow_symlinks(true);
    let total: u64 = files
        .iter()
        .map(|(_, source)| fs::metadata(source).map_or(0, |meta| meta.len()))
        .sum();
    let mut before = 0;
    for (name, source) in files {
        let mut input = File::open(source).map_err(|e| ImageError::io_at("open", source, e))?;
        // A duplicate shares the file position, which the tar writer advances as it reads.
        let read_watch = input
            .try_clone()
            .map_err(|e| ImageError::io_at("open", source, e))?;
        let report = || {
            let at = |mut file: &File| io::Seek::stream_position(&mut file).unwrap_or(0);
            progress(PackProgress::Compressing {
                done: before + at(&read_watch),
                total,
                written: at(&written_watch),
            });
        };
        let appended = watch_while(&report, || builder.append_file(name, &mut input));
        appended.map_err(|e| ImageError::io_at("pack", source, e))?;
        report();
        before += input.metadata().map_or(0, |meta| meta.len());
    }
    let encoder = builder.into_inner().map_err(fail)?;
    let hashing = encoder.finish().map_err(fail)?;
    hashing.inner.sync_all().map_err(fail)?;
    Ok(Digest::from_bytes(&hashing.hasher.finalize()))
}

/// Runs `work`, calling `report` every [`PROGRESS_INTERVAL`] from another thread meanwhile.
fn watch_while<T>(report: &(dyn Fn() + Sync), work: impl FnOnce() -> T) -> T {
    let (done, stop) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stop.recv_timeout(PROGRESS_INTERVAL)
            {
                report();
            }
        });
        let result = work();
        drop(done);
        result
    })
}

struct HashingWriter {
    inner: File,
    hasher: Sha256,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Checks an image file as a fetch would (every rule, qemu-img included) without caching it;
/// unpacks into a temporary directory under `scratch` that is removed afterwards.
pub fn verify_file(
    path: &Path,
    scratch: &Path,
    limits: &CacheConfig,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Streamed, ImageError> {
    let file = File::open(path).map_err(|e| ImageError::io_at("open", path, e))?;
    let length = file.metadata().ok().map(|m| m.len());
    let staging = Staging::new(scratch)?;
    let origin = path.display().to_string();
    let streamed = stream_into(
        Box::new(file),
        length,
        &origin,
        staging.path(),
        limits,
        progress,
    )?;
    check_disks(staging.path(), streamed.unpacked.files.has_layer, limits)?;
    Ok(streamed)
}
