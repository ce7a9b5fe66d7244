//! The operator's first hour, on the real binary: refused requests are
//! logged (once per kind, with the sender's address and a hint), every JSON
//! log line has unique keys, a bad `.env` line is named, a store held by
//! another relay is said once, `register` tells an unreachable Cognigy from
//! refused credentials, and the CLI shows each job's destination and type.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cogrelay::ingress::auth::sign_hex;
use serde_json::Value;

use crate::helpers::*;
use crate::process::{start_relay_logged, wait_settled_at};

/// A JSON object whose keys must be unique (serde_json keeps the last of a
/// repeated key silently; `jq` too).
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut seen = BTreeSet::new();
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<serde::de::IgnoredAny>()?;
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!("key {k:?} twice")));
                    }
                }
                Ok(UniqueKeys)
            }
        }
        d.deserialize_map(V)
    }
}

/// Each line of `logs` as JSON, checked for repeated keys.
fn json_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            if let Err(e) = serde_json::from_str::<UniqueKeys>(l) {
                panic!("not a JSON line with unique keys ({e}): {l}");
            }
            serde_json::from_str(l).expect("json")
        })
        .collect()
}

fn refused_lines(logs: &Arc<Mutex<String>>) -> Vec<Value> {
    json_lines(&logs.lock().expect("logs"))
        .into_iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("request"))
        })
        .collect()
}

async fn post_raw(
    http: &reqwest::Client,
    port: u16,
    body: &[u8],
    headers: &[(&str, String)],
) -> u16 {
    let mut req = http
        .post(format!("http://127.0.0.1:{port}/api/webhook/cognigy"))
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    req.send().await.expect("post").status().as_u16()
}

#[tokio::test]
async fn refused_requests_are_logged_once_per_kind_with_the_sender_and_a_hint() {
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    let (relay, logs) = start_relay_logged(dir.path(), &sink, &[]).await;
    let http = reqwest::Client::new();
    let body = serde_json::to_vec(&event("bot", "refused-1")).expect("json");
    let json_ct = ("content-type", "application/json".to_string());

    // The right HMAC, but in base64.
    let raw = hex::decode(sign_hex(SECRET, &body)).expect("hex");
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    let status = post_raw(
        &http,
        relay.port,
        &body,
        &[json_ct.clone(), ("x-webhook-signature", b64)],
    )
    .await;
    assert_eq!(status, 401);
    // Then 40 more with a wrong secret, and Basic credentials (only HMAC is set).
    for _ in 0..40 {
        let sig = sign_hex("not-the-secret", &body);
        assert_eq!(
            post_raw(
                &http,
                relay.port,
                &body,
                &[json_ct.clone(), ("x-webhook-signature", sig)]
            )
            .await,
            401
        );
    }
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("cognigy:pw")
    );
    assert_eq!(
        post_raw(
            &http,
            relay.port,
            &body,
            &[json_ct.clone(), ("authorization", basic)]
        )
        .await,
        401
    );
    // Another kind: not JSON.
    assert_eq!(
        post_raw(
            &http,
            relay.port,
            b"hello",
            &[("content-type", "text/plain".into())]
        )
        .await,
        415
    );
    // Another: a correctly signed envelope from two days ago.
    let mut old = event("bot", "refused-old");
    old["timestamp"] = Value::from(cogrelay::time::rfc3339(
        cogrelay::time::now_ms() - 2 * 86_400_000,
    ));
    let old = serde_json::to_vec(&old).expect("json");
    let sig = sign_hex(SECRET, &old);
    assert_eq!(
        post_raw(
            &http,
            relay.port,
            &old,
            &[json_ct.clone(), ("x-webhook-signature", sig)]
        )
        .await,
        401
    );

    // A last refusal of a kind not sent before: the relay writes its log in
    // order, so once its line is read every earlier line is too.
    let not_json = b"not json";
    let sig = sign_hex(SECRET, not_json);
    assert_eq!(
        post_raw(
            &http,
            relay.port,
            not_json,
            &[json_ct.clone(), ("x-webhook-signature", sig)]
        )
        .await,
        400
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = refused_lines(&logs);
        if lines.iter().any(|l| l["kind"] == "bad_request") {
            break lines;
        }
        assert!(Instant::now() < deadline, "{lines:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let kinds: Vec<&str> = lines
        .iter()
        .map(|l| l["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(
        kinds,
        [
            "unauthorized",
            "unsupported_media_type",
            "replay_window",
            "bad_request"
        ],
        "{lines:#?}"
    );
    let first = &lines[0];
    assert_eq!(first["status"], 401);
    assert_eq!(first["level"], "WARN");
    assert!(
        first["peer"]
            .as_str()
            .expect("peer")
            .starts_with("127.0.0.1:"),
        "{first}"
    );
    assert!(
        first["hint"]
            .as_str()
            .expect("hint")
            .contains("right HMAC in base64"),
        "{first}"
    );
    assert!(
        lines[1]["hint"]
            .as_str()
            .expect("hint")
            .contains("text/plain"),
        "{lines:#?}"
    );
    assert!(
        lines[2]["hint"].as_str().expect("hint").contains("s old"),
        "{lines:#?}"
    );
    // Nothing the sender presented is logged.
    let all = logs.lock().expect("logs").clone();
    assert!(!all.contains(&sign_hex("not-the-secret", &body)) && !all.contains("cognigy:pw"));
    // The /metrics counters count every one.
    let m = http
        .get(format!("http://127.0.0.1:{}/metrics", relay.admin_port))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        m.contains("cogrelay_ingress_requests_total{status=\"401\"} 43"),
        "{m}"
    );
}

/// Every line the relay logs in JSON, from start to stop through deliveries,
/// a failed one and refusals, parses as an object with unique keys; the
/// destination's URL is under `url`, not a second `target`.
#[tokio::test]
async fn json_log_lines_have_unique_keys() {
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    let (mut relay, logs) = start_relay_logged(
        dir.path(),
        &sink,
        &[("ATTEMPTS", "2".into()), ("RUST_LOG", "debug".into())],
    )
    .await;
    let http = reqwest::Client::new();
    sink.set_default(Behaviour::status(500));
    crate::process::post(&http, relay.port, "log-1").await;
    wait_settled_at(relay.admin_port).await;
    sink.set_default(Behaviour::status(200));
    crate::process::post(&http, relay.port, "log-2").await;
    post_raw(
        &http,
        relay.port,
        b"{}",
        &[("content-type", "application/json".into())],
    )
    .await;
    wait_settled_at(relay.admin_port).await;
    let pid = relay.child.id().expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let _ = relay.child.wait().await;
    wait_for_line(&logs, "\"stopped\"").await;
    let lines = json_lines(&logs.lock().expect("logs"));
    for said in [
        "delivering to default",
        "delivery failed permanently",
        "delivered",
        "request refused",
        "stopped",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l["message"].as_str().is_some_and(|m| m.starts_with(said))),
            "{said}: {lines:#?}"
        );
    }
    let start = lines
        .iter()
        .find(|l| l["destination"] == "default" && l.get("url").is_some())
        .expect("the destination's start line");
    assert_eq!(start["url"], sink.url());
    assert_eq!(start["target"], "cogrelay::serve");
}

/// A `.env` line that is not NAME=value stops the start with the file and
/// the line's number (never its text: it may hold a secret).
#[test]
fn a_bad_dotenv_line_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join(".env"),
        "# settings\nTARGET_ENDPOINT=http://127.0.0.1:9/e\nWEBHOOK_SIGNING_SECRET hunter2-secret\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .arg("serve")
        .env_clear()
        .current_dir(dir.path())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(".env: line 3 is not NAME=value"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A bad value (not only a missing `=`), and `--help` still answers.
    std::fs::write(
        dir.path().join(".env"),
        "A=1\n\nINGRESS_BASIC_PASSWORD=hunter2 secret\nB=2\n",
    )
    .expect("write");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
            .args(args)
            .env_clear()
            .current_dir(dir.path())
            .output()
            .expect("run")
    };
    let out = run(&["serve"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(".env: line 3 is not NAME=value"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let help = run(&["serve", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stderr).starts_with("warning: "));
}

/// A `$` in a `.env` value that names no variable set is refused, with the
/// line's number and name and never its value: dotenv replaces it with
/// nothing, so the password `Xy$9kQ#zz` was `Xy#zz` (and `Xy#zz` got in).
/// Single quotes, `\$` and a variable that is set still read as written.
#[test]
fn a_dollar_that_dotenv_would_drop_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let check = |password_line: &str| {
        std::fs::write(
            dir.path().join(".env"),
            format!(
                "TARGET_ENDPOINT=http://127.0.0.1:9/e\nINGRESS_BASIC_USER=cog\n{password_line}\n"
            ),
        )
        .expect("write");
        std::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
            .args(["config", "check"])
            .env_clear()
            .env("SETHERE", "x")
            .env("SET_HERE", "x")
            .current_dir(dir.path())
            .output()
            .expect("run")
    };
    for line in [
        "INGRESS_BASIC_PASSWORD=Xy$9kQ#zz",
        "INGRESS_BASIC_PASSWORD=\"Xy$9kQ#zz\"",
        "INGRESS_BASIC_PASSWORD=Xy9kQzz$",
        "INGRESS_BASIC_PASSWORD=Xy${UNSET}zz",
        // dotenv's names are letters and digits: this is `$SET`, then `_HERE`.
        "INGRESS_BASIC_PASSWORD=Xy$SET_HERE",
        // The quote after a bare name is taken as it is: `$zz` is read.
        "INGRESS_BASIC_PASSWORD=Xy$SETHERE'$zz'",
    ] {
        let out = check(line);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{line}: {err}");
        assert!(
            err.contains(".env: line 3: a `$` in INGRESS_BASIC_PASSWORD's value"),
            "{line}: {err}"
        );
        assert!(!err.contains("Xy"), "{err}");
    }
    for line in [
        "INGRESS_BASIC_PASSWORD='Xy$9kQ#zz'",
        "INGRESS_BASIC_PASSWORD=Xy\\$9kQ#zz",
        "INGRESS_BASIC_PASSWORD=Xy$SETHERE",
        "INGRESS_BASIC_PASSWORD=Xy${SET_HERE}",
        "export\tINGRESS_BASIC_PASSWORD='Xy$9kQ'",
        // A single-quoted value over two lines: literal.
        "INGRESS_BASIC_PASSWORD='Xy\n$9kQ'",
        "INGRESS_BASIC_PASSWORD=Xy${INGRESS_BASIC_USER}zz # a comment with a $",
    ] {
        let out = check(line);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{line}: {err}");
    }
}

/// A second relay on the same data directory says so once.
#[tokio::test]
async fn a_store_in_use_is_said_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    let (_relay, _logs) = start_relay_logged(dir.path(), &sink, &[]).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .arg("serve")
        .env_clear()
        .env("PORT", free_port().to_string())
        .env("ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("TARGET_ENDPOINT", sink.url())
        .env("WEBHOOK_SIGNING_SECRET", SECRET)
        .env("COGRELAY_DATA_DIR", dir.path().join("data"))
        .env("LOG_FORMAT", "json")
        .current_dir(dir.path())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches("another cogrelay process is using").count(),
        1,
        "{err}"
    );
}

fn register(envs: &[(&str, String)]) -> (Option<i32>, String, Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .arg("register")
        .env_clear()
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let audit =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("audit line: {stdout}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        audit,
    )
}

/// Cognigy unreachable is exit 8 with a progress line per retry, not exit 4
/// ("check COGNIGY_CLIENT_ID"); refused credentials stay exit 4; a
/// configuration error's audit line has a timestamp.
#[tokio::test]
async fn register_tells_unreachable_from_refused_and_always_dates_its_audit() {
    let closed = free_port();
    let (code, err, audit) = tokio::task::spawn_blocking(move || {
        register(&[
            ("COGNIGY_BASE_URL", format!("http://127.0.0.1:{closed}")),
            ("COGNIGY_CLIENT_ID", "id".into()),
            ("COGNIGY_CLIENT_SECRET", "cs-hidden".into()),
            (
                "WEBHOOK_TARGET_URL",
                "http://127.0.0.1:9/api/webhook/cognigy".into(),
            ),
            ("ALLOW_HTTP", "true".into()),
        ])
    })
    .await
    .expect("join");
    assert_eq!(code, Some(8), "{err}");
    let retries = err
        .lines()
        .filter(|l| l.starts_with("...  the token request:") && l.contains("retrying in"))
        .count();
    assert!(retries >= 3, "{err}");
    assert!(
        err.contains("FAIL authentication: cannot reach Cognigy"),
        "{err}"
    );
    assert!(
        !err.contains("check COGNIGY_CLIENT_ID") && !err.contains("cs-hidden"),
        "{err}"
    );
    assert_eq!(audit["status"], "FAILURE");
    assert!(
        audit["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{audit}"
    );

    // Its progress lines into a pipe nobody reads (`2>&1 | head -1` once
    // head has gone): the same exit 8, not a panic's 101.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .arg("register")
        .env_clear()
        .env("COGNIGY_BASE_URL", format!("http://127.0.0.1:{closed}"))
        .env("COGNIGY_CLIENT_ID", "id")
        .env("COGNIGY_CLIENT_SECRET", "cs-hidden")
        .env(
            "WEBHOOK_TARGET_URL",
            "http://127.0.0.1:9/api/webhook/cognigy",
        )
        .env("ALLOW_HTTP", "true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    drop(child.stderr.take());
    let code = tokio::task::spawn_blocking(move || child.wait().expect("wait").code())
        .await
        .expect("join");
    assert_eq!(code, Some(8), "a closed stderr is not a crash");

    // Refused credentials: the simulator with fixed ones.
    let sim_port = free_port();
    let mut sim = tokio::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .args([
            "sim",
            "--port",
            &sim_port.to_string(),
            "--client-id",
            "right",
            "--client-secret",
            "right-secret",
        ])
        .env_clear()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("sim");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reqwest::get(format!("http://127.0.0.1:{sim_port}/sim/stats"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the simulator did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, err, _) = tokio::task::spawn_blocking(move || {
        register(&[
            ("COGNIGY_BASE_URL", format!("http://127.0.0.1:{sim_port}")),
            ("COGNIGY_CLIENT_ID", "wrong".into()),
            ("COGNIGY_CLIENT_SECRET", "wrong".into()),
            (
                "WEBHOOK_TARGET_URL",
                "http://127.0.0.1:9/api/webhook/cognigy".into(),
            ),
            ("ALLOW_HTTP", "true".into()),
        ])
    })
    .await
    .expect("join");
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("check COGNIGY_CLIENT_ID"), "{err}");
    let _ = sim.kill().await;

    // A configuration error: exit 2, and still a dated audit line.
    let (code, _, audit) = tokio::task::spawn_blocking(|| register(&[]))
        .await
        .expect("join");
    assert_eq!(code, Some(2));
    assert!(
        audit["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{audit}"
    );
}

/// The README's path for a user with only the binary, as written there: the
/// simulator as the target, the relay with Basic credentials, the curl of an
/// endpoint output; the simulator logs the delivery.
#[tokio::test]
async fn the_readme_binary_only_path_delivers_an_endpoint_output() {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .expect("README");
    let section = &readme[readme.find("### With only the binary").expect("section")..];
    let between = |from: &str, to: char| {
        let at = section.find(from).expect(from) + from.len();
        section[at..].split(to).next().expect("value").to_string()
    };
    let user_pass = between("curl -s -u ", ' ');
    let (user, pass) = user_pass.split_once(':').expect("user:pass");
    let body = between("-d '", '\'');
    assert!(section.contains(&format!(
        "INGRESS_BASIC_USER={user} INGRESS_BASIC_PASSWORD={pass}"
    )));
    assert!(section.contains("TARGET_ENDPOINT=http://127.0.0.1:8600/events cogrelay serve"));

    let sim_port = free_port();
    let sim_logs = Arc::new(Mutex::new(String::new()));
    let mut sim = tokio::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .args(["sim", "--port", &sim_port.to_string()])
        .env_clear()
        .env("LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("sim");
    let mut stderr = sim.stderr.take().expect("stderr");
    let keep = sim_logs.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = stderr.read(&mut buf).await {
            keep.lock()
                .expect("logs")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().expect("tmp");
    let mut relay = tokio::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .arg("serve")
        .env_clear()
        .env("INGRESS_BASIC_USER", user)
        .env("INGRESS_BASIC_PASSWORD", pass)
        .env(
            "TARGET_ENDPOINT",
            format!("http://127.0.0.1:{sim_port}/events"),
        )
        .env("PORT", port.to_string())
        .env("ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("relay");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http
        .get(format!("http://127.0.0.1:{admin}/readyz"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < deadline, "the relay did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer: Value = http
        .post(format!("http://127.0.0.1:{port}/api/webhook/cognigy"))
        .basic_auth(user, Some(pass))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["status"], "accepted", "{answer}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = sim_logs.lock().expect("logs").clone();
        if logs.contains("target received") && logs.contains("\\\"sessionId\\\":\\\"s-1\\\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the simulator never logged the delivery:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = relay.kill().await;
    let _ = sim.kill().await;
}
