//! The embedded store itself: one process owns it, a dead process's jobs come
//! back at open, a full store answers 503 never 200. (The queue contract on
//! both backends is tests/it/queue_conformance.rs.)

use std::sync::Arc;
use std::time::Duration;

use cogrelay::queue::embedded::EmbeddedQueue;
use cogrelay::queue::{JobState, Queue};

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
    let accepted = fill_until_refused(&app, 32, 64).await;
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

/// Another process holding the store's write lock past the busy timeout
/// (5 s): the relay cannot begin its transaction, and each event waiting
/// on it is told so (503 at the ingress), not that the writer stopped. The
/// writer goes on: once the lock is let go, the same event is stored.
#[tokio::test]
async fn a_lock_held_past_the_busy_timeout_is_answered_why() {
    let dir = tempfile::tempdir().expect("tmp");
    let q = open(dir.path());
    q.enqueue(ev("before")).await.expect("a first event");
    let tool = rusqlite::Connection::open(dir.path().join("cogrelay.db")).expect("tool");
    tool.execute_batch("BEGIN IMMEDIATE")
        .expect("the tool takes the lock");
    let err = q
        .enqueue(ev("blocked"))
        .await
        .expect_err("refused while locked");
    let msg = err.to_string();
    assert!(
        matches!(err, cogrelay::queue::QueueError::Unavailable(_))
            && msg.contains("cannot begin a transaction")
            && msg.contains("locked"),
        "{msg}"
    );
    tool.execute_batch("ROLLBACK").expect("the tool lets go");
    assert!(matches!(
        q.enqueue(ev("blocked"))
            .await
            .expect("stored once the lock is free"),
        Enqueued::Accepted(_)
    ));
    assert_eq!(q.counts_for(None).await.expect("counts").waiting, 2);
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
    assert_eq!(q.counts_for(None).await.expect("counts").waiting, 200);
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
    let four = || ["a", "b", "c", "d"].map(to).to_vec();
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
        let c = q.counts_for(Some(&dn("c"))).await.expect("counts");
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
    // on one of them finds it; a look writes nothing.
    let q = open(dir.path());
    let view = q.get(&second.jobs[3].id).await.expect("get");
    assert_eq!(
        (view.destination.as_str(), view.state),
        ("d", JobState::Waiting)
    );
    assert!(view.payload.is_some(), "the event's body");
    let waiting = q
        .list_for(Some(JobState::Waiting), Some(&dn("b")), 0, 50)
        .await
        .expect("list");
    assert_eq!(waiting.total, 2, "b's two bundled jobs listed");
    assert_eq!(
        job_rows(dir.path()),
        2,
        "a look or a listing writes nothing"
    );
    q.remove(&first.jobs[0].id).await.expect("remove a's job");
    assert_eq!(
        job_rows(dir.path()),
        2,
        "a removal clears its slot in place"
    );
    let claimed = q
        .claim_for(
            &dn("c"),
            10,
            Duration::from_secs(30),
            cogrelay::queue::ClaimOrder::Due,
        )
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
    let b = q.counts_for(Some(&dn("b"))).await.expect("counts");
    assert_eq!(b.waiting, 2, "removing a's job kept b's: {b:?}");
    let next = q.store(ev("fan-3"), four(), None).await.expect("store").0;
    assert_eq!(next.jobs[0].id, "9", "ids go on after the reserved ones");
    // With a handoff, the paused destinations' jobs are the bundle and the
    // others are leased rows.
    q.set_paused(&dn("b"), true).await.expect("pause");
    q.set_paused(&dn("c"), true).await.expect("pause");
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
    let b = q.counts_for(Some(&dn("b"))).await.expect("counts");
    assert_eq!(
        (b.waiting, b.active),
        (4, 0),
        "b's of all four events: {b:?}"
    );
    let d = q.counts_for(Some(&dn("d"))).await.expect("counts");
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

fn zero_kept(dir: &std::path::Path) -> cogrelay::queue::embedded::EmbeddedOptions {
    let mut o = options(dir);
    o.settings.remove_on_complete = 0;
    o
}

/// More bundles than a claim writes out (256), then one whose carrier is
/// the claiming destination's job: the claim never takes a carrier before
/// its bundle is written out, so finishing it (deleted at once with
/// `REMOVE_ON_COMPLETE=0`) loses none of its event's other jobs. On
/// 27e726d the carrier was claimed and deleted with its `a` job (found by
/// the model in `queue_model.rs`: a's waiting 256 of 257).
#[tokio::test]
async fn a_claim_never_finishes_a_bundle_with_its_other_jobs() {
    let dir = tempfile::tempdir().expect("tmp");
    let q = EmbeddedQueue::open(zero_kept(dir.path())).expect("open");
    let ab = || vec![to("a"), to("b")];
    for i in 0..300 {
        q.store(ev(&format!("ab-{i}")), ab(), None)
            .await
            .expect("store");
    }
    let (last, _) = q
        .store(ev("ac"), vec![to("a"), to("c")], None)
        .await
        .expect("store");
    let (a_job, c_job) = (last.jobs[0].id.clone(), last.jobs[1].id.clone());
    assert_eq!(job_rows(dir.path()), 301, "301 bundles, one row each");
    // c claims until it has its job: each claim writes out at most 256
    // bundles, and says to claim again at once while some are left.
    let mut claims = 0;
    let leased = loop {
        let c = q
            .claim_for(
                &dn("c"),
                1,
                Duration::from_secs(30),
                cogrelay::queue::ClaimOrder::Due,
            )
            .await
            .expect("claim");
        claims += 1;
        if let Some(l) = c.jobs.into_iter().next() {
            break l;
        }
        assert!(
            c.next_due_ms.is_some_and(|t| t <= cogrelay::time::now_ms()),
            "nothing claimed, and no word to come back at once"
        );
        assert!(claims < 10, "c's job never claimed");
    };
    assert_eq!(leased.job.id, c_job);
    assert!(
        claims >= 2,
        "the 301st bundle was not in the first claim's 256"
    );
    let attempt = cogrelay::queue::Attempt {
        n: 1,
        started_at_ms: cogrelay::time::now_ms(),
        duration_ms: 1,
        status: Some(200),
        error: None,
        outcome: cogrelay::queue::AttemptOutcome::Delivered,
    };
    let done = q
        .finish(leased, attempt, cogrelay::queue::Disposition::Completed)
        .await
        .expect("finish");
    assert!(done);
    // c's job is gone (REMOVE_ON_COMPLETE=0), a's of the same event is not.
    assert!(q.get(&c_job).await.is_err(), "completed and deleted");
    let a = q.get(&a_job).await.expect("a's job of the event");
    assert_eq!((a.destination.as_str(), a.state), ("a", JobState::Waiting));
    let counts = q.counts_for(Some(&dn("a"))).await.expect("counts");
    assert_eq!(counts.waiting, 301, "every one of a's jobs");
    let mut claimed = 0;
    loop {
        let c = q
            .claim_for(
                &dn("a"),
                256,
                Duration::from_secs(30),
                cogrelay::queue::ClaimOrder::Due,
            )
            .await
            .expect("claim");
        if c.jobs.is_empty() && c.next_due_ms.is_none_or(|t| t > cogrelay::time::now_ms()) {
            break;
        }
        claimed += c.jobs.len();
    }
    assert_eq!(claimed, 301, "a delivers all its events");
}

/// An operator's removal of a bundle's carrier (the row that holds the
/// event) keeps the event's other jobs: the row becomes the last one's, in
/// place; removing one of the others clears its slot. Neither needs room.
#[tokio::test]
async fn removing_a_bundled_job_keeps_the_others_of_its_event() {
    let dir = tempfile::tempdir().expect("tmp");
    let q = EmbeddedQueue::open(zero_kept(dir.path())).expect("open");
    let abc = vec![to("a"), to("b"), to("c")];
    let (r, _) = q.store(ev("abc"), abc, None).await.expect("store");
    let id = |k: usize| r.jobs[k].id.clone();
    assert_eq!(job_rows(dir.path()), 1);
    q.remove(&id(2))
        .await
        .expect("remove the carrier's own job (c)");
    assert!(matches!(
        q.get(&id(2)).await,
        Err(cogrelay::queue::QueueError::NotFound(_))
    ));
    for (k, d) in [(0, "a"), (1, "b")] {
        let v = q.get(&id(k)).await.expect("still there");
        assert_eq!((v.destination.as_str(), v.state), (d, JobState::Waiting));
        assert!(v.payload.is_some());
    }
    q.remove(&id(0)).await.expect("remove a's");
    assert!(q.get(&id(0)).await.is_err());
    assert_eq!(
        q.counts_for(None).await.expect("counts").waiting,
        1,
        "b's only"
    );
    assert_eq!(job_rows(dir.path()), 1, "still the one row");
    let b = q
        .claim_for(
            &dn("b"),
            10,
            Duration::from_secs(30),
            cogrelay::queue::ClaimOrder::Due,
        )
        .await
        .expect("claim")
        .jobs;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].job.id, id(1));
    assert!(q
        .claim_for(
            &dn("a"),
            10,
            Duration::from_secs(30),
            cogrelay::queue::ClaimOrder::Due
        )
        .await
        .expect("claim")
        .jobs
        .is_empty());
}
