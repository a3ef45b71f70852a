//! Arguments several commands share: `--start` and `--accel` (flattened into
//! [`crate::documents::HostArgs`] or taken directly).

use schemas::config::{Accel, StartMode};

/// `--start`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum StartArg {
    /// Restore the image's snapshot (made on first use); boot images it cannot be made for.
    Auto,
    /// Always boot.
    Boot,
    /// Restore the image's snapshot, making it on first use.
    Snapshot,
}

impl From<StartArg> for StartMode {
    fn from(value: StartArg) -> Self {
        match value {
            StartArg::Auto => StartMode::Auto,
            StartArg::Boot => StartMode::Boot,
            StartArg::Snapshot => StartMode::Snapshot,
        }
    }
}

/// `--accel`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AccelArg {
    /// KVM when a probe boot works on this host, TCG otherwise.
    Auto,
    /// KVM, or fail.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl From<AccelArg> for Accel {
    fn from(value: AccelArg) -> Self {
        match value {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        }
    }
}
