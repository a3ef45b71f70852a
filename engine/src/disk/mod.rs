//! A VM's disks: where the root disk comes from, the per-VM overlay on top of it, and the
//! seed volume stock cloud images read their configuration from.
//!
//! # Layout
//! - [`drives`]: where the root disk comes from (the cache, or the host's own files) and the
//!   drives besides it, handed to QEMU as open descriptors.
//! - [`overlay`]: the per-VM qcow2 overlay on the leased image.
//! - [`seed`]: a cloud-init NoCloud seed (a FAT volume labelled CIDATA).
//! - [`slots`]: the fixed mount slots of a VM with mounts, so that it can be restored.

pub mod drives;
pub mod overlay;
pub mod seed;
pub mod slots;
