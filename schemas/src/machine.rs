//! The virtual hardware of a VM: the `Machine` definition and its closed sets of devices.
//!
//! A `Machine` is a *partial* definition: every field may be unset. Definitions are layered
//! (see [`crate::precedence`]) and then sized by the host's limits (see [`crate::sizing`]).
//! Version 1 is taskcluster-worker's `machine.json` format; this crate extends its enums
//! additively and adds `boot`, so every taskcluster-worker definition stays valid.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::string_enum::string_enum;

/// The `machine.json` format version this crate reads and writes.
pub const MACHINE_FORMAT_VERSION: u32 = 1;

/// Hardware definition for a virtual machine.
///
/// Every field is optional: an unset field is filled from a lower layer (payload → image →
/// worker configuration → built-in defaults), and CPU counts and memory from the host's
/// MachineLimits. A `machine.json` inside an image must carry `version`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "Machine")]
pub struct Machine {
    /// Format version of this definition; required in an image's `machine.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1))]
    pub version: Option<u32>,
    /// System UUID of the VM. Unset: a fresh random UUID for every VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
    ))]
    pub uuid: Option<String>,
    /// Chipset (QEMU machine type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chipset: Option<Chipset>,
    /// CPU model exposed to the guest. The guest sees `threads × cores × sockets` CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuModel>,
    /// CPU feature flags added to (`+name` or `name`) or removed from (`-name`) the CPU model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        inner(regex(pattern = r"^[+-]?[a-z0-9][a-z0-9_.-]{0,39}$"))
    )]
    pub flags: Option<Vec<String>>,
    /// Threads per CPU core. Unset: as many as the limits allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub threads: Option<u32>,
    /// CPU cores per socket. Unset: as many as the limits allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub cores: Option<u32>,
    /// CPU sockets. Unset: as many as the limits allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub sockets: Option<u32>,
    /// Memory in MiB. Unset: the host's maxMemory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_048_576))]
    pub memory: Option<u32>,
    /// USB host controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb: Option<UsbController>,
    /// Network interface controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkDevice>,
    /// MAC address (locally administered unicast). Unset: a fresh random MAC for every VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f][26ae](:[0-9a-f]{2}){5}$"))]
    pub mac: Option<String>,
    /// Block device the root disk is attached with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageDevice>,
    /// Graphics adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphics: Option<GraphicsAdapter>,
    /// Sound device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sound: Option<SoundDevice>,
    /// Keyboard device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard: Option<KeyboardDevice>,
    /// Keyboard layout used by the VNC server to translate key events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard_layout: Option<KeyboardLayout>,
    /// Mouse device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mouse: Option<MouseDevice>,
    /// Absolute pointing device (makes VNC pointer positions exact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablet: Option<TabletDevice>,
    /// Direct Linux kernel boot; unset: boot from the disk's firmware and bootloader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<LinuxBoot>,
}

/// Direct Linux kernel boot (`-kernel`, `-initrd`, `-append`), skipping firmware and bootloader.
///
/// File names refer to files packed inside the image, next to `disk.img`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinuxBoot {
    /// File name of the kernel (bzImage or uncompressed vmlinux) inside the image.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"))]
    pub kernel: String,
    /// File name of the initial ramdisk inside the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"))]
    pub initrd: Option<String>,
    /// Kernel command line (printable ASCII).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096), regex(pattern = r"^[ -~]*$"))]
    pub append: Option<String>,
}

string_enum! {
    /// Chipset, i.e. the QEMU machine type.
    pub enum Chipset {
        /// i440FX + PIIX3, as pinned by taskcluster-worker.
        PcI440fx28 = "pc-i440fx-2.8",
        /// The newest i440FX machine type of the installed QEMU.
        Pc = "pc",
        /// Q35 + ICH9, PCIe.
        Q35 = "q35",
        /// QEMU's minimal virtio-mmio machine: the fastest to boot, Linux direct boot only.
        Microvm = "microvm",
    }
}

string_enum! {
    /// CPU model exposed to the guest.
    pub enum CpuModel {
        /// The host's CPU (KVM only).
        Host = "host",
        /// Every feature the accelerator supports.
        Max = "max",
        /// A conservative 64-bit model that works under both TCG and KVM.
        Qemu64 = "qemu64",
        /// QEMU's default 64-bit model for KVM guests.
        Kvm64 = "kvm64",
    }
}

string_enum! {
    /// USB host controller.
    pub enum UsbController {
        /// UHCI on PIIX3.
        Piix3UsbUhci = "piix3-usb-uhci",
        /// UHCI on PIIX4.
        Piix4UsbUhci = "piix4-usb-uhci",
        /// NEC xHCI.
        NecUsbXhci = "nec-usb-xhci",
        /// QEMU's generic xHCI.
        QemuXhci = "qemu-xhci",
        /// No USB controller.
        None = "none",
    }
}

string_enum! {
    /// Network interface controller.
    pub enum NetworkDevice {
        /// Realtek RTL8139.
        Rtl8139 = "rtl8139",
        /// Intel e1000.
        E1000 = "e1000",
        /// virtio-net on PCI.
        VirtioNetPci = "virtio-net-pci",
        /// virtio-net on virtio-mmio (the `microvm` chipset).
        VirtioNetDevice = "virtio-net-device",
    }
}

string_enum! {
    /// Block device for the root disk.
    pub enum StorageDevice {
        /// virtio-blk on PCI.
        VirtioBlkPci = "virtio-blk-pci",
        /// virtio-blk on virtio-mmio (the `microvm` chipset).
        VirtioBlkDevice = "virtio-blk-device",
        /// An NVMe controller (built into most distribution kernels).
        Nvme = "nvme",
    }
}

string_enum! {
    /// Graphics adapter.
    pub enum GraphicsAdapter {
        /// Standard VGA.
        Vga = "VGA",
        /// VMware SVGA II.
        VmwareSvga = "vmware-svga",
        /// QXL.
        QxlVga = "qxl-vga",
        /// virtio-gpu with VGA compatibility.
        VirtioVga = "virtio-vga",
        /// No display: screenshots are unavailable.
        None = "none",
    }
}

string_enum! {
    /// Sound device.
    pub enum SoundDevice {
        /// Intel AC'97.
        Ac97 = "AC97",
        /// Ensoniq ES1370.
        Es1370 = "ES1370",
        /// HDA duplex codec on an Intel HDA controller.
        HdaDuplexIntelHda = "hda-duplex/intel-hda",
        /// HDA microphone codec on an Intel HDA controller.
        HdaMicroIntelHda = "hda-micro/intel-hda",
        /// HDA output codec on an Intel HDA controller.
        HdaOutputIntelHda = "hda-output/intel-hda",
        /// HDA duplex codec on an ICH9 HDA controller.
        HdaDuplexIch9IntelHda = "hda-duplex/ich9-intel-hda",
        /// HDA microphone codec on an ICH9 HDA controller.
        HdaMicroIch9IntelHda = "hda-micro/ich9-intel-hda",
        /// HDA output codec on an ICH9 HDA controller.
        HdaOutputIch9IntelHda = "hda-output/ich9-intel-hda",
        /// No sound device.
        None = "none",
    }
}

string_enum! {
    /// Keyboard device.
    pub enum KeyboardDevice {
        /// USB keyboard.
        UsbKbd = "usb-kbd",
        /// The chipset's PS/2 keyboard.
        Ps2 = "PS/2",
        /// No keyboard.
        None = "none",
    }
}

string_enum! {
    /// Mouse device.
    pub enum MouseDevice {
        /// USB mouse.
        UsbMouse = "usb-mouse",
        /// The chipset's PS/2 mouse.
        Ps2 = "PS/2",
        /// No mouse.
        None = "none",
    }
}

string_enum! {
    /// Absolute pointing device.
    pub enum TabletDevice {
        /// USB tablet.
        UsbTablet = "usb-tablet",
        /// No tablet.
        None = "none",
    }
}

string_enum! {
    /// Keyboard layout (QEMU `-k` names).
    pub enum KeyboardLayout {
        /// Arabic.
        Ar = "ar",
        /// Danish.
        Da = "da",
        /// German.
        De = "de",
        /// Swiss German.
        DeCh = "de-ch",
        /// British English.
        EnGb = "en-gb",
        /// US English.
        EnUs = "en-us",
        /// Spanish.
        Es = "es",
        /// Estonian.
        Et = "et",
        /// Finnish.
        Fi = "fi",
        /// Faroese.
        Fo = "fo",
        /// French.
        Fr = "fr",
        /// Belgian French.
        FrBe = "fr-be",
        /// Canadian French.
        FrCa = "fr-ca",
        /// Swiss French.
        FrCh = "fr-ch",
        /// Croatian.
        Hr = "hr",
        /// Hungarian.
        Hu = "hu",
        /// Icelandic.
        Is = "is",
        /// Italian.
        It = "it",
        /// Japanese.
        Ja = "ja",
        /// Lithuanian.
        Lt = "lt",
        /// Latvian.
        Lv = "lv",
        /// Macedonian.
        Mk = "mk",
        /// Dutch.
        Nl = "nl",
        /// Belgian Dutch.
        NlBe = "nl-be",
        /// Norwegian.
        No = "no",
        /// Polish.
        Pl = "pl",
        /// Portuguese.
        Pt = "pt",
        /// Brazilian Portuguese.
        PtBr = "pt-br",
        /// Russian.
        Ru = "ru",
        /// Slovenian.
        Sl = "sl",
        /// Swedish.
        Sv = "sv",
        /// Thai.
        Th = "th",
        /// Turkish.
        Tr = "tr",
    }
}

impl Machine {
    /// A new machine where every unset field takes `defaults`' value (taskcluster-worker's
    /// `WithDefaults`). `flags` and `boot` are taken whole, never merged piecewise.
    pub fn with_defaults(&self, defaults: &Machine) -> Machine {
        fn pick<T: Clone>(own: &Option<T>, fallback: &Option<T>) -> Option<T> {
            own.as_ref().or(fallback.as_ref()).cloned()
        }
        Machine {
            version: pick(&self.version, &defaults.version),
            uuid: pick(&self.uuid, &defaults.uuid),
            chipset: pick(&self.chipset, &defaults.chipset),
            cpu: pick(&self.cpu, &defaults.cpu),
            flags: pick(&self.flags, &defaults.flags),
            threads: pick(&self.threads, &defaults.threads),
            cores: pick(&self.cores, &defaults.cores),
            sockets: pick(&self.sockets, &defaults.sockets),
            memory: pick(&self.memory, &defaults.memory),
            usb: pick(&self.usb, &defaults.usb),
            network: pick(&self.network, &defaults.network),
            mac: pick(&self.mac, &defaults.mac),
            storage: pick(&self.storage, &defaults.storage),
            graphics: pick(&self.graphics, &defaults.graphics),
            sound: pick(&self.sound, &defaults.sound),
            keyboard: pick(&self.keyboard, &defaults.keyboard),
            keyboard_layout: pick(&self.keyboard_layout, &defaults.keyboard_layout),
            mouse: pick(&self.mouse, &defaults.mouse),
            tablet: pick(&self.tablet, &defaults.tablet),
            boot: pick(&self.boot, &defaults.boot),
        }
    }

    /// The built-in defaults, the lowest layer of machine precedence.
    ///
    /// They choose devices that work under both TCG and KVM on any x86_64 host. They leave CPU
    /// counts and memory unset on purpose: those come from the host's MachineLimits. `uuid` and
    /// `mac` stay unset so that every VM gets fresh ones.
    pub fn builtin_defaults() -> Machine {
        Machine {
            version: Some(MACHINE_FORMAT_VERSION),
            chipset: Some(Chipset::Q35),
            cpu: Some(CpuModel::Qemu64),
            flags: Some(Vec::new()),
            usb: Some(UsbController::None),
            network: Some(NetworkDevice::VirtioNetPci),
            storage: Some(StorageDevice::VirtioBlkPci),
            graphics: Some(GraphicsAdapter::Vga),
            sound: Some(SoundDevice::None),
            keyboard: Some(KeyboardDevice::Ps2),
            keyboard_layout: Some(KeyboardLayout::EnUs),
            mouse: Some(MouseDevice::Ps2),
            tablet: Some(TabletDevice::None),
            ..Machine::default()
        }
    }
}
