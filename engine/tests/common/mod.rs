//! The harness every engine test shares: a scratch directory the sandbox user can traverse,
//! an image cache in it holding the test images, and the settings of a TCG VM — on its own
//! isolated network, or without one — and of the KVM probe.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use engine::host::accel::ProbeSpec;
use engine::network::NetworkSettings;
use engine::qemu::process::lookup_user;
use engine::sandbox::cgroup::CgroupHost;
use engine::sandbox::jail::JailSettings;
use engine::{Accelerator, Netdev, VmSettings};
use image_manager::{Cache, ImageRequest, Lease};
use schemas::config::CacheConfig;
use schemas::{resolve_machine, Machine, MachineLayers, MachineLimits, ResolvedMachine};
use testkit::guest::{host_tsc_khz, minimal_image};

/// A test's scratch directory and image cache (root only: VM networks need namespaces).
pub struct Fixture {
    /// The scratch directory (0755).
    pub scratch: tempfile::TempDir,
    cache: Cache,
}

impl Fixture {
    /// A new scratch directory with an empty cache.
    pub fn new() -> Fixture {
        let scratch = tempfile::tempdir().unwrap();
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cache = Cache::open(CacheConfig {
            dir: scratch.path().join("cache"),
            ..CacheConfig::default()
        })
        .unwrap();
        Fixture { scratch, cache }
    }

    /// A scratch directory made inside `dir`, with the cache at `dir/cache` (shared by every
    /// fixture made there): for a child process of a test.
    #[allow(dead_code)]
    pub fn within(dir: &std::path::Path) -> Fixture {
        let cache = Cache::open(CacheConfig {
            dir: dir.join("cache"),
            ..CacheConfig::default()
        })
        .unwrap();
        let scratch = tempfile::TempDir::new_in(dir).unwrap();
        Fixture { scratch, cache }
    }

    /// A lease on the minimal test image.
    pub fn lease(&self) -> Lease {
        self.lease_of(&minimal_image())
    }

    /// A lease on the test image at `image`.
    #[allow(dead_code)]
    pub fn lease_of(&self, image: &std::path::Path) -> Lease {
        let request = ImageRequest::parse(image.to_str().unwrap(), None).unwrap();
        self.cache.fetch(&request, &|_| {}).unwrap().0
    }

    /// The image cache's directory.
    #[allow(dead_code)]
    pub fn cache_dir(&self) -> &std::path::Path {
        self.cache.root()
    }

    /// A TCG VM called `name`, as `nobody`, on its own network with the guest at
    /// `guest_address`.
    #[allow(dead_code)]
    pub fn settings(&self, name: &str, guest_address: Ipv4Addr) -> VmSettings {
        assert!(
            rustix::process::geteuid().is_root(),
            "VM networks need root (network namespaces and taps)"
        );
        VmSettings {
            runtime_parent: self.scratch.path().join("run"),
            name: name.to_owned(),
            accelerator: Accelerator::Tcg,
            jail: Some(JailSettings::default()),
            run_as: Some(lookup_user("nobody").unwrap()),
            netdev: Netdev::RestrictedUser,
            qemu: "qemu-system-x86_64".into(),
            tsc_khz: host_tsc_khz(),
            start_timeout: Duration::from_secs(10),
            state_dir: Some(self.scratch.path().join("state")),
            cgroups: None,
            network: Some(NetworkSettings {
                guest_address,
                ..NetworkSettings::default()
            }),
            drives: Vec::new(),
            max_file_size: None,
            max_console_size: None,
        }
    }
}

impl Fixture {
    /// A TCG VM called `name` without a network of its own (a user-mode or no NIC); jailed,
    /// as `nobody` and in control groups when the test runs as root.
    #[allow(dead_code)]
    pub fn settings_without_network(&self, name: &str) -> VmSettings {
        let root = rustix::process::geteuid().is_root();
        VmSettings {
            runtime_parent: self.scratch.path().join("run"),
            name: name.to_owned(),
            accelerator: Accelerator::Tcg,
            jail: root.then(JailSettings::default),
            run_as: root.then(|| lookup_user("nobody").unwrap()),
            netdev: Netdev::RestrictedUser,
            qemu: "qemu-system-x86_64".into(),
            tsc_khz: host_tsc_khz(),
            start_timeout: Duration::from_secs(10),
            state_dir: Some(self.scratch.path().join("state")),
            // As root on Linux the host must offer them; a failure here is a finding.
            cgroups: root.then(|| CgroupHost::detect().unwrap()),
            network: None,
            drives: Vec::new(),
            max_file_size: None,
            max_console_size: None,
        }
    }

    /// The KVM probe of the minimal image's kernel (standing for the host's trusted one),
    /// jailed like a VM when the test runs as root, in `probe/` of the scratch directory.
    #[allow(dead_code)]
    pub fn probe_spec(&self, lease: &Lease, watchdog: Duration) -> ProbeSpec {
        let root = rustix::process::geteuid().is_root();
        ProbeSpec {
            qemu: "qemu-system-x86_64".into(),
            kernel: lease
                .kernel_path()
                .expect("the minimal image boots a kernel"),
            jail: root.then(JailSettings::default),
            run_as: root.then(|| lookup_user("nobody").unwrap()),
            scratch: self.scratch.path().join("probe"),
            tsc_khz: host_tsc_khz(),
            watchdog,
        }
    }
}

/// The image's machine under small limits (1 GiB, 1 CPU).
#[allow(dead_code)]
pub fn resolved(lease: &Lease) -> ResolvedMachine {
    resolved_with(lease, |_| {})
}

/// The image's machine changed by `tweak`, under small limits (1 GiB, 1 CPU).
#[allow(dead_code)]
pub fn resolved_with(lease: &Lease, tweak: impl FnOnce(&mut Machine)) -> ResolvedMachine {
    let mut image = lease.machine().clone();
    tweak(&mut image);
    resolved_machine(&image)
}

/// `machine` as an image's, under small limits (1 GiB, 1 CPU).
pub fn resolved_machine(machine: &Machine) -> ResolvedMachine {
    let limits = MachineLimits {
        max_memory: 1024,
        max_cpus: 1,
        default_threads: 1,
    };
    let layers = MachineLayers {
        image: Some(machine),
        ..MachineLayers::default()
    };
    resolve_machine(layers, &limits).unwrap()
}
pub mod nets;
