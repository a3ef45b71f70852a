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
//! guest runs, so no QEMU (even one a guest took over) can change what the next copy reads. A
//! process loads each `ram.bin` once and hands the same sealed file to every VM it restores
//! from it ([`loaded`]).
//!
//! Loading copies the snapshot's data pages (60-odd MiB for a small guest, ~30 ms) on a thread
//! of its own while the VM's network, disk and QEMU are set up: QEMU gets the memory file at
//! its start, and the saved state is loaded ([`MemoryFile::wait_filled`]) only once the copy
//! is complete and sealed. Until then QEMU has run nothing but its own start-up, which maps the
//! file and writes none of its pages (a test holds it to that: a restored VM's RAM mapping has
//! no page of its own before it resumes).
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
use tokio::sync::watch;

/// Loaded files kept while no VM uses them (the most recently loaded ones stay).
const KEPT_UNUSED: usize = 4;

/// Guest RAM in a memory file the engine made.
#[derive(Debug)]
pub struct MemoryFile {
    fd: OwnedFd,
    size: u64,
    /// How far copying its contents has come (always [`Fill::Done`] for a file for saving).
    fill: watch::Receiver<Fill>,
}

/// How far a memory file's contents are.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fill {
    /// Still being copied in.
    Copying,
    /// Complete, and sealed when it came from a snapshot.
    Done,
    /// The copy failed: why.
    Failed(String),
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
        Ok(MemoryFile {
            fd,
            size,
            fill: watch::channel(Fill::Done).1,
        })
    }

    /// A memory file with the contents of `path` (which must be `size` bytes long), sealed
    /// against every change before it is returned.
    #[cfg(test)]
    fn load(path: &Path, size: u64) -> io::Result<MemoryFile> {
        let (file, source, done) = Self::to_load(path, size)?;
        fill_and_seal(&source, &file.fd, size, &done);
        Ok(file)
    }

    /// A memory file of `size` bytes that gets the contents of `path` on a thread of its own,
    /// then is sealed ([`MemoryFile::wait_filled`] waits for that).
    fn load_in_background(path: &Path, size: u64) -> io::Result<MemoryFile> {
        let (file, source, done) = Self::to_load(path, size)?;
        let target = file.fd.try_clone()?;
        std::thread::Builder::new()
            .name("taskvm-ram-load".into())
            .spawn(move || fill_and_seal(&source, &target, size, &done))?;
        Ok(file)
    }

    /// The empty memory file for the contents of `path`, `path` opened (checked to be `size`
    /// bytes long), and where the copy says how it went ([`fill_and_seal`]).
    fn to_load(path: &Path, size: u64) -> io::Result<(MemoryFile, fs::File, watch::Sender<Fill>)> {
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
        let (done, fill) = watch::channel(Fill::Copying);
        Ok((MemoryFile { fd, size, fill }, source, done))
    }

    /// Waits until the contents are all in and sealed; the copy's error if it failed.
    pub(crate) async fn wait_filled(&self) -> io::Result<()> {
        let mut fill = self.fill.clone();
        let state = fill
            .wait_for(|state| *state != Fill::Copying)
            .await
            .map(|state| state.clone())
            .unwrap_or_else(|_| Fill::Failed("the copying thread ended".into()));
        match state {
            Fill::Done => Ok(()),
            Fill::Failed(reason) => Err(io::Error::other(reason)),
            Fill::Copying => Err(io::Error::other("the copy did not finish")),
        }
    }

    /// Whether copying the contents failed.
    fn failed(&self) -> bool {
        matches!(*self.fill.borrow(), Fill::Failed(_))
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

/// Copies `source` into `target` and seals `target` against every change; says how that went
/// on `done`.
fn fill_and_seal(source: &fs::File, target: &OwnedFd, size: u64, done: &watch::Sender<Fill>) {
    let filled = send_data(source, target, size).and_then(|()| {
        rustix::fs::fcntl_add_seals(
            target,
            SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
        )
        .map_err(io::Error::from)
    });
    done.send_replace(match filled {
        Ok(()) => Fill::Done,
        Err(error) => Fill::Failed(error.to_string()),
    });
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

/// The memory file of `path` (a snapshot's `ram.bin` of `size` bytes), loaded once per
/// process and shared by every VM restored from it; its contents may still be being copied in
/// ([`MemoryFile::wait_filled`]). A file no VM uses any more is kept while fewer than a few
/// others are (so that a queue's next task does not load it again); one whose copy failed is
/// loaded again.
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
    if let Some(file) = table
        .get(&key)
        .filter(|file| file.size == size && !file.failed())
    {
        return Ok(Arc::clone(file));
    }
    let file = Arc::new(MemoryFile::load_in_background(path, size)?);
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

    #[tokio::test]
    async fn a_file_loaded_in_the_background_is_whole_and_sealed_once_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let size = 256 * PAGE as u64;
        let ram = MemoryFile::for_saving(size).unwrap();
        let file = fs::File::from(ram.descriptor().unwrap());
        for page in (0..256).step_by(3) {
            file.write_all_at(format!("page {page}").as_bytes(), page * PAGE as u64)
                .unwrap();
        }
        let path = dir.path().join("ram.bin");
        ram.save(&path).unwrap();

        let loaded = loaded(&path, size).unwrap();
        loaded.wait_filled().await.unwrap();
        let copy = fs::File::from(loaded.descriptor().unwrap());
        let mut page = vec![0u8; PAGE];
        for number in 0..256 {
            copy.read_exact_at(&mut page, number * PAGE as u64).unwrap();
            let text = format!("page {number}");
            assert_eq!(
                page.starts_with(text.as_bytes()),
                number % 3 == 0,
                "{number}"
            );
        }
        assert!(copy.write_all_at(b"x", 0).is_err(), "sealed");
    }

    #[tokio::test]
    async fn a_load_that_fails_says_why_when_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * PAGE as u64;
        let ram = MemoryFile::for_saving(size).unwrap();
        fs::File::from(ram.descriptor().unwrap())
            .write_all_at(b"data", 0)
            .unwrap();
        let path = dir.path().join("ram.bin");
        ram.save(&path).unwrap();
        // A target that cannot be written (sealed already): the copy fails.
        let (failed, source, done) = MemoryFile::to_load(&path, size).unwrap();
        rustix::fs::fcntl_add_seals(&failed.fd, SealFlags::WRITE).unwrap();
        fill_and_seal(&source, &failed.fd, size, &done);
        let error = failed.wait_filled().await.unwrap_err();
        assert_eq!(
            error.to_string(),
            io::Error::from(rustix::io::Errno::PERM).to_string(),
            "the copy's own error"
        );
        assert!(failed.failed());
    }
}
