//! The embedded store's disk stays bounded: the WAL under sustained writes and
//! across a large backlog, the files given back once a backlog drained, and
//! `COGRELAY_MAX_DB_BYTES` counting the WAL.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cogrelay::config::Fsync;
use cogrelay::ingress::envelope;
use cogrelay::queue::embedded::{EmbeddedOptions, EmbeddedQueue, WAL_RESTART_BYTES};
use cogrelay::queue::{Attempt, AttemptOutcome, Disposition, Queue, QueueSettings};

use crate::helpers::DefaultDestination;

const MIB: u64 = 1024 * 1024;

fn open(dir: &Path, max_db_bytes: u64) -> EmbeddedQueue {
    EmbeddedQueue::open(EmbeddedOptions {
        data_dir: dir.to_path_buf(),
        fsync: Fsync::Off,
        max_db_bytes,
        settings: QueueSettings {
            dedup_ttl: Duration::from_secs(3600),
            remove_on_complete: 100,
        },
        access: cogrelay::queue::embedded::Access::Relay,
        clock: Default::default(),
    })
    .expect("open")
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

fn wal(dir: &Path) -> u64 {
    file_size(&dir.join("cogrelay.db-wal"))
}

/// The store's files (not its reserve file, `cogrelay.reserve`: room kept
/// for deliveries on a full disk, a constant size here).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != cogrelay::queue::embedded::RESERVE_FILE)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Bytes of the main file's pages that hold data (not free pages).
fn live_bytes(dir: &Path) -> u64 {
    let conn = rusqlite::Connection::open_with_flags(
        dir.join("cogrelay.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open read-only");
    let n = |p: &str| {
        conn.query_row(p, [], |r| r.get::<_, i64>(0))
            .expect("pragma") as u64
    };
    (n("PRAGMA page_count") - n("PRAGMA freelist_count")) * n("PRAGMA page_size")
}

/// The page counts and files, for a failure message.
fn pages(dir: &Path) -> String {
    let conn = rusqlite::Connection::open_with_flags(
        dir.join("cogrelay.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open read-only");
    let n = |p: &str| conn.query_row(p, [], |r| r.get::<_, i64>(0)).unwrap_or(-1);
    format!(
        "auto_vacuum {}, pages {}, free {}, db {} MB, wal {} MB",
        n("PRAGMA auto_vacuum"),
        n("PRAGMA page_count"),
        n("PRAGMA freelist_count"),
        file_size(&dir.join("cogrelay.db")) / MIB,
        wal(dir) / MIB
    )
}

fn event(i: usize) -> envelope::Event {
    let body = format!(
        r#"{{"botId":"disk","eventId":"e-{i}","type":"message","payload":{{"text":"{}"}}}}"#,
        "x".repeat(200)
    );
    envelope::parse(body.as_bytes()).expect("event")
}

/// The largest WAL seen by a sampler running beside `work`.
async fn max_wal_during<F: std::future::Future>(dir: &Path, work: F) -> (F::Output, u64) {
    let seen = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (seen, dir) = (seen.clone(), dir.to_path_buf());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tick.tick().await;
                seen.fetch_max(wal(&dir), Ordering::Relaxed);
            }
        })
    };
    let out = work.await;
    sampler.abort();
    (out, seen.load(Ordering::Relaxed).max(wal(dir)))
}

/// 300,000 events queued behind a target that takes nothing, then delivered:
/// the WAL stays within a few restarts' worth the whole time, and once drained
/// the files are at most about twice the data they hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300k_backlog_queued_then_drained_keeps_the_disk_bounded() {
    const EVENTS: usize = 300_000;
    const WRITERS: usize = 64;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("data");
    let q = Arc::new(open(&dir, 0));
    let t0 = Instant::now();
    let ((), wal_queued) = max_wal_during(&dir, async {
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let q = q.clone();
            tasks.spawn(async move {
                for i in (w..EVENTS).step_by(WRITERS) {
                    q.enqueue(event(i)).await.expect("enqueue");
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("writer");
        }
    })
    .await;
    let queued_files = dir_bytes(&dir);
    let queued_in = t0.elapsed();

    let t1 = Instant::now();
    let (delivered, wal_drained) = max_wal_during(&dir, async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let q = q.clone();
            tasks.spawn(async move {
                let mut n = 0;
                loop {
                    let claimed = q.claim(256, Duration::from_secs(60)).await.expect("claim");
                    if claimed.jobs.is_empty() {
                        return n;
                    }
                    for job in claimed.jobs {
                        let attempt = Attempt {
                            n: 1,
                            started_at_ms: cogrelay::queue::now_ms(),
                            duration_ms: 1,
                            status: Some(200),
                            error: None,
                            outcome: AttemptOutcome::Delivered,
                        };
                        assert!(q
                            .finish(job, attempt, Disposition::Completed)
                            .await
                            .expect("finish"));
                        n += 1;
                    }
                }
            });
        }
        let mut n = 0;
        while let Some(r) = tasks.join_next().await {
            n += r.expect("deliverer");
        }
        n
    })
    .await;
    assert_eq!(delivered, EVENTS);

    // Once maintenance has pruned the completed jobs and given the pages back
    // (it runs beside the store's work: the queue is claimed from, as the
    // relay's dispatcher claims once a second while idle).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (files, live) = loop {
        let idle = q.claim(1, Duration::from_secs(30)).await.expect("claim");
        assert!(idle.jobs.is_empty(), "drained");
        let (files, live) = (dir_bytes(&dir), live_bytes(&dir));
        if files <= 2 * live + 1024 * 1024 {
            break (files, live);
        }
        assert!(
            Instant::now() < deadline,
            "drained: {} MB of files for {} MB of data ({})",
            files / MIB,
            live / MIB,
            pages(&dir)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "disk: {EVENTS} queued in {:.1} s (files {} MB, largest WAL {} MB); drained in {:.1} s (largest WAL {} MB); after: files {} MB for {} MB of data",
        queued_in.as_secs_f64(),
        queued_files / MIB,
        wal_queued / MIB,
        t1.elapsed().as_secs_f64(),
        wal_drained / MIB,
        files / MIB,
        live / MIB
    );
    let bound = 4 * WAL_RESTART_BYTES;
    assert!(
        wal_queued < bound,
        "WAL reached {} MB while queueing",
        wal_queued / MIB
    );
    assert!(
        wal_drained < bound,
        "WAL reached {} MB while draining",
        wal_drained / MIB
    );
}

/// `COGRELAY_MAX_DB_BYTES` counts the WAL: the files never grow past the cap
/// (plus one batch), new events are refused there, and deliveries go on.
#[tokio::test]
async fn the_size_cap_counts_database_and_wal_together() {
    const CAP: u64 = 4 * MIB;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("data");
    let q = Arc::new(open(&dir, CAP));
    let largest = Arc::new(AtomicU64::new(0));
    let mut accepted = 0usize;
    let mut refused = 0usize;
    let mut i = 0;
    while refused < 200 {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let q = q.clone();
            i += 1;
            let n = i;
            tasks.spawn(async move { q.enqueue(event(n)).await.is_ok() });
        }
        while let Some(ok) = tasks.join_next().await {
            if ok.expect("task") {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        largest.fetch_max(
            file_size(&dir.join("cogrelay.db")) + wal(&dir),
            Ordering::Relaxed,
        );
        assert!(i < 200_000, "the cap never took effect");
    }
    let largest = largest.load(Ordering::Relaxed);
    eprintln!(
        "cap: {accepted} accepted, files at most {} KB of a {} KB cap",
        largest / 1024,
        CAP / 1024
    );
    assert!(
        largest <= CAP + MIB / 2,
        "database + WAL reached {} KB",
        largest / 1024
    );
    // Full: deliveries still take jobs out.
    let claimed = q
        .claim(10, Duration::from_secs(60))
        .await
        .expect("claim while full");
    assert_eq!(claimed.jobs.len(), 10);
}
