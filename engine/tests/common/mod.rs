//! The harness the network, snapshot and jail tests share: a scratch directory an image cache in it holding the minimal test image, and the settings of a TCG
//! VM on its own isolated network.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use engine::jail::JailSettings;
use engine::network::NetworkSettings;
use engine::process::lookup_user;
use engine::{Accelerator, Netdev, VmSettings};
use image_manager::{Cache, ImageRequest, Lease};
use schemas::config::CacheConfig;
use schemas::{resolve_machine, MachineLayers, MachineLimits, ResolvedMachine};
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
        assert!(
            rustix::process::geteuid().is_root(),
            "VM networks need root (network namespaces and taps)"
        );
        let scratch = tempfile::tempdir().unwrap();
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cache = Cache::open(CacheConfig {
            dir: scratch.path().join("cache"),
            ..CacheConfig::default()
        })
        .unwrap();
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
    pub fn settings(&self, name: &str, guest_address: Ipv4Addr) -> VmSettings {
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

/// The image's machine under small limits (1 GiB, 1 CPU).
pub fn resolved(lease: &Lease) -> ResolvedMachine {
    let limits = MachineLimits {
        max_memory: 1024,
        max_cpus: 1,
        default_threads: 1,
    };
    let layers = MachineLayers {
        image: Some(lease.machine()),
        ..MachineLayers::default()
    };
    resolve_machine(layers, &limits).unwrap()
}
pub mod nets;
