//! The Redis backend under operations: Redis down mid-load, several relays on
//! one queue, a relay killed under load (SPEC §3.5, the Redis issue's list).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::process::{delivered_ids, post, start_relay, start_relay_logged};
use crate::redis_server::RedisServer;
use serde_json::Value;

#[tokio::test]
async fn redis_down_mid_load_answers_503_and_recovers_without_restart() {
    let app = spawn_app_on(Backend::Redis, |c| c.delivery.concurrency = 4).await;
    let Some(mut redis) = RedisServerHandle::take(&app) else {
        return;
    };
    let mut acked = HashSet::new();
    for i in 0..200 {
        let r = app.post_event(&event("bot", &format!("down-{i}"))).await;
        assert_eq!(r.status, 200);
        acked.insert(format!("down-{i}"));
    }
    redis.kill();
    let mut refused = 0;
    for i in 200..230 {
        let r = app.post_event(&event("bot", &format!("down-{i}"))).await;
        assert_ne!(r.status, 200, "a 200 while Redis is down");
        assert_eq!(r.status, 503, "{}", r.json);
        assert!(r.headers.contains_key("retry-after"));
        refused += 1;
    }
    assert_eq!(
        app.admin_get("/readyz").await.status,
        503,
        "not ready while Redis is down"
    );
    assert!(refused > 0);

    redis.restart(); // same port and directory: the AOF brings the queue back
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.admin_get("/readyz").await.status != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 260..300 {
        let r = app.post_event(&event("bot", &format!("down-{i}"))).await;
        assert_eq!(
            r.status, 200,
            "accepting again without a relay restart: {}",
            r.json
        );
        acked.insert(format!("down-{i}"));
    }
    wait_all_delivered(&app.sink, &acked, Duration::from_secs(60)).await;
    drop(redis);
}

#[tokio::test]
async fn an_outage_is_logged_in_a_few_lines_not_one_per_refused_event() {
    let Some(mut redis) = RedisServer::start(true) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    let dir = tempfile::tempdir().expect("tmp");
    let (relay, logs) = start_relay_logged(dir.path(), &sink, &relay_env(&redis)).await;
    let http = reqwest::Client::new();
    assert_eq!(post(&http, relay.port, "before").await, Some(200));

    let outage = Instant::now();
    redis.kill();
    let mut refused = 0u64;
    for i in 0..300 {
        let status = post(&http, relay.port, &format!("refused-{i}")).await;
        assert_eq!(status, Some(503), "while Redis is down");
        refused += 1;
    }
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match post(&http, relay.port, "after").await {
            Some(200) => break,
            Some(503) => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
        assert!(Instant::now() < deadline, "never accepting again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The outage is reported as over once events are accepted and none was
    // refused for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post(&http, relay.port, "after-quiet").await, Some(200));
    // One line at once, then at most one per 5 s.
    let most = 2 + outage.elapsed().as_secs() / 5;

    // The relay's log arrives through a pipe: wait for the closing line.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !logs.lock().expect("logs").contains("queue available again") && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = logs.lock().expect("logs").clone();
    let lines: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let refusal_lines = lines
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("not accepted"))
        })
        .count() as u64;
    assert!(
        (1..=most).contains(&refusal_lines),
        "{refusal_lines} log lines for {refused} refused events:\n{logs}"
    );
    let back: Vec<&Value> = lines
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("queue available again"))
        })
        .collect();
    assert_eq!(back.len(), 1, "{logs}");
    assert_eq!(back[0]["refused_total"], refused, "{logs}");
}

/// Lets a test kill and restart the app's redis-server.
struct RedisServerHandle<'a>(&'a RedisServer);

impl<'a> RedisServerHandle<'a> {
    fn take(app: &'a TestApp) -> Option<Self> {
        app.redis.as_ref().map(RedisServerHandle)
    }
    fn kill(&mut self) {
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &self.0.port.to_string(), "SHUTDOWN", "NOSAVE"])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.0.ping() {
            assert!(Instant::now() < deadline, "redis did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn restart(&mut self) {
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args([
            "--port",
            &self.0.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .arg("--dir")
        .arg(self.0.dir())
        .arg("--daemonize")
        .arg("yes");
        assert!(cmd.status().expect("restart redis").success());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.0.ping() {
            assert!(Instant::now() < deadline, "redis did not come back");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServerHandle<'_> {
    fn drop(&mut self) {
        // The restarted server is daemonized, not our child: stop it explicitly.
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &self.0.port.to_string(), "SHUTDOWN", "NOSAVE"])
            .status();
    }
}

fn relay_env(redis: &RedisServer) -> Vec<(&'static str, String)> {
    vec![
        ("COGRELAY_QUEUE", "redis".into()),
        ("REDIS_URL", redis.url()),
        ("CONCURRENCY", "16".into()),
        ("LOCK_DURATION_MS", "2000".into()),
        ("DELIVERY_TIMEOUT_MS", "1000".into()),
    ]
}

/// Sends `ids` round-robin across the relays' ingress ports; returns what got 200.
async fn send_across(ports: Vec<u16>, ids: Vec<String>) -> HashSet<String> {
    let http = reqwest::Client::new();
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        let (http, limit, port) = (http.clone(), limit.clone(), ports[i % ports.len()]);
        tasks.push(tokio::spawn(async move {
            let _p = limit.acquire_owned().await.expect("permit");
            (post(&http, port, &id).await == Some(200)).then_some(id)
        }));
    }
    let mut acked = HashSet::new();
    for t in tasks {
        if let Some(id) = t.await.expect("task") {
            acked.insert(id);
        }
    }
    acked
}

#[tokio::test]
async fn three_relays_share_one_queue_without_loss_or_duplicates() {
    let Some(redis) = RedisServer::start(false) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut relays = Vec::new();
    for d in &dirs {
        relays.push(start_relay(d.path(), &sink, &relay_env(&redis)).await);
    }
    let ports: Vec<u16> = relays.iter().map(|r| r.port).collect();

    const N: usize = 10_000;
    let acked = send_across(
        ports.clone(),
        (0..N).map(|i| format!("multi-{i}")).collect(),
    )
    .await;
    assert_eq!(acked.len(), N, "every event accepted");

    // The same eventId at two instances is one job.
    let http = reqwest::Client::new();
    for i in 0..50 {
        let id = format!("twice-{i}");
        assert_eq!(post(&http, ports[0], &id).await, Some(200));
        assert_eq!(post(&http, ports[1], &id).await, Some(200));
    }
    let mut all = acked.clone();
    all.extend((0..50).map(|i| format!("twice-{i}")));
    wait_all_delivered(&sink, &all, Duration::from_secs(120)).await;
    // Count only once no job can be delivered again: nothing active, waiting
    // or delayed, and no lease (lock key) left that could lapse and hand a job
    // to a second relay.
    wait_until_no_job_can_run_again(redis.port, Duration::from_secs(30)).await;

    let mut times: HashMap<String, usize> = HashMap::new();
    for id in delivered_ids(&sink) {
        *times.entry(id).or_default() += 1;
    }
    let dup: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dup.is_empty(),
        "delivered more than once: {:?}",
        &dup[..dup.len().min(5)]
    );
    assert_eq!(times.len(), N + 50);
}

#[tokio::test]
async fn a_killed_relays_jobs_are_taken_over() {
    let Some(redis) = RedisServer::start(false) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    sink.set_default(Behaviour::Delay(Duration::from_millis(30), 200));
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut relays = Vec::new();
    for d in &dirs {
        relays.push(start_relay(d.path(), &sink, &relay_env(&redis)).await);
    }
    let ports: Vec<u16> = relays.iter().map(|r| r.port).collect();
    let sending = tokio::spawn(send_across(
        ports[1..].to_vec(),
        (0..3000).map(|i| format!("kill-{i}")).collect(),
    ));
    let first = send_across(
        ports[..1].to_vec(),
        (0..600).map(|i| format!("victim-{i}")).collect(),
    )
    .await;
    // Kill relay 0 while it holds leased jobs.
    tokio::time::sleep(Duration::from_millis(200)).await;
    relays[0].child.start_kill().expect("kill -9");
    let _ = relays[0].child.wait().await;
    let mut acked = sending.await.expect("sender");
    acked.extend(first);
    wait_all_delivered(&sink, &acked, Duration::from_secs(120)).await;
}

/// Waits until the default queue has no active, waiting or delayed job and
/// no lock key.
async fn wait_until_no_job_can_run_again(port: u16, timeout: Duration) {
    let mut conn = redis_conn(port).await;
    let q = "bull:cognigy-webhook-retries";
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (active, wait, delayed, locks): (u64, u64, u64, Vec<String>) = redis::pipe()
            .cmd("LLEN")
            .arg(format!("{q}:active"))
            .cmd("LLEN")
            .arg(format!("{q}:wait"))
            .cmd("ZCARD")
            .arg(format!("{q}:delayed"))
            .cmd("KEYS")
            .arg(format!("{q}:*:lock"))
            .query_async(&mut conn)
            .await
            .expect("redis");
        if active + wait + delayed == 0 && locks.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs still in flight: active {active}, wait {wait}, delayed {delayed}, locks {}",
            locks.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection to the test's private redis-server.
async fn redis_conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Calls of one Redis command so far (`INFO commandstats`).
async fn command_calls(port: u16, command: &str) -> u64 {
    let mut conn = redis_conn(port).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_burst_is_stored_and_finished_in_batches() {
    // Unbatched, each event costs at least two scripts (add, finish); the
    // group commit must carry many events per script call under a burst.
    if !crate::redis_server::available() {
        return;
    }
    let app = Arc::new(spawn_app_on(Backend::Redis, |_| {}).await);
    let port = app.redis.as_ref().expect("redis").port;
    let before = command_calls(port, "evalsha").await + command_calls(port, "eval").await;
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..400 {
        let app = app.clone();
        sends.spawn(async move {
            app.post_event(&event("batch", &format!("e-{i}")))
                .await
                .status
        });
    }
    while let Some(status) = sends.join_next().await {
        assert_eq!(status.expect("task"), 200);
    }
    assert!(
        app.sink.wait_for(400, Duration::from_secs(30)).await,
        "all delivered"
    );
    let scripts = command_calls(port, "evalsha").await + command_calls(port, "eval").await - before;
    eprintln!("400 events: {scripts} script calls");
    assert!(
        scripts < 400,
        "{scripts} script calls for 400 events: the adds and finishes are not batched"
    );
}

#[tokio::test]
async fn a_queue_paused_by_a_bullmq_tool_takes_events_and_delivers_them_on_resume() {
    // BullMQ's pause is a flag on the queue's meta hash (what Queue.pause()
    // and the dashboards set): new events are still stored, none is taken.
    if !crate::redis_server::available() {
        return;
    }
    let app = spawn_app_on(Backend::Redis, |_| {}).await;
    let port = app.redis.as_ref().expect("redis").port;
    let mut conn = redis_conn(port).await;
    let meta = format!("bull:{}:meta", app.config.store.queue_name);
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("paused")
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("pause");
    for i in 0..5 {
        let r = app.post_event(&event("paused", &format!("p-{i}"))).await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    // The relay has looked at the paused queue three more times (its claims
    // are script calls) and taken nothing.
    let looked = command_calls(port, "evalsha").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while command_calls(port, "evalsha").await < looked + 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never looked at the queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.sink.posts(), 0, "nothing is delivered while paused");
    let waiting: u64 = redis::cmd("LLEN")
        .arg(format!("bull:{}:wait", app.config.store.queue_name))
        .query_async(&mut conn)
        .await
        .expect("llen");
    assert_eq!(waiting, 5, "stored in wait, not handed to the local pool");

    let _: () = redis::cmd("HDEL")
        .arg(&meta)
        .arg("paused")
        .query_async(&mut conn)
        .await
        .expect("resume");
    assert!(
        app.sink.wait_for(5, Duration::from_secs(10)).await,
        "delivered after resume"
    );
}

#[tokio::test]
async fn a_global_concurrency_set_by_a_bullmq_tool_is_kept() {
    // BullMQ's global concurrency (Queue.setGlobalConcurrency: `concurrency` on
    // the meta hash) bounds the active jobs of all workers together; events
    // handed straight to the local pool count too.
    let Some(most) = most_active_under_concurrency("1").await else {
        return;
    };
    assert_eq!(most, 1, "at most one active job at a time");
}

/// The most jobs active at once while 6 events (each delivered in 150 ms)
/// go through a relay whose queue has the global concurrency `value`
/// (None: no redis-server to run it on).
async fn most_active_under_concurrency(value: &str) -> Option<u64> {
    if !crate::redis_server::available() {
        return None;
    }
    let app = Arc::new(spawn_app_on(Backend::Redis, |_| {}).await);
    app.sink
        .set_default(Behaviour::Delay(Duration::from_millis(150), 200));
    let port = app.redis.as_ref().expect("redis").port;
    let mut conn = redis_conn(port).await;
    let _: () = redis::cmd("HSET")
        .arg(format!("bull:{}:meta", app.config.store.queue_name))
        .arg("concurrency")
        .arg(value)
        .query_async(&mut conn)
        .await
        .expect("set global concurrency");
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..6 {
        let app = app.clone();
        sends.spawn(async move { app.post_event(&event("gc", &format!("g-{i}"))).await.status });
    }
    let active_key = format!("bull:{}:active", app.config.store.queue_name);
    let mut most = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.sink.posts() < 6 {
        let active: u64 = redis::cmd("LLEN")
            .arg(&active_key)
            .query_async(&mut conn)
            .await
            .expect("llen");
        most = most.max(active);
        assert!(Instant::now() < deadline, "not all delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while let Some(status) = sends.join_next().await {
        assert_eq!(status.expect("task"), 200);
    }
    Some(most)
}

/// A key of the queue another program made another type (here `events`, a
/// string): the add is refused before it writes anything, so once the key is
/// mended the sender's resend is stored and delivered. (It wrote the job and
/// its dedup record, then failed: the resend was answered "duplicate" and
/// the event never delivered.)
#[tokio::test]
async fn a_queue_key_of_another_type_refuses_the_event_and_loses_nothing() {
    if !crate::redis_server::available() {
        return;
    }
    let app = spawn_app_on(Backend::Redis, |_| {}).await;
    let port = app.redis.as_ref().expect("redis").port;
    let mut conn = redis_conn(port).await;
    let events = format!("bull:{}:events", app.config.store.queue_name);
    let first = app.post_event(&event("kt", "first")).await;
    assert_eq!(first.status, 200, "{}", first.json);
    // Finished before the key breaks (a finish writes to it too).
    app.wait_counts(Duration::from_secs(10), |c| c["completed"] == 1)
        .await;
    crate::redis_server::break_key(&mut conn, &events).await;
    let broken = event("kt", "while-broken");
    let refused = app.post_event(&broken).await;
    assert_eq!(refused.status, 503, "{}", refused.json);
    crate::redis_server::mend_key(&mut conn, &events).await;
    let again = app.post_event(&broken).await;
    assert_eq!(again.json["status"], "accepted", "{}", again.json);
    wait_until("the resend delivered", Duration::from_secs(10), || async {
        received_ids(&app.sink).contains(&"while-broken".to_string())
    })
    .await;
}

#[tokio::test]
async fn jobs_in_hand_keep_going_out_while_a_take_waits_on_redis() {
    // The dispatcher's take from the queue runs beside the dispatching: while
    // Redis is busy (here a 2.5 s script), the jobs the relay already holds
    // keep starting as workers free up. (A dispatcher that awaited its take
    // would stop at the first take until Redis answered.)
    if !crate::redis_server::available() {
        return;
    }
    let app = spawn_app_on(Backend::Redis, |c| c.delivery.concurrency = 4).await;
    app.sink
        .set_default(Behaviour::Delay(Duration::from_millis(300), 200));
    let port = app.redis.as_ref().expect("redis").port;
    for i in 0..12 {
        let r = app.post_event(&event("busy", &format!("b-{i}"))).await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    // Held by the relay: 4 out to the target (300 ms each), 8 waiting for a
    // worker. A take goes out once fewer than 4 wait, at about 600 ms.
    // A connection that waits for the script however long it runs.
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("client")
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .expect("connect");
    let busy = tokio::spawn(async move {
        redis::cmd("EVAL")
            .arg(
                "local s = redis.call('TIME') repeat local n = redis.call('TIME') \
                 until (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > 2500000 return 1",
            )
            .arg(0)
            .query_async::<i64>(&mut conn)
            .await
    });
    let t0 = Instant::now();
    assert!(
        app.sink.wait_for(12, Duration::from_millis(1800)).await,
        "only {} of 12 went out in {:?} while Redis was busy",
        app.sink.count(),
        t0.elapsed()
    );
    assert_eq!(busy.await.expect("join").expect("busy script"), 1);
    app.sink.set_default(Behaviour::status(200));
    // Nothing was lost on the way: all 12 finish as completed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let counts = app.admin_get("/admin/queue").await;
        if counts.json["completed"] == 12 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all completed: {}",
            counts.json
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Beside 8 M other keys (a day of dedup keys at 100 events/s), a relay with
/// two destinations starts and delivers, and each command answers: nothing
/// walks the keyspace (on 27e726d, `KEYS` at start-up and in every command:
/// "no answer within 2 s"). An unknown destination's name is exit 3 and
/// opens nothing.
#[tokio::test]
async fn a_relay_and_its_commands_work_beside_eight_million_keys() {
    let Some(redis) = RedisServer::start_with(false, true) else {
        return;
    };
    let populated = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "DEBUG",
            "POPULATE",
            "8000000",
            "cognigy-de",
            "1",
        ])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&populated.stdout).trim(), "OK");
    let sink = Sink::start().await.expect("sink");
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("cogrelay.toml");
    std::fs::write(
        &file,
        format!(
            "[[destination]]\nname = \"crm\"\nurl = \"{0}\"\n\n[[destination]]\nname = \"wh\"\nurl = \"{0}\"\n",
            sink.url()
        ),
    )
    .expect("write");
    let mut env = relay_env(&redis);
    env.push(("COGRELAY_CONFIG", file.display().to_string()));
    env.push(("TARGET_ENDPOINT", String::new()));
    let t0 = std::time::Instant::now();
    let relay = start_relay(dir.path(), &sink, &env).await;
    eprintln!("8 M keys: relay ready in {:?}", t0.elapsed());
    let http = reqwest::Client::new();
    assert_eq!(post(&http, relay.port, "beside-8m").await, Some(200));
    assert!(
        sink.wait_for(2, Duration::from_secs(20)).await,
        "both destinations"
    );
    for (args, code) in [
        (&["queue", "stats"][..], 0),
        (&["jobs", "list"][..], 0),
        (&["destinations", "list"][..], 0),
        (&["jobs", "list", "--destination", "wh"][..], 0),
        (&["jobs", "list", "--destination", "nosuch"][..], 3),
        (&["destinations", "pause", "nosuch"][..], 3),
    ] {
        let t0 = std::time::Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("COGRELAY_QUEUE", "redis")
            .env("REDIS_URL", redis.url())
            .output()
            .expect("run cogrelay");
        eprintln!("8 M keys: cogrelay {args:?} in {:?}", t0.elapsed());
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_cogrelay"))
        .args(["destinations", "list", "--json"])
        .env_clear()
        .env("COGRELAY_QUEUE", "redis")
        .env("REDIS_URL", redis.url())
        .output()
        .expect("run cogrelay");
    let names: Vec<String> = serde_json::from_slice::<serde_json::Value>(&listed.stdout)
        .expect("json")
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["name"].as_str().map(str::to_string))
        .collect();
    // From the registry; without a file (as this command runs) `default`
    // is the destination, listed even with nothing in it.
    assert_eq!(names, ["crm", "default", "wh"], "from the registry");
    // 30 lookups of a destination nobody has: 404 each, no connection opened.
    let clients = || {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "CLIENT", "LIST"])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    let before = clients();
    for _ in 0..30 {
        let r = http
            .get(format!(
                "http://127.0.0.1:{}/admin/jobs?destination=nosuch",
                relay.admin_port
            ))
            .send()
            .await
            .expect("admin");
        assert_eq!(r.status(), 404);
    }
    assert_eq!(clients(), before, "an unknown name opened connections");
    drop(relay);
}
