//! Sizing a machine by a host's limits: taskcluster-worker's `ApplyLimits` and `DeriveLimits`.
//!
//! `apply_limits` fills unset memory and CPU counts from [`MachineLimits`] and refuses a
//! machine that asks for more than the limits allow. The growth order (cores, then threads,
//! then sockets) is part of the contract: it decides the CPU topology a guest sees.

use serde::Serialize;
use thiserror::Error;

use crate::limits::MachineLimits;
use crate::machine::Machine;

/// Largest value of each of `threads`, `cores` and `sockets`.
const MAX_PER_DIMENSION: u64 = 255;

/// A machine refused by a host's limits. The message names both numbers; [`LimitError::field`]
/// names the machine field at fault, for a JSON pointer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LimitError {
    /// The machine asks for more memory than maxMemory.
    #[error("{memory} exceeds maxMemory {max_memory}")]
    MemoryExceeded {
        /// Memory asked for, in MiB.
        memory: u32,
        /// The host's limit, in MiB.
        max_memory: u32,
    },
    /// The machine names no memory and the host's maxMemory is 0.
    #[error("unset, and maxMemory is 0 so no default can be given")]
    NoMemory,
    /// The machine asks for more virtual CPUs than maxCPUs.
    #[error(
        "threads×cores×sockets = {threads}×{cores}×{sockets} = {vcpus} exceeds maxCPUs {max_cpus}"
    )]
    CpusExceeded {
        /// Threads per core.
        threads: u32,
        /// Cores per socket.
        cores: u32,
        /// Sockets.
        sockets: u32,
        /// The product of the three.
        vcpus: u64,
        /// The host's limit.
        max_cpus: u32,
    },
}

impl LimitError {
    /// The machine field at fault (`memory`), or `None` when the machine as a whole is.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            LimitError::MemoryExceeded { .. } | LimitError::NoMemory => Some("memory"),
            LimitError::CpusExceeded { .. } => None,
        }
    }
}

/// How a VM's virtual CPUs are arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CpuTopology {
    /// Threads per core.
    pub threads: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Sockets.
    pub sockets: u32,
}

impl CpuTopology {
    /// Number of virtual CPUs: `threads × cores × sockets`.
    pub fn vcpus(&self) -> u32 {
        self.threads * self.cores * self.sockets
    }
}

/// A machine whose memory and CPU counts are all set and within a host's limits.
///
/// Only [`apply_limits`] makes one, so holding a `ResolvedMachine` proves the check was done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ResolvedMachine(Machine);

impl ResolvedMachine {
    /// The full definition (memory, threads, cores and sockets are set).
    pub fn machine(&self) -> &Machine {
        &self.0
    }

    /// The definition, by value.
    pub fn into_machine(self) -> Machine {
        self.0
    }

    /// Memory in MiB.
    pub fn memory_mib(&self) -> u32 {
        self.0.memory.unwrap_or_default()
    }

    /// The CPU arrangement.
    pub fn topology(&self) -> CpuTopology {
        CpuTopology {
            threads: self.0.threads.unwrap_or(1),
            cores: self.0.cores.unwrap_or(1),
            sockets: self.0.sockets.unwrap_or(1),
        }
    }
}

/// Sizes `machine` by `limits` (taskcluster-worker's `ApplyLimits`).
///
/// - Unset memory becomes `maxMemory`.
/// - Unset threads become `defaultThreads` when `defaultThreads × cores × sockets ≤ maxCPUs`
///   (unset cores and sockets counting as 1).
/// - Then each dimension that the machine left unset grows, one step at a time, while the
///   product stays within `maxCPUs`: first cores, then threads, then sockets.
/// - Whatever is still unset is 1.
///
/// Fails when the machine's own numbers exceed the limits.
pub fn apply_limits(
    machine: &Machine,
    limits: &MachineLimits,
) -> Result<ResolvedMachine, LimitError> {
    let memory = machine.memory.unwrap_or(limits.max_memory);
    if memory == 0 {
        return Err(LimitError::NoMemory);
    }
    if memory > limits.max_memory {
        return Err(LimitError::MemoryExceeded {
            memory,
            max_memory: limits.max_memory,
        });
    }

    let max_cpus = u64::from(limits.max_cpus);
    let given = |value: Option<u32>| u64::from(value.unwrap_or(1));
    let default_threads = u64::from(limits.default_threads);
    let default_fits = default_threads * given(machine.cores) * given(machine.sockets) <= max_cpus;

    let mut threads = match machine.threads {
        Some(threads) => u64::from(threads),
        None if default_fits => default_threads,
        None => 1,
    };
    let mut cores = given(machine.cores);
    let mut sockets = given(machine.sockets);

    if machine.cores.is_none() {
        while cores < MAX_PER_DIMENSION && threads * (cores + 1) * sockets <= max_cpus {
            cores += 1;
        }
    }
    if machine.threads.is_none() {
        while threads < MAX_PER_DIMENSION && (threads + 1) * cores * sockets <= max_cpus {
            threads += 1;
        }
    }
    if machine.sockets.is_none() {
        while sockets < MAX_PER_DIMENSION && threads * cores * (sockets + 1) <= max_cpus {
            sockets += 1;
        }
    }

    let narrow = |value: u64| u32::try_from(value).unwrap_or(u32::MAX);
    let vcpus = threads * cores * sockets;
    if vcpus > max_cpus {
        return Err(LimitError::CpusExceeded {
            threads: narrow(threads),
            cores: narrow(cores),
            sockets: narrow(sockets),
            vcpus,
            max_cpus: limits.max_cpus,
        });
    }

    Ok(ResolvedMachine(Machine {
        memory: Some(memory),
        threads: Some(narrow(threads)),
        cores: Some(narrow(cores)),
        sockets: Some(narrow(sockets)),
        ..machine.clone()
    }))
}

/// The smallest limits that admit `machine` (taskcluster-worker's `DeriveLimits`).
///
/// Unset memory counts as 1 MiB and unset CPU counts as 1, so that `apply_limits(machine,
/// derive_limits(machine))` always succeeds and gives back every number the machine set.
/// For a machine beyond any valid host (more than 255 CPUs), `maxCPUs` is clamped to `u32::MAX`
/// and still admits it.
pub fn derive_limits(machine: &Machine) -> MachineLimits {
    let given = |value: Option<u32>| u64::from(value.unwrap_or(1));
    let vcpus = given(machine.threads) * given(machine.cores) * given(machine.sockets);
    MachineLimits {
        max_memory: machine.memory.unwrap_or(1),
        max_cpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
        default_threads: machine.threads.unwrap_or(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_cpus: u32, default_threads: u32) -> MachineLimits {
        MachineLimits {
            max_memory: 4096,
            max_cpus,
            default_threads,
        }
    }

    fn topology_of(machine: &Machine, limits: MachineLimits) -> (u32, u32, u32) {
        let t = apply_limits(machine, &limits).unwrap().topology();
        (t.threads, t.cores, t.sockets)
    }

    #[test]
    fn worked_examples_from_the_contract() {
        let empty = Machine::default();
        assert_eq!(topology_of(&empty, limits(4, 1)), (1, 4, 1));
        assert_eq!(topology_of(&empty, limits(8, 2)), (2, 4, 1));
        assert_eq!(topology_of(&empty, limits(7, 2)), (2, 3, 1));
        assert_eq!(topology_of(&empty, limits(3, 2)), (3, 1, 1));
        let two_cores = Machine {
            cores: Some(2),
            ..Machine::default()
        };
        assert_eq!(topology_of(&two_cores, limits(8, 1)), (4, 2, 1));
    }

    #[test]
    fn sockets_grow_only_when_cores_and_threads_are_given() {
        let pinned = Machine {
            threads: Some(1),
            cores: Some(2),
            ..Machine::default()
        };
        assert_eq!(topology_of(&pinned, limits(8, 1)), (1, 2, 4));
    }

    #[test]
    fn default_threads_that_do_not_fit_fall_back_to_one() {
        let two_cores = Machine {
            cores: Some(2),
            ..Machine::default()
        };
        assert_eq!(topology_of(&two_cores, limits(3, 2)), (1, 2, 1));
    }

    #[test]
    fn unset_memory_takes_max_memory() {
        let resolved = apply_limits(&Machine::default(), &limits(1, 1)).unwrap();
        assert_eq!(resolved.memory_mib(), 4096);
    }

    #[test]
    fn memory_over_the_limit_names_both_numbers() {
        let big = Machine {
            memory: Some(65536),
            ..Machine::default()
        };
        let error = apply_limits(&big, &limits(2, 1)).unwrap_err();
        assert_eq!(error.to_string(), "65536 exceeds maxMemory 4096");
        assert_eq!(error.field(), Some("memory"));
    }

    #[test]
    fn cpus_over_the_limit_name_the_product() {
        let wide = Machine {
            threads: Some(2),
            cores: Some(4),
            sockets: Some(2),
            ..Machine::default()
        };
        let error = apply_limits(&wide, &limits(8, 1)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "threads×cores×sockets = 2×4×2 = 16 exceeds maxCPUs 8"
        );
    }

    #[test]
    fn zero_max_memory_with_unset_memory_is_refused() {
        let zero = MachineLimits {
            max_memory: 0,
            ..limits(1, 1)
        };
        assert_eq!(
            apply_limits(&Machine::default(), &zero),
            Err(LimitError::NoMemory)
        );
    }

    #[test]
    fn derive_limits_is_tight() {
        let machine = Machine {
            memory: Some(512),
            threads: Some(2),
            cores: Some(3),
            ..Machine::default()
        };
        let derived = derive_limits(&machine);
        assert_eq!(
            derived,
            MachineLimits {
                max_memory: 512,
                max_cpus: 6,
                default_threads: 2
            }
        );
        let resolved = apply_limits(&machine, &derived).unwrap();
        assert_eq!(resolved.topology().vcpus(), 6);
    }
}
