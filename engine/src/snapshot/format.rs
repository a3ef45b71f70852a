//! A snapshot on disk: the files of its directory and the identity a restore must reuse.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// File names inside a snapshot directory.
const STATE: &str = "state.bin";
const DISK: &str = "disk.qcow2";
const IDENTITY: &str = "identity";
const CONSOLE: &str = "serial.log";
const RAM: &str = "ram.bin";
/// Says where the guest's RAM was saved ([`SavedRam`]); absent in snapshots of the layout before.
const MEMORY: &str = "memory";

/// Where a snapshot holds the guest's RAM, which decides how it is restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavedRam {
    /// In the migration stream, as QEMU's own RAM (`-m` alone, no `x-ignore-shared`): a booted
    /// VM kept for debugging, and snapshots made before RAM files.
    Stream,
    /// In the migration stream, for the backend object `ram0` (saved with `x-ignore-shared`):
    /// a restored VM saved again (kept for debugging); restored into anonymous memory.
    StreamObject,
    /// In `ram.bin`, which every restore maps private ([`crate::memory`]).
    File,
}

impl SavedRam {
    fn word(self) -> &'static str {
        match self {
            SavedRam::Stream => "stream",
            SavedRam::StreamObject => "stream-object",
            SavedRam::File => "file",
        }
    }
}

/// A saved VM on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    dir: PathBuf,
    uuid: String,
    mac: String,
    ram: SavedRam,
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
        let ram = match fs::read_to_string(dir.join(MEMORY)) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => SavedRam::Stream,
            Err(error) => return Err(error),
            Ok(word) => [SavedRam::Stream, SavedRam::StreamObject, SavedRam::File]
                .into_iter()
                .find(|ram| ram.word() == word.trim())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: unknown RAM placement", dir.join(MEMORY).display()),
                    )
                })?,
        };
        let mut files = vec![STATE, DISK];
        if ram == SavedRam::File {
            files.push(RAM);
        }
        for file in files {
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
            ram,
        })
    }

    /// Records in the snapshot being made in `dir` where its RAM went.
    pub(crate) fn write_ram_placement(dir: &Path, ram: SavedRam) -> io::Result<()> {
        fs::write(dir.join(MEMORY), format!("{}\n", ram.word()))
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

    /// Where the guest's RAM is.
    pub fn ram(&self) -> SavedRam {
        self.ram
    }

    /// The RAM file (with [`SavedRam::File`]).
    pub fn ram_path(&self) -> PathBuf {
        self.dir.join(RAM)
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
            SnapshotFile::Ram => RAM,
        })
    }
}

/// The files a snapshot is made of.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SnapshotFile {
    State,
    Disk,
    Console,
    Ram,
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
        assert_eq!(
            snapshot.ram(),
            SavedRam::Stream,
            "the layout before RAM files"
        );
        Snapshot::write_ram_placement(dir.path(), SavedRam::File).unwrap();
        assert!(Snapshot::open(dir.path()).is_err(), "no ram.bin yet");
        fs::write(Snapshot::path_in(dir.path(), SnapshotFile::Ram), b"r").unwrap();
        let snapshot = Snapshot::open(dir.path()).unwrap();
        assert_eq!(snapshot.ram(), SavedRam::File);
        fs::write(dir.path().join(MEMORY), "elsewhere\n").unwrap();
        assert!(Snapshot::open(dir.path()).is_err(), "an unknown placement");
        Snapshot::write_ram_placement(dir.path(), SavedRam::StreamObject).unwrap();
        let snapshot = Snapshot::open(dir.path()).unwrap();
        assert_eq!(snapshot.uuid(), "u-u-i-d");
        assert_eq!(snapshot.mac(), "02:00:00:00:00:01");
        fs::write(dir.path().join(IDENTITY), "only-one-line\n").unwrap();
        assert!(Snapshot::open(dir.path()).is_err());
    }
}
