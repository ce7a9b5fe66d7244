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

/// What `tests/node/destinations.mjs` reads with BullMQ for Node from the
/// queues of destinations `crm` and `other` (which it pauses).
async fn node_reads_destinations(app: &TestApp, other: &str) -> Value {
    let port = app.redis.as_ref().expect("redis").port;
    let base = &app.config.store.queue_name;
    run_node(
        "destinations.mjs",
        &[
            &port.to_string(),
            &format!("{base}.crm"),
            &format!("{base}.{other}"),
        ],
    )
    .await
}

/// Two destinations are two BullMQ queues (`QUEUE_NAME.crm`,
/// `QUEUE_NAME.warehouse`): BullMQ for Node reads each one's jobs, with one
/// id per job over both, and its pause of a queue pauses that destination.
#[tokio::test]
async fn bullmq_for_node_sees_each_destination_as_its_queue() {
    if !crate::redis_server::available() || !node_ready() {
        return;
    }
    let warehouse = Sink::start().await.expect("sink");
    let warehouse_url = warehouse.url();
    let app = spawn_app_on(Backend::Redis, |c| {
        let file = format!(
            "[[destination]]\nname = \"crm\"\nurl = \"{}\"\nattempts = 1\n\
             [[destination]]\nname = \"warehouse\"\nurl = \"{warehouse_url}\"\n",
            c.delivery.target
        );
        c.destinations_file = Some(destinations_of(c, &file));
    })
    .await;
    app.sink.set_default(Behaviour::status(500));
    let r = app.post_event(&event("bot", "two-queues")).await;
    let crm_id = r.json["jobs"]["crm"].as_str().expect("crm").to_string();
    let warehouse_id = r.json["jobs"]["warehouse"]
        .as_str()
        .expect("warehouse")
        .to_string();
    assert_ne!(crm_id, warehouse_id, "one id per job over every queue");
    app.wait_job(&crm_id, "failed", Duration::from_secs(15))
        .await;
    app.wait_job(&warehouse_id, "completed", Duration::from_secs(15))
        .await;

    let v = node_reads_destinations(&app, "warehouse").await;
    assert_eq!(v["crm"]["counts"]["failed"], 1, "{v}");
    assert_eq!(v["crm"]["jobs"][0]["id"], crm_id.as_str());
    assert_eq!(v["crm"]["jobs"][0]["data"]["destination"], "crm");
    assert_eq!(v["crm"]["jobs"][0]["data"]["eventId"], "two-queues");
    assert_eq!(v["warehouse"]["counts"]["completed"], 1, "{v}");
    assert_eq!(v["warehouse"]["jobs"][0]["id"], warehouse_id.as_str());
    assert_eq!(v["warehousePaused"], true);
    // BullMQ's pause is the destination's: the relay reports it, and holds
    // the destination's new jobs.
    let listed = app.admin_get("/admin/destinations").await.json;
    let paused = listed
        .as_array()
        .expect("list")
        .iter()
        .find(|d| d["name"] == "warehouse")
        .map(|d| d["paused"].clone());
    assert_eq!(paused, Some(Value::Bool(true)), "{listed}");
}

/// Ordered delivery on Redis (docs/scaling-out.md): a key whose first job
/// failed under `on_failure = "hold"` keeps its later jobs in BullMQ's
/// `waiting-children`; BullMQ for Node counts them there and sees the failed
/// job, and the relay counts them as waiting and shows the key held.
#[tokio::test]
async fn bullmq_for_node_counts_an_ordered_keys_jobs() {
    if !crate::redis_server::available() || !node_ready() {
        return;
    }
    let app = spawn_app_on(Backend::Redis, |c| {
        ordered_crm(c, "attempts = 1\non_failure = \"hold\"\n")
    })
    .await;
    app.sink.set_default(Behaviour::status(500));
    let mut ids = Vec::new();
    for n in 1..=3 {
        let mut e = event("bot", &format!("held-{n}"));
        e["payload"]["sessionId"] = "s1".into();
        let r = app.post_event(&e).await;
        ids.push(r.json["jobs"]["crm"].as_str().expect("crm").to_string());
    }
    app.wait_job(&ids[0], "failed", Duration::from_secs(15))
        .await;
    let v = node_reads_destinations(&app, "other").await;
    assert_eq!(v["crm"]["counts"]["failed"], 1, "{v}");
    assert_eq!(v["crm"]["counts"]["waiting-children"], 2, "{v}");
    assert_eq!(v["crm"]["counts"]["waiting"], 0, "{v}");
    assert_eq!(v["crm"]["jobs"][0]["id"], ids[0].as_str(), "{v}");
    let listed = app.admin_get("/admin/destinations").await.json;
    assert_eq!(listed[0]["counts"]["waiting"], 2, "{listed}");
    assert_eq!(listed[0]["counts"]["failed"], 1, "{listed}");
    assert_eq!(listed[0]["held_keys"][0]["key"], "s1", "{listed}");
    assert_eq!(
        listed[0]["held_keys"][0]["jobId"],
        ids[0].as_str(),
        "{listed}"
    );
}
