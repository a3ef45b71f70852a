//! A snapshot on disk: the files of its directory and the identity a restore must reuse.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// File names inside a snapshot directory.
const STATE: &str = "state.bin";
const DISK: &str = "disk.qcow2";
const IDENTITY: &str = "identity";
const CONSOLE: &str = "serial.log";

/// A saved VM on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    dir: PathBuf,
    uuid: String,
    mac: String,
}

impl Snapshot {
    /// Opens the snapshot in `dir`; fails unless all its files are there.
    pub fn open(dir: &Path) -> io::Result<Snapshot> {
        let identity = fs::read_to_string(dir.join(IDENTITY))?;
        let mut lines = identity.lines();
        let (Some(uuid), Some(mac)) = (lines.next(), lines.next()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: no UUID and MAC", dir.join(IDENTITY).display()),
            ));
        };
        for file in [STATE, DISK] {
            let path = dir.join(file);
            if !fs::metadata(&path)?.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a file", path.display()),
                ));
            }
        }
        Ok(Snapshot {
            dir: dir.to_owned(),
            uuid: uuid.to_owned(),
            mac: mac.to_owned(),
        })
    }

    /// Writes the identity file of a snapshot being made in `dir`.
    pub(crate) fn write_identity(dir: &Path, uuid: &str, mac: &str) -> io::Result<()> {
        fs::write(dir.join(IDENTITY), format!("{uuid}\n{mac}\n"))
    }

    /// The snapshot's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The migration stream.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// The disk overlay at snapshot time (qcow2 on the image's disk).
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join(DISK)
    }

    /// The UUID the VM had.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// The MAC the VM had.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// Where `file` of a snapshot in `dir` goes.
    pub(crate) fn path_in(dir: &Path, file: SnapshotFile) -> PathBuf {
        dir.join(match file {
            SnapshotFile::State => STATE,
            SnapshotFile::Disk => DISK,
            SnapshotFile::Console => CONSOLE,
        })
    }
}

/// The files a snapshot is made of.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SnapshotFile {
    State,
    Disk,
    Console,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_needs_all_its_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Snapshot::open(dir.path()).is_err());
        Snapshot::write_identity(dir.path(), "u-u-i-d", "02:00:00:00:00:01").unwrap();
        assert!(Snapshot::open(dir.path()).is_err(), "no state yet");
        fs::write(Snapshot::path_in(dir.path(), SnapshotFile::State), b"s").unwrap();
        fs::write(Snapshot::path_in(dir.path(), SnapshotFile::Disk), b"d").unwrap();
        let snapshot = Snapshot::open(dir.path()).unwrap();
        assert_eq!(snapshot.uuid(), "u-u-i-d");
        assert_eq!(snapshot.mac(), "02:00:00:00:00:01");
        fs::write(dir.path().join(IDENTITY), "only-one-line\n").unwrap();
        assert!(Snapshot::open(dir.path()).is_err());
    }
}
