//! Soak run under faults: steady signed traffic into the real binary, fanned
//! out to three destinations, while the relay's file is reloaded (SIGHUP)
//! every minute and the relay is `kill -9`'d and restarted every few minutes
//! (and, on Redis, Redis is killed and restarted once).
//!
//! `cargo run --release --example soak -- --minutes 20 --backend embedded`
//! (CI runs a short version of each backend). The destinations:
//! * `flaky`: 70% 200, 20% 503, 4% answers after the delivery timeout, 3%
//!   connection resets, 3% 429 with Retry-After: 1;
//! * `outage`: 200, but 503 to everything for `--outage-secs` (40) from a
//!   quarter of the run;
//! * `paused`: 200, paused and resumed twice (through the admin API).
//!
//! At the end it checks:
//! * every (event, destination) of an event that got a 200 was delivered
//!   (2xx) there or is in that destination's failed list with a reason;
//! * no event was delivered twice to a destination except where explained
//!   (an attempt in flight at a kill, or a 2xx the target sent after the
//!   relay's timeout);
//! * RSS and open file descriptors of the longest-lived relay stayed flat.
//!
//! Exits non-zero when a check fails.

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
    /// Seconds between reloads of the destinations file (SIGHUP).
    #[arg(long, default_value = "60")]
    hup_every: u64,
    /// Length of the `outage` destination's outage, in seconds.
    #[arg(long, default_value = "40")]
    outage_secs: u64,
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

/// The three destinations (see the module doc); `generation` goes into a
/// header, so that each reload changes a destination's settings.
fn destinations_file(sinks: &[(&str, Sink)], generation: u32) -> String {
    sinks
        .iter()
        .map(|(name, sink)| {
            format!(
                "[[destination]]\nname = \"{name}\"\nurl = \"{}\"\nheaders = {{ \"X-Generation\" = \"{generation}\" }}\n\n",
                sink.url()
            )
        })
        .collect()
}

async fn start_relay(
    args: &Args,
    data: &Path,
    port: u16,
    admin: u16,
    config: &Path,
    redis: Option<u16>,
) -> anyhow::Result<Relay> {
    let mut cmd = Command::new(&args.relay_bin);
    cmd.arg("serve")
        .env_clear()
        .env("PORT", port.to_string())
        .env("ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("COGRELAY_CONFIG", config)
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

const DESTINATIONS: [&str; 3] = ["flaky", "outage", "paused"];

/// Whether a recorded request was a delivery (a 2xx was scripted for it).
fn delivered_to(r: &cogrelay::sink::Received) -> bool {
    matches!(
        r.behaviour,
        Behaviour::Status(200, _) | Behaviour::Delay(_, 200)
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    let tmp = tempfile::tempdir()?;
    let mut sinks = Vec::new();
    for name in DESTINATIONS {
        let sink = Sink::start().await?;
        sink.keep_bodies(false);
        sinks.push((name, sink));
    }
    let flaky = sinks[0].1.clone();
    let outage = sinks[1].1.clone();
    // Keep the flaky target's script topped up with random behaviours.
    tokio::spawn(async move {
        loop {
            while flaky.scripted() < 2000 {
                flaky.push(chaos());
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
    let config = tmp.path().join("cogrelay.toml");
    let mut generation = 1;
    std::fs::write(&config, destinations_file(&sinks, generation))?;
    let mut relay = start_relay(&args, &data, port, admin, &config, redis_port).await?;

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

    // The `paused` destination: paused at 1/5 and 3/5 of the run, resumed
    // at 2/5 and 4/5. The `outage` one: 503 from a quarter of the run.
    let mut pauses: Vec<(Duration, bool)> = [1, 2, 3, 4]
        .iter()
        .map(|k| (run_for * *k / 5, k % 2 == 1))
        .collect();
    pauses.reverse();
    let outage_from = run_for / 4;
    let outage_to = outage_from + Duration::from_secs(args.outage_secs);
    let (mut outage_on, mut outage_done) = (false, false);
    let admin_http = reqwest::Client::new();
    let mut kills = Vec::new();
    let mut hups = 0;
    let mut samples: Vec<(u32, f64, f64, usize)> = Vec::new(); // (pid, secs since its start, rss MB, fds)
    let mut redis_restarted = false;
    let (mut last_kill, mut last_hup) = (Instant::now(), Instant::now());
    while t0.elapsed() < run_for {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = t0.elapsed();
        if let Some(pid) = relay.child.id() {
            if let Some((rss, fds)) = proc_sample(pid) {
                samples.push((pid, relay.started.elapsed().as_secs_f64(), rss, fds));
            }
        }
        if !outage_on && !outage_done && now >= outage_from {
            eprintln!(
                "[{:>5.0}s] outage of `outage` for {} s",
                now.as_secs_f64(),
                args.outage_secs
            );
            outage.set_default(Behaviour::status(503));
            outage_on = true;
        }
        if outage_on && now >= outage_to {
            eprintln!("[{:>5.0}s] `outage` is back", now.as_secs_f64());
            outage.set_default(Behaviour::status(200));
            (outage_on, outage_done) = (false, true);
        }
        if pauses.last().is_some_and(|(at, _)| now >= *at) {
            let (_, pause) = pauses.pop().expect("a pause");
            let verb = if pause { "pause" } else { "resume" };
            let r = admin_http
                .post(format!(
                    "http://127.0.0.1:{admin}/admin/destinations/paused/{verb}"
                ))
                .send()
                .await;
            eprintln!(
                "[{:>5.0}s] {verb} `paused`: {:?}",
                now.as_secs_f64(),
                r.map(|r| r.status())
            );
        }
        if let (Some(p), false) = (redis_port, redis_restarted) {
            if now > run_for / 2 {
                eprintln!("[{:>5.0}s] restarting redis", now.as_secs_f64());
                if let Some(mut r) = redis.take() {
                    let _ = r.kill();
                    let _ = r.wait();
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                redis = Some(start_redis(p, tmp.path())?);
                redis_restarted = true;
            }
        }
        if last_hup.elapsed() >= Duration::from_secs(args.hup_every) {
            generation += 1;
            std::fs::write(&config, destinations_file(&sinks, generation))?;
            if let Some(pid) = relay.child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-HUP", &pid.to_string()])
                    .status();
                hups += 1;
            }
            last_hup = Instant::now();
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
            relay = start_relay(&args, &data, port, admin, &config, redis_port).await?;
            last_kill = Instant::now();
        }
    }
    load.await?;
    // Everything resumed and answered for the drain.
    outage.set_default(Behaviour::status(200));
    let _ = admin_http
        .post(format!(
            "http://127.0.0.1:{admin}/admin/destinations/paused/resume"
        ))
        .send()
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked: HashSet<String> = acked.lock().expect("lock").clone();
    eprintln!(
        "load done: {} sent, {} acked; waiting for the queue to drain",
        sent.load(std::sync::atomic::Ordering::Relaxed),
        acked.len()
    );

    // Drain: every acked (event, destination) delivered (2xx) or failed.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    type PerDestination = Vec<(HashSet<String>, HashMap<String, String>)>;
    let outcome: PerDestination = loop {
        let mut per: PerDestination = Vec::new();
        for (name, sink) in &sinks {
            let delivered: HashSet<String> = sink
                .received()
                .iter()
                .filter(|r| delivered_to(r))
                .filter_map(|r| r.header("x-event-id").map(str::to_owned))
                .collect();
            let mut failed = HashMap::new();
            let mut offset = 0;
            loop {
                let page: serde_json::Value = http
                    .get(format!(
                        "http://127.0.0.1:{admin}/admin/jobs?state=failed&destination={name}&limit=500&offset={offset}"
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
            per.push((delivered, failed));
        }
        let pending: usize = per
            .iter()
            .map(|(d, f)| {
                acked
                    .iter()
                    .filter(|id| !d.contains(*id) && !f.contains_key(*id))
                    .count()
            })
            .sum();
        if pending == 0 || Instant::now() > deadline {
            break per;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    println!(
        "soak: backend {}, {:.1} min, {} events/s to {} destinations, {} kills, {hups} reloads{}",
        args.backend,
        args.minutes,
        args.rate,
        sinks.len(),
        kills.len(),
        if redis_restarted {
            ", Redis restarted once"
        } else {
            ""
        }
    );
    println!(
        "  sent {}, acknowledged {}",
        sent.load(std::sync::atomic::Ordering::Relaxed),
        acked.len()
    );
    let mut ok = true;
    for ((name, sink), (delivered, failed)) in sinks.iter().zip(&outcome) {
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
        println!(
            "  {name}: delivered {}, failed {} (without reason: {failed_without_reason}), lost {}; delivered twice: {dup_timeout} after a late 2xx, {dup_kill} around a kill, {dup_unexplained} unexplained",
            acked.iter().filter(|id| delivered.contains(*id)).count(),
            failed.len(),
            lost.len()
        );
        if !lost.is_empty() {
            println!("  {name}: lost, e.g. {:?}", &lost[..lost.len().min(10)]);
        }
        ok &= lost.is_empty() && failed_without_reason == 0 && dup_unexplained == 0;
    }
    // Flatness, on the longest-lived relay process: first vs last minute of its life.
    let longest = samples
        .iter()
        .map(|s| s.0)
        .max_by_key(|pid| samples.iter().filter(|s| s.0 == *pid).count());
    let series: Vec<&(u32, f64, f64, usize)> =
        samples.iter().filter(|s| Some(s.0) == longest).collect();
    let (rss0, rss1, fd0, fd1) = match (
        series.get(series.len().min(10).saturating_sub(1)),
        series.last(),
    ) {
        (Some(a), Some(b)) => (a.2, b.2, a.3, b.3),
        _ => (0.0, 0.0, 0, 0),
    };
    println!("  longest-lived relay ({} samples over {:.0} s): RSS {rss0:.1} -> {rss1:.1} MB, open fds {fd0} -> {fd1}", series.len(), series.last().map(|s| s.1).unwrap_or(0.0));
    let flat = rss1 <= rss0 * 1.5 + 10.0 && fd1 <= fd0 + 50;
    ok &= flat;
    println!("  result: {}", if ok { "PASS" } else { "FAIL" });
    if let Some(mut r) = redis {
        let _ = r.kill();
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
