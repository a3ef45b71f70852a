//! The host as the engine needs it, prepared once by [`VmHost::prepare`] for every VM a process
//! starts: privileges checked, what a worker killed with `kill -9` left swept, the user QEMU
//! runs as and the jail (id range, namespaces), control groups, the TSC, the accelerator
//! verdict (decided on first use) and the snapshot store. Everything else about a VM comes
//! from [`VmHost::vm_settings`].
//!
//! # Layout
//! - [`accel`]: KVM or TCG; `auto` probes KVM with a boot watchdog and caches the verdict.
//! - [`tsc`]: the host's TSC frequency for the guest's command line.
//! - [`procfs`]: numbers from `/proc` text files (memory totals, a process's resident size).

pub mod accel;
pub mod procfs;
pub mod tsc;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use image_manager::Lease;
use schemas::config::{Accel, IdRangeConfig};
use schemas::ResolvedMachine;
use thiserror::Error;
use tokio::sync::OnceCell;

use crate::host::accel::{decide, ProbeSpec};
use crate::network::egress_policy::Ipv4Cidr;
use crate::network::NetworkSettings;
use crate::qemu::process::{lookup_user, RunAs};
use crate::sandbox::cgroup::CgroupHost;
use crate::sandbox::jail::JailSettings;
use crate::snapshot::store::{Got, SnapshotStore, READY_TIMEOUT};
use crate::{Accelerator, Netdev, VmError, VmSettings};

/// Why this host cannot run VMs.
#[derive(Debug, Error)]
pub enum HostError {
    /// A directory could not be made.
    #[error("cannot create {path}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// VMs need privileges this process lacks.
    #[error(transparent)]
    Privileges(#[from] crate::network::netns::NetworkError),
    /// The sandbox user does not exist.
    #[error("sandbox user {user:?}: {source}")]
    User {
        /// The configured user.
        user: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The sandbox user could not reach a directory QEMU must open files in.
    #[error(
        "{path} is not reachable by the sandbox user (uid {uid}): {blocker} lacks search \
         permission for others (chmod o+x it, or choose another directory)"
    )]
    Unreachable {
        /// The directory QEMU needs.
        path: PathBuf,
        /// The ancestor that blocks it.
        blocker: PathBuf,
        /// The sandbox user.
        uid: u32,
    },
    /// A setting asks for something this host or version cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// The sweep failed.
    #[error("start-up sweep of {path}: {source}")]
    Sweep {
        /// The state directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// What the engine is told about the host (the worker configuration's part of it).
#[derive(Debug, Clone)]
pub struct HostSettings {
    /// The state directory (absolute): VM records, runtime directories, snapshots, the
    /// accelerator verdict.
    pub state_dir: PathBuf,
    /// Directories QEMU opens files in by their host path when it has no namespaces (the
    /// image cache): checked reachable by the VMs' users.
    pub shared_dirs: Vec<PathBuf>,
    /// `sandbox.user`: who QEMU runs as without a jail.
    pub sandbox_user: String,
    /// `sandbox.idRange`: the VMs' users and groups.
    pub id_range: IdRangeConfig,
    /// `sandbox.allowWeakIsolation`: run without namespaces where they cannot be made.
    pub allow_weak_isolation: bool,
    /// `sandbox.probeKernel`: the kernel the KVM probe boots.
    pub probe_kernel: Option<PathBuf>,
    /// `accel`.
    pub accel: Accel,
    /// `network.egress`.
    pub egress: bool,
    /// `network.egressAllow`, parsed.
    pub egress_allow: Vec<Ipv4Cidr>,
    /// `network.dnsServers`, parsed.
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    /// `sandbox.maxFileSize`.
    pub max_file_size: u64,
    /// `sandbox.maxConsoleSize`.
    pub max_console_size: u64,
}

/// The prepared host; see the module documentation.
pub struct VmHost {
    settings: HostSettings,
    /// The user QEMU runs as when it is not jailed (None when the worker is not root).
    pub run_as: Option<RunAs>,
    /// How VMs are jailed (None: not at all, only for a worker that is not root).
    pub jail: Option<JailSettings>,
    /// Per-VM control groups, when the host has them.
    pub cgroups: Option<CgroupHost>,
    /// The QEMU binary.
    pub qemu: String,
    /// The host's TSC frequency.
    pub tsc_khz: Option<u64>,
    /// Snapshots of booted images, for fast starts.
    pub snapshots: SnapshotStore,
    accel: OnceCell<Accelerator>,
}

impl VmHost {
    /// Prepares the host, in order: privileges, the state directory, the sweep of what a
    /// dead worker left, the runtime directories' parent, the user and the jail, control
    /// groups, the snapshot store (swept of snapshots whose image left the cache). `notice`
    /// receives one line per thing worth knowing.
    pub fn prepare(settings: HostSettings, notice: &dyn Fn(&str)) -> Result<VmHost, HostError> {
        crate::network::netns::check_privileges()?;
        if settings.egress && crate::sandbox::jail::find_program("nft").is_err() {
            return Err(HostError::Unsupported(
                "network.egress = true needs nftables (the `nft` program); install it (make deps \
                 does) or turn egress off"
                    .into(),
            ));
        }
        let state = &settings.state_dir;
        make_dir(state)?;
        sweep(state, notice)?;
        make_dir(&runtime_parent(state))?;
        let root = rustix::process::geteuid().is_root();
        let run_as = match root {
            true => {
                Some(
                    lookup_user(&settings.sandbox_user).map_err(|source| HostError::User {
                        user: settings.sandbox_user.clone(),
                        source,
                    })?,
                )
            }
            false => None,
        };
        let jail = match root {
            true => Some(jail_settings(&settings, notice)?),
            false => None,
        };
        let cgroups = match CgroupHost::detect() {
            Ok(host) => Some(host),
            Err(error) => {
                notice(&format!("VMs run without memory/CPU/pid limits: {error}"));
                None
            }
        };
        if let Some(jail) = jail.as_ref().filter(|jail| !jail.namespaces) {
            // Without namespaces QEMU opens cached boot files and its runtime directory by
            // their host paths, as a user of the VM range: others must pass through.
            let shared = settings.shared_dirs.iter().cloned();
            for dir in shared.chain([runtime_parent(state)]) {
                check_reachable(&dir, jail.ids.first)?;
            }
        }
        let qemu = "qemu-system-x86_64".to_owned();
        let snapshots =
            SnapshotStore::open(state, &qemu).map_err(|source| HostError::Directory {
                path: state.join("snapshots"),
                source,
            })?;
        let swept = snapshots.sweep();
        if swept > 0 {
            notice(&format!(
                "removed {swept} snapshot(s) of images no longer cached"
            ));
        }
        Ok(VmHost {
            settings,
            run_as,
            jail,
            cgroups,
            qemu,
            tsc_khz: crate::host::tsc::host_tsc_khz(),
            snapshots,
            accel: OnceCell::new(),
        })
    }

    /// The settings of a VM called `name` on this host.
    pub fn vm_settings(&self, name: &str, accelerator: Accelerator) -> VmSettings {
        VmSettings {
            runtime_parent: self.runtime_parent(),
            name: name.to_owned(),
            accelerator,
            jail: self.jail.clone(),
            run_as: self.run_as,
            netdev: Netdev::RestrictedUser,
            qemu: self.qemu.clone(),
            tsc_khz: self.tsc_khz,
            start_timeout: std::time::Duration::from_secs(10),
            state_dir: Some(self.settings.state_dir.clone()),
            cgroups: self.cgroups.clone(),
            network: Some(NetworkSettings {
                egress: self.settings.egress,
                egress_allow: self.settings.egress_allow.clone(),
                dns_upstreams: self.settings.dns_upstreams.clone(),
                ..NetworkSettings::default()
            }),
            drives: Vec::new(),
            max_file_size: Some(self.settings.max_file_size),
            max_console_size: Some(self.settings.max_console_size),
        }
    }

    /// Where VMs' runtime directories go.
    pub fn runtime_parent(&self) -> PathBuf {
        runtime_parent(&self.settings.state_dir)
    }

    /// The snapshot key of a VM of `machine` on `lease` with `settings`.
    pub fn snapshot_key(
        &self,
        lease: &Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
    ) -> String {
        let network = settings.network.clone().unwrap_or_default();
        self.snapshots.key(
            lease,
            machine,
            settings.accelerator,
            settings.tsc_khz,
            &network,
            crate::disk::slots::layout(&settings.drives),
        )
    }

    /// The snapshot of `key` (see [`VmHost::snapshot_key`]) for a VM of `machine` on `lease`
    /// with `settings`: the stored one, or one made now by booting the image once on
    /// `builder_lease`, a second lease on the same image (concurrent callers wait for that
    /// one).
    pub async fn snapshot_for(
        &self,
        key: &str,
        lease: &Lease,
        builder_lease: Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
    ) -> Result<Got, VmError> {
        let mut build_settings = VmSettings {
            name: format!("{}-snapshot", settings.name),
            ..settings.clone()
        };
        self.snapshots
            .get_or_build(key, |dir| async move {
                // The task's own disks stay out of the snapshot: its mount slots get blanks.
                let blanks = crate::disk::slots::Blanks::create(&dir.with_extension("slots"))
                    .map_err(VmError::Setup)?;
                build_settings.drives = blanks
                    .in_place_of(&build_settings.drives)
                    .map_err(VmError::Setup)?;
                let snapshot = crate::snapshot::build(
                    builder_lease,
                    machine,
                    &build_settings,
                    &dir,
                    READY_TIMEOUT,
                )
                .await?;
                drop(blanks);
                SnapshotStore::label(&dir, lease).map_err(VmError::Setup)?;
                Ok(snapshot)
            })
            .await
    }

    /// The accelerator, decided on first use: an `auto` probe boots the trusted probe kernel
    /// (`sandbox.probeKernel`, else the host's own) under KVM once per host, never a task's;
    /// the verdict is cached in the state directory.
    pub async fn accelerator(&self, notice: &(dyn Fn(&str) + Sync)) -> Accelerator {
        *self
            .accel
            .get_or_init(|| async {
                let spec = self.probe_kernel().map(|kernel| ProbeSpec {
                    qemu: self.qemu.clone(),
                    kernel,
                    jail: self.jail.clone(),
                    run_as: self.run_as,
                    scratch: self.runtime_parent(),
                    tsc_khz: self.tsc_khz,
                    watchdog: std::time::Duration::from_secs(10),
                });
                let cache_file = self.settings.state_dir.join("accel.json");
                let accel = self.settings.accel;
                let decision = decide(accel, &cache_file, spec.as_ref()).await;
                if let Some(line) = &decision.notice {
                    notice(line);
                }
                if accel == Accel::Auto && decision.accelerator == Accelerator::Kvm {
                    notice("using KVM");
                }
                decision.accelerator
            })
            .await
    }

    /// The kernel the KVM probe boots: `sandbox.probeKernel`, else the host's own
    /// `/boot/vmlinuz-RELEASE` when it exists.
    fn probe_kernel(&self) -> Option<PathBuf> {
        if let Some(kernel) = &self.settings.probe_kernel {
            return Some(kernel.clone());
        }
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let own = PathBuf::from(format!("/boot/vmlinuz-{}", release.trim()));
        own.is_file().then_some(own)
    }
}

/// Removes what VMs of a worker killed with `kill -9` left behind.
fn sweep(state: &Path, notice: &dyn Fn(&str)) -> Result<(), HostError> {
    let report = crate::sandbox::records::sweep(state).map_err(|source| HostError::Sweep {
        path: state.to_owned(),
        source,
    })?;
    if report.records > 0 {
        notice(&format!(
            "swept {} VM(s) a previous worker left: {} QEMU process(es) killed, {} VM \
             user(s) freed, {} directories, {} control groups, {} network namespaces removed",
            report.records,
            report.killed.len(),
            report.freed_ids.len(),
            report.removed_dirs.len(),
            report.removed_cgroups.len(),
            report.removed_namespaces.len()
        ));
    }
    Ok(())
}

/// The jail every VM gets: the id range checked against the host's accounts, and whether this
/// host lets QEMU have namespaces of its own (refused without them unless the settings allow
/// weaker isolation). Says in one line what isolation VMs get.
fn jail_settings(
    settings: &HostSettings,
    notice: &dyn Fn(&str),
) -> Result<JailSettings, HostError> {
    let range = &settings.id_range;
    let ids = crate::sandbox::ids::IdRange::new(range.first, range.count)
        .map_err(|error| HostError::Unsupported(error.to_string()))?;
    ids.check_host()
        .map_err(|error| HostError::Unsupported(error.to_string()))?;
    let mut jail = JailSettings::new(ids);
    let end = u64::from(ids.first) + u64::from(ids.count);
    match crate::sandbox::jail::check_namespaces() {
        Ok(()) => notice(&format!(
            "isolation: every QEMU jailed: a user and group of its own (sandbox.idRange {}..{end}), \
             its own mount, network, IPC and UTS namespaces with its runtime directory as root \
             (the host's /usr read-only, /dev with null, zero, random, urandom and kvm under KVM; \
             with RAM mapped from a snapshot, a /proc showing only its own processes), \
             an empty environment, no new privileges, seccomp; not in a PID namespace of its own",
            ids.first
        )),
        Err(error) if settings.allow_weak_isolation => {
            jail.namespaces = false;
            notice(&format!(
                "WEAK ISOLATION (sandbox.allowWeakIsolation): QEMU cannot have namespaces of its \
                 own here ({error}); every QEMU still runs as a user of its own (sandbox.idRange \
                 {}..{end}) with an empty environment, but sees the host's file system and \
                 network namespace",
                ids.first
            ));
        }
        Err(error) => {
            return Err(HostError::Unsupported(format!(
                "QEMU cannot be jailed on this host: {error}. Run the worker where it may make \
                 mount and network namespaces (root, no seccomp profile forbidding unshare and \
                 mount), or set sandbox.allowWeakIsolation = true to run VMs without them"
            )))
        }
    }
    Ok(jail)
}

/// Where the runtime directories of VMs of state directory `state` go.
pub fn runtime_parent(state: &Path) -> PathBuf {
    state.join("run")
}

/// Fails unless every ancestor of `dir` (and `dir`) lets others search it, so that `uid`
/// (not the owner) can reach files below.
fn check_reachable(dir: &Path, uid: u32) -> Result<(), HostError> {
    use std::os::unix::fs::MetadataExt;
    // A directory not made yet is checked through the ancestors it will have.
    let absolute = fs::canonicalize(dir)
        .or_else(|_| std::path::absolute(dir))
        .map_err(|source| HostError::Directory {
            path: dir.to_owned(),
            source,
        })?;
    for ancestor in absolute.ancestors() {
        let Ok(metadata) = fs::metadata(ancestor) else {
            continue;
        };
        let searchable = metadata.mode() & 0o001 != 0 || metadata.uid() == uid;
        if !searchable {
            return Err(HostError::Unreachable {
                path: dir.to_owned(),
                blocker: ancestor.to_owned(),
                uid,
            });
        }
    }
    Ok(())
}

/// Creates `path` (and parents) traversable by the sandbox user: 0755.
pub fn make_dir(path: &Path) -> Result<(), HostError> {
    let failed = |source| HostError::Directory {
        path: path.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(failed)?;
    let mode = fs::metadata(path).map_err(failed)?.permissions().mode();
    if mode & 0o005 != 0o005 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o755)).map_err(failed)?;
    }
    Ok(())
}
