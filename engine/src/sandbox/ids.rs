//! A user and group of its own for every VM, from a range of ids no account uses.
//!
//! An id is held by an exclusive `flock` on `LOCK_DIR/<id>.lock`. The lock directory is
//! host-wide, so every worker on the host draws from the range without handing one id to two
//! live VMs, and a lock dies with its process: the ids of a worker killed with `kill -9` are
//! free again once its processes are gone. An id is handed out only when, besides its lock,
//! no process runs as it — a QEMU a dead worker left behind keeps its id out of use until the
//! start-up sweep ([`crate::sandbox::records::sweep`]) kills it.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;
use thiserror::Error;

/// Where the locks of held ids live (one directory for the whole host).
pub const LOCK_DIR: &str = "/run/taskvm/ids";

/// A range of user and group ids reserved for VMs: `first .. first + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// The first id.
    pub first: u32,
    /// How many ids.
    pub count: u32,
}

/// The ids of one VM's QEMU: uid and gid are the same number. Dropping it frees them.
#[derive(Debug)]
pub struct VmIds {
    id: u32,
    _lock: fs::File,
}

/// Why no id could be had, or the range cannot be used.
#[derive(Debug, Error)]
pub enum IdError {
    /// Every id of the range is held (or still has a process).
    #[error(
        "all {count} ids of sandbox.idRange ({first}..{end}) are in use; raise sandbox.idRange's \
         count or run fewer VMs"
    , end = u64::from(*first) + u64::from(*count))]
    Exhausted {
        /// The range's first id.
        first: u32,
        /// Its size.
        count: u32,
    },
    /// An account of the host has an id in the range.
    #[error(
        "sandbox.idRange ({first}..{end}) holds {what} {name:?} (id {id}) of this host; VMs need \
         ids no account uses: choose another range"
    , first = range.first, end = u64::from(range.first) + u64::from(range.count))]
    Collides {
        /// The range.
        range: IdRange,
        /// "user", "group" or "subordinate id range".
        what: &'static str,
        /// The account's name.
        name: String,
        /// Its id.
        id: u32,
    },
    /// The range does not fit in the id space, or is empty.
    #[error("sandbox.idRange: {0}")]
    Invalid(String),
    /// The lock directory could not be used.
    #[error("id locks in {dir}: {source}")]
    Locks {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl IdRange {
    /// The range of the configuration, checked to fit below the invalid id (2^32 − 1).
    pub fn new(first: u32, count: u32) -> Result<IdRange, IdError> {
        if count == 0 || first == 0 {
            return Err(IdError::Invalid(
                "the range must hold at least one id and not start at 0 (root)".into(),
            ));
        }
        if u64::from(first) + u64::from(count) > u64::from(u32::MAX - 1) {
            return Err(IdError::Invalid(format!(
                "{first} + {count} passes the largest usable id {}",
                u32::MAX - 2
            )));
        }
        Ok(IdRange { first, count })
    }

    /// Whether `id` is in the range.
    pub fn contains(&self, id: u32) -> bool {
        id >= self.first && u64::from(id) < u64::from(self.first) + u64::from(self.count)
    }

    /// Fails when a user, group or subordinate id range of this host (`/etc/passwd`,
    /// `/etc/group`, `/etc/subuid`, `/etc/subgid`) has an id in the range.
    pub fn check_host(&self) -> Result<(), IdError> {
        for (file, what) in [("/etc/passwd", "user"), ("/etc/group", "group")] {
            let text = fs::read_to_string(file).unwrap_or_default();
            for fields in text.lines().map(|line| line.split(':').collect::<Vec<_>>()) {
                let Some(id) = fields.get(2).and_then(|id| id.parse::<u32>().ok()) else {
                    continue;
                };
                if self.contains(id) {
                    return Err(self.collision(what, fields[0], id));
                }
            }
        }
        for file in ["/etc/subuid", "/etc/subgid"] {
            let text = fs::read_to_string(file).unwrap_or_default();
            for fields in text.lines().map(|line| line.split(':').collect::<Vec<_>>()) {
                let (Some(start), Some(count)) = (
                    fields.get(1).and_then(|v| v.parse::<u64>().ok()),
                    fields.get(2).and_then(|v| v.parse::<u64>().ok()),
                ) else {
                    continue;
                };
                let ours = u64::from(self.first)..u64::from(self.first) + u64::from(self.count);
                if start < ours.end && ours.start < start + count {
                    let id = start.max(ours.start) as u32;
                    return Err(self.collision("subordinate id range", fields[0], id));
                }
            }
        }
        Ok(())
    }

    fn collision(&self, what: &'static str, name: &str, id: u32) -> IdError {
        IdError::Collides {
            range: *self,
            what,
            name: name.to_owned(),
            id,
        }
    }

    /// Takes a free id: its lock, with no process running as it. The search starts at a
    /// random place in the range so that concurrent workers rarely race for the same lock.
    pub fn allocate(&self) -> Result<VmIds, IdError> {
        self.allocate_in(Path::new(LOCK_DIR))
    }

    /// [`IdRange::allocate`] with the locks in `dir`.
    pub fn allocate_in(&self, dir: &Path) -> Result<VmIds, IdError> {
        let locks_failed = |source| IdError::Locks {
            dir: dir.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(locks_failed)?;
        let meta = fs::symlink_metadata(dir).map_err(locks_failed)?;
        if !meta.is_dir() || meta.uid() != rustix::process::geteuid().as_raw() {
            return Err(locks_failed(io::Error::other(
                "is not a directory owned by this user",
            )));
        }
        let start = rand::rng().random_range(0..self.count);
        let mut busy = None;
        for step in 0..self.count {
            let id = self.first + (start + step) % self.count;
            let path = dir.join(format!("{id}.lock"));
            let lock = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&path)
                .map_err(locks_failed)?;
            let locked =
                rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive);
            if locked.is_err() {
                continue;
            }
            if let Some(pid) = processes_of(id).first() {
                busy.get_or_insert((id, *pid));
                continue; // a leftover of a dead worker, until the sweep kills it
            }
            return Ok(VmIds { id, _lock: lock });
        }
        Err(IdError::Exhausted {
            first: self.first,
            count: self.count,
        })
    }
}

impl VmIds {
    /// The user id.
    pub fn uid(&self) -> u32 {
        self.id
    }

    /// The group id (the same number).
    pub fn gid(&self) -> u32 {
        self.id
    }
}

/// The processes whose real, effective or saved user id is `uid`, from `/proc`.
pub fn processes_of(uid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("Uid:"))
                    .is_some_and(|ids| {
                        ids.split_whitespace()
                            .take(3)
                            .any(|id| id.parse() == Ok(uid))
                    })
            })
        })
        .collect()
}

/// Kills (SIGKILL) every process running as `uid`; returns how many there were. Only for ids
/// of the VM range, which nothing but QEMUs of taskvm uses.
pub fn kill_processes_of(uid: u32) -> usize {
    let pids = processes_of(uid);
    for pid in &pids {
        if let Some(pid) = rustix::process::Pid::from_raw(*pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    pids.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_holders_never_share_an_id_and_a_dropped_id_is_free_again() {
        let dir = tempfile::tempdir().unwrap();
        let range = IdRange::new(1_879_113_728, 2).unwrap();
        let a = range.allocate_in(dir.path()).unwrap();
        let b = range.allocate_in(dir.path()).unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(range.contains(a.uid()) && range.contains(b.uid()));
        let error = range.allocate_in(dir.path()).unwrap_err();
        assert!(
            error.to_string().contains("sandbox.idRange"),
            "the message names the setting: {error}"
        );
        let freed = a.uid();
        drop(a);
        assert_eq!(range.allocate_in(dir.path()).unwrap().uid(), freed);
    }

    #[test]
    fn an_id_with_a_process_is_not_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let id = 1_879_113_800;
        let mut sleeper = std::process::Command::new("setpriv")
            .args([
                &format!("--reuid={id}"),
                &format!("--regid={id}"),
                "--clear-groups",
                "sleep",
                "30",
            ])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while processes_of(id).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let range = IdRange::new(id, 1).unwrap();
        assert!(
            matches!(
                range.allocate_in(dir.path()),
                Err(IdError::Exhausted { .. })
            ),
            "a process runs as the only id"
        );
        assert_eq!(kill_processes_of(id), 1);
        sleeper.wait().unwrap();
        assert_eq!(range.allocate_in(dir.path()).unwrap().uid(), id);
    }

    #[test]
    fn ranges_are_checked() {
        assert!(IdRange::new(0, 10).is_err());
        assert!(IdRange::new(u32::MAX - 10, 100).is_err());
        let root_range = IdRange::new(1, 10).unwrap();
        let error = root_range.check_host().unwrap_err().to_string();
        assert!(error.contains("sandbox.idRange"), "{error}");
    }
}
