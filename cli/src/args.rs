//! Arguments several commands share: `--start` and `--accel` (flattened into
//! [`crate::documents::HostArgs`] or taken directly), and the `taskvm serve` a client command
//! talks to ([`ServerArgs`]).

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

/// `--server` and `--token`: the `taskvm serve` that `submit` and `shell` talk to.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The server's URL.
    #[arg(
        long,
        value_name = "URL",
        env = "TASKVM_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// The server's access token (needed when it listens off loopback).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TASKVM_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}
