//! The jail one VM's QEMU runs in, piece by piece: its own user, its runtime directory (the
//! jail's root), its namespaces and mounts, its control group, and the on-disk record of all
//! of them that the start-up sweep reads after a worker was killed with `kill -9`.
//!
//! # Layout
//! - [`ids`]: a user and group per VM from a range no account uses.
//! - [`runtime`]: the VM's runtime directory, root's, which is also its jail's root.
//! - [`jail`]: the namespaces and mounts QEMU runs in (`pivot_root` into the runtime
//!   directory, the host's `/usr` read-only, a minimal `/dev`).
//! - [`cgroup`]: per-VM memory, CPU and pid limits (cgroup v2, or v1 on hybrid hosts).
//! - [`records`]: what each VM created, on disk, and the start-up [`records::sweep`] that
//!   cleans up after a worker killed with `kill -9`.

pub mod cgroup;
pub mod ids;
pub mod jail;
pub mod records;
pub mod runtime;
