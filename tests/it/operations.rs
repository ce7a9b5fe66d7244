//! The operations kit in `deploy/`, each part checked by the tool that runs
//! it: Prometheus alert rules (`promtool check rules` and the rules' own unit
//! tests), the Grafana dashboard and the alerts over metric names a running
//! relay exposes, the systemd unit (`systemd-analyze verify`), the Kubernetes
//! manifest (`kubernetes-validate --strict`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::helpers::*;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// Whether `program` runs; if not, skipped with a reason (fails under CI=true).
fn have(program: &str, install: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{program} is required under CI=true ({install})"
        );
        eprintln!("SKIPPED: {program} is not installed ({install})");
    }
    ok
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    if !have("promtool", "apt-get install prometheus") {
        return;
    }
    let (ok, out) = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy("prometheus/cogrelay-alerts.yml")));
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 9 rules found"), "{out}");
    let (ok, out) = run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(deploy("prometheus/cogrelay-alerts.test.yml")));
    assert!(ok, "{out}");
}

/// Every `cogrelay_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("cogrelay_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let before = start.checked_sub(1).map(|b| bytes[b]);
        if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The dashboard's and the alerts' expressions name only metrics that a
/// relay's `/metrics` has (after one delivered event; the embedded store's
/// size included); and the dashboard has a panel for each alert's metric.
#[tokio::test]
async fn the_dashboard_and_the_alerts_use_the_metrics_the_relay_exposes() {
    let app = spawn_app().await;
    app.post_event(&event("bot", "metrics-1")).await;
    assert!(
        app.sink
            .wait_for(1, std::time::Duration::from_secs(15))
            .await
    );
    let exposition = app.metrics_text().await;
    // Sample names (`name{...} value` or `name value`).
    let exposed: BTreeSet<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/cogrelay-dashboard.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("expr").to_string())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let in_dashboard = metric_names(&exprs.join("\n"));
    let rules = std::fs::read_to_string(deploy("prometheus/cogrelay-alerts.yml")).expect("rules");
    let rule_exprs: String = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect::<Vec<_>>()
        .join("\n");
    let in_alerts = metric_names(&rule_exprs);
    assert!(in_alerts.len() >= 6, "{in_alerts:?}");
    for name in in_dashboard.iter().chain(&in_alerts) {
        assert!(
            exposed.contains(name),
            "{name} is not in /metrics:\n{exposition}"
        );
    }
    for name in &in_alerts {
        assert!(
            in_dashboard.contains(name),
            "the alert metric {name} has no panel"
        );
    }
}

#[test]
fn the_systemd_unit_verifies_cleanly() {
    if !have("systemd-analyze", "apt-get install systemd") {
        return;
    }
    // verify checks that ExecStart exists: the unit as shipped, pointing at
    // the binary under test.
    let unit = std::fs::read_to_string(deploy("systemd/cogrelay.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/cogrelay serve"));
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("cogrelay.service");
    std::fs::write(
        &path,
        unit.replace(
            "ExecStart=/usr/local/bin/cogrelay",
            &format!("ExecStart={}", env!("CARGO_BIN_EXE_cogrelay")),
        ),
    )
    .expect("write");
    let (ok, out) = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    // Unknown or misspelt keys are only warnings: any output is a failure.
    assert!(ok && out.trim().is_empty(), "{out}");
    for hardening in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
        "StateDirectory=cogrelay",
        "CapabilityBoundingSet=\n",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(hardening), "{hardening}");
    }
    // Longer than the relay's drain before SIGKILL.
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec");
    let grace: u64 = cogrelay::cli::defaults::SHUTDOWN_GRACE_MS
        .parse()
        .expect("ms");
    assert!(stop * 1000 > grace);
}

#[test]
fn the_kubernetes_manifest_validates_and_probes_the_relay() {
    if !have("kubernetes-validate", "pip install kubernetes-validate") {
        return;
    }
    let path = deploy("kubernetes/cogrelay.yaml");
    let (ok, out) = run(Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&path));
    assert!(ok, "{out}");
    assert!(!out.contains("ERROR") && !out.contains("WARN"), "{out}");
    let m = std::fs::read_to_string(&path).expect("manifest");
    for needed in [
        "path: /readyz",
        "path: /healthz",
        "persistentVolumeClaim:",
        "mountPath: /var/lib/cogrelay",
        "COGRELAY_DATA_DIR: \"/var/lib/cogrelay\"",
        "secretKeyRef: { name: cogrelay, key: ADMIN_TOKEN }",
        "secretKeyRef: { name: cogrelay, key: WEBHOOK_SIGNING_SECRET",
        "type: Recreate",
    ] {
        assert!(m.contains(needed), "{needed}");
    }
    let grace: u64 = m
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("terminationGracePeriodSeconds");
    let drain: u64 = m
        .lines()
        .find_map(|l| l.trim().strip_prefix("SHUTDOWN_GRACE_MS:"))
        .and_then(|v| v.trim().trim_matches('"').parse().ok())
        .expect("SHUTDOWN_GRACE_MS");
    assert!(
        grace * 1000 > drain,
        "SIGTERM grace {grace} s, drain {drain} ms"
    );
}
