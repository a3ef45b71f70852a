//! Properties of ApplyLimits and DeriveLimits over arbitrary machines and limits.

use proptest::prelude::*;
use schemas::{apply_limits, derive_limits, Machine, MachineLimits};

fn dimension() -> impl Strategy<Value = Option<u32>> + Clone {
    prop_oneof![Just(None), (1u32..=255).prop_map(Some)]
}

fn small_dimension() -> impl Strategy<Value = Option<u32>> + Clone {
    prop_oneof![Just(None), (1u32..=8).prop_map(Some)]
}

fn memory() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![Just(None), (1u32..=1_048_576).prop_map(Some)]
}

fn machine(dim: impl Strategy<Value = Option<u32>> + Clone) -> impl Strategy<Value = Machine> {
    (dim.clone(), dim.clone(), dim, memory()).prop_map(|(threads, cores, sockets, memory)| {
        Machine {
            threads,
            cores,
            sockets,
            memory,
            ..Machine::default()
        }
    })
}

fn limits() -> impl Strategy<Value = MachineLimits> {
    (0u32..=1_048_576, 1u32..=255, 1u32..=255).prop_map(
        |(max_memory, max_cpus, default_threads)| MachineLimits {
            max_memory,
            max_cpus,
            default_threads,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn apply_limits_never_exceeds_the_limits(m in machine(small_dimension()), l in limits()) {
        if let Ok(resolved) = apply_limits(&m, &l) {
            prop_assert!(resolved.memory_mib() >= 1);
            prop_assert!(resolved.memory_mib() <= l.max_memory);
            prop_assert!(resolved.topology().vcpus() >= 1);
            prop_assert!(resolved.topology().vcpus() <= l.max_cpus);
        }
    }

    #[test]
    fn apply_limits_keeps_every_number_the_machine_set(m in machine(small_dimension()), l in limits()) {
        if let Ok(resolved) = apply_limits(&m, &l) {
            let r = resolved.machine();
            for (given, got) in [(m.threads, r.threads), (m.cores, r.cores), (m.sockets, r.sockets), (m.memory, r.memory)] {
                prop_assert!(got.is_some());
                if given.is_some() { prop_assert_eq!(given, got); }
            }
        }
    }

    #[test]
    fn apply_limits_refuses_only_what_exceeds_the_limits(m in machine(small_dimension()), l in limits()) {
        let given = |v: Option<u32>| u64::from(v.unwrap_or(1));
        let asked_cpus = given(m.threads) * given(m.cores) * given(m.sockets);
        let asked_memory = m.memory.unwrap_or(l.max_memory);
        let fits = asked_cpus <= u64::from(l.max_cpus) && asked_memory <= l.max_memory && asked_memory > 0;
        prop_assert_eq!(apply_limits(&m, &l).is_ok(), fits);
    }

    #[test]
    fn derived_limits_always_admit_the_machine(m in machine(dimension())) {
        let derived = derive_limits(&m);
        let resolved = apply_limits(&m, &derived);
        prop_assert!(resolved.is_ok(), "{:?} refused by {:?}: {:?}", m, derived, resolved);
        let resolved = resolved.unwrap();
        if let Some(memory) = m.memory { prop_assert_eq!(resolved.memory_mib(), memory); }
    }

    #[test]
    fn derived_limits_are_the_smallest(m in machine(small_dimension())) {
        let derived = derive_limits(&m);
        if derived.max_cpus > 1 {
            let tighter = MachineLimits { max_cpus: derived.max_cpus - 1, ..derived };
            prop_assert!(apply_limits(&m, &tighter).is_err());
        }
        if derived.max_memory > 1 && m.memory.is_some() {
            let tighter = MachineLimits { max_memory: derived.max_memory - 1, ..derived };
            prop_assert!(apply_limits(&m, &tighter).is_err());
        }
    }
}
