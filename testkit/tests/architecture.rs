//! The architecture's dependency rules, read from `cargo metadata` (the workspace's own
//! manifests, normal dependencies only): providers depend on the lifecycle and never the
//! reverse; web, database, queue-client and command-line crates stay out of the lifecycle, the
//! engine and everything below them; the guest agent links nothing of the host's (only the
//! guest <-> host contract, `taskvm-protocol`).

use std::collections::BTreeMap;

/// `cargo metadata` of the workspace's own packages.
fn metadata() -> serde_json::Value {
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
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Each workspace package and its normal (non-dev, non-build) dependencies.
fn dependencies() -> BTreeMap<String, Vec<String>> {
    metadata()["packages"]
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

/// The workspace's layers, bottom up: a package may depend on packages of lower layers only
/// (so never on its own layer's: the two providers stay apart). `tokio` stays out of the
/// two lowest.
const LAYERS: &[&[&str]] = &[
    &["taskvm-protocol"],
    &["taskvm-schemas"],
    &["taskvm-untar"],
    &["taskvm-image-manager"],
    &["taskvm-engine"],
    &["taskvm-lifecycle"],
    &["taskvm-serve", "taskvm-taskcluster"],
    &["taskvm"],
];

/// Packages outside the layers, with the only packages of ours they may depend on.
const APART: &[(&str, &[&str])] = &[
    // A static binary inside guests: the guest <-> host contract and nothing of the host's.
    ("taskvm-guest-agent", &["taskvm-protocol"]),
];

/// The layer of `package`, when it is one of the layered packages.
fn layer_of(package: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&package))
}

/// Crates that belong to one tier only: (crate, the packages that may depend on it).
const CONFINED: &[(&str, &[&str])] = &[
    ("axum", &["taskvm-serve"]),
    ("rusqlite", &["taskvm-serve"]),
    // Hawk signing lives in the provider's own Taskcluster client.
    ("hawk", &["taskvm-taskcluster"]),
    ("clap", &["taskvm"]),
    ("indicatif", &["taskvm"]),
    // Libraries of ours use `thiserror`; `anyhow` is the binary's.
    ("anyhow", &["taskvm"]),
];

#[test]
fn the_dependency_graph_draws_the_architecture() {
    let graph = dependencies();
    let named = LAYERS.iter().flat_map(|layer| layer.iter());
    for name in named.chain(APART.iter().map(|(name, _)| name)) {
        assert!(graph.contains_key(*name), "no package {name}: {graph:?}");
    }
    let mut broken = Vec::new();
    for (package, dependencies) in &graph {
        let ours = dependencies.iter().filter(|d| d.starts_with("taskvm"));
        if let Some(level) = layer_of(package) {
            for dependency in ours {
                if layer_of(dependency).is_none_or(|other| other >= level) {
                    broken.push(format!("{package} depends on {dependency}"));
                }
            }
            if level < 2 && dependencies.iter().any(|d| d == "tokio") {
                broken.push(format!("{package} depends on tokio"));
            }
        } else if let Some((_, allowed)) = APART.iter().find(|(name, _)| name == package) {
            for dependency in ours {
                if !allowed.contains(&dependency.as_str()) {
                    broken.push(format!("{package} depends on {dependency}"));
                }
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

/// Each workspace package's source directory (the directory of its lib or bin target).
fn source_dirs() -> Vec<(String, std::path::PathBuf)> {
    let metadata = metadata();
    let mut dirs = Vec::new();
    for package in metadata["packages"].as_array().unwrap() {
        for target in package["targets"].as_array().unwrap() {
            let kinds = target["kind"].as_array().unwrap();
            if kinds.iter().any(|kind| kind == "lib" || kind == "bin") {
                let root = std::path::Path::new(target["src_path"].as_str().unwrap());
                let dir = root.parent().unwrap().to_owned();
                let name = package["name"].as_str().unwrap().to_owned();
                if !dirs.iter().any(|(_, known)| known == &dir) {
                    dirs.push((name, dir));
                }
            }
        }
    }
    dirs
}

/// The crate's top-level modules and which others each one names (`crate::other`, or
/// `super::other` from a file directly under the crate root), outside comments and tests.
fn module_graph(src: &std::path::Path) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                out.push(path);
            }
        }
    }
    let mut all = Vec::new();
    files(src, &mut all);
    // (top-level module, whether the file sits directly under the crate root)
    let place = |path: &std::path::Path| -> Option<(String, bool)> {
        let relative = path.strip_prefix(src).unwrap();
        let parts: Vec<String> = relative
            .with_extension("")
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        match parts.as_slice() {
            [root] if root == "lib" || root == "main" => None,
            [module] => Some((module.clone(), true)),
            [module, last] if last == "mod" => Some((module.clone(), true)),
            [module, ..] => Some((module.clone(), false)),
            [] => None,
        }
    };
    let modules: std::collections::BTreeSet<String> = all
        .iter()
        .filter_map(|path| place(path))
        .map(|(m, _)| m)
        .collect();
    let mut graph: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for path in &all {
        let Some((module, top)) = place(path) else {
            continue;
        };
        let text = std::fs::read_to_string(path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut prefixes = vec!["crate::"];
        if top {
            prefixes.push("super::");
        }
        for line in code
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
        {
            for prefix in &prefixes {
                for (at, _) in line.match_indices(prefix) {
                    let name: String = line[at + prefix.len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if name != module && modules.contains(&name) {
                        graph.entry(module.clone()).or_default().insert(name);
                    }
                }
            }
        }
    }
    graph
}

/// A cycle of `graph`, if it has one.
fn find_cycle(graph: &BTreeMap<String, std::collections::BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(start, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_a_module_import_cycle() {
    let mut cycles = Vec::new();
    let dirs = source_dirs();
    assert!(dirs.len() >= 10, "{dirs:?}");
    for (package, src) in dirs {
        let graph = module_graph(&src);
        if let Some(cycle) = find_cycle(&graph) {
            cycles.push(format!("{package}: {}", cycle.join(" -> ")));
        }
    }
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut graph: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for (from, to) in [
        ("vm", "launch"),
        ("launch", "snapshot"),
        ("snapshot", "disk"),
    ] {
        graph.entry(from.into()).or_default().insert(to.into());
    }
    assert_eq!(find_cycle(&graph), None);
    graph
        .entry("snapshot".into())
        .or_default()
        .insert("vm".into());
    let cycle = find_cycle(&graph).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4, "{cycle:?}");
}
