//! Failed VMs kept frozen for debugging (a payload's `debug.keepOnFailure`): the VM whose
//! command failed is saved after its agent reported — memory, processes and disk, the way
//! snapshots are made — under `STATE/kept/NAME/` (`vm/`, the engine's snapshot, and
//! `kept.json`), within the configuration's `kept` limits (count, bytes, time to live).
//! [`resume`] restores that very machine on a fresh isolated network; the kept files are
//! never changed by it, so a machine can be resumed again until it expires.
//!
//! The image the VM was made of must still be in the cache to resume it (its disk is the
//! base of the kept overlay); the snapshot key (image, machine, QEMU, accelerator, network
//! settings) must still be the host's.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use engine::network::session::{GuestSession, SessionConfig};
use engine::snapshot::Snapshot;
use engine::VirtualMachine;
use image_manager::{Digest, Lease};
use schemas::config::KeptConfig;
use schemas::protocol::{ActionKind, ExecResult, EXEC_OUTPUT_LIMIT, EXEC_SCRIPT_LIMIT};
use schemas::{Payload, ResolvedMachine, WorkerConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::host::Host;

/// A kept VM's own description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptMeta {
    /// Its name (the task's VM's): what `taskvm debug` takes.
    pub name: String,
    /// The payload of the task that failed.
    pub payload: Payload,
    /// The provider's name for that task, when it has one (`taskvm serve`: its task id;
    /// `taskvm worker`: `TASK_ID/RUN_ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The digest of the image its disk is made on.
    pub image: String,
    /// The snapshot key it was saved under: a resume needs the same.
    pub snapshot_key: String,
    /// When it was kept (seconds since the epoch); it is deleted `kept.ttl` later (the
    /// configuration's at the time: a changed `ttl` applies to the VMs already kept).
    pub kept_at: u64,
}

/// A kept VM as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptVm {
    /// What it says of itself.
    pub meta: KeptMeta,
    /// Bytes its files take.
    pub size: u64,
    /// Its directory.
    pub dir: PathBuf,
}

/// Why a VM was not kept, or not resumed.
#[derive(Debug, Error)]
pub enum KeptError {
    /// No kept VM of that name.
    #[error("no kept VM named {0:?} (taskvm kept ls lists them)")]
    Unknown(String),
    /// `kept.maxCount` is 0.
    #[error("kept.maxCount is 0: this host keeps no failed VM")]
    Disabled,
    /// Its image left the cache.
    #[error("its image {0} is no longer in the cache, and its disk was made on it")]
    ImageGone(String),
    /// The host changed since.
    #[error("this host's QEMU, accelerator or configuration changed since it was kept")]
    HostChanged,
    /// The engine failed.
    #[error("{0}")]
    Vm(#[from] engine::VmError),
    /// Its files.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The payload's machine no longer fits the host's limits.
    #[error("its machine: {0}")]
    Machine(String),
}

const META: &str = "kept.json";
/// The end of the name of a VM being saved (`.NAME.partial`).
const PARTIAL: &str = ".partial";
/// Longer than any save takes (its migration is bounded to 60 s): a `.partial` directory
/// this old was left by a crash.
const SAVE_GRACE: Duration = Duration::from_secs(15 * 60);

fn older_than(path: &Path, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|metadata| metadata.modified())
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .is_some_and(|elapsed| elapsed > age)
}
const VM_DIR: &str = "vm";

/// The kept VMs of a host: their directory and limits.
#[derive(Debug, Clone)]
pub struct KeptStore {
    dir: PathBuf,
    limits: KeptConfig,
}

impl KeptStore {
    /// The store the configuration says: `STATE/kept` under `kept`'s limits.
    pub fn for_config(config: &WorkerConfig) -> KeptStore {
        KeptStore {
            dir: config.state_dir.join("kept"),
            limits: config.kept.clone(),
        }
    }

    /// Where the kept VMs are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// When kept VM `meta` is deleted (seconds since the epoch).
    pub fn expires_at(&self, meta: &KeptMeta) -> u64 {
        meta.kept_at + self.limits.ttl
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// Saves `vm` (its command failed; its agent reported) as kept VM `meta.name`, described by
/// `meta` (its `kept_at` set here), then trims the kept VMs to the limits. The VM ends here.
pub async fn keep(
    host: &Host,
    mut vm: VirtualMachine,
    mut meta: KeptMeta,
) -> Result<KeptVm, KeptError> {
    let store = KeptStore::for_config(&host.config);
    if store.limits.max_count == 0 {
        vm.release().await;
        return Err(KeptError::Disabled);
    }
    // Saved aside and renamed into place whole, so that no listing, trim or resume ever sees
    // a VM half saved.
    let dir = store.dir.join(&meta.name);
    let partial = store.dir.join(format!(".{}{PARTIAL}", meta.name));
    fs::create_dir_all(&partial)?;
    // The agent's poll is cut and it retries, as a restored guest then does against its new
    // service; a moment lets it see the cut before the save.
    if let Some(network) = vm.network_mut() {
        network.stop_service().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let saved = vm.snapshot(&partial.join(VM_DIR)).await;
    if let Err(error) = saved {
        let _ = fs::remove_dir_all(&partial);
        return Err(error.into());
    }
    meta.kept_at = now();
    let text = serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?;
    fs::write(partial.join(META), text)?;
    fs::rename(&partial, &dir)?;
    // Pinned while the VM still leases the image: no collection can remove it in between.
    // The pin holds while the directory exists.
    let pinned = Digest::parse(&meta.image).and_then(|digest| host.cache.pin(&digest, &dir));
    if let Err(error) = pinned {
        let _ = fs::remove_dir_all(&dir);
        return Err(std::io::Error::other(error).into());
    }
    store.trim();
    let size = dir_size(&dir);
    Ok(KeptVm { meta, size, dir })
}

impl KeptStore {
    /// The kept VMs, oldest first. Directories without a readable description (a save cut short)
    /// are left out (and removed by [`KeptStore::trim`]).
    pub fn list(&self) -> Vec<KeptVm> {
        let mut kept: Vec<KeptVm> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|entry| read(&entry.path()))
            .collect();
        kept.sort_by_key(|vm| vm.meta.kept_at);
        kept
    }

    /// Kept VM `name`.
    pub fn find(&self, name: &str) -> Result<KeptVm, KeptError> {
        self.list()
            .into_iter()
            .find(|vm| vm.meta.name == name)
            .ok_or_else(|| KeptError::Unknown(name.to_owned()))
    }

    /// Deletes kept VM `name` with everything it held.
    pub fn remove(&self, name: &str) -> Result<(), KeptError> {
        fs::remove_dir_all(self.find(name)?.dir)?;
        Ok(())
    }

    /// Deletes what is past the limits: expired VMs, unreadable leftovers, then the oldest ones
    /// over `kept.maxCount` or `kept.maxSize`. Returns the names deleted.
    pub fn trim(&self) -> Vec<String> {
        let limits = &self.limits;
        let mut removed = Vec::new();
        let readable: Vec<PathBuf> = self.list().into_iter().map(|vm| vm.dir).collect();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // A save in progress is left alone; one a crash cut short is old.
            let leftover = if name.starts_with('.') {
                name.ends_with(PARTIAL) && older_than(&path, SAVE_GRACE)
            } else {
                !readable.contains(&path)
            };
            if leftover && fs::remove_dir_all(&path).is_ok() {
                removed.push(name);
            }
        }
        let now = now();
        let mut kept = self.list();
        kept.retain(|vm| {
            let expired = vm.meta.kept_at + limits.ttl <= now;
            if expired && fs::remove_dir_all(&vm.dir).is_ok() {
                removed.push(vm.meta.name.clone());
            }
            !expired
        });
        while kept.len() > limits.max_count as usize
            || kept.iter().map(|vm| vm.size).sum::<u64>() > limits.max_size
        {
            let oldest = kept.remove(0);
            if fs::remove_dir_all(&oldest.dir).is_ok() {
                removed.push(oldest.meta.name);
            }
        }
        removed
    }
}

/// A kept VM running again: its VM and its guest session (no task: its agent serves actions,
/// as when it was saved).
pub struct Resumed {
    /// The VM, on a network of its own.
    pub vm: VirtualMachine,
    /// Its guest session: shells and `exec` go through it.
    pub session: Arc<GuestSession>,
    /// When it is to be discarded again (`kept.resumeTime` from now).
    pub until: tokio::time::Instant,
    /// The host capacity it holds, when a provider shares one out.
    pub reservation: Option<crate::capacity::Reservation>,
}

impl Resumed {
    /// Its login shells (a running task's are opened the same way, with the same patience).
    pub fn shells(&self) -> crate::shells::Shells {
        crate::shells::Shells::of(self.session.clone())
    }

    /// Runs `script` (`sh -c`, at most [`EXEC_SCRIPT_LIMIT`] bytes) in it and answers how it
    /// ended, or an error once `until` has come.
    pub async fn exec(&self, script: &str) -> Result<ExecResult, ExecError> {
        if script.len() > EXEC_SCRIPT_LIMIT {
            return Err(ExecError::TooLong(script.len()));
        }
        let asked = self.session.perform(ActionKind::Exec {
            script: script.to_owned(),
        });
        let answered = async {
            let reply = asked.await.map_err(|_| ExecError::Unanswered)?;
            // JSON escapes can take up to six bytes per output byte.
            let body = reply
                .collect(EXEC_OUTPUT_LIMIT * 8)
                .await
                .map_err(|_| ExecError::Unanswered)?;
            serde_json::from_slice::<ExecResult>(&body).map_err(|_| ExecError::Unreadable)
        };
        tokio::time::timeout_at(self.until, answered)
            .await
            .map_err(|_| ExecError::TimeUp)?
    }
}

/// Why [`Resumed::exec`] has no result.
#[derive(Debug, Error)]
pub enum ExecError {
    /// The script is over the limit.
    #[error(
        "the script is {0} bytes; a script to run in a kept VM is at most {limit} bytes \
         (copy a longer one in through the shell)",
        limit = EXEC_SCRIPT_LIMIT
    )]
    TooLong(usize),
    /// The agent did not answer.
    #[error("the resumed VM's agent did not answer")]
    Unanswered,
    /// The agent's answer is not an exec result.
    #[error("the resumed VM's agent answered something unreadable")]
    Unreadable,
    /// `kept.resumeTime` ran out.
    #[error("kept.resumeTime is over: the resumed VM is discarded (the setting raises it)")]
    TimeUp,
}

/// Restores kept VM `name` on a fresh isolated network, once `capacity` (when given) can
/// hold it beside what runs; the kept files stay as they were.
pub async fn resume(
    host: &Arc<Host>,
    name: &str,
    capacity: Option<&Arc<crate::capacity::Capacity>>,
) -> Result<Resumed, KeptError> {
    let kept = KeptStore::for_config(&host.config).find(name)?;
    let digest = Digest::parse(&kept.meta.image)
        .map_err(|_| KeptError::ImageGone(kept.meta.image.clone()))?;
    let lease: Lease = host
        .cache
        .lease(&digest)
        .ok()
        .flatten()
        .ok_or_else(|| KeptError::ImageGone(kept.meta.image.clone()))?;
    let machine = machine_of(host, &kept.meta.payload, &lease)?;
    let accelerator = host.accelerator(&|_| {}).await;
    let resumed_name = format!("{}-debug-{:x}", kept.meta.name, rand::random::<u32>());
    let settings = host.vm_settings(&resumed_name, accelerator);
    if host.snapshot_key(&lease, &machine, &settings) != kept.meta.snapshot_key {
        return Err(KeptError::HostChanged);
    }
    let reservation = match capacity {
        Some(capacity) => {
            let needed = crate::capacity::Resources {
                memory_mib: u64::from(machine.memory_mib()),
                cpus: u64::from(machine.topology().vcpus()),
            };
            let reserved = capacity.reserve(needed).await;
            Some(reserved.map_err(|error| KeptError::Machine(error.to_string()))?)
        }
        None => None,
    };
    let snapshot = Snapshot::open(&kept.dir.join(VM_DIR))?;
    let vm = VirtualMachine::restore(lease, &machine, &settings, &snapshot).await?;
    let (session, _log) = GuestSession::new(SessionConfig::new(&resumed_name));
    vm.set_http_handler(session.handler());
    Ok(Resumed {
        vm,
        session,
        until: tokio::time::Instant::now() + Duration::from_secs(host.config.kept.resume_time),
        reservation,
    })
}

/// The machine of a task of `payload` on `lease`, as the task had it.
pub(crate) fn machine_of(
    host: &Host,
    payload: &Payload,
    lease: &Lease,
) -> Result<ResolvedMachine, KeptError> {
    let layers = schemas::MachineLayers {
        payload: payload.machine.as_ref(),
        image: Some(lease.machine()),
        worker: host.config.machine.as_ref(),
    };
    schemas::resolve_machine(layers, &host.config.limits).map_err(|error| {
        KeptError::Machine(schemas::limit_violation(&error, "/machine").to_string())
    })
}

fn read(dir: &Path) -> Option<KeptVm> {
    let text = fs::read(dir.join(META)).ok()?;
    let meta: KeptMeta = serde_json::from_slice(&text).ok()?;
    Snapshot::open(&dir.join(VM_DIR)).ok()?;
    Some(KeptVm {
        meta,
        size: dir_size(dir),
        dir: dir.to_owned(),
    })
}

fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => total += dir_size(&entry.path()),
            // Blocks actually used: the overlay is sparse.
            Ok(metadata) => total += metadata.blocks() * 512,
            Err(_) => {}
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_spares_a_save_in_progress_and_removes_what_a_crash_left() {
        let state = tempfile::tempdir().expect("a directory");
        let config = WorkerConfig {
            state_dir: state.path().to_owned(),
            ..WorkerConfig::default()
        };
        let store = KeptStore::for_config(&config);
        let saving = store.dir().join(format!(".task-a{PARTIAL}"));
        let broken = store.dir().join("task-b");
        fs::create_dir_all(saving.join(VM_DIR)).expect("a save in progress");
        fs::create_dir_all(&broken).expect("a kept VM without its description");
        fs::write(saving.join(META), b"{}").expect("written just before its rename");
        assert!(store.list().is_empty(), "neither is a kept VM");
        assert_eq!(store.trim(), vec!["task-b".to_owned()]);
        assert!(saving.is_dir(), "a save in progress is never removed");
        assert!(!broken.exists());
        assert!(!older_than(&saving, SAVE_GRACE));
    }
}
