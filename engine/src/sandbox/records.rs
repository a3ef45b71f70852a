//! What the engine created, written down so that the next start can clean up after a worker
//! that died with `kill -9`: one small JSON file per VM under `STATE/vms/`, written before QEMU
//! starts and removed when the VM is dropped.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use std::time::Duration;

use rustix::process::{kill_process_group, Pid, Signal};

use crate::network::netns::{delete_namespace, namespace_path, NAMESPACE_PREFIX};
use crate::sandbox::cgroup::{remove_group, GROUP_PREFIX};

/// A VM's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    /// The VM's name.
    pub name: String,
    /// QEMU's process (and process group) id, once known.
    pub pid: Option<u32>,
    /// QEMU's start time in clock ticks since boot (`/proc/PID/stat` field 22), so that a
    /// reused pid is never mistaken for it.
    pub start_ticks: Option<u64>,
    /// The VM's runtime directory.
    pub runtime_dir: PathBuf,
    /// The VM's control groups (one directory per hierarchy).
    pub cgroups: Vec<PathBuf>,
    /// The VM's network namespace.
    pub netns: Option<String>,
    /// The worker process that owns the VM: its pid and start time. The sweep leaves the VMs
    /// of a worker that still runs alone.
    pub owner: Option<(u32, u64)>,
    /// The user (and group) id of the VM's own, when it was jailed: the sweep kills whatever
    /// still runs as it.
    pub uid: Option<u32>,
}

impl VmRecord {
    fn to_text(&self) -> String {
        let mut text = format!(
            "name={}\npid={}\nstart_ticks={}\nruntime_dir={}\n",
            self.name,
            self.pid.map_or(String::new(), |p| p.to_string()),
            self.start_ticks.map_or(String::new(), |t| t.to_string()),
            self.runtime_dir.display()
        );
        for group in &self.cgroups {
            text.push_str(&format!("cgroup={}\n", group.display()));
        }
        if let Some(netns) = &self.netns {
            text.push_str(&format!("netns={netns}\n"));
        }
        if let Some((pid, ticks)) = self.owner {
            text.push_str(&format!("owner={pid}:{ticks}\n"));
        }
        if let Some(uid) = self.uid {
            text.push_str(&format!("uid={uid}\n"));
        }
        text
    }

    fn parse(text: &str) -> Option<VmRecord> {
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some(VmRecord {
            name: field("name")?,
            pid: field("pid").and_then(|p| p.parse().ok()),
            start_ticks: field("start_ticks").and_then(|t| t.parse().ok()),
            runtime_dir: PathBuf::from(field("runtime_dir")?),
            cgroups: text
                .lines()
                .filter_map(|line| line.strip_prefix("cgroup="))
                .map(PathBuf::from)
                .collect(),
            netns: field("netns"),
            owner: field("owner").and_then(|owner| {
                let (pid, ticks) = owner.split_once(':')?;
                Some((pid.parse().ok()?, ticks.parse().ok()?))
            }),
            uid: field("uid").and_then(|uid| uid.parse().ok()),
        })
    }
}

/// The directory of records under a state directory.
pub fn records_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("vms")
}

/// A written record; removed on drop.
#[derive(Debug)]
pub struct RecordFile {
    path: PathBuf,
}

impl RecordFile {
    /// Writes `record` (atomically) under `state_dir`.
    pub fn write(state_dir: &Path, record: &VmRecord) -> io::Result<Self> {
        let dir = records_dir(state_dir);
        fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.record", record.name));
        let temporary = dir.join(format!(".{}.tmp", record.name));
        fs::write(&temporary, record.to_text())?;
        fs::rename(&temporary, &path)?;
        Ok(RecordFile { path })
    }

    /// Rewrites the record (e.g. once QEMU's pid is known).
    pub fn update(&self, record: &VmRecord) -> io::Result<()> {
        // Dot-named like the first write: a sweep of another worker never takes it.
        let temporary = self.path.with_file_name(format!(".{}.tmp", record.name));
        fs::write(&temporary, record.to_text())?;
        fs::rename(&temporary, &self.path)
    }
}

impl Drop for RecordFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// This process as a record's owner.
pub fn this_owner() -> Option<(u32, u64)> {
    let pid = std::process::id();
    process_start_ticks(pid).map(|ticks| (pid, ticks))
}

/// Whether `owner` is a live process other than this one (this process sweeps only at its
/// start, so records naming it are leftovers of a reused pid or of VMs it abandoned).
fn owner_runs_elsewhere((pid, ticks): (u32, u64)) -> bool {
    pid != std::process::id() && process_start_ticks(pid) == Some(ticks)
}

/// QEMU's start time in clock ticks, from `/proc/PID/stat`.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Leftover QEMU process groups killed.
    pub killed: Vec<u32>,
    /// Runtime directories removed.
    pub removed_dirs: Vec<PathBuf>,
    /// Control groups removed.
    pub removed_cgroups: Vec<PathBuf>,
    /// Network namespaces deleted.
    pub removed_namespaces: Vec<String>,
    /// Users of jailed VMs whose processes were killed (their ids are free again once this
    /// process no longer holds their locks, which a dead worker never does).
    pub freed_ids: Vec<u32>,
    /// Records removed.
    pub records: usize,
}

/// Kills and removes whatever the records under `state_dir` describe: the leftovers of a worker
/// that died. Call it at start-up, before any VM of this worker runs.
pub fn sweep(state_dir: &Path) -> io::Result<SweepReport> {
    let mut report = SweepReport::default();
    let dir = records_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(error) => return Err(error),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(record) = fs::read_to_string(&path)
            .ok()
            .as_deref()
            .and_then(VmRecord::parse)
        else {
            // A record being written has a temporary name; anything else unreadable goes.
            if !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                let _ = fs::remove_file(&path);
            }
            continue;
        };
        if record.owner.is_some_and(owner_runs_elsewhere) {
            continue; // another live worker's VM, not a leftover
        }
        if let (Some(pid), Some(ticks)) = (record.pid, record.start_ticks) {
            // Only the very process that was recorded: same pid and same start time.
            if process_start_ticks(pid) == Some(ticks) {
                if let Some(group) = Pid::from_raw(pid as i32) {
                    let _ = kill_process_group(group, Signal::KILL);
                    report.killed.push(pid);
                }
            }
        }
        if let Some(uid) = record.uid.filter(|uid| *uid != 0) {
            // A user of the VM range: nothing but that VM's QEMU ran as it.
            crate::sandbox::ids::kill_processes_of(uid);
            report.freed_ids.push(uid);
        }
        for group in &record.cgroups {
            // Only groups this crate names; a non-empty group cannot be removed anyway.
            let ours = group
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(GROUP_PREFIX));
            if ours && group.exists() && remove_group(group, Duration::from_secs(2)) {
                report.removed_cgroups.push(group.clone());
            }
        }
        if let Some(name) = record.netns.as_deref() {
            // Only namespaces this crate names.
            if name.starts_with(NAMESPACE_PREFIX)
                && !name.contains('/')
                && namespace_path(name).exists()
                && delete_namespace(name)
            {
                report.removed_namespaces.push(name.to_owned());
            }
        }
        if !report.removed_namespaces.is_empty() {
            crate::network::egress::tidy_host();
        }
        if record.runtime_dir.exists() && fs::remove_dir_all(&record.runtime_dir).is_ok() {
            report.removed_dirs.push(record.runtime_dir.clone());
        }
        fs::remove_file(&path)?;
        report.records += 1;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let record = VmRecord {
            name: "task-1".into(),
            pid: Some(42),
            start_ticks: Some(123_456),
            runtime_dir: "/run/taskvm/task-1".into(),
            cgroups: vec![
                "/sys/fs/cgroup/memory/taskvm-task-1".into(),
                "/sys/fs/cgroup/pids/taskvm-task-1".into(),
            ],
            netns: Some("taskvm-task-1".into()),
            owner: Some((42, 4242)),
            uid: Some(1_879_113_728),
        };
        assert_eq!(VmRecord::parse(&record.to_text()), Some(record));
    }

    #[test]
    fn the_vms_of_a_worker_that_still_runs_are_left_alone() {
        let state = tempfile::tempdir().unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let owner = (other.id(), process_start_ticks(other.id()).unwrap());
        let runtime = state.path().join("run-busy");
        fs::create_dir(&runtime).unwrap();
        let record = VmRecord {
            name: "busy".into(),
            pid: None,
            start_ticks: None,
            runtime_dir: runtime.clone(),
            cgroups: vec![],
            netns: None,
            owner: Some(owner),
            uid: None,
        };
        let file = RecordFile::write(state.path(), &record).unwrap();
        assert_eq!(sweep(state.path()).unwrap().records, 0, "its owner runs");
        assert!(runtime.exists());
        other.kill().unwrap();
        other.wait().unwrap();
        std::mem::forget(file);
        let report = sweep(state.path()).unwrap();
        assert_eq!(report.records, 1, "its owner is gone");
        assert!(!runtime.exists());
    }

    #[test]
    fn start_ticks_of_this_process() {
        let ticks = process_start_ticks(std::process::id()).unwrap();
        assert!(ticks > 0);
    }

    #[test]
    fn a_sweep_removes_dirs_and_records_but_never_a_reused_pid() {
        let state = tempfile::tempdir().unwrap();
        let runtime = state.path().join("run-x");
        fs::create_dir(&runtime).unwrap();
        let me = std::process::id();
        // A record naming this very process with a wrong start time: a reused pid.
        let record = VmRecord {
            name: "x".into(),
            pid: Some(me),
            start_ticks: Some(1),
            runtime_dir: runtime.clone(),
            cgroups: vec![],
            netns: None,
            owner: None,
            uid: None,
        };
        std::mem::forget(RecordFile::write(state.path(), &record).unwrap());
        let report = sweep(state.path()).unwrap();
        assert_eq!(
            report.killed,
            Vec::<u32>::new(),
            "not killed: the start time differs"
        );
        assert_eq!(report.removed_dirs, std::slice::from_ref(&runtime));
        assert!(!runtime.exists());
        assert_eq!(fs::read_dir(records_dir(state.path())).unwrap().count(), 0);
    }
}
