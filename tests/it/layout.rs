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

/// The modules in the order `lib.rs`'s `# Layout` lists them (its bullets).
fn floors() -> Vec<String> {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("lib.rs");
    lib.lines()
        .take_while(|l| l.starts_with("//!"))
        .filter_map(|l| l.strip_prefix("//! * "))
        .filter_map(|l| {
            let name: String = l
                .trim_start_matches(['[', '`'])
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Each module imports only modules listed above it in `lib.rs`, except the
/// ones that wire the others (`config`, `serve`), as `lib.rs` says.
#[test]
fn each_module_imports_only_the_floors_below_it() {
    let order = floors();
    assert!(order.len() > 15, "{order:?}");
    let graph = imports();
    let mut wrong = Vec::new();
    for (module, uses) in &graph {
        if module == "config" || module == "serve" {
            continue;
        }
        let Some(at) = order.iter().position(|m| m == module) else {
            wrong.push(format!("{module} is not in lib.rs's layout"));
            continue;
        };
        for used in uses {
            let below = order.iter().position(|m| m == used).is_some_and(|u| u < at);
            if !below {
                wrong.push(format!("{module} imports {used}, listed after it"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Outside tests, every import names what it takes (no `use super::*`):
/// what a file depends on is read at its top.
#[test]
fn no_glob_import_of_a_parent_outside_tests() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for (path, code) in sources_without_tests() {
        for (n, line) in code.lines().enumerate() {
            if line.trim() == "use super::*;" {
                let rel = path.strip_prefix(&src).expect("src").display().to_string();
                found.push(format!("{rel}:{}", n + 1));
            }
        }
    }
    assert!(found.is_empty(), "use super::* outside tests: {found:?}");
}

/// `lib.rs`'s "Life of an event" names each step as `` `src/…rs` `function` ``:
/// every file named exists, and every function named right after a file is
/// defined in it (as `fn name`); `queue/lua/…` scripts exist too.
#[test]
fn the_life_of_an_event_names_files_and_functions_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("lib.rs");
    let section: String = lib
        .lines()
        .skip_while(|l| !l.contains("# Life of an event"))
        .take_while(|l| l.starts_with("//!"))
        .map(|l| l.trim_start_matches("//!"))
        .collect::<Vec<_>>()
        .join(" ");
    // Backticked spans, in order.
    let spans: Vec<&str> = section.split('`').skip(1).step_by(2).collect();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        if span.ends_with(".lua") {
            if !root.join("src").join(span).exists() {
                wrong.push(format!("{span} does not exist"));
            }
            continue;
        }
        if !span.starts_with("src/") || !span.ends_with(".rs") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(root.join(span)) else {
            wrong.push(format!("{span} does not exist"));
            continue;
        };
        let Some(function) = spans
            .get(i + 1)
            .filter(|f| f.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        else {
            continue;
        };
        checked += 1;
        let defined = [format!("fn {function}("), format!("fn {function}<")]
            .iter()
            .any(|d| text.contains(d.as_str()));
        if !defined {
            wrong.push(format!("{span} has no fn {function}"));
        }
    }
    assert!(checked >= 12, "only {checked} functions named: {spans:?}");
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Every `.rs` file under `src`, with its text up to its test module.
fn sources_without_tests() -> Vec<(std::path::PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("tests.rs") {
                let text = std::fs::read_to_string(&path).expect("read");
                let code = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
                out.push((path, code));
            }
        }
    }
    out
}

/// Whether `a` becomes `b` by one letter added, removed or changed.
fn one_letter_apart(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len() == b.len() {
        return a.iter().zip(&b).filter(|(x, y)| x != y).count() == 1;
    }
    let (short, long) = if a.len() < b.len() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    if long.len() != short.len() + 1 {
        return false;
    }
    (0..long.len()).any(|skip| {
        long.iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, c)| c)
            .eq(short.iter())
    })
}

/// Public types have distinct names, and no two are a letter apart
/// (`RedisQueue` and `RedisQueues` were).
#[test]
fn public_type_names_are_distinct_and_not_a_letter_apart() {
    let mut names: Vec<(String, String)> = Vec::new();
    for (path, code) in sources_without_tests() {
        for line in code.lines().map(str::trim_start) {
            for kind in ["pub struct ", "pub enum ", "pub trait ", "pub type "] {
                if let Some(rest) = line.strip_prefix(kind) {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric())
                        .collect();
                    if !name.is_empty() {
                        names.push((name, path.display().to_string()));
                    }
                }
            }
        }
    }
    assert!(names.len() > 30, "{names:?}");
    let mut clashes = Vec::new();
    for (i, (a, pa)) in names.iter().enumerate() {
        for (b, pb) in &names[i + 1..] {
            if a == b || one_letter_apart(a, b) {
                clashes.push(format!("{a} ({pa}) and {b} ({pb})"));
            }
        }
    }
    assert!(clashes.is_empty(), "{clashes:#?}");
}

/// Every file a comment in `src` names (`` `something.rs` ``, `` `dir/file.rs` ``,
/// `` `queue/lua/x.lua` ``) exists: in `src`, `tests`, `examples` or `bench`,
/// at that path or ending with it; a function named right after a file
/// (`` `file.rs` `function` ``) is defined in it.
#[test]
fn files_and_functions_named_in_comments_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut all = Vec::new();
    let mut stack: Vec<std::path::PathBuf> = ["src", "tests", "examples", "bench"]
        .iter()
        .map(|d| root.join(d))
        .filter(|d| d.exists())
        .collect();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if !path.ends_with("node_modules") {
                    stack.push(path);
                }
            } else {
                all.push(path.strip_prefix(root).expect("root").display().to_string());
            }
        }
    }
    let mut missing = Vec::new();
    let (mut named, mut functions) = (0, 0);
    for (path, _) in sources_without_tests() {
        let text = std::fs::read_to_string(&path).expect("read");
        for line in text
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with("//"))
        {
            let spans: Vec<&str> = line.split('`').skip(1).step_by(2).collect();
            for (i, span) in spans.iter().enumerate() {
                let is_file = (span.ends_with(".rs") || span.ends_with(".lua"))
                    && span
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_/.-".contains(c));
                if !is_file {
                    continue;
                }
                named += 1;
                let found: Vec<&String> = all
                    .iter()
                    .filter(|f| f == span || f.ends_with(&format!("/{span}")))
                    .collect();
                if found.is_empty() {
                    missing.push(format!("{}: {span}", path.display()));
                    continue;
                }
                // `file.rs` `function`: the function is defined in it.
                let Some(function) = spans.get(i + 1).filter(|f| {
                    span.ends_with(".rs") && f.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) else {
                    continue;
                };
                functions += 1;
                let defined = found.iter().any(|f| {
                    let text = std::fs::read_to_string(root.join(f)).unwrap_or_default();
                    [format!("fn {function}("), format!("fn {function}<")]
                        .iter()
                        .any(|d| text.contains(d.as_str()))
                });
                if !defined {
                    missing.push(format!("{}: {span} has no fn {function}", path.display()));
                }
            }
        }
    }
    assert!(named > 20, "only {named} files named in comments");
    assert!(
        functions > 5,
        "only {functions} functions named after a file"
    );
    assert!(missing.is_empty(), "{missing:#?}");
}

/// Each function outside tests: (file, name, lines), by counting braces
/// from its `fn` line (strings and line comments skipped).
fn function_lengths() -> Vec<(String, String, usize)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    for (path, code) in sources_without_tests() {
        let rel = path.strip_prefix(&src).expect("src").display().to_string();
        let lines: Vec<&str> = code.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let trimmed = lines[i].trim_start();
            let name = trimmed
                .split_once("fn ")
                .filter(|(before, _)| {
                    !trimmed.starts_with("//")
                        && before.split_whitespace().all(|w| {
                            ["pub", "async", "const", "unsafe"].contains(&w)
                                || w.starts_with("pub(")
                        })
                })
                .map(|(_, after)| {
                    after
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect::<String>()
                })
                .filter(|n| !n.is_empty());
            let Some(name) = name else {
                i += 1;
                continue;
            };
            let (mut depth, mut started, mut j) = (0i32, false, i);
            'lines: while j < lines.len() {
                let mut in_str = false;
                let mut prev = ' ';
                let line = lines[j];
                for c in line.chars() {
                    if !in_str && prev == '/' && c == '/' {
                        break;
                    }
                    match c {
                        '"' if prev != '\\' => in_str = !in_str,
                        '{' if !in_str => {
                            depth += 1;
                            started = true;
                        }
                        '}' if !in_str => depth -= 1,
                        _ => {}
                    }
                    prev = c;
                }
                if started && depth <= 0 {
                    break 'lines;
                }
                if !started && line.trim_end().ends_with(';') {
                    break;
                }
                j += 1;
            }
            out.push((rel.clone(), name, j - i + 1));
            i = if started { j + 1 } else { i + 1 };
        }
    }
    out
}

/// No function over 100 lines outside tests.
#[test]
fn no_function_over_a_hundred_lines() {
    let all = function_lengths();
    assert!(all.len() > 300, "only {} functions found", all.len());
    let long: Vec<String> = all
        .iter()
        .filter(|(_, _, n)| *n > 100)
        .map(|(file, name, n)| format!("{file} {name}: {n} lines"))
        .collect();
    assert!(long.is_empty(), "{long:#?}");
}

/// The names of the methods the `Queue` trait declares (`fn name`, at its
/// indentation), read from `src/queue/mod.rs`.
fn contract_methods() -> Vec<String> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/queue/mod.rs"))
            .expect("queue/mod.rs");
    let start = text.find("pub trait Queue").expect("the Queue trait");
    let body = &text[start..];
    let end = body.find("\n}\n").expect("the trait's end");
    body[..end]
        .lines()
        .filter_map(|l| l.strip_prefix("    fn "))
        .filter_map(|l| l.split(['(', '<']).next())
        .map(str::to_string)
        .collect()
}

/// One contract (SPEC's queue, `queue::Queue`): every method it declares
/// is called by the relay or the tools outside the queue's own module (the
/// tests' shortcuts live in `tests/it/helpers.rs`), and no other trait of
/// the queue's stands beside it.
#[test]
fn every_method_of_the_queue_contract_has_a_caller_outside_the_queue() {
    let methods = contract_methods();
    assert!(methods.len() >= 15, "only {methods:?}");
    let outside: Vec<String> = sources_without_tests()
        .into_iter()
        .filter(|(p, _)| !p.components().any(|c| c.as_os_str() == "queue"))
        .map(|(_, code)| code)
        .collect();
    let uncalled: Vec<&String> = methods
        .iter()
        .filter(|m| {
            let call = format!(".{m}(");
            !outside.iter().any(|code| code.contains(&call))
        })
        .collect();
    assert!(
        uncalled.is_empty(),
        "no caller outside src/queue: {uncalled:?}"
    );
    let traits: Vec<String> = sources_without_tests()
        .into_iter()
        .filter(|(p, _)| p.components().any(|c| c.as_os_str() == "queue"))
        .flat_map(|(p, code)| {
            code.lines()
                .filter(|l| l.trim_start().starts_with("pub trait "))
                .map(|l| format!("{}: {}", p.display(), l.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(traits.len(), 1, "{traits:#?}");
}

/// One dispatch point over the backends: `Store` (`queue/store.rs`), the
/// only implementation of the contract besides the two backends'; nothing
/// outside the queue is generic over it.
#[test]
fn the_store_is_the_one_dispatch_point_over_the_backends() {
    let mut impls = Vec::new();
    let mut generic = Vec::new();
    for (path, code) in sources_without_tests() {
        for line in code.lines() {
            if let Some(rest) = line.trim_start().strip_prefix("impl Queue for ") {
                impls.push(rest.trim_end_matches(" {").to_string());
            }
            if line.contains(": Queue>") || line.contains(": Queue +") {
                generic.push(format!("{}: {}", path.display(), line.trim()));
            }
        }
    }
    impls.sort();
    assert_eq!(impls, ["EmbeddedQueue", "RedisQueues", "Store"]);
    assert!(generic.is_empty(), "{generic:#?}");
}

/// A destination's name is one type (`event::DestinationName`), and the
/// `default` destination one constant of it: the literal `"default"` is in
/// `event.rs` only (the sink's debug field name aside).
#[test]
fn the_default_destination_is_named_in_one_place() {
    let mut found = Vec::new();
    for (path, code) in sources_without_tests() {
        for line in code.lines() {
            if line.contains("\"default\"") && !line.contains(".field(\"default\"") {
                found.push(format!("{}: {}", path.display(), line.trim()));
            }
        }
    }
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found.iter().all(|l| l.contains("event.rs")), "{found:#?}");
}
