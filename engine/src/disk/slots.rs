//! Mount slots: a fixed number of raw disks of one fixed size that a VM with mounts always has,
//! whatever its task uses, so that such a VM can be restored from a snapshot — the restoring
//! QEMU must have the devices the saved one had, and opens its own files for them. The guest
//! finds slot `i` by its virtio serial number ([`serial`]); a task's disks go into the first
//! slots, the rest get a shared, read-only, all-zero [`placeholder`]. A snapshot is built with
//! fresh writable [`Blanks`] in every slot, so no task's disk is ever part of one.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use schemas::protocol::SLOT_SERIAL_PREFIX;

use super::drives::ExtraDrive;

/// The mount slots of a VM in one snapshot key's terms: part of it, since the
/// restoring VM must have the same disks as the saved one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLayout {
    /// How many.
    pub count: usize,
    /// Each one's size in bytes.
    pub size: u64,
}

/// The serial number of slot `index`.
pub fn serial(index: usize) -> String {
    format!("{SLOT_SERIAL_PREFIX}{index}")
}

/// Whether `drive` sits in a mount slot.
pub fn is_slot(drive: &ExtraDrive) -> bool {
    drive
        .serial
        .as_deref()
        .is_some_and(|serial| serial.starts_with(SLOT_SERIAL_PREFIX))
}

/// The slot layout of a VM with `drives`: how many slots and their size (that of the first
/// slot's file), or `None` without slots.
pub fn layout(drives: &[ExtraDrive]) -> Option<SlotLayout> {
    let slots: Vec<&ExtraDrive> = drives.iter().filter(|drive| is_slot(drive)).collect();
    let first = slots.first()?;
    let size = fs::metadata(&first.path).map_or(0, |meta| meta.len());
    Some(SlotLayout {
        count: slots.len(),
        size,
    })
}

/// The shared all-zero disk of `size` bytes under `dir` (made when missing; sparse, root's,
/// 0400) that fills the slots a task does not use. It is always attached read-only.
pub fn placeholder(dir: &Path, size: u64) -> io::Result<PathBuf> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let path = dir.join(format!("blank-{size}.raw"));
    if fs::metadata(&path).is_ok_and(|meta| meta.len() == size) {
        return Ok(path);
    }
    let partial = dir.join(format!(".blank-{size}.{}", std::process::id()));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o400)
        .open(&partial)?;
    file.set_len(size)?;
    drop(file);
    fs::rename(&partial, &path)?;
    Ok(path)
}

/// Writable all-zero disks for the slots of a VM whose snapshot is being built, in a
/// directory of their own that is removed on drop.
pub struct Blanks {
    dir: PathBuf,
}

impl Blanks {
    /// The directory `dir` (a leftover of a crash is replaced).
    pub fn create(dir: &Path) -> io::Result<Blanks> {
        let _ = fs::remove_dir_all(dir);
        fs::DirBuilder::new().mode(0o700).create(dir)?;
        Ok(Blanks {
            dir: dir.to_owned(),
        })
    }

    /// `drives` with each slot's file replaced by a fresh blank of the same size.
    pub fn in_place_of(&self, drives: &[ExtraDrive]) -> io::Result<Vec<ExtraDrive>> {
        drives
            .iter()
            .enumerate()
            .map(|(index, drive)| {
                if !is_slot(drive) {
                    return Ok(drive.clone());
                }
                let size = fs::metadata(&drive.path)?.len();
                let path = self.dir.join(format!("slot{index}.raw"));
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?
                    .set_len(size)?;
                Ok(ExtraDrive {
                    path,
                    writable: true,
                    ..drive.clone()
                })
            })
            .collect()
    }
}

impl Drop for Blanks {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blanks_match_the_slots_sizes_and_leave_other_drives_alone() {
        let dir = tempfile::tempdir().unwrap();
        let blank = placeholder(&dir.path().join("shared"), 1 << 30).unwrap();
        assert_eq!(fs::metadata(&blank).unwrap().len(), 1 << 30);
        assert_eq!(
            placeholder(&dir.path().join("shared"), 1 << 30).unwrap(),
            blank
        );
        let drives = vec![
            ExtraDrive::read_only_disk(dir.path().join("seed.img"), "raw"),
            ExtraDrive::slot_disk(&blank, serial(0), false),
            ExtraDrive::slot_disk(&blank, serial(1), false),
        ];
        assert_eq!(
            layout(&drives),
            Some(SlotLayout {
                count: 2,
                size: 1 << 30
            })
        );
        let blanks = Blanks::create(&dir.path().join("building.slots")).unwrap();
        let replaced = blanks.in_place_of(&drives).unwrap();
        assert_eq!(replaced[0], drives[0]);
        for drive in &replaced[1..] {
            assert!(drive.writable && drive.path.starts_with(dir.path().join("building.slots")));
            assert_eq!(fs::metadata(&drive.path).unwrap().len(), 1 << 30);
        }
        drop(blanks);
        assert!(!dir.path().join("building.slots").exists());
        assert_eq!(layout(&drives[..1]), None);
    }
}
