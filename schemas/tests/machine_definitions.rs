//! Machine definitions: taskcluster-worker compatibility, migration, and precedence.

use schemas::machine::{Chipset, CpuModel, NetworkDevice};
use schemas::{migrate_machine_definition, resolve_machine, Machine, MachineLayers, MachineLimits};
use serde_json::json;

fn fixture(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_taskcluster_worker_version_1_machine_json_is_valid() {
    let machine = migrate_machine_definition(&fixture("taskcluster-worker-v1-machine.json"))
        .unwrap_or_else(|violations| panic!("{violations}"));
    assert_eq!(machine.chipset, Some(Chipset::PcI440fx28));
    assert_eq!(machine.cores, Some(2));
    assert_eq!(machine.mac.as_deref(), Some("aa:54:1a:30:5e:01"));
}

#[test]
fn every_value_of_every_taskcluster_worker_enum_is_accepted() {
    let seed_values = [
        ("chipset", vec!["pc-i440fx-2.8"]),
        ("cpu", vec!["host"]),
        (
            "usb",
            vec!["piix3-usb-uhci", "piix4-usb-uhci", "nec-usb-xhci"],
        ),
        ("network", vec!["rtl8139", "e1000"]),
        ("storage", vec!["virtio-blk-pci"]),
        (
            "graphics",
            vec!["VGA", "vmware-svga", "qxl-vga", "virtio-vga"],
        ),
        (
            "sound",
            vec![
                "AC97",
                "ES1370",
                "hda-duplex/intel-hda",
                "hda-micro/intel-hda",
                "hda-output/intel-hda",
                "hda-duplex/ich9-intel-hda",
                "hda-micro/ich9-intel-hda",
                "hda-output/ich9-intel-hda",
            ],
        ),
        ("keyboard", vec!["usb-kbd", "PS/2"]),
        ("mouse", vec!["usb-mouse", "PS/2"]),
        ("tablet", vec!["usb-tablet", "none"]),
        (
            "keyboardLayout",
            vec!["ar", "de-ch", "en-us", "pt-br", "tr"],
        ),
    ];
    for (field, values) in seed_values {
        for value in values {
            let definition = json!({ "version": 1, field: value });
            migrate_machine_definition(&definition)
                .unwrap_or_else(|violations| panic!("{field}={value}: {violations}"));
        }
    }
}

#[test]
fn migration_requires_a_known_version() {
    let missing = migrate_machine_definition(&json!({"memory": 512})).unwrap_err();
    assert_eq!(missing.to_string(), "/version: required");
    let future = migrate_machine_definition(&json!({"version": 7})).unwrap_err();
    assert_eq!(
        future.to_string(),
        "/version: unknown machine format version 7; this taskvm reads version 1"
    );
    let not_object = migrate_machine_definition(&json!([1])).unwrap_err();
    assert!(not_object.to_string().contains("JSON object"));
}

#[test]
fn seed_patterns_are_enforced() {
    let bad = json!({"version": 1, "mac": "01:00:00:00:00:00", "uuid": "not-a-uuid", "threads": 0});
    let violations = migrate_machine_definition(&bad).unwrap_err().to_string();
    assert!(violations.contains("/mac: "), "{violations}");
    assert!(violations.contains("/uuid: "), "{violations}");
    assert!(
        violations.contains("/threads: 0 is less than the minimum of 1"),
        "{violations}"
    );
}

#[test]
fn cpu_flags_cannot_smuggle_qemu_options() {
    for flag in ["+avx,hv-relaxed", "x=1", "", "A"] {
        let definition = json!({"version": 1, "flags": [flag]});
        let violations = migrate_machine_definition(&definition).unwrap_err();
        assert!(
            violations.to_string().starts_with("/flags/0: "),
            "{flag}: {violations}"
        );
    }
    migrate_machine_definition(&json!({"version": 1, "flags": ["+ssse3", "-x2apic", "pcid"]}))
        .unwrap();
}

#[test]
fn precedence_is_payload_then_image_then_worker_then_builtin() {
    let payload = Machine {
        memory: Some(256),
        ..Machine::default()
    };
    let image = Machine {
        memory: Some(512),
        chipset: Some(Chipset::Microvm),
        network: Some(NetworkDevice::VirtioNetDevice),
        ..Machine::default()
    };
    let worker = Machine {
        chipset: Some(Chipset::Pc),
        cpu: Some(CpuModel::Max),
        cores: Some(1),
        ..Machine::default()
    };
    let limits = MachineLimits {
        max_memory: 1024,
        max_cpus: 4,
        default_threads: 1,
    };
    let layers = MachineLayers {
        payload: Some(&payload),
        image: Some(&image),
        worker: Some(&worker),
    };
    let resolved = resolve_machine(layers, &limits).unwrap();
    let machine = resolved.machine();
    assert_eq!(resolved.memory_mib(), 256, "payload beats image");
    assert_eq!(
        machine.chipset,
        Some(Chipset::Microvm),
        "image beats worker"
    );
    assert_eq!(machine.cpu, Some(CpuModel::Max), "worker beats built-in");
    assert_eq!(
        machine.storage,
        Machine::builtin_defaults().storage,
        "built-in last"
    );
    let topology = resolved.topology();
    assert_eq!(
        (topology.threads, topology.cores, topology.sockets),
        (4, 1, 1)
    );
}

#[test]
fn with_defaults_fills_only_unset_fields() {
    let own = Machine {
        memory: Some(1),
        ..Machine::default()
    };
    let defaults = Machine {
        memory: Some(2),
        cores: Some(3),
        ..Machine::default()
    };
    let merged = own.with_defaults(&defaults);
    assert_eq!((merged.memory, merged.cores), (Some(1), Some(3)));
    assert_eq!(Machine::default().with_defaults(&defaults), defaults);
}
