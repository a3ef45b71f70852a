//! `MachineLimits`: what a host lets one VM have, and the default sizing it applies.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Limits and default sizing for VMs on this host.
///
/// A task whose machine asks for more than these is resolved `malformed-payload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "MachineLimits")]
pub struct MachineLimits {
    /// Largest memory a VM may have, in MiB; also the memory of a machine that names none.
    #[schemars(range(min = 0, max = 1_048_576))]
    pub max_memory: u32,
    /// Largest number of virtual CPUs (`threads × cores × sockets`) a VM may have.
    #[serde(rename = "maxCPUs")]
    #[schemars(range(min = 1, max = 255))]
    pub max_cpus: u32,
    /// Threads per core given to a machine that names none: 2 on hosts with hyper-threading,
    /// otherwise 1.
    #[schemars(range(min = 1, max = 255))]
    pub default_threads: u32,
}

impl Default for MachineLimits {
    /// 1 GiB, 2 CPUs, 1 thread per core: small enough for any CI host.
    fn default() -> Self {
        MachineLimits {
            max_memory: 1024,
            max_cpus: 2,
            default_threads: 1,
        }
    }
}
