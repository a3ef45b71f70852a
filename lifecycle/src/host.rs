//! What a worker prepares once and all its tasks share: the engine's host ([`VmHost`]: the
//! jail, control groups, the accelerator verdict, snapshots, and the start-up sweep that
//! removes what a worker killed with `kill -9` left behind), the image cache and the warm pool.

use std::path::PathBuf;
use std::sync::Arc;

use engine::host::{HostSettings, VmHost};
use engine::snapshot::store::Got;
use engine::{Accelerator, VmError, VmSettings};
use image_manager::{Cache, Lease};
use schemas::{ResolvedMachine, WorkerConfig};
use thiserror::Error;

use super::pool::WarmPool;
use crate::caches::CacheStore;

/// Why the host cannot run tasks.
#[derive(Debug, Error)]
pub enum HostError {
    /// The engine cannot run VMs here (or a directory could not be made).
    #[error(transparent)]
    Engine(#[from] engine::host::HostError),
    /// The image cache could not be opened.
    #[error("image cache: {0}")]
    Cache(#[from] image_manager::ImageError),
    /// A setting asks for something this version cannot do.
    #[error("{0}")]
    Unsupported(String),
}

/// The shared, prepared host.
pub struct Host {
    /// The configuration tasks run under.
    pub config: WorkerConfig,
    /// The image cache.
    pub cache: Cache,
    /// The host as the engine prepared it: jail, control groups, accelerator, snapshots.
    pub vms: VmHost,
    /// The writable caches payloads mount.
    pub caches: CacheStore,
    /// The read-only content payloads mount (beside the image cache: `cache.dir/content`).
    pub contents: image_manager::content::ContentStore,
    /// Paused VMs ready for the most used image (empty unless `warmPool` is set).
    pub pool: Arc<WarmPool>,
    /// Where payloads' `file://` images may come from: the configuration's `images.fileDirs`
    /// (none when empty); `taskvm run` widens an empty list to any file with
    /// [`Host::allow_any_local_file`].
    pub file_policy: image_manager::FilePolicy,
}

impl Host {
    /// Prepares the host for `config`: the engine's host ([`VmHost::prepare`]: privileges,
    /// the sweep of a crashed worker's leftovers, jail, control groups, snapshots), then the
    /// image cache and the warm pool. `notice` receives one line per thing worth knowing.
    pub fn prepare(mut config: WorkerConfig, notice: &dyn Fn(&str)) -> Result<Host, HostError> {
        // QEMU and qemu-img resolve paths from other directories (a backing file is relative
        // to its overlay): every directory is made absolute once, here.
        let mut dirs = vec![&mut config.state_dir, &mut config.cache.dir];
        dirs.extend(config.mounts.cache_dir.as_mut());
        for dir in dirs {
            *dir = std::path::absolute(&*dir).map_err(|source| {
                engine::host::HostError::Directory {
                    path: dir.clone(),
                    source,
                }
            })?;
        }
        let vms = VmHost::prepare(host_settings(&config)?, notice)?;
        let cache = Cache::open(config.cache.clone())?;
        let pool = Arc::new(WarmPool::new(config.warm_pool, cache.clone()));
        let contents_dir = config.cache.dir.join("content");
        let contents = image_manager::content::ContentStore::open(
            &contents_dir,
            config.cache.clone(),
            config.mounts.cache_budget,
        )
        .map_err(|source| engine::host::HostError::Directory {
            path: contents_dir.clone(),
            source,
        })?;
        let caches = CacheStore::for_config(&config).map_err(|source| {
            engine::host::HostError::Directory {
                path: (config.mounts.cache_dir.clone())
                    .unwrap_or_else(|| config.state_dir.join("caches")),
                source,
            }
        })?;
        let file_policy = image_manager::FilePolicy::Within(config.images.file_dirs.clone());
        Ok(Host {
            file_policy,
            config,
            cache,
            caches,
            contents,
            pool,
            vms,
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
        self.vms.vm_settings(name, accelerator)
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
        self.vms.snapshot_key(lease, machine, settings)
    }

    /// The snapshot of `key` for a VM of `machine` on `lease` with `settings`: the stored one,
    /// or one made now ([`VmHost::snapshot_for`]).
    pub async fn snapshot_for(
        &self,
        key: &str,
        lease: &Lease,
        machine: &ResolvedMachine,
        settings: &VmSettings,
    ) -> Result<Got, VmError> {
        let builder_lease = self.lease_again(lease)?;
        self.vms
            .snapshot_for(key, lease, builder_lease, machine, settings)
            .await
    }

    /// Where the shared blank disk of unused mount slots is kept.
    pub fn slots_dir(&self) -> PathBuf {
        self.config.state_dir.join("slots")
    }

    /// Where VMs' runtime directories go.
    pub fn runtime_parent(&self) -> PathBuf {
        self.vms.runtime_parent()
    }

    /// The accelerator, decided on first use ([`VmHost::accelerator`]).
    pub async fn accelerator(&self, notice: &(dyn Fn(&str) + Sync)) -> Accelerator {
        self.vms.accelerator(notice).await
    }
}

/// What the engine is told about the host, from the configuration.
fn host_settings(config: &WorkerConfig) -> Result<HostSettings, HostError> {
    let (egress_allow, dns_upstreams) = network_lists(config)?;
    let sandbox = &config.sandbox;
    Ok(HostSettings {
        state_dir: config.state_dir.clone(),
        shared_dirs: vec![config.cache.dir.clone()],
        sandbox_user: sandbox.user.clone(),
        id_range: sandbox.id_range,
        allow_weak_isolation: sandbox.allow_weak_isolation,
        probe_kernel: sandbox.probe_kernel.clone(),
        accel: config.accel,
        egress: config.network.egress,
        egress_allow,
        dns_upstreams,
        max_file_size: sandbox.max_file_size,
        max_console_size: sandbox.max_console_size,
    })
}

/// `network.egressAllow` and `network.dnsServers`, parsed (the schema checked their shape).
fn network_lists(
    config: &WorkerConfig,
) -> Result<
    (
        Vec<engine::network::egress_policy::Ipv4Cidr>,
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
