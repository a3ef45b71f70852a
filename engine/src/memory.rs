//! Guest RAM kept in a file of its own (`ram.bin`) instead of in the migration stream, so that
//! every VM restored from one snapshot maps the same clean pages.
//!
//! The VM a snapshot is made from gets its RAM as a memory file the engine made (a memfd whose
//! size is sealed), mapped shared by QEMU: when it is saved with `x-ignore-shared`, the
//! stream holds only the devices, and the engine copies the memory file to `ram.bin`, leaving
//! out the pages that are zero.
//!
//! A restore maps a memory file loaded from `ram.bin` **private**: what a guest writes goes to
//! pages of its own QEMU, and the pages it only reads stay those of the memory file, shared with
//! every other copy. The loaded file is sealed against writes, growth and shrinking before any
//! QEMU sees it, so no QEMU (even one a guest took over) can change what the next copy reads. A
//! process loads each `ram.bin` once and hands the same sealed file to every VM it restores
//! from it ([`loaded`]).
//!
//! QEMU 7.2 opens a backend's `mem-path` read-write whatever the mapping; a memory file lets
//! it, where a root-owned file would not. QEMU opens it as `/proc/self/fd/N` (a jailed QEMU
//! through a `/proc` of its own, see [`crate::sandbox::jail`]).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustix::fs::{MemfdFlags, SealFlags, SeekFrom};

/// Loaded files kept while no VM uses them (the most recently loaded ones stay).
const KEPT_UNUSED: usize = 4;

/// Guest RAM in a memory file the engine made.
#[derive(Debug)]
pub struct MemoryFile {
    fd: OwnedFd,
    size: u64,
}

impl MemoryFile {
    /// An empty memory file of `size` bytes whose size is sealed: the RAM of a VM that will be
    /// saved as a snapshot, mapped shared by its QEMU.
    pub(crate) fn for_saving(size: u64) -> io::Result<MemoryFile> {
        let fd = rustix::fs::memfd_create(
            "taskvm-ram",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, size)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW)?;
        Ok(MemoryFile { fd, size })
    }

    /// A memory file with the contents of `path` (which must be `size` bytes long), sealed
    /// against every change before it is returned.
    pub fn load(path: &Path, size: u64) -> io::Result<MemoryFile> {
        let source = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let length = source.metadata()?.len();
        if length != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds {length} bytes of RAM, the machine has {size}",
                    path.display()
                ),
            ));
        }
        let fd = rustix::fs::memfd_create(
            "taskvm-snapshot-ram",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, size)?;
        send_data(&source, &fd, size)?;
        rustix::fs::fcntl_add_seals(
            &fd,
            SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
        )?;
        Ok(MemoryFile { fd, size })
    }

    /// Writes the contents to the new file `path` (mode 0444), leaving out zero pages (the file
    /// is sparse).
    pub(crate) fn save(&self, path: &Path) -> io::Result<()> {
        let target = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(path)?;
        let source = fs::File::from(self.fd.try_clone()?);
        rustix::fs::seek(&source, SeekFrom::Start(0))?;
        image_manager::unpack::copy_sparse(&mut (&source).take(self.size), &target)?;
        target.sync_all()
    }

    /// A descriptor of the file for a QEMU to inherit.
    pub(crate) fn descriptor(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

/// How a VM's RAM is backed.
#[derive(Debug)]
pub(crate) enum GuestMemory {
    /// QEMU's own (`-m` alone): a boot.
    Default,
    /// A memory file mapped shared, saved as `ram.bin` with the VM's snapshot.
    ForSaving(MemoryFile),
    /// A snapshot's sealed memory file, mapped private.
    Snapshot(Arc<MemoryFile>),
    /// Anonymous memory in the backend object: a restore whose stream holds the RAM.
    Anonymous,
}

impl GuestMemory {
    /// Whether the RAM is the backend object `ram0`, whose state moves with
    /// `x-ignore-shared` on.
    pub(crate) fn in_object(&self) -> bool {
        !matches!(self, GuestMemory::Default)
    }

    /// The memory file QEMU maps, if any.
    pub(crate) fn file(&self) -> Option<&MemoryFile> {
        match self {
            GuestMemory::ForSaving(file) => Some(file),
            GuestMemory::Snapshot(file) => Some(file),
            GuestMemory::Default | GuestMemory::Anonymous => None,
        }
    }
}

/// Copies the data of `source` (its first `size` bytes) to the same offsets of `target` inside
/// the kernel (`sendfile`), skipping holes: a third faster than through a buffer.
fn send_data(source: &fs::File, target: &OwnedFd, size: u64) -> io::Result<()> {
    let mut offset = 0;
    while let Some((start, end)) = next_data(source, offset, size)? {
        rustix::fs::seek(target, SeekFrom::Start(start))?;
        let mut at = start;
        while at < end {
            let count = usize::try_from(end - at).unwrap_or(usize::MAX);
            let sent = rustix::fs::sendfile(target, source, Some(&mut at), count)?;
            if sent == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the RAM file ended early",
                ));
            }
        }
        offset = end;
    }
    Ok(())
}

/// The next range of `file` from `offset` that holds data (not a hole), up to `size`.
fn next_data(file: &fs::File, offset: u64, size: u64) -> io::Result<Option<(u64, u64)>> {
    let start = match rustix::fs::seek(file.as_fd(), SeekFrom::Data(offset)) {
        Ok(start) => start,
        Err(rustix::io::Errno::NXIO) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    if start >= size {
        return Ok(None);
    }
    let end = rustix::fs::seek(file.as_fd(), SeekFrom::Hole(start))?;
    Ok(Some((start, end.min(size))))
}

/// Which file, as it is now: device, inode, size and change time (a changed file is loaded
/// again).
type FileVersion = (u64, u64, u64, i64, i64);

/// The memory files this process loaded, by the version of the `ram.bin` they came from.
static LOADED: Mutex<Option<HashMap<FileVersion, Arc<MemoryFile>>>> = Mutex::new(None);

/// The sealed memory file of `path` (a snapshot's `ram.bin` of `size` bytes), loaded once per
/// process and shared by every VM restored from it. A file no VM uses any more is kept while
/// fewer than a few others are (so that a queue's next task does not load it again).
pub fn loaded(path: &Path, size: u64) -> io::Result<Arc<MemoryFile>> {
    let meta = fs::symlink_metadata(path)?;
    let key = (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec(),
    );
    let mut table = LOADED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let table = table.get_or_insert_with(HashMap::new);
    if let Some(file) = table.get(&key).filter(|file| file.size == size) {
        return Ok(Arc::clone(file));
    }
    let file = Arc::new(MemoryFile::load(path, size)?);
    table.insert(key, Arc::clone(&file));
    let unused = table
        .values()
        .filter(|file| Arc::strong_count(file) == 1)
        .count();
    if unused > KEPT_UNUSED {
        table.retain(|_, file| Arc::strong_count(file) > 1);
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const PAGE: usize = 4096;

    /// The bytes of `path` that are data, not holes.
    fn data_bytes(path: &Path) -> u64 {
        let file = fs::File::open(path).unwrap();
        let size = file.metadata().unwrap().len();
        let (mut offset, mut data) = (0, 0);
        while let Some((start, end)) = next_data(&file, offset, size).unwrap() {
            data += end - start;
            offset = end;
        }
        data
    }

    #[test]
    fn a_saved_file_leaves_zero_pages_out_and_loads_back_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * PAGE as u64;
        let ram = MemoryFile::for_saving(size).unwrap();
        let file = fs::File::from(ram.descriptor().unwrap());
        file.write_all_at(b"first page", 0).unwrap();
        file.write_all_at(&[0u8; PAGE], 5 * PAGE as u64).unwrap(); // data, but zero
        file.write_all_at(b"last page", size - PAGE as u64).unwrap();
        assert!(file.set_len(size / 2).is_err(), "the size is sealed");

        let path = dir.path().join("ram.bin");
        ram.save(&path).unwrap();
        assert_eq!(data_bytes(&path), 2 * PAGE as u64);
        assert_eq!(fs::metadata(&path).unwrap().len(), size);
        assert!(fs::metadata(&path).unwrap().blocks() * 512 <= 4 * PAGE as u64);

        let loaded = MemoryFile::load(&path, size).unwrap();
        let copy = fs::File::from(loaded.descriptor().unwrap());
        let mut page = vec![0u8; PAGE];
        copy.read_exact_at(&mut page, 0).unwrap();
        assert!(page.starts_with(b"first page"));
        copy.read_exact_at(&mut page, size - PAGE as u64).unwrap();
        assert!(page.starts_with(b"last page"));
        assert!(
            copy.write_all_at(b"changed", 0).is_err(),
            "writes are sealed"
        );
        assert!(copy.set_len(size * 2).is_err(), "growth is sealed");

        let wrong = MemoryFile::load(&path, size * 2).unwrap_err();
        assert!(wrong.to_string().contains("the machine has"), "{wrong}");
    }

    #[test]
    fn a_process_loads_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * PAGE as u64;
        let path = dir.path().join("ram.bin");
        MemoryFile::for_saving(size).unwrap().save(&path).unwrap();
        let first = loaded(&path, size).unwrap();
        let second = loaded(&path, size).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
    }
}
