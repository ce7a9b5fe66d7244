//! SPEC §3.1: the ingress answer table, one test per row, and the §3.2 headers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use cogrelay::ingress::auth::sign_hex;
use cogrelay::secret::Secret;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(10);

async fn total_jobs(app: &TestApp) -> u64 {
    let c = app.admin_get("/admin/queue").await.json;
    ["waiting", "active", "delayed", "completed", "failed"]
        .iter()
        .map(|s| c[*s].as_u64().expect("count"))
        .sum()
}

fn futures_stream(
    body: Vec<u8>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    struct Chunks(Vec<Vec<u8>>);
    impl futures_core::Stream for Chunks {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(if self.0.is_empty() {
                None
            } else {
                Some(Ok(self.0.remove(0)))
            })
        }
    }
    Chunks(body.chunks(256).map(<[u8]>::to_vec).collect())
}

both_backends! {
async fn a_burst_with_repeats_is_one_job_per_event(b: Backend) {
    // 60 events, each sent 3 times, all 180 requests at once: on Redis the
    // copies land in the same batched add, where the first must win.
    let app = Arc::new(spawn_app_on(b, |_| {}).await);
    let mut sends = tokio::task::JoinSet::new();
    for copy in 0..3 {
        for i in 0..60 {
            let app = app.clone();
            sends.spawn(async move {
                let r = app.post_event(&event("burst", &format!("b-{i}"))).await;
                (i, copy, r.status, r.json)
            });
        }
    }
    let mut by_event: HashMap<usize, Vec<(String, String)>> = HashMap::new();
    while let Some(res) = sends.join_next().await {
        let (i, _copy, status, json) = res.expect("task");
        assert_eq!(status, 200, "{json}");
        by_event.entry(i).or_default().push((
            json["status"].as_str().expect("status").to_string(),
            json["jobId"].as_str().expect("jobId").to_string(),
        ));
    }
    let mut ids = HashSet::new();
    for (i, answers) in &by_event {
        let accepted = answers.iter().filter(|(s, _)| s == "accepted").count();
        let duplicates = answers.iter().filter(|(s, _)| s == "duplicate").count();
        assert_eq!((accepted, duplicates), (1, 2), "event {i}: {answers:?}");
        assert!(
            answers.iter().all(|(_, id)| *id == answers[0].1),
            "event {i}: one job id for every copy: {answers:?}"
        );
        assert!(ids.insert(answers[0].1.clone()), "event {i} shares a job id");
    }
    assert_eq!(ids.len(), 60);
    assert!(app.sink.wait_for(60, WAIT).await, "all delivered");
    app.wait_settled(WAIT).await;
    let keys: Vec<String> = app
        .sink
        .received()
        .iter()
        .filter_map(|r| r.header("idempotency-key").map(str::to_owned))
        .collect();
    let unique: HashSet<&String> = keys.iter().collect();
    assert_eq!((keys.len(), unique.len()), (60, 60), "each event delivered once");
}

async fn signed_envelope_is_accepted_and_delivered_with_the_spec_headers(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let r = app.post_event(&event("bot-1", "evt-1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["status"], "accepted");
    let job_id = r.json["jobId"].as_str().expect("jobId").to_string();

    assert!(app.sink.wait_for(1, WAIT).await, "delivered");
    let got = &app.sink.received()[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("x-event-id"), Some("evt-1"));
    assert_eq!(got.header("x-source"), Some("cognigy-webhook-relay"));
    assert_eq!(got.header("idempotency-key"), Some("cognigy-bot-1-evt-1"));
    assert_eq!(got.header("x-delivery-attempt"), Some("1"));
    assert!(
        got.header("webhook-signature").is_none(),
        "no signing without TARGET_SIGNING_SECRET"
    );
    let body: Value = serde_json::from_slice(&got.body).expect("json body");
    assert_eq!(
        body,
        json!({ "text": "hello evt-1", "n": 1 }),
        "the payload, not the envelope"
    );
    app.wait_job(&job_id, "completed", WAIT).await;
}

async fn endpoint_output_is_delivered_whole_with_its_derived_key(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let with_trace = json!({ "userId": "u1", "sessionId": "s1", "AIOutput": { "traceId": "tr-1", "text": "hi" } });
    assert_eq!(app.post_event(&with_trace).await.status, 200);
    let no_trace =
        json!({ "userId": "u1", "sessionId": "s2", "text": "hello", "data": { "a": 1 } });
    let raw = serde_json::to_vec(&no_trace).expect("json");
    assert_eq!(app.post_event(&no_trace).await.status, 200);

    assert!(app.sink.wait_for(2, WAIT).await);
    let mut got = app.sink.received();
    got.sort_by_key(|r| r.header("idempotency-key").map(str::to_owned));
    let digest16 = &hex::encode(Sha256::digest(serde_json::to_vec(&with_trace).expect("json")))[..16];
    assert_eq!(
        got[0].header("idempotency-key"),
        Some(format!("cognigy-s1-tr-1-{digest16}").as_str())
    );
    assert_eq!(got[0].header("x-event-id"), Some(format!("tr-1-{digest16}").as_str()));
    assert_eq!(
        serde_json::from_slice::<Value>(&got[0].body).expect("json"),
        with_trace
    );
    let key = got[1].header("idempotency-key").expect("key");
    let hash = hex::encode(Sha256::digest(&raw));
    assert!(
        key.starts_with("cognigy-s2-") && !key.contains(&hash),
        "without a traceId a fresh key, not the body's hash: {key}"
    );
    assert_eq!(got[1].body, raw);
}

async fn bad_json_is_400_and_stores_nothing(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let body = b"{\"botId\": ".to_vec();
    let r = app.post_signed(body).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json["error"]
            .as_str()
            .expect("error")
            .contains("not valid JSON"),
        "{}",
        r.json
    );
    assert_eq!(total_jobs(&app).await, 0);
}

async fn non_object_json_is_400(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let r = app.post_event(&json!([1, 2, 3])).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json["error"], "Body must be a JSON object");
    assert_eq!(total_jobs(&app).await, 0);
}

async fn each_missing_field_is_named(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    for field in ["botId", "eventId", "type"] {
        let mut e = event("b", "e");
        e.as_object_mut().expect("object").remove(field);
        let r = app.post_event(&e).await;
        assert_eq!(r.status, 400, "{field}");
        assert_eq!(
            r.json,
            json!({ "error": "Missing required Cognigy webhook fields", "missing": [field] })
        );
    }
    let r = app.post_event(&json!({ "payload": {} })).await;
    assert_eq!(r.json["missing"], json!(["botId", "eventId", "type"]));
    assert_eq!(total_jobs(&app).await, 0);
}

async fn wrong_types_are_400_with_the_field_named(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let r = app
        .post_event(&json!({ "botId": 42, "eventId": "e", "type": "t" }))
        .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json["error"].as_str().expect("error").contains("botId"),
        "{}",
        r.json
    );
}

async fn wrong_signature_is_401_and_stores_nothing(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let body = serde_json::to_vec(&event("b", "e")).expect("json");
    let sig = sign_hex("some-other-secret", &body);
    let r = app
        .post_raw(
            body,
            &[
                ("content-type", "application/json"),
                ("x-webhook-signature", &sig),
            ],
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json["error"], "Invalid webhook signature");
    assert_eq!(total_jobs(&app).await, 0);
}

async fn missing_signature_is_401(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let body = serde_json::to_vec(&event("b", "e")).expect("json");
    let r = app
        .post_raw(body, &[("content-type", "application/json")])
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(total_jobs(&app).await, 0);
}

async fn any_secret_of_the_rotation_list_is_accepted(b: Backend) {
    let app = spawn_app_on(b, |c| {
        c.ingress.signing_secrets = vec![Secret::new("old-secret"), Secret::new("new-secret")]
    })
    .await;
    for (i, secret) in ["old-secret", "new-secret"].iter().enumerate() {
        let body = serde_json::to_vec(&event("b", &format!("rot-{i}"))).expect("json");
        let sig = sign_hex(secret, &body);
        let r = app
            .post_raw(
                body,
                &[
                    ("content-type", "application/json"),
                    ("x-webhook-signature", &sig),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{secret}");
    }
}

async fn sha256_prefix_is_accepted(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let body = serde_json::to_vec(&event("b", "prefixed")).expect("json");
    let sig = format!("sha256={}", sign_hex(SECRET, &body));
    let r = app
        .post_raw(
            body,
            &[
                ("content-type", "application/json"),
                ("x-webhook-signature", &sig),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
}

async fn basic_credentials_are_accepted_and_wrong_ones_are_401(b: Backend) {
    let app = spawn_app_on(b, |c| {
        c.ingress.signing_secrets.clear();
        c.ingress.basic = Some(cogrelay::config::BasicCredentials {
            user: "cognigy".into(),
            password: Secret::new("pw-1"),
        });
    })
    .await;
    let b64 = |s: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    };
    let body = serde_json::to_vec(&event("b", "basic")).expect("json");
    let ok = app
        .post_raw(
            body.clone(),
            &[
                ("content-type", "application/json"),
                ("authorization", &b64("cognigy:pw-1")),
            ],
        )
        .await;
    assert_eq!(ok.status, 200);
    let bad = app
        .post_raw(
            body,
            &[
                ("content-type", "application/json"),
                ("authorization", &b64("cognigy:nope")),
            ],
        )
        .await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.json["error"], "Invalid credentials");
}

async fn oversized_body_is_413_by_declared_length_and_by_stream(b: Backend) {
    let app = spawn_app_on(b, |c| c.ingress.max_body_bytes = 1024).await;
    let mut e = event("b", "big");
    e["payload"] = json!({ "blob": "x".repeat(2000) });
    let r = app.post_event(&e).await;
    assert_eq!(r.status, 413);

    // Chunked (no Content-Length): the limit applies while reading.
    let body = serde_json::to_vec(&e).expect("json");
    let sig = sign_hex(SECRET, &body);
    let stream = futures_stream(body);
    let r = app
        .http
        .post(app.url())
        .header("content-type", "application/json")
        .header("x-webhook-signature", sig)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413);
    assert_eq!(total_jobs(&app).await, 0);
}

async fn non_json_content_type_is_415(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let body = serde_json::to_vec(&event("b", "ct")).expect("json");
    let sig = sign_hex(SECRET, &body);
    let r = app
        .post_raw(
            body.clone(),
            &[
                ("content-type", "text/plain"),
                ("x-webhook-signature", &sig),
            ],
        )
        .await;
    assert_eq!(r.status, 415);
    let r = app
        .post_raw(body.clone(), &[("x-webhook-signature", &sig)])
        .await;
    assert_eq!(r.status, 415, "missing content type");
    // A body sent compressed is not the JSON the signature covers as sent:
    // refused, not read as text (400 "not UTF-8") nor taken as it is (a
    // `br` label on a plain body was accepted).
    for encoding in ["gzip", "br", "identity, gzip"] {
        let r = app
            .post_raw(
                body.clone(),
                &[
                    ("content-type", "application/json"),
                    ("content-encoding", encoding),
                    ("x-webhook-signature", &sig),
                ],
            )
            .await;
        assert_eq!(r.status, 415, "{encoding}: {}", r.json);
        assert!(
            r.json["error"]
                .as_str()
                .is_some_and(|e| e.contains("Content-Encoding")),
            "{}",
            r.json
        );
    }
    let r = app
        .post_raw(
            body.clone(),
            &[
                ("content-type", "application/json"),
                ("content-encoding", "identity"),
                ("x-webhook-signature", &sig),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "identity is no encoding");
    assert_eq!(total_jobs(&app).await, 1, "refused ones are not stored");
    let body = serde_json::to_vec(&event("b", "ct-2")).expect("json");
    let sig = sign_hex(SECRET, &body);
    let r = app
        .post_raw(
            body,
            &[
                ("content-type", "application/json; charset=utf-8"),
                ("x-webhook-signature", &sig),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "parameters are fine");
}

async fn duplicate_event_returns_the_first_job_and_is_delivered_once(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let first = app.post_event(&event("b", "dup")).await;
    assert_eq!(first.json["status"], "accepted");
    let second = app.post_event(&event("b", "dup")).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.json["status"], "duplicate");
    assert_eq!(second.json["jobId"], first.json["jobId"]);

    let id = first.json["jobId"].as_str().expect("id");
    app.wait_job(id, "completed", WAIT).await;
    let third = app.post_event(&event("b", "dup")).await;
    assert_eq!(
        third.json["status"], "duplicate",
        "still a duplicate after delivery"
    );
    assert_eq!(app.sink.count(), 1, "delivered once");
    assert_eq!(total_jobs(&app).await, 1);
    // Counted apart (they were only 200s in the ingress's count).
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("cogrelay_events_duplicate_total 2"),
        "{metrics}"
    );
}

async fn unknown_routes_and_methods_answer_json(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let r = app
        .http
        .get(format!("http://{}/nope", app.ingress))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    let r = app.http.get(app.url()).send().await.expect("send");
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST,HEAD");
    let body: serde_json::Value = r.json().await.expect("a JSON body");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(msg.contains("POST /api/webhook/cognigy"), "{body}");
}

async fn head_on_the_ingress_answers_200_for_pre_flight_checks(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    let r = app.http.head(app.url()).send().await.expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(total_jobs(&app).await, 0);
}

/// Regression guard: pruning a completed job must not forget its event key,
/// or a resend within DEDUP_TTL_SECS would be delivered twice.
async fn dedup_outlives_the_pruned_job(b: Backend) {
    let app = spawn_app_on(b, |c| c.store.retention.remove_on_complete = 0).await;
    let first = app.post_event(&event("b", "pruned")).await;
    let id = first.json["jobId"].as_str().expect("id").to_string();
    assert!(app.sink.wait_for(1, Duration::from_secs(10)).await);
    // Wait until the completed job is gone (pruned).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app.admin_get(&format!("/admin/jobs/{id}")).await.status != 404 {
        assert!(std::time::Instant::now() < deadline, "never pruned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = app.post_event(&event("b", "pruned")).await;
    assert_eq!(again.json["status"], "duplicate", "{}", again.json);
    assert_eq!(again.json["jobId"], id.as_str());
    app.wait_settled(WAIT).await;
    assert_eq!(app.sink.count(), 1);
}
}

/// Slow clients (slowloris): headers that never finish are cut off, a body that
/// never finishes gets 408, and other clients are served meanwhile.
#[tokio::test]
async fn slow_headers_and_slow_bodies_are_cut_off_without_starving_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(|c| c.ingress.request_read_timeout = Duration::from_millis(300)).await;

    let mut slow_headers = tokio::net::TcpStream::connect(app.ingress)
        .await
        .expect("connect");
    slow_headers
        .write_all(b"POST /api/webhook/cognigy HTTP/1.1\r\nHost: relay\r\n")
        .await
        .expect("write");
    let mut slow_body = tokio::net::TcpStream::connect(app.ingress)
        .await
        .expect("connect");
    slow_body
        .write_all(b"POST /api/webhook/cognigy HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nX-Webhook-Signature: 00\r\nContent-Length: 100\r\n\r\n{\"botId\":")
        .await
        .expect("write");

    assert_eq!(
        app.post_event(&event("b", "while-slow")).await.status,
        200,
        "others are served"
    );

    let t0 = std::time::Instant::now();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), slow_headers.read(&mut buf))
        .await
        .expect("slow headers cut off in time")
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        n == 0 || answer.starts_with("HTTP/1.1 408"),
        "closed or 408: {answer}"
    );
    assert!(t0.elapsed() < Duration::from_secs(3));

    let n = tokio::time::timeout(Duration::from_secs(5), slow_body.read(&mut buf))
        .await
        .expect("slow body answered in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(
        total_jobs(&app).await,
        1,
        "nothing stored from the slow clients"
    );

    // The admin port too: headers that never finish, and a connection that
    // says nothing, are cut off (they stayed open for ever: anyone who can
    // reach a non-loopback ADMIN_LISTEN could hold the relay's files).
    let mut slow_admin = tokio::net::TcpStream::connect(app.admin)
        .await
        .expect("connect");
    slow_admin
        .write_all(b"GET /admin/queue HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .expect("write");
    let mut idle_admin = tokio::net::TcpStream::connect(app.admin)
        .await
        .expect("connect");
    assert_eq!(app.admin_get("/admin/queue").await.status, 200, "others");
    for (what, tcp) in [("slow", &mut slow_admin), ("idle", &mut idle_admin)] {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what} admin connection cut off in time"))
            .unwrap_or(0);
        let answer = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(
            n == 0 || answer.starts_with("HTTP/1.1 408"),
            "{what}: closed or 408: {answer}"
        );
    }
}

/// Per-source rate limit (off by default): a noisy client gets 429 with
/// Retry-After, and what it sends over the limit is not stored.
#[tokio::test]
async fn a_noisy_source_is_rate_limited() {
    let app = spawn_app_with(|c| c.ingress.rate_limit = Some((2.0, 3))).await;
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = app.post_event(&event("b", &format!("noisy-{i}"))).await;
        if r.status == 429 {
            assert!(r.headers.get("retry-after").is_some());
        }
        statuses.push(r.status);
    }
    assert_eq!(&statuses[..3], [200, 200, 200], "the burst");
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(total_jobs(&app).await, 3, "nothing over the limit stored");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        app.post_event(&event("b", "after-refill")).await.status,
        200
    );
}

/// A sender that writes its whole body before it reads hears a refusal
/// given at the headers (415 for the type or the coding, 429 over the rate
/// limit, with its `Retry-After`), not a connection closed under its
/// writes: the relay reads the body for a moment and throws it away.
#[tokio::test]
async fn refusals_at_the_headers_reach_a_sender_that_writes_its_whole_body_first() {
    // Two requests' worth of burst, refilled once in 100 s.
    let app = spawn_app_with(|c| c.ingress.rate_limit = Some((0.01, 2))).await;
    let sig = format!("X-Webhook-Signature: {}\r\n", "0".repeat(64));
    for (headers, status) in [
        (format!("Content-Type: text/plain\r\n{sig}"), "415"),
        (
            format!("Content-Type: application/json\r\nContent-Encoding: gzip\r\n{sig}"),
            "415",
        ),
        (format!("Content-Type: application/json\r\n{sig}"), "429"),
    ] {
        let answer = answer_after_a_whole_body(app.ingress, &headers).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{headers:?}: {answer:?}"
        );
        if status == "429" {
            assert!(answer.contains("retry-after: "), "{answer:?}");
        }
    }
    assert_eq!(total_jobs(&app).await, 0);
}

/// Hostile bodies within the size limit: deep nesting, a huge id string,
/// invalid UTF-8: each a 400, nothing stored.
#[tokio::test]
async fn hostile_bodies_get_400_and_store_nothing() {
    let app = spawn_app().await;
    let deep = format!(
        r#"{{"botId":"b","eventId":"deep","type":"t","payload":{}{}}}"#,
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let huge = format!(
        r#"{{"botId":"{}","eventId":"e","type":"t"}}"#,
        "x".repeat(900_000)
    );
    let mut utf8 = br#"{"botId":"b","eventId":"bad-"#.to_vec();
    utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    utf8.extend_from_slice(br#"","type":"t"}"#);
    for (name, body) in [
        ("deep", deep.into_bytes()),
        ("huge id", huge.into_bytes()),
        ("invalid utf-8", utf8),
    ] {
        let r = app.post_signed(body).await;
        assert_eq!(r.status, 400, "{name}: {}", r.json);
        assert!(r.json["error"].is_string(), "{name}");
    }
    assert_eq!(total_jobs(&app).await, 0);
}
