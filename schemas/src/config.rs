//! The worker's configuration file: limits, directories, acceleration, sandbox, network and
//! queue settings. Every field has a default, so `{}` is a valid configuration.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::limits::MachineLimits;
use crate::machine::Machine;

/// Configuration of a taskvm worker (`taskvm run`, `serve` and `worker` read the same file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
#[schemars(title = "WorkerConfig")]
pub struct WorkerConfig {
    /// What one VM may have on this host.
    pub limits: MachineLimits,
    /// Machine defaults of this worker: below the image's `machine.json`, above the built-in
    /// defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
    /// The image cache.
    pub cache: CacheConfig,
    /// Directory for the worker's own state (records of running VMs, queue database).
    pub state_dir: PathBuf,
    /// Largest number of tasks run at once.
    #[schemars(range(min = 1, max = 256))]
    pub concurrency: u32,
    /// Which accelerator runs the VMs.
    pub accel: Accel,
    /// How task VMs start: booted, or restored from a snapshot of the image booted once.
    pub start: StartMode,
    /// VMs kept restored and paused (0 % CPU, their memory resident) for the most used image
    /// and machine, so that a task starts in milliseconds; 0 (the default) keeps none. Only
    /// long-running workers benefit; `taskvm run` ends with its task.
    #[schemars(range(max = 64))]
    pub warm_pool: u32,
    /// How QEMU is confined.
    pub sandbox: SandboxConfig,
    /// What the guests' networks allow.
    pub network: NetworkConfig,
    /// What one task's artifacts may cost the host.
    pub artifacts: ArtifactConfig,
    /// Where image references may point.
    pub images: ImageSourceConfig,
    /// Payloads' `mounts`: where caches live and what they may cost.
    pub mounts: MountsConfig,
    /// Failed VMs kept for debugging (a payload's `debug.keepOnFailure`).
    pub kept: KeptConfig,
    /// Where tasks come from; unset for `taskvm run`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueConfig>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            limits: MachineLimits::default(),
            machine: None,
            cache: CacheConfig::default(),
            state_dir: PathBuf::from("/var/lib/taskvm"),
            concurrency: 1,
            accel: Accel::Auto,
            start: StartMode::Auto,
            warm_pool: 0,
            sandbox: SandboxConfig::default(),
            network: NetworkConfig::default(),
            artifacts: ArtifactConfig::default(),
            images: ImageSourceConfig::default(),
            mounts: MountsConfig::default(),
            kept: KeptConfig::default(),
            queue: None,
        }
    }
}

/// The content-addressed image cache and the caps applied to every image it takes in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Directory of the cache.
    pub dir: PathBuf,
    /// Garbage collection removes least-recently-used images until the cache is at most this
    /// many bytes.
    pub max_size: u64,
    /// Garbage collection also removes images until the file system has this many bytes free.
    pub min_free: u64,
    /// Largest compressed image, in bytes.
    pub max_compressed_size: u64,
    /// Largest total size of an image's unpacked files, in bytes (holes included).
    pub max_unpacked_size: u64,
    /// Largest single file in an image, in bytes.
    pub max_file_size: u64,
    /// Largest number of entries in an image's tarball.
    #[schemars(range(min = 2, max = 64))]
    pub max_entries: u32,
    /// Largest `machine.json`, in bytes.
    #[schemars(range(min = 2, max = 1_048_576))]
    pub max_machine_json_size: u32,
    /// Seconds a download may go without receiving a byte before it is abandoned.
    #[schemars(range(min = 1, max = 3600))]
    pub stall_timeout: u32,
    /// Seconds a whole download may take (a server trickling bytes never stalls).
    #[schemars(range(min = 1, max = 86_400))]
    pub download_timeout: u32,
}

const GIB: u64 = 1 << 30;

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: PathBuf::from("/var/cache/taskvm"),
            max_size: 50 * GIB,
            min_free: 10 * GIB,
            max_compressed_size: 20 * GIB,
            max_unpacked_size: 100 * GIB,
            max_file_size: 100 * GIB,
            max_entries: 8,
            max_machine_json_size: 1_048_576,
            stall_timeout: 60,
            download_timeout: 3600,
        }
    }
}

/// What one task may send to the host as artifacts, all its artifacts together. A task that
/// goes over any of these fails, naming the setting; the artifact being collected is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ArtifactConfig {
    /// Most bytes the guest may send for one task's artifacts (a directory's tar headers
    /// included).
    #[schemars(range(min = 1))]
    pub max_bytes: u64,
    /// Most entries (files, directories and left-out entries) of one task's artifacts.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_entries: u32,
    /// Seconds collecting one task's artifacts may take in all.
    #[schemars(range(min = 1, max = 86_400))]
    pub timeout: u32,
    /// Slowest average rate, in bytes per second, at which the guest may send artifacts once
    /// their collection has run for 10 s.
    pub min_rate: u64,
}

impl Default for ArtifactConfig {
    fn default() -> Self {
        ArtifactConfig {
            max_bytes: 4 * GIB,
            max_entries: 20_000,
            timeout: 600,
            min_rate: 64 * 1024,
        }
    }
}

/// Payloads' `mounts`: the writable caches kept between tasks, and the disks every mount is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MountsConfig {
    /// Directory of the caches; unset: `STATE_DIR/caches`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// The size in bytes of every mount's disk as the guest sees it (a cache can hold no
    /// more); the host stores only what was written. A change discards the caches of the old
    /// size and the snapshots of VMs with mounts.
    #[schemars(range(min = 16_777_216u64, max = 1_099_511_627_776u64))]
    pub disk_size: u64,
    /// Copies kept of one cache (tasks running at once each need their own); a task finding
    /// them all busy gets a fresh one that is discarded after it.
    #[schemars(range(min = 1, max = 64))]
    pub cache_copies: u32,
    /// Bytes the kept copies of all caches may take on the host's disk (what was written to
    /// them); past it, the least recently used copies no task holds are removed before a
    /// task checks one out (`taskvm cache gc` does the same).
    pub cache_budget: u64,
}

impl Default for MountsConfig {
    fn default() -> Self {
        MountsConfig {
            cache_dir: None,
            disk_size: 8 * GIB,
            cache_copies: 2,
            cache_budget: 32 * GIB,
        }
    }
}

/// Failed VMs kept frozen for debugging, under `STATE_DIR/kept/`: each one's memory and disk
/// as a snapshot of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KeptConfig {
    /// Most VMs kept; past it the oldest are deleted. 0 keeps none (`keepOnFailure` is then
    /// ignored, and the log says so).
    #[schemars(range(max = 256))]
    pub max_count: u32,
    /// Bytes the kept VMs may take on the host's disk together; past it the oldest are
    /// deleted.
    pub max_size: u64,
    /// Seconds a kept VM is kept; then it is deleted with everything it held.
    #[schemars(range(min = 1, max = 2_592_000))]
    pub ttl: u64,
    /// Seconds a resumed kept VM runs for one `taskvm debug` before it is discarded again.
    #[schemars(range(min = 1, max = 86_400))]
    pub resume_time: u64,
}

impl Default for KeptConfig {
    fn default() -> Self {
        KeptConfig {
            max_count: 4,
            max_size: 16 * GIB,
            ttl: 86_400,
            resume_time: 1_800,
        }
    }
}

/// Where image references may point. URLs over http(s) are always allowed; `file://` URLs
/// and local paths only below the directories listed here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ImageSourceConfig {
    /// Directories that `file://` image references may name files in. Empty (the default):
    /// `taskvm serve` and `taskvm worker` refuse file references, and `taskvm run` allows
    /// any file its user names.
    #[schemars(length(max = 64))]
    pub file_dirs: Vec<PathBuf>,
}

/// Accelerator choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when a probe boot shows it works on this host, TCG otherwise.
    Auto,
    /// KVM, failing when it is unusable.
    Kvm,
    /// QEMU's software emulation (multi-threaded TCG).
    Tcg,
}

/// How task VMs start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StartMode {
    /// Restore from the image's snapshot, made on first use; an image whose snapshot cannot
    /// be made (no taskvm agent) is remembered and booted from then on.
    Auto,
    /// Always boot.
    Boot,
    /// Restore from the image's snapshot, made on first use, trying again for every task when
    /// making it fails. A snapshot that does not restore is discarded and the task booted.
    Snapshot,
}

/// How QEMU is confined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Unprivileged user (name or numeric uid) QEMU runs as when it is not jailed (only with
    /// `allowWeakIsolation` on a host that cannot jail it, for the probe of such hosts, and
    /// for tools); jailed VMs get a user of their own from `idRange`.
    #[schemars(length(min = 1, max = 64))]
    pub user: String,
    /// The user and group ids VMs are given, one per running VM (the same number for both):
    /// ids no account of the host uses (checked against /etc/passwd, /etc/group,
    /// /etc/subuid and /etc/subgid at start). Shared by every worker of the host.
    pub id_range: IdRangeConfig,
    /// Run VMs although QEMU cannot be put in namespaces of its own on this host (e.g. a
    /// container that forbids mounts): QEMU then still runs as a user of its own, but sees the
    /// host's file system and network namespace. Off: such a host refuses to start VMs.
    pub allow_weak_isolation: bool,
    /// The Linux kernel the KVM probe of `accel = "auto"` boots: one this host trusts, never
    /// a task's. Unset: the host's own `/boot/vmlinuz-RELEASE` when present; without one,
    /// `auto` uses TCG.
    #[schemars(length(min = 1, max = 4096))]
    pub probe_kernel: Option<PathBuf>,
    /// The largest file a VM's QEMU may write, in bytes: its disk overlay (what the guest
    /// writes to its disk), its serial console and its messages. A VM that goes past it is
    /// stopped and its task fails.
    #[schemars(range(min = 1_048_576))]
    pub max_file_size: u64,
    /// The largest serial console log of a VM, in bytes; a VM whose console passes it is
    /// stopped and its task fails.
    #[schemars(range(min = 65_536))]
    pub max_console_size: u64,
}

/// A range of user and group ids: `first` up to, not including, `first + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdRangeConfig {
    /// The first id.
    #[schemars(range(min = 1))]
    pub first: u32,
    /// How many ids: the most VMs (and KVM probes) the host's workers run at once.
    #[schemars(range(min = 1))]
    pub count: u32,
}

impl Default for IdRangeConfig {
    /// 65 536 ids from 1 879 113 728 (0x70010000): above the ranges systemd gives accounts,
    /// dynamic users and containers, and far from the usual subordinate id ranges.
    fn default() -> Self {
        IdRangeConfig {
            first: 0x7001_0000,
            count: 65_536,
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            user: "nobody".to_owned(),
            id_range: IdRangeConfig::default(),
            allow_weak_isolation: false,
            probe_kernel: None,
            max_file_size: 32 * GIB,
            max_console_size: 64 << 20,
        }
    }
}

/// What the guests' isolated networks allow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Let guests reach the outside world through NAT. Off: a guest reaches the metadata
    /// service and nothing else. On: everything but internal and special ranges (RFC 1918,
    /// 100.64/10, 0/8, 127/8, 169.254/16, 192.0.0/24, 198.18/15, 224/4, 240/4), cloud
    /// host-agent addresses and the host's own networks, and DNS through a forwarder on the
    /// metadata address that refuses answers naming such addresses.
    pub egress: bool,
    /// Networks (`A.B.C.D/N`) guests with egress may reach although they are denied by
    /// default, e.g. a cache on the LAN.
    #[schemars(length(max = 256))]
    pub egress_allow: Vec<Cidr>,
    /// Resolvers (`A.B.C.D` or `A.B.C.D:PORT`) the guests' DNS queries are forwarded to; empty
    /// (the default): the host's own, from `/etc/resolv.conf`.
    #[schemars(length(max = 8))]
    pub dns_servers: Vec<Resolver>,
}

/// An IPv4 network, `A.B.C.D/N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Cidr(
    #[schemars(regex(
        pattern = r"^(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}/([0-9]|[12][0-9]|3[0-2])$"
    ))]
    pub String,
);

/// A resolver's IPv4 address, with an optional port: `A.B.C.D` or `A.B.C.D:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Resolver(
    #[schemars(regex(
        pattern = r"^(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}(:[0-9]{1,5})?$"
    ))]
    pub String,
);

/// Where a long-running worker takes its tasks from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
// One per configuration, read once: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum QueueConfig {
    /// `taskvm serve`: the embedded queue with its HTTP API and web UI.
    Embedded(EmbeddedQueueConfig),
    /// `taskvm worker`: claim tasks from a Taskcluster queue.
    Taskcluster(TaskclusterQueueConfig),
}

/// Settings of the embedded queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmbeddedQueueConfig {
    /// Address of the HTTP API and web UI. Anything but loopback requires an access token.
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}

/// Settings of the Taskcluster provider. Credentials may also come from the standard
/// `TASKCLUSTER_*` environment variables, which take precedence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskclusterQueueConfig {
    /// Root URL of the Taskcluster deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub root_url: Option<String>,
    /// Task queue to claim from (`provisionerId/workerType`).
    #[schemars(regex(pattern = r"^[a-zA-Z0-9_-]{1,38}/[a-z]([-a-z0-9]{0,36}[a-z0-9])?$"))]
    pub task_queue_id: String,
    /// Worker group of this worker.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9_-]{1,38}$"))]
    pub worker_group: String,
    /// Worker id of this worker.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9_-]{1,38}$"))]
    pub worker_id: String,
    /// Largest number of tasks claimed at once.
    #[serde(default = "default_capacity")]
    #[schemars(range(min = 1, max = 256))]
    pub capacity: u32,
    /// Client id, unless `TASKCLUSTER_CLIENT_ID` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Access token, unless `TASKCLUSTER_ACCESS_TOKEN` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// Certificate of temporary credentials, unless `TASKCLUSTER_CERTIFICATE` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Address (`IP:PORT`) the live log is served on while tasks run; none: the log is
    /// published when the task ends only. `--livelog-listen` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub live_log_listen: Option<String>,
    /// The base URL clients reach the live log address by (a proxy in front of it, a public
    /// host name); default `http://` and the listen address. `--livelog-url` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"), length(max = 1024))]
    pub live_log_url: Option<String>,
    /// Join this worker-manager pool instead of using client credentials (as
    /// `--worker-pool-id`): register with the static secret, claim with the temporary
    /// credentials it hands out, renew them, drain once removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z0-9_-]{1,38}/[a-z]([-a-z0-9]{0,36}[a-z0-9])?$"))]
    pub worker_pool_id: Option<String>,
    /// The pool's provider (default `static`; `--provider-id` overrides it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z0-9_-]{1,38}$"))]
    pub provider_id: Option<String>,
    /// File holding the static secret (`--static-secret-file` overrides it; else the
    /// environment variable `TASKVM_STATIC_SECRET`). Never the secret itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub static_secret_file: Option<std::path::PathBuf>,
}

fn default_capacity() -> u32 {
    1
}
