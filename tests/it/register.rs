//! `cogrelay register`, the real binary against `cogrelay sim` (in-process) and
//! real HTTP/TLS targets: every path of SPEC §4, its exit code, its one audit
//! line, and that no secret is printed.

use std::time::{Duration, Instant};

use cogrelay::secret::Secret;
use cogrelay::sim::{self, Fault, SimOptions};
use serde_json::Value;

use crate::helpers::{free_port, Behaviour, Sink};
use crate::tls::{Leaf, TestCa};

const CLIENT_SECRET: &str = "client-secret-9f2e";
const SIGNING_SECRET: &str = "signing-secret-77ab";
const API_KEY: &str = "api-key-c3d4e5";

struct Run {
    code: i32,
    audit: Value,
    stderr: String,
    elapsed: Duration,
}

/// Runs `cogrelay register` with a clean environment plus `envs` and `args`,
/// and checks what every run must hold: one JSON line on stdout, no secret anywhere.
async fn register(envs: &[(&str, String)], args: &[&str]) -> Run {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"));
    cmd.arg("register")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir.path());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let out = cmd.output().await.expect("run register");
    let elapsed = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one audit line on stdout: {stdout}\nstderr: {stderr}"
    );
    let audit: Value = serde_json::from_str(lines[0]).expect("audit line is JSON");
    for secret in [CLIENT_SECRET, SIGNING_SECRET, API_KEY] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked:\n{stdout}\n{stderr}"
        );
    }
    assert!(
        !stdout.contains("sim-") && !stderr.contains("sim-"),
        "an access token leaked:\n{stdout}\n{stderr}"
    );
    Run {
        code: out.status.code().unwrap_or(-1),
        audit,
        stderr,
        elapsed,
    }
}

fn base_env(sim: std::net::SocketAddr, target: &str) -> Vec<(&'static str, String)> {
    vec![
        ("COGNIGY_BASE_URL", format!("http://{sim}")),
        ("COGNIGY_CLIENT_ID", "acme".into()),
        ("COGNIGY_CLIENT_SECRET", CLIENT_SECRET.into()),
        ("WEBHOOK_TARGET_URL", target.into()),
        ("WEBHOOK_SIGNING_SECRET", SIGNING_SECRET.into()),
    ]
}

async fn http_target() -> Sink {
    let sink = Sink::start().await.expect("target");
    sink.set_default(Behaviour::Status(
        200,
        vec![("Content-Type".into(), "application/json".into())],
    ));
    sink
}

const FAST: [&str; 3] = ["--allow-http", "--health-delay-ms=20", "--timeout-ms=2000"];

/// Of a rotation list (what `serve` takes in the same variable), the
/// connector gets the first secret, trimmed: the whole list was sent, and
/// the relay refused every event Cognigy signed with it.
#[tokio::test]
async fn a_rotation_list_registers_its_first_secret() {
    let (sim_addr, sim) = sim::spawn(SimOptions::default()).await.expect("sim");
    let target = http_target().await;
    let mut env = base_env(sim_addr, &target.url());
    env.retain(|(k, _)| *k != "WEBHOOK_SIGNING_SECRET");
    env.push(("WEBHOOK_SIGNING_SECRET", " new-secret , old-secret".into()));
    let run = register(&env, &FAST).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    use sha2::Digest as _;
    let want = hex::encode(sha2::Sha256::digest(b"new-secret"));
    assert_eq!(
        sim.stats()["signingSecretSha256"],
        serde_json::json!([want])
    );
}

#[tokio::test]
async fn registers_verifies_and_notifies_the_gateway_with_one_token() {
    let (sim_addr, sim) = sim::spawn(SimOptions {
        pending_polls: 3,
        ..Default::default()
    })
    .await
    .expect("sim");
    let target = http_target().await;
    let mut env = base_env(sim_addr, &target.url());
    env.push(("GATEWAY_CALLBACK_URL", format!("http://{sim_addr}/gateway")));
    let run = register(&env, &FAST).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let a = &run.audit;
    assert_eq!(a["action"], "WEBHOOK_REGISTRATION");
    assert_eq!(a["status"], "SUCCESS");
    assert!(a["latencyMs"].is_u64() && a["timestamp"].is_string());
    let d = &a["details"];
    assert_eq!(d["domain"], "127.0.0.1");
    assert_eq!(d["targetUrl"], target.url());
    assert_eq!(d["idempotent"], false);
    assert_eq!(
        d["healthVerified"], true,
        "pending for three polls, then active"
    );
    assert_eq!(d["connectorId"], "conn_1");
    assert_eq!(d["validation"]["status"], 200);
    assert_eq!(d["validation"]["contentType"], "application/json");
    assert!(d["validation"]["responseTimeMs"].is_u64());
    assert!(d.get("error").is_none());

    let stats = sim.stats();
    assert_eq!(
        stats["tokenRequests"], 1,
        "one token for the whole registration"
    );
    let connector = &stats["connectors"][0];
    assert_eq!(connector["endpointUrl"], target.url());
    assert_eq!(
        connector["requestSigning"]["headerName"],
        "X-Webhook-Signature"
    );
    assert_eq!(connector["retryPolicy"]["maxRetries"], 5);
    let calls = stats["gatewayCalls"].as_array().expect("calls");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["event"], "connector.registered");
    assert_eq!(calls[0]["connector"]["id"], "conn_1");
    assert_eq!(calls[0]["connector"]["status"], "active");
    assert!(
        run.stderr.contains("ok   authenticated") && run.stderr.contains("is active"),
        "human summary on stderr: {}",
        run.stderr
    );
    assert_eq!(target.received()[0].method, "HEAD");
}

#[tokio::test]
async fn running_twice_is_idempotent() {
    let (sim_addr, sim) = sim::spawn(SimOptions {
        pending_polls: 0,
        ..Default::default()
    })
    .await
    .expect("sim");
    let target = http_target().await;
    let env = base_env(sim_addr, &target.url());
    let first = register(&env, &FAST).await;
    let second = register(&env, &FAST).await;
    assert_eq!((first.code, second.code), (0, 0), "{}", second.stderr);
    assert_eq!(first.audit["details"]["idempotent"], false);
    assert_eq!(second.audit["details"]["idempotent"], true);
    assert_eq!(
        first.audit["details"]["connectorId"],
        second.audit["details"]["connectorId"]
    );
    assert_eq!(
        sim.stats()["connectors"]
            .as_array()
            .expect("connectors")
            .len(),
        1
    );
    // --json: no human summary.
    let quiet = register(&env, &[FAST[0], FAST[1], FAST[2], "--json"]).await;
    assert_eq!(quiet.code, 0);
    assert!(quiet.stderr.trim().is_empty(), "{}", quiet.stderr);
}

#[tokio::test]
async fn a_503_on_the_first_post_is_retried_with_the_same_key() {
    let (sim_addr, sim) = sim::spawn(SimOptions {
        pending_polls: 0,
        ..Default::default()
    })
    .await
    .expect("sim");
    // The worst case: the connector is created, but the answer is lost.
    sim.inject(Fault {
        path: "/api/v1/connectors".into(),
        method: Some("POST".into()),
        status: 503,
        times: 1,
        after: true,
        location: None,
    });
    let target = http_target().await;
    let run = register(&base_env(sim_addr, &target.url()), &FAST).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.audit["details"]["idempotent"], true,
        "the retry found the connector by its key"
    );
    assert_eq!(
        sim.stats()["connectors"]
            .as_array()
            .expect("connectors")
            .len(),
        1,
        "one connector"
    );
    assert!(
        run.elapsed >= Duration::from_secs(1),
        "retried after Retry-After"
    );
}

#[tokio::test]
async fn never_active_exits_6_after_the_attempts_with_doubling_delays() {
    let (sim_addr, _sim) = sim::spawn(SimOptions {
        pending_polls: 1000,
        ..Default::default()
    })
    .await
    .expect("sim");
    let target = http_target().await;
    let run = register(
        &base_env(sim_addr, &target.url()),
        &[
            "--allow-http",
            "--health-attempts=4",
            "--health-delay-ms=150",
        ],
    )
    .await;
    assert_eq!(run.code, 6, "{}", run.stderr);
    assert_eq!(run.audit["status"], "FAILURE");
    assert_eq!(run.audit["details"]["healthVerified"], false);
    assert_eq!(run.audit["details"]["connectorId"], "conn_1");
    assert!(
        run.audit["details"]["error"]
            .as_str()
            .expect("error")
            .contains("still pending after 4 checks"),
        "{}",
        run.audit
    );
    // 150 + 300 + 600 ms between the four checks.
    assert!(
        run.elapsed >= Duration::from_millis(1050),
        "{:?}",
        run.elapsed
    );
    assert!(
        run.stderr.contains("checking again in 600 ms"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn gateway_down_is_retried_then_exit_7() {
    let (sim_addr, sim) = sim::spawn(SimOptions {
        pending_polls: 0,
        ..Default::default()
    })
    .await
    .expect("sim");
    let target = http_target().await;
    let mut env = base_env(sim_addr, &target.url());
    env.push((
        "GATEWAY_CALLBACK_URL",
        format!("http://127.0.0.1:{}/hook", free_port()),
    ));
    let run = register(&env, &FAST).await;
    assert_eq!(run.code, 7, "{}", run.stderr);
    let err = run.audit["details"]["error"].as_str().expect("error");
    assert!(
        err.contains("gateway callback failed after 4 attempts")
            && err.contains("connector exists"),
        "{err}"
    );
    assert_eq!(run.audit["details"]["connectorId"], "conn_1");
    assert!(
        run.elapsed >= Duration::from_millis(3500),
        "three retries: 0.5 + 1 + 2 s"
    );
    assert_eq!(sim.stats()["connectors"].as_array().expect("c").len(), 1);
}

#[tokio::test]
async fn rejected_credentials_exit_4_with_the_servers_description() {
    let (sim_addr, _sim) = sim::spawn(SimOptions {
        client_id: Some("acme".into()),
        client_secret: Some(Secret::new("the-right-one")),
        ..Default::default()
    })
    .await
    .expect("sim");
    let target = http_target().await;
    let run = register(&base_env(sim_addr, &target.url()), &FAST).await;
    assert_eq!(run.code, 4, "{}", run.stderr);
    let err = run.audit["details"]["error"].as_str().expect("error");
    assert!(
        err.contains("HTTP 401") && err.contains("client id or secret is wrong"),
        "{err}"
    );
    assert!(run.stderr.contains("client id or secret is wrong"));
}

#[tokio::test]
async fn missing_configuration_exits_2() {
    let run = register(
        &[
            ("COGNIGY_CLIENT_ID", "x".into()),
            ("COGNIGY_CLIENT_SECRET", CLIENT_SECRET.into()),
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("COGNIGY_DOMAIN"), "{}", run.stderr);
    let (sim_addr, _sim) = sim::spawn(SimOptions::default()).await.expect("sim");
    let mut env = base_env(sim_addr, "https://x.example/");
    env.retain(|(k, _)| *k != "WEBHOOK_TARGET_URL");
    let run = register(&env, &[]).await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("WEBHOOK_TARGET_URL is not set"),
        "{}",
        run.stderr
    );
    // Mistakes that were exit 8 ("cannot reach Cognigy") after 15 s of retries.
    for (name, value, said) in [
        (
            "COGNIGY_DOMAIN",
            "http://127.0.0.1:9",
            "COGNIGY_DOMAIN=\"http://127.0.0.1:9\" is not a host name",
        ),
        (
            "IDEMPOTENCY_KEY",
            "key\u{1}x",
            "IDEMPOTENCY_KEY is not valid",
        ),
    ] {
        let mut env = base_env(sim_addr, "https://x.example/");
        if name == "COGNIGY_DOMAIN" {
            env.retain(|(k, _)| *k != "COGNIGY_BASE_URL");
        }
        env.push((name, value.into()));
        let run = register(&env, &[]).await;
        assert_eq!(run.code, 2, "{name}: {}", run.stderr);
        assert!(run.stderr.contains(said), "{name}: {}", run.stderr);
    }
}

#[tokio::test]
async fn tls_preflight_passes_with_ca_file_and_names_each_failure() {
    let ca = TestCa::new();
    let (sim_addr, _sim) = sim::spawn(SimOptions {
        pending_polls: 0,
        rate_limit: cogrelay::cognigy::RateLimit {
            max: 10_000,
            per: Duration::from_secs(60),
        },
        ..Default::default()
    })
    .await
    .expect("sim");
    let ca_arg = format!("--ca-file={}", ca.pem_path.display());

    let valid = ca.serve(Leaf::Valid).await;
    let ok = register(
        &base_env(sim_addr, &valid),
        &[&ca_arg, "--health-delay-ms=20"],
    )
    .await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let v = &ok.audit["details"]["validation"];
    assert_eq!(v["tls"]["verified"], true);
    assert_eq!(v["tls"]["sni"], "localhost");
    assert_eq!(v["contentType"], "text/plain");
    assert!(v["responseTimeMs"].is_u64());

    let cases: Vec<(String, Vec<String>, &str)> = vec![
        (
            ca.serve(Leaf::Expired).await,
            vec![ca_arg.clone()],
            "has expired",
        ),
        (
            ca.serve(Leaf::WrongHost).await,
            vec![ca_arg.clone()],
            "not valid for host localhost",
        ),
        (valid.clone(), vec![], "not signed by a trusted CA"),
        (
            format!("https://localhost:{}/", free_port()),
            vec![ca_arg.clone()],
            "refused",
        ),
    ];
    for (url, args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = register(&base_env(sim_addr, &url), &args).await;
        assert_eq!(run.code, 3, "{url}: {}", run.stderr);
        let err = run.audit["details"]["error"].as_str().expect("error");
        assert!(
            err.contains(expected),
            "{url}: expected {expected:?} in {err}"
        );
    }

    // Non-2xx HEAD, timeout, and http:// without --allow-http.
    let not_found = Sink::start().await.expect("sink");
    not_found.set_default(Behaviour::status(404));
    let run = register(&base_env(sim_addr, &not_found.url()), &["--allow-http"]).await;
    assert_eq!(run.code, 3);
    assert!(
        run.audit["details"]["error"]
            .as_str()
            .expect("e")
            .contains("HTTP 404"),
        "{}",
        run.audit
    );
    let hang = Sink::start().await.expect("sink");
    hang.set_default(Behaviour::Hang);
    let run = register(
        &base_env(sim_addr, &hang.url()),
        &["--allow-http", "--timeout-ms=300"],
    )
    .await;
    assert_eq!(run.code, 3);
    assert!(
        run.audit["details"]["error"]
            .as_str()
            .expect("e")
            .contains("did not answer within 300 ms"),
        "{}",
        run.audit
    );
    let run = register(&base_env(sim_addr, &not_found.url()), &[]).await;
    assert_eq!(run.code, 3);
    assert!(
        run.audit["details"]["error"]
            .as_str()
            .expect("e")
            .contains("--allow-http"),
        "{}",
        run.audit
    );
}

/// The REST API (`rest`) with an API key, for the simulator at `sim_addr`,
/// registering `target`.
fn rest_api_key_env(sim_addr: std::net::SocketAddr, target: &str) -> Vec<(&'static str, String)> {
    vec![
        ("COGNIGY_API", "rest".to_string()),
        ("COGNIGY_BASE_URL", format!("http://{sim_addr}")),
        ("COGNIGY_API_KEY", API_KEY.to_string()),
        ("COGNIGY_FLOW_ID", "flow-1".to_string()),
        ("WEBHOOK_TARGET_URL", target.to_string()),
    ]
}

#[tokio::test]
async fn rest_api_with_api_key_and_with_oauth_finds_or_creates_by_name() {
    let (sim_addr, sim) = sim::spawn(SimOptions {
        pending_polls: 1,
        ..Default::default()
    })
    .await
    .expect("sim");
    let target = http_target().await;
    let key_env = rest_api_key_env(sim_addr, &target.url());
    let first = register(&key_env, &FAST).await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(
        first.audit["details"]["healthVerified"], true,
        "active: true counts as verified"
    );
    assert_eq!(first.audit["details"]["idempotent"], false);
    assert_eq!(
        sim.stats()["tokenRequests"],
        0,
        "the API key needs no token"
    );

    let mut oauth_env = base_env(sim_addr, &target.url());
    oauth_env.push(("COGNIGY_API", "rest".into()));
    oauth_env.push(("COGNIGY_FLOW_ID", "flow-1".into()));
    let second = register(&oauth_env, &FAST).await;
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(second.audit["details"]["idempotent"], true, "found by name");
    assert_eq!(
        second.audit["details"]["connectorId"],
        first.audit["details"]["connectorId"]
    );
    let stats = sim.stats();
    assert_eq!(
        stats["endpoints"].as_array().expect("endpoints").len(),
        1,
        "a second run creates nothing"
    );
    assert_eq!(stats["endpoints"][0]["channel"], "webhook");
    assert_eq!(
        stats["endpoints"][0]["settings"]["webhookUrl"],
        target.url()
    );
    assert_eq!(stats["tokenRequests"], 1);
}

/// A wrong API key is first used by the registration step: exit 4, and the
/// failure is labelled authentication with the setting to check (it said
/// "FAIL registration").
#[tokio::test]
async fn a_wrong_api_key_fails_as_authentication() {
    let (sim_addr, sim) = sim::spawn(SimOptions {
        api_key: Some(Secret::new("the-right-key")),
        ..Default::default()
    })
    .await
    .expect("sim");
    let target = http_target().await;
    let env = rest_api_key_env(sim_addr, &target.url());
    let run = register(&env, &FAST).await;
    assert_eq!(run.code, 4, "{}", run.stderr);
    assert!(
        run.stderr.contains("FAIL authentication") && run.stderr.contains("COGNIGY_API_KEY"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("FAIL registration"), "{}", run.stderr);
    assert!(sim.stats()["endpoints"]
        .as_array()
        .is_none_or(|e| e.is_empty()));
}

/// HTTPS ingress, full loop: the relay serves a test CA's certificate,
/// `register --ca-file` passes the TLS pre-flight of the relay itself, and
/// signed events sent over HTTPS are delivered.
#[tokio::test]
async fn https_ingress_passes_preflight_and_delivers() {
    let ca = TestCa::new();
    let (cert_pem, key_pem, _, _) = ca.leaf(Leaf::Valid);
    let dir = tempfile::tempdir().expect("tmp");
    let (cert, key) = (dir.path().join("relay.pem"), dir.path().join("relay.key"));
    std::fs::write(&cert, cert_pem).expect("cert");
    std::fs::write(&key, key_pem).expect("key");
    let app =
        crate::helpers::spawn_app_with(|c| c.ingress.tls = Some((cert.clone(), key.clone()))).await;
    let url = format!(
        "https://localhost:{}/api/webhook/cognigy",
        app.ingress.port()
    );

    let (sim_addr, sim) = sim::spawn(SimOptions {
        pending_polls: 0,
        ..Default::default()
    })
    .await
    .expect("sim");
    let ca_arg = format!("--ca-file={}", ca.pem_path.display());
    let run = register(
        &base_env(sim_addr, &url),
        &[&ca_arg, "--health-delay-ms=20"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.audit["details"]["validation"]["tls"]["verified"], true);
    assert_eq!(sim.stats()["connectors"][0]["endpointUrl"], url.as_str());

    let root =
        reqwest::Certificate::from_pem(&std::fs::read(&ca.pem_path).expect("ca")).expect("pem");
    let https = reqwest::Client::builder()
        .add_root_certificate(root)
        .build()
        .expect("client");
    for i in 0..3 {
        let body =
            serde_json::to_vec(&crate::helpers::event("bot", &format!("tls-{i}"))).expect("json");
        let sig = cogrelay::ingress::auth::sign_hex(crate::helpers::SECRET, &body);
        let r = https
            .post(&url)
            .header("content-type", "application/json")
            .header("x-webhook-signature", sig)
            .body(body)
            .send()
            .await
            .expect("https post");
        assert_eq!(r.status(), 200);
    }
    assert!(
        app.sink.wait_for(3, Duration::from_secs(10)).await,
        "delivered"
    );
    let plain = reqwest::Client::new()
        .post(format!(
            "http://localhost:{}/api/webhook/cognigy",
            app.ingress.port()
        ))
        .send()
        .await;
    assert!(
        plain.map(|r| r.status() != 200).unwrap_or(true),
        "plain HTTP is not served on the TLS port"
    );
}
