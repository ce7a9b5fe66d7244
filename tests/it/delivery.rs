//! SPEC §3.2 end to end: retries with backoff, Retry-After, permanent failures,
//! resets and timeouts; §3.4 outbound signatures checked by an independent
//! Standard Webhooks implementation.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use cogrelay::config::TargetSigningKey;
use cogrelay::queue::DestinationName;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(15);

async fn accepted_id(app: &TestApp, id: &str) -> String {
    let r = app.post_event(&event("bot", id)).await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json["jobId"].as_str().expect("jobId").to_string()
}

both_backends! {
async fn a_delayed_job_shows_when_its_next_attempt_is_due(b: Backend) {
    // Attempt 2 fails at t; attempt 3 is due at t + 2 × BACKOFF_DELAY_MS, which
    // the job view must show (not creation time + the last delay).
    let app = spawn_app_on(b, |c| {
        c.delivery.attempts = 3;
        c.delivery.backoff.base = Duration::from_millis(1500);
    })
    .await;
    app.sink.set_default(Behaviour::status(503));
    let id = accepted_id(&app, "e-due").await;
    let deadline = std::time::Instant::now() + WAIT;
    let job = loop {
        let job = app.wait_job(&id, "delayed", WAIT).await;
        if job["attemptsMade"] == 2 {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let second = &job["attempts"][1];
    let failed_at = second["startedAtMs"].as_i64().expect("startedAtMs")
        + second["durationMs"].as_i64().expect("durationMs");
    let due = job["dueAtMs"].as_i64().expect("dueAtMs");
    assert!(
        (due - (failed_at + 3000)).abs() < 250,
        "due {due}, second attempt ended {failed_at}: {job}"
    );
}

async fn two_503s_then_200_is_delivered_on_attempt_3(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    app.sink.push(Behaviour::status(503));
    app.sink.push(Behaviour::status(503));
    let id = accepted_id(&app, "e-503").await;
    let job = app.wait_job(&id, "completed", WAIT).await;
    let got = app.sink.received();
    let attempts: Vec<_> = got
        .iter()
        .map(|r| r.header("x-delivery-attempt").expect("header").to_string())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert_eq!(job["attemptsMade"], 3);
    let history = job["attempts"].as_array().expect("attempts");
    assert_eq!(history.len(), 3);
    assert_eq!(history[0]["status"], 503);
    assert_eq!(history[0]["outcome"], "retry");
    assert_eq!(history[2]["outcome"], "delivered");
}

async fn a_422_fails_after_one_attempt(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    app.sink.set_default(Behaviour::status(422));
    let id = accepted_id(&app, "e-422").await;
    let job = app.wait_job(&id, "failed", WAIT).await;
    assert_eq!(job["attemptsMade"], 1);
    assert!(
        job["failedReason"]
            .as_str()
            .expect("reason")
            .contains("422"),
        "{job}"
    );
    // Failed is final: with nothing left to run, the count is the last word.
    app.wait_settled(WAIT).await;
    assert_eq!(app.sink.count(), 1, "no more attempts");
}

async fn always_503_fails_after_attempts_with_delays_doubling(b: Backend) {
    let app = spawn_app_on(b, |c| {
        c.delivery.attempts = 5;
        // Long enough that a scheduling stall on a loaded CI machine (the
        // delivery threads run at DELIVERY_NICE) cannot hide the doubling.
        c.delivery.backoff.base = Duration::from_millis(250);
    })
    .await;
    app.sink.set_default(Behaviour::status(503));
    let id = accepted_id(&app, "e-always").await;
    let job = app.wait_job(&id, "failed", WAIT).await;
    assert_eq!(job["attemptsMade"], 5);
    assert!(
        job["failedReason"]
            .as_str()
            .expect("reason")
            .starts_with("gave up after 5 attempts"),
        "{job}"
    );
    let at: Vec<_> = app.sink.received().iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 5);
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    // 250, 500, 1000, 2000 ms: each at least its nominal delay, and growing ~2x.
    for (i, gap) in gaps.iter().enumerate() {
        let nominal = Duration::from_millis(250 << i);
        assert!(*gap >= nominal, "gap {i} = {gap:?} < {nominal:?}");
        assert!(
            *gap < nominal * 3 + Duration::from_millis(300),
            "gap {i} = {gap:?} far above {nominal:?}"
        );
    }
    assert!(gaps[3] > gaps[1] * 2, "exponential: {gaps:?}");
}

async fn retry_after_on_429_delays_the_next_attempt(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    app.sink.push(Behaviour::retry_after(429, "2"));
    let id = accepted_id(&app, "e-429").await;
    app.wait_job(&id, "completed", WAIT).await;
    let at: Vec<_> = app.sink.received().iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 2);
    assert!(
        at[1] - at[0] >= Duration::from_secs(2),
        "waited {:?}",
        at[1] - at[0]
    );
}

/// A target's `Retry-After` of an hour holds the destination: the events
/// that arrive meanwhile wait in the store, where an operator sees them
/// waiting and can remove them (they were handed to the pool and held
/// there leased: active for the hour, and refused removal).
async fn events_held_by_a_long_retry_after_wait_and_can_be_removed(b: Backend) {
    let app = spawn_app_on(b, |_| {}).await;
    app.sink.push(Behaviour::retry_after(429, "3600"));
    let first = accepted_id(&app, "e-held-first").await;
    app.wait_job(&first, "delayed", WAIT).await;
    let mut later = Vec::new();
    for i in 0..4 {
        later.push(accepted_id(&app, &format!("e-held-{i}")).await);
    }
    app.wait_counts(WAIT, |c| c["waiting"] == 4 && c["active"] == 0)
        .await;
    let r = app.admin_delete(&format!("/admin/jobs/{}", later[0])).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(app.sink.received().len(), 1, "nothing sent during the hold");
}

async fn reset_connection_and_timeout_are_retried(b: Backend) {
    let app = spawn_app_on(b, |c| c.delivery.delivery_timeout = Duration::from_millis(300)).await;
    app.sink.push(Behaviour::Reset);
    app.sink.push(Behaviour::Hang);
    let id = accepted_id(&app, "e-flaky").await;
    let job = app.wait_job(&id, "completed", WAIT).await;
    assert_eq!(job["attemptsMade"], 3, "{job}");
    let history = job["attempts"].as_array().expect("attempts");
    assert!(
        history[0]["error"].as_str().expect("error").len() > 3,
        "{job}"
    );
    assert!(history[0].get("status").is_none());
    assert!(
        history[1]["error"]
            .as_str()
            .expect("error")
            .contains("timed out"),
        "{job}"
    );
    assert!(history[1]["durationMs"].as_u64().expect("ms") >= 300);
}

async fn outbound_signature_verifies_with_the_standardwebhooks_crate(b: Backend) {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let app = spawn_app_on(b, |c| {
        c.delivery.signing_key = Some(TargetSigningKey::parse(secret).expect("key"))
    })
    .await;
    accepted_id(&app, "e-signed").await;
    assert!(app.sink.wait_for(1, WAIT).await);
    let got = &app.sink.received()[0];
    assert_eq!(got.header("webhook-id"), Some("cognigy-bot-e-signed"));
    let mut headers = HeaderMap::new();
    for (k, v) in &got.headers {
        headers.insert(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let verifier = standardwebhooks::Webhook::new(secret).expect("secret");
    verifier
        .verify(&got.body, &headers)
        .expect("signature verifies");
    // And a tampered body does not.
    assert!(verifier.verify(b"{\"text\":\"forged\"}", &headers).is_err());
}

/// VERIFY_EVENTS: each envelope is looked up in Cognigy before delivery; one
/// token serves them all; an event Cognigy does not know fails permanently.
async fn verified_events_cost_one_token_and_unknown_events_fail(b: Backend) {
    use cogrelay::cognigy::{Api, RateLimit};
    use cogrelay::sim::{self, SimOptions};
    let (sim_addr, sim) = sim::spawn(SimOptions {
        rate_limit: RateLimit {
            max: 100_000,
            per: Duration::from_secs(60),
        },
        ..Default::default()
    })
    .await
    .expect("sim");
    let mut cognigy = crate::cognigy::client_config(sim_addr, Api::Connectors);
    cognigy.max_retries = 0;
    let app = spawn_app_on(b, |c| c.pool.verify_events = Some(cognigy)).await;

    const N: usize = 1000;
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..N {
        let (poster, limit) = (app.poster(), limit.clone());
        tasks.push(tokio::spawn(async move {
            let _p = limit.acquire_owned().await.expect("permit");
            assert_eq!(poster.post(&event("bot", &format!("v-{i}"))).await, 200);
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert!(
        app.sink.wait_for(N, Duration::from_secs(60)).await,
        "all delivered"
    );
    let stats = sim.stats();
    assert_eq!(stats["eventLookups"], N as u64, "each event verified");
    assert_eq!(
        stats["tokenRequests"], 1,
        "1,000 events cost one token request"
    );

    let id = accepted_id(&app, "unknown-1").await;
    let job = app.wait_job(&id, "failed", WAIT).await;
    assert_eq!(job["failedReason"], "event not found in Cognigy");
    assert_eq!(job["attemptsMade"], 1);
    assert_eq!(app.sink.count(), N, "never delivered");
}
}

/// Lease renewals run where `DeliveryConfig::renewals` says (in the relay: the
/// ingress's runtime, at normal CPU priority). A delivery runtime that cannot
/// run for a while (its threads starved by a busy machine; here its only
/// thread blocked) keeps its leases: no other worker takes the job over and
/// delivers it a second time.
#[test]
fn leases_are_renewed_while_the_delivery_threads_cannot_run() {
    use cogrelay::delivery::{self, handoff::Handoff, DeliveryConfig};
    use cogrelay::metrics::Metrics;
    use std::sync::Arc;

    let runtime = |name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let (main_rt, delivery_rt) = (runtime("main"), runtime("delivery"));
    main_rt.block_on(async {
        let sink = Sink::start().await.expect("sink");
        sink.set_default(Behaviour::Delay(Duration::from_secs(5), 200));
        let tmp = tempfile::tempdir().expect("tmp");
        let lock = Duration::from_millis(600);
        let mut cfg = test_config(&sink, tmp.path().join("data"));
        cfg.pool.lock_duration = lock;
        cfg.pool.shutdown_grace = Duration::from_millis(100);
        let opener = cogrelay::queue::Opener::Relay {
            lock_duration: lock,
        };
        let queue = Arc::new(
            cogrelay::queue::open(&cfg.store, opener)
                .await
                .expect("open"),
        );
        let raw = serde_json::to_vec(&event("bot", "e-renew")).expect("json");
        let ev = cogrelay::ingress::envelope::parse(&raw).expect("event");
        let Enqueued::Accepted(_) = queue.enqueue(ev).await.expect("enqueue") else {
            panic!("accepted")
        };

        let (_handoff, handoff_rx) = Handoff::new(16, lock);
        let (stop, stopped) = tokio::sync::watch::channel(delivery::Stop::Run);
        let pool = delivery_rt.spawn(delivery::run(
            queue.clone(),
            DeliveryConfig::new(
                DestinationName::DEFAULT,
                cfg.delivery.clone(),
                cfg.pool.clone(),
            )
            .renewing_here(),
            Arc::new(tokio::sync::Notify::new()),
            handoff_rx,
            Arc::new(Metrics::default()),
            tokio::sync::mpsc::unbounded_channel().1,
            stopped,
        ));
        assert!(sink.wait_for(1, WAIT).await, "the delivery started");

        // The delivery runtime's only thread is taken for four lease durations;
        // after two, the lease must still be held.
        delivery_rt.spawn(async move { std::thread::sleep(lock * 4) });
        tokio::time::sleep(lock * 2).await;
        let taken = queue
            .claim(10, Duration::from_secs(30))
            .await
            .expect("claim")
            .jobs;
        assert!(
            taken.is_empty(),
            "the lease lapsed while the delivery threads could not run"
        );

        let _ = stop.send(delivery::Stop::Shutdown);
        pool.await.expect("pool task").expect("pool");
    });
    drop(delivery_rt);
}

/// A store on disk and one lane of a single slot (the default
/// destination's) to hand jobs to, as the ingress has them; the handoff's
/// receiving end, and the lease taken.
struct HandoffRig {
    _sink: Sink,
    _tmp: tempfile::TempDir,
    queue: cogrelay::queue::Store,
    lanes: cogrelay::delivery::handoff::LaneSet,
    rx: cogrelay::delivery::handoff::HandoffRx,
    lock: Duration,
}

impl HandoffRig {
    async fn start() -> Self {
        use cogrelay::delivery::handoff::{Handoff, Lane, LaneSet};
        let sink = Sink::start().await.expect("sink");
        let tmp = tempfile::tempdir().expect("tmp");
        let cfg = test_config(&sink, tmp.path().join("data"));
        let lock = Duration::from_secs(30);
        let opener = cogrelay::queue::Opener::Relay {
            lock_duration: lock,
        };
        let queue = cogrelay::queue::open(&cfg.store, opener)
            .await
            .expect("open");
        let (handoff, rx) = Handoff::new(1, lock);
        let lanes = LaneSet::new(vec![Lane {
            destination: DestinationName::DEFAULT,
            handoff,
            wake: std::sync::Arc::new(tokio::sync::Notify::new()),
        }]);
        Self {
            _sink: sink,
            _tmp: tmp,
            queue,
            lanes,
            rx,
            lock,
        }
    }
}

/// Stores event `id` for the default destination through `lanes`.
fn store_through<'a>(
    lanes: &'a cogrelay::delivery::handoff::LaneSet,
    queue: &'a cogrelay::queue::Store,
    id: &str,
) -> impl std::future::Future<Output = cogrelay::queue::QueueResult<cogrelay::queue::Routed>> + 'a {
    let raw = serde_json::to_vec(&event("bot", id)).expect("json");
    let parsed = cogrelay::ingress::envelope::parse(&raw).expect("event");
    lanes.store(
        queue,
        parsed,
        vec![cogrelay::queue::Recipient::from(DestinationName::DEFAULT)],
    )
}

/// A request whose sender hangs up while its event is being stored gives
/// back the handoff room it took: on 788cf99 the room stayed taken for good,
/// and a pool with one slot took no handoff again (its next event was
/// stored waiting, for a claim) until a reload.
#[tokio::test]
async fn a_store_dropped_midway_gives_its_handoff_room_back() {
    let mut rig = HandoffRig::start().await;
    // Polled once (the room taken, the write queued to the store's
    // writer thread, which cannot have committed yet), then dropped, as
    // axum drops a request's handler when its sender hangs up.
    let mut gone = Box::pin(store_through(&rig.lanes, &rig.queue, "gone"));
    tokio::select! {
        biased;
        _ = &mut gone => panic!("stored before its first poll returned"),
        _ = std::future::ready(()) => {}
    }
    drop(gone);

    let routed = store_through(&rig.lanes, &rig.queue, "next")
        .await
        .expect("stored");
    let handed = rig.rx.try_recv().map(|l| l.job.id);
    assert_eq!(
        handed.as_deref(),
        Some(routed.jobs[0].id.as_str()),
        "the next event is handed over: the room came back"
    );
}

/// A job stored for a pool that stopped while the event was being stored
/// (a reload, or shutdown) goes back to the store at once: it was left
/// leased to the stopped pool, and waited for its lease to lapse (30 s by
/// default; an ordered key's later events with it).
#[tokio::test]
async fn a_handoff_its_pool_no_longer_takes_goes_back_to_the_store() {
    let mut rig = HandoffRig::start().await;
    // Polled once (the room taken, the write queued), then the pool stops
    // before the store answers.
    let mut store = Box::pin(store_through(&rig.lanes, &rig.queue, "late"));
    tokio::select! {
        biased;
        _ = &mut store => panic!("stored before its first poll returned"),
        _ = std::future::ready(()) => {}
    }
    assert!(rig.rx.close().is_empty(), "nothing handed over yet");
    let routed = store.await.expect("stored");

    let taken = rig.queue.claim(10, rig.lock).await.expect("claim").jobs;
    assert_eq!(
        taken.iter().map(|l| l.job.id.as_str()).collect::<Vec<_>>(),
        [routed.jobs[0].id.as_str()],
        "the next pool claims it now, not when the lease lapses"
    );
}
