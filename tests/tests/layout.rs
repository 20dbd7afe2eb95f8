//! The rule of the workspace layout: the crates a VMM links (`vmm-shim`, `uffd-core`,
//! `transport`, `disk`) pull in no CLI, KVM, assembler or WAN-emulator crate, not even transitively
//! through normal dependencies. Read from `cargo metadata`, so a new dependency anywhere
//! in the graph is caught with the path that brings it in.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// What a VMM links.
const EMBEDDED: &[&str] = &["vmm-shim", "uffd-core", "transport", "disk"];

/// What none of them may reach, and why.
const FORBIDDEN: &[(&str, &str)] = &[
    (
        "clap",
        "a command-line parser belongs to the faultline binary",
    ),
    ("indicatif", "progress bars belong to the faultline binary"),
    (
        "tracing-subscriber",
        "a library logs through tracing; the binary installs the subscriber",
    ),
    ("kvm-ioctls", "KVM belongs to the reference VMM (refvmm)"),
    ("kvm-bindings", "KVM belongs to the reference VMM (refvmm)"),
    (
        "iced-x86",
        "the guest-program assembler belongs to the reference VMM (refvmm)",
    ),
    (
        "wan-emu",
        "the WAN emulator is for tests, benches and the CLI",
    ),
    (
        "refvmm",
        "the reference VMM is an embedder, not a dependency",
    ),
    (
        "faultline",
        "the CLI crate depends on the libraries, never the other way",
    ),
];

/// The workspace's resolved graph: package id → (name, ids of its normal dependencies).
fn normal_graph(metadata: &Value) -> HashMap<String, (String, Vec<String>)> {
    let names: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|node| {
            let id = node["id"].as_str().unwrap();
            let deps = node["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| {
                    // `kind` is null for a normal dependency, "dev" or "build" otherwise.
                    d["dep_kinds"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|k| k["kind"].is_null())
                })
                .map(|d| d["pkg"].as_str().unwrap().to_string())
                .collect();
            (id.to_string(), (names[id].to_string(), deps))
        })
        .collect()
}

/// Every forbidden crate reachable from `root`, each with the path that reaches it.
fn violations(graph: &HashMap<String, (String, Vec<String>)>, root: &str) -> Vec<String> {
    let start = graph
        .iter()
        .find(|(_, (name, _))| name == root)
        .map(|(id, _)| id.clone())
        .unwrap_or_else(|| panic!("{root} is not in the workspace graph"));
    // Breadth first, so each path reported is a shortest one.
    let mut parent: HashMap<String, Option<String>> = HashMap::from([(start.clone(), None)]);
    let mut queue = VecDeque::from([start]);
    let mut found = Vec::new();
    while let Some(id) = queue.pop_front() {
        let (name, deps) = &graph[&id];
        if let Some((_, why)) = FORBIDDEN.iter().find(|(f, _)| f == name) {
            let mut path = vec![name.clone()];
            let mut at = parent[&id].clone();
            while let Some(p) = at {
                path.push(graph[&p].0.clone());
                at = parent[&p].clone();
            }
            path.reverse();
            found.push(format!(
                "{root} depends on {name} ({why}): {}",
                path.join(" -> ")
            ));
            continue;
        }
        for d in deps {
            if !parent.contains_key(d) {
                parent.insert(d.clone(), Some(id.clone()));
                queue.push_back(d.clone());
            }
        }
    }
    found
}

#[test]
fn the_crates_a_vmm_links_pull_in_no_cli_kvm_or_emulator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // This host's graph: what is compiled here, and all of it already downloaded.
    let host = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("run rustc -vV");
    let host = String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let out = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host])
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let graph = normal_graph(&metadata);
    let found: Vec<String> = EMBEDDED
        .iter()
        .flat_map(|root| violations(&graph, root))
        .collect();
    assert!(
        found.is_empty(),
        "the layout rule is broken:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn the_rule_finds_a_transitive_dependency_and_names_its_path() {
    // A made-up graph: vmm-shim -> helper -> clap, and a dev-only edge that does not count
    // (normal_graph drops those before this function sees the graph).
    let graph: HashMap<String, (String, Vec<String>)> = [
        ("a", "vmm-shim", vec!["b"]),
        ("b", "helper", vec!["c"]),
        ("c", "clap", vec![]),
    ]
    .into_iter()
    .map(|(id, name, deps)| {
        (
            id.to_string(),
            (
                name.to_string(),
                deps.into_iter().map(String::from).collect(),
            ),
        )
    })
    .collect();
    let found = violations(&graph, "vmm-shim");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].ends_with("vmm-shim -> helper -> clap"),
        "{}",
        found[0]
    );
}

#[test]
fn dev_and_build_dependencies_do_not_count() {
    let metadata = serde_json::json!({
        "packages": [
            {"id": "a", "name": "vmm-shim"},
            {"id": "b", "name": "proptest"},
            {"id": "c", "name": "clap"},
        ],
        "resolve": {"nodes": [
            {"id": "a", "deps": [
                {"pkg": "b", "dep_kinds": [{"kind": null}]},
                {"pkg": "c", "dep_kinds": [{"kind": "dev"}, {"kind": "build"}]},
            ]},
            {"id": "b", "deps": []},
            {"id": "c", "deps": []},
        ]},
    });
    let graph = normal_graph(&metadata);
    assert_eq!(graph["a"].1, vec!["b".to_string()]);
    assert!(violations(&graph, "vmm-shim").is_empty());
}
