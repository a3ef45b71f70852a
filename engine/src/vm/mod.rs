//! A `VirtualMachine` owns everything one VM uses — the image lease, its runtime directory
//! and overlay, the QEMU process and the QMP connection — and releases all of it when dropped:
//! QEMU's process group is killed and the directory removed.
//!
//! # Layout
//! - [`mutable`]: [`mutable::MutableImage`], a VM booted to be changed and packaged.

pub mod mutable;

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::disk::drives::{BootSource, ExtraDrive};
use crate::network::metadata::Handler;
use crate::network::netns::NetworkError;
use crate::network::{NetworkSettings, VmNetwork};
use crate::qemu::cmdline::{Accelerator, CmdlineError, Netdev};
use crate::qemu::process::{QemuProcess, RunAs};
use crate::qemu::qmp::Qmp;
use crate::qemu::screenshot::{Screen, ScreenshotError};
use crate::sandbox::cgroup::{CgroupHost, VmCgroup};
use crate::sandbox::ids::VmIds;
use crate::sandbox::jail::JailSettings;
use crate::sandbox::records::RecordFile;
use crate::sandbox::runtime::{RuntimeDir, VncEndpoint};

/// Most bytes of a log returned by [`VirtualMachine::serial_output`].
pub(crate) const LOG_LIMIT: u64 = 4 << 20;

/// Host-side settings of a VM.
#[derive(Debug, Clone)]
pub struct VmSettings {
    /// Directory under which the VM's runtime directory is made.
    pub runtime_parent: PathBuf,
    /// Unique name of the VM (becomes the runtime directory's and QEMU process's name).
    pub name: String,
    /// Accelerator.
    pub accelerator: Accelerator,
    /// The jail: a user and group of the VM's own and (normally) namespaces whose root is the
    /// runtime directory. None: QEMU runs as `run_as` in the host's namespaces.
    pub jail: Option<JailSettings>,
    /// The user QEMU runs as without a jail (None: as the worker itself).
    pub run_as: Option<RunAs>,
    /// Network backend when `network` is None.
    pub netdev: Netdev,
    /// The QEMU binary.
    pub qemu: String,
    /// The host's TSC frequency for `tsc_early_khz=`.
    pub tsc_khz: Option<u64>,
    /// How long QEMU may take to open its QMP socket.
    pub start_timeout: Duration,
    /// Where the VM's record goes, for the crash-recovery sweep (None: no record).
    pub state_dir: Option<PathBuf>,
    /// The host's control groups, for per-VM limits (None: no limits; see
    /// [`CgroupHost::detect`] for why a host may have none).
    pub cgroups: Option<CgroupHost>,
    /// An isolated network with a metadata service (replaces `netdev`); None: `netdev`.
    pub network: Option<NetworkSettings>,
    /// Drives besides the root disk (a cloud-init seed, an installer ISO).
    pub drives: Vec<ExtraDrive>,
    /// The largest file QEMU may write (overlay, serial console, messages); past it QEMU is
    /// killed and the VM ends as [`ExitKind::FileTooLarge`]. None: no bound.
    pub max_file_size: Option<u64>,
    /// The largest serial console log; a VM whose console passes it is stopped
    /// ([`ExitKind::FileTooLarge`] with [`FileBound::Console`]). None: only `max_file_size`.
    pub max_console_size: Option<u64>,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// The guest powered itself off.
    PoweredOff,
    /// The guest rebooted (QEMU runs with `-no-reboot`, so that ends it too).
    Rebooted,
    /// The guest kernel panicked.
    Panicked,
    /// [`VirtualMachine::kill`] ended it.
    Killed,
    /// The VM was stopped because a file QEMU writes reached its bound: the guest filled its
    /// disk overlay or its serial console (found by [`VirtualMachine::wait`]'s watch, or
    /// QEMU killed by SIGXFSZ).
    FileTooLarge {
        /// Which file: "disk overlay", "serial console" or "QEMU's messages".
        file: &'static str,
        /// Which bound it reached.
        bound: FileBound,
        /// The bound, in bytes.
        limit: u64,
    },
    /// QEMU ended for another reason (a crash, a signal from elsewhere).
    Crashed {
        /// QEMU's exit status, as text.
        status: String,
        /// The last lines of QEMU's standard error.
        stderr_tail: String,
    },
}

/// The bounds on the files a VM's QEMU writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileBound {
    /// [`VmSettings::max_file_size`], any file.
    FileSize,
    /// [`VmSettings::max_console_size`], the serial console.
    Console,
}

/// How often [`VirtualMachine::wait`] looks at the sizes of the VM's files.
const FILE_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Why a VM could not be started or driven.
#[derive(Debug, Error)]
pub enum VmError {
    /// The machine's devices do not fit together.
    #[error(transparent)]
    Machine(#[from] CmdlineError),
    /// Setting up the runtime directory or overlay failed.
    #[error("preparing the VM: {0}")]
    Setup(io::Error),
    /// QEMU did not start.
    #[error("QEMU did not start: {reason}\nQEMU said:\n{stderr_tail}\nargv: {argv}")]
    Start {
        /// What went wrong.
        reason: String,
        /// The last lines of QEMU's standard error.
        stderr_tail: String,
        /// The command line, for reproducing it by hand.
        argv: String,
    },
    /// The VM's network could not be made.
    #[error("VM network: {0}")]
    Network(#[from] NetworkError),
    /// A QMP command failed.
    #[error("QMP: {0}")]
    Qmp(io::Error),
    /// Saving or loading a snapshot failed.
    #[error("snapshot: {0}")]
    Snapshot(String),
}

/// One running VM. Fields drop in order: QEMU is killed before its directory is removed.
/// [`VirtualMachine::release`] does the same off the async threads.
pub struct VirtualMachine {
    pub(crate) qemu: QemuProcess,
    pub(crate) qmp: Qmp,
    pub(crate) killed: bool,
    /// The console before a restore (the snapshot's), shown ahead of this QEMU's.
    pub(crate) earlier_console: String,
    pub(crate) uuid: String,
    pub(crate) mac: String,
    /// Whether QEMU runs in a jail (its paths are then the jail's).
    pub(crate) jailed: bool,
    pub(crate) argv: Vec<String>,
    pub(crate) network: Option<VmNetwork>,
    pub(crate) cgroup: Option<VmCgroup>,
    pub(crate) runtime: RuntimeDir,
    pub(crate) _record: Option<RecordFile>,
    /// Freed after QEMU is killed and its directory removed.
    pub(crate) _ids: Option<VmIds>,
    pub(crate) source: BootSource,
    pub(crate) max_file_size: Option<u64>,
    pub(crate) max_console_size: Option<u64>,
    /// Where the guest's RAM is; a snapshot's memory file is held while the VM lives.
    pub(crate) memory: crate::memory::GuestMemory,
}

impl VirtualMachine {
    /// The QEMU argument vector this VM was started with.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// The VM's runtime directory.
    pub fn runtime_dir(&self) -> &Path {
        self.runtime.path()
    }

    /// The VM's writable disk: a qcow2 overlay on the leased image (or on its snapshot).
    pub fn overlay(&self) -> PathBuf {
        self.runtime.overlay()
    }

    /// What the VM's root disk and boot files come from.
    pub fn source(&self) -> &BootSource {
        &self.source
    }

    /// The root disk as the host reads it once the VM has ended: the overlay, whose header
    /// names its backing file by its host path (QEMU was given the chain by descriptors).
    pub fn settled_disk(&self) -> io::Result<PathBuf> {
        Ok(self.runtime.overlay())
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// Sets the handler of the VM's metadata service (seed 001's `SetHTTPHandler`); a VM
    /// without an isolated network has no metadata service and ignores it.
    pub fn set_http_handler(&self, handler: Arc<dyn Handler>) {
        if let Some(network) = &self.network {
            network.set_handler(handler);
        }
    }

    /// The VM's isolated network, if it has one.
    pub fn network(&self) -> Option<&VmNetwork> {
        self.network.as_ref()
    }

    /// The VM's isolated network, to change it (e.g. stop its service before a snapshot).
    pub fn network_mut(&mut self) -> Option<&mut VmNetwork> {
        self.network.as_mut()
    }

    /// The VM's control group, when the host offers them.
    pub fn cgroup(&self) -> Option<&VmCgroup> {
        self.cgroup.as_ref()
    }

    /// The VNC server (present when the machine has graphics), reached through checked
    /// descriptors.
    pub fn vnc(&self) -> VncEndpoint {
        self.runtime.vnc()
    }

    /// The serial console's output so far (at most the last 4 MiB, truncation marked); for
    /// a restored VM, the snapshot's console comes first.
    pub fn serial_output(&self) -> String {
        let current = read_bounded(&self.runtime.serial_log(), LOG_LIMIT);
        if self.earlier_console.is_empty() {
            current
        } else {
            format!("{}{current}", self.earlier_console)
        }
    }

    /// The file the serial console is written to, for following it as it grows.
    pub fn serial_log_path(&self) -> PathBuf {
        self.runtime.serial_log()
    }

    /// QEMU's own messages so far (bounded like the serial output).
    pub fn qemu_output(&self) -> String {
        read_bounded(&self.runtime.qemu_log(), LOG_LIMIT)
    }

    /// Waits until the serial console shows `marker`, QEMU exits, or `timeout` passes;
    /// returns whether the marker appeared.
    pub async fn wait_for_serial(&mut self, marker: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.serial_output().contains(marker) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline || !matches!(self.qemu.try_wait(), Ok(None))
            {
                return self.serial_output().contains(marker);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Pauses the guest (`stop`).
    pub async fn suspend(&self) -> Result<(), VmError> {
        self.qmp.stop().await.map_err(VmError::Qmp)
    }

    /// Resumes a paused guest (`cont`).
    pub async fn resume(&self) -> Result<(), VmError> {
        self.qmp.cont().await.map_err(VmError::Qmp)
    }

    /// Resets the guest (`system_reset`); with `-no-reboot` this ends the VM.
    pub async fn reset(&self) -> Result<(), VmError> {
        self.qmp.system_reset().await.map_err(VmError::Qmp)
    }

    /// Whether the guest is running, and QEMU's run state.
    pub async fn status(&self) -> Result<(bool, String), VmError> {
        self.qmp.status().await.map_err(VmError::Qmp)
    }

    /// The screen as a PPM image, from QMP `screendump` (QEMU writes it in its `run/`
    /// directory; it is read back checked and at most 256 MiB).
    pub async fn screendump(&self) -> Result<Vec<u8>, VmError> {
        const NAME: &str = "screendump.ppm";
        let filename = if self.jailed {
            format!("/{}/{NAME}", crate::sandbox::runtime::SCRATCH)
        } else {
            self.runtime
                .path()
                .join(crate::sandbox::runtime::SCRATCH)
                .join(NAME)
                .display()
                .to_string()
        };
        self.qmp.screendump(&filename).await.map_err(VmError::Qmp)?;
        let bytes = self.runtime.read_scratch_file(NAME, 256 << 20);
        self.runtime.remove_scratch(NAME);
        bytes.map_err(VmError::Setup)
    }

    /// The screen as an RGBA image, read over the VM's VNC socket (the machine needs
    /// graphics). Gives up after `timeout`.
    pub async fn screenshot(&self, timeout: Duration) -> Result<Screen, ScreenshotError> {
        crate::qemu::screenshot::capture(&self.runtime.vnc(), timeout).await
    }

    /// Ends the VM and removes everything it had, as dropping it does, but with the slow part
    /// — waiting for its control groups to empty, `ip netns del`, the runtime directory — on a
    /// blocking thread, so that no async thread waits on it. Returns once all of it is gone.
    pub async fn release(mut self) {
        self.kill().await;
        // The same order as the fields drop in.
        let VirtualMachine {
            qemu,
            qmp,
            network,
            cgroup,
            runtime,
            _record,
            _ids,
            source,
            ..
        } = self;
        drop(qemu);
        drop(qmp);
        let teardown = move || {
            drop(network);
            drop(cgroup);
            drop(runtime);
            drop(_record);
            drop(_ids);
            drop(source);
        };
        // A panic in a drop would be the only error; the parts are gone either way.
        let _ = tokio::task::spawn_blocking(teardown).await;
    }

    /// Kills QEMU (SIGKILL to its process group) and waits for it.
    pub async fn kill(&mut self) {
        self.killed = true;
        self.qemu.kill();
        let _ = self.qemu.wait().await;
    }

    /// The first file QEMU writes (disk overlay, serial console, messages) that has reached
    /// its bound, as the [`ExitKind::FileTooLarge`] to report. Writes past
    /// [`VmSettings::max_file_size`] fail (QEMU's I/O threads block signals: they get EFBIG and
    /// the guest an I/O error), so a file at the bound is a guest that wanted more.
    pub fn file_at_bound(&self) -> Option<ExitKind> {
        let size = |path: PathBuf| fs::metadata(path).map_or(0, |meta| meta.len());
        let console = size(self.runtime.serial_log());
        if let Some(limit) = self.max_console_size.filter(|limit| console >= *limit) {
            return Some(ExitKind::FileTooLarge {
                file: "serial console",
                bound: FileBound::Console,
                limit,
            });
        }
        let limit = self.max_file_size?;
        [
            ("disk overlay", size(self.runtime.overlay())),
            ("serial console", console),
            ("QEMU's messages", size(self.runtime.qemu_log())),
        ]
        .into_iter()
        .find(|(_, length)| *length >= limit)
        .map(|(file, _)| ExitKind::FileTooLarge {
            file,
            bound: FileBound::FileSize,
            limit,
        })
    }

    /// Waits for the VM to end and says how it ended. Meanwhile the sizes of its files are
    /// watched: a VM whose file reached its bound is killed and ends as
    /// [`ExitKind::FileTooLarge`].
    pub async fn wait(&mut self) -> ExitKind {
        let watching = self.max_file_size.is_some() || self.max_console_size.is_some();
        let status = loop {
            tokio::select! {
                status = self.qemu.wait() => break status,
                () = tokio::time::sleep(FILE_WATCH_INTERVAL), if watching => {
                    if let Some(over) = self.file_at_bound() {
                        self.qemu.kill();
                        let _ = self.qemu.wait().await;
                        return over;
                    }
                }
            }
        };
        // The events arrive before QEMU exits; let the reader reach the end of the stream.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.qmp.record().closed && tokio::time::Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(50), self.qmp.changed()).await;
        }
        let record = self.qmp.record();
        if self.killed {
            return ExitKind::Killed;
        }
        // pvpanic reports panics once its driver is loaded; before that the kernel's own
        // message on the console is the evidence.
        if record.panicked || self.serial_output().contains("Kernel panic - not syncing") {
            return ExitKind::Panicked;
        }
        match &record.shutdown {
            Some((true, cause)) if cause == "guest-shutdown" => return ExitKind::PoweredOff,
            Some((true, cause)) if cause == "guest-reset" => return ExitKind::Rebooted,
            _ => {}
        }
        let file_size_signal = rustix::process::Signal::XFSZ.as_raw();
        if let Ok(status) = &status {
            if std::os::unix::process::ExitStatusExt::signal(status) == Some(file_size_signal) {
                if let Some(over) = self.file_at_bound() {
                    return over;
                }
            }
        }
        ExitKind::Crashed {
            status: match status {
                Ok(status) => status.to_string(),
                Err(error) => error.to_string(),
            },
            stderr_tail: tail(&self.runtime.qemu_log(), STDERR_TAIL),
        }
    }
}

/// Lines of QEMU's standard error kept in a start-up error.
pub(crate) const STDERR_TAIL: usize = 20;

/// The last `lines` lines of a file (root's, in the runtime directory).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = read_bounded(path, 64 * 1024);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A file's text, or its last `limit` bytes with a marker when it is longer.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut text = String::new();
    if length > limit {
        let _ = file.seek(SeekFrom::Start(length - limit));
        text.push_str(&format!(
            "[taskvm: {} earlier bytes not shown]\n",
            length - limit
        ));
    }
    let mut bytes = Vec::new();
    let _ = file.take(limit).read_to_end(&mut bytes);
    text.push_str(&String::from_utf8_lossy(&bytes));
    text
}
