//! No secret in any output: the real binary runs with every kind of secret set
//! and debug logging on; we send good and bad traffic, call every admin route,
//! run every command's --help and the jobs CLI, then search every byte of
//! output and every log line for each secret.

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use cogrelay::ingress::auth::sign_hex;
use cogrelay::sim::{self, SimOptions};

use crate::helpers::*;

const SIGNING: &str = "sig-secret-7c1f0a";
const BASIC_PW: &str = "basic-pw-44e9d2";
const ADMIN: &str = "admin-token-91b3aa";
const CLIENT_SECRET: &str = "client-secret-3fe8c1";
const WHSEC_KEY: &str = "c2VjcmV0LXRhcmdldC1rZXktOWQ0"; // base64 of the target signing key
const TARGET_PW: &str = "target-pw-5a0d7e";
const REDIS_PW: &str = "redis-pw-60c2b9";
const DOTENV_PW: &str = "dotenv-pw-8e1f44";
const BAD_URL_PW: &str = "bad-url-pw-2d7c90";

#[tokio::test]
async fn no_secret_appears_in_any_output_or_log() {
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    sink.set_default(Behaviour::status(500));
    let (sim_addr, _sim) = sim::spawn(SimOptions::default()).await.expect("sim");
    let (port, admin_port) = (free_port(), free_port());
    // A .env in the working directory holds a secret too (register reads it).
    std::fs::write(
        dir.path().join(".env"),
        format!("GATEWAY_CALLBACK_URL=https://gw:{DOTENV_PW}@gw.example/cb\n"),
    )
    .expect(".env");
    let target = sink
        .url()
        .replace("http://", &format!("http://relay:{TARGET_PW}@"));
    let envs: Vec<(&str, String)> = vec![
        ("TARGET_ENDPOINT", target),
        ("COGRELAY_QUEUE", "embedded".into()),
        (
            "REDIS_URL",
            format!("redis://default:{REDIS_PW}@127.0.0.1:1"),
        ),
        ("WEBHOOK_SIGNING_SECRET", format!("old-{SIGNING},{SIGNING}")),
        ("INGRESS_BASIC_USER", "cognigy".into()),
        ("INGRESS_BASIC_PASSWORD", BASIC_PW.into()),
        ("ADMIN_TOKEN", ADMIN.into()),
        ("TARGET_SIGNING_SECRET", format!("whsec_{WHSEC_KEY}")),
        ("COGNIGY_BASE_URL", format!("http://{sim_addr}")),
        ("COGNIGY_CLIENT_ID", "relay".into()),
        ("COGNIGY_CLIENT_SECRET", CLIENT_SECRET.into()),
        ("ATTEMPTS", "2".into()),
        ("BACKOFF_DELAY_MS", "20".into()),
        ("PORT", port.to_string()),
        ("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}")),
        (
            "COGRELAY_DATA_DIR",
            dir.path().join("data").display().to_string(),
        ),
        ("LOG_FORMAT", "json".into()),
        ("RUST_LOG", "debug".into()),
    ];
    let bin = env!("CARGO_BIN_EXE_cogrelay");
    let command = |args: &[&str]| {
        let mut c = tokio::process::Command::new(bin);
        c.args(args)
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &envs {
            c.env(k, v);
        }
        c
    };
    let mut everything = String::new();

    let mut relay = command(&["serve"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("serve");
    let http = reqwest::Client::new();
    let ingress = format!("http://127.0.0.1:{port}/api/webhook/cognigy");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while http
        .get(format!("http://127.0.0.1:{admin_port}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline, "relay never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut bodies = Vec::new();
    for (i, body) in [event("bot", "s-1"), event("bot", "unknown-2")]
        .iter()
        .enumerate()
    {
        let raw = serde_json::to_vec(body).expect("json");
        let sig = sign_hex(SIGNING, &raw);
        let r = http
            .post(&ingress)
            .header("content-type", "application/json")
            .header("x-webhook-signature", sig)
            .body(raw.clone())
            .send()
            .await
            .expect("post");
        bodies.push(r.text().await.unwrap_or_default());
        // Wrong signature, wrong Basic password, right Basic password.
        let r = http
            .post(&ingress)
            .header("content-type", "application/json")
            .header("x-webhook-signature", "00")
            .body(raw.clone())
            .send()
            .await
            .expect("post");
        bodies.push(r.text().await.unwrap_or_default());
        let wrong =
            base64::engine::general_purpose::STANDARD.encode(format!("cognigy:{BASIC_PW}x"));
        let r = http
            .post(&ingress)
            .header("content-type", "application/json")
            .header("authorization", format!("Basic {wrong}"))
            .body(raw.clone())
            .send()
            .await
            .expect("post");
        bodies.push(r.text().await.unwrap_or_default());
        let mut e = body.clone();
        e["eventId"] = serde_json::json!(format!("basic-{i}"));
        let right = base64::engine::general_purpose::STANDARD.encode(format!("cognigy:{BASIC_PW}"));
        let r = http
            .post(&ingress)
            .header("content-type", "application/json")
            .header("authorization", format!("Basic {right}"))
            .body(serde_json::to_vec(&e).expect("json"))
            .send()
            .await
            .expect("post");
        bodies.push(r.text().await.unwrap_or_default());
    }
    assert!(
        sink.wait_for(4, Duration::from_secs(20)).await,
        "deliveries attempted"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = format!("http://127.0.0.1:{admin_port}");
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/dashboard.js"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/admin/queue"),
        ("GET", "/admin/jobs"),
        ("GET", "/admin/jobs?state=failed"),
        ("GET", "/admin/jobs/1"),
        ("POST", "/admin/jobs/1/retry"),
        ("POST", "/admin/jobs/retry?state=failed"),
        ("DELETE", "/admin/jobs/2"),
        ("GET", "/nope"),
    ] {
        for token in [Some(ADMIN), None, Some("wrong")] {
            let mut req = http.request(method.parse().expect("method"), format!("{admin}{path}"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.expect("admin");
            bodies.push(format!("{:?}", r.headers()));
            bodies.push(r.text().await.unwrap_or_default());
        }
    }
    relay.start_kill().expect("kill");
    let out = relay.wait_with_output().await.expect("output");
    everything.push_str(&String::from_utf8_lossy(&out.stdout));
    everything.push_str(&String::from_utf8_lossy(&out.stderr));
    everything.push_str(&bodies.join("\n"));
    assert!(
        everything.contains("\"level\":\"DEBUG\""),
        "debug logging was on"
    );

    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["register", "--help"],
        vec!["sim", "--help"],
        vec!["jobs", "--help"],
        vec!["jobs", "list", "--help"],
        vec!["queue", "stats", "--help"],
        vec!["jobs", "list", "--json"],
        vec!["jobs", "show", "2"],
        vec!["queue", "stats"],
        vec!["--version"],
    ] {
        let out = command(&args).output().await.expect("run");
        everything.push_str(&String::from_utf8_lossy(&out.stdout));
        everything.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        everything.contains("WEBHOOK_SIGNING_SECRET"),
        "the help output was captured"
    );
    // An invalid URL with credentials: the error line names it without them.
    for name in ["TARGET_ENDPOINT", "COGNIGY_BASE_URL"] {
        let out = command(&["serve"])
            .env(name, format!("http://user:{BAD_URL_PW}@[nope/x"))
            .env("VERIFY_EVENTS", "on")
            .output()
            .await
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(name) && stderr.contains("***@"), "{stderr}");
        everything.push_str(&stderr);
    }
    let received: String = sink
        .received()
        .iter()
        .map(|r| format!("{:?}", r.header("authorization")))
        .collect();
    assert!(
        received.contains("Basic"),
        "the target's credentials were used: {received}"
    );

    let basic_b64 = base64::engine::general_purpose::STANDARD.encode(format!("cognigy:{BASIC_PW}"));
    for secret in [
        SIGNING,
        BASIC_PW,
        ADMIN,
        CLIENT_SECRET,
        WHSEC_KEY,
        basic_b64.as_str(),
        "sim-",
        TARGET_PW,
        REDIS_PW,
        DOTENV_PW,
        BAD_URL_PW,
    ] {
        if let Some(at) = everything.find(secret) {
            let from = at.saturating_sub(200);
            panic!(
                "secret {secret:?} appears in output: …{}…",
                &everything[from..(at + 100).min(everything.len())]
            );
        }
    }
}
