//! Why an image was refused or could not be had. Each message names the offending entry or
//! rule so that one line tells the user what to fix.

use std::io;

use schemas::shown::quoted;
use schemas::Violations;
use thiserror::Error;

/// An image operation failed.
#[derive(Debug, Error)]
pub enum ImageError {
    /// A file operation on the host failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// The reference is neither an http(s) URL, a file URL nor a local path.
    #[error("bad image reference {}: {reason}", quoted(.reference))]
    BadReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server could not be reached or the connection broke.
    #[error("download of {} failed: {}", quoted(.url), quoted(.message))]
    Transport {
        /// The URL.
        url: String,
        /// The transport error.
        message: String,
        /// Whether trying again may help (connection reset, timeout).
        transient: bool,
    },
    /// The server answered with an error status.
    #[error("download of {} failed: HTTP {status}", quoted(.url))]
    HttpStatus {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// No byte arrived for the configured stall timeout.
    #[error("download of {} stalled: no data for {seconds} s (cache.stallTimeout)", quoted(.url))]
    Stalled {
        /// The URL.
        url: String,
        /// The stall timeout.
        seconds: u32,
    },
    /// The whole download took longer than allowed.
    #[error("download of {} took longer than {seconds} s (cache.downloadTimeout)", quoted(.url))]
    TooSlow {
        /// The URL.
        url: String,
        /// The bound.
        seconds: u32,
    },
    /// The compressed bytes do not have the pinned digest.
    #[error("sha256 mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The pinned digest.
        expected: String,
        /// The digest of what was received.
        actual: String,
    },
    /// The tarball breaks a rule of the image format.
    #[error("{0}")]
    Archive(#[from] ArchiveError),
    /// `machine.json` is not a valid machine definition.
    #[error("machine.json is invalid: {0}")]
    Machine(Violations),
    /// A disk file failed validation.
    #[error("{file}: {reason}")]
    Disk {
        /// The file inside the image.
        file: String,
        /// The rule it breaks.
        reason: String,
    },
    /// `qemu-img` could not be run or failed.
    #[error("qemu-img {action} failed: {message}")]
    QemuImg {
        /// What qemu-img was asked to do.
        action: String,
        /// Its error output, or why it could not start.
        message: String,
    },
    /// No cached image has this digest.
    #[error("no cached image sha256:{0}")]
    NotCached(String),
}

impl ImageError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    /// An I/O error on `path`.
    pub fn io_at(action: &str, path: &std::path::Path, source: io::Error) -> Self {
        ImageError::io(format!("{action} {}", path.display()), source)
    }

    /// Whether a new attempt may succeed (5xx, resets, stalls); never for 4xx or bad images.
    pub fn is_transient(&self) -> bool {
        match self {
            ImageError::Transport { transient, .. } => *transient,
            ImageError::HttpStatus { status, .. } => *status >= 500 || *status == 429,
            ImageError::Stalled { .. } => true,
            _ => false,
        }
    }
}

/// A rule of the image tarball format that an archive breaks.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArchiveError {
    /// An entry that is not a regular file (directory, link, device, FIFO…).
    #[error("entry {} is a {kind}; only regular files are allowed", quoted(.name))]
    NotRegularFile {
        /// The entry's name.
        name: String,
        /// What it is.
        kind: String,
    },
    /// A name with a directory part, `..`, an absolute path or odd characters.
    #[error("entry {} has a forbidden name; entries are plain file names", quoted(.name))]
    BadName {
        /// The entry's name, lossily decoded.
        name: String,
    },
    /// The same name twice.
    #[error("entry {} appears twice", quoted(.name))]
    Duplicate {
        /// The entry's name.
        name: String,
    },
    /// A file the format does not allow.
    #[error("unexpected entry {}; allowed: machine.json, disk.img, layer.qcow2 and the boot files machine.json names", quoted(.name))]
    Unexpected {
        /// The entry's name.
        name: String,
    },
    /// A required file is absent.
    #[error("missing {name}")]
    Missing {
        /// The file.
        name: String,
    },
    /// A file larger than its cap.
    #[error("entry {} is larger than the limit of {limit} bytes ({setting})", quoted(.name))]
    FileTooLarge {
        /// The entry's name.
        name: String,
        /// The cap.
        limit: u64,
        /// The setting that raises it.
        setting: &'static str,
    },
    /// More entries than allowed.
    #[error("more than {limit} entries (cache.maxEntries)")]
    TooManyEntries {
        /// The cap.
        limit: u32,
    },
    /// The unpacked files together exceed the cap (a decompression bomb, or just too big).
    #[error("unpacked content exceeds the limit of {limit} bytes (cache.maxUnpackedSize)")]
    UnpackedTooLarge {
        /// The cap.
        limit: u64,
    },
    /// The compressed stream exceeds the cap.
    #[error("compressed image exceeds the limit of {limit} bytes (cache.maxCompressedSize)")]
    CompressedTooLarge {
        /// The cap.
        limit: u64,
    },
    /// A content archive has more entries than content may.
    #[error("the content archive has more than {limit} entries (fixed)")]
    TooManyContentEntries {
        /// The bound.
        limit: u64,
    },
    /// A content archive does not fit a mount's disk.
    #[error("the content does not fit a mount's disk of {limit} bytes (mounts.diskSize)")]
    ContentTooLarge {
        /// The bound.
        limit: u64,
    },
    /// The stream is not valid zstd or tar, or ends early.
    #[error("corrupt or truncated archive: {message}")]
    Corrupt {
        /// The decoder's error.
        message: String,
    },
    /// A tar header asks for more than the reader allows (a metadata header or sparse map
    /// larger than its bound).
    #[error("refused tar header: {message}")]
    Header {
        /// What the header declared, and the bound.
        message: String,
    },
}
