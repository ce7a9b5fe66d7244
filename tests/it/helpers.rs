//! `spawn_app()`: the relay in-process on port 0 with an embedded store in a
//! temp dir, delivering to a recording target ([`Sink`]) on port 0.

#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cogrelay::config::ServeConfig;
use cogrelay::ingress::auth::sign_hex;
use cogrelay::secret::Secret;
pub use cogrelay::sink::{Behaviour, Sink};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &str = "test-signing-secret";

/// Which queue backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Redis,
}

/// Runs each listed test on both backends: `mod <name> { embedded, redis }`.
macro_rules! both_backends {
    ($($(#[$meta:meta])* async fn $name:ident($b:ident: Backend) $body:block)*) => {
        $(
            $(#[$meta])*
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                async fn case($b: Backend) $body
                #[tokio::test]
                async fn embedded() {
                    case(Backend::Embedded).await
                }
                #[tokio::test]
                async fn redis() {
                    if crate::redis_server::available() {
                        case(Backend::Redis).await
                    }
                }
            }
        )*
    };
}

pub struct TestApp {
    pub redis: Option<crate::redis_server::RedisServer>,
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    pub sink: Sink,
    pub http: reqwest::Client,
    pub data_dir: PathBuf,
    pub config: ServeConfig,
    stop: Option<oneshot::Sender<()>>,
    /// Asks the relay to read its destinations file again (as SIGHUP does).
    pub reload: tokio::sync::mpsc::Sender<()>,
    join: Option<JoinHandle<anyhow::Result<()>>>,
    _tmp: Option<tempfile::TempDir>,
}

/// Test defaults: small backoff and timeouts so retry paths run in milliseconds.
pub fn test_config(sink: &Sink, data_dir: PathBuf) -> ServeConfig {
    let mut c = ServeConfig::new(sink.url().parse().expect("url"), data_dir);
    c.ingress.signing_secrets = vec![Secret::new(SECRET)];
    c.delivery.backoff.base = Duration::from_millis(50);
    c.delivery.delivery_timeout = Duration::from_millis(1000);
    c.pool.lock_duration = Duration::from_millis(3000);
    c.pool.shutdown_grace = Duration::from_millis(3000);
    c.admin.listen = "127.0.0.1:0".parse().expect("addr");
    // The dead-letter paths of these tests fail fast: no circuit breaker
    // (tests/it/circuit.rs turns it on).
    c.delivery.circuit.failures = 0;
    c
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut ServeConfig)) -> TestApp {
    spawn_app_on(Backend::Embedded, tweak).await
}

/// The relay on `backend`; for Redis, a private redis-server (AOF on) started for it.
pub async fn spawn_app_on(backend: Backend, tweak: impl FnOnce(&mut ServeConfig)) -> TestApp {
    let sink = Sink::start().await.expect("sink");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = test_config(&sink, tmp.path().join("data"));
    let redis = match backend {
        Backend::Embedded => None,
        Backend::Redis => {
            let server = crate::redis_server::RedisServer::start(true).expect("redis-server");
            cfg.store.kind = cogrelay::config::QueueKind::Redis;
            cfg.store.redis_url = Secret::new(server.url());
            Some(server)
        }
    };
    tweak(&mut cfg);
    let mut app = start(cfg, sink).await;
    app._tmp = Some(tmp);
    app.redis = redis;
    app
}

/// Starts the relay with this config and target (e.g. again on the same data dir).
/// With `TEST_LOG` set (a filter, e.g. `cogrelay=debug`), the relays' logs go
/// to stderr (with `--nocapture`).
pub async fn start(cfg: ServeConfig, sink: Sink) -> TestApp {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let ingress = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (ingress_addr, admin_addr) = (
        ingress.local_addr().expect("addr"),
        admin.local_addr().expect("addr"),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let data_dir = cfg.store.data_dir.clone();
    let (reload, reload_rx) = tokio::sync::mpsc::channel(1);
    let join = tokio::spawn(cogrelay::serve::run_reloadable(
        cfg.clone(),
        ingress,
        admin,
        async move {
            let _ = stopped.await;
        },
        reload_rx,
    ));
    let mut app = TestApp {
        redis: None,
        ingress: ingress_addr,
        admin: admin_addr,
        sink,
        http: reqwest::Client::new(),
        data_dir,
        config: cfg,
        stop: Some(stop),
        reload,
        join: Some(join),
        _tmp: None,
    };
    let ready = tokio::select! {
        () = app.wait_ready() => true,
        _ = async {
            while !app.join.as_ref().is_some_and(|j| j.is_finished()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } => false,
    };
    if !ready {
        let result = app.stop().await;
        panic!("the relay stopped before it was ready: {result:?}");
    }
    app
}

/// A port that was free a moment ago (for processes that must bind it themselves).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn event(bot: &str, id: &str) -> Value {
    json!({
        "botId": bot,
        "eventId": id,
        "type": "message.received",
        "payload": { "text": format!("hello {id}"), "n": 1 },
        "timestamp": now_rfc3339()
    })
}

/// Now, as an envelope's `timestamp` (inside the replay window).
pub fn now_rfc3339() -> String {
    cogrelay::time::rfc3339(cogrelay::queue::now_ms())
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub json: Value,
}

/// Posts signed events from a spawned task (it owns what it needs).
#[derive(Clone)]
pub struct Poster {
    http: reqwest::Client,
    url: String,
}

impl Poster {
    /// POST `body` signed with [`SECRET`]; the status it was answered.
    pub async fn post(&self, body: &Value) -> u16 {
        let raw = serde_json::to_vec(body).expect("json");
        let sig = sign_hex(SECRET, &raw);
        self.http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("x-webhook-signature", sig)
            .body(raw)
            .send()
            .await
            .expect("ingress reachable")
            .status()
            .as_u16()
    }
}

impl TestApp {
    pub fn url(&self) -> String {
        format!("http://{}/api/webhook/cognigy", self.ingress)
    }

    pub fn poster(&self) -> Poster {
        Poster {
            http: self.http.clone(),
            url: self.url(),
        }
    }

    /// POST a body signed with [`SECRET`].
    pub async fn post_event(&self, body: &Value) -> Reply {
        self.post_signed(serde_json::to_vec(body).expect("json"))
            .await
    }

    /// POST these exact bytes as JSON, signed with [`SECRET`].
    pub async fn post_signed(&self, body: Vec<u8>) -> Reply {
        let sig = sign_hex(SECRET, &body);
        self.post_raw(
            body,
            &[
                ("content-type", "application/json"),
                ("x-webhook-signature", &sig),
            ],
        )
        .await
    }

    pub async fn post_raw(&self, body: Vec<u8>, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.http.post(self.url()).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        reply(req.send().await.expect("ingress reachable")).await
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        reply(
            self.http
                .get(format!("http://{}{path}", self.admin))
                .send()
                .await
                .expect("admin"),
        )
        .await
    }

    /// The relay's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// `method` on the admin API's `path` with the bearer `token`.
    pub async fn admin_as(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
    ) -> reqwest::Response {
        self.http
            .request(method, format!("http://{}{path}", self.admin))
            .bearer_auth(token)
            .send()
            .await
            .expect("admin")
    }

    pub async fn admin_post(&self, path: &str) -> Reply {
        reply(
            self.http
                .post(format!("http://{}{path}", self.admin))
                .send()
                .await
                .expect("admin"),
        )
        .await
    }

    pub async fn admin_delete(&self, path: &str) -> Reply {
        reply(
            self.http
                .delete(format!("http://{}{path}", self.admin))
                .send()
                .await
                .expect("admin"),
        )
        .await
    }

    pub async fn wait_ready(&self) {
        wait_until("the relay ready", Duration::from_secs(10), || async {
            self.http
                .get(format!("http://{}/readyz", self.admin))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// Waits until the job reaches `state`; returns its view.
    pub async fn wait_job(&self, id: &str, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.admin_get(&format!("/admin/jobs/{id}")).await;
            if r.json["state"] == state {
                return r.json;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never became {state}: {}",
                r.json
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the queue counts match `pred`.
    pub async fn wait_counts(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.admin_get("/admin/queue").await;
            if pred(&r.json) {
                return r.json;
            }
            assert!(
                Instant::now() < deadline,
                "queue never reached the expected counts: {}",
                r.json
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until nothing is waiting, active or delayed: no delivery can
    /// happen any more until something new arrives.
    pub async fn wait_settled(&self, timeout: Duration) -> Value {
        self.wait_counts(timeout, |c| {
            c["waiting"] == 0 && c["active"] == 0 && c["delayed"] == 0
        })
        .await
    }

    /// Graceful stop; returns the run result.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.join.take() {
            Some(j) => j.await.expect("serve task"),
            None => Ok(()),
        }
    }

    /// Stops this relay and starts a new one on the same data dir and target.
    pub async fn restart(mut self) -> TestApp {
        self.stop().await.expect("clean stop");
        let tmp = self._tmp.take();
        let redis = self.redis.take();
        let mut app = start(self.config.clone(), self.sink.clone()).await;
        app._tmp = tmp;
        app.redis = redis;
        app
    }
}

async fn reply(r: reqwest::Response) -> Reply {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.unwrap_or_default();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        json,
    }
}

/// The event ids (`X-Event-Id`) of every request the sink received, in
/// arrival order.
pub fn received_ids(sink: &Sink) -> Vec<String> {
    sink.received()
        .iter()
        .filter_map(|r| r.header("x-event-id").map(str::to_owned))
        .collect()
}

/// Waits until every id in `acked` reached the target (by `X-Event-Id`).
pub async fn wait_all_delivered(sink: &Sink, acked: &HashSet<String>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let delivered: HashSet<String> = received_ids(sink).into_iter().collect();
        let missing: Vec<&String> = acked.difference(&delivered).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged events not delivered, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `node <script> <args>` in tests/node and parses the one JSON object it prints.
pub async fn run_node(script: &str, args: &[&str]) -> Value {
    let out = tokio::process::Command::new("node")
        .arg(script)
        .args(args)
        .current_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node"))
        .output()
        .await
        .expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node {script} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|_| panic!("node {script} printed no JSON: {stdout}"))
}

/// The destinations of a file's `text`, with `c`'s settings as the globals.
/// One destination, `crm` (the app's sink), ordered by session
/// (`ordering = "session"`); `extra` is the rest of its table.
pub fn ordered_crm(c: &mut ServeConfig, extra: &str) {
    let text = format!(
        "[[destination]]\nname = \"crm\"\nurl = \"{}\"\nordering = \"session\"\n{extra}",
        c.delivery.target
    );
    c.destinations_file = Some(destinations_of(c, &text));
}

/// Writes `text` to `path` and gives it to `c` as its destinations file
/// (which a reload, `TestApp::reload`, reads again).
pub fn use_file(c: &mut ServeConfig, path: &std::path::Path, text: &str) {
    std::fs::write(path, text).expect("write");
    let globals = cogrelay::config::destinations::Globals {
        delivery: c.delivery.clone(),
        lock_duration: c.pool.lock_duration,
    };
    c.destinations_file =
        Some(cogrelay::config::destinations::load(path, &globals, &|_| None).expect("valid"));
}

pub fn destinations_of(c: &ServeConfig, text: &str) -> cogrelay::destination::DestinationSet {
    let globals = cogrelay::config::destinations::Globals {
        delivery: c.delivery.clone(),
        lock_duration: c.pool.lock_duration,
    };
    let list = cogrelay::config::destinations::parse(text, "test.toml", &globals, &|_| None)
        .expect("a valid destinations file");
    cogrelay::destination::DestinationSet {
        list,
        file: Some("test.toml".into()),
    }
}

/// Posts events of about 2 KB, `batch` at a time, until the relay has
/// answered 503 ("Queue unavailable", with a Retry-After) `refusals` times;
/// the ids it accepted (at least one).
pub async fn fill_until_refused(
    app: &std::sync::Arc<TestApp>,
    batch: usize,
    refusals: usize,
) -> std::collections::BTreeSet<String> {
    let mut accepted = std::collections::BTreeSet::new();
    let (mut refused, mut round) = (0, 0);
    while refused < refusals {
        let mut sends = tokio::task::JoinSet::new();
        for k in 0..batch {
            let app = app.clone();
            let id = format!("fill-{round}-{k}");
            sends.spawn(async move {
                let mut e = event("bot", &id);
                e["payload"] = json!({ "blob": "x".repeat(2000) });
                (id, app.post_event(&e).await)
            });
        }
        while let Some(res) = sends.join_next().await {
            let (id, r) = res.expect("task");
            match r.status {
                200 => {
                    assert_eq!(r.json["status"], "accepted");
                    accepted.insert(id);
                }
                503 => {
                    assert_eq!(r.json["error"], "Queue unavailable");
                    assert!(r.headers.contains_key("retry-after"));
                    refused += 1;
                }
                other => panic!("unexpected {other}: {}", r.json),
            }
        }
        round += 1;
        assert!(round < 2000, "the store never filled up");
    }
    assert!(!accepted.is_empty(), "nothing was accepted");
    accepted
}

/// What `enqueue` did with an event (the `default` destination's shortcut).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    Accepted(String),
    /// The event key was seen within the dedup TTL; the id is the first job's.
    Duplicate(String),
}

fn first(routed: &cogrelay::queue::Routed) -> Enqueued {
    let id = routed
        .jobs
        .first()
        .map(|j| j.id.clone())
        .unwrap_or_default();
    if routed.duplicate {
        Enqueued::Duplicate(id)
    } else {
        Enqueued::Accepted(id)
    }
}

/// Shortcuts for the `default` destination, for tests only: the relay always
/// names the destinations it stores for and claims from.
pub trait DefaultDestination: cogrelay::queue::Queue {
    /// One job for the `default` destination.
    fn enqueue(
        &self,
        event: cogrelay::ingress::envelope::Event,
    ) -> impl std::future::Future<Output = cogrelay::queue::QueueResult<Enqueued>> + Send {
        async move {
            let (routed, _) = self
                .store(
                    event,
                    vec![cogrelay::queue::DestinationName::DEFAULT.into()],
                    None,
                )
                .await?;
            Ok(first(&routed))
        }
    }

    /// One job for the `default` destination, leased to the caller when the
    /// backend can.
    fn enqueue_leased(
        &self,
        event: cogrelay::ingress::envelope::Event,
        lease: std::time::Duration,
    ) -> impl std::future::Future<
        Output = cogrelay::queue::QueueResult<(Enqueued, Option<cogrelay::queue::Leased>)>,
    > + Send {
        async move {
            let (routed, mut leased) = self
                .store(
                    event,
                    vec![cogrelay::queue::DestinationName::DEFAULT.into()],
                    Some(lease),
                )
                .await?;
            Ok((first(&routed), leased.pop()))
        }
    }

    /// Claims the `default` destination's due jobs, in due order.
    fn claim(
        &self,
        max: usize,
        lease: std::time::Duration,
    ) -> impl std::future::Future<Output = cogrelay::queue::QueueResult<cogrelay::queue::Claimed>> + Send
    {
        async move {
            self.claim_for(
                &cogrelay::queue::DestinationName::DEFAULT,
                max,
                lease,
                cogrelay::queue::ClaimOrder::Due,
            )
            .await
        }
    }
}

/// Polls `holds` until it is true, at most `timeout`; else fails naming
/// `what`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut holds: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !holds().await {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An unordered job for destination `name`, for tests.
pub fn to(name: &str) -> cogrelay::queue::Recipient {
    dn(name).into()
}

/// A destination's name, for tests (panics on an invalid one).
pub fn dn(name: &str) -> cogrelay::queue::DestinationName {
    cogrelay::queue::DestinationName::parse(name).expect("a valid destination name")
}

impl<Q: cogrelay::queue::Queue> DefaultDestination for Q {}

/// The head of the answer on `tcp` (its status line and headers), once it
/// came; what came before the connection closed.
pub async fn status_line(tcp: &mut tokio::net::TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::io::AsyncReadExt::read(tcp, &mut buf).await {
            Ok(n @ 1..) => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// What a sender that writes its whole body before it reads hears: a POST
/// to the ingress with `headers` (each line ending in CRLF) and a body of
/// ten 16 KiB pieces, 10 ms apart (each write must succeed: a relay that
/// answered and closed under them fails it), then the answer's head,
/// within 10 s.
pub async fn answer_after_a_whole_body(addr: SocketAddr, headers: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let (piece, pieces) = (16 * 1024, 10);
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /api/webhook/cognigy HTTP/1.1\r\nHost: relay\r\n{headers}Content-Length: {}\r\n\r\n",
        piece * pieces
    );
    tcp.write_all(head.as_bytes()).await.expect("headers");
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    for i in 0..pieces {
        pace.tick().await;
        let written = tcp.write_all(&vec![b' '; piece]).await;
        assert!(written.is_ok(), "piece {i} of the body: {written:?}");
    }
    tokio::time::timeout(Duration::from_secs(10), status_line(&mut tcp))
        .await
        .expect("answered")
}

/// Until the logs of a relay hold `what` (at most 10 s): its last lines may
/// still be on their way through the pipe when the process is reaped, and a
/// test that read them at once missed the last one under load.
pub async fn wait_for_line(logs: &std::sync::Mutex<String>, what: &str) {
    wait_until(
        &format!("{what} in the relay's logs"),
        Duration::from_secs(10),
        || {
            let seen = logs.lock().expect("logs").contains(what);
            async move { seen }
        },
    )
    .await;
}
