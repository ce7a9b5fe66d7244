//! The circuit breaker of a destination (SPEC §7), with time scaled down:
//! an outage dead-letters nothing and costs few attempts; a `Retry-After`
//! holds the whole destination; a job past its age limit fails saying so.

use std::time::{Duration, Instant};

use cogrelay::destination::CircuitSettings;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(30);

async fn queue(app: &TestApp) -> serde_json::Value {
    app.admin_get("/admin/queue").await.json
}

async fn metrics(app: &TestApp) -> String {
    app.metrics_text().await
}

async fn wait_for_metric(app: &TestApp, line: &str) {
    let deadline = Instant::now() + WAIT;
    while !metrics(app).await.contains(line) {
        assert!(Instant::now() < deadline, "never: {line}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An outage longer than all of a job's retries (5 attempts, 0.2 s backoff:
/// 3 s) dead-letters nothing when the circuit holds the destination, makes
/// few attempts at it, and everything is delivered once it is back. Without
/// the breaker every job would be dead-lettered within the outage.
#[tokio::test]
async fn an_outage_dead_letters_nothing_and_everything_arrives_after_it() {
    let mut app = spawn_app_with(|c| {
        c.delivery.attempts = 5;
        c.delivery.backoff.base = Duration::from_millis(200);
        c.delivery.concurrency = 4;
        c.delivery.circuit = CircuitSettings {
            failures: 5,
            cooldown: Duration::from_millis(500),
            max_cooldown: Duration::from_secs(4),
        };
    })
    .await;
    app.sink.set_default(Behaviour::status(503));
    let n = 30;
    for i in 0..n {
        let reply = app.post_event(&event("bot", &format!("out-{i}"))).await;
        assert_eq!(reply.status, 200);
    }
    wait_for_metric(
        &app,
        r#"cogrelay_destination_circuit{destination="default",state="open"} 1"#,
    )
    .await;
    // The outage goes on until an attempt (a probe) comes more than every
    // job's own retries (0.2 + 0.4 + 0.8 + 1.6 s) after the first one: any
    // job not held by the circuit would have been dead-lettered by then.
    let deadline = Instant::now() + WAIT;
    loop {
        let at: Vec<Instant> = app.sink.received().iter().map(|r| r.at).collect();
        if let (Some(first), Some(last)) = (at.first(), at.last()) {
            if last.duration_since(*first) > Duration::from_millis(3500) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no attempt after the retry span");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = app.sink.posts();
    let q = queue(&app).await;
    assert_eq!(
        q["failed"], 0,
        "nothing dead-lettered during the outage: {q}"
    );
    app.sink.set_default(Behaviour::status(200));
    let deadline = Instant::now() + WAIT;
    loop {
        let q = queue(&app).await;
        if q["completed"] == n {
            assert_eq!(q["failed"], 0, "{q}");
            break;
        }
        assert!(Instant::now() < deadline, "not all delivered: {q}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        during <= 40,
        "a few dozen attempts at a failing destination, not {during}"
    );
    assert_eq!(app.sink.posts() - during, n as usize, "each delivered once");
    wait_for_metric(
        &app,
        r#"cogrelay_destination_circuit{destination="default",state="closed"} 1"#,
    )
    .await;
    app.stop().await.expect("clean stop");
}

/// A 429 with `Retry-After` holds the whole destination that long: no other
/// job is sent to it meanwhile.
#[tokio::test]
async fn retry_after_holds_the_whole_destination() {
    let mut app = spawn_app_with(|c| {
        c.delivery.concurrency = 1;
        c.delivery.circuit.failures = 5;
    })
    .await;
    app.sink.push(Behaviour::retry_after(429, "2"));
    for i in 0..3 {
        let reply = app.post_event(&event("bot", &format!("held-{i}"))).await;
        assert_eq!(reply.status, 200);
    }
    assert!(app.sink.wait_for(4, WAIT).await, "all delivered in the end");
    let got = app.sink.received();
    let gap = got[1].at.duration_since(got[0].at);
    assert!(
        gap >= Duration::from_millis(1900),
        "the next request came {gap:?} after the 429"
    );
    app.stop().await.expect("clean stop");
}

/// The age limit is checked after a failed attempt, never instead of one:
/// a job older than `max_age_secs` whose attempt failed is failed with a
/// reason that says so, every attempt of it was sent, and the destination
/// works afterwards: a new event is delivered, and the dead letter retried
/// past its age is tried again and delivered (on 27e726d: failed at once,
/// untried).
#[tokio::test]
async fn a_job_past_its_age_limit_fails_after_an_attempt_and_is_tried_when_retried() {
    let mut app = spawn_app_with(|c| {
        c.delivery.max_age = Duration::from_secs(1);
        c.delivery.attempts = 100;
        c.delivery.backoff.base = Duration::from_millis(600);
    })
    .await;
    app.sink.set_default(Behaviour::status(503));
    let reply = app.post_event(&event("bot", "too-old")).await;
    let id = reply.json["jobId"].as_str().expect("id").to_string();
    let job = app.wait_job(&id, "failed", WAIT).await;
    assert_eq!(
        job["failedReason"], "not delivered within max_age_secs (1 s): target answered HTTP 503",
        "{job}"
    );
    assert_eq!(
        app.sink.posts() as u64,
        job["attemptsMade"].as_u64().expect("n"),
        "every attempt was sent, the last one too: {job}"
    );
    app.sink.set_default(Behaviour::status(200));
    let before = app.sink.posts();
    let fresh = app.post_event(&event("bot", "after-the-age")).await;
    assert_eq!(fresh.status, 200);
    let retried = app.admin_post(&format!("/admin/jobs/{id}/retry")).await;
    assert_eq!(retried.status, 200, "{}", retried.json);
    let job = app.wait_job(&id, "completed", WAIT).await;
    assert_eq!(job["attemptsMade"], 1, "tried again: {job}");
    assert!(app.sink.wait_for(before + 2, WAIT).await, "both delivered");
    app.stop().await.expect("clean stop");
}

/// On Redis the circuit is shared: once it is open, three relays send the
/// failing destination one probe per cool-down between them (not one each,
/// nor their whole backlog), and everything arrives after it recovers.
#[tokio::test]
async fn three_relays_on_redis_probe_as_one() {
    let Some(redis) = crate::redis_server::RedisServer::start(true) else {
        return;
    };
    let sink = Sink::start().await.expect("sink");
    sink.set_default(Behaviour::status(503));
    let mut apps = Vec::new();
    for _ in 0..3 {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut cfg = test_config(&sink, tmp.path().join("data"));
        cfg.store.kind = cogrelay::config::QueueKind::Redis;
        cfg.store.redis_url = cogrelay::secret::Secret::new(redis.url());
        cfg.delivery.attempts = 50;
        cfg.delivery.concurrency = 2;
        cfg.delivery.circuit = CircuitSettings {
            failures: 3,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(8),
        };
        apps.push((start(cfg, sink.clone()).await, tmp));
    }
    let n = 30;
    for i in 0..n {
        let reply = apps[i % 3]
            .0
            .post_event(&event("bot", &format!("shared-{i}")))
            .await;
        assert_eq!(reply.status, 200);
    }
    // Open for every relay: the queue's meta holds it. (A connection that
    // waits however long the reply takes: a Redis writing its AOF on a
    // loaded machine answered a read after the client's default 500 ms.)
    let mut conn = redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .expect("conn");
    // Each time the shared circuit opens for a new period: the first
    // opening, then each failed probe (deliveries already on their way when
    // it opened move it by a few ms only, and do not count).
    let deadline = Instant::now() + WAIT;
    let mut openings: Vec<(i64, usize)> = Vec::new();
    while openings.len() < 3 {
        let until: Option<i64> = redis::cmd("HGET")
            .arg("bull:cognigy-webhook-retries:meta")
            .arg("cg:openUntil")
            .query_async(&mut conn)
            .await
            .expect("hget");
        if let Some(until) = until {
            if openings.last().is_none_or(|(last, _)| until > last + 500) {
                openings.push((until, sink.posts()));
            }
        }
        assert!(Instant::now() < deadline, "openings: {openings:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Between the second and the third opening: the one round of trials
    // that failed, whichever of the three relays sent it.
    let probes = openings[2].1 - openings[1].1;
    assert!(
        (1..=cogrelay::queue::CIRCUIT_TRIALS as usize).contains(&probes),
        "{probes} attempts over three relays between two openings: one round of trials per cool-down"
    );
    sink.set_default(Behaviour::status(200));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let q = apps[0].0.admin_get("/admin/queue").await.json;
        if q["completed"] == n {
            assert_eq!(q["failed"], 0, "{q}");
            break;
        }
        assert!(Instant::now() < deadline, "not all delivered: {q}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (mut app, _tmp) in apps {
        app.stop().await.expect("clean stop");
    }
}

both_backends! {
    /// A flaky destination (runs of failures that open the circuit, mixed
    /// with successes) still gets every event once it answers: the circuit
    /// never stays shut (a soak on Redis once left jobs waiting).
    async fn a_flaky_destination_gets_everything_in_the_end(b: Backend) {
        let mut app = spawn_app_on(b, |c| {
            c.delivery.attempts = 100;
            c.delivery.concurrency = 4;
            c.delivery.circuit = CircuitSettings {
                failures: 3,
                cooldown: Duration::from_millis(200),
                max_cooldown: Duration::from_secs(1),
            };
        })
        .await;
        // Runs of five failures (the circuit opens) between successes.
        for k in 0..300 {
            app.sink.push(if k % 8 < 5 {
                Behaviour::status(503)
            } else {
                Behaviour::status(200)
            });
        }
        let n = 150;
        for i in 0..n {
            let reply = app.post_event(&event("bot", &format!("flaky-{i}"))).await;
            assert_eq!(reply.status, 200);
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let delivered: std::collections::HashSet<String> =
                crate::process::ids_answered_200(&app.sink).into_iter().collect();
            if delivered.len() == n {
                break;
            }
            let q = queue(&app).await;
            assert!(Instant::now() < deadline, "stuck at {} of {n}: {q}", delivered.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app.stop().await.expect("clean stop");
    }
}

/// A rule for the sink: `event id` prefix → its answers by attempt.
fn burst_rule() -> cogrelay::sink::Rule {
    std::sync::Arc::new(|id: &str, n: u32| {
        let id = id.strip_prefix("cognigy-bot-").unwrap_or(id);
        if id.starts_with("f503-") && n <= 2 {
            Some(Behaviour::status(503))
        } else if id.starts_with("reset-") && n == 1 {
            Some(Behaviour::Reset)
        } else if id.starts_with("r429-") && n == 1 {
            Some(Behaviour::retry_after(429, "1"))
        } else if id.starts_with("r422-") {
            Some(Behaviour::status(422))
        } else {
            None
        }
    })
}

/// The burst of events failing for their own reasons (the issue's, time
/// scaled: a 1 s cool-down up to 30 s): 300 good events, then 40 answered
/// 503 twice, 20 reset once, 20 answered 429 once, 20 rejected with 422
/// (`CONCURRENCY=16 ATTEMPTS=4 BACKOFF_DELAY_MS=100`). The breaker may open
/// on the run of 503s, but an event counts once, its trials are the
/// freshest events and one answer closes it: everything settles within 20
/// s, each 422 tried once (on 27e726d every probe was one of the failing
/// events, and the cool-down doubled to its cap while the rest waited).
#[tokio::test]
async fn a_burst_of_events_failing_for_their_own_reasons_holds_no_healthy_destination() {
    let mut app = spawn_app_with(|c| {
        c.delivery.attempts = 4;
        c.delivery.backoff.base = Duration::from_millis(100);
        c.delivery.concurrency = 16;
        c.store.retention.remove_on_complete = 10_000;
        c.delivery.circuit = CircuitSettings {
            failures: 5,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(30),
        };
    })
    .await;
    app.sink.set_rule(Some(burst_rule()));
    let mut ids: Vec<String> = (0..300).map(|i| format!("good-{i}")).collect();
    for (prefix, n) in [("f503", 40), ("reset", 20), ("r429", 20), ("r422", 20)] {
        ids.extend((0..n).map(|i| format!("{prefix}-{i}")));
    }
    let t0 = Instant::now();
    for id in &ids {
        assert_eq!(app.post_event(&event("bot", id)).await.status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let settled = loop {
        let q = app.admin_get("/admin/queue").await.json;
        if q["completed"] == 380 && q["failed"] == 20 {
            break q;
        }
        if Instant::now() > deadline {
            for r in app.sink.received() {
                eprintln!(
                    "{:>6} ms {} #{} -> {:?}",
                    r.at.duration_since(t0).as_millis(),
                    r.header("x-event-id").unwrap_or("-"),
                    r.header("x-delivery-attempt").unwrap_or("-"),
                    r.behaviour
                );
            }
            panic!("not settled: {q}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("burst settled in {:?}: {settled}", t0.elapsed());
    let tried_422 = app
        .sink
        .received()
        .iter()
        .filter(|r| r.header("x-event-id").is_some_and(|e| e.contains("r422-")))
        .count();
    assert_eq!(tried_422, 20, "each 422 tried once");
    app.stop().await.expect("clean stop");
}

/// Two events answered 503 on every attempt, on a destination with no other
/// traffic (`CIRCUIT_FAILURES=3`, 5 attempts, 0.1 s backoff): each runs out
/// its own attempts within two seconds and is dead-lettered, and an event
/// posted after them is delivered at once. When every attempt counted,
/// their third failures opened the circuit, they became its trials (which
/// keep their last attempt), and the cool-down (here 10 s, doubling) held
/// them and the good event.
#[tokio::test]
async fn events_failing_for_their_own_reasons_open_no_quiet_destination() {
    let mut app = spawn_app_with(|c| {
        c.delivery.attempts = 5;
        c.delivery.backoff.base = Duration::from_millis(100);
        c.delivery.circuit = CircuitSettings {
            failures: 3,
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(60),
        };
    })
    .await;
    app.sink
        .set_rule(Some(std::sync::Arc::new(|id: &str, _n: u32| {
            id.contains("bad-").then(|| Behaviour::status(503))
        })));
    let mut bad = Vec::new();
    for id in ["bad-1", "bad-2"] {
        let reply = app.post_event(&event("bot", id)).await;
        assert_eq!(reply.status, 200);
        bad.push(reply.json["jobId"].as_str().expect("id").to_string());
    }
    for id in &bad {
        let job = app.wait_job(id, "failed", Duration::from_secs(8)).await;
        assert_eq!(job["attemptsMade"], 5, "its own attempts: {job}");
    }
    let good = app.post_event(&event("bot", "good-1")).await;
    let good = good.json["jobId"].as_str().expect("id").to_string();
    app.wait_job(&good, "completed", Duration::from_secs(5))
        .await;
    wait_for_metric(
        &app,
        r#"cogrelay_destination_circuit{destination="default",state="closed"} 1"#,
    )
    .await;
    app.stop().await.expect("clean stop");
}

/// `CIRCUIT_FAILURES=1`, a 3 s cool-down, `MAX_AGE_SECS=2`, a 5 s outage,
/// one event before it and one after: the trial that comes past the first
/// event's age is an attempt whose verdict the breaker hears, so the
/// circuit does not stay half-open, and the second event is delivered (on
/// 27e726d the trial ended on the age limit without a verdict: half-open
/// until a restart, the second event never delivered).
#[tokio::test]
async fn a_trial_past_its_age_limit_leaves_the_circuit_working() {
    let mut app = spawn_app_with(|c| {
        c.delivery.attempts = 100;
        c.delivery.max_age = Duration::from_secs(2);
        c.delivery.circuit = CircuitSettings {
            failures: 1,
            cooldown: Duration::from_secs(3),
            max_cooldown: Duration::from_secs(300),
        };
    })
    .await;
    app.sink.set_default(Behaviour::status(503));
    let outage = Instant::now();
    let before = app.post_event(&event("bot", "before")).await;
    assert_eq!(before.status, 200);
    // The outage lasts 5 s (its length is the scenario, not a verdict).
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(outage.elapsed())).await;
    app.sink.set_default(Behaviour::status(200));
    // The second event comes once the first has its verdict (the trial that
    // used to end on its age limit without one).
    let first = before.json["jobId"].as_str().expect("id").to_string();
    let deadline = Instant::now() + WAIT;
    loop {
        let state = app.admin_get(&format!("/admin/jobs/{first}")).await.json["state"].clone();
        if state == "completed" || state == "failed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first event has no verdict: {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = app.post_event(&event("bot", "after")).await;
    let id = after.json["jobId"].as_str().expect("id").to_string();
    app.wait_job(&id, "completed", WAIT).await;
    wait_for_metric(
        &app,
        r#"cogrelay_destination_circuit{destination="default",state="closed"} 1"#,
    )
    .await;
    let job = app.admin_get(&format!("/admin/jobs/{first}")).await.json;
    assert!(
        job["state"] == "completed"
            || job["failedReason"]
                .as_str()
                .is_some_and(|r| r.starts_with("not delivered within max_age_secs")),
        "the first one delivered, or failed after an attempt past its age: {job}"
    );
    app.stop().await.expect("clean stop");
}

both_backends! {
    /// An open circuit holds its jobs in the store, not in the pool: they
    /// count as waiting (none active), and `/admin/destinations` says when
    /// the next trial is due.
    async fn jobs_held_by_an_open_circuit_wait_unleased_and_the_next_trial_is_shown(b: Backend) {
        let mut app = spawn_app_on(b, |c| {
            c.delivery.attempts = 100;
            c.delivery.concurrency = 4;
            c.delivery.circuit = CircuitSettings {
                failures: 2,
                cooldown: Duration::from_secs(30),
                max_cooldown: Duration::from_secs(60),
            };
        })
        .await;
        app.sink.set_default(Behaviour::status(503));
        for i in 0..20 {
            assert_eq!(app.post_event(&event("bot", &format!("held-{i}"))).await.status, 200);
        }
        let q = app
            .wait_counts(WAIT, |c| c["active"] == 0 && c["waiting"] == 20 && c["delayed"] == 0)
            .await;
        assert_eq!(q["failed"], 0, "{q}");
        let list = app.admin_get("/admin/destinations").await.json;
        let d = &list[0];
        assert_eq!(d["circuit"], "open", "{d}");
        let next = d["next_probe_at"].as_str().expect("next_probe_at while open");
        assert!(next.ends_with('Z') && next.len() >= 20, "an RFC 3339 time: {next}");
        app.stop().await.expect("clean stop");
    }
}
