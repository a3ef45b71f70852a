//! A content archive unpacked into a directory tree of root's, whatever its format: plain
//! relative names only, regular files and directories only (links and special files left out
//! and counted), at most [`MAX_ENTRIES`] entries and the mount's disk size in bytes. No link is
//! ever made, so nothing written can land outside the tree.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use schemas::shown::quoted_bytes;
use untar::{Archive, Kind, Limits};

use super::MAX_ENTRIES;
use crate::error::{ArchiveError, ImageError};
use crate::unpack::{corrupt, refused};

/// Largest zip central directory read (it is held in memory whole).
const MAX_ZIP_DIRECTORY: u64 = 64 << 20;
/// The zip end-of-central-directory record's signature, and its fixed size.
const END_OF_DIRECTORY: [u8; 4] = [0x50, 0x4b, 0x05, 0x06];
const END_OF_DIRECTORY_SIZE: usize = 22;
/// The zip64 end-of-central-directory locator's signature, and the record's.
const ZIP64_LOCATOR: [u8; 4] = [0x50, 0x4b, 0x06, 0x07];
const ZIP64_END_OF_DIRECTORY: [u8; 4] = [0x50, 0x4b, 0x06, 0x06];

/// What an archive unpacked to.
#[derive(Debug, Default)]
pub(super) struct Unpacked {
    /// Regular files written.
    pub files: u64,
    /// Directories made.
    pub directories: u64,
    /// Bytes of the files, each rounded up to a 4 KiB block.
    pub blocks_bytes: u64,
    /// Entries left out (links, special files).
    pub left_out: u64,
}

/// A tree being unpacked.
pub(super) struct Tree {
    root: PathBuf,
    max_bytes: u64,
    entries: u64,
    unpacked: Unpacked,
}

impl Tree {
    /// The new directory `root`, to hold at most `max_bytes`.
    pub fn create(root: &Path, max_bytes: u64) -> Result<Tree, ImageError> {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(root)
            .map_err(|error| ImageError::io("unpacking the content", error))?;
        Ok(Tree {
            root: root.to_owned(),
            max_bytes,
            entries: 0,
            unpacked: Unpacked::default(),
        })
    }

    /// What was unpacked.
    pub fn finish(self) -> Unpacked {
        self.unpacked
    }

    /// Unpacks a tar stream.
    pub fn unpack_tar(&mut self, reader: impl Read) -> Result<(), ImageError> {
        let mut archive = Archive::new(reader, Limits::default());
        while let Some(mut entry) = archive.next_entry().map_err(refused)? {
            let header = entry.header().clone();
            let kind = match header.kind {
                Kind::Directory => EntryKind::Directory,
                Kind::Regular => EntryKind::File {
                    size: header.size,
                    executable: header.mode & 0o111 != 0,
                },
                _ => EntryKind::Other,
            };
            self.add(&header.name, kind, &mut entry)?;
        }
        Ok(())
    }

    /// Unpacks a zip file, once its central directory is known to be small enough to read.
    pub fn unpack_zip(&mut self, mut file: File) -> Result<(), ImageError> {
        check_zip_directory(&mut file)?;
        let corrupt = |error: zip::result::ZipError| ArchiveError::Corrupt {
            message: error.to_string(),
        };
        let mut archive = zip::ZipArchive::new(file).map_err(corrupt)?;
        if archive.len() as u64 > MAX_ENTRIES {
            return Err(ArchiveError::TooManyContentEntries { limit: MAX_ENTRIES }.into());
        }
        for index in 0..archive.len() {
            let mut entry = archive.by_index(index).map_err(corrupt)?;
            let name = entry.name_raw().to_vec();
            let mode = entry.unix_mode().unwrap_or(0);
            let kind = if mode & 0o170_000 == 0o120_000 {
                EntryKind::Other
            } else if entry.is_dir() {
                EntryKind::Directory
            } else if entry.is_file() {
                EntryKind::File {
                    size: entry.size(),
                    executable: mode & 0o111 != 0,
                }
            } else {
                EntryKind::Other
            };
            self.add(&name, kind, &mut entry)?;
        }
        Ok(())
    }

    /// One entry called `raw_name`, its data (for a file) read from `data`.
    fn add(
        &mut self,
        raw_name: &[u8],
        kind: EntryKind,
        data: &mut impl Read,
    ) -> Result<(), ImageError> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(ArchiveError::TooManyContentEntries { limit: MAX_ENTRIES }.into());
        }
        let relative = untar::plain_relative(raw_name).ok_or_else(|| ArchiveError::BadName {
            name: String::from_utf8_lossy(raw_name).into_owned(),
        })?;
        if relative.as_os_str().is_empty() {
            return Ok(());
        }
        let destination = self.root.join(&relative);
        let written = |error: io::Error| entry_error(raw_name, error);
        match kind {
            EntryKind::Directory => {
                make_dirs(&destination).map_err(written)?;
                self.unpacked.directories += 1;
            }
            EntryKind::File { size, executable } => {
                if let Some(parent) = destination.parent() {
                    make_dirs(parent).map_err(written)?;
                }
                self.unpacked.blocks_bytes += size.div_ceil(4096) * 4096;
                if self.unpacked.blocks_bytes > self.max_bytes {
                    return Err(ArchiveError::ContentTooLarge {
                        limit: self.max_bytes,
                    }
                    .into());
                }
                // A later entry of the same name replaces the earlier file, as tar does; never
                // through a link, since none is ever made.
                let _ = fs::remove_file(&destination);
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(if executable { 0o755 } else { 0o644 })
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(&destination)
                    .map_err(written)?;
                // One byte more than declared tells a lying size from an honest one.
                let copied = copy_entry(&mut data.take(size + 1), &mut file, raw_name)?;
                if copied != size {
                    return Err(ArchiveError::Corrupt {
                        message: format!(
                            "entry {} holds {copied} bytes, not the {size} it declares",
                            quoted_bytes(raw_name)
                        ),
                    }
                    .into());
                }
                self.unpacked.files += 1;
            }
            EntryKind::Other => self.unpacked.left_out += 1,
        }
        Ok(())
    }
}

/// What an entry is, in any format.
enum EntryKind {
    Directory,
    File { size: u64, executable: bool },
    Other,
}

fn make_dirs(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
}

/// Copies an entry's data into its file: what the archive fails to yield (a corrupt stream,
/// a zip entry whose checksum does not match) is the archive's fault, what cannot be written
/// the host's. Returns the bytes copied.
fn copy_entry(data: &mut impl Read, file: &mut File, raw_name: &[u8]) -> Result<u64, ImageError> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let read = match data.read(&mut buffer) {
            Ok(0) => return Ok(copied),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(corrupt(error)),
        };
        file.write_all(&buffer[..read])
            .map_err(|error| entry_error(raw_name, error))?;
        copied += read as u64;
    }
}

/// An error writing entry `raw_name`: the archive's fault when entries conflict (a file where
/// a directory is, or the reverse), else the host's.
fn entry_error(raw_name: &[u8], error: io::Error) -> ImageError {
    use io::ErrorKind::{AlreadyExists, DirectoryNotEmpty, IsADirectory, NotADirectory};
    match error.kind() {
        AlreadyExists | NotADirectory | IsADirectory | DirectoryNotEmpty => ArchiveError::Corrupt {
            message: format!(
                "entry {} conflicts with another entry: {error}",
                quoted_bytes(raw_name)
            ),
        }
        .into(),
        _ => ImageError::io("unpacking the content", error),
    }
}

/// Refuses a zip whose central directory lists more than [`MAX_ENTRIES`] entries or is larger
/// than [`MAX_ZIP_DIRECTORY`], from its end records, before a zip reader holds it in memory.
fn check_zip_directory(file: &mut File) -> Result<(), ImageError> {
    let corrupt = |message: &str| -> ImageError {
        ArchiveError::Corrupt {
            message: format!("zip: {message}"),
        }
        .into()
    };
    let io_error = |error: io::Error| ImageError::io("reading the zip", error);
    let length = file.metadata().map_err(io_error)?.len();
    // The record, a comment of at most 65 535 bytes after it, and a zip64 locator before it.
    let tail_length = length.min(END_OF_DIRECTORY_SIZE as u64 + 65_535 + 20);
    let mut tail = vec![0u8; tail_length as usize];
    file.seek(SeekFrom::Start(length - tail_length))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(io_error)?;
    let at = tail
        .windows(4)
        .rposition(|window| window == END_OF_DIRECTORY)
        .filter(|at| at + END_OF_DIRECTORY_SIZE <= tail.len())
        .ok_or_else(|| corrupt("no end of central directory record"))?;
    let u16_at = |offset: usize| u64::from(u16::from_le_bytes([tail[offset], tail[offset + 1]]));
    let u32_at = |offset: usize| {
        u64::from(u32::from_le_bytes([
            tail[offset],
            tail[offset + 1],
            tail[offset + 2],
            tail[offset + 3],
        ]))
    };
    let (mut entries, mut size) = (u16_at(at + 10), u32_at(at + 12));
    if entries == 0xffff || size == 0xffff_ffff {
        let locator = at
            .checked_sub(20)
            .filter(|locator| tail[*locator..*locator + 4] == ZIP64_LOCATOR)
            .ok_or_else(|| corrupt("a zip64 archive without its locator"))?;
        let offset = u64::from_le_bytes(
            tail[locator + 8..locator + 16]
                .try_into()
                .unwrap_or_default(),
        );
        let mut record = [0u8; 56];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut record))
            .map_err(|_| corrupt("the zip64 end record is outside the file"))?;
        if record[..4] != ZIP64_END_OF_DIRECTORY {
            return Err(corrupt("no zip64 end of central directory record"));
        }
        entries = u64::from_le_bytes(record[32..40].try_into().unwrap_or_default());
        size = u64::from_le_bytes(record[40..48].try_into().unwrap_or_default());
    }
    if entries > MAX_ENTRIES {
        return Err(ArchiveError::TooManyContentEntries { limit: MAX_ENTRIES }.into());
    }
    if size > MAX_ZIP_DIRECTORY {
        return Err(ArchiveError::Header {
            message: format!(
                "the zip's central directory is {size} bytes; at most {MAX_ZIP_DIRECTORY} (fixed)"
            ),
        }
        .into());
    }
    file.seek(SeekFrom::Start(0)).map_err(io_error)?;
    Ok(())
}
