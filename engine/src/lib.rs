//! taskvm's engine: one sandboxed, throwaway QEMU VM per task, from start to guaranteed
//! cleanup. It takes an image lease, a resolved machine and the host's settings; it knows
//! nothing about queues or tasks.
//!
//! # Layout
//! One folder per concern, layered: a module names only those below it (the architecture
//! test fails on a cycle). Bottom up:
//! - [`disk`]: the root disk's source, the per-VM overlay and the cloud-init seed volume.
//! - [`network`]: a VM's isolated network, owned as one — its namespace and tap, the metadata
//!   service and guest session, DHCP, and opt-in egress with its DNS forwarder.
//! - [`sandbox`]: the jail's pieces — the per-VM user, runtime directory, namespaces and
//!   mounts, control group — and the records the start-up sweep reads.
//! - [`qemu`]: the argument vector, the process, the QMP connection and the screen.
//! - [`vm`]: [`VirtualMachine`], which owns all of the above and removes it on drop, and
//!   [`vm::mutable::MutableImage`], a VM booted to be changed and packaged.
//! - [`snapshot`]: a VM saved at agent-ready, restored in a fraction of a boot, and the
//!   store of them (format, save and build apart).
//! - `launch`: the privileged start of a VM, booted or restored, as a list of named steps
//!   (Firecracker's jailer is the model).
//! - [`host`]: [`host::VmHost`], the host prepared once for all VMs (privileges, sweep,
//!   id range, control groups, accelerator, TSC, snapshot store): the engine's entry point.

#![warn(clippy::unwrap_used)]

pub mod disk;
pub mod host;
mod launch;
pub mod memory;
pub mod network;
pub mod qemu;
pub mod sandbox;
pub mod snapshot;
mod starts;
pub mod vm;

pub use vm::{ExitKind, VirtualMachine, VmError, VmSettings};

pub use qemu::cmdline::{qemu_args, Accelerator, BootFiles, LaunchSpec, Netdev};
