//! The task's `mounts`: its caches checked out and its content made (fetched and unpacked
//! once, shared read-only) before the VM starts, put in the VM's mount slots (every slot
//! filled, so the VM can be restored from a snapshot of VMs with mounts), named to the guest,
//! and the caches given back once the VM is gone — purged when the exit status says so,
//! marked for a check when the guest did not power off cleanly.

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
use crate::images::image_error_is_the_payloads;
use crate::resolution::Ending;

/// What one task mounts, in the order of its payload's `mounts`.
pub(super) struct TaskMounts {
    slots: Vec<(Slot, String)>,
    placeholder: Option<PathBuf>,
}

/// What fills one mount slot.
enum Slot {
    /// A copy of a writable cache, held until released.
    Cache(CheckedOut),
    /// A content image, attached read-only (held until the task ends).
    Content(image_manager::content::ContentImage),
}

impl Run {
    /// Checks out a copy of each cache the payload mounts and makes its content (none: no
    /// slots at all).
    pub(super) async fn prepare_mounts(
        &mut self,
        host: &Arc<Host>,
        payload: &Payload,
    ) -> Result<TaskMounts, Ending> {
        if payload.mounts.is_empty() {
            return Ok(TaskMounts {
                slots: Vec::new(),
                placeholder: None,
            });
        }
        let mounts = payload.mounts.clone();
        let (host, log) = (host.clone(), self.log.clone());
        let prepared = tokio::task::spawn_blocking(move || {
            let size = host.config.mounts.disk_size;
            let placeholder = slots::placeholder(&host.slots_dir(), size).map_err(|error| {
                Ending::internal(format!("the mount slots' blank disk: {error}"))
            })?;
            let mut slots = Vec::new();
            for mount in mounts {
                let slot = match (&mount.cache, &mount.content, mount.format) {
                    (Some(name), _, _) => {
                        let copy = host
                            .caches
                            .check_out(name)
                            .map_err(|error| Ending::internal(error.to_string()))?;
                        for note in &copy.notes {
                            log.note(note);
                        }
                        log.note(&format!("cache {name} at {}", mount.path));
                        Slot::Cache(copy)
                    }
                    (None, Some(content), Some(format)) => {
                        let made = host
                            .contents
                            .get(
                                &content.url,
                                &content.sha256,
                                format,
                                &host.file_policy,
                                size,
                            )
                            .map_err(|error| {
                                let reason = format!(
                                    "content {}: {error}",
                                    schemas::shown::quoted(&content.url)
                                );
                                if image_error_is_the_payloads(&error) {
                                    Ending::malformed(reason)
                                } else {
                                    Ending::internal(reason)
                                }
                            })?;
                        log.note(&format!(
                            "content sha256:{} at {} (read-only{}{})",
                            content.sha256,
                            mount.path,
                            if made.made { ", unpacked now" } else { "" },
                            match made.left_out {
                                0 => String::new(),
                                n => format!("; {n} links or special files left out"),
                            }
                        ));
                        Slot::Content(made)
                    }
                    _ => return Err(Ending::malformed("a mount is neither cache nor content")),
                };
                slots.push((slot, mount.path));
            }
            Ok(TaskMounts {
                slots,
                placeholder: Some(placeholder),
            })
        })
        .await
        .map_err(|error| Ending::internal(format!("preparing the mounts: {error}")))??;
        self.stage_done("mounts");
        Ok(prepared)
    }
}

impl TaskMounts {
    /// The VM's mount slots: the caches first, writable, then the shared blank, read-only.
    /// Whether the task mounts nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub(super) fn drives(&self) -> Vec<ExtraDrive> {
        let Some(placeholder) = &self.placeholder else {
            return Vec::new();
        };
        (0..MAX_MOUNTS)
            .map(|index| {
                let serial = slots::serial(index);
                match self.slots.get(index) {
                    Some((Slot::Cache(copy), _)) => {
                        ExtraDrive::slot_disk(copy.disk(), serial, true)
                    }
                    Some((Slot::Content(image), _)) => {
                        ExtraDrive::slot_disk(&image.path, serial, false)
                    }
                    None => ExtraDrive::slot_disk(placeholder, serial, false),
                }
            })
            .collect()
    }

    /// What the guest mounts where.
    pub(super) fn for_guest(&self) -> Vec<GuestMount> {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, (slot, path))| GuestMount {
                serial: slots::serial(index),
                path: path.clone(),
                read_only: matches!(slot, Slot::Content(_)),
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
        for (slot, _) in self.slots {
            let Slot::Cache(copy) = slot else { continue };
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
