//! The real binary: `kill -9` mid-stream loses nothing that got a 200, SIGTERM
//! drains, bad configuration exits 2 with one line, a broken store file exits 1.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cogrelay::ingress::auth::sign_hex;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::helpers::*;

pub(crate) struct Relay {
    pub child: Child,
    pub port: u16,
    #[allow(dead_code)]
    pub admin_port: u16,
}

fn command(dir: &Path, envs: &[(&str, String)]) -> Command {
    command_limited(dir, envs, None)
}

/// `cogrelay serve`, with at most `nofile` open files when given (`ulimit -n`).
fn command_limited(dir: &Path, envs: &[(&str, String)], nofile: Option<u32>) -> Command {
    let bin = env!("CARGO_BIN_EXE_cogrelay");
    let mut cmd = match nofile {
        None => {
            let mut c = Command::new(bin);
            c.arg("serve");
            c
        }
        Some(n) => {
            let mut c = Command::new("sh");
            c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" serve"), bin]);
            c
        }
    };
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LOG_FORMAT", "json")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

pub(crate) async fn start_relay(dir: &Path, sink: &Sink, extra: &[(&str, String)]) -> Relay {
    start(dir, sink, extra, None, None).await
}

/// As `start_relay_logged`, with at most `nofile` open files.
pub(crate) async fn start_relay_limited(
    dir: &Path,
    sink: &Sink,
    nofile: u32,
) -> (Relay, Arc<Mutex<String>>) {
    let logs = Arc::new(Mutex::new(String::new()));
    (
        start(dir, sink, &[], Some(logs.clone()), Some(nofile)).await,
        logs,
    )
}

/// As `start_relay`, keeping what the relay logs (JSON lines on stderr) in the
/// returned buffer, read as it comes so a chatty relay never blocks on a full pipe.
pub(crate) async fn start_relay_logged(
    dir: &Path,
    sink: &Sink,
    extra: &[(&str, String)],
) -> (Relay, Arc<Mutex<String>>) {
    let logs = Arc::new(Mutex::new(String::new()));
    (
        start(dir, sink, extra, Some(logs.clone()), None).await,
        logs,
    )
}

/// As `start_relay`, on these ports (a restart on the ports its senders
/// know).
pub(crate) async fn start_relay_at(
    dir: &Path,
    sink: &Sink,
    extra: &[(&str, String)],
    ports: (u16, u16),
) -> Relay {
    start_at(dir, sink, extra, None, None, ports).await
}

async fn start(
    dir: &Path,
    sink: &Sink,
    extra: &[(&str, String)],
    logs: Option<Arc<Mutex<String>>>,
    nofile: Option<u32>,
) -> Relay {
    start_at(dir, sink, extra, logs, nofile, (free_port(), free_port())).await
}

/// The relay on `(port, admin_port)`, delivering to `sink` (or where its
/// destinations file, `COGRELAY_CONFIG` in `extra`, says), once ready.
async fn start_at(
    dir: &Path,
    sink: &Sink,
    extra: &[(&str, String)],
    logs: Option<Arc<Mutex<String>>>,
    nofile: Option<u32>,
    (port, admin_port): (u16, u16),
) -> Relay {
    let mut envs = vec![
        ("PORT", port.to_string()),
        ("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}")),
        ("WEBHOOK_SIGNING_SECRET", SECRET.to_string()),
        ("COGRELAY_DATA_DIR", dir.join("data").display().to_string()),
        ("BACKOFF_DELAY_MS", "50".to_string()),
    ];
    if !extra.iter().any(|(k, _)| *k == "COGRELAY_CONFIG") {
        envs.push(("TARGET_ENDPOINT", sink.url()));
    }
    envs.extend(extra.iter().cloned());
    let mut cmd = command_limited(dir, &envs, nofile);
    if logs.is_none() {
        cmd.stderr(Stdio::null());
    }
    let mut child = cmd.spawn().expect("spawn relay");
    let seen = logs.clone();
    if let (Some(logs), Some(mut stderr)) = (logs, child.stderr.take()) {
        tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = stderr.read(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]);
                logs.lock().expect("logs").push_str(&text);
            }
        });
    }
    let mut relay = Relay {
        child,
        port,
        admin_port,
    };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{admin_port}/readyz"))
            .send()
            .await
        {
            if r.status() == 200 {
                return relay;
            }
        }
        if let Ok(Some(status)) = relay.child.try_wait() {
            let said = seen
                .map(|l| l.lock().expect("logs").clone())
                .unwrap_or_default();
            panic!("the relay exited before it was ready ({status}):\n{said}");
        }
        assert!(Instant::now() < deadline, "relay did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the relay on `admin_port` has nothing waiting, active or delayed.
pub(crate) async fn wait_settled_at(admin_port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c: serde_json::Value =
            reqwest::get(format!("http://127.0.0.1:{admin_port}/admin/queue"))
                .await
                .expect("admin")
                .json()
                .await
                .expect("json");
        if c["waiting"] == 0 && c["active"] == 0 && c["delayed"] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "never settled: {c}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn post(http: &reqwest::Client, port: u16, id: &str) -> Option<u16> {
    post_json(http, port, &event("bot", id)).await
}

/// Posts `body` signed; its status, if it was answered.
pub(crate) async fn post_json(
    http: &reqwest::Client,
    port: u16,
    body: &serde_json::Value,
) -> Option<u16> {
    let body = serde_json::to_vec(body).expect("json");
    let sig = sign_hex(SECRET, &body);
    http.post(format!("http://127.0.0.1:{port}/api/webhook/cognigy"))
        .header("content-type", "application/json")
        .header("x-webhook-signature", sig)
        .body(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

type Envs = Vec<(&'static str, String)>;

/// Extra settings for `backend`: a private redis-server (AOF on) for Redis.
/// `None` when the redis half cannot run here (skipped with a printed reason).
fn backend_env(backend: Backend) -> Option<(Envs, Option<crate::redis_server::RedisServer>)> {
    match backend {
        Backend::Embedded => Some((Vec::new(), None)),
        Backend::Redis => {
            let server = crate::redis_server::RedisServer::start(true)?;
            // A short lock: a dead relay's jobs are taken over when it expires.
            let env = vec![
                ("COGRELAY_QUEUE", "redis".to_string()),
                ("REDIS_URL", server.url()),
                ("LOCK_DURATION_MS", "2000".to_string()),
                ("DELIVERY_TIMEOUT_MS", "1000".to_string()),
            ];
            Some((env, Some(server)))
        }
    }
}

fn with(
    base: &[(&'static str, String)],
    extra: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let mut v = base.to_vec();
    v.extend(extra.iter().map(|(k, val)| (*k, val.to_string())));
    v
}

pub(crate) fn delivered_ids(sink: &Sink) -> Vec<String> {
    sink.received()
        .iter()
        .filter_map(|r| r.header("x-event-id").map(str::to_owned))
        .collect()
}

/// Whether the sink answered `r` 200 (at once or after a delay).
pub(crate) fn answered_200(r: &cogrelay::sink::Received) -> bool {
    matches!(
        r.behaviour,
        Behaviour::Status(200, _) | Behaviour::Delay(_, 200)
    )
}

/// The event ids of the requests the sink answered 200, in arrival order.
pub(crate) fn ids_answered_200(sink: &Sink) -> Vec<String> {
    sink.received()
        .iter()
        .filter(|r| answered_200(r))
        .filter_map(|r| r.header("x-event-id").map(str::to_owned))
        .collect()
}

async fn kill_9_mid_stream(backend: Backend) {
    let Some((env, _redis)) = backend_env(backend) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    sink.keep_bodies(false);
    // Slow deliveries so a backlog is queued when the kill lands.
    sink.set_default(Behaviour::Delay(Duration::from_millis(5), 200));
    let mut relay = start_relay(dir.path(), &sink, &with(&env, &[("CONCURRENCY", "4")])).await;

    const N: usize = 2500;
    let http = reqwest::Client::new();
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..N {
        let (http, acked, limit, port) = (http.clone(), acked.clone(), limit.clone(), relay.port);
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await.expect("permit");
            let id = format!("crash-{i}");
            if post(&http, port, &id).await == Some(200) {
                acked.lock().expect("lock").push(id);
            }
        }));
    }
    // Kill once a good part of the stream is acknowledged, while requests are in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().expect("lock").len() < N / 2 {
        assert!(Instant::now() < deadline, "ingress too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    relay.child.start_kill().expect("kill -9");
    let _ = relay.child.wait().await;
    for t in tasks {
        t.await.expect("task");
    }
    let acked: HashSet<String> = acked.lock().expect("lock").iter().cloned().collect();
    let delivered_before: usize = delivered_ids(&sink).len();
    assert!(
        acked.len() >= N / 2 && acked.len() < N,
        "killed mid-stream: {} acked",
        acked.len()
    );
    assert!(
        delivered_before < acked.len(),
        "a backlog was pending at the kill"
    );

    let _relay = start_relay(dir.path(), &sink, &with(&env, &[("CONCURRENCY", "16")])).await;
    wait_all_delivered(&sink, &acked, Duration::from_secs(90)).await;
}

async fn sigterm_drains(backend: Backend) {
    let Some((env, _redis)) = backend_env(backend) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    // Slow enough to be in flight at the SIGTERM, within every DELIVERY_TIMEOUT_MS used here.
    sink.push(Behaviour::Delay(Duration::from_millis(700), 200));
    let mut relay = start_relay(dir.path(), &sink, &with(&env, &[("CONCURRENCY", "1")])).await;
    let http = reqwest::Client::new();
    for i in 0..5 {
        assert_eq!(
            post(&http, relay.port, &format!("term-{i}")).await,
            Some(200)
        );
    }
    assert!(
        sink.wait_for(1, Duration::from_secs(10)).await,
        "first delivery in flight"
    );

    let pid = relay.child.id().expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        post(&http, relay.port, "too-late").await,
        Some(503),
        "new requests get 503 while draining"
    );
    // A sender that writes its whole body first hears the 503 too.
    let head = format!(
        "Content-Type: application/json\r\nX-Webhook-Signature: {}\r\n",
        "0".repeat(64)
    );
    let answer = answer_after_a_whole_body(([127, 0, 0, 1], relay.port).into(), &head).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("retry-after: 5"), "{answer:?}");

    let exit = tokio::time::timeout(Duration::from_secs(15), relay.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(exit.code(), Some(0));
    assert_eq!(sink.count(), 1, "only the in-flight delivery ran");

    let relay = start_relay(dir.path(), &sink, &env).await;
    assert!(
        sink.wait_for(5, Duration::from_secs(20)).await,
        "queued jobs delivered after restart"
    );
    wait_settled_at(relay.admin_port).await;
    let mut ids = delivered_ids(&sink);
    ids.sort();
    assert_eq!(
        ids,
        ["term-0", "term-1", "term-2", "term-3", "term-4"],
        "each once: the in-flight one finished, not redone"
    );
}

both_backends! {
    /// `kill -9` mid-stream, restart: every event that got a 200 is delivered.
    async fn kill_9_mid_stream_loses_no_acknowledged_event(b: Backend) {
        kill_9_mid_stream(b).await
    }

    /// SIGTERM: the in-flight delivery finishes, new requests get 503, exit 0,
    /// the queued jobs are delivered after restart.
    async fn sigterm_finishes_in_flight_refuses_new_and_keeps_the_queue(b: Backend) {
        sigterm_drains(b).await
    }
}

async fn refused(extra: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let envs: Vec<(&str, String)> = extra.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let out = command(dir.path(), &envs).output().await.expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn bad_configuration_exits_2_with_one_line_naming_the_setting() {
    let ok_target = ("TARGET_ENDPOINT", "http://127.0.0.1:9/x");
    let secret = ("WEBHOOK_SIGNING_SECRET", "s3cr3t-value");
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![secret], "TARGET_ENDPOINT is not set"),
        (vec![ok_target], "no ingress authentication"),
        (
            vec![
                ok_target,
                secret,
                ("LOCK_DURATION_MS", "1000"),
                ("DELIVERY_TIMEOUT_MS", "2000"),
            ],
            "LOCK_DURATION_MS=1000 must be greater than DELIVERY_TIMEOUT_MS=2000",
        ),
        (
            vec![ok_target, secret, ("PORT", "eighty")],
            "PORT=\"eighty\" is not valid",
        ),
        (
            vec![ok_target, secret, ("CONCURRENCY", "-3")],
            "CONCURRENCY=\"-3\" is not valid",
        ),
        (
            vec![("TARGET_ENDPOINT", "localhost:8080"), secret],
            "TARGET_ENDPOINT=",
        ),
        (
            vec![ok_target, secret, ("DELIVERY_NICE", "20")],
            "DELIVERY_NICE=20 is out of range: use 0 to 19",
        ),
        (
            vec![ok_target, secret, ("ADMIN_LISTEN", "nonsense")],
            "ADMIN_LISTEN=\"nonsense\"",
        ),
        (
            vec![ok_target, secret, ("TLS_CERT_FILE", "/etc/hostname")],
            "TLS_CERT_FILE and TLS_KEY_FILE go together",
        ),
        (
            vec![
                ok_target,
                secret,
                ("TLS_CERT_FILE", "/nonexistent.pem"),
                ("TLS_KEY_FILE", "/nonexistent.key"),
            ],
            "TLS_CERT_FILE=\"/nonexistent.pem\" is not a readable file",
        ),
        // Files that are not PEM: exit 1 once started, and `config check`
        // passed them.
        (
            vec![
                ok_target,
                secret,
                ("TLS_CERT_FILE", "/etc/passwd"),
                ("TLS_KEY_FILE", "/etc/passwd"),
            ],
            "TLS_CERT_FILE=/etc/passwd holds no PEM certificate",
        ),
        // It was exit 1 at the first connection (a service manager restarts
        // that), its text `Redis URL did not parse`.
        (
            vec![
                ok_target,
                secret,
                ("REDIS_URL", "redis://:s3cr3t-value@127.0.0.1:notaport"),
            ],
            "REDIS_URL does not give a valid Redis address",
        ),
        (
            vec![ok_target, secret, ("REDIS_HOST", "a host")],
            "REDIS_HOST does not give a valid Redis address",
        ),
        // `cog.staging` would be the queue of `cog`'s destination `staging`:
        // another fleet's relay counted, retried and pruned its jobs.
        (
            vec![ok_target, secret, ("QUEUE_NAME", "cog.staging")],
            "QUEUE_NAME=\"cog.staging\" is not valid",
        ),
    ];
    for (envs, expected) in cases {
        let (code, stderr) = refused(&envs).await;
        assert_eq!(code, Some(2), "{envs:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(expected), "{envs:?}: {stderr}");
        assert!(!stderr.contains("s3cr3t-value"), "secret leaked: {stderr}");
    }
}

#[tokio::test]
async fn a_broken_store_file_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(dir.path().join("data")).expect("mkdir");
    std::fs::write(dir.path().join("data/cogrelay.db"), vec![0x5a; 8192]).expect("garbage");
    let out = command(
        dir.path(),
        &[
            ("TARGET_ENDPOINT", "http://127.0.0.1:9/x".into()),
            ("WEBHOOK_SIGNING_SECRET", "s".into()),
            ("PORT", free_port().to_string()),
            ("ADMIN_LISTEN", format!("127.0.0.1:{}", free_port())),
        ],
    )
    .output()
    .await
    .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: failed to open the embedded queue"),
        "{stderr}"
    );
    assert!(last.contains("cogrelay.db"), "{stderr}");
}

#[tokio::test]
async fn allow_unauthenticated_starts_with_a_warning() {
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    let (port, admin_port) = (free_port(), free_port());
    let mut child = command(
        dir.path(),
        &[
            ("TARGET_ENDPOINT", sink.url()),
            ("PORT", port.to_string()),
            ("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}")),
        ],
    )
    .arg("--allow-unauthenticated")
    .spawn()
    .expect("spawn");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let r = http
            .post(format!("http://127.0.0.1:{port}/api/webhook/cognigy"))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&event("b", "open")).expect("json"))
            .send()
            .await;
        if let Ok(r) = r {
            break r.status().as_u16();
        }
        assert!(Instant::now() < deadline, "never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 200);
    child.start_kill().expect("kill");
    let out = child.wait_with_output().await.expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("authentication is OFF"), "{stderr}");
}

#[tokio::test]
async fn pretty_mode_prints_a_summary_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    let (port, admin_port) = (free_port(), free_port());
    let mut child = command(
        dir.path(),
        &[
            ("TARGET_ENDPOINT", sink.url()),
            ("WEBHOOK_SIGNING_SECRET", SECRET.to_string()),
            ("PORT", port.to_string()),
            ("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}")),
            ("LOG_FORMAT", "pretty".to_string()),
        ],
    )
    .spawn()
    .expect("spawn");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while post(&http, port, "sum-0").await != Some(200) {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 1..3 {
        assert_eq!(post(&http, port, &format!("sum-{i}")).await, Some(200));
    }
    assert!(sink.wait_for(3, Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(5500)).await;
    child.start_kill().expect("kill");
    let out = child.wait_with_output().await.expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("last 5s: accepted 3 delivered 3 retrying 0 failed 0 | queue: waiting 0 active 0 delayed 0 failed 0"),
        "{stderr}"
    );
}

/// 10,000 idle connections do not stop a signed event from being accepted
/// (and idle connections are not kept beyond REQUEST_READ_TIMEOUT_MS).
#[tokio::test]
async fn ten_thousand_idle_connections_do_not_block_a_signed_event() {
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    let relay = start_relay(
        dir.path(),
        &sink,
        &[("REQUEST_READ_TIMEOUT_MS", "20000".into())],
    )
    .await;
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        match tokio::net::TcpStream::connect(("127.0.0.1", relay.port)).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connection {} refused: {e}", idle.len()),
        }
    }
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    assert_eq!(
        post(&http, relay.port, "through-the-crowd").await,
        Some(200)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "accepted in {:?}",
        t0.elapsed()
    );
    assert!(
        sink.wait_for(1, Duration::from_secs(10)).await,
        "and delivered"
    );
    drop(idle);
}

/// Thread name (comm) and nice value of every thread of `pid` (Linux /proc).
fn thread_priorities(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("proc") {
        let stat = std::fs::read_to_string(task.expect("task").path().join("stat")).expect("stat");
        let (head, tail) = stat.rsplit_once(')').expect("stat format");
        let name = head.split_once('(').expect("stat format").1.to_string();
        // Fields after the name start at 3 (state); nice is field 19.
        let nice = tail.split_whitespace().nth(16).expect("nice");
        out.push((name, nice.parse().expect("number")));
    }
    out
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn delivery_threads_yield_to_the_ingress() {
    let sink = Sink::start().await.expect("sink");
    for (round, (nice, expect_low)) in [("7", true), ("0", false)].into_iter().enumerate() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut relay =
            start_relay(dir.path(), &sink, &[("DELIVERY_NICE", nice.to_string())]).await;
        let http = reqwest::Client::new();
        assert_eq!(
            post(&http, relay.port, &format!("nice-{nice}")).await,
            Some(200)
        );
        assert!(
            sink.wait_for(round + 1, Duration::from_secs(15)).await,
            "delivered"
        );
        let threads = thread_priorities(relay.child.id().expect("pid"));
        let delivery: Vec<&(String, i64)> = threads
            .iter()
            .filter(|(n, _)| n.starts_with("cogrelay-deliv"))
            .collect();
        let others: Vec<&(String, i64)> = threads
            .iter()
            .filter(|(n, _)| !n.starts_with("cogrelay-deliv"))
            .collect();
        if expect_low {
            assert!(!delivery.is_empty(), "no delivery threads: {threads:?}");
            // Relative to the relay's own nice value (0 unless started niced).
            let base = others.iter().map(|(_, n)| *n).min().expect("main threads");
            assert!(
                others.iter().all(|(_, n)| *n == base),
                "the ingress keeps its priority: {threads:?}"
            );
            assert!(
                delivery.iter().all(|(_, n)| *n == (base + 7).min(19)),
                "{threads:?}"
            );
        } else {
            assert!(
                delivery.is_empty(),
                "DELIVERY_NICE=0 runs deliveries on the main threads: {threads:?}"
            );
        }
        let _ = relay.child.kill().await;
    }
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn delivery_threads_are_half_the_ingress_threads() {
    // Relays sharing a machine are told their share of the cores with
    // TOKIO_WORKER_THREADS (docs/scaling-out.md); the delivery threads follow
    // it rather than the machine's core count. A count above the cores shows
    // the difference on any machine.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let ingress = 2 * cores + 2;
    let sink = Sink::start().await.expect("sink");
    let dir = tempfile::tempdir().expect("tmp");
    let mut relay = start_relay(
        dir.path(),
        &sink,
        &[("TOKIO_WORKER_THREADS", ingress.to_string())],
    )
    .await;
    let threads = thread_priorities(relay.child.id().expect("pid"));
    let count = |prefix: &str| {
        threads
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .count()
    };
    assert_eq!(count("tokio-rt-worker"), ingress, "{threads:?}");
    assert_eq!(count("cogrelay-deliv"), cores + 1, "{threads:?}");
    let _ = relay.child.kill().await;
}

#[tokio::test]
async fn deliveries_go_through_the_proxy_in_the_environment() {
    // With HTTP_PROXY set, a plain http target is reached through the proxy
    // (reqwest's client, not the lean one): here the sink plays the proxy, so
    // the request line carries the target's absolute URL, whose host does
    // not even resolve.
    let proxy = Sink::start().await.expect("sink");
    let dir = tempfile::tempdir().expect("tmp");
    let target = "http://target.invalid:9/events?via=proxy";
    let mut relay = start_relay(
        dir.path(),
        &proxy,
        &[
            ("TARGET_ENDPOINT", target.to_string()),
            ("HTTP_PROXY", format!("http://{}", proxy.addr())),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    assert_eq!(post(&http, relay.port, "via-proxy").await, Some(200));
    assert!(
        proxy.wait_for(1, Duration::from_secs(15)).await,
        "nothing reached the proxy"
    );
    let got = proxy.received();
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].path, target, "absolute-form request line");
    assert_eq!(got[0].header("x-event-id"), Some("via-proxy"));
    let _ = relay.child.kill().await;
}

#[tokio::test]
async fn credentials_in_the_target_url_are_sent_as_basic_authorization() {
    let sink = Sink::start().await.expect("sink");
    let dir = tempfile::tempdir().expect("tmp");
    let target = format!("http://relay:s3cret@{}/events", sink.addr());
    let mut relay = start_relay(dir.path(), &sink, &[("TARGET_ENDPOINT", target)]).await;
    let http = reqwest::Client::new();
    assert_eq!(post(&http, relay.port, "with-credentials").await, Some(200));
    assert!(
        sink.wait_for(1, Duration::from_secs(15)).await,
        "not delivered"
    );
    // base64("relay:s3cret")
    assert_eq!(
        sink.received()[0].header("authorization"),
        Some("Basic cmVsYXk6czNjcmV0")
    );
    let _ = relay.child.kill().await;
}

/// A relay whose delivery pool cannot start, or dies, must not go on taking
/// events that nothing delivers: it is never (or no longer) ready and exits 1
/// with one line naming why. (`COGRELAY_TEST_FAULT` exists in debug builds.)
#[tokio::test]
async fn a_relay_whose_delivery_pool_fails_or_dies_stops_with_exit_1() {
    for (fault, words) in [
        ("delivery-start", "the delivery pool failed: injected fault"),
        ("delivery-panic", "the delivery pool panicked"),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let sink = Sink::start().await.expect("sink");
        let (port, admin_port) = (free_port(), free_port());
        let envs = vec![
            ("PORT", port.to_string()),
            ("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}")),
            ("TARGET_ENDPOINT", sink.url()),
            ("WEBHOOK_SIGNING_SECRET", SECRET.to_string()),
            (
                "COGRELAY_DATA_DIR",
                dir.path().join("data").display().to_string(),
            ),
            ("COGRELAY_TEST_FAULT", fault.to_string()),
        ];
        let mut child = command(dir.path(), &envs).spawn().expect("spawn");
        let http = reqwest::Client::new();
        let mut ready_seen = false;
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            let ready = http
                .get(format!("http://127.0.0.1:{admin_port}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            ready_seen |= ready;
            assert!(Instant::now() < deadline, "{fault}: the relay kept running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr).await;
        }
        assert_eq!(status.code(), Some(1), "{fault}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(words),
            "{fault}: {last}"
        );
        // Ready only while a pool runs: never without one, and this one died.
        assert_eq!(ready_seen, fault == "delivery-panic", "{fault}");
    }
}

/// At shutdown, jobs taken but not started go back to the queue. If that
/// fails (Redis is gone), the deliveries in flight still get their grace
/// period to finish; the jobs not given back are taken over when their locks
/// expire. (On the embedded store a failed give-back is reported after the
/// drain, with exit 1; it cannot be made to fail from outside.)
#[tokio::test]
async fn a_failed_release_at_shutdown_does_not_skip_the_drain() {
    let Some(mut redis) = crate::redis_server::RedisServer::start(true) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    sink.set_default(Behaviour::Delay(Duration::from_millis(1500), 200));
    let env = [
        ("COGRELAY_QUEUE", "redis".to_string()),
        ("REDIS_URL", redis.url()),
        ("CONCURRENCY", "1".to_string()),
        ("SHUTDOWN_GRACE_MS", "10000".to_string()),
    ];
    let (mut relay, logs) = start_relay_logged(dir.path(), &sink, &env).await;
    let http = reqwest::Client::new();
    for i in 0..4 {
        assert_eq!(
            post(&http, relay.port, &format!("drain-{i}")).await,
            Some(200)
        );
    }
    assert!(
        sink.wait_for(1, Duration::from_secs(10)).await,
        "one delivery in flight"
    );
    redis.kill();
    let pid = relay.child.id().expect("pid");
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill")
        .success());
    let exit = tokio::time::timeout(Duration::from_secs(30), relay.child.wait())
        .await
        .expect("exits")
        .expect("status");
    wait_for_line(&logs, "\"stopped\"").await;
    let logs = logs.lock().expect("logs").clone();
    let at = |what: &str| {
        logs.find(what)
            .unwrap_or_else(|| panic!("no {what:?} in:\n{logs}"))
    };
    assert!(
        at("cannot return jobs") < at("finishing in-flight deliveries"),
        "the drain ran after the failed give-back:\n{logs}"
    );
    assert!(at("finishing in-flight deliveries") < at("\"stopped\""));
    assert_eq!(exit.code(), Some(0), "{logs}");
}
