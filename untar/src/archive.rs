//! [`Archive`]: entries one at a time from a stream, each header checked and each metadata
//! size bounded before it is read.

use std::io::{self, Read};

use crate::error::TarError;
use crate::fields::{self, PaxOverrides, SparseBlock, BLOCK};
use crate::Limits;

/// What an entry is, from its type flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (`0`, NUL, or contiguous `7`), sparse (`S`) ones included.
    Regular,
    /// A directory (`5`).
    Directory,
    /// A symbolic link (`2`).
    Symlink,
    /// A hard link (`1`).
    HardLink,
    /// A character device (`3`).
    CharDevice,
    /// A block device (`4`).
    BlockDevice,
    /// A FIFO (`6`).
    Fifo,
    /// Anything else, with its type flag.
    Other(u8),
}

impl Kind {
    fn from_flag(flag: u8) -> Kind {
        match flag {
            b'0' | 0 | b'7' | b'S' => Kind::Regular,
            b'5' => Kind::Directory,
            b'2' => Kind::Symlink,
            b'1' => Kind::HardLink,
            b'3' => Kind::CharDevice,
            b'4' => Kind::BlockDevice,
            b'6' => Kind::Fifo,
            other => Kind::Other(other),
        }
    }

    /// The kind in words, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Regular => "regular file",
            Kind::Directory => "directory",
            Kind::Symlink => "symbolic link",
            Kind::HardLink => "hard link",
            Kind::CharDevice => "character device",
            Kind::BlockDevice => "block device",
            Kind::Fifo => "FIFO",
            Kind::Other(_) => "special entry",
        }
    }
}

/// An entry's header with its metadata headers applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryHeader {
    /// The name as stored: PAX `path`, else a GNU long name, else the header's own.
    pub name: Vec<u8>,
    /// The link target, for links (PAX `linkpath`, a GNU long link, or the header's own).
    pub link: Vec<u8>,
    /// What the entry is.
    pub kind: Kind,
    /// The file's size once unpacked (a sparse file's real size, holes included).
    pub size: u64,
    /// Whether the data has holes (a GNU sparse entry).
    pub sparse: bool,
    /// The permission bits (0 when the field is not a number).
    pub mode: u32,
}

/// A tar archive read from a stream, entry by entry.
pub struct Archive<R> {
    inner: R,
    limits: Limits,
    /// Bytes consumed from `inner` so far.
    position: u64,
    /// The current entry's data.
    data: DataCursor,
    /// Zero bytes that pad the current entry's data to a block.
    padding: u64,
    /// Set once the end marker (or the stream's end) was read.
    ended: bool,
}

/// Metadata headers read so far for the next entry.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<PaxOverrides>,
    headers: u32,
    last_kind: Option<&'static str>,
}

/// Where reading the current entry's data stands: the stored runs, as (file offset, length)
/// in stream order, with holes between them.
#[derive(Default)]
struct DataCursor {
    runs: Vec<SparseBlock>,
    /// Index of the run being read (or the next one).
    run: usize,
    /// Position in the unpacked file.
    at: u64,
    /// The unpacked file's size.
    size: u64,
    /// Stored bytes not read yet.
    stored_left: u64,
}

impl<R: Read> Archive<R> {
    /// Reads `inner` as a tar archive under `limits`.
    pub fn new(inner: R, limits: Limits) -> Archive<R> {
        Archive {
            inner,
            limits,
            position: 0,
            data: DataCursor::default(),
            padding: 0,
            ended: false,
        }
    }

    /// Bytes consumed from the stream so far (headers, data and padding).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next entry, or None at the end of the archive. Whatever the previous entry's data
    /// had left unread is skipped first.
    pub fn next_entry(&mut self) -> Result<Option<Entry<'_, R>>, TarError> {
        if self.ended {
            return Ok(None);
        }
        self.skip_rest()?;
        let mut pending = Pending::default();
        loop {
            let offset = self.position;
            let Some(block) = self.read_block()? else {
                return self.end(&pending);
            };
            if fields::is_zero_block(&block) {
                return self.end(&pending);
            }
            if !fields::checksum_ok(&block) {
                return Err(TarError::Checksum { offset });
            }
            let flag = fields::type_flag(&block);
            let stored =
                fields::size(&block).map_err(|field| TarError::BadField { offset, field })?;
            if let Some(kind) = metadata_kind(flag) {
                pending.headers += 1;
                if pending.headers > self.limits.max_metadata_headers {
                    return Err(TarError::TooManyMetadataHeaders {
                        limit: self.limits.max_metadata_headers,
                    });
                }
                let data = self.read_metadata(kind, stored)?;
                pending.absorb(flag, kind, &data)?;
                continue;
            }
            let header = self.entry_header(&block, flag, stored, offset, pending)?;
            return Ok(Some(Entry {
                header,
                archive: self,
            }));
        }
    }

    /// The stream, for reading what follows the end marker.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn end(&mut self, pending: &Pending) -> Result<Option<Entry<'_, R>>, TarError> {
        if let Some(kind) = pending.last_kind {
            return Err(TarError::DanglingMetadata { kind });
        }
        self.ended = true;
        Ok(None)
    }

    /// Builds the entry's header from its block and the metadata before it, and readies its
    /// data (the sparse map read and checked, for an `S` entry).
    fn entry_header(
        &mut self,
        block: &[u8; BLOCK],
        flag: u8,
        stored: u64,
        offset: u64,
        pending: Pending,
    ) -> Result<EntryHeader, TarError> {
        let pax = pending.pax.unwrap_or_default();
        if pax.gnu_sparse {
            return Err(TarError::Unsupported {
                what: "a PAX sparse file (GNU.sparse.* records)",
            });
        }
        let stored = pax.size.unwrap_or(stored);
        let name = pax
            .path
            .or(pending.long_name)
            .unwrap_or_else(|| fields::name(block));
        let link = pax
            .link
            .or(pending.long_link)
            .unwrap_or_else(|| fields::link_name(block));
        let (runs, size, sparse) = if flag == b'S' {
            let (runs, size) = self.sparse_map(block, stored, offset)?;
            (runs, size, true)
        } else {
            (
                vec![SparseBlock {
                    offset: 0,
                    length: stored,
                }],
                stored,
                false,
            )
        };
        self.data = DataCursor {
            runs,
            run: 0,
            at: 0,
            size,
            stored_left: stored,
        };
        self.padding = padding_of(stored);
        Ok(EntryHeader {
            name,
            link,
            kind: Kind::from_flag(flag),
            size,
            sparse,
            mode: fields::number(&block[100..108]).map_or(0, |mode| (mode & 0o7777) as u32),
        })
    }

    /// Reads a GNU sparse map (the header's entries and its extension blocks) under the
    /// block bound, and checks that it describes exactly the stored data.
    fn sparse_map(
        &mut self,
        block: &[u8; BLOCK],
        stored: u64,
        offset: u64,
    ) -> Result<(Vec<SparseBlock>, u64), TarError> {
        let bad = |field| TarError::BadField { offset, field };
        let (mut runs, mut extended, real_size) = fields::gnu_sparse_header(block).map_err(bad)?;
        while extended {
            let extension_offset = self.position;
            let Some(extension) = self.read_block()? else {
                return Err(TarError::Truncated {
                    what: "a sparse map",
                });
            };
            let (more, again) =
                fields::gnu_sparse_extension(&extension).map_err(|field| TarError::BadField {
                    offset: extension_offset,
                    field,
                })?;
            if runs.len() + more.len() > self.limits.max_sparse_blocks {
                return Err(TarError::SparseMapTooLarge {
                    limit: self.limits.max_sparse_blocks,
                });
            }
            runs.extend(more);
            extended = again;
        }
        let mut end = 0u64;
        let mut total = 0u64;
        for run in &runs {
            if run.offset < end {
                return Err(TarError::BadSparseMap {
                    reason: "its blocks overlap or are out of order",
                });
            }
            end = run
                .offset
                .checked_add(run.length)
                .ok_or(TarError::BadSparseMap {
                    reason: "a block ends past 2^64",
                })?;
            total = total
                .checked_add(run.length)
                .ok_or(TarError::BadSparseMap {
                    reason: "its blocks add up past 2^64",
                })?;
        }
        if total != stored {
            return Err(TarError::BadSparseMap {
                reason: "its blocks do not add up to the stored size",
            });
        }
        if end > real_size {
            return Err(TarError::BadSparseMap {
                reason: "a block ends past the file's size",
            });
        }
        Ok((runs, real_size))
    }

    /// Reads a metadata header's data after checking its declared size.
    fn read_metadata(&mut self, kind: &'static str, declared: u64) -> Result<Vec<u8>, TarError> {
        if declared > self.limits.max_metadata {
            return Err(TarError::MetadataTooLarge {
                kind,
                declared,
                limit: self.limits.max_metadata,
            });
        }
        let mut data = vec![0u8; declared as usize];
        self.inner
            .read_exact(&mut data)
            .map_err(TarError::reading("a metadata header"))?;
        self.position += declared;
        self.discard(padding_of(declared), "a metadata header")?;
        Ok(data)
    }

    /// One header block, or None at the stream's end exactly on a block boundary.
    fn read_block(&mut self) -> Result<Option<[u8; BLOCK]>, TarError> {
        let mut block = [0u8; BLOCK];
        let mut filled = 0;
        while filled < BLOCK {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => return Err(TarError::Truncated { what: "a header" }),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TarError::Io(e)),
            }
        }
        self.position += BLOCK as u64;
        Ok(Some(block))
    }

    /// Skips what the caller left of the current entry: its unread data and its padding.
    fn skip_rest(&mut self) -> Result<(), TarError> {
        let left = self.data.stored_left + self.padding;
        self.data = DataCursor::default();
        self.padding = 0;
        self.discard(left, "an entry's data")
    }

    fn discard(&mut self, count: u64, what: &'static str) -> Result<(), TarError> {
        let copied = io::copy(&mut (&mut self.inner).take(count), &mut io::sink())
            .map_err(TarError::reading(what))?;
        self.position += copied;
        if copied < count {
            return Err(TarError::Truncated { what });
        }
        Ok(())
    }

    /// Reads the current entry's data: stored runs from the stream, holes as zeros.
    fn read_data(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let cursor = &mut self.data;
        if buffer.is_empty() || cursor.at >= cursor.size {
            return Ok(0);
        }
        while cursor
            .runs
            .get(cursor.run)
            .is_some_and(|run| run.offset + run.length <= cursor.at)
        {
            cursor.run += 1;
        }
        match cursor.runs.get(cursor.run) {
            Some(run) if run.offset <= cursor.at => {
                let left = run.offset + run.length - cursor.at;
                let want = buffer
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX));
                let read = self.inner.read(&mut buffer[..want])?;
                if read == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the archive ends in the middle of an entry's data",
                    ));
                }
                cursor.at += read as u64;
                cursor.stored_left -= read as u64;
                self.position += read as u64;
                Ok(read)
            }
            next => {
                let hole_end = next.map_or(cursor.size, |run| run.offset);
                let left = hole_end - cursor.at;
                let count = buffer
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX));
                buffer[..count].fill(0);
                cursor.at += count as u64;
                Ok(count)
            }
        }
    }
}

impl Pending {
    fn absorb(&mut self, flag: u8, kind: &'static str, data: &[u8]) -> Result<(), TarError> {
        let duplicate = || TarError::DuplicateMetadata { kind };
        self.last_kind = Some(kind);
        match flag {
            b'L' if self.long_name.is_some() => return Err(duplicate()),
            b'L' => self.long_name = Some(fields::long_name(data)),
            b'K' if self.long_link.is_some() => return Err(duplicate()),
            b'K' => self.long_link = Some(fields::long_name(data)),
            b'x' if self.pax.is_some() => return Err(duplicate()),
            b'x' => {
                let parsed =
                    fields::pax_records(data).map_err(|reason| TarError::BadPax { reason })?;
                self.pax = Some(parsed);
            }
            // Global PAX headers set defaults we do not use; their size was bounded.
            _ => {}
        }
        Ok(())
    }
}

/// The metadata header kinds, by type flag.
fn metadata_kind(flag: u8) -> Option<&'static str> {
    match flag {
        b'L' => Some("GNU long name (L)"),
        b'K' => Some("GNU long link name (K)"),
        b'x' => Some("PAX extended (x)"),
        b'g' => Some("PAX global (g)"),
        _ => None,
    }
}

fn padding_of(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// One entry: its header, and its data as a reader (sparse holes read as zeros).
pub struct Entry<'a, R> {
    header: EntryHeader,
    archive: &'a mut Archive<R>,
}

impl<R: Read> Entry<'_, R> {
    /// The entry's header.
    pub fn header(&self) -> &EntryHeader {
        &self.header
    }
}

impl<R: Read> Read for Entry<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        self.archive.read_data(buffer)
    }
}
