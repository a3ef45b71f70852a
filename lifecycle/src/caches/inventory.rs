//! What the caches hold, as `taskvm cache ls|rm|gc` and the budget see it: every kept copy
//! with its size on disk and last use, removed only when no task holds it.

use std::fs::{self, File};
use std::path::Path;

use super::{lock_if_free, CacheStore};

/// One kept copy, as `taskvm cache ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInfo {
    /// The cache's name.
    pub name: String,
    /// The copy's number.
    pub copy: u32,
    /// Bytes it takes on the host's disk.
    pub bytes: u64,
    /// When a task last gave it back (or took it).
    pub last_used: std::time::SystemTime,
    /// Whether a task holds it now.
    pub in_use: bool,
    /// Whether it is checked before its next use (its last task did not end cleanly).
    pub dirty: bool,
}

impl CacheStore {
    /// Every kept copy, by name then number.
    pub fn list(&self) -> Vec<CopyInfo> {
        let mut found = Vec::new();
        let Ok(names) = fs::read_dir(&self.root) else {
            return found;
        };
        for entry in names.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(files) = fs::read_dir(entry.path()) else {
                continue;
            };
            for file in files.flatten() {
                let file_name = file.file_name().to_string_lossy().into_owned();
                let Some(copy) = file_name.strip_suffix(".raw").and_then(|n| n.parse().ok()) else {
                    continue;
                };
                let Ok(meta) = file.metadata() else { continue };
                let dir = entry.path();
                let lock = dir.join(format!("{copy}.lock"));
                use std::os::unix::fs::MetadataExt;
                found.push(CopyInfo {
                    name: name.clone(),
                    copy,
                    bytes: meta.blocks() * 512,
                    last_used: fs::metadata(&lock)
                        .and_then(|meta| meta.modified())
                        .or_else(|_| meta.modified())
                        .unwrap_or(std::time::UNIX_EPOCH),
                    in_use: Self::held(&lock).is_none(),
                    dirty: dir.join(format!("{copy}.dirty")).exists(),
                });
            }
        }
        found.sort_by(|a, b| (&a.name, a.copy).cmp(&(&b.name, b.copy)));
        found
    }

    /// Removes every copy of cache `name` that no task holds; returns how many were
    /// removed and how many are in use (left alone).
    pub fn remove(&self, name: &str) -> (usize, usize) {
        let (mut removed, mut busy) = (0, 0);
        for info in self.list().into_iter().filter(|info| info.name == name) {
            match self.remove_copy(&info) {
                true => removed += 1,
                false => busy += 1,
            }
        }
        if removed > 0 && busy == 0 {
            let _ = fs::remove_dir_all(self.root.join(name));
        }
        (removed, busy)
    }

    /// Removes least recently used copies no task holds until the kept copies take at most
    /// `budget` bytes; returns those removed.
    pub fn gc(&self, budget: u64) -> Vec<CopyInfo> {
        let mut copies = self.list();
        let mut total: u64 = copies.iter().map(|info| info.bytes).sum();
        copies.sort_by_key(|info| info.last_used);
        let mut removed = Vec::new();
        for info in copies {
            if total <= budget {
                break;
            }
            if !info.in_use && self.remove_copy(&info) {
                total = total.saturating_sub(info.bytes);
                removed.push(info);
            }
        }
        removed
    }

    /// Removes one copy unless a task holds it; whether it was removed.
    fn remove_copy(&self, info: &CopyInfo) -> bool {
        let dir = self.root.join(&info.name);
        let Some(_lock) = Self::held(&dir.join(format!("{}.lock", info.copy))) else {
            return false;
        };
        let _ = fs::remove_file(dir.join(format!("{}.raw", info.copy)));
        let _ = fs::remove_file(dir.join(format!("{}.dirty", info.copy)));
        true
    }

    /// The copy's lock, held, when no task holds it.
    fn held(lock: &Path) -> Option<File> {
        lock_if_free(lock).ok().flatten()
    }
}

/// The task log's line for a copy removed to keep the budget.
pub(super) fn evicted_note(info: &CopyInfo) -> String {
    format!(
        "cache {} copy {} removed, least recently used, to keep the caches within \
         mounts.cacheBudget",
        info.name, info.copy
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 64 << 20;

    #[test]
    fn gc_removes_the_least_recently_used_free_copies_down_to_the_budget() {
        let root = tempfile::tempdir().unwrap();
        let store = CacheStore::open(root.path(), SIZE, 1, u64::MAX).unwrap();
        for name in ["old", "mid", "new"] {
            store.check_out(name).unwrap().release(true, false);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let held = store.check_out("old").unwrap(); // in use, and now the most recent
        let listed = store.list();
        assert_eq!(listed.len(), 3, "{listed:?}");
        assert!(listed.iter().all(|info| info.bytes > 0));
        assert!(
            listed
                .iter()
                .find(|info| info.name == "old")
                .unwrap()
                .in_use
        );
        let one = listed[0].bytes;
        let removed = store.gc(one);
        let names: Vec<&str> = removed.iter().map(|info| info.name.as_str()).collect();
        assert_eq!(names, ["mid", "new"], "oldest first, the held one spared");
        assert_eq!(store.gc(0).len(), 0, "nothing free is left");
        assert_eq!(store.remove("old"), (0, 1), "a held copy is not removed");
        held.release(true, false);
        assert_eq!(store.remove("old"), (1, 0));
        assert!(store.list().is_empty());
    }
}
