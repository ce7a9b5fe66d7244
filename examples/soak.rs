//! Soak run under faults: steady signed traffic into the real binary while the
//! target is flaky and the relay is `kill -9`'d and restarted every few
//! minutes (and, on Redis, Redis is killed and restarted once).
//!
//! `cargo run --release --example soak -- --minutes 20 --backend embedded`
//! (CI runs a 40-second version of each backend). At the end it checks:
//! * every event that got a 200 was delivered (2xx) or is in the failed list
//!   with a reason;
//! * no event was delivered twice except where explained (an attempt in flight
//!   at a kill, or a 2xx the target sent after the relay's timeout);
//! * RSS and open file descriptors of the longest-lived relay stayed flat.
//!
//! Exits non-zero when a check fails. The target's behaviours: 70% 200, 20%
//! 503, 4% answers after the delivery timeout, 3% connection resets, 3% 429
//! with Retry-After: 1.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use cogrelay::ingress::auth::sign_hex;
use cogrelay::sink::{Behaviour, Sink};
use tokio::process::{Child, Command};

const SECRET: &str = "soak-secret";
const DELIVERY_TIMEOUT_MS: u64 = 1000;

#[derive(Parser)]
struct Args {
    /// Length of the run in minutes (fractions allowed).
    #[arg(long, default_value = "20")]
    minutes: f64,
    /// `embedded` or `redis`.
    #[arg(long, default_value = "embedded")]
    backend: String,
    /// Events per second sent.
    #[arg(long, default_value = "50")]
    rate: u32,
    /// Seconds between kill -9 of the relay.
    #[arg(long, default_value = "180")]
    kill_every: u64,
    /// The relay binary.
    #[arg(long, default_value = "target/release/cogrelay")]
    relay_bin: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

struct Relay {
    child: Child,
    started: Instant,
}

async fn start_relay(
    args: &Args,
    data: &Path,
    port: u16,
    admin: u16,
    sink: &Sink,
    redis: Option<u16>,
) -> anyhow::Result<Relay> {
    let mut cmd = Command::new(&args.relay_bin);
    cmd.arg("serve")
        .env_clear()
        .env("PORT", port.to_string())
        .env("ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("TARGET_ENDPOINT", sink.url())
        .env("WEBHOOK_SIGNING_SECRET", SECRET)
        .env("COGRELAY_DATA_DIR", data)
        .env("ATTEMPTS", "10")
        .env("BACKOFF_DELAY_MS", "200")
        .env("MAX_RETRY_AFTER_SECS", "2")
        .env("DELIVERY_TIMEOUT_MS", DELIVERY_TIMEOUT_MS.to_string())
        .env("LOCK_DURATION_MS", "3000")
        // The circuit breaker on, scaled like the rest: the target fails 27%
        // of requests, so the breaker opens now and then; with the defaults
        // (10 s doubling up to 300 s) its cool-downs outlast the drain.
        .env("CIRCUIT_COOLDOWN_MS", "1000")
        .env("CIRCUIT_MAX_COOLDOWN_MS", "4000")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    if let Some(p) = redis {
        cmd.env("COGRELAY_QUEUE", "redis")
            .env("REDIS_URL", format!("redis://127.0.0.1:{p}"));
    }
    let child = cmd.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        anyhow::ensure!(Instant::now() < deadline, "relay did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Relay {
        child,
        started: Instant::now(),
    })
}

fn start_redis(port: u16, dir: &Path) -> anyhow::Result<std::process::Child> {
    Ok(std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .args(["--maxmemory-policy", "noeviction"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()?)
}

fn proc_sample(pid: u32) -> Option<(f64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()?
        / 1024.0;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

fn chaos() -> Behaviour {
    match fastrand::u32(0..100) {
        0..70 => Behaviour::status(200),
        70..90 => Behaviour::status(503),
        90..94 => Behaviour::Delay(Duration::from_millis(DELIVERY_TIMEOUT_MS + 300), 200),
        94..97 => Behaviour::Reset,
        _ => Behaviour::retry_after(429, "1"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    let tmp = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.keep_bodies(false);
    // Keep the target's script topped up with random behaviours.
    let chaos_sink = sink.clone();
    tokio::spawn(async move {
        loop {
            while chaos_sink.scripted() < 2000 {
                chaos_sink.push(chaos());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let redis_port = (args.backend == "redis").then(free_port);
    let mut redis = match redis_port {
        Some(p) => Some(start_redis(p, tmp.path())?),
        None => None,
    };
    if let Some(p) = redis_port {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "redis did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (port, admin) = (free_port(), free_port());
    let data = tmp.path().join("data");
    let mut relay = start_relay(&args, &data, port, admin, &sink, redis_port).await?;

    let acked = Arc::new(Mutex::new(HashSet::<String>::new()));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t0 = Instant::now();
    let load = {
        let (acked, sent) = (acked.clone(), sent.clone());
        let rate = args.rate;
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client");
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            let mut i = 0u64;
            while t0.elapsed() < run_for {
                tick.tick().await;
                i += 1;
                let (http, acked, sent) = (http.clone(), acked.clone(), sent.clone());
                tokio::spawn(async move {
                    let id = format!("soak-{i}");
                    let body = format!(
                        r#"{{"botId":"soak","eventId":"{id}","type":"message","payload":{{"n":{i}}},"timestamp":"{ts}"}}"#,
                        ts = cogrelay::time::rfc3339(cogrelay::queue::now_ms())
                    );
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let sig = sign_hex(SECRET, body.as_bytes());
                    let r = http
                        .post(format!("http://127.0.0.1:{port}/api/webhook/cognigy"))
                        .header("content-type", "application/json")
                        .header("x-webhook-signature", sig)
                        .body(body)
                        .send()
                        .await;
                    if r.map(|r| r.status() == 200).unwrap_or(false) {
                        acked.lock().expect("lock").insert(id);
                    }
                });
            }
        })
    };

    let mut kills = Vec::new();
    let mut samples: Vec<(u32, f64, f64, usize)> = Vec::new(); // (pid, secs since its start, rss MB, fds)
    let mut redis_restarted = false;
    let mut last_kill = Instant::now();
    while t0.elapsed() < run_for {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if let Some(pid) = relay.child.id() {
            if let Some((rss, fds)) = proc_sample(pid) {
                samples.push((pid, relay.started.elapsed().as_secs_f64(), rss, fds));
            }
        }
        if let (Some(p), false) = (redis_port, redis_restarted) {
            if t0.elapsed() > run_for / 2 {
                eprintln!("[{:>5.0}s] restarting redis", t0.elapsed().as_secs_f64());
                if let Some(mut r) = redis.take() {
                    let _ = r.kill();
                    let _ = r.wait();
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                redis = Some(start_redis(p, tmp.path())?);
                redis_restarted = true;
            }
        }
        if last_kill.elapsed() >= Duration::from_secs(args.kill_every)
            && t0.elapsed() + Duration::from_secs(10) < run_for
        {
            eprintln!(
                "[{:>5.0}s] kill -9 relay; {} acked so far",
                t0.elapsed().as_secs_f64(),
                acked.lock().expect("lock").len()
            );
            relay.child.start_kill()?;
            let _ = relay.child.wait().await;
            kills.push(Instant::now());
            relay = start_relay(&args, &data, port, admin, &sink, redis_port).await?;
            last_kill = Instant::now();
        }
    }
    load.await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked: HashSet<String> = acked.lock().expect("lock").clone();
    eprintln!(
        "load done: {} sent, {} acked; waiting for the queue to drain",
        sent.load(std::sync::atomic::Ordering::Relaxed),
        acked.len()
    );

    // Drain: every acked event delivered (2xx) or failed.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let (delivered, failed) = loop {
        let delivered: HashSet<String> = sink
            .received()
            .iter()
            .filter(|r| {
                matches!(
                    r.behaviour,
                    Behaviour::Status(200, _) | Behaviour::Delay(_, 200)
                )
            })
            .filter_map(|r| r.header("x-event-id").map(str::to_owned))
            .collect();
        let mut failed = HashMap::new();
        let mut offset = 0;
        loop {
            let page: serde_json::Value = http
                .get(format!(
                    "http://127.0.0.1:{admin}/admin/jobs?state=failed&limit=500&offset={offset}"
                ))
                .send()
                .await?
                .json()
                .await?;
            let items = page["items"].as_array().cloned().unwrap_or_default();
            for j in &items {
                failed.insert(
                    j["eventId"].as_str().unwrap_or_default().to_string(),
                    j["failedReason"].as_str().unwrap_or_default().to_string(),
                );
            }
            offset += 500;
            if items.len() < 500 {
                break;
            }
        }
        let pending = acked
            .iter()
            .filter(|id| !delivered.contains(*id) && !failed.contains_key(*id))
            .count();
        if pending == 0 || Instant::now() > deadline {
            break (delivered, failed);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !delivered.contains(*id) && !failed.contains_key(*id))
        .collect();
    let failed_without_reason = failed.values().filter(|r| r.is_empty()).count();
    // Duplicates: more than one 2xx-scripted delivery of the same event.
    let mut per_event: HashMap<String, Vec<(Instant, Behaviour)>> = HashMap::new();
    for r in sink.received() {
        if let Some(id) = r.header("x-event-id") {
            per_event
                .entry(id.to_string())
                .or_default()
                .push((r.at, r.behaviour.clone()));
        }
    }
    let (mut dup_timeout, mut dup_kill, mut dup_unexplained) = (0, 0, 0);
    for deliveries in per_event.values() {
        let ok: Vec<&(Instant, Behaviour)> = deliveries
            .iter()
            .filter(|(_, b)| matches!(b, Behaviour::Status(200, _) | Behaviour::Delay(_, 200)))
            .collect();
        if ok.len() < 2 {
            continue;
        }
        let late = ok.iter().any(|(_, b)| matches!(b, Behaviour::Delay(..)));
        let near_kill = ok.iter().any(|(at, _)| {
            kills
                .iter()
                .any(|k| k.saturating_duration_since(*at) < Duration::from_secs(5))
        });
        if late {
            dup_timeout += 1;
        } else if near_kill {
            dup_kill += 1;
        } else {
            dup_unexplained += 1;
        }
    }
    // Flatness, on the longest-lived relay process: first vs last minute of its life.
    let longest = samples
        .iter()
        .map(|s| s.0)
        .max_by_key(|pid| samples.iter().filter(|s| s.0 == *pid).count());
    let series: Vec<&(u32, f64, f64, usize)> =
        samples.iter().filter(|s| Some(s.0) == longest).collect();
    let (rss0, rss1, fd0, fd1) = match (
        series.get(series.len().min(2).saturating_sub(1)),
        series.last(),
    ) {
        (Some(a), Some(b)) => (a.2, b.2, a.3, b.3),
        _ => (0.0, 0.0, 0, 0),
    };
    println!(
        "soak: backend {}, {:.1} min, {} events/s, {} kills{}",
        args.backend,
        args.minutes,
        args.rate,
        kills.len(),
        if redis_restarted {
            ", Redis restarted once"
        } else {
            ""
        }
    );
    println!("  sent {}, acknowledged {}, delivered {}, failed {} (without reason: {failed_without_reason}), lost {}", sent.load(std::sync::atomic::Ordering::Relaxed), acked.len(), acked.iter().filter(|id| delivered.contains(*id)).count(), failed.len(), lost.len());
    println!("  delivered twice: {dup_timeout} after a late 2xx (past the timeout), {dup_kill} around a kill, {dup_unexplained} unexplained");
    println!("  longest-lived relay ({} samples over {:.0} s): RSS {rss0:.1} -> {rss1:.1} MB, open fds {fd0} -> {fd1}", series.len(), series.last().map(|s| s.1).unwrap_or(0.0));
    let flat = rss1 <= rss0 * 1.5 + 10.0 && fd1 <= fd0 + 50;
    let ok = lost.is_empty() && failed_without_reason == 0 && dup_unexplained == 0 && flat;
    println!("  result: {}", if ok { "PASS" } else { "FAIL" });
    if let Some(mut r) = redis {
        let _ = r.kill();
    }
    if !ok {
        if !lost.is_empty() {
            println!("  lost, e.g. {:?}", &lost[..lost.len().min(10)]);
        }
        std::process::exit(1);
    }
    Ok(())
}
