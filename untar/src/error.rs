//! Why an archive could not be read.

use std::io;

use thiserror::Error;

/// A tar archive that cannot be read, or that asks for more than [`crate::Limits`] allow.
#[derive(Debug, Error)]
pub enum TarError {
    /// Reading the underlying stream failed.
    #[error("reading the archive: {0}")]
    Io(#[source] io::Error),
    /// The stream ended inside a header or an entry's data.
    #[error("the archive ends in the middle of {what}")]
    Truncated {
        /// What was being read.
        what: &'static str,
    },
    /// A header's checksum does not match its bytes.
    #[error("the header at byte {offset} has a wrong checksum (not a tar archive, or corrupt)")]
    Checksum {
        /// Offset of the header in the archive.
        offset: u64,
    },
    /// A numeric field of a header cannot be read.
    #[error("the header at byte {offset} has an unreadable {field} field")]
    BadField {
        /// Offset of the header in the archive.
        offset: u64,
        /// The field's name.
        field: &'static str,
    },
    /// A metadata header declares more data than allowed.
    #[error(
        "a {kind} header declares {declared} bytes of metadata; at most {limit} bytes are allowed"
    )]
    MetadataTooLarge {
        /// The header's kind, e.g. "GNU long name (L)".
        kind: &'static str,
        /// The size it declares.
        declared: u64,
        /// The bound.
        limit: u64,
    },
    /// More metadata headers in a row than allowed.
    #[error("more than {limit} metadata headers describe one entry")]
    TooManyMetadataHeaders {
        /// The bound.
        limit: u32,
    },
    /// Two headers of one kind describe the same entry.
    #[error("two {kind} headers describe the same entry")]
    DuplicateMetadata {
        /// The header's kind.
        kind: &'static str,
    },
    /// The archive ends after a metadata header.
    #[error("the archive ends after a {kind} header, with no entry for it")]
    DanglingMetadata {
        /// The header's kind.
        kind: &'static str,
    },
    /// A sparse file's map has too many blocks.
    #[error("a sparse file's map has more than {limit} blocks")]
    SparseMapTooLarge {
        /// The bound.
        limit: usize,
    },
    /// A sparse file's map does not describe its data.
    #[error("a sparse file's map is inconsistent: {reason}")]
    BadSparseMap {
        /// What is wrong.
        reason: &'static str,
    },
    /// A PAX header cannot be parsed.
    #[error("a PAX header is malformed: {reason}")]
    BadPax {
        /// What is wrong.
        reason: &'static str,
    },
    /// The archive uses a feature this reader refuses.
    #[error("{what} is not supported")]
    Unsupported {
        /// The feature.
        what: &'static str,
    },
}

impl TarError {
    /// Turns a read error into `Truncated` for an early end, keeping every other error.
    pub(crate) fn reading(what: &'static str) -> impl Fn(io::Error) -> TarError {
        move |error| {
            if error.kind() == io::ErrorKind::UnexpectedEof {
                TarError::Truncated { what }
            } else {
                TarError::Io(error)
            }
        }
    }
}
