//! A VM saved at agent-ready, before it received any task data, and restored as many times
//! as wanted: the migration stream of the paused VM (`state.bin`), the disk overlay as it was
//! then (`disk.qcow2`, read-only; each restored VM gets its own overlay on top) and the
//! identity its devices were created with (`identity`: UUID and MAC, which a restore must
//! reuse), its console up to then (`serial.log`, which a restored VM's console continues), its
//! RAM (`ram.bin`) and a word saying where the RAM is (`memory`). QEMU writes the stream to a
//! unix socket the engine listens on and reads it back from an inherited descriptor
//! (`migrate-incoming fd:N`): both work under the full `-sandbox`.
//!
//! The guest's RAM is not in the stream but in a file of its own (`ram.bin`, sparse), which
//! every restore maps private: restored copies of one snapshot share its clean pages, and a
//! restore loads only the devices ([`crate::memory`]). The VM being saved has its RAM in a memory file
//! mapped shared; the stream is saved with `x-ignore-shared`, which leaves that RAM out. A VM
//! restored from a snapshot and saved again (kept for debugging) has private RAM, which the
//! stream holds. A restore is only valid for the same image, machine, QEMU and kernel command
//! line; the caller keys snapshots by those.
//!
//! # Layout
//! - [`format`](mod@format): the files of a snapshot directory ([`Snapshot`]).
//! - `save`: a paused VM saved into one ([`VirtualMachine::snapshot`]).
//! - [`build`](mod@build): an image's snapshot made from a fresh boot ([`build()`]).
//! - [`store`]: one snapshot per key under the state directory, built once and shared.
//!
//! Restoring is a start of its own ([`VirtualMachine::restore`], in `starts`).

pub mod build;
pub mod format;
mod save;
pub mod store;

pub use build::{build, build_as};
pub use format::{SavedRam, Snapshot};

#[cfg(doc)]
use crate::vm::VirtualMachine;

/// What the agent prints on the console once it is up and asks for its task.
pub const AGENT_READY: &str = schemas::protocol::marker::READY;
