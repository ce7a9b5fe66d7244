//! The floor: the least work a durable relay can do per event, to measure
//! beside `cogrelay serve` under the same load (docs/benchmark.md, "The
//! floor"). Per event it receives one request, checks its HMAC, checks that
//! the body is JSON, appends it to a log and answers 200 only once the log is
//! on disk (one `write` and one `fdatasync` per group of events), then posts
//! it to the target with the relay's own lean client and appends the result
//! (on disk with the next group).
//!
//! It is not a relay: on a restart it forgets its log, and it keeps no
//! dedup record, no routing, no metrics, no logs and no admin surface. A
//! failed delivery is sent again a second later, from memory. What a relay
//! needs beyond this is what `cogrelay serve` costs more than the floor.
//!
//! It reads the variables `bench/instructions.sh` and `bench run` give
//! `cogrelay serve`, so either runs it in the relay's place:
//!
//! ```sh
//! cargo build --release --example floor --example bench
//! bench/instructions.sh target/release/cogrelay target/release/examples/floor
//! target/release/examples/bench run --relay-bin target/release/examples/floor --only embedded
//! ```
//!
//! `PORT`, `TARGET_ENDPOINT`, `WEBHOOK_SIGNING_SECRET` and
//! `COGRELAY_DATA_DIR` (the log's directory) are needed; `CONCURRENCY`
//! (deliveries at once, 16 unless set) and `ADMIN_LISTEN` (where `/readyz`
//! answers 200) are read if set. Its arguments are ignored (`serve` is
//! accepted as the relay's is).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cogrelay::delivery::target::Target;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Mutex};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A body over this is refused, as the relay's default `MAX_BODY_BYTES`.
const MAX_BODY: usize = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(15);

/// A log record and, for an event, who waits until it is on disk.
struct Append {
    record: Vec<u8>,
    durable: Option<oneshot::Sender<()>>,
}

struct Floor {
    key: ring::hmac::Key,
    log: std_mpsc::Sender<Append>,
    next_id: AtomicU64,
    deliveries: mpsc::UnboundedSender<(u64, Bytes)>,
}

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set"))
}

fn main() -> anyhow::Result<()> {
    let port: u16 = var("PORT")?.parse().context("PORT")?;
    let target: reqwest::Url = var("TARGET_ENDPOINT")?.parse().context("TARGET_ENDPOINT")?;
    let secret = var("WEBHOOK_SIGNING_SECRET")?;
    let dir = std::path::PathBuf::from(var("COGRELAY_DATA_DIR")?);
    let concurrency: usize = std::env::var("CONCURRENCY").map_or(Ok(16), |c| c.parse())?;
    std::fs::create_dir_all(&dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("floor.log"))?;
    let (log, rx) = std_mpsc::channel();
    std::thread::Builder::new()
        .name("floor-log".into())
        .spawn(move || write_log(file, rx))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (deliveries, queue) = mpsc::unbounded_channel();
        let floor = Arc::new(Floor {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()),
            log,
            next_id: AtomicU64::new(1),
            deliveries,
        });
        let target = Arc::new(Target::new(&target, concurrency, TIMEOUT)?);
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..concurrency.max(1) {
            tokio::spawn(deliver(floor.clone(), target.clone(), queue.clone()));
        }
        if let Ok(admin) = std::env::var("ADMIN_LISTEN") {
            let admin = TcpListener::bind(admin.as_str()).await?;
            tokio::spawn(serve(admin, |_| async { reply(StatusCode::OK, "{}") }));
        }
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        serve(listener, move |req| ingest(floor.clone(), req)).await;
        Ok(())
    })
}

/// The log's writer: whatever came in while the last group was written is
/// the next group, written and synced at once.
fn write_log(mut file: std::fs::File, rx: std_mpsc::Receiver<Append>) {
    let mut buf = Vec::new();
    let mut waiting = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(a) = next {
            buf.extend_from_slice(&a.record);
            waiting.extend(a.durable);
            next = rx.try_recv().ok();
        }
        if let Err(e) = file.write_all(&buf).and_then(|()| file.sync_data()) {
            eprintln!("floor: the log cannot be written: {e}");
            std::process::exit(1);
        }
        buf.clear();
        for w in waiting.drain(..) {
            let _ = w.send(());
        }
    }
}

/// A record: its kind (`e` an event, `d` a delivery), the event's id, the
/// body's length and the body.
fn record(kind: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(13 + body.len());
    r.push(kind);
    r.extend_from_slice(&id.to_le_bytes());
    r.extend_from_slice(&(body.len() as u32).to_le_bytes());
    r.extend_from_slice(body);
    r
}

async fn serve<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let answer = handle(req);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn ingest(floor: Arc<Floor>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, r#"{"error":"POST only"}"#);
    }
    let signature = req
        .headers()
        .get("x-webhook-signature")
        .and_then(|v| hex::decode(v.as_bytes()).ok());
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, r#"{"error":"body"}"#),
    };
    if signature.is_none_or(|s| ring::hmac::verify(&floor.key, &body, &s).is_err()) {
        return reply(StatusCode::UNAUTHORIZED, r#"{"error":"signature"}"#);
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        return reply(StatusCode::BAD_REQUEST, r#"{"error":"not JSON"}"#);
    }
    let id = floor.next_id.fetch_add(1, Ordering::Relaxed);
    let (durable, on_disk) = oneshot::channel();
    let append = Append {
        record: record(b'e', id, &body),
        durable: Some(durable),
    };
    if floor.log.send(append).is_err() || on_disk.await.is_err() {
        return reply(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"log"}"#);
    }
    let _ = floor.deliveries.send((id, body));
    reply(StatusCode::OK, r#"{"status":"queued"}"#)
}

/// One of `CONCURRENCY` delivery loops: the next event, posted; the result
/// appended to the log; a failure sent again a second later.
async fn deliver(
    floor: Arc<Floor>,
    target: Arc<Target>,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<(u64, Bytes)>>>,
) {
    loop {
        let Some((id, body)) = queue.lock().await.recv().await else {
            return;
        };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let sent = target.post(headers, body.to_vec(), TIMEOUT).await;
        if sent.is_ok_and(|a| (200..300).contains(&a.status)) {
            let _ = floor.log.send(Append {
                record: record(b'd', id, &[]),
                durable: None,
            });
        } else {
            let again = floor.deliveries.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = again.send((id, body));
            });
        }
    }
}
