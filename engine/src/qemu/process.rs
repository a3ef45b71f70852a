//! The QEMU process: started already as the unprivileged user (not with `-runas`, which
//! together with `-sandbox elevateprivileges=deny` dies with SIGSYS), in its own process
//! group, killed by the kernel if the worker dies, and killed and reaped when dropped.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::Stdio;

use rustix::process::{kill_process_group, Gid, Pid, Resource, Rlimit, Signal, Uid};
use tokio::process::{Child, Command};

use crate::sandbox::cgroup::VmCgroup;
use crate::sandbox::jail::PreparedJail;

/// QEMU's open-file limit: its disks, sockets and event descriptors, with room to spare.
const OPEN_FILES: u64 = 4096;
/// QEMU's process and thread limit when it has a user of its own (`RLIMIT_NPROC` counts
/// per user): vCPUs, I/O and worker threads, with room to spare.
pub const PROCESSES_PER_VM: u64 = 1024;

/// A running QEMU.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    pid: u32,
}

/// How the QEMU process is confined besides its control group: the user it runs as (plus
/// extra groups), the largest file it may write and the jail it enters.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// The user QEMU drops to before exec (None: it stays the worker's).
    pub run_as: Option<RunAs>,
    /// Supplementary groups besides the user's (the group owning `/dev/kvm` under KVM).
    pub extra_groups: Vec<u32>,
    /// `RLIMIT_FSIZE`: no file QEMU writes (its overlay, serial console, messages) may grow
    /// past this many bytes; QEMU is killed with SIGXFSZ when one would.
    pub max_file_size: Option<u64>,
    /// The jail QEMU enters before it drops privileges (None: the host's namespaces).
    pub jail: Option<PreparedJail>,
    /// `RLIMIT_NPROC`: processes and threads of QEMU's user (only meaningful when the user
    /// is QEMU's alone).
    pub max_processes: Option<u64>,
}

/// Who QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl QemuProcess {
    /// Starts `program` with `args` and an empty environment; standard error goes to
    /// `stderr` (a file root made). With a jail in `confinement`, the child enters it (and
    /// `program` is a path inside it); with a user, it drops to it (plus its extra groups)
    /// before exec; with `cgroup`, it joins that group first, while still privileged enough
    /// to. Each of `inherit` stays open in QEMU under the same number (for `-netdev tap,fd=N`,
    /// `-incoming fd:N`, `-add-fd`); every other descriptor is closed at exec.
    #[allow(unsafe_code)]
    pub fn spawn(
        program: &str,
        args: &[String],
        confinement: &Confinement,
        cgroup: Option<&VmCgroup>,
        inherit: &[BorrowedFd<'_>],
        stderr: File,
    ) -> io::Result<Self> {
        let run_as = confinement.run_as;
        let jail = confinement.jail.clone();
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true);
        // Everything the child needs is made here, before fork: it must not allocate.
        let cgroup = cgroup.map(VmCgroup::try_clone).transpose()?;
        let credentials = run_as.map(|user| {
            let groups: Vec<Gid> = confinement
                .extra_groups
                .iter()
                .map(|&g| Gid::from_raw(g))
                .collect();
            (Uid::from_raw(user.uid), Gid::from_raw(user.gid), groups)
        });
        let parent = rustix::process::getpid();
        let inherit: Vec<i32> = inherit.iter().map(|fd| fd.as_raw_fd()).collect();
        // Never above what the worker itself may have: an unprivileged child cannot raise it.
        let ceiling = rustix::process::getrlimit(Resource::Nofile)
            .maximum
            .map_or(OPEN_FILES, |hard| hard.min(OPEN_FILES));
        let open_files = Rlimit {
            current: Some(ceiling),
            maximum: Some(ceiling),
        };
        let file_size = confinement.max_file_size.map(|bytes| Rlimit {
            current: Some(bytes),
            maximum: Some(bytes),
        });
        let processes = confinement.max_processes.map(|count| Rlimit {
            current: Some(count),
            maximum: Some(count),
        });
        // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
        // (close_range, fcntl, write, unshare, mount, pivot_root, setgroups, setresgid,
        // setresuid, setrlimit, prctl, getppid) on data prepared before fork.
        unsafe {
            command.pre_exec(move || {
                // No descriptor the worker holds reaches QEMU unless it was named.
                if libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                for &fd in &inherit {
                    // SAFETY: the descriptor is open: the caller's borrow outlives spawn().
                    let fd = BorrowedFd::borrow_raw(fd);
                    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                }
                if let Some(cgroup) = &cgroup {
                    cgroup.join_self()?;
                }
                if let Some(jail) = &jail {
                    jail.enter()?;
                }
                if let Some((uid, gid, groups)) = &credentials {
                    rustix::thread::set_thread_groups(groups)?;
                    rustix::thread::set_thread_res_gid(*gid, *gid, *gid)?;
                    rustix::thread::set_thread_res_uid(*uid, *uid, *uid)?;
                }
                // A crashing QEMU must not write the guest's memory to a core file.
                let no_core = Rlimit {
                    current: Some(0),
                    maximum: Some(0),
                };
                rustix::process::setrlimit(Resource::Core, no_core)?;
                rustix::process::setrlimit(Resource::Nofile, open_files)?;
                if let Some(processes) = &processes {
                    rustix::process::setrlimit(Resource::Nproc, *processes)?;
                }
                rustix::thread::set_no_new_privs(true)?;
                if let Some(file_size) = &file_size {
                    rustix::process::setrlimit(Resource::Fsize, *file_size)?;
                }
                // After the uid change, which would clear it.
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
                if rustix::process::getppid() != Some(parent) {
                    return Err(io::Error::other(
                        "the worker exited while QEMU was starting",
                    ));
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("QEMU exited before its pid was known"))?;
        Ok(QemuProcess { child, pid })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for QEMU to exit.
    pub async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }

    /// Whether it has exited, without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// Sends SIGKILL to QEMU's process group.
    pub fn kill(&self) {
        if let Some(group) = Pid::from_raw(self.pid as i32) {
            let _ = kill_process_group(group, Signal::KILL);
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// The uid and gid of `user` (a name from `/etc/passwd`, or a number).
pub fn lookup_user(user: &str) -> io::Result<RunAs> {
    if let Ok(uid) = user.parse::<u32>() {
        return Ok(RunAs { uid, gid: uid });
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() >= 4 && fields[0] == user)
        .and_then(|fields| {
            Some(RunAs {
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
            })
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no user {user:?} in /etc/passwd"),
            )
        })
}
