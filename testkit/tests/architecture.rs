//! The architecture's dependency rules, read from `cargo metadata` (the workspace's own
//! manifests, normal dependencies only): providers depend on the lifecycle and never the
//! reverse; web, database, queue-client and command-line crates stay out of the lifecycle, the
//! engine and everything below them; the guest agent links nothing of the host's (only the
//! guest <-> host contract, `taskvm-protocol`).

use std::collections::BTreeMap;

/// Each workspace package and its normal (non-dev, non-build) dependencies.
fn dependencies() -> BTreeMap<String, Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|package| {
            let names = package["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|dependency| dependency["kind"].is_null())
                .map(|dependency| dependency["name"].as_str().unwrap().to_owned())
                .collect();
            (package["name"].as_str().unwrap().to_owned(), names)
        })
        .collect()
}

/// The edges that must not exist: (package, dependencies it must not have).
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "taskvm-protocol",
        &[
            "taskvm-schemas",
            "taskvm-untar",
            "taskvm-image-manager",
            "taskvm-engine",
            "taskvm-lifecycle",
            "taskvm-serve",
            "taskvm-taskcluster",
            "taskvm",
            "tokio",
        ],
    ),
    (
        "taskvm-schemas",
        &[
            "taskvm-untar",
            "taskvm-image-manager",
            "taskvm-engine",
            "taskvm-lifecycle",
            "taskvm-serve",
            "taskvm-taskcluster",
            "taskvm",
            "tokio",
        ],
    ),
    (
        "taskvm-guest-agent",
        &[
            "taskvm-schemas",
            "taskvm-untar",
            "taskvm-image-manager",
            "taskvm-engine",
            "taskvm-lifecycle",
            "taskvm-serve",
            "taskvm-taskcluster",
            "taskvm",
        ],
    ),
    (
        "taskvm-image-manager",
        &[
            "taskvm-engine",
            "taskvm-lifecycle",
            "taskvm-serve",
            "taskvm-taskcluster",
            "taskvm",
        ],
    ),
    (
        "taskvm-engine",
        &[
            "taskvm-lifecycle",
            "taskvm-serve",
            "taskvm-taskcluster",
            "taskvm",
        ],
    ),
    (
        "taskvm-lifecycle",
        &["taskvm-serve", "taskvm-taskcluster", "taskvm"],
    ),
    ("taskvm-serve", &["taskvm-taskcluster", "taskvm"]),
    ("taskvm-taskcluster", &["taskvm-serve", "taskvm"]),
];

/// Crates that belong to one tier only: (crate, the packages that may depend on it).
const CONFINED: &[(&str, &[&str])] = &[
    ("axum", &["taskvm-serve"]),
    ("rusqlite", &["taskvm-serve"]),
    ("taskcluster", &["taskvm-taskcluster", "taskvm"]),
    ("clap", &["taskvm"]),
    ("indicatif", &["taskvm"]),
    // The Taskcluster client hands back `anyhow` errors; libraries of ours use `thiserror`.
    ("anyhow", &["taskvm-taskcluster", "taskvm"]),
];

#[test]
fn the_dependency_graph_draws_the_architecture() {
    let graph = dependencies();
    for name in [
        "taskvm-lifecycle",
        "taskvm-serve",
        "taskvm-taskcluster",
        "taskvm",
    ] {
        assert!(graph.contains_key(name), "no package {name}: {graph:?}");
    }
    let mut broken = Vec::new();
    for (package, forbidden) in FORBIDDEN {
        let dependencies = graph
            .get(*package)
            .unwrap_or_else(|| panic!("no {package}"));
        for dependency in dependencies {
            if forbidden.contains(&dependency.as_str()) {
                broken.push(format!("{package} depends on {dependency}"));
            }
        }
    }
    for (package, dependencies) in &graph {
        for (confined, allowed) in CONFINED {
            if dependencies.iter().any(|d| d == confined) && !allowed.contains(&package.as_str()) {
                broken.push(format!(
                    "{package} depends on {confined}, which only {allowed:?} may use"
                ));
            }
        }
    }
    for provider in ["taskvm-serve", "taskvm-taskcluster"] {
        assert!(
            graph[provider].iter().any(|d| d == "taskvm-lifecycle"),
            "{provider} runs tasks through the lifecycle"
        );
    }
    assert!(broken.is_empty(), "forbidden edges:\n{}", broken.join("\n"));
}
