//! taskvm's engine: one sandboxed, throwaway QEMU VM per task, from start to guaranteed
//! cleanup. It takes an image lease, a resolved machine and the host's settings; it knows
//! nothing about queues or tasks.
//!
//! # Layout
//! - [`accel`]: KVM or TCG; `auto` probes KVM with a boot watchdog and caches the verdict.
//! - [`cgroup`]: per-VM memory, CPU and pid limits (cgroup v2, or v1 on hybrid hosts).
//! - [`cmdline`]: the QEMU argument vector, a pure function (golden-file tested).
//! - [`runtime`]: the VM's runtime directory, root's, which is also its jail's root.
//! - [`jail`]: the namespaces and mounts QEMU runs in (`pivot_root` into the runtime
//!   directory, the host's `/usr` read-only, a minimal `/dev`).
//! - [`host`]: [`host::VmHost`], the host prepared once for all VMs (privileges, sweep, jail,
//!   control groups, accelerator, TSC, snapshot store): the engine's entry point.
//! - [`ids`]: a user and group per VM from a range no account uses.
//! - [`netns`]: the VM's own network namespace and the tap device in it.
//! - [`metadata`]: the per-VM HTTP service, its listener inside the VM's namespace.
//! - [`session`]: the guest protocol (`/engine/v1/`) and cloud-init metadata as a handler.
//! - [`dhcp`]: a DHCP responder for stock cloud images.
//! - [`drives`]: where the root disk comes from (the cache, or the host's own files) and the
//!   drives besides it, handed to QEMU as open descriptors.
//! - [`egress`]: opt-in NAT to other networks (never to the host itself), under the
//!   [`egress_policy`] (internal ranges and the host's own networks denied), with a
//!   [`dns`] forwarder that refuses answers naming denied addresses.
//! - [`network`]: all of these for one VM, owned as one.
//! - [`overlay`]: the per-VM qcow2 overlay on the leased image.
//! - [`process`]: starting QEMU as an unprivileged user in its own process group, tied to
//!   the worker's life; killing and reaping it.
//! - [`qmp`]: the QMP connection (bounded messages, timed commands) and its events.
//! - [`records`]: what each VM created, on disk, and the start-up [`records::sweep`] that
//!   cleans up after a worker killed with `kill -9`.
//! - [`screenshot`]: the screen over VNC as an RGBA image or PNG.
//! - [`seed`]: a cloud-init NoCloud seed (a FAT volume labelled CIDATA).
//! - [`mutable`]: [`mutable::MutableImage`], a VM booted to be changed and packaged.
//! - [`snapshot`]: a VM saved at agent-ready, restored in a fraction of a boot, and the
//!   store of them.
//! - [`tsc`]: the host's TSC frequency for the guest's command line.
//! - [`vm`]: [`VirtualMachine`], which owns all of the above and removes it on drop.

#![warn(clippy::unwrap_used)]

pub mod accel;
pub mod cgroup;
pub mod cmdline;
pub mod dhcp;
pub mod dns;
pub mod drives;
pub mod egress;
pub mod egress_policy;
pub mod host;
pub mod ids;
pub mod jail;
mod launch;
pub mod metadata;
pub mod mutable;
pub mod netns;
pub mod network;
pub mod overlay;
pub mod process;
pub mod qmp;
pub mod records;
pub mod runtime;
pub mod screenshot;
pub mod seed;
pub mod session;
pub mod snapshot;
pub mod tsc;
pub mod vm;

pub use vm::{ExitKind, VirtualMachine, VmError, VmSettings};

pub use cmdline::{qemu_args, Accelerator, BootFiles, LaunchSpec, Netdev};
