//! The task's `mounts`: its caches checked out before the VM starts, put in the VM's mount
//! slots (every slot filled, so the VM can be restored from a snapshot of VMs with mounts),
//! named to the guest, and given back once the VM is gone — purged when the exit status says
//! so, marked for a check when the guest did not power off cleanly.

use std::path::PathBuf;
use std::sync::Arc;

use engine::disk::drives::ExtraDrive;
use engine::disk::slots;
use schemas::payload::MAX_MOUNTS;
use schemas::protocol::GuestMount;
use schemas::Payload;

use super::Run;
use crate::caches::CheckedOut;
use crate::host::Host;
use crate::resolution::Ending;

/// The caches one task holds, in the order of its payload's `mounts`.
pub(super) struct TaskMounts {
    copies: Vec<(CheckedOut, String)>,
    placeholder: Option<PathBuf>,
}

impl Run {
    /// Checks out a copy of each cache the payload mounts (none: no slots at all).
    pub(super) async fn check_out_caches(
        &mut self,
        host: &Arc<Host>,
        payload: &Payload,
    ) -> Result<TaskMounts, Ending> {
        if payload.mounts.is_empty() {
            return Ok(TaskMounts {
                copies: Vec::new(),
                placeholder: None,
            });
        }
        let wanted: Vec<(String, String)> = payload
            .mounts
            .iter()
            .map(|mount| (mount.cache.clone(), mount.path.clone()))
            .collect();
        let host = host.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let size = host.config.mounts.disk_size;
            let placeholder = slots::placeholder(&host.slots_dir(), size)
                .map_err(|error| format!("the mount slots' blank disk: {error}"))?;
            let mut copies = Vec::new();
            for (name, path) in wanted {
                let copy = host
                    .caches
                    .check_out(&name)
                    .map_err(|error| error.to_string())?;
                copies.push((copy, path));
            }
            Ok::<_, String>(TaskMounts {
                copies,
                placeholder: Some(placeholder),
            })
        })
        .await
        .map_err(|error| Ending::internal(format!("checking out caches: {error}")))?
        .map_err(Ending::internal)?;
        for (copy, path) in &checked.copies {
            for note in &copy.notes {
                self.log.note(note);
            }
            self.log.note(&format!("cache {} at {path}", copy.name()));
        }
        self.stage_done("caches");
        Ok(checked)
    }
}

impl TaskMounts {
    /// The VM's mount slots: the caches first, writable, then the shared blank, read-only.
    pub(super) fn drives(&self) -> Vec<ExtraDrive> {
        let Some(placeholder) = &self.placeholder else {
            return Vec::new();
        };
        (0..MAX_MOUNTS)
            .map(|slot| match self.copies.get(slot) {
                Some((copy, _)) => ExtraDrive::slot_disk(copy.disk(), slots::serial(slot), true),
                None => ExtraDrive::slot_disk(placeholder, slots::serial(slot), false),
            })
            .collect()
    }

    /// What the guest mounts where.
    pub(super) fn for_guest(&self) -> Vec<GuestMount> {
        self.copies
            .iter()
            .enumerate()
            .map(|(slot, (_, path))| GuestMount {
                serial: slots::serial(slot),
                path: path.clone(),
                read_only: false,
            })
            .collect()
    }

    /// Gives the caches back once the VM is gone: `clean` when the guest powered off by
    /// itself after unmounting them; purged when `payload` says so for `exit_code`.
    pub(super) fn release(
        self,
        payload: &Payload,
        exit_code: Option<i32>,
        clean: bool,
    ) -> Vec<String> {
        let purge = exit_code.is_some_and(|code| {
            payload.on_exit_status.as_ref().is_some_and(|on| {
                on.purge_caches
                    .iter()
                    .any(|purged| i32::from(*purged) == code)
            })
        });
        let mut notes = Vec::new();
        for (copy, _) in self.copies {
            if purge {
                notes.push(format!(
                    "cache {} purged (exit status {} is in onExitStatus.purgeCaches)",
                    copy.name(),
                    exit_code.unwrap_or_default()
                ));
            } else if !clean {
                notes.push(format!(
                    "cache {}: the guest did not power off cleanly; it is checked before its next use",
                    copy.name()
                ));
            }
            copy.release(clean, purge);
        }
        notes
    }
}
