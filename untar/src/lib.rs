//! A streaming reader of tar archives that come from someone we do not trust: image tarballs
//! from a payload's URL, directory artifacts from a guest.
//!
//! The `tar` crate reads a GNU long name or link (`L`/`K`) and a PAX header (`x`/`g`) whole
//! into memory, however large its header says it is, and builds a sparse file's map without
//! a bound. Here every such size is checked against [`Limits`] *before* anything is
//! allocated or read, and a hostile header is an error naming the header's kind and its
//! declared size.
//!
//! # Layout
//! - [`fields`]: pure parsing of one 512-byte header block (numbers, names, checksum, the
//!   GNU sparse map) and of PAX records.
//! - [`archive`]: [`Archive`], the reader — headers in order, metadata headers folded into
//!   the entry they describe, data as a [`std::io::Read`] with sparse holes as zeros, and the
//!   rest of an entry skipped when the caller moves on.
//! - [`error`]: the reader's error, [`TarError`].
//!
//! What it reads: ustar, GNU (old-style sparse `S` entries included) and PAX `path`,
//! `linkpath` and `size` records. PAX sparse formats (`GNU.sparse.*`) are refused.

pub mod archive;
pub mod error;
pub mod fields;

pub use archive::{Archive, Entry, EntryHeader, Kind};
pub use error::TarError;

/// A tar entry's name as a relative path of plain components (`.` dropped); None for
/// absolute names, `..`, or anything else that could leave the directory it is unpacked in.
pub fn plain_relative(raw: &[u8]) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Component, Path, PathBuf};
    let path = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(relative)
}

/// The bounds on what an archive's metadata may make us hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest GNU long name/link or PAX header data, in bytes.
    pub max_metadata: u64,
    /// Largest number of data blocks in one sparse file's map.
    pub max_sparse_blocks: usize,
    /// Largest number of metadata headers before one entry.
    pub max_metadata_headers: u32,
}

impl Default for Limits {
    /// 64 KiB of metadata (a Linux path is at most 4 KiB), 262 144 sparse blocks (a 4 MiB
    /// map), 8 metadata headers per entry.
    fn default() -> Self {
        Limits {
            max_metadata: 64 * 1024,
            max_sparse_blocks: 1 << 18,
            max_metadata_headers: 8,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::plain_relative;

    #[test]
    fn only_plain_relative_names_are_accepted() {
        assert_eq!(plain_relative(b"./a/b.txt"), Some(PathBuf::from("a/b.txt")));
        assert_eq!(plain_relative(b"."), Some(PathBuf::new()));
        assert_eq!(plain_relative(b"../etc/passwd"), None);
        assert_eq!(plain_relative(b"a/../../x"), None);
        assert_eq!(plain_relative(b"/etc/passwd"), None);
    }
}
