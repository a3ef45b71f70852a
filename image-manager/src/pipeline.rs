//! The one streaming pass: read → sha256 on one thread, zstd decode → tar checks → sparse
//! writes on another, joined by a bounded channel. No compressed copy touches the disk.

use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

use schemas::config::CacheConfig;
use sha2::{Digest as _, Sha256};

use crate::error::{ArchiveError, ImageError};
use crate::reference::Digest;
use crate::source::read_error;
use crate::unpack::{unpack, Unpacked};

/// Bytes per chunk handed from the reading thread to the unpacking thread.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the two threads.
const IN_FLIGHT: usize = 32;

/// Progress of a transfer, reported from the reading thread.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Compressed bytes read so far.
    pub bytes: u64,
    /// Total compressed bytes, when the source said.
    pub total: Option<u64>,
}

/// The result of one pass.
#[derive(Debug)]
pub struct Streamed {
    /// sha256 of the compressed bytes.
    pub digest: Digest,
    /// Compressed bytes read.
    pub compressed_bytes: u64,
    /// What was unpacked.
    pub unpacked: Unpacked,
}

/// Streams `reader` (from `origin`, for messages) into `dest`.
pub fn stream_into(
    reader: Box<dyn Read + Send>,
    length: Option<u64>,
    origin: &str,
    dest: &Path,
    limits: &CacheConfig,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Streamed, ImageError> {
    let (sender, receiver) = sync_channel::<Vec<u8>>(IN_FLIGHT);
    let stall = Duration::from_secs(u64::from(limits.stall_timeout));
    let deadline = Instant::now() + Duration::from_secs(u64::from(limits.download_timeout));
    std::thread::scope(|scope| {
        let reading = scope.spawn(move || {
            let mut reader = reader;
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            loop {
                let mut chunk = vec![0u8; CHUNK];
                let n = match reader.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Some(read_error(origin, &e, stall))),
                };
                if Instant::now() > deadline {
                    return Err(Some(ImageError::TooSlow {
                        url: origin.to_owned(),
                        seconds: limits.download_timeout,
                    }));
                }
                chunk.truncate(n);
                hasher.update(&chunk);
                total += n as u64;
                if total > limits.max_compressed_size {
                    return Err(Some(
                        ArchiveError::CompressedTooLarge {
                            limit: limits.max_compressed_size,
                        }
                        .into(),
                    ));
                }
                progress(Progress {
                    bytes: total,
                    total: length,
                });
                if sender.send(chunk).is_err() {
                    // The unpacking side stopped; its error explains why.
                    return Err(None);
                }
            }
            Ok((Digest::from_bytes(&hasher.finalize()), total))
        });
        let unpacked = unpack(ChannelReader::new(receiver), dest, limits);
        let read = reading.join().unwrap_or_else(|_| {
            Err(Some(ImageError::io(
                "reading thread",
                io::Error::other("panicked"),
            )))
        });
        match (read, unpacked) {
            // A broken download explains a truncated archive better than the decoder does.
            (Err(Some(error)), _) => Err(error),
            (_, Err(error)) => Err(error),
            (Err(None), Ok(_)) => Err(ImageError::io("unpack", io::Error::other("stopped early"))),
            (Ok((digest, compressed_bytes)), Ok(unpacked)) => Ok(Streamed {
                digest,
                compressed_bytes,
                unpacked,
            }),
        }
    })
}

/// Reads the chunks a channel delivers; the end of the channel is the end of the stream.
struct ChannelReader {
    receiver: Receiver<Vec<u8>>,
    current: Vec<u8>,
    position: usize,
}

impl ChannelReader {
    fn new(receiver: Receiver<Vec<u8>>) -> Self {
        ChannelReader {
            receiver,
            current: Vec::new(),
            position: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.position == self.current.len() {
            match self.receiver.recv() {
                Ok(chunk) => {
                    self.current = chunk;
                    self.position = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.position);
        buf[..n].copy_from_slice(&self.current[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}
