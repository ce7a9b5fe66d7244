//! Pins two behaviours of bullmq-official 1.4.4's manual mode that
//! `src/queue/redis.rs` works around (see docs/scaling-out.md). If an upgrade
//! fixes them, these tests fail: then drop the work-arounds.

use std::time::Duration;

use bullmq as bull;
use serde_json::json;

async fn queue_and_worker(url: &str, name: &str) -> (bull::Queue, bull::Worker) {
    let mut qopts = bull::QueueOptions::new();
    qopts.connection = bull::options::RedisConnectionOptions::new().url(url);
    let queue = bull::Queue::with_options(name, qopts).await.expect("queue");
    let wopts = bull::WorkerOptions {
        connection: bull::options::RedisConnectionOptions::new().url(url),
        autorun: false,
        ..Default::default()
    };
    let noop = |_j: bull::Job, _c: bull::worker::CancellationToken| async {
        Ok::<_, bull::Error>(json!(null))
    };
    let worker = bull::Worker::with_options(name, noop, wopts)
        .await
        .expect("worker");
    (queue, worker)
}

#[tokio::test]
async fn upstream_move_to_delayed_does_not_count_the_attempt() {
    let Some(redis) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    let (queue, worker) = queue_and_worker(&redis.url(), "pin-delayed").await;
    let added = queue.add("j", json!({})).attempts(3).await.expect("add");
    let job = worker
        .get_next_job_nonblocking("t1")
        .await
        .expect("fetch")
        .expect("job");
    assert_eq!(job.id(), added.id());
    job.move_to_delayed(0).await.expect("delay");
    let after = queue.get_job(added.id()).await.expect("get").expect("job");
    assert_eq!(
        after.attempts_made(),
        0,
        "upstream still skips the attempt: keep the HINCRBY work-around"
    );
}

#[tokio::test]
async fn upstream_move_to_completed_ignores_remove_on_complete() {
    let Some(redis) = crate::redis_server::RedisServer::start(false) else {
        return;
    };
    let (queue, worker) = queue_and_worker(&redis.url(), "pin-complete").await;
    for i in 0..2 {
        queue
            .add("j", json!({ "i": i }))
            .remove_on_complete(bull::types::RemoveOnFinish::Count(1))
            .await
            .expect("add");
    }
    for t in ["a", "b"] {
        let mut job = worker
            .get_next_job_nonblocking(t)
            .await
            .expect("fetch")
            .expect("job");
        job.move_to_completed("ok").await.expect("complete");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        queue.get_completed_count().await.expect("count"),
        2,
        "upstream keeps every completed job in manual mode: keep the pruning work-around"
    );
}
