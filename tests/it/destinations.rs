//! The destinations file (SPEC §7): `cogrelay config check` on the real
//! binary, the rules between the file and `TARGET_ENDPOINT`, and a relay that
//! delivers to the file's destination with its static headers.

use std::path::Path;
use std::process::{Command, Output};

use cogrelay::config::destinations::{self, Globals};
use cogrelay::destination::Destinations;

use crate::helpers::*;

const CRM_KEY: &str = "crm-key-4711";
const CRM_WHSEC: &str = "whsec_c2VjcmV0LXNpZ25pbmcta2V5";

const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

const EXAMPLE: &str = r#"
[[destination]]
name = "crm"
url = "https://crm.internal/cognigy"
events = ["conversation.*"]
headers = { "X-Api-Key" = "${CRM_API_KEY}" }
signing_secret = "${CRM_WHSEC}"
rate_limit = 50

[[destination]]
name = "warehouse"
url = "http://warehouse.internal:8080/events"

[[destination]]
name = "ticketing"
url = "https://tickets.internal/hooks/cognigy"
events = ["handover.*"]
"#;

/// `cogrelay <args>` in `dir` (no `.env`, no `./cogrelay.toml` unless the
/// test wrote one), with the CRM credentials in its environment.
fn cogrelay(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .args(args)
        .current_dir(dir)
        .env_remove("TARGET_ENDPOINT")
        .env_remove("COGRELAY_CONFIG")
        .env("CRM_API_KEY", CRM_KEY)
        .env("CRM_WHSEC", CRM_WHSEC)
        .env("WEBHOOK_SIGNING_SECRET", "ingress-secret")
        .output()
        .expect("run cogrelay")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn config_check_prints_the_resolved_destinations_without_credentials() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("cogrelay.toml"), EXAMPLE).expect("write");
    // ./cogrelay.toml is read when COGRELAY_CONFIG is not set.
    let out = cogrelay(dir.path(), &["config", "check"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let resolved: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let names: Vec<&str> = resolved["destinations"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, ["crm", "warehouse", "ticketing"]);
    let crm = &resolved["destinations"][0];
    assert_eq!(crm["rate_limit"], 50);
    assert_eq!(crm["attempts"], 5, "ATTEMPTS where the file says nothing");
    assert_eq!(crm["circuit"]["failures"], 5, "CIRCUIT_FAILURES");
    assert_eq!(crm["signing_secret"], "***");
    assert_eq!(crm["headers"]["x-api-key"], "***");
    for secret in [CRM_KEY, "c2VjcmV0LXNpZ25pbmcta2V5", "ingress-secret"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} shown"
        );
    }
    // serve refuses what it cannot run yet, in one line, exit 2.
    assert!(stderr.contains("lists 3 destinations"), "{stderr}");
    let serve = cogrelay(dir.path(), &["serve"]);
    assert_eq!(serve.status.code(), Some(2));
    let line = text(&serve.stderr);
    assert!(
        line.contains("lists 3 destinations") && line.lines().count() == 1,
        "{line}"
    );
}

#[test]
fn a_bad_file_is_one_line_naming_file_destination_and_key_exit_2() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("relay.toml");
    let bad = EXAMPLE.replace("rate_limit = 50", "rate_limit = \"fast\"");
    std::fs::write(&path, bad).expect("write");
    let out = cogrelay(dir.path(), &["config", "check", "--config", "relay.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "error: relay.toml: destination \"crm\": key rate_limit: must be a whole number"
    );
    assert!(out.stdout.is_empty());

    // An unset ${VAR} is named; the value of a set one never is.
    std::fs::write(&path, EXAMPLE).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .args(["config", "check", "--config", "relay.toml"])
        .current_dir(dir.path())
        .env_remove("TARGET_ENDPOINT")
        .env_remove("CRM_API_KEY")
        .env("CRM_WHSEC", CRM_WHSEC)
        .env("WEBHOOK_SIGNING_SECRET", "s")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("destination \"crm\": key headers.X-Api-Key: ${CRM_API_KEY} is not set"),
        "{stderr}"
    );

    // A missing file named explicitly is an error, not "no file".
    let out = cogrelay(dir.path(), &["config", "check", "--config", "nope.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("nope.toml: cannot be read"));
}

#[test]
fn target_endpoint_and_a_file_together_is_a_configuration_error() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("cogrelay.toml"), EXAMPLE).expect("write");
    let out = cogrelay(
        dir.path(),
        &[
            "config",
            "check",
            "--target-endpoint",
            "http://127.0.0.1:9/x",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("TARGET_ENDPOINT is set and so is the destinations file")
            && stderr.contains("cogrelay.toml"),
        "{stderr}"
    );
    // Neither: the old message, now naming the file too.
    let empty = tempfile::tempdir().expect("tmp");
    let out = cogrelay(empty.path(), &["config", "check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("TARGET_ENDPOINT is not set"));

    // Without a file, TARGET_ENDPOINT is the one destination `default`.
    let out = cogrelay(
        empty.path(),
        &[
            "config",
            "check",
            "--target-endpoint",
            "http://user:pw@127.0.0.1:9/x",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let resolved: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(resolved["destinations"][0]["name"], "default");
    assert_eq!(resolved["destinations"][0]["events"][0], "*");
    assert!(
        !text(&out.stdout).contains("pw@"),
        "no credentials in the URL"
    );
}

both_backends! {
    /// A relay whose file names one destination delivers there, with its
    /// static headers (the relay's own headers win over a file's).
    async fn the_files_destination_gets_its_static_headers(b: Backend) {
        let mut app = spawn_app_on(b, |c| {
            let file = format!(
                "[[destination]]\nname = \"crm\"\nurl = \"{}\"\nattempts = 1\n\
                 headers = {{ \"X-Api-Key\" = \"${{CRM_API_KEY}}\", \"Idempotency-Key\" = \"from-file\" }}\n",
                c.delivery.target
            );
            let globals = Globals {
                delivery: c.delivery.clone(),
                circuit: c.circuit,
                max_age: c.max_age,
                lock_duration: c.pool.lock_duration,
            };
            let env = |var: &str| (var == "CRM_API_KEY").then(|| CRM_KEY.to_string());
            let list = destinations::parse(&file, "test.toml", &globals, &env).expect("valid");
            c.destinations_file = Some(Destinations { list, file: Some("test.toml".into()) });
        })
        .await;
        let reply = app.post_event(&event("bot-1", "dest-1")).await;
        assert_eq!(reply.status, 200, "{}", reply.json);
        assert!(app.sink.wait_for(1, WAIT).await, "delivered");
        let got = &app.sink.received()[0];
        assert_eq!(got.header("x-api-key"), Some(CRM_KEY));
        assert_eq!(got.header("idempotency-key"), Some("cognigy-bot-1-dest-1"));
        app.stop().await.expect("clean stop");
    }
}
