//! The layers of `src/` point down, and no module imports itself round a circle.
//!
//! Reads every `crate::` and `super::` path in the production part of each file (above its first
//! `#[cfg(test)]`), maps it to the file that defines the module, and checks the graph: no strongly
//! connected group of files, and no edge from a lower layer to a higher one (docs/architecture.md
//! draws the same layers).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom first. A module is in the layer of its longest listed prefix.
const LAYERS: &[&[&str]] = &[
    &[
        "task",
        "event",
        "filter",
        "metrics",
        "config",
        "shutdown",
        "lifecycle",
    ],
    &["ring", "hub"],
    &["backend"],
    &["auth", "limits", "idempotency"],
    &["service"],
    &[
        "state",
        "error",
        "middleware",
        "routes",
        "tls",
        "openapi",
        "http_guard",
        "origin",
        "log_redact",
        "listener",
        "webhook",
    ],
    &["app", ""],
];

type Module = Vec<String>;

fn modules(src: &Path) -> BTreeMap<Module, String> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let production = text.split("#[cfg(test)]").next().unwrap().to_owned();
            found.insert(module, production);
        }
    }
    found
}

/// Every `crate::a::b` / `super::a` path in `text`, with `{x, y}` groups expanded.
fn paths(text: &str) -> Vec<(String, Vec<String>)> {
    let text: String = text
        .lines()
        .map(|line| line.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = Vec::new();
    for root in ["crate", "super"] {
        let mut rest = text.as_str();
        while let Some(at) = rest.find(&format!("{root}::")) {
            let boundary = rest[..at]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
            rest = &rest[at + root.len() + 2..];
            if !boundary {
                continue;
            }
            let mut parts = Vec::new();
            let mut tail = rest;
            loop {
                let end = tail
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                if end > 0 {
                    parts.push(tail[..end].to_owned());
                }
                tail = &tail[end..];
                if let Some(next) = tail.strip_prefix("::") {
                    if let Some(group) = next.strip_prefix('{') {
                        let close = group.find('}').unwrap_or(group.len());
                        for item in group[..close].split(',') {
                            let item = item.trim().split(" as ").next().unwrap();
                            let first = item.split("::").next().unwrap().trim();
                            if !first.is_empty() && first != "self" {
                                let mut with = parts.clone();
                                with.push(first.to_owned());
                                found.push((root.to_owned(), with));
                            }
                        }
                        break;
                    }
                    tail = next;
                } else {
                    break;
                }
            }
            found.push((root.to_owned(), parts));
        }
    }
    found
}

fn layer(module: &Module) -> usize {
    let first = module.first().map_or("", String::as_str);
    LAYERS
        .iter()
        .position(|names| names.contains(&first))
        .unwrap_or_else(|| panic!("{module:?} is in no layer: add it to LAYERS"))
}

fn graph(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let files = modules(src);
    let target = |path: &[String]| {
        (1..=path.len())
            .rev()
            .map(|i| path[..i].to_vec())
            .find(|prefix| files.contains_key(prefix))
    };
    let mut edges = BTreeMap::new();
    for (module, text) in &files {
        let mut out = BTreeSet::new();
        for (root, parts) in paths(text) {
            // `super` is the parent module, for `a/b.rs` and `a/b/mod.rs` alike.
            let full = if root == "super" {
                let mut base = module.clone();
                base.pop();
                base.extend(parts);
                base
            } else {
                parts
            };
            if let Some(t) = target(&full) {
                if &t != module && !t.is_empty() {
                    out.insert(t);
                }
            }
        }
        edges.insert(module.clone(), out);
    }
    edges
}

/// Groups of modules that reach each other (Tarjan's strongly connected components).
fn circles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<Module, usize>,
        low: BTreeMap<Module, usize>,
        stack: Vec<Module>,
        found: Vec<Vec<Module>>,
    }
    fn visit(walk: &mut Walk, v: &Module) {
        let n = walk.index.len();
        walk.index.insert(v.clone(), n);
        walk.low.insert(v.clone(), n);
        walk.stack.push(v.clone());
        for w in walk.edges.get(v).into_iter().flatten() {
            if !walk.index.contains_key(w) {
                visit(walk, w);
                let low = walk.low[v].min(walk.low[w]);
                walk.low.insert(v.clone(), low);
            } else if walk.stack.contains(w) {
                let low = walk.low[v].min(walk.index[w]);
                walk.low.insert(v.clone(), low);
            }
        }
        if walk.low[v] == walk.index[v] {
            let mut group = Vec::new();
            while let Some(w) = walk.stack.pop() {
                let done = &w == v;
                group.push(w);
                if done {
                    break;
                }
            }
            if group.len() > 1 {
                walk.found.push(group);
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !walk.index.contains_key(v) {
            visit(&mut walk, v);
        }
    }
    walk.found
}

#[test]
fn src_has_no_import_circle_and_every_import_points_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = graph(&src);
    assert!(edges.len() > 20, "read the modules of {}", src.display());
    let found = circles(&edges);
    assert!(found.is_empty(), "import circles: {found:?}");
    let upward: Vec<String> = edges
        .iter()
        .flat_map(|(from, to)| to.iter().map(move |to| (from, to)))
        .filter(|(from, to)| layer(to) > layer(from))
        .map(|(from, to)| format!("{} -> {}", from.join("::"), to.join("::")))
        .collect();
    assert!(
        upward.is_empty(),
        "imports from a lower layer up: {upward:?}"
    );
}

#[test]
fn the_check_sees_a_circle_and_an_upward_import() {
    let dir = std::env::temp_dir().join(format!("taskstream-layers-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("backend")).unwrap();
    std::fs::write(dir.join("hub.rs"), "use crate::backend::Backend;\n").unwrap();
    std::fs::write(dir.join("backend/mod.rs"), "use crate::hub::Hub;\n").unwrap();
    std::fs::write(
        dir.join("task.rs"),
        "use crate::service::{publish, Refusal};\n#[cfg(test)]\nuse crate::app::x;\n",
    )
    .unwrap();
    std::fs::write(dir.join("service.rs"), "").unwrap();
    std::fs::write(dir.join("app.rs"), "").unwrap();
    let edges = graph(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let found = circles(&edges);
    assert_eq!(found.len(), 1, "{edges:?}");
    let task = edges[&vec!["task".to_owned()]].clone();
    assert_eq!(
        task,
        BTreeSet::from([vec!["service".to_owned()]]),
        "test code is left out"
    );
    assert!(layer(&vec!["service".into()]) > layer(&vec!["task".into()]));
}
