//! The QEMU command line for representative machines, compared with readable golden files
//! under `tests/golden/` (one argument per line). `TASKVM_UPDATE_GOLDEN=1` rewrites them;
//! review the diff before committing.

use std::path::PathBuf;

use engine::qemu::cmdline::CmdlineError;
use engine::qemu::cmdline::{DiskLayer, FdSet, MemoryBackend};
use engine::{qemu_args, Accelerator, BootFiles, LaunchSpec, Netdev};
use schemas::{migrate_machine_definition, resolve_machine, Machine, MachineLayers, MachineLimits};
use serde_json::json;

fn machine(definition: serde_json::Value) -> Machine {
    migrate_machine_definition(&definition).unwrap_or_else(|v| panic!("{v}"))
}

fn resolved(image: &Machine, limits: MachineLimits) -> schemas::ResolvedMachine {
    resolve_machine(
        MachineLayers {
            image: Some(image),
            ..MachineLayers::default()
        },
        &limits,
    )
    .unwrap()
}

fn spec(accelerator: Accelerator, boot: Option<BootFiles>, netdev: Netdev) -> LaunchSpec {
    LaunchSpec {
        name: "vm-1".into(),
        accelerator,
        // The overlay and the image's disk, both inherited descriptors.
        disk: vec![
            DiskLayer {
                file: "/dev/fdset/0".into(),
                format: "qcow2".into(),
            },
            DiskLayer {
                file: "/dev/fdset/1".into(),
                format: "raw".into(),
            },
        ],
        boot,
        uuid: "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0".into(),
        mac: "02:00:00:12:34:56".into(),
        netdev,
        serial_log: "/dev/fdset/2".into(),
        qmp_fd: 5,
        vnc_socket: "/run/vnc.sock".into(),
        incoming: None,
        drives: Vec::new(),
        fd_sets: vec![
            FdSet { fd: 6, set: 0 },
            FdSet { fd: 7, set: 1 },
            FdSet { fd: 8, set: 2 },
        ],
        tsc_khz: Some(2_445_406),
        memory: None,
    }
}

fn check_golden(name: &str, args: &[String]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.args"));
    let text = args.join("\n") + "\n";
    if std::env::var_os("TASKVM_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        text,
        golden,
        "{} differs (TASKVM_UPDATE_GOLDEN=1 rewrites it)",
        path.display()
    );
}

fn limits(max_memory: u32, max_cpus: u32) -> MachineLimits {
    MachineLimits {
        max_memory,
        max_cpus,
        default_threads: 1,
    }
}

#[test]
fn minimal_test_image_on_microvm_with_a_tap_fd() {
    let image = machine(json!({
        "version": 1, "chipset": "microvm", "cpu": "qemu64", "memory": 256, "threads": 1, "cores": 1,
        "sockets": 1, "network": "virtio-net-device", "storage": "virtio-blk-device", "graphics": "none",
        "usb": "none", "sound": "none", "keyboard": "none", "mouse": "none", "tablet": "none",
        "boot": {"kernel": "vmlinux", "initrd": "initrd.img", "append": "root=/dev/vda console=ttyS0 quiet"}
    }));
    let boot = BootFiles {
        kernel: "/boot/kernel".into(),
        initrd: Some("/boot/initrd".into()),
        append: "root=/dev/vda console=ttyS0 quiet".into(),
    };
    let args = qemu_args(
        &resolved(&image, limits(1024, 2)),
        &spec(Accelerator::Tcg, Some(boot), Netdev::TapFd(3)),
    )
    .unwrap();
    check_golden("microvm-minimal", &args);
}

#[test]
fn a_restore_maps_the_snapshot_ram_file_private_and_loads_the_state_when_told() {
    let image = machine(json!({
        "version": 1, "chipset": "microvm", "memory": 256, "network": "virtio-net-device",
        "storage": "virtio-blk-device", "graphics": "none", "boot": {"kernel": "vmlinux", "append": "console=ttyS0"}
    }));
    let boot = BootFiles {
        kernel: "/boot/kernel".into(),
        initrd: None,
        append: "console=ttyS0".into(),
    };
    let mut spec = spec(Accelerator::Tcg, Some(boot), Netdev::TapFd(3));
    spec.memory = Some(MemoryBackend::File {
        path: "/ram".into(),
        shared: false,
    });
    spec.incoming = Some("defer".into());
    let args = qemu_args(&resolved(&image, limits(1024, 2)), &spec).unwrap();
    check_golden("microvm-restore-ram-file", &args);
    let joined = args.join(" ");
    assert!(
        joined.contains("-machine microvm,memory-backend=ram0"),
        "{joined}"
    );
    assert!(
        joined.contains("memory-backend-file,id=ram0,size=256M,mem-path=/ram,share=off"),
        "{joined}"
    );
}

#[test]
fn taskcluster_worker_v1_machine_on_kvm() {
    let image = machine(json!({
        "version": 1, "chipset": "pc-i440fx-2.8", "cpu": "host", "flags": ["+ssse3", "x2apic", "-avx"],
        "memory": 2048, "usb": "nec-usb-xhci", "network": "e1000", "storage": "virtio-blk-pci",
        "graphics": "qxl-vga", "sound": "hda-duplex/ich9-intel-hda", "keyboard": "usb-kbd",
        "keyboardLayout": "de-ch", "mouse": "usb-mouse", "tablet": "usb-tablet"
    }));
    let args = qemu_args(
        &resolved(
            &image,
            MachineLimits {
                max_memory: 4096,
                max_cpus: 8,
                default_threads: 2,
            },
        ),
        &spec(Accelerator::Kvm, None, Netdev::TapFd(4)),
    )
    .unwrap();
    check_golden("pc-taskcluster-worker-v1", &args);
}

#[test]
fn q35_display_with_vnc_and_nvme() {
    let image = machine(json!({
        "version": 1, "chipset": "q35", "graphics": "VGA", "storage": "nvme", "sound": "AC97",
        "network": "virtio-net-pci"
    }));
    let args = qemu_args(
        &resolved(&image, limits(512, 2)),
        &spec(Accelerator::Tcg, None, Netdev::RestrictedUser),
    )
    .unwrap();
    check_golden("q35-display", &args);
}

#[test]
fn incompatible_devices_are_refused_with_the_reason() {
    let cases = [
        (
            json!({"version": 1, "chipset": "microvm", "graphics": "VGA"}),
            "no display",
        ),
        (
            json!({"version": 1, "chipset": "microvm", "network": "e1000"}),
            "virtio-net-device",
        ),
        (
            json!({"version": 1, "chipset": "q35", "storage": "virtio-blk-device"}),
            "needs chipset microvm",
        ),
        (
            json!({"version": 1, "tablet": "usb-tablet", "usb": "none"}),
            "usb controller",
        ),
    ];
    let boot = BootFiles {
        kernel: "/k".into(),
        initrd: None,
        append: String::new(),
    };
    for (definition, expected) in cases {
        let image = machine(definition.clone());
        let error = qemu_args(
            &resolved(&image, limits(256, 1)),
            &spec(Accelerator::Tcg, Some(boot.clone()), Netdev::RestrictedUser),
        )
        .expect_err("incompatible machine");
        let CmdlineError::Incompatible(reason) = &error;
        assert!(reason.contains(expected), "{definition}: {error}");
    }
    let microvm = machine(
        json!({"version": 1, "chipset": "microvm", "network": "virtio-net-device", "storage": "virtio-blk-device", "graphics": "none", "usb": "none", "sound": "none"}),
    );
    let error = qemu_args(
        &resolved(&microvm, limits(256, 1)),
        &spec(Accelerator::Tcg, None, Netdev::RestrictedUser),
    )
    .unwrap_err();
    assert!(error.to_string().contains("direct kernel boot"), "{error}");
}

/// An installer build: the ISO as an IDE CD-ROM booted first and a cloud-init seed as a second
/// virtio disk, both inherited descriptors (`-add-fd`, `/dev/fdset/N`); on microvm a seed is
/// a virtio-mmio disk and a CD-ROM to boot from is refused.
#[test]
fn an_installer_cdrom_and_a_seed_disk_as_inherited_descriptors() {
    use engine::disk::drives::DriveMedia;
    use engine::qemu::cmdline::LaunchDrive;
    let image = machine(json!({
        "version": 1, "chipset": "q35", "network": "virtio-net-pci", "storage": "virtio-blk-pci",
        "graphics": "none"
    }));
    let mut launch = spec(Accelerator::Tcg, None, Netdev::TapFd(3));
    launch.drives = vec![
        LaunchDrive {
            file: "/dev/fdset/3".into(),
            format: "raw".into(),
            media: DriveMedia::Disk,
            read_only: true,
            boot_first: false,
            serial: Some("taskvm-slot0".into()),
        },
        LaunchDrive {
            file: "/dev/fdset/4".into(),
            format: "raw".into(),
            media: DriveMedia::Cdrom,
            read_only: true,
            boot_first: true,
            serial: None,
        },
    ];
    launch
        .fd_sets
        .extend([FdSet { fd: 9, set: 3 }, FdSet { fd: 10, set: 4 }]);
    let args = qemu_args(&resolved(&image, limits(512, 1)), &launch).unwrap();
    check_golden("q35-installer", &args);

    let microvm = machine(json!({
        "version": 1, "chipset": "microvm", "network": "virtio-net-device",
        "storage": "virtio-blk-device", "graphics": "none", "usb": "none", "sound": "none"
    }));
    let boot = BootFiles {
        kernel: "/k".into(),
        initrd: None,
        append: String::new(),
    };
    let mut on_microvm = spec(Accelerator::Tcg, Some(boot), Netdev::TapFd(3));
    on_microvm.drives = launch.drives.clone();
    on_microvm.drives[1].boot_first = false;
    let args = qemu_args(&resolved(&microvm, limits(256, 1)), &on_microvm).unwrap();
    assert!(
        args.windows(2)
            .any(|pair| pair[0] == "-device" && pair[1] == "virtio-blk-device,drive=drive2"),
        "{args:?}"
    );
    on_microvm.drives[1].boot_first = true;
    let error = qemu_args(&resolved(&microvm, limits(256, 1)), &on_microvm).unwrap_err();
    assert!(error.to_string().contains("CD-ROM"), "{error}");
}
