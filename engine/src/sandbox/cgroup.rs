//! Per-VM control groups: memory, CPU and pid limits for one QEMU, placed beneath the
//! worker's own group (so they nest under whatever confines the worker), on cgroup v2 or on
//! v1 controller hierarchies (hybrid hosts). QEMU joins its group between fork and exec,
//! before it has allocated anything or run a single guest instruction.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Prefix of every group this crate creates, so leftovers are recognisable.
pub const GROUP_PREFIX: &str = "taskvm-";

/// The controllers a VM's group limits.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Why per-VM groups cannot be used on this host.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// The host's cgroup layout could not be read.
    #[error("reading the cgroup layout: {0}")]
    Layout(io::Error),
    /// A controller is missing.
    #[error("no cgroup hierarchy offers the {0} controller to this process")]
    MissingController(&'static str),
    /// Creating or configuring a group failed (often: not root, or no delegation).
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The limits of one VM's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Most memory the VM's QEMU may use, in bytes (guest RAM plus QEMU's own).
    pub memory_bytes: u64,
    /// CPU time per period, in microseconds (the machine's vCPUs × the period).
    pub cpu_quota_us: u64,
    /// The period the quota applies to, in microseconds.
    pub cpu_period_us: u64,
    /// Most processes and threads.
    pub pids: u64,
}

impl CgroupLimits {
    /// Limits for a VM with `memory_mib` of guest RAM and `cpus` vCPUs: QEMU's own overhead
    /// (its code, device models, TCG's translation cache, block I/O threads) comes on top.
    pub fn for_machine(memory_mib: u64, cpus: u64) -> Self {
        let guest = memory_mib << 20;
        let overhead = (512u64 << 20).max(guest / 4);
        let period = 100_000;
        CgroupLimits {
            memory_bytes: guest + overhead,
            cpu_quota_us: cpus.max(1) * period,
            cpu_period_us: period,
            pids: 256 + 4 * cpus,
        }
    }
}

/// The host's cgroup layout, as seen from the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupHost {
    /// Unified hierarchy: one directory, the worker's own group.
    V2 {
        /// The worker's group.
        parent: PathBuf,
    },
    /// Controller hierarchies: the worker's group in each, for memory, cpu and pids.
    V1 {
        /// `(controller, the worker's group in that controller's hierarchy)`.
        parents: Vec<(&'static str, PathBuf)>,
    },
}

impl CgroupHost {
    /// Reads the layout from `/proc/self/mountinfo` and `/proc/self/cgroup`. Prefers v1
    /// hierarchies when they hold the controllers (a hybrid host's v2 tree has none).
    pub fn detect() -> Result<Self, CgroupError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Layout)?;
        let membership = fs::read_to_string("/proc/self/cgroup").map_err(CgroupError::Layout)?;
        let host = Self::from_tables(&mountinfo, &membership)?;
        host.check_writable()?;
        Ok(host)
    }

    /// The layout described by a mountinfo table and a process's cgroup membership.
    pub fn from_tables(mountinfo: &str, membership: &str) -> Result<Self, CgroupError> {
        let mounts = parse_mounts(mountinfo);
        let groups = parse_membership(membership);
        let mut parents = Vec::new();
        for controller in CONTROLLERS {
            let mount = mounts
                .iter()
                .find(|m| !m.unified && m.controllers.iter().any(|c| c == controller));
            let group = groups
                .iter()
                .find(|g| g.controllers.iter().any(|c| c == controller));
            if let (Some(mount), Some(group)) = (mount, group) {
                parents.push((controller, mount.group_dir(&group.path)));
            }
        }
        if parents.len() == CONTROLLERS.len() {
            return Ok(CgroupHost::V1 { parents });
        }
        let unified = mounts.iter().find(|m| m.unified);
        let group = groups.iter().find(|g| g.hierarchy == "0");
        match (unified, group) {
            (Some(mount), Some(group)) => {
                let parent = mount.group_dir(&group.path);
                let offered = fs::read_to_string(parent.join("cgroup.controllers"))
                    .map_err(io_error("reading", &parent))?;
                if let Some(missing) = CONTROLLERS
                    .into_iter()
                    .find(|c| !offered.split_whitespace().any(|o| o == *c))
                {
                    return Err(CgroupError::MissingController(missing));
                }
                Ok(CgroupHost::V2 { parent })
            }
            _ => Err(CgroupError::MissingController(
                CONTROLLERS
                    .into_iter()
                    .find(|c| !parents.iter().any(|(p, _)| p == c))
                    .unwrap_or("memory"),
            )),
        }
    }

    /// Fails unless this process may create groups beneath its own.
    fn check_writable(&self) -> Result<(), CgroupError> {
        for parent in self.parent_dirs() {
            rustix::fs::access(parent, rustix::fs::Access::WRITE_OK)
                .map_err(|errno| io_error("creating groups in", parent)(errno.into()))?;
        }
        Ok(())
    }

    fn parent_dirs(&self) -> Vec<&Path> {
        match self {
            CgroupHost::V2 { parent } => vec![parent.as_path()],
            CgroupHost::V1 { parents } => parents.iter().map(|(_, p)| p.as_path()).collect(),
        }
    }

    /// Creates the group for VM `name` with `limits`.
    pub fn create(&self, name: &str, limits: CgroupLimits) -> Result<VmCgroup, CgroupError> {
        let leaf = format!("{GROUP_PREFIX}{name}");
        let mut group = VmCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        match self {
            CgroupHost::V2 { parent } => {
                enable_v2_controllers(parent)?;
                let dir = group.make(parent.join(&leaf))?;
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                // No swap beyond the limit: guest RAM swapped out silently is worse than a
                // clear out-of-memory kill.
                let _ = write(&dir.join("memory.swap.max"), "0");
                write(
                    &dir.join("cpu.max"),
                    &format!("{} {}", limits.cpu_quota_us, limits.cpu_period_us),
                )?;
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
            }
            CgroupHost::V1 { parents } => {
                for (controller, parent) in parents {
                    let dir = group.make(parent.join(&leaf))?;
                    match *controller {
                        "memory" => write(
                            &dir.join("memory.limit_in_bytes"),
                            &limits.memory_bytes.to_string(),
                        )?,
                        "cpu" => {
                            write(
                                &dir.join("cpu.cfs_period_us"),
                                &limits.cpu_period_us.to_string(),
                            )?;
                            write(
                                &dir.join("cpu.cfs_quota_us"),
                                &limits.cpu_quota_us.to_string(),
                            )?;
                        }
                        _ => write(&dir.join("pids.max"), &limits.pids.to_string())?,
                    }
                }
            }
        }
        for dir in group.dirs.clone() {
            let path = dir.join("cgroup.procs");
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_error("opening", &path))?;
            group.procs.push(file);
        }
        Ok(group)
    }
}

/// On v2, a group's limits only apply when its parent hands the controllers down.
fn enable_v2_controllers(parent: &Path) -> Result<(), CgroupError> {
    let control = parent.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&control).map_err(io_error("reading", &control))?;
    for controller in CONTROLLERS {
        if !enabled.split_whitespace().any(|c| c == controller) {
            write(&control, &format!("+{controller}"))?;
        }
    }
    Ok(())
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_error("writing", path))
}

/// One VM's group (a directory per hierarchy), removed on drop once its processes are gone.
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<File>,
}

impl VmCgroup {
    fn make(&mut self, dir: PathBuf) -> Result<PathBuf, CgroupError> {
        // An existing group belongs to another VM of the same name, or is a leftover that the
        // start-up sweep should have removed: either way, not ours to take.
        fs::create_dir(&dir).map_err(io_error("creating", &dir))?;
        self.dirs.push(dir.clone());
        Ok(dir)
    }

    /// A handle for a child process to join the group with (the directories stay owned by
    /// `self`; the copy only holds duplicated `cgroup.procs` descriptors).
    pub fn try_clone(&self) -> io::Result<VmCgroup> {
        Ok(VmCgroup {
            dirs: Vec::new(),
            procs: self
                .procs
                .iter()
                .map(File::try_clone)
                .collect::<io::Result<_>>()?,
        })
    }

    /// The group's directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves the calling process into the group by writing `0` to each `cgroup.procs`
    /// opened when the group was made. Async-signal-safe: meant for between fork and exec.
    pub fn join_self(&self) -> io::Result<()> {
        for mut file in &self.procs {
            file.write_all(b"0")?;
        }
        Ok(())
    }

    /// Whether process `pid` is in every one of the group's directories.
    pub fn contains(&self, pid: u32) -> bool {
        self.dirs.iter().all(|dir| {
            fs::read_to_string(dir.join("cgroup.procs"))
                .is_ok_and(|procs| procs.lines().any(|line| line == pid.to_string()))
        })
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        self.procs.clear();
        for dir in &self.dirs {
            remove_group(dir, Duration::from_secs(2));
        }
    }
}

/// Removes an empty group, waiting up to `patience` for killed processes to finish exiting.
pub fn remove_group(dir: &Path, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return true,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return false,
        }
    }
}

/// A line of `/proc/self/mountinfo` that mounts a cgroup hierarchy.
struct CgroupMount {
    root: String,
    mount_point: PathBuf,
    unified: bool,
    controllers: Vec<String>,
}

impl CgroupMount {
    /// The directory of group `path` (as named in `/proc/self/cgroup`) under this mount.
    fn group_dir(&self, path: &str) -> PathBuf {
        let relative = path
            .strip_prefix(self.root.as_str())
            .filter(|_| self.root != "/")
            .unwrap_or(path)
            .trim_start_matches('/');
        if relative.is_empty() {
            self.mount_point.clone()
        } else {
            self.mount_point.join(relative)
        }
    }
}

fn parse_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split_whitespace().collect();
            let right: Vec<&str> = right.split_whitespace().collect();
            let fstype = *right.first()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            let options = right.get(2).copied().unwrap_or("");
            Some(CgroupMount {
                root: (*left.get(3)?).to_owned(),
                mount_point: PathBuf::from(unescape_octal(left.get(4)?)),
                unified: fstype == "cgroup2",
                controllers: options.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], code) {
            (b'\\', Some(code)) => {
                out.push(code);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A line of `/proc/self/cgroup`: `hierarchy:controllers:path`.
struct Membership {
    hierarchy: String,
    controllers: Vec<String>,
    path: String,
}

fn parse_membership(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let hierarchy = fields.next()?.to_owned();
            let controllers = fields.next()?;
            let path = fields.next()?.to_owned();
            Some(Membership {
                hierarchy,
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_hosts_use_each_controllers_hierarchy_below_the_workers_group() {
        let membership = "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/jobs\n0::/\n";
        let host = CgroupHost::from_tables(HYBRID_MOUNTS, membership).unwrap();
        assert_eq!(
            host,
            CgroupHost::V1 {
                parents: vec![
                    (
                        "memory",
                        PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
                    ),
                    ("cpu", PathBuf::from("/sys/fs/cgroup/cpu/jobs")),
                    ("pids", PathBuf::from("/sys/fs/cgroup/pids")),
                ]
            }
        );
    }

    #[test]
    fn a_v1_host_without_a_controller_falls_back_to_v2_and_says_what_is_missing() {
        let mounts = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let error = CgroupHost::from_tables(mounts, "4:memory:/\n").unwrap_err();
        assert!(
            matches!(error, CgroupError::MissingController("cpu")),
            "{error}"
        );
    }

    #[test]
    fn v2_groups_are_found_through_the_mount_root_and_need_the_controllers() {
        let scratch = tempfile::tempdir().unwrap();
        let worker = scratch.path().join("system.slice/taskvm.service");
        fs::create_dir_all(&worker).unwrap();
        let mount = scratch.path().display().to_string().replace(' ', "\\040");
        let mounts = format!("30 23 0:27 / {mount} rw - cgroup2 cgroup2 rw\n");
        let membership = "0::/system.slice/taskvm.service\n";

        fs::write(
            worker.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let host = CgroupHost::from_tables(&mounts, membership).unwrap();
        assert_eq!(
            host,
            CgroupHost::V2 {
                parent: worker.clone()
            }
        );

        fs::write(worker.join("cgroup.controllers"), "cpu io memory\n").unwrap();
        let error = CgroupHost::from_tables(&mounts, membership).unwrap_err();
        assert!(
            matches!(error, CgroupError::MissingController("pids")),
            "{error}"
        );
    }

    #[test]
    fn a_namespaced_mount_root_is_stripped_from_the_group_path() {
        let mount = CgroupMount {
            root: "/kubepods/pod1".into(),
            mount_point: "/sys/fs/cgroup".into(),
            unified: true,
            controllers: vec![],
        };
        assert_eq!(
            mount.group_dir("/kubepods/pod1/worker"),
            PathBuf::from("/sys/fs/cgroup/worker")
        );
        assert_eq!(mount.group_dir("/"), PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn limits_leave_room_for_qemu_and_scale_with_the_machine() {
        let small = CgroupLimits::for_machine(256, 1);
        assert_eq!(small.memory_bytes, (256 + 512) << 20);
        assert_eq!(
            (small.cpu_quota_us, small.cpu_period_us),
            (100_000, 100_000)
        );
        let big = CgroupLimits::for_machine(8192, 4);
        assert_eq!(big.memory_bytes, (8192 + 2048) << 20);
        assert_eq!(big.cpu_quota_us, 400_000);
        assert!(big.pids > small.pids);
    }

    #[test]
    fn octal_escapes_in_mount_points_are_decoded() {
        assert_eq!(unescape_octal("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_octal("/plain\\04"), "/plain\\04");
    }
}
