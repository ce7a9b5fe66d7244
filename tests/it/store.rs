//! The embedded store itself: one process owns it, a dead process's jobs come
//! back at open, a full store answers 503 never 200. (The queue contract on
//! both backends is tests/it/queue_conformance.rs.)

use std::sync::Arc;
use std::time::Duration;

use cogrelay::queue::embedded::EmbeddedQueue;
use cogrelay::queue::{Enqueued, JobState, Operate, Queue};

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

/// A store written by the version before destinations (schema 2: no
/// `destination` column, one job per dedup record) opens with its jobs as
/// the `default` destination's, delivered from there, and its dedup records
/// still answer duplicates with the first job's id.
#[tokio::test]
async fn a_store_of_the_previous_version_keeps_its_jobs_and_duplicates() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(dir.path()).expect("dir");
    let old = ev("before-destinations");
    {
        let conn = rusqlite::Connection::open(dir.path().join("cogrelay.db")).expect("sqlite");
        conn.execute_batch(
            "CREATE TABLE jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, event_key TEXT NOT NULL, event_id TEXT NOT NULL,
                bot_id TEXT, event_type TEXT, kind TEXT NOT NULL, body BLOB NOT NULL, state TEXT NOT NULL,
                attempts_made INTEGER NOT NULL DEFAULT 0, due_at_ms INTEGER NOT NULL, lease_token TEXT,
                lease_until_ms INTEGER, created_at_ms INTEGER NOT NULL, finished_at_ms INTEGER,
                failed_reason TEXT, stalls INTEGER NOT NULL DEFAULT 0, attempts_log TEXT NOT NULL DEFAULT '[]');
             CREATE INDEX jobs_due ON jobs(due_at_ms, seq) WHERE state IN ('waiting','delayed');
             CREATE TABLE dedup (event_key TEXT PRIMARY KEY, job_seq INTEGER NOT NULL,
                expires_at_ms INTEGER NOT NULL) WITHOUT ROWID;
             PRAGMA user_version = 2;",
        )
        .expect("old schema");
        let now = cogrelay::queue::now_ms();
        conn.execute(
            "INSERT INTO jobs (seq, event_key, event_id, bot_id, event_type, kind, body, state, due_at_ms, created_at_ms)
             VALUES (41, ?1, ?2, 'b', 'message.received', 'event', ?3, 'waiting', ?4, ?4)",
            rusqlite::params![old.key.as_str(), old.event_id, old.body, now],
        )
        .expect("old job");
        conn.execute(
            "INSERT INTO dedup (event_key, job_seq, expires_at_ms) VALUES (?1, 41, ?2)",
            rusqlite::params![old.key.as_str(), now + 60_000],
        )
        .expect("old dedup");
    }
    let q = open(dir.path());
    assert_eq!(
        q.enqueue(ev("before-destinations")).await.expect("enqueue"),
        Enqueued::Duplicate("41".into()),
        "the old dedup record answers"
    );
    let view = q.get("41").await.expect("get");
    assert_eq!(view.destination, "default");
    let claimed = q
        .claim(10, Duration::from_secs(30))
        .await
        .expect("claim")
        .jobs;
    assert_eq!(claimed.len(), 1, "the default destination's pool takes it");
    assert_eq!(claimed[0].job.id, "41");
    let fresh = match q.enqueue(ev("after")).await.expect("enqueue") {
        Enqueued::Accepted(id) => id,
        other => panic!("{other:?}"),
    };
    assert_eq!(fresh, "42", "ids go on from the old ones");
}

/// Rows of the store's `jobs` table, read from the file beside the store.
fn job_rows(dir: &std::path::Path) -> i64 {
    rusqlite::Connection::open(dir.join("cogrelay.db"))
        .expect("sqlite")
        .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
        .expect("count")
}

/// An event stored for several destinations without a handoff is one row
/// (the ingest's one durable write per event, whatever the fan-out): the
/// other destinations' jobs have their ids at once, are counted, listed,
/// shown and removable as waiting jobs, survive a restart, and become rows
/// of their own when a destination claims (see the module doc of the
/// embedded store).
#[tokio::test]
async fn a_fanned_out_event_is_one_row_until_a_destination_claims() {
    let dir = tempfile::tempdir().expect("tmp");
    let four = || ["a", "b", "c", "d"].map(String::from).to_vec();
    let ids = |r: &cogrelay::queue::Routed| -> Vec<String> {
        r.jobs.iter().map(|j| j.id.clone()).collect()
    };
    let (first, second) = {
        let q = open(dir.path());
        let (one, _) = q.store(ev("fan-1"), four(), None).await.expect("store");
        let (two, _) = q.store(ev("fan-2"), four(), None).await.expect("store");
        assert!(!one.duplicate);
        assert_eq!(
            ids(&one),
            ["1", "2", "3", "4"],
            "every destination's id at once"
        );
        assert_eq!(
            ids(&two),
            ["5", "6", "7", "8"],
            "ids reserved, never reused"
        );
        assert_eq!(job_rows(dir.path()), 2, "one row per event");
        let (again, leased) = q.store(ev("fan-1"), four(), None).await.expect("store");
        assert!(again.duplicate && leased.is_empty());
        assert_eq!(ids(&again), ids(&one), "a duplicate names the same jobs");
        let c = q.counts_for(Some("c")).await.expect("counts");
        assert_eq!((c.waiting, c.active), (2, 0), "{c:?}");
        assert!(c.oldest_waiting_ms.is_some());
        assert_eq!(q.counts_for(None).await.expect("counts").waiting, 8);
        assert_eq!(
            q.destination_names().await.expect("names"),
            ["a", "b", "c", "d"]
        );
        assert_eq!(job_rows(dir.path()), 2, "a count writes nothing out");
        q.close().await.expect("close");
        (one, two)
    };
    // After a restart the bundled jobs are still there, and each operation
    // on one of them finds it.
    let q = open(dir.path());
    let view = q.get(&second.jobs[3].id).await.expect("get");
    assert_eq!(
        (view.destination.as_str(), view.state),
        ("d", JobState::Waiting)
    );
    assert!(view.payload.is_some(), "the event's body");
    assert_eq!(
        job_rows(dir.path()),
        2 + 3,
        "the second event's jobs are rows now"
    );
    q.remove(&first.jobs[0].id).await.expect("remove a's job");
    let claimed = q
        .claim_for("c", 10, Duration::from_secs(30))
        .await
        .expect("claim")
        .jobs;
    let claimed: Vec<&str> = claimed.iter().map(|l| l.job.id.as_str()).collect();
    assert_eq!(
        claimed,
        [first.jobs[2].id.as_str(), second.jobs[2].id.as_str()]
    );
    assert_eq!(
        job_rows(dir.path()),
        8 - 1,
        "every job a row but the removed one"
    );
    let b = q.counts_for(Some("b")).await.expect("counts");
    assert_eq!(b.waiting, 2, "removing a's job kept b's: {b:?}");
    let next = q.store(ev("fan-3"), four(), None).await.expect("store").0;
    assert_eq!(next.jobs[0].id, "9", "ids go on after the reserved ones");
    // With a handoff, the paused destinations' jobs are the bundle and the
    // others are leased rows.
    q.set_paused("b", true).await.expect("pause");
    q.set_paused("c", true).await.expect("pause");
    let rows = job_rows(dir.path());
    let (routed, leased) = q
        .store(ev("fan-4"), four(), Some(Duration::from_secs(30)))
        .await
        .expect("store");
    let handed: Vec<&str> = leased
        .iter()
        .map(|l| l.lease.destination.as_str())
        .collect();
    assert_eq!(handed, ["a", "d"]);
    assert_eq!(job_rows(dir.path()), rows + 3, "b and c in one row");
    let mut all = ids(&routed);
    all.sort_by_key(|id| id.parse::<i64>().unwrap_or(0));
    assert_eq!(all, ["13", "14", "15", "16"], "{routed:?}");
    let b = q.counts_for(Some("b")).await.expect("counts");
    assert_eq!(
        (b.waiting, b.active),
        (4, 0),
        "b's of all four events: {b:?}"
    );
    let d = q.counts_for(Some("d")).await.expect("counts");
    assert_eq!((d.waiting, d.active), (3, 1), "{d:?}");
}

/// A store written by a newer version is refused with a line that says so,
/// and left as it is (its jobs may be in a form this version cannot read).
#[tokio::test]
async fn a_store_of_a_newer_version_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let conn = rusqlite::Connection::open(dir.path().join("cogrelay.db")).expect("sqlite");
        conn.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;")
            .expect("future schema");
    }
    let err = EmbeddedQueue::open(options(dir.path())).expect_err("refused");
    assert!(
        err.to_string().contains("newer cogrelay (schema 99"),
        "{err}"
    );
    let version: i64 = rusqlite::Connection::open(dir.path().join("cogrelay.db"))
        .expect("sqlite")
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(version, 99, "left as it was");
}
