//! What one task's artifacts may cost the host, all of them together: bytes received, entries
//! written, time taken, the slowest rate, and the free space left on the disk they go to. The
//! guest's stream is read through [`GuestStream`], which enforces the clock; writers charge
//! bytes and entries to the [`Budget`].

use std::cell::RefCell;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use schemas::config::ArtifactConfig;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The rate is judged only after this long, so that a slow start is not cut off.
const RATE_GRACE: Duration = Duration::from_secs(10);
/// Free space is checked again after this many bytes are written.
const SPACE_CHECK_EVERY: u64 = 64 << 20;

/// A bound of the budget that was hit; its message names the setting that raises it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exceeded {
    /// More bytes than `artifacts.maxBytes`.
    #[error("the task's artifacts exceed {0} bytes in all (artifacts.maxBytes)")]
    Bytes(u64),
    /// More entries than `artifacts.maxEntries`.
    #[error("the task's artifacts exceed {0} entries in all (artifacts.maxEntries)")]
    Entries(u64),
    /// Collection took longer than `artifacts.timeout`.
    #[error("collecting the task's artifacts took longer than {0} s (artifacts.timeout)")]
    Deadline(u64),
    /// The guest sent slower than `artifacts.minRate`.
    #[error("the guest sent artifacts slower than {0} bytes/s on average (artifacts.minRate)")]
    TooSlow(u64),
    /// Writing would leave less free space than `cache.minFree`.
    #[error(
        "writing more would leave less than {min_free} bytes free on {} (cache.minFree)",
        dir.display()
    )]
    DiskSpace {
        /// The cap.
        min_free: u64,
        /// The artifacts directory.
        dir: PathBuf,
    },
}

impl Exceeded {
    /// An I/O error carrying this bound, for errors that cross a `Read`.
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// The bound inside an I/O error made by [`Exceeded::into_io`].
    pub fn from_io(error: &io::Error) -> Option<Exceeded> {
        error.get_ref()?.downcast_ref::<Exceeded>().cloned()
    }
}

/// What is left of one task's allowance. Collection runs one artifact at a time, so the budget
/// moves into each artifact's blocking writer and comes back with it.
#[derive(Debug, Clone)]
pub struct Budget {
    max_bytes: u64,
    max_entries: u64,
    bytes_left: u64,
    entries_left: u64,
    started: Instant,
    timeout: Duration,
    min_rate: u64,
    rate_grace: Duration,
    received: u64,
    min_free: u64,
    dir: PathBuf,
    written_since_check: u64,
}

impl Budget {
    /// A fresh budget for a task whose artifacts go to `dir`, on a host keeping `min_free`
    /// bytes free; its clock starts now.
    pub fn new(config: &ArtifactConfig, min_free: u64, dir: &Path) -> Budget {
        Budget {
            max_bytes: config.max_bytes,
            max_entries: u64::from(config.max_entries),
            bytes_left: config.max_bytes,
            entries_left: u64::from(config.max_entries),
            started: Instant::now(),
            timeout: Duration::from_secs(u64::from(config.timeout)),
            min_rate: config.min_rate,
            rate_grace: RATE_GRACE,
            received: 0,
            min_free,
            dir: dir.to_owned(),
            written_since_check: SPACE_CHECK_EVERY, // check before the first write
        }
    }

    /// When the whole collection must be over.
    pub fn deadline(&self) -> Instant {
        self.started + self.timeout
    }

    /// The bound hit when the deadline passes.
    pub fn deadline_exceeded(&self) -> Exceeded {
        Exceeded::Deadline(self.timeout.as_secs())
    }

    /// The earliest moment the guest is too late: the overall deadline, or the moment at
    /// which what it sent so far falls below the minimum average rate.
    fn patience_ends(&self) -> (Instant, Exceeded) {
        let deadline = (self.deadline(), self.deadline_exceeded());
        if self.min_rate == 0 {
            return deadline;
        }
        let earned = Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        let rate_end = self.started + earned.max(self.rate_grace);
        if rate_end < deadline.0 {
            (rate_end, Exceeded::TooSlow(self.min_rate))
        } else {
            deadline
        }
    }

    /// Charges one entry (a file, a directory, or one left out).
    pub fn charge_entry(&mut self) -> Result<(), Exceeded> {
        self.entries_left = self
            .entries_left
            .checked_sub(1)
            .ok_or(Exceeded::Entries(self.max_entries))?;
        Ok(())
    }

    /// Charges `count` bytes received from the guest.
    fn charge_received(&mut self, count: u64) -> Result<(), Exceeded> {
        self.received += count;
        self.bytes_left = self
            .bytes_left
            .checked_sub(count)
            .ok_or(Exceeded::Bytes(self.max_bytes))?;
        Ok(())
    }

    /// Checks, every [`SPACE_CHECK_EVERY`] bytes, that writing `count` more keeps the disk's
    /// free space above `cache.minFree`.
    pub fn reserve_space(&mut self, count: u64) -> Result<(), Exceeded> {
        self.written_since_check += count;
        if self.written_since_check < SPACE_CHECK_EVERY {
            return Ok(());
        }
        self.written_since_check = 0;
        let Ok(stat) = rustix::fs::statvfs(&self.dir) else {
            return Ok(()); // the write itself will report a missing directory
        };
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < self.min_free.saturating_add(SPACE_CHECK_EVERY) {
            return Err(Exceeded::DiskSpace {
                min_free: self.min_free,
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }
}

/// A budget shared by the reader and the writers of one artifact, on its blocking thread.
pub type SharedBudget = Rc<RefCell<Budget>>;

/// A blocking reader over a reply's chunks, for a blocking thread: every byte is charged to
/// the budget, and each wait ends at the budget's deadline or when the guest's average rate
/// falls below the minimum.
pub struct GuestStream {
    body: mpsc::Receiver<io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
    runtime: tokio::runtime::Handle,
    budget: SharedBudget,
}

impl GuestStream {
    /// Reads `body` under `budget`, waiting on `runtime`'s clock.
    pub fn new(
        body: mpsc::Receiver<io::Result<bytes::Bytes>>,
        budget: SharedBudget,
        runtime: tokio::runtime::Handle,
    ) -> GuestStream {
        GuestStream {
            body,
            current: bytes::Bytes::new(),
            runtime,
            budget,
        }
    }

    fn next_chunk(&mut self) -> io::Result<Option<bytes::Bytes>> {
        let (until, exceeded) = self.budget.borrow().patience_ends();
        let body = &mut self.body;
        let waited = self
            .runtime
            .block_on(async { tokio::time::timeout_at(until, body.recv()).await });
        match waited {
            Err(_) => Err(exceeded.into_io()),
            Ok(None) => Ok(None),
            Ok(Some(chunk)) => {
                let chunk = chunk?;
                self.budget
                    .borrow_mut()
                    .charge_received(chunk.len() as u64)
                    .map_err(Exceeded::into_io)?;
                Ok(Some(chunk))
            }
        }
    }
}

impl Read for GuestStream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.next_chunk()? {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let length = buffer.len().min(self.current.len());
        buffer[..length].copy_from_slice(&self.current.split_to(length));
        Ok(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_bytes: u64, max_entries: u32, timeout: u32, min_rate: u64) -> ArtifactConfig {
        ArtifactConfig {
            max_bytes,
            max_entries,
            timeout,
            min_rate,
        }
    }

    #[test]
    fn entries_and_bytes_are_charged_across_calls() {
        let dir = tempfile::tempdir().unwrap();
        let mut budget = Budget::new(&config(10, 2, 60, 0), 0, dir.path());
        budget.charge_entry().unwrap();
        budget.charge_entry().unwrap();
        assert_eq!(budget.charge_entry(), Err(Exceeded::Entries(2)));
        budget.charge_received(10).unwrap();
        assert_eq!(budget.charge_received(1), Err(Exceeded::Bytes(10)));
        assert!(Exceeded::Bytes(10)
            .to_string()
            .contains("artifacts.maxBytes"));
    }

    #[test]
    fn free_space_below_min_free_stops_writing() {
        let dir = tempfile::tempdir().unwrap();
        let mut budget = Budget::new(&config(1 << 40, 10, 60, 0), u64::MAX / 2, dir.path());
        let error = budget.reserve_space(1).unwrap_err();
        assert!(error.to_string().contains("cache.minFree"), "{error}");
        let mut roomy = Budget::new(&config(1 << 40, 10, 60, 0), 0, dir.path());
        roomy.reserve_space(1).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_trickling_guest_is_cut_off_at_the_rate_or_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        for (settings, expected) in [
            (config(1 << 20, 10, 30, 1000), Exceeded::TooSlow(1000)),
            (config(1 << 20, 10, 1, 0), Exceeded::Deadline(1)),
        ] {
            let (sender, body) = mpsc::channel(1);
            let mut budget = Budget::new(&settings, 0, dir.path());
            budget.rate_grace = Duration::from_millis(300);
            let started = std::time::Instant::now();
            let runtime = tokio::runtime::Handle::current();
            let reading = tokio::task::spawn_blocking(move || {
                let mut stream = GuestStream::new(body, Rc::new(RefCell::new(budget)), runtime);
                let mut sink = Vec::new();
                let error = stream.read_to_end(&mut sink).unwrap_err();
                Exceeded::from_io(&error)
            });
            // One byte a minute.
            let trickle = tokio::spawn(async move {
                loop {
                    if sender
                        .send(Ok(bytes::Bytes::from_static(b"x")))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            });
            assert_eq!(reading.await.unwrap(), Some(expected));
            assert!(started.elapsed() < Duration::from_secs(30));
            trickle.abort();
        }
    }
}
