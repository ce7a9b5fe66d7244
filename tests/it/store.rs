//! The embedded store itself: one process owns it, a dead process's jobs come
//! back at open, a full store answers 503 never 200. (The queue contract on
//! both backends is tests/it/queue_conformance.rs.)

use std::sync::Arc;
use std::time::Duration;

use cogrelay::queue::embedded::EmbeddedQueue;
use cogrelay::queue::{Enqueued, Operate, Queue};

use crate::helpers::*;

use crate::queue_conformance::{ev, open, options};

#[tokio::test]
async fn embedded_store_is_owned_by_one_process() {
    let dir = tempfile::tempdir().expect("tmp");
    let _first = open(dir.path());
    let err = EmbeddedQueue::open(options(dir.path())).expect_err("second owner refused");
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
            c.store.max_db_bytes = 256 * 1024;
            c.delivery.concurrency = 1;
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
