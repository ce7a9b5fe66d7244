//! What real Cognigy traffic and the open internet expose: outputs of one Flow
//! turn are never merged, a captured request cannot become a new job, and
//! Standard Webhooks signatures verify as the reference library makes them.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(15);

/// The lines of one of `tests/fixtures/` (shapes Cognigy sends), as bytes.
fn fixture_lines(name: &str) -> Vec<Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// Waits until nothing is left to deliver and `completed` jobs are done; then
/// the target has seen all it ever will.
async fn wait_settled(app: &TestApp, completed: u64) -> Value {
    app.wait_counts(WAIT, |c| {
        c["completed"] == completed && c["waiting"] == 0 && c["active"] == 0 && c["delayed"] == 0
    })
    .await
}

fn envelope_at(id: &str, timestamp: Value) -> Value {
    let mut e = event("bot-replay", id);
    e["timestamp"] = timestamp;
    e
}

both_backends! {
async fn a_flow_turn_sent_twice_is_its_three_outputs_delivered_once_each(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let turn = fixture_lines("webhook-endpoint-turn.jsonl");
    let first_turn = &turn[..3];
    let mut ids = Vec::new();
    for body in first_turn {
        let r = app.post_signed(body.clone()).await;
        assert_eq!((r.status, r.json["status"].as_str()), (200, Some("accepted")), "{}", r.json);
        ids.push(r.json["jobId"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "three outputs sharing a traceId are three jobs");
    for (body, id) in first_turn.iter().zip(&ids) {
        let r = app.post_signed(body.clone()).await;
        assert_eq!(r.json["status"], "duplicate", "a byte-identical resend");
        assert_eq!(&r.json["jobId"], id);
    }
    wait_settled(&app, 3).await;
    let got = app.sink.received();
    assert_eq!(got.len(), 3, "exactly the turn's three outputs");
    let mut bodies: Vec<&[u8]> = got.iter().map(|r| r.body.as_slice()).collect();
    bodies.sort();
    let mut sent: Vec<&[u8]> = first_turn.iter().map(Vec::as_slice).collect();
    sent.sort();
    assert_eq!(bodies, sent, "each output delivered as Cognigy sent it");
}

/// (`bot-a`, `x`) and (`bot`, `a-x`) share the key `cognigy-bot-a-x`
/// (SPEC §3.1), as (`bot`, `b-y`) and (`bot-b`, `y`) share
/// `cognigy-bot-b-y`: two events each, whichever comes first, each
/// delivered, each resend a duplicate of its own; and still once the first
/// one's job was removed (the key's record is kept while another event
/// shares it).
async fn envelopes_whose_ids_share_a_key_are_two_events(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let sent = [
        event("bot-a", "x"),
        event("bot", "a-x"),
        event("bot", "b-y"),
        event("bot-b", "y"),
    ];
    let mut ids = Vec::new();
    for e in &sent {
        let r = app.post_event(e).await;
        assert_eq!(r.json["status"], "accepted", "{}: {}", e["eventId"], r.json);
        ids.push(r.json["jobId"].clone());
    }
    let resend_all = || async {
        for (e, id) in sent.iter().zip(&ids) {
            let r = app.post_event(e).await;
            assert_eq!(r.json["status"], "duplicate", "{}", r.json);
            assert_eq!(&r.json["jobId"], id, "a duplicate of its own event");
        }
    };
    resend_all().await;
    wait_settled(&app, 4).await;
    let got = app.sink.received();
    assert_eq!(got.len(), 4, "never merged");
    let keys = got.iter().filter_map(|r| r.header("idempotency-key"));
    assert_eq!(keys.filter(|k| *k == "cognigy-bot-a-x").count(), 2);
    for first in [&ids[0], &ids[2]] {
        let id = first.as_str().expect("id");
        assert_eq!(app.admin_delete(&format!("/admin/jobs/{id}")).await.status, 200);
    }
    resend_all().await;
    assert_eq!(app.sink.received().len(), 4, "nothing stored again");
}

async fn equal_outputs_without_a_trace_id_are_two_events(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let lines = fixture_lines("webhook-endpoint-no-trace.jsonl");
    assert_eq!(lines[0], lines[1], "the fixture repeats one output");
    for body in &lines {
        let r = app.post_signed(body.clone()).await;
        assert_eq!(r.json["status"], "accepted", "{}", r.json);
    }
    wait_settled(&app, 2).await;
    assert_eq!(app.sink.received().len(), 2, "never merged");
}

async fn an_envelope_outside_the_replay_window_is_401_and_stores_nothing(b: Backend) {
    let app = spawn_app_on(b, |c| c.store.retention.dedup_ttl = Duration::from_secs(3600)).await;
    let now = cogrelay::queue::now_ms();
    let outside = [
        json!("2001-01-01T00:00:00Z"),
        json!(cogrelay::time::rfc3339(now - 3_601_000)),
        json!(cogrelay::time::rfc3339(now + 301_000)),
        json!((now - 3_601_000) / 1000),
    ];
    for (i, ts) in outside.iter().enumerate() {
        let r = app.post_event(&envelope_at(&format!("old-{i}"), ts.clone())).await;
        assert_eq!(r.status, 401, "{ts}: {}", r.json);
        assert_eq!(r.json["error"], "event timestamp outside the replay window");
    }
    let r = app.post_event(&envelope_at("bad", json!("last tuesday"))).await;
    assert_eq!(r.status, 400, "{}", r.json);
    assert!(r.json["error"].as_str().expect("error").contains("timestamp"));
    let c = app.admin_get("/admin/queue").await.json;
    assert_eq!(c["waiting"].as_u64().unwrap_or(0) + c["completed"].as_u64().unwrap_or(0)
        + c["active"].as_u64().unwrap_or(0) + c["delayed"].as_u64().unwrap_or(0), 0, "{c}");

    // Inside the window, a replay is the first job.
    let inside = envelope_at("fresh", json!(cogrelay::time::rfc3339(now - 3_500_000)));
    let first = app.post_event(&inside).await;
    assert_eq!(first.json["status"], "accepted");
    let replay = app.post_event(&inside).await;
    assert_eq!(replay.json["status"], "duplicate");
    assert_eq!(replay.json["jobId"], first.json["jobId"]);
    wait_settled(&app, 1).await;
    assert_eq!(app.sink.received().len(), 1);
}

/// An envelope dated ahead of the relay's clock (up to 5 minutes is let in)
/// stays inside the window for `DEDUP_TTL_SECS` after its date, so its
/// dedup record lasts as long: a replay once a record from now would have
/// lapsed is still the first job (it was a new job and a second delivery).
/// An envelope without a date, sent at the same time, shows when that was.
async fn a_replay_of_an_envelope_dated_ahead_is_a_duplicate_while_the_window_admits_it(b: Backend) {
    let app = spawn_app_on(b, |c| c.store.retention.dedup_ttl = Duration::from_secs(2)).await;
    let ahead = envelope_at(
        "ahead",
        json!(cogrelay::time::rfc3339(cogrelay::queue::now_ms() + 60_000)),
    );
    let mut undated = envelope_at("undated", json!(0));
    undated.as_object_mut().expect("object").remove("timestamp");
    let first = app.post_event(&ahead).await;
    assert_eq!(first.json["status"], "accepted", "{}", first.json);
    let control = app.post_event(&undated).await;
    assert_eq!(control.json["status"], "accepted", "{}", control.json);
    // Once the undated event's record has lapsed (its resend a new job),
    // one kept 2 s from now would have lapsed too.
    wait_until("the undated event's record lapsed", Duration::from_secs(20), || {
        let (app, undated) = (&app, &undated);
        async move { app.post_event(undated).await.json["status"] == "accepted" }
    })
    .await;
    let replay = app.post_event(&ahead).await;
    assert_eq!(replay.json["status"], "duplicate", "{}", replay.json);
    assert_eq!(replay.json["jobId"], first.json["jobId"]);
}

async fn standard_webhooks_signatures_verify_with_their_tolerance(b: Backend) {
    const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let app = spawn_app_on(b, |c| {
        c.ingress.signing_secrets = vec![cogrelay::secret::Secret::new("other"), cogrelay::secret::Secret::new(WHSEC)];
    })
    .await;
    let signer = standardwebhooks::Webhook::new(WHSEC).expect("secret");
    let now = cogrelay::queue::now_ms() / 1000;
    let send = |body: Vec<u8>, id: &'static str, ts: i64, sig: String| {
        let app = &app;
        async move {
            let ts = ts.to_string();
            app.post_raw(body, &[
                ("content-type", "application/json"),
                ("webhook-id", id),
                ("webhook-timestamp", &ts),
                ("webhook-signature", &sig),
            ])
            .await
        }
    };
    let body = serde_json::to_vec(&event("bot-sw", "sw-1")).expect("json");
    let sig = signer.sign("msg-1", now, &body).expect("sign");
    let r = send(body.clone(), "msg-1", now, sig.clone()).await;
    assert_eq!((r.status, &r.json["status"]), (200, &json!("accepted")), "{}", r.json);

    // Signed 6 minutes ago: outside the 5-minute tolerance, whatever the body says.
    let old_body = serde_json::to_vec(&event("bot-sw", "sw-2")).expect("json");
    let old = signer.sign("msg-2", now - 360, &old_body).expect("sign");
    let r = send(old_body, "msg-2", now - 360, old).await;
    assert_eq!(r.status, 401, "{}", r.json);
    assert_eq!(r.json["error"], "webhook-timestamp outside the 5-minute tolerance");

    // Another body, id or timestamp under the same signature: refused.
    let other = serde_json::to_vec(&event("bot-sw", "sw-3")).expect("json");
    assert_eq!(send(other, "msg-1", now, sig.clone()).await.status, 401);
    assert_eq!(send(body.clone(), "msg-x", now, sig.clone()).await.status, 401);
    assert_eq!(send(body.clone(), "msg-1", now - 1, sig).await.status, 401);
    // Signed with a secret that is not on the list.
    let stranger = standardwebhooks::Webhook::new("whsec_c2VjcmV0c2VjcmV0c2VjcmV0").expect("secret");
    let forged = stranger.sign("msg-4", now, &body).expect("sign");
    let r = send(body, "msg-4", now, forged).await;
    assert_eq!((r.status, &r.json["error"]), (401, &json!("Invalid webhook signature")));

    wait_settled(&app, 1).await;
    assert_eq!(app.sink.received().len(), 1, "only the valid request was stored");
}

async fn ids_that_would_change_a_path_are_400_and_store_nothing(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    for (field, value) in [("botId", "."), ("botId", ".."), ("eventId", ".."), ("eventId", ".")] {
        let mut e = event("b", "e");
        e[field] = json!(value);
        let r = app.post_event(&e).await;
        assert_eq!(r.status, 400, "{field}={value}: {}", r.json);
        assert!(r.json["error"].as_str().expect("error").contains(field), "{}", r.json);
    }
    let c = app.admin_get("/admin/queue").await.json;
    assert_eq!(c["waiting"].as_u64().unwrap_or(0) + c["completed"].as_u64().unwrap_or(0), 0, "{c}");
}
}

/// A server that answers every request 200 with a 100 MB body, counting the
/// bytes it got to write before the client hung up.
struct GiantAnswers {
    addr: std::net::SocketAddr,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    finished: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl GiantAnswers {
    const LEN: u64 = 100 * 1024 * 1024;

    async fn start() -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let finished = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (w, f) = (written.clone(), finished.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (w, f) = (w.clone(), f.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|x| x == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(n @ 1..) => head.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        Self::LEN
                    );
                    if tcp.write_all(answer.as_bytes()).await.is_ok() {
                        let chunk = vec![b' '; 64 * 1024];
                        let mut sent = 0;
                        while sent < Self::LEN && tcp.write_all(&chunk).await.is_ok() {
                            sent += chunk.len() as u64;
                            w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        }
                    }
                    f.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        Self {
            addr,
            written,
            finished,
        }
    }

    /// Waits until `n` answers ended (written whole or cut off); the bytes written.
    async fn written_after(&self, n: u64) -> u64 {
        use std::sync::atomic::Ordering;
        let deadline = std::time::Instant::now() + WAIT;
        while self.finished.load(Ordering::Relaxed) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the answers never ended"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.written.load(Ordering::Relaxed)
    }
}

/// Whatever a target or Cognigy answers, no more than is kept is read: a
/// 100 MB answer is cut off after the first 64 KiB (1 MiB for Cognigy's
/// JSON), on the lean HTTP path and on the reqwest path alike.
#[tokio::test]
async fn a_100_mb_answer_is_read_no_further_than_what_is_kept() {
    // Only what the socket buffers hold can be written past what was read.
    const READ_AT_MOST: u64 = 16 * 1024 * 1024;
    let giant = GiantAnswers::start().await;
    let plain = format!("http://{}/events", giant.addr);
    let with_credentials = format!("http://user:pw@{}/events", giant.addr);
    for (n, target) in [plain, with_credentials].into_iter().enumerate() {
        let app = spawn_app_on(Backend::Embedded, |c| {
            c.delivery.target = target.parse().expect("url");
        })
        .await;
        let r = app.post_event(&event("bot", &format!("giant-{n}"))).await;
        let id = r.json["jobId"].as_str().expect("id").to_string();
        let job = app.wait_job(&id, "completed", WAIT).await;
        assert_eq!(job["attempts"][0]["status"], 200, "{job}");
        let written = giant.written_after(n as u64 + 1).await;
        assert!(
            written < (n as u64 + 1) * READ_AT_MOST,
            "{target}: the target wrote {} MB of its answer",
            written >> 20
        );
    }
    let before = giant.written_after(2).await;
    let cognigy = cogrelay::cognigy::CognigyClient::new(cogrelay::cognigy::CognigyConfig {
        credentials: cogrelay::cognigy::Credentials::ApiKey(cogrelay::secret::Secret::new("k")),
        ..crate::cognigy::client_config(giant.addr, cogrelay::cognigy::Api::Rest)
    })
    .expect("client");
    let a = cognigy
        .send(
            reqwest::Method::GET,
            cognigy.url("/new/v2.0/endpoints"),
            &[],
            None,
            "listing",
        )
        .await
        .expect("answer");
    assert_eq!(a.status, 200);
    let written = giant.written_after(3).await - before;
    assert!(
        written < READ_AT_MOST,
        "Cognigy's answer: {} MB written",
        written >> 20
    );
}

/// `PORT` is every interface: the relay answers over IPv6 and IPv4.
#[tokio::test]
async fn the_ingress_listens_on_ipv6_and_ipv4() {
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    let relay = crate::process::start_relay(dir.path(), &sink, &[]).await;
    let http = reqwest::Client::new();
    for host in ["[::1]", "127.0.0.1"] {
        let body = serde_json::to_vec(&event("bot", &format!("via-{host}"))).expect("json");
        let sig = cogrelay::ingress::auth::sign_hex(SECRET, &body);
        let r = http
            .post(format!("http://{host}:{}/api/webhook/cognigy", relay.port))
            .header("content-type", "application/json")
            .header("x-webhook-signature", sig)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(r.status(), 200, "{host}");
    }
    assert!(sink.wait_for(2, WAIT).await);
}

/// A Redis that can lose what the relay acknowledged is named at start-up,
/// one WARN line per risk (also with several destinations, each its own
/// queue: it was one a queue), and in `/metrics`; a safe one is not.
#[tokio::test]
async fn a_redis_that_can_lose_data_is_named() {
    if !crate::redis_server::available() {
        return;
    }
    for safe in [false, true] {
        let server = crate::redis_server::RedisServer::start(safe).expect("redis-server");
        if !safe {
            assert!(server.command("CONFIG SET maxmemory-policy allkeys-lru"));
        }
        let dir = tempfile::tempdir().expect("tmp");
        let sink = Sink::start().await.expect("sink");
        let file = dir.path().join("cogrelay.toml");
        let two = format!(
            "[[destination]]\nname = \"crm\"\nurl = \"{u}\"\n[[destination]]\nname = \"erp\"\nurl = \"{u}\"\n",
            u = sink.url()
        );
        std::fs::write(&file, two).expect("write");
        let (relay, logs) = crate::process::start_relay_logged(
            dir.path(),
            &sink,
            &[
                ("COGRELAY_QUEUE", "redis".into()),
                ("REDIS_URL", server.url()),
                ("COGRELAY_CONFIG", file.display().to_string()),
            ],
        )
        .await;
        let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", relay.admin_port))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let risk = |name: &str| {
            format!(
                "cogrelay_queue_durability_risk{{risk=\"{name}\"}} {}",
                u8::from(!safe)
            )
        };
        assert!(metrics.contains(&risk("redis_no_aof")), "{metrics}");
        assert!(metrics.contains(&risk("redis_evicting")), "{metrics}");
        let logs = logs.lock().expect("logs").clone();
        let warned = |what: &str| {
            logs.lines()
                .filter(|l| l.contains("WARN") && l.contains(what))
                .count()
        };
        assert_eq!(warned("appendonly yes"), usize::from(!safe), "{logs}");
        assert_eq!(
            warned("maxmemory-policy noeviction"),
            usize::from(!safe),
            "{logs}"
        );
    }
}

both_backends! {
async fn without_dedup_every_request_is_a_new_job(b: Backend) {
    let app = spawn_app_on(b, |c| c.store.retention.dedup_ttl = Duration::ZERO).await;
    let e = event("bot", "twice");
    let first = app.post_event(&e).await;
    let second = app.post_event(&e).await;
    assert_eq!((first.status, second.status), (200, 200), "{} {}", first.json, second.json);
    assert_eq!((first.json["status"].as_str(), second.json["status"].as_str()), (Some("accepted"), Some("accepted")));
    assert_ne!(first.json["jobId"], second.json["jobId"]);
    wait_settled(&app, 2).await;
    assert_eq!(app.sink.received().len(), 2);
}
}
