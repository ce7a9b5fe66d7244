//! Embedded queue: one SQLite file (WAL mode) under `COGRELAY_DATA_DIR`.
//!
//! # Data layout
//!
//! ```sql
//! jobs(seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- the job id ("17"); never reused
//!      event_key, event_id, bot_id, event_type, kind,
//!      body BLOB,                 -- exactly what is POSTed to the target
//!      state,                     -- waiting|active|delayed|completed|failed
//!      attempts_made,             -- finished attempts
//!      due_at_ms,                 -- waiting/delayed: claimable from then on
//!      lease_token, lease_until_ms,  -- active only
//!      created_at_ms, finished_at_ms, failed_reason, stalls,
//!      attempts_log TEXT)         -- JSON array of every attempt
//! dedup(event_key PRIMARY KEY, job_seq, expires_at_ms)
//! ```
//! Indexes are partial, so that a job's trip through the states touches as few
//! B-trees as possible (the writer thread is the throughput limit): `due_at_ms`
//! of waiting/delayed jobs (claiming), `lease_until_ms` of active jobs (stall
//! recovery), `seq` of failed jobs (the dead-letter listing) and of completed
//! jobs (pruning). Counts by state scan the table: they serve the admin API,
//! not the hot path. (Schema 2 dropped a full `(state, seq)` index that cost
//! seven B-tree updates per event.)
//!
//! # One writer, group commit
//!
//! A single thread owns the connection. Every operation is a closure sent over a
//! channel; the thread takes whatever has queued up (up to 1,024 operations), runs
//! them in one transaction, each in its own savepoint so one failing operation
//! does not undo the others, commits once (one fsync with `COGRELAY_FSYNC=always`,
//! SQLite `synchronous=FULL`), and only then answers each caller. An ingress 200
//! therefore always follows a commit that is on disk, and a burst of N events
//! costs one fsync, not N. WAL checkpoints run on a second connection in a
//! background thread so they never stall a commit.
//!
//! # Leases and crash behaviour
//!
//! A claim sets `state='active'`, a random `lease_token` and `lease_until_ms`;
//! `finish`, `renew` and `release` apply only while the token still matches.
//! Attempts are counted at `finish`, so an attempt cut short by a crash is not
//! counted: the next claim delivers it again with the same attempt number.
//! Active jobs whose lease expired are put back to waiting at each claim. One
//! relay process owns the store (an exclusive lock on `cogrelay.lock`), so at
//! open every active job belongs to a dead process and is put back at once.
//! What SQLite guarantees for a committed WAL transaction is what a 200 means:
//! survives `kill -9`; with fsync on, power loss too.
//!
//! # Bounded size
//!
//! * The WAL: a PASSIVE checkpoint on the second connection copies frames into
//!   the main file every 500 ms, but under continuous writes it never catches
//!   up, and the WAL can only start over from its beginning once a checkpoint
//!   has copied all of it. So when the WAL passes [`WAL_RESTART_BYTES`] (or a
//!   quarter of `COGRELAY_MAX_DB_BYTES`), the writer itself runs a RESTART
//!   checkpoint between two batches, when nothing new is being appended. The
//!   WAL stays within a few times that size under any load, and a quiet store
//!   (nothing stored or completed since the last maintenance) truncates it.
//! * The main file: `auto_vacuum=INCREMENTAL`, and maintenance gives free
//!   pages back to the file system once they are more than half the file, or
//!   a quarter when the store is quiet, so a drained backlog does not leave a
//!   file sized for its peak.
//!   (A store created before this setting is compacted once at open.)
//! * `COGRELAY_MAX_DB_BYTES` caps the main file and the WAL together: SQLite's
//!   `max_page_count` stops the main file (SQLITE_FULL, as a full disk would),
//!   and a new event is refused while file + WAL are at the cap (the sizes
//!   are read after every batch). Either way ingress answers 503, and
//!   deliveries go on, so the store drains.
//! * A batch in which SQLite rolled the whole transaction back (a full disk
//!   can do that mid-batch) stops there: every request of it is answered
//!   unavailable, none as stored.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::{
    now_ms, Attempt, Claimed, Counts, DeliveryJob, Disposition, Enqueued, JobState, JobView,
    LeaseRef, Leased, Operate, Page, Queue, QueueError, QueueResult, QueueSettings,
};
use crate::event::{Event, EventKey, EventKind};

const DB_FILE: &str = "cogrelay.db";
const LOCK_FILE: &str = "cogrelay.lock";
const MAX_BATCH: usize = 1024;
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    bot_id TEXT,
    event_type TEXT,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL,
    attempts_made INTEGER NOT NULL DEFAULT 0,
    due_at_ms INTEGER NOT NULL,
    lease_token TEXT,
    lease_until_ms INTEGER,
    created_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER,
    failed_reason TEXT,
    stalls INTEGER NOT NULL DEFAULT 0,
    attempts_log TEXT NOT NULL DEFAULT '[]'
);
DROP INDEX IF EXISTS jobs_state;
CREATE INDEX IF NOT EXISTS jobs_failed ON jobs(seq) WHERE state = 'failed';
CREATE INDEX IF NOT EXISTS jobs_completed ON jobs(seq) WHERE state = 'completed';
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(due_at_ms, seq) WHERE state IN ('waiting','delayed');
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(lease_until_ms) WHERE state = 'active';
CREATE TABLE IF NOT EXISTS dedup (
    event_key TEXT PRIMARY KEY,
    job_seq INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_expiry ON dedup(expires_at_ms);
";

/// What a queued operation leaves for after the commit: whether it succeeded
/// (else its savepoint is rolled back) and how to answer its caller.
struct Done {
    ok: bool,
    reply: Box<dyn FnOnce(Result<(), QueueError>) + Send>,
}

type Op = Box<dyn FnOnce(&Connection, &mut Writer) -> Done + Send>;

/// State owned by the writer thread.
struct Writer {
    settings: QueueSettings,
    now_ms: i64,
    completed_since_prune: u64,
    /// Jobs stored since the last maintenance (with `completed_since_prune`:
    /// whether the store is quiet).
    stored_since_maintenance: u64,
    stop: bool,
    /// The main file and its WAL.
    db_path: PathBuf,
    wal_path: PathBuf,
    /// Main file + WAL, read after each batch.
    disk_bytes: u64,
    /// `COGRELAY_MAX_DB_BYTES` (0: none).
    max_bytes: u64,
    /// WAL size past which the writer restarts it.
    wal_restart_bytes: u64,
}

/// The WAL size past which the writer runs a RESTART checkpoint (see the
/// module doc).
pub const WAL_RESTART_BYTES: u64 = 16 * 1024 * 1024;

impl Writer {
    /// Reads the sizes of the files; restarts the WAL if it grew too long.
    fn watch_disk(&mut self, conn: &Connection) {
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let mut wal = size(&self.wal_path);
        if wal > self.wal_restart_bytes {
            match conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())) {
                Ok(()) => wal = size(&self.wal_path),
                Err(e) => tracing::debug!(error = %e, "wal restart"),
            }
        }
        self.disk_bytes = size(&self.db_path) + wal;
    }

    fn full(&self) -> bool {
        self.max_bytes > 0 && self.disk_bytes >= self.max_bytes
    }
}

pub struct EmbeddedQueue {
    tx: mpsc::Sender<Op>,
    path: PathBuf,
    /// Held for the life of the queue: one relay process per data dir.
    _lock: Option<File>,
    fsync: Fsync,
}

impl std::fmt::Debug for EmbeddedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedQueue")
            .field("path", &self.path)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create data directory {0}: {1}")]
    CreateDir(PathBuf, std::io::Error),
    #[error("another cogrelay process is using {0}: stop it, or give this one another COGRELAY_DATA_DIR")]
    Locked(PathBuf),
    #[error(
        "cannot open the embedded store {0}: {1} (move the file away to start with an empty queue)"
    )]
    Sqlite(PathBuf, rusqlite::Error),
    #[error("cannot lock {0}: {1}")]
    Lock(PathBuf, std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// fsync every commit (SQLite `synchronous=FULL`): an ack survives power loss.
    Always,
    /// Commit to the OS only (`synchronous=NORMAL`): an ack survives a relay crash.
    Off,
}

/// Options of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub data_dir: PathBuf,
    pub fsync: Fsync,
    /// 0 = no cap.
    pub max_db_bytes: u64,
    pub settings: QueueSettings,
    /// The relay's own open: takes the process lock and puts back the jobs a
    /// dead process left active. `false` for tools (`cogrelay jobs`) that work
    /// beside a running relay: no lock, no recovery (SQLite's WAL locking keeps
    /// the two processes' writes apart).
    pub exclusive: bool,
}

impl EmbeddedQueue {
    /// Opens (creating if needed) the store and takes the process lock. Active jobs
    /// left by a dead process go back to waiting.
    pub fn open(opts: EmbeddedOptions) -> Result<Self, OpenError> {
        std::fs::create_dir_all(&opts.data_dir)
            .map_err(|e| OpenError::CreateDir(opts.data_dir.clone(), e))?;
        let lock = if opts.exclusive {
            Some(take_lock(&opts.data_dir)?)
        } else {
            None
        };
        let path = opts.data_dir.join(DB_FILE);
        let sqlite_err = |e| OpenError::Sqlite(path.clone(), e);
        let conn = open_connection(&path, opts.fsync).map_err(sqlite_err)?;
        let wal_restart_bytes = match opts.max_db_bytes {
            0 => WAL_RESTART_BYTES,
            max => WAL_RESTART_BYTES.min(max / 4),
        };
        // A restarted WAL keeps its size (no shrinking and growing again under
        // load); a quiet store truncates it (see `maintenance`).
        conn.pragma_update(None, "journal_size_limit", wal_restart_bytes as i64)
            .map_err(sqlite_err)?;
        incremental_vacuum_on(&conn).map_err(sqlite_err)?;
        conn.execute_batch(SCHEMA).map_err(sqlite_err)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sqlite_err)?;
        if opts.max_db_bytes > 0 {
            let page: i64 = conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .map_err(sqlite_err)?;
            let pages = (opts.max_db_bytes as i64 / page.max(1)).max(1);
            conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
                .map_err(sqlite_err)?;
        }
        let recovered = if !opts.exclusive {
            0
        } else {
            conn
            .execute(
                "UPDATE jobs SET state='waiting', lease_token=NULL, lease_until_ms=NULL, stalls=stalls+1
                 WHERE state='active'",
                [],
            )
            .map_err(sqlite_err)?
        };
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "jobs left active by a previous process are back in the queue"
            );
        }

        let (tx, rx) = mpsc::channel::<Op>(64 * 1024);
        let stop_checkpoints = Arc::new(AtomicBool::new(false));
        spawn_checkpointer(path.clone(), opts.fsync, stop_checkpoints.clone());
        let mut writer = Writer {
            settings: opts.settings,
            now_ms: now_ms(),
            completed_since_prune: 0,
            stored_since_maintenance: 0,
            stop: false,
            wal_path: PathBuf::from(format!("{}-wal", path.display())),
            db_path: path.clone(),
            disk_bytes: 0,
            max_bytes: opts.max_db_bytes,
            wal_restart_bytes,
        };
        writer.watch_disk(&conn);
        std::thread::Builder::new()
            .name("cogrelay-store".into())
            .spawn(move || {
                writer_loop(conn, writer, rx);
                stop_checkpoints.store(true, Ordering::Relaxed);
            })
            .map_err(|e| OpenError::Lock(path.clone(), e))?;
        Ok(Self {
            tx,
            path,
            _lock: lock,
            fsync: opts.fsync,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer thread inside the next group transaction, and answers
    /// only after that transaction committed.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut Writer) -> QueueResult<T> + Send + 'static,
    ) -> QueueResult<T> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let op: Op = Box::new(move |conn, w| {
            let res = f(conn, w);
            Done {
                ok: res.is_ok(),
                reply: Box::new(move |commit| {
                    let _ = reply_tx.send(commit.and(res));
                }),
            }
        });
        self.tx
            .send(op)
            .await
            .map_err(|_| QueueError::Unavailable("the store is closed".into()))?;
        reply_rx
            .await
            .map_err(|_| QueueError::Unavailable("the store writer stopped".into()))?
    }
}

/// The exclusive lock of one relay per data dir.
fn take_lock(data_dir: &Path) -> Result<File, OpenError> {
    let lock_path = data_dir.join(LOCK_FILE);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| OpenError::Lock(lock_path.clone(), e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(OpenError::Locked(data_dir.to_path_buf()))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(OpenError::Lock(lock_path, e)),
    }
    Ok(lock)
}

fn open_connection(path: &Path, fsync: Fsync) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // Every statement of this module stays prepared (the default cache holds 16,
    // fewer than the hot path plus housekeeping use, and evictions re-parse).
    conn.set_prepared_statement_cache_capacity(64);
    conn.busy_timeout(Duration::from_secs(5))?;
    // Before WAL mode, which writes the header of a new file: after that,
    // auto_vacuum changes only through a VACUUM (see incremental_vacuum_on).
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {mode}, WAL is required"
        )));
    }
    conn.pragma_update(
        None,
        "synchronous",
        if fsync == Fsync::Always {
            "FULL"
        } else {
            "NORMAL"
        },
    )?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // 16 MiB page cache (default 2 MiB): the hot pages of jobs, dedup and their
    // indexes stay in memory instead of being re-read from the OS.
    conn.pragma_update(None, "cache_size", -16_000)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "foreign_keys", false)?;
    Ok(conn)
}

/// Checkpoints the WAL into the main file off the commit path.
fn spawn_checkpointer(path: PathBuf, fsync: Fsync, stop: Arc<AtomicBool>) {
    let _ = std::thread::Builder::new()
        .name("cogrelay-checkpoint".into())
        .spawn(move || {
            let Ok(conn) = open_connection(&path, fsync) else {
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::debug!(error = %e, "wal checkpoint");
                }
            }
        });
}

fn writer_loop(conn: Connection, mut w: Writer, mut rx: mpsc::Receiver<Op>) {
    let mut batch: Vec<Op> = Vec::with_capacity(MAX_BATCH);
    let mut last_maintenance = Instant::now();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        w.now_ms = now_ms();
        run_batch(&conn, &mut w, &mut batch);
        w.watch_disk(&conn);
        if last_maintenance.elapsed() >= Duration::from_millis(500)
            || w.completed_since_prune > 1000
        {
            last_maintenance = Instant::now();
            maintenance(&conn, &mut w);
        }
        if w.stop {
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            drop(conn);
            rx.close();
            while let Ok(op) = rx.try_recv() {
                drop(op);
            }
            return;
        }
    }
}

/// Runs every queued operation in one transaction and answers them after COMMIT.
/// An operation that could not run is dropped, which answers its caller with
/// `Unavailable` (its reply channel closes).
fn run_batch(conn: &Connection, w: &mut Writer, batch: &mut Vec<Op>) {
    if let Err(e) = exec_cached(conn, "BEGIN IMMEDIATE") {
        tracing::error!(error = %store_error(&e), "store: cannot begin a transaction");
        batch.clear();
        return;
    }
    let mut dones = Vec::with_capacity(batch.len());
    let mut ops = batch.drain(..);
    while let Some(op) = ops.next() {
        if let Err(e) = exec_cached(conn, "SAVEPOINT op") {
            tracing::error!(error = %store_error(&e), "store: savepoint");
            continue;
        }
        let done = op(conn, w);
        dones.push(done);
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back (it may on a full disk):
            // what ran before is undone, and what runs now would commit on its
            // own. Nothing of this batch is stored; the rest is not run.
            let err =
                QueueError::Unavailable("the store rolled a transaction back (disk full?)".into());
            tracing::error!(error = %err, not_run = ops.len(), "store: nothing of this batch was acknowledged");
            drop(ops); // the operations not run answer Unavailable as they are dropped
            for d in dones {
                (d.reply)(Err(err.clone()));
            }
            return;
        }
        let done = dones.last().is_none_or(|d| d.ok);
        let end = if done {
            exec_cached(conn, "RELEASE op")
        } else {
            conn.execute_batch("ROLLBACK TO op; RELEASE op")
        };
        if let Err(e) = end {
            tracing::error!(error = %store_error(&e), "store: savepoint");
        }
    }
    let commit = exec_cached(conn, "COMMIT").map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        let err = QueueError::Unavailable(store_error(&e));
        tracing::error!(error = %err, "store: commit failed; nothing of this batch was acknowledged");
        err
    });
    // Answers go out after the commit, so a 200 never precedes durability.
    for d in dones {
        (d.reply)(commit.clone());
    }
}

/// Runs a parameterless statement through the statement cache: the group-commit
/// loop runs BEGIN/SAVEPOINT/RELEASE/COMMIT thousands of times a second, and
/// parsing them each time showed in profiles.
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Prunes completed jobs beyond REMOVE_ON_COMPLETE and expired dedup keys.
fn maintenance(conn: &Connection, w: &mut Writer) {
    let keep = i64::from(w.settings.remove_on_complete);
    let res = conn.execute_batch("BEGIN IMMEDIATE").and_then(|_| {
        conn.prepare_cached(
            "DELETE FROM jobs WHERE state='completed' AND seq <= (
                 SELECT seq FROM jobs WHERE state='completed' ORDER BY seq DESC LIMIT 1 OFFSET ?1)",
        )?
        .execute([keep])?;
        conn.prepare_cached("DELETE FROM dedup WHERE expires_at_ms <= ?1")?
            .execute([w.now_ms])?;
        conn.execute_batch("COMMIT")
    });
    if let Err(e) = res {
        let _ = conn.execute_batch("ROLLBACK");
        tracing::warn!(error = %store_error(&e), "store maintenance failed; will try again");
    }
    let quiet = w.completed_since_prune == 0 && w.stored_since_maintenance == 0;
    w.completed_since_prune = 0;
    w.stored_since_maintenance = 0;
    give_back_free_pages(conn, quiet);
    if quiet && w.disk_bytes > 0 {
        // Nothing is being written: the WAL can go to zero bytes.
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "wal truncate");
        }
    }
}

/// Turns on `auto_vacuum=INCREMENTAL`: before the first table for a new
/// store; with a one-time VACUUM for a store made before.
fn incremental_vacuum_on(conn: &Connection) -> rusqlite::Result<()> {
    const INCREMENTAL: i64 = 2;
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if mode == INCREMENTAL {
        return Ok(());
    }
    conn.pragma_update(None, "auto_vacuum", INCREMENTAL)?;
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    if tables > 0 {
        tracing::info!("compacting the store once, to give freed space back from now on");
        conn.execute_batch("VACUUM")?;
    }
    Ok(())
}

/// Free pages given back to the file system, a bounded number at a time
/// (each call is one short write transaction): above half the file at any
/// time, above a quarter once the store is `quiet`. Under load the free pages
/// are soon reused, and shrinking the file only to grow it again costs.
fn give_back_free_pages(conn: &Connection, quiet: bool) {
    const MAX_PAGES_PER_CALL: i64 = 4096;
    let pages = |pragma: &str| {
        conn.query_row(pragma, [], |r| r.get::<_, i64>(0))
            .unwrap_or(0)
    };
    let (free, total) = (pages("PRAGMA freelist_count"), pages("PRAGMA page_count"));
    let share = if quiet { 4 } else { 2 };
    if free > 64 && free * share > total {
        let n = free.min(MAX_PAGES_PER_CALL);
        // The pragma frees pages as it is stepped: step it to the end.
        let run = conn
            .prepare(&format!("PRAGMA incremental_vacuum({n})"))
            .and_then(|mut stmt| {
                let mut rows = stmt.query([])?;
                while rows.next()?.is_some() {}
                Ok(())
            });
        if let Err(e) = run {
            tracing::debug!(error = %e, "incremental vacuum");
        }
    }
}

fn store_error(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => {
            "the store is full (disk full or COGRELAY_MAX_DB_BYTES reached)".into()
        }
        Some(rusqlite::ErrorCode::DatabaseCorrupt) | Some(rusqlite::ErrorCode::NotADatabase) => {
            format!("the store file is damaged: {e}")
        }
        _ => format!("store error: {e}"),
    }
}

fn sql_err(e: rusqlite::Error) -> QueueError {
    QueueError::Unavailable(store_error(&e))
}

fn parse_id(id: &str) -> QueueResult<i64> {
    id.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| QueueError::NotFound(id.to_string()))
}

const VIEW_COLUMNS: &str =
    "seq, state, event_key, event_id, bot_id, event_type, kind, attempts_made,
    created_at_ms, due_at_ms, finished_at_ms, failed_reason, attempts_log";

fn row_to_view(r: &rusqlite::Row<'_>, with_payload: bool) -> rusqlite::Result<JobView> {
    let state: String = r.get(1)?;
    let state = JobState::parse(&state).unwrap_or(JobState::Failed);
    let kind: String = r.get(6)?;
    let log: String = r.get(12)?;
    let payload = if with_payload {
        let body: Vec<u8> = r.get(13)?;
        String::from_utf8(body)
            .ok()
            .and_then(|s| RawValue::from_string(s).ok())
    } else {
        None
    };
    Ok(JobView {
        id: r.get::<_, i64>(0)?.to_string(),
        state,
        event_key: r.get(2)?,
        event_id: r.get(3)?,
        bot_id: r.get(4)?,
        event_type: r.get(5)?,
        kind: EventKind::parse(&kind)
            .unwrap_or(EventKind::Envelope)
            .as_str(),
        attempts_made: r.get(7)?,
        created_at_ms: r.get(8)?,
        due_at_ms: matches!(state, JobState::Waiting | JobState::Delayed)
            .then(|| r.get(9))
            .transpose()?,
        finished_at_ms: r.get(10)?,
        failed_reason: r.get(11)?,
        attempts: serde_json::from_str(&log).unwrap_or_default(),
        payload,
    })
}

fn state_of(conn: &Connection, seq: i64, id: &str) -> QueueResult<JobState> {
    let state: Option<String> = conn
        .prepare_cached("SELECT state FROM jobs WHERE seq=?1")
        .and_then(|mut s| s.query_row([seq], |r| r.get(0)).optional())
        .map_err(sql_err)?;
    state
        .and_then(|s| JobState::parse(&s))
        .ok_or_else(|| QueueError::NotFound(id.to_string()))
}

/// Stores an event as a new job (or finds its duplicate). With `lease`, the job
/// is stored already leased (`active`, token, expiry): a direct handoff to the
/// caller's worker pool that saves the claim.
fn insert_event(
    conn: &Connection,
    w: &mut Writer,
    event: &Event,
    lease: Option<(&str, i64)>,
) -> QueueResult<Enqueued> {
    let now = w.now_ms;
    if w.full() {
        return Err(QueueError::Unavailable(format!(
            "the store is full: database and WAL hold {} bytes of COGRELAY_MAX_DB_BYTES={}",
            w.disk_bytes, w.max_bytes
        )));
    }
    let ttl_ms = w.settings.dedup_ttl.as_millis() as i64;
    let dedup = ttl_ms > 0; // DEDUP_TTL_SECS=0: every event a new job
    let existing: Option<i64> = if !dedup {
        None
    } else {
        conn.prepare_cached("SELECT job_seq FROM dedup WHERE event_key=?1 AND expires_at_ms > ?2")
            .and_then(|mut s| {
                s.query_row(params![event.key.as_str(), now], |r| r.get(0))
                    .optional()
            })
            .map_err(sql_err)?
    };
    if let Some(seq) = existing {
        return Ok(Enqueued::Duplicate(seq.to_string()));
    }
    let (state, token, until) = match lease {
        Some((token, until)) => ("active", Some(token), Some(until)),
        None => ("waiting", None, None),
    };
    conn.prepare_cached(
        "INSERT INTO jobs (event_key, event_id, bot_id, event_type, kind, body, state, due_at_ms, created_at_ms,
                           lease_token, lease_until_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10)",
    )
    .and_then(|mut s| {
        s.execute(params![
            event.key.as_str(),
            event.event_id,
            event.bot_id,
            event.event_type,
            event.kind.as_str(),
            event.body,
            state,
            now,
            token,
            until
        ])
    })
    .map_err(sql_err)?;
    let seq = conn.last_insert_rowid();
    w.stored_since_maintenance += 1;
    if dedup {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO dedup (event_key, job_seq, expires_at_ms) VALUES (?1, ?2, ?3)",
        )
        .and_then(|mut s| s.execute(params![event.key.as_str(), seq, now.saturating_add(ttl_ms)]))
        .map_err(sql_err)?;
    }
    Ok(Enqueued::Accepted(seq.to_string()))
}

impl Queue for EmbeddedQueue {
    async fn enqueue(&self, event: Event) -> QueueResult<Enqueued> {
        self.call(move |conn, w| insert_event(conn, w, &event, None))
            .await
    }

    async fn enqueue_leased(
        &self,
        event: Event,
        lease: Duration,
    ) -> QueueResult<(Enqueued, Option<Leased>)> {
        let lease_ms = lease.as_millis() as i64;
        let token = format!("{:016x}", fastrand::u64(..));
        self.call(move |conn, w| {
            let enqueued = insert_event(conn, w, &event, Some((&token, w.now_ms + lease_ms)))?;
            let leased = match &enqueued {
                Enqueued::Accepted(id) => Some(Leased {
                    lease: LeaseRef {
                        job_id: id.clone(),
                        token,
                    },
                    job: DeliveryJob::new(id.clone(), event),
                }),
                Enqueued::Duplicate(_) => None,
            };
            Ok((enqueued, leased))
        })
        .await
    }

    async fn claim(&self, max: usize, lease: Duration) -> QueueResult<Claimed> {
        let lease_ms = lease.as_millis() as i64;
        self.call(move |conn, w| {
            let now = w.now_ms;
            // Stall recovery: an expired lease means its worker is gone.
            let stalled = conn
                .prepare_cached(
                    "UPDATE jobs SET state='waiting', lease_token=NULL, lease_until_ms=NULL, due_at_ms=?1, stalls=stalls+1
                     WHERE state='active' AND lease_until_ms <= ?1",
                )
                .and_then(|mut s| s.execute([now]))
                .map_err(sql_err)?;
            if stalled > 0 {
                tracing::warn!(stalled, "leases expired; jobs taken over");
            }
            let token = format!("{:016x}", fastrand::u64(..));
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE jobs SET state='active', lease_token=?1, lease_until_ms=?2
                     WHERE seq IN (SELECT seq FROM jobs WHERE state IN ('waiting','delayed') AND due_at_ms <= ?3
                                   ORDER BY due_at_ms, seq LIMIT ?4)
                     RETURNING seq, event_key, event_id, bot_id, kind, body, attempts_made",
                )
                .map_err(sql_err)?;
            let rows = stmt
                .query_map(params![token, now + lease_ms, now, max as i64], |r| {
                    let kind: String = r.get(4)?;
                    Ok(DeliveryJob {
                        id: r.get::<_, i64>(0)?.to_string(),
                        key: EventKey::from_stored(r.get(1)?),
                        event_id: r.get(2)?,
                        bot_id: r.get(3)?,
                        kind: EventKind::parse(&kind).unwrap_or(EventKind::Envelope),
                        body: r.get(5)?,
                        attempts_made: r.get(6)?,
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql_err)?;
            let mut jobs: Vec<Leased> = rows
                .into_iter()
                .map(|job| Leased { lease: LeaseRef { job_id: job.id.clone(), token: token.clone() }, job })
                .collect();
            jobs.sort_by_key(|l| l.job.id.parse::<i64>().unwrap_or(0));
            let next_due_ms = if jobs.is_empty() {
                conn.prepare_cached(
                    "SELECT min(t) FROM (
                        SELECT min(due_at_ms) AS t FROM jobs WHERE state IN ('waiting','delayed')
                        UNION ALL SELECT min(lease_until_ms) FROM jobs WHERE state='active')",
                )
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(sql_err)?
            } else {
                None
            };
            Ok(Claimed { jobs, next_due_ms })
        })
        .await
    }

    async fn renew(&self, leases: Vec<LeaseRef>, lease: Duration) -> QueueResult<()> {
        let lease_ms = lease.as_millis() as i64;
        self.call(move |conn, w| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE jobs SET lease_until_ms=?1 WHERE seq=?2 AND lease_token=?3 AND state='active'",
                )
                .map_err(sql_err)?;
            for l in &leases {
                let seq = parse_id(&l.job_id)?;
                stmt.execute(params![w.now_ms + lease_ms, seq, l.token]).map_err(sql_err)?;
            }
            Ok(())
        })
        .await
    }

    async fn finish(
        &self,
        job: Leased,
        attempt: Attempt,
        disposition: Disposition,
    ) -> QueueResult<bool> {
        self.call(move |conn, w| {
            let seq = parse_id(&job.lease.job_id)?;
            let now = w.now_ms;
            let log = serde_json::to_string(&attempt)
                .map_err(|e| QueueError::Unavailable(e.to_string()))?;
            let (state, due, finished, reason) = match &disposition {
                Disposition::Completed => ("completed", now, Some(now), None),
                Disposition::RetryAt { due_at_ms, reason } => {
                    ("delayed", *due_at_ms, None, Some(reason.as_str()))
                }
                Disposition::Failed { reason } => ("failed", now, Some(now), Some(reason.as_str())),
            };
            let changed = conn
                .prepare_cached(
                    "UPDATE jobs SET state=?1, due_at_ms=?2, finished_at_ms=?3, failed_reason=?4,
                        attempts_made=attempts_made+1, lease_token=NULL, lease_until_ms=NULL,
                        attempts_log=json_insert(attempts_log, '$[#]', json(?5))
                     WHERE seq=?6 AND lease_token=?7 AND state='active'",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        state,
                        due,
                        finished,
                        reason,
                        log,
                        seq,
                        job.lease.token
                    ])
                })
                .map_err(sql_err)?;
            if changed == 1 && state == "completed" {
                w.completed_since_prune += 1;
                if w.settings.remove_on_complete == 0 {
                    conn.prepare_cached("DELETE FROM jobs WHERE seq=?1")
                        .and_then(|mut s| s.execute([seq]))
                        .map_err(sql_err)?;
                }
            }
            Ok(changed == 1)
        })
        .await
    }

    async fn release(&self, leases: Vec<LeaseRef>) -> QueueResult<()> {
        self.call(move |conn, w| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE jobs SET state='waiting', lease_token=NULL, lease_until_ms=NULL, due_at_ms=?1
                     WHERE seq=?2 AND lease_token=?3 AND state='active'",
                )
                .map_err(sql_err)?;
            for l in &leases {
                let seq = parse_id(&l.job_id)?;
                stmt.execute(params![w.now_ms, seq, l.token]).map_err(sql_err)?;
            }
            Ok(())
        })
        .await
    }

    fn durability_risks(&self) -> Vec<(&'static str, bool)> {
        // COGRELAY_FSYNC=off: an acknowledged event survives a crash of the
        // relay, not a power loss.
        vec![("embedded_no_fsync", self.fsync == Fsync::Off)]
    }

    async fn ping(&self) -> QueueResult<()> {
        self.call(|conn, _| {
            conn.prepare_cached("SELECT 1")
                .and_then(|mut s| s.query_row([], |_| Ok(())))
                .map_err(sql_err)
        })
        .await
    }

    async fn close(&self) -> QueueResult<()> {
        self.call(|_, w| {
            w.stop = true;
            Ok(())
        })
        .await
    }
}

impl Operate for EmbeddedQueue {
    async fn counts(&self) -> QueueResult<Counts> {
        self.call(|conn, w| {
            let mut c = Counts::default();
            let mut stmt = conn
                .prepare_cached("SELECT state, count(*) FROM jobs GROUP BY state")
                .map_err(sql_err)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql_err)?;
            for (state, n) in rows {
                match JobState::parse(&state) {
                    Some(JobState::Waiting) => c.waiting = n,
                    Some(JobState::Active) => c.active = n,
                    Some(JobState::Delayed) => c.delayed = n,
                    Some(JobState::Completed) => c.completed = n,
                    Some(JobState::Failed) => c.failed = n,
                    None => {}
                }
            }
            c.oldest_waiting_ms = conn
                .prepare_cached(
                    "SELECT min(due_at_ms) FROM jobs WHERE state IN ('waiting','delayed') AND due_at_ms <= ?1",
                )
                .and_then(|mut s| s.query_row([w.now_ms], |r| r.get(0)))
                .map_err(sql_err)?;
            Ok(c)
        })
        .await
    }

    async fn list(&self, state: Option<JobState>, offset: u64, limit: u64) -> QueueResult<Page> {
        self.call(move |conn, _| {
            // The state is a literal (from the enum), so the planner can use the
            // partial indexes of failed and completed jobs.
            let filter = state
                .map(|st| format!("WHERE state = '{}'", st.as_str()))
                .unwrap_or_default();
            let total: u64 = conn
                .prepare_cached(&format!("SELECT count(*) FROM jobs {filter}"))
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(sql_err)?;
            let sql = format!(
                "SELECT {VIEW_COLUMNS} FROM jobs {filter} ORDER BY seq DESC LIMIT ?1 OFFSET ?2"
            );
            let items = conn
                .prepare_cached(&sql)
                .and_then(|mut s| {
                    s.query_map(params![limit as i64, offset as i64], |r| {
                        row_to_view(r, false)
                    })?
                    .collect::<Result<Vec<_>, _>>()
                })
                .map_err(sql_err)?;
            Ok(Page { items, total })
        })
        .await
    }

    async fn get(&self, id: &str) -> QueueResult<JobView> {
        let id = id.to_string();
        self.call(move |conn, _| {
            let seq = parse_id(&id)?;
            let sql = format!("SELECT {VIEW_COLUMNS}, body FROM jobs WHERE seq=?1");
            conn.prepare_cached(&sql)
                .and_then(|mut s| s.query_row([seq], |r| row_to_view(r, true)).optional())
                .map_err(sql_err)?
                .ok_or(QueueError::NotFound(id))
        })
        .await
    }

    async fn retry(&self, id: &str) -> QueueResult<()> {
        let id = id.to_string();
        self.call(move |conn, w| {
            let seq = parse_id(&id)?;
            let changed = conn
                .prepare_cached(
                    "UPDATE jobs SET state='waiting', attempts_made=0, due_at_ms=?1, finished_at_ms=NULL, failed_reason=NULL
                     WHERE seq=?2 AND state='failed'",
                )
                .and_then(|mut s| s.execute(params![w.now_ms, seq]))
                .map_err(sql_err)?;
            if changed == 1 {
                return Ok(());
            }
            state_of(conn, seq, &id)?.check_retry(&id)?;
            Err(QueueError::NotFound(id))
        })
        .await
    }

    async fn retry_all_failed(&self) -> QueueResult<u64> {
        self.call(|conn, w| {
            conn.prepare_cached(
                "UPDATE jobs SET state='waiting', attempts_made=0, due_at_ms=?1, finished_at_ms=NULL, failed_reason=NULL
                 WHERE state='failed'",
            )
            .and_then(|mut s| s.execute([w.now_ms]))
            .map(|n| n as u64)
            .map_err(sql_err)
        })
        .await
    }

    async fn remove(&self, id: &str) -> QueueResult<()> {
        let id = id.to_string();
        self.call(move |conn, _| {
            let seq = parse_id(&id)?;
            let changed = conn
                .prepare_cached("DELETE FROM jobs WHERE seq=?1 AND state != 'active'")
                .and_then(|mut s| s.execute([seq]))
                .map_err(sql_err)?;
            if changed == 1 {
                return Ok(());
            }
            state_of(conn, seq, &id)?.check_remove(&id)?;
            Err(QueueError::NotFound(id))
        })
        .await
    }
}
