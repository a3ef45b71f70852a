//! A network namespace of one VM's own (`taskvm-NAME`, visible in `ip netns list`) and the
//! tap device in it. The worker opens the tap inside the namespace and hands its descriptor to
//! the unprivileged QEMU, which could not open `/dev/net/tun` itself. The namespace is deleted
//! when dropped; a non-persistent tap disappears with its last descriptor.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// Prefix of every namespace this crate creates, so leftovers are recognisable.
pub const NAMESPACE_PREFIX: &str = "taskvm-";
/// The tap device's name inside each namespace.
pub const TAP_NAME: &str = "tap0";
/// Where `ip netns` keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Why a VM's network could not be made.
#[derive(Debug, Error)]
pub enum NetworkError {
    /// The worker may not create network namespaces.
    #[error(
        "an isolated VM network needs root or CAP_NET_ADMIN (and CAP_SYS_ADMIN for named \
         namespaces); this worker runs as uid {uid} without them"
    )]
    Privileges {
        /// The worker's effective uid.
        uid: u32,
    },
    /// `ip` failed.
    #[error("`ip {args}` failed: {stderr}")]
    Command {
        /// Its arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
    /// A system call failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The cause.
        source: io::Error,
    },
}

fn io_error(action: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
    let action = action.into();
    move |source| NetworkError::Io { action, source }
}

/// Fails, naming what is needed, unless this process may create network namespaces.
pub fn check_privileges() -> Result<(), NetworkError> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_NET_ADMIN: u32 = 12;
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_NET_ADMIN) && has(CAP_SYS_ADMIN) {
        Ok(())
    } else {
        Err(NetworkError::Privileges { uid: uid.as_raw() })
    }
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates `taskvm-SUFFIX` with its loopback up, IPv6 off and forwarding off.
    pub fn create(suffix: &str) -> Result<Self, NetworkError> {
        let name = namespace_name(suffix);
        run_ip(&["netns", "add", &name])?;
        let namespace = Namespace { name };
        namespace.run_inside(|| {
            // Nothing is routed through a VM's namespace, and no IPv6 link-local paths exist.
            for (path, value) in [
                ("/proc/sys/net/ipv4/ip_forward", "0"),
                ("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"),
                ("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1"),
            ] {
                if Path::new(path).exists() {
                    std::fs::write(path, value)?;
                }
            }
            Ok(())
        })?;
        namespace.ip(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// The namespace's name (`taskvm-…`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<(), NetworkError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// Runs several `ip` commands (one per line, without `ip`) inside the namespace in one
    /// process (`ip -batch`), stopping at the first that fails.
    pub fn ip_batch(&self, commands: &[String]) -> Result<(), NetworkError> {
        let script = commands.join("\n") + "\n";
        let mut command = Command::new("ip");
        command.args(["-n", &self.name, "-batch", "-"]);
        run_with_input(&mut command, &script, "ip (iproute2)").map_err(|stderr| {
            NetworkError::Command {
                args: format!("-n {} -batch - <<< {script:?}", self.name),
                stderr,
            }
        })
    }

    /// Runs `work` on a thread that has entered the namespace: sockets and taps it opens
    /// belong to the namespace for good, whichever thread uses them afterwards.
    pub fn run_inside<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, NetworkError> {
        let path = namespace_path(&self.name);
        let action = format!("inside network namespace {}", self.name);
        std::thread::spawn(move || {
            let namespace = File::open(&path)?;
            rustix::thread::move_into_link_name_space(
                namespace.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            work()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
        .map_err(io_error(action))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        delete_namespace(&self.name);
    }
}

/// The namespace name for VM `suffix`.
pub fn namespace_name(suffix: &str) -> String {
    format!("{NAMESPACE_PREFIX}{suffix}")
}

/// Where a named namespace is mounted.
pub fn namespace_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Deletes a named namespace (taps and sockets in it go with their last users); returns
/// whether it is gone.
pub fn delete_namespace(name: &str) -> bool {
    if !namespace_path(name).exists() {
        return true;
    }
    let _ = Command::new("ip").args(["netns", "del", name]).output();
    !namespace_path(name).exists()
}

/// Runs `ip ARGS` in the calling process's namespace.
pub(crate) fn run_ip(args: &[&str]) -> Result<(), NetworkError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(io_error("running ip (iproute2)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Command {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs `command` with `input` on its standard input. On failure, its standard error, or why
/// `program` could not run.
pub(crate) fn run_with_input(
    command: &mut Command,
    input: &str,
    program: &str,
) -> Result<(), String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot run {program}: {error}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|error| error.to_string())?;
    }
    let output = child
        .wait_with_output()
        .map_err(|error| error.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// Opens a new, non-persistent tap device `name` in the calling thread's namespace, with
/// virtio-net headers (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`).
#[allow(unsafe_code)]
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    const IFF_TAP: i16 = 0x0002;
    const IFF_NO_PI: i16 = 0x1000;
    const IFF_VNET_HDR: i16 = 0x4000;
    /// `_IOW('T', 202, int)`; the kernel reads a `struct ifreq` through the pointer.
    const TUNSETIFF: rustix::ioctl::Opcode = 0x4004_54ca;
    if name.is_empty() || name.len() > 15 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must have 1 to 15 bytes"),
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // struct ifreq: 16 bytes of name, then the flags (a short) at the start of a 24-byte union.
    let mut request = [0u8; 40];
    request[..name.len()].copy_from_slice(name.as_bytes());
    request[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq (40 bytes on Linux), which `request` is laid out as.
    unsafe {
        let setter = rustix::ioctl::Setter::<TUNSETIFF, [u8; 40]>::new(request);
        rustix::ioctl::ioctl(&tun, setter)?;
    }
    Ok(tun.into())
}
