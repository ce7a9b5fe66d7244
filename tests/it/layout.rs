//! The module layout can be read bottom-up: the domain core (`event`) imports
//! no HTTP, queue or config code; `queue` imports nothing of the ingress, the
//! delivery, the admin API or the command line; and no two modules import
//! each other. Read from the source (`use crate::x` and `crate::x::` paths,
//! comments skipped).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its files name.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).expect("under src");
            let module = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .map(|s| s.trim_end_matches(".rs").to_string())
                .expect("module");
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            let names = out.entry(module.clone()).or_default();
            for line in text.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != module {
                        names.insert(name);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_domain_core_and_the_queue_import_only_below_them() {
    let graph = imports();
    let forbidden: [(&str, &[&str]); 2] = [
        (
            "event",
            &[
                "ingress", "queue", "config", "cli", "delivery", "admin", "serve", "cognigy",
            ],
        ),
        (
            "queue",
            &["ingress", "delivery", "admin", "cli", "serve", "config"],
        ),
    ];
    for (module, not) in forbidden {
        let uses = graph
            .get(module)
            .unwrap_or_else(|| panic!("no module {module}"));
        let bad: Vec<&String> = uses.iter().filter(|m| not.contains(&m.as_str())).collect();
        assert!(bad.is_empty(), "{module} imports {bad:?}");
    }
}

#[test]
fn no_two_modules_import_each_other() {
    let graph = imports();
    let mut cycles = Vec::new();
    for (a, uses) in &graph {
        for b in uses {
            if a < b && graph.get(b).is_some_and(|u| u.contains(a)) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that import each other: {cycles:?}"
    );
}
