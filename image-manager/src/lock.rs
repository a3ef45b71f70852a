//! Advisory file locks (`flock`) between threads and processes sharing a cache.
//!
//! A lock is held by an open file; closing the file (dropping the value) releases it, and the
//! kernel releases it when a process dies, so a `kill -9` never leaves a lock behind.

use std::fs::{File, OpenOptions};
use std::path::Path;

use rustix::fs::{flock, FlockOperation};

use crate::error::ImageError;

/// A held lock; released on drop.
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Waits for an exclusive lock on `path`, creating the file if needed.
    pub fn exclusive(path: &Path) -> Result<Self, ImageError> {
        Self::take(path, FlockOperation::LockExclusive).and_then(|lock| required(lock, path))
    }

    /// Waits for a shared lock on `path`, creating the file if needed.
    pub fn shared(path: &Path) -> Result<Self, ImageError> {
        Self::take(path, FlockOperation::LockShared).and_then(|lock| required(lock, path))
    }

    /// An exclusive lock on `path` if nobody holds any lock on it now.
    pub fn try_exclusive(path: &Path) -> Result<Option<Self>, ImageError> {
        Self::take(path, FlockOperation::NonBlockingLockExclusive)
    }

    /// The locked file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn take(path: &Path, operation: FlockOperation) -> Result<Option<Self>, ImageError> {
        let file = open_lock_file(path)?;
        match flock(&file, operation) {
            Ok(()) => Ok(Some(FileLock { file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(errno) => Err(ImageError::io_at("lock", path, errno.into())),
        }
    }
}

/// A blocking lock always comes back held; `WOULDBLOCK` there would be a kernel surprise.
fn required(lock: Option<FileLock>, path: &Path) -> Result<FileLock, ImageError> {
    lock.ok_or_else(|| {
        ImageError::io_at(
            "lock",
            path,
            std::io::Error::other("lock unexpectedly unavailable"),
        )
    })
}

fn open_lock_file(path: &Path) -> Result<File, ImageError> {
    if path.is_dir() {
        return File::open(path).map_err(|e| ImageError::io_at("open", path, e));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| ImageError::io_at("open", path, e))
}
