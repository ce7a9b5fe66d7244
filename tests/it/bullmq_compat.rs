//! BullMQ compatibility: BullMQ for Node (the `bullmq` npm package, installed in
//! tests/node by `.ci/run`) reads our queue's counts and a failed job's data and
//! reason, and a job it adds is delivered by cogrelay.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

fn node_ready() -> bool {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    let ok = dir.join("node_modules/bullmq").exists()
        && std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "node and tests/node/node_modules (npm install --prefix tests/node) are required under CI=true"
        );
        eprintln!(
            "SKIPPED: node or tests/node/node_modules missing (run: npm install --prefix tests/node)"
        );
    }
    ok
}

#[tokio::test]
async fn bullmq_for_node_reads_our_queue_and_feeds_it() {
    if !crate::redis_server::available() || !node_ready() {
        return;
    }
    let app = spawn_app_on(Backend::Redis, |c| c.delivery.attempts = 1).await;
    app.sink.set_default(Behaviour::status(500));
    let r = app.post_event(&event("bot", "will-fail")).await;
    let failed_id = r.json["jobId"].as_str().expect("id").to_string();
    app.wait_job(&failed_id, "failed", Duration::from_secs(15))
        .await;
    app.sink.set_default(Behaviour::status(200));

    let port = app.redis.as_ref().expect("redis").port;
    let v = run_node(
        "compat.mjs",
        &[&port.to_string(), &app.config.store.queue_name, &failed_id],
    )
    .await;

    assert_eq!(v["counts"]["failed"], 1, "{v}");
    let failed = &v["failed"];
    assert_eq!(failed["name"], "deliver-event");
    assert_eq!(failed["data"]["eventId"], "will-fail");
    assert_eq!(failed["data"]["eventKey"], "cognigy-bot-will-fail");
    assert_eq!(failed["attemptsMade"], 1);
    assert!(
        failed["failedReason"]
            .as_str()
            .expect("reason")
            .contains("HTTP 500"),
        "{v}"
    );
    let log: Value =
        serde_json::from_str(failed["logs"][0].as_str().expect("log line")).expect("attempt json");
    assert_eq!(
        log["status"], 500,
        "the attempt history is in BullMQ's job log"
    );

    // The job Node added is delivered by cogrelay.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(got) = app
            .sink
            .received()
            .iter()
            .find(|r| r.header("x-event-id") == Some("node-1"))
        {
            assert_eq!(got.body, br#"{"from":"bullmq for node"}"#);
            assert_eq!(
                got.header("idempotency-key"),
                Some("cognigy-node-bot-node-1")
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job added by BullMQ for Node was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // BullMQ's own event stream and job fields reflect cogrelay's delivery
    // (written by cogrelay's batched scripts, src/queue/lua/).
    let added = v["added"].as_str().expect("added id");
    assert_eq!(
        v["completedEvent"]["jobId"], added,
        "QueueEvents saw no completed event: {v}"
    );
    assert_eq!(v["addedJob"]["state"], "completed", "{v}");
    assert_eq!(v["addedJob"]["attemptsMade"], 1, "{v}");
    assert!(v["addedJob"]["finishedOn"].as_u64().is_some(), "{v}");
}
