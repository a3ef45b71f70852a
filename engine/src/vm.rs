//! A `VirtualMachine` owns everything one VM uses — the image lease, its runtime directory
//! and overlay, the QEMU process and the QMP connection — and releases all of it when dropped:
//! QEMU's process group is killed and the directory removed.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use image::RgbaImage;
use image_manager::Lease;
use qapi::qmp;
use rand::Rng;
use schemas::ResolvedMachine;
use thiserror::Error;

use crate::cgroup::{CgroupHost, CgroupLimits, VmCgroup};
use crate::cmdline::{
    qemu_args, Accelerator, BootFiles, CmdlineError, FdSet, LaunchDrive, LaunchSpec, Netdev,
};
use crate::drives::{open_for_qemu, BootSource, ExtraDrive, HostDisk};
use crate::metadata::Handler;
use crate::netns::{namespace_name, NetworkError};
use crate::network::{NetworkSettings, VmNetwork};
use crate::overlay::{create_empty_disk, create_overlay, point_backing_at};
use crate::process::{QemuProcess, RunAs};
use crate::qmp::Qmp;
use crate::records::{process_start_ticks, RecordFile, VmRecord};
use crate::runtime::RuntimeDir;
use crate::screenshot::ScreenshotError;
use crate::snapshot::{Snapshot, SnapshotFile};

/// Lines of QEMU's standard error kept in a start-up error.
const STDERR_TAIL: usize = 20;
/// Migration bandwidth: QEMU 7.2 caps it at 128 MiB/s unless told otherwise.
const MIGRATION_BANDWIDTH: u64 = 100 << 30;
/// How long saving or loading a state may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes of a log returned by [`VirtualMachine::serial_output`].
const LOG_LIMIT: u64 = 4 << 20;
/// The fd set of a host disk under the overlay; extra drives take the sets after it.
const ROOT_BACKING_SET: u32 = 1;

/// Host-side settings of a VM.
#[derive(Debug, Clone)]
pub struct VmSettings {
    /// Directory under which the VM's runtime directory is made.
    pub runtime_parent: PathBuf,
    /// Unique name of the VM (becomes the runtime directory's and QEMU process's name).
    pub name: String,
    /// Accelerator.
    pub accelerator: Accelerator,
    /// The unprivileged user QEMU runs as (None: as the worker itself).
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
pub struct VirtualMachine {
    qemu: QemuProcess,
    qmp: Qmp,
    killed: bool,
    /// The console before a restore (the snapshot's), shown ahead of this QEMU's.
    earlier_console: String,
    uuid: String,
    mac: String,
    owner: Option<(u32, u32)>,
    argv: Vec<String>,
    network: Option<VmNetwork>,
    cgroup: Option<VmCgroup>,
    runtime: RuntimeDir,
    _record: Option<RecordFile>,
    source: BootSource,
    /// The root disk's backing file on the host when QEMU reaches it as `/dev/fdset/N`.
    host_backing: Option<(PathBuf, String)>,
    max_file_size: Option<u64>,
    max_console_size: Option<u64>,
}

impl VirtualMachine {
    /// Starts a VM of `machine` on the leased image (the lease is held until the VM is dropped)
    /// and waits until QEMU answers on QMP.
    pub async fn start(
        lease: Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
    ) -> Result<Self, VmError> {
        Self::launch(lease.into(), machine, settings, None).await
    }

    /// Starts a VM of `machine` whose root disk and boot files come from `source`: a cached
    /// image, or files of the host's (an existing disk, read-only under the VM's overlay, or a
    /// fresh empty disk). Files of the host's need not be readable by the sandbox user.
    pub async fn start_from(
        source: BootSource,
        machine: &ResolvedMachine,
        settings: &VmSettings,
    ) -> Result<Self, VmError> {
        Self::launch(source, machine, settings, None).await
    }

    /// Starts a VM from `snapshot` (made of the same image and machine, see
    /// [`crate::snapshot`]) instead of booting it, and resumes it once the state is loaded.
    /// Its disk is a new overlay on the snapshot's; its network is its own, as for a boot.
    pub async fn restore(
        lease: Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
        snapshot: &Snapshot,
    ) -> Result<Self, VmError> {
        let vm = Self::restore_paused(lease, machine, settings, snapshot).await?;
        vm.resume().await?;
        Ok(vm)
    }

    /// Like [`VirtualMachine::restore`], but leaves the loaded guest paused (0 % CPU) until
    /// [`VirtualMachine::resume`]: a VM kept ready in a warm pool.
    pub async fn restore_paused(
        lease: Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
        snapshot: &Snapshot,
    ) -> Result<Self, VmError> {
        let mut vm = Self::launch(lease.into(), machine, settings, Some(snapshot)).await?;
        vm.wait_migration("loading").await?;
        let console = fs::read_to_string(Snapshot::path_in(snapshot.dir(), SnapshotFile::Console))
            .unwrap_or_default();
        vm.earlier_console = format!(
            "{console}\n[taskvm: restored from the snapshot in {}]\n",
            snapshot.dir().display()
        );
        Ok(vm)
    }

    async fn launch(
        source: BootSource,
        machine: &ResolvedMachine,
        settings: &VmSettings,
        snapshot: Option<&Snapshot>,
    ) -> Result<Self, VmError> {
        let runtime = RuntimeDir::create(
            &settings.runtime_parent,
            &settings.name,
            owner(settings.run_as),
        )
        .map_err(VmError::Setup)?;
        let cgroup = match &settings.cgroups {
            Some(host) => {
                let cpus = u64::from(machine.topology().vcpus());
                let limits = CgroupLimits::for_machine(u64::from(machine.memory_mib()), cpus);
                Some(host.create(&settings.name, limits).map_err(|error| {
                    VmError::Setup(io::Error::other(format!("control group: {error}")))
                })?)
            }
            None => None,
        };
        let mut record = VmRecord {
            name: settings.name.clone(),
            pid: None,
            start_ticks: None,
            runtime_dir: runtime.path().to_path_buf(),
            cgroups: cgroup.as_ref().map_or(Vec::new(), |g| g.dirs().to_vec()),
            netns: settings
                .network
                .as_ref()
                .map(|_| namespace_name(&settings.name)),
            owner: crate::records::this_owner(),
        };
        let record_file = match &settings.state_dir {
            Some(state_dir) => Some(RecordFile::write(state_dir, &record).map_err(VmError::Setup)?),
            None => None,
        };
        // Recorded before it exists, so that a crash in between still gets it swept.
        let network = match &settings.network {
            Some(network) => Some(VmNetwork::create(&settings.name, network)?),
            None => None,
        };
        // Descriptors QEMU inherits: the tap, a saved state, files of the host's.
        let mut host_fds: Vec<(fs::File, u32)> = Vec::new();
        let mut host_backing = None;
        match (snapshot, &source) {
            (Some(snapshot), _) => {
                create_overlay(&snapshot.disk_path(), "qcow2", &runtime.overlay())
                    .map_err(VmError::Setup)?;
            }
            (None, BootSource::Image(lease)) => {
                let (base, format) = lease.boot_disk();
                create_overlay(&base, format, &runtime.overlay()).map_err(VmError::Setup)?;
            }
            (None, BootSource::Files(files)) => match &files.disk {
                HostDisk::Existing { path, format } => {
                    let file = open_for_qemu(path, false).map_err(VmError::Setup)?;
                    create_overlay(path, format, &runtime.overlay()).map_err(VmError::Setup)?;
                    let set = ROOT_BACKING_SET;
                    point_backing_at(&runtime.overlay(), &format!("/dev/fdset/{set}"), format)
                        .map_err(VmError::Setup)?;
                    host_fds.push((file, set));
                    host_backing = Some((path.clone(), format.clone()));
                }
                HostDisk::Empty { size } => {
                    create_empty_disk(&runtime.overlay(), *size).map_err(VmError::Setup)?;
                }
            },
        }
        let mut drives = Vec::new();
        for (index, drive) in settings.drives.iter().enumerate() {
            let set = ROOT_BACKING_SET + 1 + index as u32;
            host_fds.push((drive.open().map_err(VmError::Setup)?, set));
            drives.push(LaunchDrive {
                file: format!("/dev/fdset/{set}"),
                format: drive.format.clone(),
                media: drive.media,
                read_only: !drive.writable,
                boot_first: drive.boot_first,
            });
        }
        // The saved state, inherited by QEMU as `-incoming fd:N`.
        let state = match snapshot {
            Some(snapshot) => Some(
                fs::File::open(snapshot.state_path())
                    .map(std::os::fd::OwnedFd::from)
                    .map_err(VmError::Setup)?,
            ),
            None => None,
        };
        if let Some(user) = settings.run_as {
            std::os::unix::fs::chown(runtime.overlay(), Some(user.uid), Some(user.gid))
                .map_err(VmError::Setup)?;
        }
        let m = machine.machine();
        let boot_files = match &m.boot {
            Some(boot) => Some(
                runtime_boot_files(&source, boot, &runtime, owner(settings.run_as))
                    .map_err(VmError::Setup)?,
            ),
            None => None,
        };
        let boot = m
            .boot
            .as_ref()
            .zip(boot_files)
            .map(|(boot, (kernel, initrd))| BootFiles {
                kernel,
                initrd,
                append: match &network {
                    Some(network) => format!(
                        "{} {}",
                        boot.append.clone().unwrap_or_default(),
                        network.kernel_parameter()
                    ),
                    None => boot.append.clone().unwrap_or_default(),
                },
            });
        let spec = LaunchSpec {
            name: settings.name.clone(),
            accelerator: settings.accelerator,
            disk: runtime.overlay(),
            boot,
            uuid: match snapshot {
                Some(snapshot) => snapshot.uuid().to_owned(),
                None => m.uuid.clone().unwrap_or_else(random_uuid),
            },
            mac: match snapshot {
                Some(snapshot) => snapshot.mac().to_owned(),
                None => m.mac.clone().unwrap_or_else(random_mac),
            },
            netdev: match &network {
                Some(network) => Netdev::TapFd(network.tap().as_raw_fd()),
                None => settings.netdev.clone(),
            },
            serial_log: runtime.serial_log(),
            qmp_socket: runtime.qmp_socket(),
            vnc_socket: runtime.vnc_socket(),
            tsc_khz: settings.tsc_khz,
            incoming: state.as_ref().map(|fd| format!("fd:{}", fd.as_raw_fd())),
            fd_sets: host_fds
                .iter()
                .map(|(file, set)| FdSet {
                    fd: file.as_raw_fd(),
                    set: *set,
                })
                .collect(),
            drives,
        };
        let argv = qemu_args(machine, &spec)?;
        let start_error = |reason: String, runtime: &RuntimeDir| VmError::Start {
            reason,
            stderr_tail: tail(&runtime.qemu_log(), STDERR_TAIL),
            argv: format!("{} {}", settings.qemu, argv.join(" ")),
        };
        let extra_groups = match (settings.accelerator, settings.run_as) {
            (Accelerator::Kvm, Some(_)) => kvm_group().into_iter().collect(),
            _ => Vec::new(),
        };
        let confinement = crate::process::Confinement {
            run_as: settings.run_as,
            extra_groups,
            max_file_size: settings.max_file_size,
        };
        let mut qemu = QemuProcess::spawn(
            &settings.qemu,
            &argv,
            &confinement,
            cgroup.as_ref(),
            &network
                .iter()
                .map(VmNetwork::tap)
                .chain(state.iter().map(std::os::fd::AsFd::as_fd))
                .chain(
                    host_fds
                        .iter()
                        .map(|(file, _)| std::os::fd::AsFd::as_fd(file)),
                )
                .collect::<Vec<_>>(),
            &runtime.qemu_log(),
        )
        .map_err(|error| start_error(format!("cannot run {}: {error}", settings.qemu), &runtime))?;
        if let Some(file) = &record_file {
            record.pid = Some(qemu.pid());
            record.start_ticks = process_start_ticks(qemu.pid());
            file.update(&record).map_err(VmError::Setup)?;
        }
        let qmp_socket = runtime.qmp_socket();
        let qmp = tokio::select! {
            connected = Qmp::connect(&qmp_socket, settings.start_timeout) => connected,
            status = qemu.wait() => Err(io::Error::other(match status {
                Ok(status) => format!("QEMU exited at start: {status}"),
                Err(error) => error.to_string(),
            })),
        };
        let qmp = match qmp {
            Ok(qmp) => qmp,
            Err(error) => {
                qemu.kill();
                let _ = qemu.wait().await;
                return Err(start_error(error.to_string(), &runtime));
            }
        };
        Ok(VirtualMachine {
            qemu,
            qmp,
            killed: false,
            earlier_console: String::new(),
            uuid: spec.uuid.clone(),
            mac: spec.mac.clone(),
            owner: owner(settings.run_as),
            argv,
            network,
            cgroup,
            runtime,
            _record: record_file,
            source,
            host_backing,
            max_file_size: settings.max_file_size,
            max_console_size: settings.max_console_size,
        })
    }

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

    /// The root disk as the host reads it once the VM has ended: the overlay, with its backing
    /// file named by its host path again when QEMU had it as an inherited descriptor.
    pub fn settled_disk(&self) -> io::Result<PathBuf> {
        if let Some((path, format)) = &self.host_backing {
            point_backing_at(&self.runtime.overlay(), &path.to_string_lossy(), format)?;
        }
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

    /// The VNC socket (present when the machine has graphics).
    pub fn vnc_socket(&self) -> PathBuf {
        self.runtime.vnc_socket()
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
        self.qmp
            .execute(qmp::stop {})
            .await
            .map(drop)
            .map_err(VmError::Qmp)
    }

    /// Resumes a paused guest (`cont`).
    pub async fn resume(&self) -> Result<(), VmError> {
        self.qmp
            .execute(qmp::cont {})
            .await
            .map(drop)
            .map_err(VmError::Qmp)
    }

    /// Resets the guest (`system_reset`); with `-no-reboot` this ends the VM.
    pub async fn reset(&self) -> Result<(), VmError> {
        self.qmp
            .execute(qmp::system_reset {})
            .await
            .map(drop)
            .map_err(VmError::Qmp)
    }

    /// Whether the guest is running, and QEMU's run state.
    pub async fn status(&self) -> Result<(bool, String), VmError> {
        self.qmp.status().await.map_err(VmError::Qmp)
    }

    /// Writes the screen to a PPM file in the runtime directory with QMP `screendump` and
    /// returns its path.
    pub async fn screendump(&self) -> Result<PathBuf, VmError> {
        let path = self.runtime.path().join("screendump.ppm");
        let command = qmp::screendump {
            filename: path.display().to_string(),
            device: None,
            head: None,
            format: None,
        };
        self.qmp.execute(command).await.map_err(VmError::Qmp)?;
        Ok(path)
    }

    /// The screen as an RGBA image, read over the VM's VNC socket (the machine needs
    /// graphics). Gives up after `timeout`.
    pub async fn screenshot(&self, timeout: Duration) -> Result<RgbaImage, ScreenshotError> {
        crate::screenshot::capture(&self.runtime.vnc_socket(), timeout).await
    }

    /// Saves the paused VM into the new directory `dir` (see [`crate::snapshot`]) and ends it.
    /// Call it at agent-ready, before the guest received anything of a task, and with the
    /// guest not in the middle of a request to its metadata service (stop the service first:
    /// [`crate::network::VmNetwork::stop_service`]).
    pub async fn snapshot(mut self, dir: &Path) -> Result<Snapshot, VmError> {
        let failed = |what: &str, error: &dyn std::fmt::Display| {
            VmError::Snapshot(format!("{what}: {error}"))
        };
        fs::create_dir(dir).map_err(|e| failed(&format!("creating {}", dir.display()), &e))?;
        self.suspend().await?;
        let parameters = qmp::MigrateSetParameters {
            max_bandwidth: Some(MIGRATION_BANDWIDTH),
            ..Default::default()
        };
        self.qmp
            .execute(qmp::migrate_set_parameters(parameters))
            .await
            .map_err(VmError::Qmp)?;
        let socket = self.runtime.path().join("migrate.sock");
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(|e| failed("listening for the migration stream", &e))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&socket, Some(uid), Some(gid))
                .map_err(|e| failed("handing the socket to QEMU's user", &e))?;
        }
        let state = Snapshot::path_in(dir, SnapshotFile::State);
        let command = qmp::migrate {
            uri: Some(format!("unix:{}", socket.display())),
            channels: None,
            detach: None,
            resume: None,
        };
        self.qmp.execute(command).await.map_err(VmError::Qmp)?;
        let copy = async {
            let (mut stream, _) = listener.accept().await?;
            let mut file = tokio::fs::File::create(&state).await?;
            let bytes = tokio::io::copy(&mut stream, &mut file).await?;
            file.sync_all().await?;
            io::Result::Ok(bytes)
        };
        tokio::time::timeout(MIGRATION_TIMEOUT, copy)
            .await
            .map_err(|_| failed("the migration stream", &"timed out"))?
            .map_err(|e| failed("the migration stream", &e))?;
        self.wait_migration("saving").await?;
        self.kill().await;
        let disk = Snapshot::path_in(dir, SnapshotFile::Disk);
        fs::rename(self.runtime.overlay(), &disk).map_err(|e| failed("keeping the disk", &e))?;
        for file in [&disk, &state] {
            fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .map_err(|e| failed("making the snapshot read-only", &e))?;
        }
        Snapshot::write_identity(dir, &self.uuid, &self.mac)
            .map_err(|e| failed("writing the identity", &e))?;
        // The console up to the snapshot, which every restored copy's console continues.
        fs::write(
            Snapshot::path_in(dir, SnapshotFile::Console),
            read_bounded(&self.runtime.serial_log(), LOG_LIMIT),
        )
        .map_err(|e| failed("keeping the console", &e))?;
        Snapshot::open(dir).map_err(|e| failed("reopening", &e))
    }

    /// Polls `query-migrate` until the migration completed; fails if it failed.
    async fn wait_migration(&self, what: &str) -> Result<(), VmError> {
        let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let info = self
                .qmp
                .execute(qmp::query_migrate {})
                .await
                .map_err(VmError::Qmp)?;
            match info.status {
                Some(qmp::MigrationStatus::completed) => return Ok(()),
                Some(qmp::MigrationStatus::failed | qmp::MigrationStatus::cancelled) => {
                    return Err(VmError::Snapshot(format!(
                        "{what} the state failed: {}",
                        info.error_desc.unwrap_or_else(|| "no reason given".into())
                    )))
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(VmError::Snapshot(format!("{what} the state timed out")))
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
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

/// The group owning `/dev/kvm`, when it is not root's: the unprivileged QEMU needs it as a
/// supplementary group to use KVM.
pub(crate) fn kvm_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let gid = fs::metadata("/dev/kvm").ok()?.gid();
    (gid != 0).then_some(gid)
}

fn owner(run_as: Option<RunAs>) -> Option<(u32, u32)> {
    run_as.map(|user| (user.uid, user.gid))
}

/// A random (version 4) UUID, lower case.
fn random_uuid() -> String {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A random locally administered unicast MAC address.
fn random_mac() -> String {
    let mut bytes: [u8; 6] = rand::rng().random();
    bytes[0] = (bytes[0] & 0xfc) | 0x02;
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> String {
    let text = read_bounded(path, 64 * 1024);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A file's text, or its last `limit` bytes with a marker when it is longer.
fn read_bounded(path: &Path, limit: u64) -> String {
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

/// The kernel and initrd QEMU reads for a direct boot: the image's own files, or copies of the
/// host's in the runtime directory (where the sandbox user can read them).
fn runtime_boot_files(
    source: &BootSource,
    boot: &schemas::machine::LinuxBoot,
    runtime: &RuntimeDir,
    owner: Option<(u32, u32)>,
) -> io::Result<(PathBuf, Option<PathBuf>)> {
    let missing = |what: &str| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("the machine boots directly but no {what} was given"),
        )
    };
    let kernel = source
        .kernel(&boot.kernel)
        .ok_or_else(|| missing("kernel"))?;
    let initrd = match &boot.initrd {
        Some(name) => Some(source.initrd(name).ok_or_else(|| missing("initrd"))?),
        None => None,
    };
    if source.lease().is_some() {
        return Ok((kernel, initrd));
    }
    let copy = |from: &Path, name: &str| -> io::Result<PathBuf> {
        let to = runtime.path().join(name);
        fs::copy(from, &to).map_err(|error| {
            io::Error::new(error.kind(), format!("{}: {error}", from.display()))
        })?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&to, Some(uid), Some(gid))?;
        }
        Ok(to)
    };
    Ok((
        copy(&kernel, "kernel")?,
        initrd.map(|path| copy(&path, "initrd")).transpose()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_match_the_machine_patterns() {
        for _ in 0..100 {
            let mac = random_mac();
            let first = u8::from_str_radix(&mac[..2], 16).unwrap();
            assert_eq!(first & 0x03, 0x02, "{mac}: locally administered unicast");
            let uuid = random_uuid();
            assert_eq!(uuid.len(), 36);
            assert_eq!(&uuid[14..15], "4");
        }
        assert_ne!(random_mac(), random_mac());
    }
}
