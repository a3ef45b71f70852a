//! Stage 1, when the agent is init of an initramfs (`/etc/taskvm/stage1` exists): load the
//! drivers the kernel has as modules, mount the root disk named by `root=` and make it `/`,
//! all without starting another program — under TCG every program start costs tens of
//! milliseconds. Init then carries on in the new root.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::mount::{mount, mount_move, MountFlags};

/// Present in an initramfs whose init is this agent.
pub const MARKER: &str = "/etc/taskvm/stage1";
/// Modules to load, one `.ko` path per line; `pci:` before a path loads it only when the
/// machine has PCI devices.
pub(crate) const MODULES: &str = "/etc/taskvm/modules";
const NEW_ROOT: &str = "/newroot";

/// Whether this boot starts in a stage-1 initramfs.
pub fn wanted() -> bool {
    Path::new(MARKER).exists()
}

/// Loads the modules, mounts `root=` (ext4) and switches into it.
pub fn switch_root(cmdline: &str) -> io::Result<()> {
    let _ = fs::create_dir_all("/dev");
    let _ = mount("devtmpfs", "/dev", "devtmpfs", MountFlags::NOSUID, None);
    let _ = fs::create_dir_all("/sys");
    let _ = mount("sysfs", "/sys", "sysfs", MountFlags::empty(), None);
    load_modules(&fs::read_to_string(MODULES).unwrap_or_default());
    let device = crate::kernel_cmdline::parameter(cmdline, "root=").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no root= on the kernel command line",
        )
    })?;
    wait_for(Path::new(device), Duration::from_secs(10))?;
    fs::create_dir_all(NEW_ROOT)?;
    mount(device, NEW_ROOT, "ext4", MountFlags::empty(), None)
        .map_err(|error| io::Error::other(format!("mount {device}: {error}")))?;
    let _ = rustix::mount::unmount("/sys", rustix::mount::UnmountFlags::DETACH);
    mount_move("/dev", format!("{NEW_ROOT}/dev"))?;
    std::env::set_current_dir(NEW_ROOT)?;
    mount_move(".", "/")?;
    rustix::process::chroot(".")?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// Loads the modules `list` names (see [`MODULES`] for the format), skipping loaded ones.
pub(crate) fn load_modules(list: &str) {
    let has_pci =
        fs::read_dir("/sys/bus/pci/devices").is_ok_and(|mut entries| entries.next().is_some());
    for line in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (pci_only, path) = match line.strip_prefix("pci:") {
            Some(path) => (true, path.trim()),
            None => (false, line),
        };
        if pci_only && !has_pci {
            continue;
        }
        let loaded = fs::File::open(path).and_then(|module| {
            rustix::system::finit_module(&module, c"", 0).map_err(io::Error::from)
        });
        match loaded {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(rustix::io::Errno::EXIST.raw_os_error()) => {
            }
            Err(error) => eprintln!("taskvm-agent: module {path}: {error}"),
        }
    }
}

fn wait_for(device: &Path, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    while !device.exists() {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} did not appear", device.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}
