//! The documentation says what the code does: docs/configuration.md lists
//! exactly the variables of each command's `--help`, with the same defaults,
//! and the README stays a front page whose links lead somewhere.

use std::collections::BTreeMap;
use std::path::Path;

/// `ENV -> default` ("" when none) of every option with an env variable.
fn help_settings(command: &[&str]) -> BTreeMap<String, String> {
    let mut args = command.to_vec();
    args.push("--help");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .args(&args)
        .env_clear()
        .output()
        .expect("help");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut settings = BTreeMap::new();
    let mut env: Option<String> = None;
    let mut flush = |env: &mut Option<String>, default: &str| {
        if let Some(e) = env.take() {
            settings.insert(e, default.to_string());
        }
    };
    let mut default = String::new();
    for line in text.lines() {
        let s = line.trim();
        if s.starts_with("--") || (s.starts_with('-') && s.contains(", --")) {
            flush(&mut env, &default);
            default.clear();
        }
        if let Some(at) = s.find("[env: ") {
            let name: String = s[at + 6..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            env = Some(name);
        }
        if let Some(at) = s.find("[default: ") {
            default = s[at + 10..]
                .split(']')
                .next()
                .unwrap_or_default()
                .to_string();
        }
    }
    flush(&mut env, &default);
    settings
}

/// `ENV -> default` of one `## ` section's table in docs/configuration.md.
fn doc_settings(doc: &str, title_starts: &str) -> BTreeMap<String, String> {
    let start = doc
        .find(&format!("## {title_starts}"))
        .unwrap_or_else(|| panic!("no section {title_starts}"));
    let section = &doc[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    section[..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cols: Vec<&str> = l.split(" | ").collect();
            (
                cols[0]
                    .trim_start_matches("| ")
                    .trim_matches('`')
                    .to_string(),
                cols[2].trim().trim_matches('`').to_string(),
            )
        })
        .collect()
}

#[test]
fn the_configuration_reference_matches_help() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc =
        std::fs::read_to_string(root.join("docs/configuration.md")).expect("configuration.md");
    for (command, section) in [
        (vec!["serve"], "`cogrelay serve`"),
        (vec!["register"], "`cogrelay register`"),
        (vec!["sim"], "`cogrelay sim`"),
        (vec!["jobs"], "`cogrelay jobs`"),
    ] {
        let help = help_settings(&command);
        assert!(help.len() > 3, "{command:?}: parsed {help:?}");
        assert_eq!(
            doc_settings(&doc, section),
            help,
            "docs/configuration.md section {section} differs from `cogrelay {} --help` (run scripts/config-reference.py)",
            command.join(" ")
        );
    }
}

#[test]
fn the_readme_is_a_front_page_whose_links_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    assert!(
        readme.lines().count() <= 150,
        "README.md has {} lines",
        readme.lines().count()
    );
    let head: Vec<&str> = readme.lines().take(8).collect();
    assert!(
        head.iter().any(|l| l.contains("cargo test")),
        "the test command at the top"
    );
    for doc in [
        "configuration",
        "register",
        "benchmark",
        "guarantees",
        "scaling-out",
    ] {
        let link = format!("docs/{doc}.md");
        assert!(readme.contains(&link), "README links {link}");
        assert!(root.join(&link).is_file(), "{link} exists");
    }
}
