//! `MutableImage` from files of the host's: an installer ISO (from `make test-images`) boots
//! first on q35, installs onto a fresh empty disk and powers off; packaging that disk twice
//! gives the same bytes. The ISO sits where the sandbox user cannot read it: the engine hands
//! QEMU an open descriptor.

#[allow(dead_code)] // the harness serves tests that use the cache too
mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::Fixture;
use engine::disk::drives::{BootSource, ExtraDrive, HostDisk, HostFiles};
use engine::vm::mutable::MutableImage;
use engine::ExitKind;
use schemas::migrate_machine_definition;
use testkit::guest::installer_iso;
use testkit::images::sha256_file;

#[tokio::test(flavor = "multi_thread")]
async fn an_installer_iso_fills_a_fresh_disk_that_packages_to_the_same_bytes_twice() {
    let fixture = Fixture::new();
    // A private copy in a directory only root can enter.
    let private = fixture.scratch.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let iso = private.join("installer.iso");
    std::fs::copy(installer_iso(), &iso).unwrap();
    let iso_sha = sha256_file(&iso);

    let machine = migrate_machine_definition(&serde_json::json!({
        "version": 1, "chipset": "q35", "memory": 256, "cpu": "qemu64",
        "network": "virtio-net-pci", "storage": "virtio-blk-pci", "graphics": "none"
    }))
    .unwrap();
    let resolved = common::resolved_machine(&machine);
    let mut settings = fixture.settings("installer", engine::network::DEFAULT_GUEST_ADDRESS);
    settings.drives.push(ExtraDrive::installer_cdrom(&iso));
    let source = BootSource::Files(HostFiles {
        disk: HostDisk::Empty { size: 64 << 20 },
        kernel: None,
        initrd: None,
    });
    let mut image = MutableImage::boot(source, &resolved, &settings)
        .await
        .unwrap();
    assert!(
        image.vm().argv().iter().any(|arg| arg.starts_with("fd=")),
        "the ISO goes in as a descriptor: {:?}",
        image.vm().argv()
    );
    let ended = tokio::time::timeout(Duration::from_secs(120), image.wait())
        .await
        .expect("the installer powers off");
    let serial = image.vm().serial_output();
    assert_eq!(ended, ExitKind::PoweredOff, "{serial}");
    assert!(serial.contains("taskvm-installer: done"), "{serial}");

    let first = fixture.scratch.path().join("first.tar.zst");
    let second = fixture.scratch.path().join("second.tar.zst");
    let one = image.package(&machine, &first, 3, &|_| {}).unwrap();
    let two = image.package(&machine, &second, 3, &|_| {}).unwrap();
    assert_eq!(one, two);
    assert_eq!(format!("sha256:{}", sha256_file(&first)), one.to_string());
    assert_eq!(sha256_file(&first), sha256_file(&second));
    assert_eq!(sha256_file(&iso), iso_sha, "the ISO was written to");

    // The packaged disk holds what the installer wrote.
    let unpacked = fixture.scratch.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    let status = std::process::Command::new("tar")
        .args(["--zstd", "-xf"])
        .arg(&first)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(status.success());
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /installed.txt"])
        .arg(unpacked.join("disk.img"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout),
        "installed from the ISO\n"
    );
}
