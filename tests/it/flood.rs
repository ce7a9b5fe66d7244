//! The public endpoint under a flood: memory before authentication stays
//! bounded, signed events still get in, and running out of file descriptors
//! pauses `accept` instead of spinning on it. The real binary, so that its
//! RSS and CPU time are the relay's own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::AsyncWriteExt;

use crate::helpers::*;
use crate::process::{post, start_relay_limited, start_relay_logged};

const MIB: u64 = 1024 * 1024;

/// The process's resident set, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// A connection that sends an unsigned body of `len` bytes but its last byte,
/// then holds. Small send buffer: the kernel holds little for it.
async fn hold_a_body(port: u16, len: usize, body: Arc<Vec<u8>>, written: Arc<AtomicUsize>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    let _ = socket.set_send_buffer_size(64 * 1024);
    let Ok(mut tcp) = socket.connect(([127, 0, 0, 1], port).into()).await else {
        return;
    };
    let head = format!(
        "POST /api/webhook/cognigy HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nX-Webhook-Signature: 00\r\nContent-Length: {len}\r\n\r\n"
    );
    if tcp.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    written.fetch_add(1, Ordering::Relaxed);
    // Until the relay answers (503 or 408) and closes, or the test drops us.
    let _ = tcp.write_all(&body[..len - 1]).await;
    let mut rest = [0u8; 256];
    let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut rest).await;
}

#[tokio::test]
async fn a_flood_of_unsigned_bodies_keeps_memory_bounded_and_signed_events_get_in() {
    const CONNECTIONS: usize = 2000;
    const MAX_BODY: usize = 1024 * 1024;
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    let (relay, logs) = start_relay_logged(dir.path(), &sink, &[]).await;
    let pid = relay.child.id().expect("pid");
    let http = reqwest::Client::new();
    assert_eq!(post(&http, relay.port, "warm-up").await, Some(200));
    let base = rss_bytes(pid);

    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                peak.fetch_max(rss_bytes(pid) as usize, Ordering::Relaxed);
            }
        })
    };
    let body = Arc::new(vec![b' '; MAX_BODY]);
    let written = Arc::new(AtomicUsize::new(0));
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        flood.spawn(hold_a_body(
            relay.port,
            MAX_BODY,
            body.clone(),
            written.clone(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while written.load(Ordering::Relaxed) < CONNECTIONS {
        assert!(
            Instant::now() < deadline,
            "only {} connections opened",
            written.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Signed events during the flood: each one answered 200 within a second.
    let mut slowest = Duration::ZERO;
    let mut pace = tokio::time::interval(Duration::from_millis(200));
    for i in 0..10 {
        pace.tick().await;
        let t0 = Instant::now();
        let status = post(&http, relay.port, &format!("during-flood-{i}")).await;
        slowest = slowest.max(t0.elapsed());
        assert_eq!(status, Some(200), "signed event {i} during the flood");
    }
    assert!(
        slowest < Duration::from_secs(1),
        "a signed event took {slowest:?}"
    );
    let peak_rss = peak.load(Ordering::Relaxed) as u64;
    eprintln!(
        "flood: rss {} MB before, peak {} MB with {CONNECTIONS} connections; slowest signed event {slowest:?}",
        base / MIB,
        peak_rss / MIB
    );
    assert!(peak_rss < 256 * MIB, "peak RSS {} MB", peak_rss / MIB);
    assert!(
        peak_rss > base + 32 * MIB,
        "the flood reached the relay (peak {} MB, base {} MB)",
        peak_rss / MIB,
        base / MIB
    );

    // After the flood the memory is given back.
    flood.abort_all();
    while flood.join_next().await.is_some() {}
    sampler.abort();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rss = rss_bytes(pid);
        if rss < 64 * MIB {
            eprintln!("flood: rss {} MB after", rss / MIB);
            break;
        }
        let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        assert!(
            Instant::now() < deadline,
            "RSS still {} MB after the flood ({} open files)",
            rss / MIB,
            fds()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(post(&http, relay.port, "after-flood").await, Some(200));
    // The bodies refused for want of room are logged, with the budget.
    let refused = logs.lock().expect("logs").lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["kind"] == "body_budget").then_some(v)
    });
    let refused = refused.expect("a body_budget refusal logged");
    assert_eq!(refused["status"], 503, "{refused}");
    assert!(
        refused["hint"]
            .as_str()
            .is_some_and(|h| h.contains("share 64 MiB")),
        "{refused}"
    );
    assert!(
        sink.wait_for(12, Duration::from_secs(20)).await,
        "every signed event delivered"
    );
}

/// A connection that claims a 1 MiB body and sends its first byte, with
/// `auth` headers; the relay's answer (its first bytes), once it comes.
async fn claim_a_body(port: u16, auth: &str, sent: Arc<AtomicUsize>) -> String {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let head = format!(
        "POST /api/webhook/cognigy HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n{auth}Content-Length: {MIB}\r\n\r\n "
    );
    tcp.write_all(head.as_bytes()).await.expect("write");
    sent.fetch_add(1, Ordering::Relaxed);
    status_line(&mut tcp).await
}

/// Senders without credentials are refused at their headers, before their
/// bodies: a hundred connections that claim 1 MiB bodies (the budget is 64
/// MiB) with no credentials or wrong Basic ones and send one byte hold none
/// of the budget, so a 100 KB event with the right credentials sent
/// meanwhile is accepted (503 when each held its share until its body
/// timed out), and each of them is answered 401 once the relay gave up
/// waiting for the body it throws away (408 then). A sender that writes its
/// whole body before it reads hears the 401 too (its writes failed when
/// the relay answered at the headers and closed the connection), and one
/// that waits with `Expect: 100-continue` is not asked for its body.
#[tokio::test]
async fn senders_without_credentials_are_refused_before_their_bodies() {
    const CONNECTIONS: usize = 100;
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    let basic = ("cognigy", "endpoint-pw");
    let envs = [
        ("INGRESS_BASIC_USER", basic.0.to_string()),
        ("INGRESS_BASIC_PASSWORD", basic.1.to_string()),
        ("REQUEST_READ_TIMEOUT_MS", "60000".to_string()),
    ];
    let relay = crate::process::start_relay(dir.path(), &sink, &envs).await;
    let wrong = base64::engine::general_purpose::STANDARD.encode("cognigy:guess");
    let sent = Arc::new(AtomicUsize::new(0));
    let mut claims = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let auth = if i % 2 == 0 {
            String::new()
        } else {
            format!("Authorization: Basic {wrong}\r\n")
        };
        let (port, sent) = (relay.port, sent.clone());
        claims.spawn(async move { claim_a_body(port, &auth, sent).await });
    }
    wait_until(
        "every claim's headers sent",
        Duration::from_secs(30),
        || {
            let sent = sent.clone();
            async move { sent.load(Ordering::Relaxed) >= CONNECTIONS }
        },
    )
    .await;
    let mut big = event("bot", "large-with-credentials");
    big["payload"]["padding"] = serde_json::json!("x".repeat(100_000));
    let status = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/api/webhook/cognigy",
            relay.port
        ))
        .basic_auth(basic.0, Some(basic.1))
        .json(&big)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("answered")
        .status();
    assert_eq!(
        status, 200,
        "a large event with credentials during the claims"
    );
    let answers = tokio::time::timeout(Duration::from_secs(30), claims.join_all())
        .await
        .expect("every claim answered");
    for answer in answers {
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
    }
    let head = format!("Content-Type: application/json\r\nAuthorization: Basic {wrong}\r\n");
    let answer = answer_after_a_whole_body(([127, 0, 0, 1], relay.port).into(), &head).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", relay.port))
        .await
        .expect("connect");
    let head = format!(
        "POST /api/webhook/cognigy HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nAuthorization: Basic {wrong}\r\nExpect: 100-continue\r\nContent-Length: {MIB}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.expect("headers");
    let answer = tokio::time::timeout(Duration::from_secs(10), status_line(&mut tcp))
        .await
        .expect("answered");
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "not asked for the body: {answer:?}"
    );
    assert!(sink.wait_for(1, Duration::from_secs(20)).await, "delivered");
}

/// Out of file descriptors, `accept` fails at once while connections wait in
/// the backlog; the relay pauses (10 ms doubling to 1 s) instead of spinning,
/// says so once, and accepts again when descriptors are free.
#[tokio::test]
async fn out_of_file_descriptors_the_relay_pauses_accept_and_recovers() {
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start().await.expect("sink");
    let (relay, logs) = start_relay_limited(dir.path(), &sink, 64).await;
    let mut held = Vec::new();
    let t0 = Instant::now();
    for _ in 0..120 {
        if let Ok(c) = tokio::net::TcpStream::connect(("127.0.0.1", relay.port)).await {
            held.push(c);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !logs
        .lock()
        .expect("logs")
        .contains("cannot accept connections")
    {
        assert!(
            Instant::now() < deadline,
            "no line about the exhausted descriptors"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stay out of descriptors for a while, then give them back.
    let mut pace = tokio::time::interval(Duration::from_secs(2));
    pace.tick().await;
    pace.tick().await;
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = loop {
        let text = logs.lock().expect("logs").clone();
        if let Some(l) = text
            .lines()
            .find(|l| l.contains("accepting connections again"))
        {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "never accepted again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let episode = t0.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
    let failed = v["failed_accepts"].as_u64().expect("failed_accepts");
    // Pauses 10, 20, ... 640 ms then 1 s each: at most 7 + one per second.
    assert!(
        (failed as f64) <= 8.0 + episode,
        "{failed} failed accepts in {episode:.1} s: the loop spun"
    );
    let http = reqwest::Client::new();
    assert_eq!(post(&http, relay.port, "after-exhaustion").await, Some(200));
}
