//! The QEMU command line: a pure function from a resolved machine and the VM's settings to an
//! argument vector. No shell is involved, every drive has an explicit format, and every value
//! that reaches an option string was validated by the `schemas` crate (no commas, no `=`).

use schemas::machine::{
    Chipset, GraphicsAdapter, KeyboardDevice, MouseDevice, NetworkDevice, SoundDevice,
    StorageDevice, TabletDevice, UsbController,
};
use schemas::ResolvedMachine;
use thiserror::Error;

use crate::disk::drives::DriveMedia;

/// Which accelerator runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's multi-threaded software emulation.
    Tcg,
}

/// The guest's network backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netdev {
    /// A tap device the worker opened, passed to QEMU as file descriptor `fd`.
    TapFd(i32),
    /// QEMU's user-mode network with `restrict=on` (no host access, no egress).
    RestrictedUser,
}

/// Everything besides the machine that decides the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// VM name, used for `-name` and the process name (`taskvm-<name>`).
    pub name: String,
    /// Accelerator.
    pub accelerator: Accelerator,
    /// The root disk as a chain of layers, the VM's own qcow2 overlay first and its backing
    /// files after it: the chain is given whole, so QEMU never opens a backing file by the
    /// name an image's header holds.
    pub disk: Vec<DiskLayer>,
    /// Kernel, initrd and command line for direct boot (from the image's `boot`).
    pub boot: Option<BootFiles>,
    /// System UUID (the machine's pinned one, or a fresh one).
    pub uuid: String,
    /// NIC MAC address (the machine's pinned one, or a fresh one).
    pub mac: String,
    /// Network backend.
    pub netdev: Netdev,
    /// Where the serial console is written (as QEMU opens it: `/dev/fdset/N`).
    pub serial_log: String,
    /// The QMP socket's listening descriptor, made by the engine and inherited by QEMU.
    pub qmp_fd: i32,
    /// VNC socket QEMU makes (used when the machine has graphics), as QEMU sees its path.
    pub vnc_socket: String,
    /// The host's TSC frequency, for `tsc_early_khz=` on direct boots.
    pub tsc_khz: Option<u64>,
    /// Where QEMU reads a saved state from instead of booting (`-incoming`), e.g. `fd:5`.
    pub incoming: Option<String>,
    /// Drives after the root disk, in order.
    pub drives: Vec<LaunchDrive>,
    /// Inherited descriptors that `/dev/fdset/N` paths refer to.
    pub fd_sets: Vec<FdSet>,
    /// The guest's RAM as a backend object (None: QEMU's own, from `-m`).
    pub memory: Option<MemoryBackend>,
}

/// The id of the memory backend object that holds the guest's RAM, when it is one.
pub const RAM_OBJECT: &str = "ram0";

/// Guest RAM as the memory backend object [`RAM_OBJECT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBackend {
    /// Mapped from a file (`mem-path`, as QEMU opens it), shared or private.
    File {
        /// The file.
        path: String,
        /// Whether the guest's writes go to the file (`share=on`) or stay its own.
        shared: bool,
    },
    /// Anonymous memory.
    Anonymous,
}

/// One layer of the root disk's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayer {
    /// The file QEMU opens: `/dev/fdset/N` (or a path).
    pub file: String,
    /// Its format (`qcow2` for every layer but possibly the last).
    pub format: String,
}

/// A drive after the root disk on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchDrive {
    /// The file QEMU opens: a path, or `/dev/fdset/N`.
    pub file: String,
    /// Its format.
    pub format: String,
    /// Disk or CD-ROM.
    pub media: DriveMedia,
    /// Read-only for the guest.
    pub read_only: bool,
    /// Booted by the firmware before the root disk.
    pub boot_first: bool,
    /// The virtio serial number the guest finds the disk by (virtio disks only).
    pub serial: Option<String>,
}

/// A descriptor QEMU inherits, put in fd set `set` (`-add-fd fd=FD,set=SET`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdSet {
    /// The descriptor's number in QEMU.
    pub fd: i32,
    /// The set's number, as in `/dev/fdset/SET`.
    pub set: u32,
}

/// Paths of direct-boot files (as QEMU sees them) and the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// Kernel.
    pub kernel: String,
    /// Initial ramdisk.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub append: String,
}

/// A machine whose devices do not fit together.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CmdlineError {
    /// Two settings of the machine exclude each other.
    #[error("machine: {0}")]
    Incompatible(String),
}

/// The full argument vector (without the program name).
pub fn qemu_args(
    machine: &ResolvedMachine,
    spec: &LaunchSpec,
) -> Result<Vec<String>, CmdlineError> {
    let m = machine.machine();
    let chipset = m.chipset.unwrap_or(Chipset::Q35);
    check_compatible(machine, spec)?;
    let mut args = Args::default();

    args.push([
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
    ]);
    args.push([
        "-name",
        &format!("{},process=taskvm-{}", spec.name, spec.name),
    ]);
    args.push([
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    match &spec.memory {
        Some(_) => args.push([
            "-machine",
            &format!("{},memory-backend={RAM_OBJECT}", chipset.as_str()),
        ]),
        None => args.push(["-machine", chipset.as_str()]),
    }
    args.push(match spec.accelerator {
        Accelerator::Kvm => ["-accel", "kvm"],
        Accelerator::Tcg => ["-accel", "tcg,thread=multi"],
    });
    let mut cpu = m.cpu.map_or("qemu64", |cpu| cpu.as_str()).to_owned();
    for flag in m.flags.iter().flatten() {
        cpu.push(',');
        if flag.starts_with(['+', '-']) {
            cpu.push_str(flag);
        } else {
            cpu.push('+');
            cpu.push_str(flag);
        }
    }
    args.push(["-cpu", &cpu]);
    let topology = machine.topology();
    args.push([
        "-smp",
        &format!(
            "cpus={},sockets={},cores={},threads={}",
            topology.vcpus(),
            topology.sockets,
            topology.cores,
            topology.threads
        ),
    ]);
    args.push(["-m", &format!("{}M", machine.memory_mib())]);
    match &spec.memory {
        Some(MemoryBackend::File { path, shared }) => args.push([
            "-object",
            &format!(
                "memory-backend-file,id={RAM_OBJECT},size={}M,mem-path={path},share={}",
                machine.memory_mib(),
                if *shared { "on" } else { "off" }
            ),
        ]),
        Some(MemoryBackend::Anonymous) => args.push([
            "-object",
            &format!(
                "memory-backend-ram,id={RAM_OBJECT},size={}M",
                machine.memory_mib()
            ),
        ]),
        None => {}
    }
    args.push(["-uuid", &spec.uuid]);

    // Panics end QEMU with a failure status, after the GUEST_PANICKED event.
    args.push(["-action", "panic=exit-failure"]);
    args.push(["-device", "pvpanic"]);

    let bus = match chipset {
        Chipset::Microvm => "device",
        _ => "pci",
    };
    for set in &spec.fd_sets {
        args.push(["-add-fd", &format!("fd={},set={}", set.fd, set.set)]);
    }
    push_disk_chain(&mut args, &spec.disk);
    args.push([
        "-device",
        &match m.storage.unwrap_or(StorageDevice::VirtioBlkPci) {
            StorageDevice::VirtioBlkPci | StorageDevice::VirtioBlkDevice => {
                format!("virtio-blk-{bus},drive=disk0")
            }
            StorageDevice::Nvme => "nvme,drive=disk0,serial=taskvm-disk0".to_owned(),
        },
    ]);
    push_extra_drives(&mut args, spec, bus);

    args.push([
        "-netdev",
        &match spec.netdev {
            Netdev::TapFd(fd) => format!("tap,id=net0,fd={fd}"),
            Netdev::RestrictedUser => "user,id=net0,restrict=on".to_owned(),
        },
    ]);
    let nic = match m.network.unwrap_or(NetworkDevice::VirtioNetPci) {
        NetworkDevice::VirtioNetPci | NetworkDevice::VirtioNetDevice => format!("virtio-net-{bus}"),
        other => other.as_str().to_owned(),
    };
    args.push(["-device", &format!("{nic},netdev=net0,mac={}", spec.mac)]);

    let graphics = m.graphics.unwrap_or(GraphicsAdapter::None);
    args.push([
        "-vga",
        match graphics {
            GraphicsAdapter::Vga => "std",
            GraphicsAdapter::VmwareSvga => "vmware",
            GraphicsAdapter::QxlVga => "qxl",
            GraphicsAdapter::VirtioVga => "virtio",
            GraphicsAdapter::None => "none",
        },
    ]);
    if graphics != GraphicsAdapter::None {
        args.push(["-vnc", &format!("unix:{}", spec.vnc_socket)]);
        if let Some(layout) = m.keyboard_layout {
            args.push(["-k", layout.as_str()]);
        }
    }
    push_input_devices(&mut args, machine);
    push_sound(&mut args, m.sound.unwrap_or(SoundDevice::None));

    if let Some(boot) = &spec.boot {
        args.push(["-kernel", &boot.kernel]);
        if let Some(initrd) = &boot.initrd {
            args.push(["-initrd", initrd]);
        }
        let mut append = boot.append.clone();
        if let Some(khz) = spec.tsc_khz {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
        args.push(["-append", append.trim()]);
    }

    args.push([
        "-chardev",
        &format!("file,id=serial0,path={}", spec.serial_log),
    ]);
    args.push(["-serial", "chardev:serial0"]);
    args.push([
        "-chardev",
        &format!("socket,id=qmp,fd={},server=on,wait=off", spec.qmp_fd),
    ]);
    args.push(["-mon", "chardev=qmp,mode=control"]);
    if let Some(incoming) = &spec.incoming {
        args.push(["-incoming", incoming]);
    }
    Ok(args.0)
}

/// The root disk as `-blockdev` nodes, the bottom layer first: a file node and a format node
/// per layer, each format node backed by the one below it; the top one is `disk0`.
fn push_disk_chain(args: &mut Args, chain: &[DiskLayer]) {
    let name = |index: usize| {
        if index == 0 {
            "disk0".to_owned()
        } else {
            format!("disk0-layer{index}")
        }
    };
    for (index, layer) in chain.iter().enumerate().rev() {
        let top = index == 0;
        let access = if top {
            "read-only=off,discard=unmap"
        } else {
            "read-only=on"
        };
        args.push([
            "-blockdev",
            &format!(
                "driver=file,node-name={}-file,filename={},{access}",
                name(index),
                layer.file
            ),
        ]);
        let mut format = format!(
            "driver={},node-name={},file={}-file,{access}",
            layer.format,
            name(index),
            name(index)
        );
        if chain.get(index + 1).is_some() {
            format.push_str(&format!(",backing={}", name(index + 1)));
        }
        args.push(["-blockdev", &format]);
    }
}

fn push_extra_drives(args: &mut Args, spec: &LaunchSpec, bus: &str) {
    for (index, drive) in spec.drives.iter().enumerate() {
        let id = format!("drive{}", index + 1);
        let mut options = format!(
            "id={id},file={},format={},if=none",
            drive.file, drive.format
        );
        if drive.read_only {
            options.push_str(",readonly=on");
        } else {
            // Opened read-write at once: QEMU would first open a writable drive read-only,
            // which an inherited read-write descriptor cannot serve.
            options.push_str(",auto-read-only=off");
        }
        let cdrom = drive.media == DriveMedia::Cdrom && bus == "pci";
        if cdrom {
            options.push_str(",media=cdrom");
        }
        args.push(["-drive", &options]);
        let mut device = if cdrom {
            format!("ide-cd,drive={id}")
        } else {
            format!("virtio-blk-{bus},drive={id}")
        };
        if drive.boot_first {
            device.push_str(",bootindex=0");
        }
        if let Some(serial) = drive.serial.as_ref().filter(|_| !cdrom) {
            device.push_str(&format!(",serial={serial}"));
        }
        args.push(["-device", &device]);
    }
}

fn push_input_devices(args: &mut Args, machine: &ResolvedMachine) {
    let m = machine.machine();
    if let Some(controller) = m.usb.filter(|usb| *usb != UsbController::None) {
        args.push(["-device", &format!("{},id=usb0", controller.as_str())]);
    }
    if m.keyboard == Some(KeyboardDevice::UsbKbd) {
        args.push(["-device", "usb-kbd"]);
    }
    if m.mouse == Some(MouseDevice::UsbMouse) {
        args.push(["-device", "usb-mouse"]);
    }
    if m.tablet == Some(TabletDevice::UsbTablet) {
        args.push(["-device", "usb-tablet"]);
    }
}

fn push_sound(args: &mut Args, sound: SoundDevice) {
    if sound == SoundDevice::None {
        return;
    }
    args.push(["-audiodev", "none,id=snd0"]);
    match sound.as_str().split_once('/') {
        Some((codec, controller)) => {
            args.push(["-device", controller]);
            args.push(["-device", &format!("{codec},audiodev=snd0")]);
        }
        None => args.push(["-device", &format!("{},audiodev=snd0", sound.as_str())]),
    }
}

fn check_compatible(machine: &ResolvedMachine, spec: &LaunchSpec) -> Result<(), CmdlineError> {
    let m = machine.machine();
    let chipset = m.chipset.unwrap_or(Chipset::Q35);
    let fail = |text: &str| Err(CmdlineError::Incompatible(text.to_owned()));
    let uses_usb = m.keyboard == Some(KeyboardDevice::UsbKbd)
        || m.mouse == Some(MouseDevice::UsbMouse)
        || m.tablet == Some(TabletDevice::UsbTablet);
    if uses_usb && m.usb.is_none_or(|usb| usb == UsbController::None) {
        return fail("a USB keyboard, mouse or tablet needs a usb controller");
    }
    if chipset == Chipset::Microvm {
        if spec.boot.is_none() {
            return fail("chipset microvm boots only with boot.kernel (direct kernel boot)");
        }
        if matches!(
            m.network,
            Some(NetworkDevice::Rtl8139 | NetworkDevice::E1000)
        ) {
            return fail("chipset microvm has no PCI bus: use network virtio-net-device");
        }
        if m.storage == Some(StorageDevice::Nvme) {
            return fail("chipset microvm has no PCI bus: use storage virtio-blk-device");
        }
        if m.graphics.is_some_and(|g| g != GraphicsAdapter::None) {
            return fail("chipset microvm has no display: use graphics none");
        }
        if m.usb.is_some_and(|usb| usb != UsbController::None)
            || m.sound.is_some_and(|s| s != SoundDevice::None)
        {
            return fail("chipset microvm has no PCI bus for usb or sound: use none");
        }
        if spec.drives.iter().any(|drive| drive.boot_first) {
            return fail("chipset microvm has no firmware that boots a CD-ROM: use q35 or pc");
        }
    } else if matches!(m.network, Some(NetworkDevice::VirtioNetDevice))
        || matches!(m.storage, Some(StorageDevice::VirtioBlkDevice))
    {
        return fail("virtio-*-device (virtio-mmio) needs chipset microvm; use virtio-*-pci");
    }
    Ok(())
}

/// An argument vector under construction.
#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn push<const N: usize>(&mut self, items: [&str; N]) {
        self.0.extend(items.iter().map(|item| (*item).to_owned()));
    }
}
