//! A VM saved at agent-ready, before it received any task data, and restored as many times
//! as wanted: the migration stream of the paused VM (`state.bin`), the disk overlay as it was
//! then (`disk.qcow2`, read-only; each restored VM gets its own overlay on top) and the
//! identity its devices were created with (`identity`: UUID and MAC, which a restore must
//! reuse) and its console up to then (`serial.log`, which a restored VM's console continues). QEMU writes the stream to a unix socket the engine listens on and reads it back
//! from an inherited descriptor (`-incoming fd:N`): both work under the full `-sandbox`.
//!
//! The plain stream was chosen over a file-backed RAM object with `x-ignore-shared`: for the
//! small guests tasks boot (256 MiB) it is ~66 MB and loads in ~0.1 s, needs no second
//! memory backend on the command line (which every restore would have to match) and works
//! for any machine. A restore is only valid for the same image, machine, QEMU and kernel
//! command line; the caller keys snapshots by those.
//!
//! # Layout
//! - [`format`](mod@format): the files of a snapshot directory ([`Snapshot`]).
//! - `save`: a paused VM saved into one ([`VirtualMachine::snapshot`]).
//! - [`build`](mod@build): an image's snapshot made from a fresh boot ([`build()`]).
//! - [`store`]: one snapshot per key under the state directory, built once and shared.
//!
//! Restoring is a start of its own ([`VirtualMachine::restore`], in `vm::launch`).

pub mod build;
pub mod format;
mod save;
pub mod store;

pub use build::build;
pub use format::Snapshot;

#[cfg(doc)]
use crate::vm::VirtualMachine;

/// What the agent prints on the console once it is up and asks for its task.
pub const AGENT_READY: &str = schemas::protocol::marker::READY;
