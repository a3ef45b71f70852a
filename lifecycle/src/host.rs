//! What a worker prepares once and all its tasks share: directories, the image cache, the
//! sandbox user, control groups, the accelerator verdict — and the start-up sweep that
//! removes what a worker killed with `kill -9` left behind.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine::accel::{decide, ProbeSpec};
use engine::cgroup::CgroupHost;
use engine::jail::JailSettings;
use engine::network::NetworkSettings;
use engine::process::{lookup_user, RunAs};
use engine::{Accelerator, Netdev, VmError, VmSettings};
use image_manager::{Cache, Lease};
use schemas::config::Accel;
use schemas::{ResolvedMachine, WorkerConfig};
use thiserror::Error;

use super::pool::WarmPool;
use super::snapshots::{Got, SnapshotStore, READY_TIMEOUT};
use tokio::sync::OnceCell;

/// Why the host cannot run tasks.
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
    Privileges(#[from] engine::netns::NetworkError),
    /// The sandbox user does not exist.
    #[error("sandbox user {user:?}: {source}")]
    User {
        /// The configured user.
        user: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The image cache could not be opened.
    #[error("image cache: {0}")]
    Cache(#[from] image_manager::ImageError),
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
    /// A setting asks for something this version cannot do.
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

/// The shared, prepared host.
pub struct Host {
    /// The configuration tasks run under.
    pub config: WorkerConfig,
    /// The image cache.
    pub cache: Cache,
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
    /// Paused VMs ready for the most used image (empty unless `warmPool` is set).
    pub pool: Arc<WarmPool>,
    /// Where payloads' `file://` images may come from: the configuration's `images.fileDirs`
    /// (none when empty); `taskvm run` widens an empty list to any file with
    /// [`Host::allow_any_local_file`].
    pub file_policy: image_manager::FilePolicy,
    egress_allow: Vec<engine::egress_policy::Ipv4Cidr>,
    dns_upstreams: Vec<std::net::SocketAddr>,
    accel: OnceCell<Accelerator>,
}

impl Host {
    /// Prepares the host for `config`: sweeps leftovers of a crashed worker, creates the
    /// directories, opens the cache. `notice` receives one line per thing worth knowing.
    pub fn prepare(mut config: WorkerConfig, notice: &dyn Fn(&str)) -> Result<Host, HostError> {
        engine::netns::check_privileges()?;
        // QEMU and qemu-img resolve paths from other directories (a backing file is relative
        // to its overlay): every directory is made absolute once, here.
        for dir in [&mut config.state_dir, &mut config.cache.dir] {
            *dir = std::path::absolute(&*dir).map_err(|source| HostError::Directory {
                path: dir.clone(),
                source,
            })?;
        }
        let (egress_allow, dns_upstreams) = network_lists(&config)?;
        if config.network.egress && engine::jail::find_program("nft").is_err() {
            return Err(HostError::Unsupported(
                "network.egress = true needs nftables (the `nft` program); install it (make deps \
                 does) or turn egress off"
                    .into(),
            ));
        }
        let state = &config.state_dir;
        make_dir(state)?;
        let report = engine::records::sweep(state).map_err(|source| HostError::Sweep {
            path: state.clone(),
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
        // The VMs' runtime directories (their jails' roots) live here.
        make_dir(&runtime_parent(state))?;
        let root = rustix::process::geteuid().is_root();
        let run_as = if root {
            let user = &config.sandbox.user;
            Some(lookup_user(user).map_err(|source| HostError::User {
                user: user.clone(),
                source,
            })?)
        } else {
            None
        };
        let jail = if root {
            Some(jail_settings(&config.sandbox, notice)?)
        } else {
            None
        };
        let cgroups = match CgroupHost::detect() {
            Ok(host) => Some(host),
            Err(error) => {
                notice(&format!("VMs run without memory/CPU/pid limits: {error}"));
                None
            }
        };
        let cache = Cache::open(config.cache.clone())?;
        if let Some(jail) = jail.as_ref().filter(|jail| !jail.namespaces) {
            // Without namespaces QEMU opens cached boot files and its runtime directory by
            // their host paths, as a user of the VM range: others must pass through.
            for dir in [cache.root().to_path_buf(), runtime_parent(state)] {
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
        let pool = Arc::new(WarmPool::new(config.warm_pool, cache.clone()));
        let file_policy = image_manager::FilePolicy::Within(config.images.file_dirs.clone());
        Ok(Host {
            file_policy,
            egress_allow,
            dns_upstreams,
            config,
            cache,
            pool,
            run_as,
            jail,
            cgroups,
            qemu,
            tsc_khz: engine::tsc::host_tsc_khz(),
            snapshots,
            accel: OnceCell::new(),
        })
    }

    /// Lets payloads name any local file as their image unless the configuration lists
    /// directories: for `taskvm run`, whose user runs their own task.
    pub fn allow_any_local_file(&mut self) {
        if self.config.images.file_dirs.is_empty() {
            self.file_policy = image_manager::FilePolicy::Any;
        }
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
            state_dir: Some(self.config.state_dir.clone()),
            cgroups: self.cgroups.clone(),
            network: Some(NetworkSettings {
                egress: self.config.network.egress,
                egress_allow: self.egress_allow.clone(),
                dns_upstreams: self.dns_upstreams.clone(),
                ..NetworkSettings::default()
            }),
            drives: Vec::new(),
            max_file_size: Some(self.config.sandbox.max_file_size),
            max_console_size: Some(self.config.sandbox.max_console_size),
        }
    }

    /// Another lease on the image `lease` holds (a VM consumes the one it is given).
    pub fn lease_again(&self, lease: &Lease) -> Result<Lease, VmError> {
        self.cache
            .lease(lease.digest())
            .map_err(|error| VmError::Setup(std::io::Error::other(error.to_string())))?
            .ok_or_else(|| VmError::Setup(std::io::Error::other("the image left the cache")))
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
        )
    }

    /// The snapshot of `key` (see [`Host::snapshot_key`]) for a VM of `machine` on `lease`
    /// with `settings`: the stored one, or one made now by booting the image once (concurrent
    /// callers wait for that one).
    pub async fn snapshot_for(
        &self,
        key: &str,
        lease: &Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
    ) -> Result<Got, VmError> {
        let builder_lease = self.lease_again(lease)?;
        let build_settings = VmSettings {
            name: format!("{}-snapshot", settings.name),
            ..settings.clone()
        };
        self.snapshots
            .get_or_build(key, |dir| async move {
                let snapshot = engine::snapshot::build(
                    builder_lease,
                    machine,
                    &build_settings,
                    &dir,
                    READY_TIMEOUT,
                )
                .await?;
                SnapshotStore::label(&dir, lease).map_err(VmError::Setup)?;
                Ok(snapshot)
            })
            .await
    }

    /// Where VMs' runtime directories go.
    pub fn runtime_parent(&self) -> PathBuf {
        runtime_parent(&self.config.state_dir)
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
                let cache_file = self.config.state_dir.join("accel.json");
                let decision = decide(self.config.accel, &cache_file, spec.as_ref()).await;
                if let Some(line) = &decision.notice {
                    notice(line);
                }
                if self.config.accel == Accel::Auto && decision.accelerator == Accelerator::Kvm {
                    notice("using KVM");
                }
                decision.accelerator
            })
            .await
    }
}

impl Host {
    /// The kernel the KVM probe boots: `sandbox.probeKernel`, else the host's own
    /// `/boot/vmlinuz-RELEASE` when it exists.
    fn probe_kernel(&self) -> Option<PathBuf> {
        if let Some(kernel) = &self.config.sandbox.probe_kernel {
            return Some(kernel.clone());
        }
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let own = PathBuf::from(format!("/boot/vmlinuz-{}", release.trim()));
        own.is_file().then_some(own)
    }
}

/// The jail every VM gets: the id range checked against the host's accounts, and whether this
/// host lets QEMU have namespaces of its own (refused without them unless the configuration
/// allows weaker isolation). Says in one line what isolation VMs get.
fn jail_settings(
    sandbox: &schemas::config::SandboxConfig,
    notice: &dyn Fn(&str),
) -> Result<JailSettings, HostError> {
    let range = &sandbox.id_range;
    let ids = engine::ids::IdRange::new(range.first, range.count)
        .map_err(|error| HostError::Unsupported(error.to_string()))?;
    ids.check_host()
        .map_err(|error| HostError::Unsupported(error.to_string()))?;
    let mut jail = JailSettings::new(ids);
    let end = u64::from(ids.first) + u64::from(ids.count);
    match engine::jail::check_namespaces() {
        Ok(()) => notice(&format!(
            "isolation: every QEMU jailed: a user and group of its own (sandbox.idRange {}..{end}), \
             its own mount, network, IPC and UTS namespaces with its runtime directory as root \
             (the host's /usr read-only, /dev with null, zero, random, urandom and kvm under KVM), \
             an empty environment, no new privileges, seccomp; not in a PID namespace of its own",
            ids.first
        )),
        Err(error) if sandbox.allow_weak_isolation => {
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

fn runtime_parent(state: &Path) -> PathBuf {
    state.join("run")
}

/// Fails unless every ancestor of `dir` (and `dir`) lets others search it, so that `uid`
/// (not the owner) can reach files below.
fn check_reachable(dir: &Path, uid: u32) -> Result<(), HostError> {
    use std::os::unix::fs::MetadataExt;
    let absolute = fs::canonicalize(dir).map_err(|source| HostError::Directory {
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
fn make_dir(path: &Path) -> Result<(), HostError> {
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

/// `network.egressAllow` and `network.dnsServers`, parsed (the schema checked their shape).
fn network_lists(
    config: &WorkerConfig,
) -> Result<
    (
        Vec<engine::egress_policy::Ipv4Cidr>,
        Vec<std::net::SocketAddr>,
    ),
    HostError,
> {
    let network = &config.network;
    let allow = network
        .egress_allow
        .iter()
        .map(|cidr| {
            cidr.0
                .parse()
                .map_err(|error| HostError::Unsupported(format!("network.egressAllow: {error}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let resolvers = network
        .dns_servers
        .iter()
        .map(|resolver| {
            let text = &resolver.0;
            text.parse::<std::net::SocketAddr>()
                .or_else(|_| text.parse::<std::net::Ipv4Addr>().map(|ip| (ip, 53).into()))
                .map_err(|_| {
                    HostError::Unsupported(format!("network.dnsServers: not an address {text:?}"))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((allow, resolvers))
}
