//! The server's modules import each other without cycles (ARCHITECTURE.md: "no module of the server
//! imports a module that imports it back"). Read from the sources, so a new cycle fails here.
// Tests may unwrap, expect and print (the lint policy is for library code).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Names the crate root re-exports, mapped to the module that defines them.
const REEXPORTS: [(&str, &str); 14] = [
    ("ApiError", "error"),
    ("AppState", "state"),
    ("Generator", "state"),
    ("Settings", "state"),
    ("Embedder", "state"),
    ("StartError", "state"),
    ("load_generator", "state"),
    ("model_id", "state"),
    ("Metrics", "metrics"),
    ("OpenAiJson", "extract"),
    ("OpenAiJsonRaw", "extract"),
    ("parse_json", "extract"),
    ("Routing", "plan"),
    ("app", "http"),
];

/// `crate::x` paths of a file outside its `#[cfg(test)]` module, as top-level module names.
fn imports(src: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let src = src.split("#[cfg(test)]").next().unwrap_or(src);
    let alias: BTreeMap<&str, &str> = REEXPORTS.into_iter().collect();
    let mut out = BTreeSet::new();
    let mut add = |name: &str| {
        let name = name.trim().trim_start_matches('{').trim();
        let first = name.split("::").next().unwrap_or("").trim();
        if let Some(m) = alias.get(first) {
            out.insert(m.to_string());
        } else if modules.contains(first) {
            out.insert(first.to_string());
        }
    };
    for (i, _) in src.match_indices("crate::") {
        let rest = &src[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end].split(',').for_each(&mut add);
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            add(&rest[..end]);
        }
    }
    out
}

#[test]
fn server_modules_import_each_other_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            for f in std::fs::read_dir(&p).unwrap() {
                files.push(f.unwrap().path());
            }
        } else {
            files.push(p);
        }
    }
    // A file's module is its top-level name (tier/local.rs belongs to `tier`).
    let module_of = |p: &Path| {
        let rel = p.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        first.trim_end_matches(".rs").to_string()
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| module_of(p))
        .filter(|m| m != "lib")
        .collect();
    assert!(
        modules.contains("plan") && modules.contains("tier"),
        "{modules:?}"
    );
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in &files {
        let m = module_of(p);
        if m == "lib" {
            continue;
        }
        let deps = imports(&std::fs::read_to_string(p).unwrap(), &modules);
        graph
            .entry(m.clone())
            .or_default()
            .extend(deps.into_iter().filter(|d| *d != m));
    }
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) {
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            match state.get(d.as_str()) {
                Some(1) => panic!("import cycle: {} -> {d}", path.join(" -> ")),
                Some(_) => {}
                None => visit(d, g, state, path),
            }
        }
        path.pop();
        state.insert(m.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        if !state.contains_key(m.as_str()) {
            visit(m, &graph, &mut state, &mut Vec::new());
        }
    }
    // The request path points one way.
    assert!(graph["handlers"].contains("plan") && graph["handlers"].contains("answer"));
    assert!(!graph["plan"].contains("state") && !graph["plan"].contains("tier"));
    assert!(!graph["tier"].contains("answer") && !graph["tier"].contains("respond"));
}

#[test]
fn the_cycle_check_sees_grouped_and_aliased_imports() {
    let modules: BTreeSet<String> = ["state", "error", "plan"].map(String::from).into();
    let got = imports(
        "use crate::{ApiError, AppState};\nuse crate::plan::Target;\n#[cfg(test)]\nuse crate::x;",
        &modules,
    );
    assert_eq!(got, ["error", "plan", "state"].map(String::from).into());
}
