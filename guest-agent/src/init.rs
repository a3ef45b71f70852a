//! The agent as PID 1 of a minimal image: mount the kernel file systems, load the modules the
//! image lists, configure the network from the kernel command line, run the agent as a child,
//! reap orphans, and power off.

use std::ffi::CStr;
use std::fs;
use std::io;
use std::process::Command;
use std::time::{Duration, Instant};

use protocol::kernel_parameter;
use rustix::mount::{mount, MountFlags};

use crate::kernel_cmdline::parameter;
use crate::netlink::{interface_index, Ipv4Cidr, Netlink};

/// Address given to the guest's interface when the command line names none.
pub const DEFAULT_ADDRESS: &str = "169.254.0.2/16";
/// Kernel command-line parameter with the guest's address (`taskvm.ip=A.B.C.D/N`).
const ADDRESS_PARAMETER: &str = kernel_parameter::ADDRESS;
/// Kernel command-line parameter with the default gateway (`taskvm.gw=A.B.C.D`), given only
/// when the VM has egress; without it the guest has no route off its link.
const GATEWAY_PARAMETER: &str = kernel_parameter::GATEWAY;
/// Kernel command-line parameter overriding the metadata service URL.
const METADATA_PARAMETER: &str = kernel_parameter::METADATA;

/// Runs as init; never returns.
pub fn run(metadata_url: &str) -> ! {
    let early_cmdline = read_cmdline_early();
    if crate::stage1::wanted() {
        if let Err(error) = crate::stage1::switch_root(&early_cmdline) {
            eprintln!("taskvm-agent: stage 1 failed: {error}");
            power_off();
        }
    }
    if let Err(error) = mount_kernel_file_systems() {
        eprintln!("taskvm-agent: mounting kernel file systems: {error}");
    }
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let debug = cmdline
        .split_whitespace()
        .any(|word| word == "taskvm.debug");
    trace(debug, "mounted");
    load_listed_modules();
    let address = parameter(&cmdline, ADDRESS_PARAMETER).unwrap_or(DEFAULT_ADDRESS);
    let gateway = parameter(&cmdline, GATEWAY_PARAMETER);
    if let Err(error) = configure_network(address, gateway) {
        eprintln!("taskvm-agent: network: {error}");
    }
    trace(debug, "network configured");
    let url = parameter(&cmdline, METADATA_PARAMETER)
        .unwrap_or(metadata_url)
        .to_owned();
    let agent = Command::new("/proc/self/exe")
        .arg("--child")
        .arg(&url)
        .spawn();
    match agent {
        Ok(child) => reap_until(child.id()),
        Err(error) => eprintln!("taskvm-agent: cannot start the agent: {error}"),
    }
    power_off()
}

/// The kernel command line before /proc is mounted (mounts it briefly when needed).
fn read_cmdline_early() -> String {
    if let Ok(cmdline) = fs::read_to_string("/proc/cmdline") {
        return cmdline;
    }
    let _ = fs::create_dir_all("/proc");
    let mounted = mount("proc", "/proc", "proc", MountFlags::empty(), None).is_ok();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if mounted {
        let _ = rustix::mount::unmount("/proc", rustix::mount::UnmountFlags::DETACH);
    }
    cmdline
}

/// With `taskvm.debug` on the kernel command line: a line with the guest's uptime.
fn trace(debug: bool, stage: &str) {
    if debug {
        let uptime = fs::read_to_string("/proc/uptime").unwrap_or_default();
        let seconds = uptime.split_whitespace().next().unwrap_or("?");
        println!("taskvm-agent: debug: {stage} at uptime {seconds} s");
    }
}

fn mount_kernel_file_systems() -> io::Result<()> {
    let quiet = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let table: [(&str, &str, &str, MountFlags, Option<&CStr>); 6] = [
        ("proc", "/proc", "proc", quiet, None),
        ("sysfs", "/sys", "sysfs", quiet, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MountFlags::NOSUID,
            Some(c"mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            Some(c"ptmxmode=0666,mode=0620"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(c"mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(c"mode=0755"),
        ),
    ];
    for (source, target, kind, flags, data) in table {
        let _ = fs::create_dir_all(target);
        match mount(source, target, kind, flags, data) {
            Ok(()) | Err(rustix::io::Errno::BUSY) => {}
            Err(error) => eprintln!("taskvm-agent: mount {target}: {error}"),
        }
    }
    Ok(())
}

fn load_listed_modules() {
    if let Ok(list) = fs::read_to_string(crate::stage1::MODULES) {
        crate::stage1::load_modules(&list);
    }
}

fn configure_network(address: &str, gateway: Option<&str>) -> io::Result<()> {
    let cidr: Ipv4Cidr = address.parse()?;
    let gateway: Option<std::net::Ipv4Addr> = match gateway {
        Some(text) => Some(text.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not an IPv4 gateway: {text:?}"),
            )
        })?),
        None => None,
    };
    let mut netlink = Netlink::open()?;
    netlink.link_up(interface_index("lo")?)?;
    let interface = wait_for_interface(Duration::from_secs(5))?;
    let index = interface_index(&interface)?;
    netlink.add_address(index, cidr)?;
    netlink.link_up(index)?;
    match gateway {
        Some(gateway) => {
            netlink.add_default_route(index, gateway)?;
            // The gateway (the metadata address) also answers DNS when there is egress.
            if let Err(error) = fs::write("/etc/resolv.conf", format!("nameserver {gateway}\n")) {
                eprintln!("taskvm-agent: /etc/resolv.conf: {error}");
            }
            Ok(())
        }
        None => Ok(()),
    }
}

fn wait_for_interface(timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entries) = fs::read_dir("/sys/class/net") {
            let mut names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name != "lo")
                .collect();
            names.sort();
            if let Some(first) = names.into_iter().next() {
                return Ok(first);
            }
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no network interface appeared",
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reaps every child (orphans are re-parented to init) until the agent itself exits.
fn reap_until(agent: u32) {
    loop {
        match rustix::process::wait(rustix::process::WaitOptions::empty()) {
            Ok(Some((pid, _))) if pid.as_raw_nonzero().get() as u32 == agent => return,
            Ok(_) => {}
            Err(rustix::io::Errno::CHILD) => return,
            Err(_) => {}
        }
    }
}

/// Flushes file systems and powers the VM off.
pub fn power_off() -> ! {
    rustix::fs::sync();
    if rustix::process::getpid().is_init() {
        let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    } else {
        let _ = Command::new("poweroff").status();
    }
    std::process::exit(0)
}
