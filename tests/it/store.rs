//! The queue contract against the embedded backend (written generic over
//! `Queue` so every backend runs the same checks), and store failures: a store
//! that cannot take an event makes the ingress answer 503, never 200.

use std::sync::Arc;
use std::time::Duration;

use cogrelay::config::Fsync;
use cogrelay::ingress::envelope;
use cogrelay::queue::embedded::{EmbeddedOptions, EmbeddedQueue};
use cogrelay::queue::redis::{RedisOptions, RedisQueue};
use cogrelay::queue::{
    now_ms, Attempt, AttemptOutcome, Disposition, Enqueued, JobState, Queue, QueueSettings,
};

use crate::helpers::*;

fn open(dir: &std::path::Path) -> EmbeddedQueue {
    EmbeddedQueue::open(EmbeddedOptions {
        data_dir: dir.to_path_buf(),
        fsync: Fsync::Always,
        max_db_bytes: 0,
        settings: QueueSettings {
            dedup_ttl: Duration::from_secs(60),
            remove_on_complete: 2,
        },
        exclusive: true,
    })
    .expect("open")
}

fn ev(id: &str) -> envelope::Event {
    envelope::parse(
        serde_json::to_vec(&event("b", id))
            .expect("json")
            .as_slice(),
    )
    .expect("event")
}

fn attempt(n: u32, outcome: AttemptOutcome) -> Attempt {
    Attempt {
        n,
        started_at_ms: now_ms(),
        duration_ms: 1,
        status: Some(500),
        error: None,
        outcome,
    }
}

/// Leases: an expired lease is taken over without counting the attempt, and the
/// stalled worker's late result changes nothing.
async fn expired_lease_is_taken_over<Q: Queue>(q: &Q) {
    let Enqueued::Accepted(id) = q.enqueue(ev("lease")).await.expect("enqueue") else {
        panic!("accepted")
    };
    let mut first = q
        .claim(10, Duration::from_millis(100))
        .await
        .expect("claim")
        .jobs;
    assert_eq!(first.len(), 1);
    assert!(
        q.claim(10, Duration::from_millis(300))
            .await
            .expect("claim")
            .jobs
            .is_empty(),
        "leased"
    );
    // Taken over once the lease expired (Redis: at BullMQ's next stalled checks).
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let mut second = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let jobs = q
            .claim(10, Duration::from_secs(30))
            .await
            .expect("claim")
            .jobs;
        if !jobs.is_empty() {
            break jobs;
        }
        assert!(std::time::Instant::now() < deadline, "never taken over");
    };
    assert_eq!(second.len(), 1, "taken over after the lease expired");
    assert_eq!(second[0].job.id, id);
    assert_eq!(
        second[0].job.attempts_made, 0,
        "the stalled attempt is not counted"
    );

    let stale = first.remove(0);
    let applied = q
        .finish(
            stale,
            attempt(1, AttemptOutcome::Delivered),
            Disposition::Completed,
        )
        .await
        .expect("finish");
    assert!(!applied, "the stalled worker's result is ignored");
    let live = second.remove(0);
    let applied = q
        .finish(
            live,
            attempt(1, AttemptOutcome::Failed),
            Disposition::Failed { reason: "x".into() },
        )
        .await
        .expect("finish");
    assert!(applied);
    let view = q.get(&id).await.expect("get");
    assert_eq!(view.state, JobState::Failed);
    assert_eq!(view.attempts_made, 1);
}

/// Delayed jobs are claimable only once due; counts follow the states.
async fn retries_wait_until_due<Q: Queue>(q: &Q) {
    q.enqueue(ev("due")).await.expect("enqueue");
    let job = q
        .claim(1, Duration::from_secs(30))
        .await
        .expect("claim")
        .jobs
        .pop()
        .expect("job");
    let due = now_ms() + 300;
    q.finish(
        job,
        attempt(1, AttemptOutcome::Retry),
        Disposition::RetryAt {
            due_at_ms: due,
            reason: "503".into(),
        },
    )
    .await
    .expect("finish");
    let c = q.counts().await.expect("counts");
    assert_eq!((c.delayed, c.active, c.waiting), (1, 0, 0));
    let early = q.claim(1, Duration::from_secs(30)).await.expect("claim");
    assert!(early.jobs.is_empty());
    assert!(
        early.next_due_ms.is_some_and(|t| t >= due - 5),
        "tells when to look again"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let again = q
        .claim(1, Duration::from_secs(30))
        .await
        .expect("claim")
        .jobs
        .pop()
        .expect("due now");
    assert_eq!(again.job.attempts_made, 1);
}

/// Completed jobs beyond REMOVE_ON_COMPLETE are pruned (here 2).
async fn completed_jobs_are_pruned<Q: Queue>(q: &Q) {
    for i in 0..5 {
        q.enqueue(ev(&format!("prune-{i}"))).await.expect("enqueue");
    }
    for job in q
        .claim(10, Duration::from_secs(30))
        .await
        .expect("claim")
        .jobs
    {
        q.finish(
            job,
            attempt(1, AttemptOutcome::Delivered),
            Disposition::Completed,
        )
        .await
        .expect("finish");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        // Pruning runs with the store's housekeeping: after writes, and when idle.
        q.claim(1, Duration::from_secs(30)).await.expect("claim");
        let c = q.counts().await.expect("counts");
        if c.completed == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "completed never pruned to 2: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn open_redis(server: &crate::redis_server::RedisServer) -> RedisQueue {
    RedisQueue::connect(RedisOptions {
        url: server.url(),
        ca_pem: None,
        queue_name: "conformance".into(),
        lock_duration: Duration::from_millis(300),
        settings: QueueSettings {
            dedup_ttl: Duration::from_secs(60),
            remove_on_complete: 2,
        },
    })
    .await
    .expect("connect")
}

#[tokio::test]
async fn redis_expired_lease_is_taken_over() {
    let Some(server) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    expired_lease_is_taken_over(&open_redis(&server).await).await;
}

#[tokio::test]
async fn redis_retries_wait_until_due() {
    let Some(server) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    retries_wait_until_due(&open_redis(&server).await).await;
}

#[tokio::test]
async fn redis_completed_jobs_are_pruned() {
    let Some(server) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    completed_jobs_are_pruned(&open_redis(&server).await).await;
}

#[tokio::test]
async fn embedded_expired_lease_is_taken_over() {
    let dir = tempfile::tempdir().expect("tmp");
    expired_lease_is_taken_over(&open(dir.path())).await;
}

#[tokio::test]
async fn embedded_retries_wait_until_due() {
    let dir = tempfile::tempdir().expect("tmp");
    retries_wait_until_due(&open(dir.path())).await;
}

#[tokio::test]
async fn embedded_completed_jobs_are_pruned() {
    let dir = tempfile::tempdir().expect("tmp");
    completed_jobs_are_pruned(&open(dir.path())).await;
}

#[tokio::test]
async fn embedded_store_is_owned_by_one_process() {
    let dir = tempfile::tempdir().expect("tmp");
    let _first = open(dir.path());
    let err = EmbeddedQueue::open(EmbeddedOptions {
        data_dir: dir.path().to_path_buf(),
        fsync: Fsync::Always,
        max_db_bytes: 0,
        settings: QueueSettings {
            dedup_ttl: Duration::from_secs(60),
            remove_on_complete: 2,
        },
        exclusive: true,
    })
    .expect_err("second owner refused");
    assert!(
        err.to_string().contains("another cogrelay process"),
        "{err}"
    );
}

#[tokio::test]
async fn active_jobs_of_a_dead_process_are_back_at_open() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let q = open(dir.path());
        q.enqueue(ev("orphan")).await.expect("enqueue");
        let leased = q
            .claim(1, Duration::from_secs(3600))
            .await
            .expect("claim")
            .jobs;
        assert_eq!(leased.len(), 1);
        std::mem::forget(leased);
        q.close().await.expect("close");
    }
    let q = open(dir.path());
    let jobs = q
        .claim(1, Duration::from_secs(30))
        .await
        .expect("claim")
        .jobs;
    assert_eq!(jobs.len(), 1, "the hour-long lease did not hold it hostage");
    assert_eq!(jobs[0].job.attempts_made, 0);
}

/// A full store (the same SQLITE_FULL a full disk gives) answers 503, never
/// 200. Requests arrive 32 at a time, so each group commit holds many and the
/// store fills up in the middle of batches; after a restart the store holds
/// exactly the events that were answered 200.
#[tokio::test]
async fn full_store_answers_503_never_200() {
    let app = Arc::new(
        spawn_app_with(|c| {
            c.max_db_bytes = 256 * 1024;
            c.concurrency = 1;
        })
        .await,
    );
    app.sink.set_default(Behaviour::Hang); // nothing completes, nothing is pruned
    let mut accepted = std::collections::BTreeSet::new();
    let mut refused = 0;
    let mut round = 0;
    while refused < 64 {
        let mut sends = tokio::task::JoinSet::new();
        for k in 0..32 {
            let app = app.clone();
            let id = format!("fill-{round}-{k}");
            sends.spawn(async move {
                let mut e = event("bot", &id);
                e["payload"] = serde_json::json!({ "blob": "x".repeat(2000) });
                (id, app.post_event(&e).await)
            });
        }
        while let Some(res) = sends.join_next().await {
            let (id, r) = res.expect("task");
            match r.status {
                200 => {
                    assert_eq!(r.json["status"], "accepted");
                    accepted.insert(id);
                }
                503 => {
                    assert_eq!(r.json["error"], "Queue unavailable");
                    assert!(r.headers.contains_key("retry-after"));
                    refused += 1;
                }
                other => panic!("unexpected {other}: {}", r.json),
            }
        }
        round += 1;
        assert!(round < 500, "the store never filled up");
    }
    assert!(!accepted.is_empty());
    let app = Arc::into_inner(app).expect("one owner").restart().await;
    let mut stored = std::collections::BTreeSet::new();
    let mut offset = 0;
    loop {
        let page = app
            .admin_get(&format!("/admin/jobs?offset={offset}&limit=500"))
            .await
            .json;
        let items = page["items"].as_array().expect("items").clone();
        stored.extend(
            items
                .iter()
                .map(|j| j["eventId"].as_str().expect("eventId").to_string()),
        );
        offset += items.len();
        if items.is_empty() || offset as u64 >= page["total"].as_u64().expect("total") {
            break;
        }
    }
    assert_eq!(
        stored, accepted,
        "after a restart: every event answered 200, and none answered 503"
    );
}

#[tokio::test]
async fn a_queue_is_usable_from_many_tasks() {
    let dir = tempfile::tempdir().expect("tmp");
    let q = Arc::new(open(dir.path()));
    let mut handles = Vec::new();
    for i in 0..200 {
        let q = q.clone();
        handles.push(tokio::spawn(async move {
            q.enqueue(ev(&format!("par-{i}"))).await
        }));
    }
    for h in handles {
        assert!(matches!(
            h.await.expect("task").expect("enqueue"),
            Enqueued::Accepted(_)
        ));
    }
    assert_eq!(q.counts().await.expect("counts").waiting, 200);
}
