//! ARCHITECTURE.md's crate graph is the workspace's: every edge it draws is a dependency in
//! that crate's manifest, and every dependency between workspace crates is drawn. A crate
//! added, or a dependency added or dropped, without the map being updated fails here; so
//! does a source file added or removed without the module map following.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The workspace's crates and, for each, the workspace crates among its normal
/// (`[dependencies]`) dependencies, from `cargo metadata`.
fn manifest_graph(root: &Path) -> Graph {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root)
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    let mut graph = Graph::new();
    for p in packages {
        let deps = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"].is_null()) // normal dependencies only
            .map(|d| d["name"].as_str().unwrap().to_string())
            .filter(|d| names.contains(d))
            .collect();
        graph.insert(p["name"].as_str().unwrap().to_string(), deps);
    }
    graph
}

/// The graph ARCHITECTURE.md draws: the first ```text block under "## Crates", one crate a
/// line, `clonebd-x -> a, b` naming its dependencies without the `clonebd-` prefix, and
/// "every crate above but testkit" for the binary.
fn documented_graph(doc: &str) -> Graph {
    let crates = &doc[doc.find("## Crates").expect("a Crates section")..];
    let start = crates.find("```text\n").expect("a text block in Crates") + 8;
    let block = &crates[start..start + crates[start..].find("```").unwrap()];
    let mut graph = Graph::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let (name, rest) = match line.split_once("->") {
            Some((n, r)) => (n.trim().to_string(), r),
            None => (line.split_whitespace().next().unwrap().to_string(), ""),
        };
        let rest = rest.split("  ").next().unwrap().trim();
        let deps: BTreeSet<String> = if rest == "every crate above but testkit" {
            graph
                .keys()
                .filter(|k| k.as_str() != "clonebd-testkit")
                .cloned()
                .collect()
        } else {
            rest.split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| format!("clonebd-{d}"))
                .collect()
        };
        graph.insert(name, deps);
    }
    graph
}

#[test]
fn architecture_crate_graph_matches_the_manifests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let documented = documented_graph(&doc);
    let real = manifest_graph(&root);
    assert!(
        real.len() >= 10,
        "cargo metadata found too few crates: {real:?}"
    );
    assert_eq!(
        documented, real,
        "ARCHITECTURE.md's crate graph (left) differs from the manifests (right)"
    );
}

/// Every `.rs` file under `dir`, as paths relative to `base`, sorted.
fn source_files(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(dir).expect("read a source directory") {
        let p = e.expect("a directory entry").path();
        if p.is_dir() {
            source_files(base, &p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p.strip_prefix(base).expect("under the crates directory");
            out.insert(rel.to_string_lossy().into_owned());
        }
    }
}

#[test]
fn architecture_module_map_lists_every_source_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let map = &doc[doc.find("## Module map").expect("a Module map section")..];
    let map = &map[..map[3..].find("\n## ").map_or(map.len(), |i| i + 3)];
    let listed: BTreeSet<String> = map
        .lines()
        .filter_map(|l| l.strip_prefix("- `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(path, _)| path.to_string())
        .collect();
    let crates = root.join("crates");
    let mut real = BTreeSet::new();
    for c in std::fs::read_dir(&crates).expect("crates/") {
        let src = c.expect("a crate").path().join("src");
        if src.is_dir() {
            source_files(&crates, &src, &mut real);
        }
    }
    assert!(
        real.len() >= 100,
        "too few source files found: {}",
        real.len()
    );
    let missing: Vec<_> = real.difference(&listed).collect();
    let gone: Vec<_> = listed.difference(&real).collect();
    assert!(
        missing.is_empty() && gone.is_empty(),
        "ARCHITECTURE.md's module map lacks {missing:?} and lists files that are gone: {gone:?}"
    );
}
