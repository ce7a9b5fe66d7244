//! Throughput benchmark: signed ~300-byte events at N keep-alive connections.
//!
//! `cargo run --release --example bench -- run` (or `bench/run.sh`, which also
//! prepares the seed's Node relay). In one run it measures, against the same
//! load generator on the same machine:
//!
//! * the ceiling: a minimal hyper server answering 200;
//! * `cogrelay serve` on the embedded queue (every 200 fsync'd), delivering to a
//!   fast local target in this process: ingest req/s, ack p50/p99, end-to-end
//!   delivered/s (first request sent to last delivery received), peak RSS;
//! * optionally the seed's relay (`--seed-dir`, Node + Bull on a private
//!   `redis-server`), with the same measures.
//!
//! Results are printed as a Markdown table with ratios to the ceiling and the seed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use cogrelay::ingress::auth::sign_hex;
use cogrelay::sink::{content_length, Sink};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "bench-secret";
/// Where events are posted.
const PATH: &str = "/api/webhook/cognigy";
/// The relays' QUEUE_NAME (their default).
const QUEUE: &str = "cognigy-webhook-retries";

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A minimal hyper server answering 200 to everything (the ceiling).
    Ceiling {
        #[arg(long)]
        port: u16,
    },
    /// Only the load generator, against a running relay (for experiments).
    Load {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "20000")]
        events: usize,
        #[arg(long, default_value = "32")]
        connections: usize,
    },
    /// Cost of the ingress signature check: right signature vs wrong ones
    /// (first byte wrong, last byte wrong, wrong length), in ns per check.
    /// A constant-time check costs the same for all of them.
    Sigcheck {
        #[arg(long, default_value = "200000")]
        iterations: u32,
    },
    /// CPU per delivery request of the relay's lean target client vs a
    /// reqwest client set up as the relay used to, both posting 300 bytes to
    /// a local sink from 16 tasks, in this process on one thread (the sink's
    /// share is the same in both).
    Client {
        #[arg(long, default_value = "100000")]
        requests: usize,
    },
    /// Run the comparison.
    Run {
        #[arg(long, default_value = "20000")]
        events: usize,
        #[arg(long, default_value = "32")]
        connections: usize,
        /// The cogrelay binary to measure.
        #[arg(long, default_value = "target/release/cogrelay")]
        relay_bin: PathBuf,
        /// A copy of the seed relay with node_modules installed; skipped if absent.
        #[arg(long)]
        seed_dir: Option<PathBuf>,
        /// CONCURRENCY for the relays.
        #[arg(long, default_value = "16")]
        concurrency: usize,
        /// Which scenarios to run, comma-separated: embedded, redis1, redis3,
        /// seed, and drain (not by default: one Redis relay delivering a
        /// backlog taken while the queue was paused). The ceiling always runs
        /// (it is the reference).
        #[arg(
            long,
            default_value = "embedded,redis1,redis3,seed",
            value_delimiter = ','
        )]
        only: Vec<String>,
        /// Runs everything this many times; with more than one, also prints
        /// each figure's median over the rounds (runs on a shared machine
        /// vary by about 10%, the seed relay's more).
        #[arg(long, default_value = "1")]
        rounds: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.cmd {
        Cmd::Ceiling { port } => rt.block_on(ceiling(port)),
        Cmd::Sigcheck { iterations } => {
            sigcheck(iterations);
            Ok(())
        }
        Cmd::Client { requests } => {
            let one = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            one.block_on(client_cost(requests))
        }
        Cmd::Load {
            port,
            events,
            connections,
        } => rt.block_on(async {
            let reqs = requests(PATH, events);
            let l = load(([127, 0, 0, 1], port).into(), &reqs, connections).await?;
            println!(
                "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, non-200 {}, errors {}",
                l.rps(),
                l.p50_ms,
                l.p99_ms,
                l.other,
                l.errors
            );
            Ok(())
        }),
        Cmd::Run {
            events,
            connections,
            relay_bin,
            seed_dir,
            concurrency,
            only,
            rounds,
        } => rt.block_on(async {
            let mut all = Vec::new();
            for round in 1..=rounds.max(1) {
                let rows = run(
                    events,
                    connections,
                    &relay_bin,
                    seed_dir.as_deref(),
                    concurrency,
                    &only,
                )
                .await?;
                let lines: Vec<Line> = rows.iter().map(Line::from).collect();
                print_table(&format!("round {round} of {rounds}"), &lines);
                all.push(lines);
            }
            if all.len() > 1 {
                print_table(&format!("median of {} rounds", all.len()), &medians(&all));
            }
            println!("\n{events} signed ~300-byte events, {connections} keep-alive connections, load generator on the same cores");
            Ok(())
        }),
    }
}

async fn client_cost(requests: usize) -> anyhow::Result<()> {
    use cogrelay::delivery::target::Target;
    let sink = Sink::start().await?;
    sink.count_only();
    let url = reqwest::Url::parse(&sink.url())?;
    let timeout = Duration::from_secs(10);
    let lean = Arc::new(Target::new(&url, 16, timeout)?);
    let reqwest = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(16)
        .build()?;
    let headers = || {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("content-type", "application/json".parse().expect("value"));
        h.insert("x-event-id", "bench-event".parse().expect("value"));
        h
    };
    for round in 1..=2 {
        for name in ["lean", "reqwest"] {
            let next = Arc::new(AtomicUsize::new(0));
            let (cpu0, t0) = (own_cpu_s(), Instant::now());
            let mut tasks = Vec::new();
            for _ in 0..16 {
                let (next, lean, reqwest, url) =
                    (next.clone(), lean.clone(), reqwest.clone(), url.clone());
                let h = headers();
                tasks.push(tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < requests {
                        let body = vec![b'x'; 300];
                        let ok = if name == "lean" {
                            lean.post(h.clone(), body, timeout).await.is_ok()
                        } else {
                            match reqwest
                                .post(url.clone())
                                .timeout(timeout)
                                .headers(h.clone())
                                .body(body)
                                .send()
                                .await
                            {
                                Ok(r) => r.bytes().await.is_ok(),
                                Err(_) => false,
                            }
                        };
                        anyhow::ensure!(ok, "a request failed");
                    }
                    Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            println!(
                "round {round}, {name}: {:.1} µs CPU per request (client + sink), {:.0} req/s",
                (own_cpu_s() - cpu0) * 1e6 / requests as f64,
                requests as f64 / t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn sigcheck(iterations: u32) {
    use axum::http::{HeaderMap, HeaderValue};
    use cogrelay::ingress::auth::{Authenticator, SIGNATURE_HEADER};
    let auth = Authenticator::new(&[cogrelay::secret::Secret::new(SECRET)], None);
    let payload = body("sig", 1);
    let right = sign_hex(SECRET, &payload);
    let flip = |i: usize| {
        let mut b = right.clone().into_bytes();
        b[i] = if b[i] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap_or_default()
    };
    let cases = [
        ("right", right.clone()),
        ("first byte wrong", flip(0)),
        ("last byte wrong", flip(right.len() - 1)),
        ("too short", right[..32].to_string()),
    ];
    let mut results = Vec::new();
    for (name, sig) in &cases {
        let mut h = HeaderMap::new();
        h.insert(
            SIGNATURE_HEADER,
            HeaderValue::from_str(sig).unwrap_or(HeaderValue::from_static("x")),
        );
        // Warm up, then measure.
        for _ in 0..1000 {
            let _ = std::hint::black_box(auth.check(&h, &payload));
        }
        let t = Instant::now();
        for _ in 0..iterations {
            let _ = std::hint::black_box(
                auth.check(std::hint::black_box(&h), std::hint::black_box(&payload)),
            );
        }
        results.push((*name, t.elapsed().as_nanos() as f64 / f64::from(iterations)));
    }
    let base = results[0].1;
    println!("| signature | ns per check | vs right |\n|---|---|---|");
    for (name, ns) in results {
        println!("| {name} | {ns:.0} | {:.3} |", ns / base);
    }
}

async fn ceiling(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"{}"),
                    )))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[derive(Debug, Default, Clone)]
struct Load {
    sent: usize,
    ok: usize,
    other: usize,
    errors: usize,
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
}

impl Load {
    fn rps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }
}

/// Conversations the events belong to, round robin (each one's events are
/// the key of an ordered destination).
const SESSIONS: usize = 1000;

fn body(run: &str, i: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"botId":"bench-bot","eventId":"{run}-{i}","type":"message.received","timestamp":"{ts}","payload":{{"sessionId":"s-{s}","text":""#,
        s = i % SESSIONS,
        ts = cogrelay::time::rfc3339(cogrelay::queue::now_ms())
    );
    let pad = 300usize.saturating_sub(head.len() + 3);
    format!("{head}{}\"}}}}", "x".repeat(pad)).into_bytes()
}

/// The load's requests, built and signed before the clock starts: during the
/// run the load generator spends its CPU on the sockets alone (it shares the
/// cores with what it measures).
fn requests(path: &str, n: usize) -> Arc<Vec<Bytes>> {
    let run = format!("r{:08x}", fastrand::u32(..));
    let all = (0..n)
        .map(|i| {
            let b = body(&run, i);
            let mut r = format!(
                "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\nx-webhook-signature: {}\r\ncontent-length: {}\r\n\r\n",
                sign_hex(SECRET, &b),
                b.len()
            )
            .into_bytes();
            r.extend_from_slice(&b);
            Bytes::from(r)
        })
        .collect();
    Arc::new(all)
}

/// Closed-loop load: `connections` keep-alive connections share the requests.
async fn load(
    addr: SocketAddr,
    reqs: &Arc<Vec<Bytes>>,
    connections: usize,
) -> anyhow::Result<Load> {
    load_spread(&[addr], reqs, connections).await
}

/// Like [`load`], with the connections spread round-robin over `addrs`. Raw
/// HTTP/1.1 on TCP: write a prepared request, read the answer's head and its
/// `content-length` body. A broken connection counts an error and is opened again.
async fn load_spread(
    addrs: &[SocketAddr],
    reqs: &Arc<Vec<Bytes>>,
    connections: usize,
) -> anyhow::Result<Load> {
    let n = reqs.len();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let addr = addrs[c % addrs.len()];
        let (next, reqs) = (next.clone(), reqs.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n / connections + 1);
            let (mut ok, mut other, mut errors) = (0, 0, 0);
            let mut stream = connect(addr).await?;
            let mut buf = Vec::with_capacity(4096);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                let answer = match stream.write_all(&reqs[i]).await {
                    Ok(()) => read_status(&mut stream, &mut buf).await,
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(status) => {
                        lat.push(t.elapsed().as_micros() as u64);
                        if status == 200 {
                            ok += 1
                        } else {
                            other += 1
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        buf.clear();
                        stream = connect(addr).await?;
                    }
                }
            }
            Ok::<_, anyhow::Error>((lat, ok, other, errors))
        }));
    }
    let mut all = Vec::with_capacity(n);
    let mut out = Load::default();
    for t in tasks {
        let (lat, ok, other, errors) = t.await??;
        all.extend(lat);
        out.ok += ok;
        out.other += other;
        out.errors += errors;
    }
    out.elapsed = start.elapsed();
    out.sent = all.len();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    out.p50_ms = pct(0.50);
    out.p99_ms = pct(0.99);
    Ok(out)
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads one HTTP/1.1 answer from `stream` (bytes beyond it stay in `buf`) and
/// returns its status. Only `content-length` bodies: what every server measured
/// here sends.
async fn read_status(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = resp.parse(buf).map_err(|_| bad("bad answer"))? {
            let status = resp.code.unwrap_or(0);
            let length =
                content_length(resp.headers).ok_or_else(|| bad("answer without content-length"))?;
            while buf.len() < head + length {
                if stream.read_buf(buf).await? == 0 {
                    return Err(bad("closed mid-answer"));
                }
            }
            buf.drain(..head + length);
            return Ok(status);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(bad("closed"));
        }
    }
}

/// `cogrelay serve` on `port`, delivering to `sink`, quiet (warnings only).
fn relay(
    bin: &std::path::Path,
    port: u16,
    admin: u16,
    sink: &Sink,
    data: &std::path::Path,
    concurrency: usize,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .env_clear()
        .env("PORT", port.to_string())
        .env("ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("TARGET_ENDPOINT", sink.url())
        .env("WEBHOOK_SIGNING_SECRET", SECRET)
        .env("COGRELAY_DATA_DIR", data)
        .env("CONCURRENCY", concurrency.to_string())
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    // For experiments: the relay's thread settings, how many completed
    // jobs it keeps and whether it syncs, if set for the bench.
    for var in [
        "DELIVERY_NICE",
        "TOKIO_WORKER_THREADS",
        "REMOVE_ON_COMPLETE",
        "COGRELAY_FSYNC",
    ] {
        if let Ok(v) = std::env::var(var) {
            cmd.env(var, v);
        }
    }
    cmd
}

/// A private redis-server, configured the same for every Redis scenario (no
/// persistence, as in the seed's README).
fn spawn_redis(port: u16, dir: &std::path::Path) -> std::io::Result<Child> {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "port {port} never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Peak and current resident memory of a process, in MB.
fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Waits until the target has `n` deliveries; returns when the last arrived.
async fn wait_delivered(sink: &Sink, n: usize, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if sink.posts() >= n {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

struct Row {
    name: String,
    load: Load,
    delivered_per_s: Option<f64>,
    peak_rss_mb: Option<f64>,
    /// Relay CPU per accepted event while only ingesting, and per copy
    /// delivered afterwards (fan-out scenarios), in microseconds.
    ingest_cpu_us: Option<f64>,
    copy_cpu_us: Option<f64>,
}

/// One server (`child`, listening on `port`) under the load: ingest, then the
/// deliveries at `sink` (plus `extra_posts` that are not events).
async fn measure(
    child: &Child,
    port: u16,
    sink: &Sink,
    extra_posts: usize,
    name: String,
    events: usize,
    connections: usize,
) -> anyhow::Result<Row> {
    let pid = child.id().unwrap_or(0);
    wait_port(port).await?;
    let reqs = requests(PATH, events);
    let cpu0 = own_cpu_s();
    let server0 = cpu_split_s(pid);
    let threads0 = by_thread(pid);
    let t0 = Instant::now();
    let addr = ([127, 0, 0, 1], port).into();
    let l = load(addr, &reqs, connections).await?;
    let done = wait_delivered(sink, l.ok + extra_posts, Duration::from_secs(600)).await;
    let (peak, _) = rss_mb(pid);
    // From the first request on (start-up not counted, as the ceiling's
    // warm-up is not).
    let (user, system) = cpu_split_s(pid);
    let (user, system) = (user - server0.0, system - server0.1);
    let per_event = (user + system) * 1e6 / l.ok.max(1) as f64;
    let ceiling = CEILING_CPU_US.get().copied().unwrap_or(f64::NAN);
    eprintln!(
        "{name}: {:.0} req/s ingest; CPU s: server {:.1} (from the first request: user {user:.1}, system {system:.1}; {per_event:.1} us per event, {:.1}x the ceiling's per request), load generator + target {:.1}",
        l.rps(),
        cpu_s(pid),
        per_event / ceiling,
        own_cpu_s() - cpu0
    );
    eprintln!(
        "  by thread, per event: {}",
        thread_split(&threads0, &by_thread(pid), l.ok)
    );
    let e2e = done.map(|t| l.ok as f64 / (t - t0).as_secs_f64());
    Ok(Row {
        name,
        load: l,
        delivered_per_s: e2e,
        peak_rss_mb: Some(peak),
        ingest_cpu_us: None,
        copy_cpu_us: None,
    })
}

/// Isolation (SPEC §7): the same paced load (500 events/s for 8 s) to three
/// destinations, first all healthy, then with one answering 503 to
/// everything and one hanging until its 15 s timeout (with the circuit
/// breakers, and without them: the isolation alone). Prints the healthy
/// destination's send-to-delivery latency (p50, p99) and delivered rate in
/// both runs.
async fn isolation(relay_bin: &std::path::Path) -> anyhow::Result<()> {
    use cogrelay::sink::Behaviour;
    let mut results = Vec::new();
    for (troubled, breaker) in [(false, true), (true, true), (true, false)] {
        let sinks = [
            Sink::start().await?,
            Sink::start().await?,
            Sink::start().await?,
        ];
        if troubled {
            sinks[1].set_default(Behaviour::status(503));
            sinks[2].set_default(Behaviour::Delay(Duration::from_secs(60), 200));
        }
        let data = tempfile::tempdir()?;
        let file = data.path().join("cogrelay.toml");
        let text: String = ["healthy", "failing", "hanging"]
            .iter()
            .zip(&sinks)
            .map(|(name, sink)| {
                format!(
                    "[[destination]]\nname = \"{name}\"\nurl = \"{}\"\n",
                    sink.url()
                )
            })
            .collect();
        std::fs::write(&file, text)?;
        let (port, admin) = (free_port(), free_port());
        let mut cmd = relay(
            relay_bin,
            port,
            admin,
            &sinks[0],
            &data.path().join("data"),
            16,
        );
        cmd.env_remove("TARGET_ENDPOINT")
            .env("COGRELAY_CONFIG", &file);
        if !breaker {
            cmd.env("CIRCUIT_FAILURES", "0");
        }
        let child = cmd.spawn()?;
        wait_port(port).await?;
        let reqs = requests(PATH, 4000);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut sent = Vec::with_capacity(reqs.len());
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, req) in reqs.iter().enumerate() {
            tick.tick().await;
            sent.push(Instant::now());
            let one = Arc::new(vec![req.clone()]);
            tasks.spawn(async move { (i, load(addr, &one, 1).await) });
        }
        while tasks.join_next().await.is_some() {}
        let done = wait_delivered(&sinks[0], reqs.len(), Duration::from_secs(60)).await;
        let t_first = sent[0];
        let mut latencies: Vec<f64> = sinks[0]
            .received()
            .iter()
            .filter_map(|r| {
                let i: usize = r.header("x-event-id")?.rsplit('-').next()?.parse().ok()?;
                Some(r.at.duration_since(*sent.get(i)?).as_secs_f64() * 1000.0)
            })
            .collect();
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let rate = done
            .map(|t| reqs.len() as f64 / (t - t_first).as_secs_f64())
            .unwrap_or(0.0);
        results.push((
            troubled,
            breaker,
            pct(0.5),
            pct(0.99),
            rate,
            latencies.len(),
        ));
        stop(child).await;
    }
    println!(
        "\nisolation: the healthy destination's send-to-delivery latency, 4000 events at 500/s"
    );
    println!("| neighbours | p50 ms | p99 ms | delivered/s | delivered |");
    println!("|---|---|---|---|---|");
    for (troubled, breaker, p50, p99, rate, n) in results {
        let who = match (troubled, breaker) {
            (false, _) => "both healthy",
            (true, true) => "one 503, one hanging",
            (true, false) => "one 503, one hanging, no circuit breaker",
        };
        println!("| {who} | {p50:.1} | {p99:.1} | {rate:.0} | {n} |");
    }
    Ok(())
}

/// SPEC §7's outage with the defaults (ATTEMPTS 5, BACKOFF_DELAY_MS 2000,
/// CIRCUIT_* 5 / 10 s / 300 s): the target answers 503 for 40 s while 200
/// events arrive in the first 10 s; then it recovers. Prints the attempts made
/// at it during the outage, the dead letters, and when all was delivered.
async fn outage(relay_bin: &std::path::Path) -> anyhow::Result<()> {
    use cogrelay::sink::Behaviour;
    let sink = Sink::start().await?;
    sink.set_default(Behaviour::status(503));
    let data = tempfile::tempdir()?;
    let (port, admin) = (free_port(), free_port());
    let child = relay(relay_bin, port, admin, &sink, data.path(), 16).spawn()?;
    wait_port(port).await?;
    wait_port(admin).await?;
    let t0 = Instant::now();
    let reqs = requests(PATH, 200);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    for chunk in reqs.chunks(20) {
        let part = Arc::new(chunk.to_vec());
        load(addr, &part, 4).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep_until((t0 + Duration::from_secs(40)).into()).await;
    let during = sink.posts();
    sink.set_default(Behaviour::status(200));
    let http = reqwest::Client::new();
    let queue = |http: reqwest::Client| async move {
        http.get(format!("http://127.0.0.1:{admin}/admin/queue"))
            .send()
            .await?
            .json::<serde_json::Value>()
            .await
    };
    let failed_at_recovery = queue(http.clone()).await?["failed"].clone();
    let deadline = Instant::now() + Duration::from_secs(600);
    let done = loop {
        let q = queue(http.clone()).await?;
        if q["completed"].as_u64().unwrap_or(0) + q["failed"].as_u64().unwrap_or(0) >= 200 {
            break q;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not delivered in 10 minutes: {q}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "\noutage of 40 s, 200 events, defaults: {during} attempts at the target during the outage, \
         {failed_at_recovery} dead-lettered by its end; all done {:.1} s after recovery: {done}",
        t0.elapsed().as_secs_f64() - 40.0
    );
    stop(child).await;
    Ok(())
}

/// The embedded relay with `n` destinations (see `run`, 2b), each with
/// `table` besides its name and URL (`ordering = "session"`, say).
async fn fanout(
    relay_bin: &std::path::Path,
    (n, table): (usize, &str),
    events: usize,
    connections: usize,
    concurrency: usize,
) -> anyhow::Result<Row> {
    let sink = Sink::start().await?;
    sink.count_only();
    let data = tempfile::tempdir()?;
    let file = data.path().join("cogrelay.toml");
    let mut text = String::new();
    for d in 1..=n {
        text.push_str(&format!(
            "[[destination]]\nname = \"d{d}\"\nurl = \"{}/d{d}\"\n{table}",
            sink.url().trim_end_matches('/')
        ));
    }
    std::fs::write(&file, text)?;
    let (port, admin) = (free_port(), free_port());
    let mut cmd = relay(
        relay_bin,
        port,
        admin,
        &sink,
        &data.path().join("data"),
        concurrency,
    );
    cmd.env_remove("TARGET_ENDPOINT")
        .env("COGRELAY_CONFIG", &file);
    let child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    wait_port(port).await?;
    wait_port(admin).await?;
    let http = reqwest::Client::new();
    for d in 1..=n {
        http.post(format!(
            "http://127.0.0.1:{admin}/admin/destinations/d{d}/pause"
        ))
        .send()
        .await?
        .error_for_status()?;
    }
    let reqs = requests(PATH, events);
    let cpu0 = cpu_s(pid);
    let l = load(([127, 0, 0, 1], port).into(), &reqs, connections).await?;
    let cpu_ingest = cpu_s(pid) - cpu0;
    let t0 = Instant::now();
    for d in 1..=n {
        http.post(format!(
            "http://127.0.0.1:{admin}/admin/destinations/d{d}/resume"
        ))
        .send()
        .await?
        .error_for_status()?;
    }
    let copies = l.ok * n;
    let done = wait_delivered(&sink, copies, Duration::from_secs(600)).await;
    let cpu_deliver = cpu_s(pid) - cpu0 - cpu_ingest;
    let (peak, _) = rss_mb(pid);
    eprintln!(
        "fanout {n}: {:.0} req/s ingest, relay CPU s {cpu_ingest:.2} ingesting (paused), {cpu_deliver:.2} delivering {copies} copies",
        l.rps()
    );
    let ok = l.ok.max(1) as f64;
    let row = Row {
        name: format!(
            "cogrelay embedded, {n} destination(s){} (paused while ingesting)",
            if table.is_empty() {
                ""
            } else {
                ", ordered by session"
            }
        ),
        delivered_per_s: done.map(|t| copies as f64 / (t - t0).as_secs_f64()),
        peak_rss_mb: Some(peak),
        ingest_cpu_us: Some(cpu_ingest * 1e6 / ok),
        copy_cpu_us: Some(cpu_deliver * 1e6 / copies.max(1) as f64),
        load: l,
    };
    stop(child).await;
    Ok(row)
}

/// The ceiling's CPU per request in this run (microseconds), for the
/// relays' ratio to it.
static CEILING_CPU_US: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// CPU seconds (user + system) a process has used so far.
fn cpu_s(pid: u32) -> f64 {
    let (user, system) = cpu_split_s(pid);
    user + system
}

/// CPU seconds a process has used so far in user space and in the kernel.
fn cpu_split_s(pid: u32) -> (f64, f64) {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let f: Vec<String> = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            let ticks = |i: usize| f.get(i)?.parse::<f64>().ok();
            Some((ticks(11)? / 100.0, ticks(12)? / 100.0))
        })
        .unwrap_or((0.0, 0.0))
}

/// A process's threads so far, summed by name: CPU ticks in user space and
/// in the kernel, and context switches (voluntary, involuntary).
fn by_thread(pid: u32) -> ThreadTimes {
    let mut out = ThreadTimes::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
        let (stat, status) = (read("stat"), read("status"));
        let Some((name, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(')')) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let switches = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let now = [
            field(11),
            field(12),
            switches("voluntary_ctxt_switches:"),
            switches("nonvoluntary_ctxt_switches:"),
        ];
        let e = out.entry(name.to_string()).or_default();
        (0..4).for_each(|i| e[i] += now[i]);
    }
    out
}

/// Per thread name: user ticks, system ticks, voluntary and involuntary
/// context switches.
type ThreadTimes = std::collections::BTreeMap<String, [u64; 4]>;

/// [`by_thread`] summed over several relays.
fn relays_by_thread(children: &[(Child, tempfile::TempDir)]) -> ThreadTimes {
    let mut out = ThreadTimes::new();
    for (child, _) in children {
        for (name, v) in by_thread(child.id().unwrap_or(0)) {
            let e = out.entry(name).or_default();
            (0..4).for_each(|i| e[i] += v[i]);
        }
    }
    out
}

/// Where the CPU went between two [`by_thread`] readings, per event: each
/// thread name's microseconds (user + system) and context switches, the
/// busiest first.
fn thread_split(before: &ThreadTimes, after: &ThreadTimes, events: usize) -> String {
    let n = events.max(1) as f64;
    let mut rows: Vec<(String, [u64; 4])> = after
        .iter()
        .map(|(name, a)| {
            let b = before.get(name).copied().unwrap_or_default();
            (
                name.clone(),
                [0, 1, 2, 3].map(|i| a[i].saturating_sub(b[i])),
            )
        })
        .filter(|(_, d)| d[0] + d[1] > 0)
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1[0] + r.1[1]));
    let all: [u64; 4] = [0, 1, 2, 3].map(|i| rows.iter().map(|r| r.1[i]).sum());
    // Ticks are 10 ms (USER_HZ 100).
    let us = |ticks: u64| ticks as f64 * 1e4 / n;
    let show = |name: &str, d: &[u64; 4]| {
        format!(
            "{name} {:.1} us (user {:.1} + system {:.1}; switches {:.2} + {:.2})",
            us(d[0] + d[1]),
            us(d[0]),
            us(d[1]),
            d[2] as f64 / n,
            d[3] as f64 / n
        )
    };
    let mut parts: Vec<String> = rows.iter().map(|(name, d)| show(name, d)).collect();
    parts.push(show("all", &all));
    parts.join("; ")
}

/// CPU seconds this process (load generator and target) has used so far.
fn own_cpu_s() -> f64 {
    cpu_s(std::process::id())
}

/// A connection to the private Redis at `port`.
async fn redis_conn(port: u16) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// One command on the private Redis at `port`.
async fn redis_cmd(port: u16, cmd: &redis::Cmd) -> anyhow::Result<()> {
    cmd.query_async::<()>(&mut redis_conn(port).await?).await?;
    Ok(())
}

/// CPU seconds the relays have used so far, together.
fn relays_cpu_s(children: &[(Child, tempfile::TempDir)]) -> f64 {
    children
        .iter()
        .map(|(c, _)| cpu_s(c.id().unwrap_or(0)))
        .sum()
}

/// What the scenario cost Redis: redis-server's CPU seconds, the commands it
/// ran per event sent (those scripts ran counted too: a count, steadier than
/// its time), and its busiest commands (calls, µs per call), on stderr.
async fn redis_report(redis: &Child, port: u16, events: usize) {
    let cpu = cpu_s(redis.id().unwrap_or(0));
    let info: String = match redis_conn(port).await {
        Ok(mut conn) => redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let mut stats: Vec<(f64, String)> = info
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |k: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(k))
                    .and_then(|v| v.parse::<f64>().ok())
            };
            let usec = field("usec=")?;
            Some((
                usec,
                format!(
                    "{name} {} calls, {:.1} µs/call",
                    field("calls=")?,
                    field("usec_per_call=")?
                ),
            ))
        })
        .collect();
    let calls: f64 = info
        .lines()
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
        .filter_map(|l| {
            l.split_once("calls=")?
                .1
                .split(',')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum();
    stats.sort_by(|a, b| b.0.total_cmp(&a.0));
    let top: Vec<String> = stats.into_iter().take(12).map(|(_, s)| s).collect();
    eprintln!(
        "  redis-server: {cpu:.1} CPU s; {:.1} commands per event; busiest: {}",
        calls / events.max(1) as f64,
        top.join("; ")
    );
}

async fn stop(mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    let _ = child.start_kill();
}

async fn run(
    events: usize,
    connections: usize,
    relay_bin: &std::path::Path,
    seed_dir: Option<&std::path::Path>,
    concurrency: usize,
    only: &[String],
) -> anyhow::Result<Vec<Row>> {
    let wanted = |name: &str| only.iter().any(|o| o == name);
    let me = std::env::current_exe()?;
    let mut rows = Vec::new();

    // 1. Ceiling.
    let port = free_port();
    let child = Command::new(&me)
        .args(["ceiling", "--port", &port.to_string()])
        .kill_on_drop(true)
        .spawn()?;
    wait_port(port).await?;
    let addr = ([127, 0, 0, 1], port).into();
    load(addr, &requests("/", 2000), connections).await?; // warm-up
    let pid = child.id().unwrap_or(0);
    let cpu0 = cpu_s(pid);
    let l = load(addr, &requests(PATH, events), connections).await?;
    let per_request = (cpu_s(pid) - cpu0) * 1e6 / l.ok.max(1) as f64;
    let _ = CEILING_CPU_US.set(per_request);
    eprintln!(
        "ceiling: {:.0} req/s; CPU {per_request:.1} us per request",
        l.rps()
    );
    rows.push(Row {
        name: "hyper ceiling (answers 200)".into(),
        load: l,
        delivered_per_s: None,
        peak_rss_mb: None,
        ingest_cpu_us: None,
        copy_cpu_us: None,
    });
    stop(child).await;

    // 2. cogrelay, embedded queue.
    if wanted("embedded") {
        let sink = Sink::start().await?;
        sink.count_only();
        let data = tempfile::tempdir()?;
        let (port, admin) = (free_port(), free_port());
        let child = relay(relay_bin, port, admin, &sink, data.path(), concurrency).spawn()?;
        // The relay's default unless set for an experiment (see `relay`).
        let fsync = std::env::var("COGRELAY_FSYNC").unwrap_or_else(|_| "always".into());
        let name = format!("cogrelay embedded (fsync {fsync}, CONCURRENCY={concurrency})");
        rows.push(measure(&child, port, &sink, 0, name, events, connections).await?);
        stop(child).await;
    }

    // 2b. Fan-out: the embedded relay with 1, 2 and 4 destinations (all at the
    // one sink). Every destination is paused while the events come in, so the
    // relay's CPU then is the ingest's alone; resumed, the CPU until every copy
    // arrived is the deliveries'.
    // 2e. Ordered delivery: the same one destination, ordered by session
    // (1,000 sessions, round robin) or not ("fanout1").
    for (scenario, n, table) in [
        ("fanout1", 1usize, ""),
        ("fanout2", 2, ""),
        ("fanout4", 4, ""),
        ("ordered", 1, "ordering = \"session\"\n"),
    ] {
        if wanted(scenario) {
            rows.push(fanout(relay_bin, (n, table), events, connections, concurrency).await?);
        }
    }

    // 2d. Isolation (not by default): see `isolation`.
    if wanted("isolation") {
        isolation(relay_bin).await?;
    }

    // 2c. An outage (not by default; about a minute): see `outage`.
    if wanted("outage") {
        outage(relay_bin).await?;
    }

    // 3. cogrelay on Redis (BullMQ layout): one relay, then three sharing the
    // queue; "drain": one relay that takes the events while the queue is paused
    // (BullMQ's flag), then delivers the backlog alone.
    for (scenario, relays) in [("redis1", 1usize), ("redis3", 3), ("drain", 1)] {
        if !wanted(scenario) {
            continue;
        }
        let drain = scenario == "drain";
        let redis_port = free_port();
        let redis_dir = tempfile::tempdir()?;
        let redis = spawn_redis(redis_port, redis_dir.path())?;
        wait_port(redis_port).await?;
        let sink = Sink::start().await?;
        sink.count_only();
        let mut children = Vec::new();
        let mut addrs = Vec::new();
        // Relays sharing this machine share its cores, as docs/scaling-out.md
        // advises: each gets its part (unless the bench is given a number).
        let threads = (relays > 1).then(|| {
            std::env::var("TOKIO_WORKER_THREADS").unwrap_or_else(|_| {
                let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
                (cores / relays).max(1).to_string()
            })
        });
        for _ in 0..relays {
            let (port, admin) = (free_port(), free_port());
            let data = tempfile::tempdir()?;
            let mut cmd = relay(relay_bin, port, admin, &sink, data.path(), concurrency);
            if let Some(t) = &threads {
                cmd.env("TOKIO_WORKER_THREADS", t);
            }
            let child = cmd
                .env("COGRELAY_QUEUE", "redis")
                .env("REDIS_URL", format!("redis://127.0.0.1:{redis_port}"))
                .spawn()?;
            wait_port(port).await?;
            addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
            children.push((child, data));
        }
        let meta = format!("bull:{QUEUE}:meta");
        if drain {
            redis_cmd(
                redis_port,
                redis::cmd("HSET").arg(&meta).arg("paused").arg(1),
            )
            .await?;
        }
        let reqs = requests(PATH, events);
        let cpu0 = own_cpu_s();
        let threads0 = relays_by_thread(&children);
        let mut t0 = Instant::now();
        let l = load_spread(&addrs, &reqs, connections).await?;
        let during = sink.posts();
        let cpu_ingest = relays_cpu_s(&children);
        if drain {
            redis_cmd(redis_port, redis::cmd("HDEL").arg(&meta).arg("paused")).await?;
            // The relays look at a resumed queue within a second (they poll);
            // the rate is timed from the first delivery.
            t0 = wait_delivered(&sink, 1, Duration::from_secs(10))
                .await
                .unwrap_or_else(Instant::now);
        }
        let done = wait_delivered(&sink, l.ok, Duration::from_secs(600)).await;
        let peak = children
            .iter()
            .map(|(c, _)| rss_mb(c.id().unwrap_or(0)).0)
            .fold(0.0, f64::max);
        let relay_cpu = relays_cpu_s(&children);
        eprintln!(
            "cogrelay {scenario}: {:.0} req/s ingest, {during} delivered by its end; CPU s: relays {cpu_ingest:.1} + {:.1} after the ingest, load generator + target {:.1}",
            l.rps(),
            relay_cpu - cpu_ingest,
            own_cpu_s() - cpu0
        );
        eprintln!(
            "  by thread, per event (all relays): {}",
            thread_split(&threads0, &relays_by_thread(&children), l.ok)
        );
        let e2e = done.map(|t| l.ok as f64 / (t - t0).as_secs_f64());
        let name = if drain {
            format!("cogrelay redis x1, backlog drain: ingest while paused, then delivery alone (CONCURRENCY={concurrency})")
        } else {
            let threads = threads.map_or(String::new(), |t| format!(", TOKIO_WORKER_THREADS={t}"));
            format!("cogrelay redis x{relays} (CONCURRENCY={concurrency}{threads} each)")
        };
        rows.push(Row {
            name,
            load: l,
            delivered_per_s: e2e,
            peak_rss_mb: Some(peak),
            ingest_cpu_us: None,
            copy_cpu_us: None,
        });
        redis_report(&redis, redis_port, events).await;
        for (child, _) in children {
            stop(child).await;
        }
        stop(redis).await;
    }

    // 4. The seed's relay on a private redis-server.
    if let Some(dir) = seed_dir.filter(|d| wanted("seed") && d.join("node_modules").exists()) {
        let sink = Sink::start().await?;
        sink.count_only();
        let redis_port = free_port();
        let redis_dir = tempfile::tempdir()?;
        let redis = spawn_redis(redis_port, redis_dir.path())?;
        wait_port(redis_port).await?;
        let port = free_port();
        let base = format!("http://{}", sink.addr());
        let child = Command::new("node")
            .arg("index.js")
            .current_dir(dir)
            .env("REDIS_PORT", redis_port.to_string())
            .env("COGNIGY_BASE_URL", &base)
            .env("COGNIGY_CLIENT_ID", "a")
            .env("COGNIGY_CLIENT_SECRET", "b")
            .env("TARGET_ENDPOINT", sink.url())
            .env("PORT", port.to_string())
            .env("CONCURRENCY", concurrency.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        // The seed also POSTs its token request to the target host: one more post.
        let name = format!("seed Node relay (Bull, CONCURRENCY={concurrency})");
        rows.push(measure(&child, port, &sink, 1, name, events, connections).await?);
        redis_report(&redis, redis_port, events).await;
        stop(child).await;
        stop(redis).await;
    }

    Ok(rows)
}

/// One row of the printed table.
#[derive(Clone)]
struct Line {
    name: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    other: usize,
    errors: usize,
    delivered_per_s: Option<f64>,
    peak_rss_mb: Option<f64>,
    ingest_cpu_us: Option<f64>,
    copy_cpu_us: Option<f64>,
}

impl From<&Row> for Line {
    fn from(r: &Row) -> Self {
        Self {
            name: r.name.clone(),
            rps: r.load.rps(),
            p50_ms: r.load.p50_ms,
            p99_ms: r.load.p99_ms,
            other: r.load.other,
            errors: r.load.errors,
            delivered_per_s: r.delivered_per_s,
            peak_rss_mb: r.peak_rss_mb,
            ingest_cpu_us: r.ingest_cpu_us,
            copy_cpu_us: r.copy_cpu_us,
        }
    }
}

/// Each figure's median over the rounds (every round has the same rows);
/// non-200s and errors are summed.
fn medians(rounds: &[Vec<Line>]) -> Vec<Line> {
    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }
    let of = |i: usize, f: &dyn Fn(&Line) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = rounds.iter().filter_map(|r| r.get(i).and_then(f)).collect();
        (!v.is_empty()).then(|| median(v))
    };
    (0..rounds[0].len())
        .map(|i| Line {
            name: rounds[0][i].name.clone(),
            rps: of(i, &|l| Some(l.rps)).unwrap_or(0.0),
            p50_ms: of(i, &|l| Some(l.p50_ms)).unwrap_or(0.0),
            p99_ms: of(i, &|l| Some(l.p99_ms)).unwrap_or(0.0),
            other: rounds
                .iter()
                .filter_map(|r| r.get(i))
                .map(|l| l.other)
                .sum(),
            errors: rounds
                .iter()
                .filter_map(|r| r.get(i))
                .map(|l| l.errors)
                .sum(),
            delivered_per_s: of(i, &|l| l.delivered_per_s),
            peak_rss_mb: of(i, &|l| l.peak_rss_mb),
            ingest_cpu_us: of(i, &|l| l.ingest_cpu_us),
            copy_cpu_us: of(i, &|l| l.copy_cpu_us),
        })
        .collect()
}

fn print_table(title: &str, lines: &[Line]) {
    let Some(ceiling) = lines.first().map(|l| l.rps) else {
        return;
    };
    let seed = lines
        .iter()
        .find(|l| l.name.starts_with("seed"))
        .map(|l| (l.rps, l.delivered_per_s.unwrap_or(0.0)));
    println!("\n{title}\n");
    println!("| server | ingest req/s | vs ceiling | vs seed | ack p50 / p99 ms | non-200 / errors | delivered/s end-to-end | vs seed | peak RSS MB | relay CPU us: per event ingested / per copy delivered |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for l in lines {
        let e2e = l
            .delivered_per_s
            .map(|v| format!("{v:.0}"))
            .unwrap_or_else(|| "-".into());
        let (vs_seed, vs_seed_e2e) = match (seed, l.delivered_per_s) {
            (Some((s_in, s_e2e)), Some(e)) if s_in > 0.0 => (
                format!("{:.1}x", l.rps / s_in),
                format!("{:.1}x", e / s_e2e.max(1e-9)),
            ),
            _ => ("-".into(), "-".into()),
        };
        let us = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        println!(
            "| {} | {:.0} | {:.0}% | {} | {:.2} / {:.2} | {} / {} | {} | {} | {} | {} / {} |",
            l.name,
            l.rps,
            100.0 * l.rps / ceiling,
            vs_seed,
            l.p50_ms,
            l.p99_ms,
            l.other,
            l.errors,
            e2e,
            vs_seed_e2e,
            l.peak_rss_mb
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
            us(l.ingest_cpu_us),
            us(l.copy_cpu_us),
        );
    }
}
