//! Unpacking an image tarball from a zstd stream into a directory, refusing anything the format
//! does not allow before it touches the disk, and writing zero blocks as holes.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use schemas::config::CacheConfig;
use schemas::{migrate_machine_definition, parse_json, Machine};
use untar::{Kind, TarError};

use crate::error::{ArchiveError, ImageError};
use crate::layout::{is_plain_file_name, ImageFiles, DISK_IMG, LAYER_QCOW2, MACHINE_JSON};

/// Block size for hole detection: a 4 KiB block of zeros becomes a hole.
const HOLE_BLOCK: usize = 4096;
/// Read size when copying file data.
const COPY_CHUNK: usize = 1 << 20;

/// What an unpacked image holds.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// The parsed `machine.json`.
    pub machine: Machine,
    /// Which optional files are present.
    pub files: ImageFiles,
    /// Sum of the files' sizes, holes included.
    pub unpacked_bytes: u64,
}

/// Decompresses `compressed` and unpacks the tarball into `dest` (an empty directory), checking
/// every entry against the format and `limits` before writing it.
///
/// Reads `compressed` to its very end (trailing zero padding is allowed, anything else is not),
/// so that a hash computed over the stream covers all of it.
pub fn unpack(
    compressed: impl Read,
    dest: &Path,
    limits: &CacheConfig,
) -> Result<Unpacked, ImageError> {
    let decoder = zstd::stream::read::Decoder::new(compressed).map_err(corrupt)?;
    // Tar headers and padding come on top of the files' own bytes.
    let overhead = u64::from(limits.max_entries) * 2048 + 20480;
    let capped = CappedReader {
        inner: decoder,
        remaining: limits.max_unpacked_size.saturating_add(overhead),
        limit: limits.max_unpacked_size,
    };
    let mut archive = untar::Archive::new(capped, untar::Limits::default());
    let mut state = UnpackState::default();

    while let Some(mut entry) = archive.next_entry().map_err(refused)? {
        state.entries += 1;
        if state.entries > limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                limit: limits.max_entries,
            }
            .into());
        }
        let header = entry.header();
        let name = entry_name(&header.name)?;
        check_entry_type(&name, header.kind)?;
        if !state.names.insert(name.clone()) {
            return Err(ArchiveError::Duplicate { name }.into());
        }
        let size = header.size;
        let (file_limit, setting) = if name == MACHINE_JSON {
            (
                u64::from(limits.max_machine_json_size),
                "cache.maxMachineJsonSize",
            )
        } else {
            (limits.max_file_size, "cache.maxFileSize")
        };
        if size > file_limit {
            return Err(ArchiveError::FileTooLarge {
                name,
                limit: file_limit,
                setting,
            }
            .into());
        }
        state.unpacked_bytes = state.unpacked_bytes.saturating_add(size);
        if state.unpacked_bytes > limits.max_unpacked_size {
            return Err(ArchiveError::UnpackedTooLarge {
                limit: limits.max_unpacked_size,
            }
            .into());
        }
        let path = dest.join(&name);
        if name == MACHINE_JSON {
            let mut text = Vec::new();
            (&mut entry)
                .take(file_limit)
                .read_to_end(&mut text)
                .map_err(corrupt)?;
            std::fs::write(&path, &text).map_err(|e| ImageError::io_at("write", &path, e))?;
            state.machine = Some(parse_machine(&text)?);
        } else {
            write_sparse(&mut entry, &path)?;
        }
    }

    drain_trailer(archive.into_inner())?;
    state.finish()
}

#[derive(Default)]
struct UnpackState {
    entries: u32,
    names: BTreeSet<String>,
    unpacked_bytes: u64,
    machine: Option<Machine>,
}

impl UnpackState {
    /// Checks that the required files are there and that every other file is a boot file
    /// `machine.json` names.
    fn finish(self) -> Result<Unpacked, ImageError> {
        let machine = self.machine.ok_or_else(|| missing(MACHINE_JSON))?;
        if !self.names.contains(DISK_IMG) {
            return Err(missing(DISK_IMG));
        }
        let kernel = machine.boot.as_ref().map(|boot| boot.kernel.clone());
        let initrd = machine.boot.as_ref().and_then(|boot| boot.initrd.clone());
        let mut allowed: BTreeSet<&str> = [MACHINE_JSON, DISK_IMG, LAYER_QCOW2].into();
        for boot_file in kernel.iter().chain(initrd.iter()) {
            if !self.names.contains(boot_file) {
                return Err(missing(boot_file));
            }
            allowed.insert(boot_file);
        }
        if let Some(extra) = self
            .names
            .iter()
            .find(|name| !allowed.contains(name.as_str()))
        {
            return Err(ArchiveError::Unexpected {
                name: extra.clone(),
            }
            .into());
        }
        Ok(Unpacked {
            files: ImageFiles {
                has_layer: self.names.contains(LAYER_QCOW2),
                kernel,
                initrd,
            },
            machine,
            unpacked_bytes: self.unpacked_bytes,
        })
    }
}

fn missing(name: &str) -> ImageError {
    ArchiveError::Missing {
        name: name.to_owned(),
    }
    .into()
}

/// A read error of the archive's stream as the archive's fault: the archive error it carries,
/// or a corrupt stream.
pub(crate) fn corrupt(error: io::Error) -> ImageError {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ArchiveError>())
    {
        Some(archive_error) => ImageError::Archive(archive_error.clone()),
        None => ArchiveError::Corrupt {
            message: error.to_string(),
        }
        .into(),
    }
}

/// A tar reader's error as the image's: a bound its headers broke, or a corrupt stream.
pub(crate) fn refused(error: TarError) -> ImageError {
    match error {
        TarError::Io(error) => corrupt(error),
        bound @ (TarError::MetadataTooLarge { .. }
        | TarError::TooManyMetadataHeaders { .. }
        | TarError::SparseMapTooLarge { .. }
        | TarError::Unsupported { .. }) => ArchiveError::Header {
            message: bound.to_string(),
        }
        .into(),
        other => ArchiveError::Corrupt {
            message: other.to_string(),
        }
        .into(),
    }
}

fn entry_name(raw: &[u8]) -> Result<String, ImageError> {
    let text = String::from_utf8_lossy(raw).into_owned();
    let name = text.strip_prefix("./").unwrap_or(&text);
    if std::str::from_utf8(raw).is_err() || !is_plain_file_name(name) {
        return Err(ArchiveError::BadName { name: text }.into());
    }
    Ok(name.to_owned())
}

fn check_entry_type(name: &str, kind: Kind) -> Result<(), ImageError> {
    if kind == Kind::Regular {
        return Ok(());
    }
    Err(ArchiveError::NotRegularFile {
        name: name.to_owned(),
        kind: kind.describe().to_owned(),
    }
    .into())
}

fn parse_machine(text: &[u8]) -> Result<Machine, ImageError> {
    let text = std::str::from_utf8(text)
        .map_err(|_| ImageError::Machine(schemas::Violations::one("", "not UTF-8 text")))?;
    let value = parse_json(text).map_err(ImageError::Machine)?;
    migrate_machine_definition(&value).map_err(ImageError::Machine)
}

/// Copies `reader` into a new file at `path`, leaving 4 KiB blocks of zeros as holes.
pub(crate) fn write_sparse(reader: &mut impl Read, path: &Path) -> Result<u64, ImageError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ImageError::io_at("create", path, e))?;
    let written = copy_sparse(reader, &file).map_err(|e| match e.kind() {
        io::ErrorKind::Other | io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => {
            corrupt(e)
        }
        _ => ImageError::io_at("write", path, e),
    })?;
    Ok(written)
}

/// Copies `reader` to its end into `file` from offset 0, leaving 4 KiB blocks of zeros as holes,
/// and sets the file's length to what was read; returns that length.
pub fn copy_sparse(reader: &mut impl Read, file: &File) -> io::Result<u64> {
    let mut buffer = vec![0u8; COPY_CHUNK];
    let mut offset = 0u64;
    loop {
        let filled = read_full(reader, &mut buffer)?;
        if filled == 0 {
            break;
        }
        write_data_runs(file, &buffer[..filled], offset)?;
        offset += filled as u64;
    }
    file.set_len(offset)?;
    Ok(offset)
}

/// Writes the non-zero blocks of `chunk` at `offset`, coalescing neighbours into one write.
fn write_data_runs(file: &File, chunk: &[u8], offset: u64) -> io::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut position = 0;
    for block in chunk.chunks(HOLE_BLOCK) {
        let zero = is_zero(block);
        match (zero, run_start) {
            (false, None) => run_start = Some(position),
            (true, Some(start)) => {
                file.write_all_at(&chunk[start..position], offset + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
        position += block.len();
    }
    if let Some(start) = run_start {
        file.write_all_at(&chunk[start..], offset + start as u64)?;
    }
    Ok(())
}

fn is_zero(block: &[u8]) -> bool {
    let mut words = block.chunks_exact(16);
    let words_zero = words
        .by_ref()
        .all(|word| word.iter().fold(0u8, |acc, &b| acc | b) == 0);
    words_zero && words.remainder().iter().all(|&b| b == 0)
}

fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads what follows the tarball's end marker: only zero padding may follow.
fn drain_trailer(mut rest: impl Read) -> Result<(), ImageError> {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = rest.read(&mut buffer).map_err(corrupt)?;
        if n == 0 {
            return Ok(());
        }
        if !is_zero(&buffer[..n]) {
            return Err(ArchiveError::Corrupt {
                message: "data after the end of the tar archive".to_owned(),
            }
            .into());
        }
    }
}

/// Fails reads once more than `remaining` bytes came through: the decompression-bomb guard.
struct CappedReader<R> {
    inner: R,
    remaining: u64,
    limit: u64,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        match self.remaining.checked_sub(n as u64) {
            Some(left) => {
                self.remaining = left;
                Ok(n)
            }
            None => Err(io::Error::other(ArchiveError::UnpackedTooLarge {
                limit: self.limit,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_become_holes_and_data_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let mut data = vec![0u8; 8 << 20];
        data[5 << 20] = 7;
        data[(8 << 20) - 1] = 9;
        write_sparse(&mut &data[..], &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            allocated <= 64 * 1024,
            "allocated {allocated} bytes for 2 data blocks"
        );
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 4096]));
        assert!(is_zero(&[0; 17]));
        let mut block = [0u8; 4096];
        block[4095] = 1;
        assert!(!is_zero(&block));
        block[4095] = 0;
        block[3] = 1;
        assert!(!is_zero(&block));
    }
}
