//! The jail one QEMU runs in: a mount namespace whose root is the VM's runtime directory, with
//! the host's `/usr` (read-only), a `/dev` of four or five device nodes, the boot files it
//! reads and nothing else (with guest RAM in a memory file, also a `/proc` that shows QEMU's
//! own processes only); a network namespace of its own with nothing in it (its tap is an
//! inherited descriptor); its own IPC and UTS namespaces.
//!
//! [`JailPlan`] is what the parent decides: the binds. [`JailPlan::prepare`] makes every mount
//! point (as root, in the root-owned runtime directory, before QEMU exists) and turns the plan
//! into C strings, so that [`PreparedJail::enter`], run in the child between fork and exec,
//! makes only system calls: unshare, mounts, `pivot_root`, unmount of the old root.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

/// Top-level names of the host that lead to programs and libraries (often symbolic links into
/// `/usr` on merged-`/usr` systems), reproduced in the jail.
const SYSTEM_TOP_LEVEL: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// The device nodes every QEMU gets.
const DEVICES: [&str; 4] = ["null", "zero", "random", "urandom"];

/// How the engine jails a VM's QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSettings {
    /// Where each VM's user and group come from.
    pub ids: crate::sandbox::ids::IdRange,
    /// Where held ids are locked ([`crate::sandbox::ids::LOCK_DIR`] unless a test says otherwise).
    pub id_locks: PathBuf,
    /// Whether QEMU gets namespaces of its own with the runtime directory as its root; false
    /// only where the configuration accepts weaker isolation on a host that cannot make them.
    pub namespaces: bool,
}

impl Default for JailSettings {
    /// A full jail with the configuration's default range (`sandbox.idRange`).
    fn default() -> Self {
        let range = schemas::config::IdRangeConfig::default();
        JailSettings::new(crate::sandbox::ids::IdRange {
            first: range.first,
            count: range.count,
        })
    }
}

impl JailSettings {
    /// A full jail with ids from `ids`, locked host-wide.
    pub fn new(ids: crate::sandbox::ids::IdRange) -> JailSettings {
        JailSettings {
            ids,
            id_locks: PathBuf::from(crate::sandbox::ids::LOCK_DIR),
            namespaces: true,
        }
    }
}

/// What a bind makes visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BindKind {
    /// A directory of programs and libraries: read-only, no set-uid, no devices.
    System,
    /// A device node: read-write, no set-uid, nothing executable.
    Device,
    /// A file QEMU reads (a kernel, an initrd): read-only, nothing else.
    ReadOnlyFile,
    /// The QEMU program outside `/usr`: read-only, executable.
    Program,
}

/// One host path mounted at a place in the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bind {
    source: PathBuf,
    /// Relative to the jail's root.
    target: PathBuf,
    kind: BindKind,
}

/// The binds of one jail; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPlan {
    root: PathBuf,
    binds: Vec<Bind>,
    /// Top-level symbolic links to make (name, target), copied from the host's.
    links: Vec<(String, PathBuf)>,
    /// Whether the jail gets a `/proc` showing QEMU's own processes only.
    own_proc: bool,
}

impl JailPlan {
    /// The plan for a jail rooted at `root` (the VM's runtime directory): the host's `/usr` and
    /// its top-level library directories or links, and the basic device nodes.
    pub fn new(root: &Path) -> JailPlan {
        let mut plan = JailPlan {
            root: root.to_owned(),
            binds: vec![Bind {
                source: "/usr".into(),
                target: "usr".into(),
                kind: BindKind::System,
            }],
            links: Vec::new(),
            own_proc: false,
        };
        for name in SYSTEM_TOP_LEVEL {
            let host = Path::new("/").join(name);
            match fs::symlink_metadata(&host) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    if let Ok(target) = fs::read_link(&host) {
                        plan.links.push((name.to_owned(), target));
                    }
                }
                Ok(meta) if meta.is_dir() => plan.binds.push(Bind {
                    source: host,
                    target: name.into(),
                    kind: BindKind::System,
                }),
                _ => {}
            }
        }
        for device in DEVICES {
            plan.add_device(device);
        }
        plan
    }

    /// Adds `/dev/NAME` of the host (e.g. `kvm`).
    pub fn add_device(&mut self, name: &str) {
        self.binds.push(Bind {
            source: Path::new("/dev").join(name),
            target: Path::new("dev").join(name),
            kind: BindKind::Device,
        });
    }

    /// Shows the host file `source` read-only at `/TARGET` in the jail; returns the path QEMU
    /// sees.
    pub fn add_file(&mut self, source: &Path, target: &str) -> String {
        self.binds.push(Bind {
            source: source.to_owned(),
            target: target.into(),
            kind: BindKind::ReadOnlyFile,
        });
        format!("/{target}")
    }

    /// The path by which QEMU opens the memory file it inherits as descriptor `fd`:
    /// `/proc/self/fd/FD`, for which the jail gets a `/proc` of its own that shows only the
    /// processes of QEMU's user and nothing but them (`hidepid=invisible,subset=pid`). A memory
    /// file cannot be bound into a mount namespace, and QEMU 7.2 opens a RAM backend's path
    /// itself, so a descriptor alone does not do.
    pub fn add_memory_file(&mut self, fd: i32) -> String {
        self.own_proc = true;
        format!("/proc/self/fd/{fd}")
    }

    /// The path, inside the jail, of the host program `program` (a name looked up in `PATH`,
    /// or a path), binding it at `/qemu` when it is not below a directory the jail shows.
    pub fn add_program(&mut self, program: &str) -> io::Result<String> {
        let path = fs::canonicalize(find_program(program)?)?;
        let shown = path.starts_with("/usr/")
            || self.binds.iter().any(|bind| {
                bind.kind == BindKind::System && path.starts_with(Path::new("/").join(&bind.target))
            });
        if shown {
            return Ok(path.display().to_string());
        }
        self.binds.push(Bind {
            source: path,
            target: "qemu".into(),
            kind: BindKind::Program,
        });
        Ok("/qemu".to_owned())
    }

    /// Makes every mount point and link in the (root-owned, still empty of them) jail directory
    /// and prepares what [`PreparedJail::enter`] needs, so that the child allocates nothing.
    pub fn prepare(&self) -> io::Result<PreparedJail> {
        let c = |path: &Path| {
            CString::new(path.as_os_str().as_bytes())
                .map_err(|_| io::Error::other(format!("{} holds a NUL byte", path.display())))
        };
        for (name, target) in &self.links {
            std::os::unix::fs::symlink(target, self.root.join(name))?;
        }
        let mut mounts = Vec::new();
        for bind in &self.binds {
            let target = self.root.join(&bind.target);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            let source_is_dir = fs::metadata(&bind.source)
                .map_err(|error| {
                    io::Error::new(error.kind(), format!("{}: {error}", bind.source.display()))
                })?
                .is_dir();
            if source_is_dir {
                fs::create_dir(&target)?;
            } else {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o444)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(&target)?;
            }
            let flags = match bind.kind {
                BindKind::System => MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
                BindKind::Device => MountFlags::NOSUID | MountFlags::NOEXEC,
                BindKind::ReadOnlyFile => {
                    MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC
                }
                BindKind::Program => MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
            };
            mounts.push((c(&bind.source)?, c(&target)?, flags));
        }
        let proc = if self.own_proc {
            let target = self.root.join("proc");
            fs::create_dir(&target)?;
            Some(c(&target)?)
        } else {
            None
        };
        Ok(PreparedJail {
            root: c(&self.root)?,
            mounts,
            proc,
        })
    }
}

/// A jail ready to be entered by a child process.
#[derive(Debug, Clone)]
pub struct PreparedJail {
    root: CString,
    mounts: Vec<(CString, CString, MountFlags)>,
    /// Where the jail's own `/proc` is mounted, if it has one.
    proc: Option<CString>,
}

impl PreparedJail {
    /// Enters the jail: new mount, network, IPC and UTS namespaces, the binds, then
    /// `pivot_root` into the jail and the old root detached. Call it in a single-threaded child
    /// (between fork and exec) that is still root; it makes system calls only.
    #[allow(unsafe_code)]
    pub fn enter(&self) -> io::Result<()> {
        use rustix::thread::UnshareFlags;
        let namespaces = UnshareFlags::NEWNS
            | UnshareFlags::NEWNET
            | UnshareFlags::NEWIPC
            | UnshareFlags::NEWUTS;
        // SAFETY: called in the single-threaded child between fork and exec, where no other
        // thread shares the file system context or namespaces being replaced.
        unsafe { rustix::thread::unshare_unsafe(namespaces) }?;
        // Nothing mounted here propagates back to the host.
        rustix::mount::mount_change(
            c"/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )?;
        // pivot_root needs the new root to be a mount point.
        rustix::mount::mount_bind(self.root.as_c_str(), self.root.as_c_str())?;
        for (source, target, flags) in &self.mounts {
            rustix::mount::mount_bind(source.as_c_str(), target.as_c_str())?;
            rustix::mount::mount_remount(target.as_c_str(), MountFlags::BIND | *flags, c"")?;
        }
        if let Some(proc) = &self.proc {
            rustix::mount::mount(
                c"proc",
                proc.as_c_str(),
                c"proc",
                MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                c"hidepid=invisible,subset=pid",
            )?;
        }
        rustix::process::chdir(self.root.as_c_str())?;
        // The old root ends up stacked on the new one; detaching it leaves only the jail.
        rustix::process::pivot_root(c".", c".")?;
        rustix::mount::unmount(c".", UnmountFlags::DETACH)?;
        rustix::process::chdir(c"/")?;
        Ok(())
    }
}

/// Whether this host lets the worker make the namespaces and mounts a jail needs: a child
/// tries `unshare` of them and a private remount, then exits.
pub fn check_namespaces() -> io::Result<()> {
    let mut command = std::process::Command::new("/bin/true");
    command.env_clear();
    // SAFETY: the closure makes system calls only (see `PreparedJail::enter`).
    #[allow(unsafe_code)]
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            use rustix::thread::UnshareFlags;
            rustix::thread::unshare_unsafe(
                UnshareFlags::NEWNS | UnshareFlags::NEWNET | UnshareFlags::NEWIPC,
            )?;
            rustix::mount::mount_change(
                c"/",
                MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
            )?;
            Ok(())
        });
    }
    let status = command.status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "a child could not enter new mount and network namespaces ({status})"
        )))
    }
}

/// `program` as an absolute path: itself when it holds a slash, else the first match in `PATH`.
pub fn find_program(program: &str) -> io::Result<PathBuf> {
    if program.contains('/') {
        return std::path::absolute(program);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{program} is not in PATH")))
}
