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
//!      due_at_ms,                 -- waiting/delayed: claimable from then on (parked: never)
//!      lease_token, lease_until_ms,  -- active only
//!      created_at_ms, finished_at_ms, failed_reason, stalls,
//!      attempts_log TEXT,         -- JSON array of every attempt
//!      destination,               -- whose job it is
//!      pending,                   -- a bundle's other destinations (below)
//!      order_key, order_hold)     -- an ordered job's key (`keys.rs`)
//! dedup(event_key PRIMARY KEY, job_seq, expires_at_ms, jobs,  -- jobs: "crm=17,dw=18"
//!       bot)                      -- a botId with `-` (`Event::key_sharer`)
//! paused(destination PRIMARY KEY)
//! changes(what PRIMARY KEY, n)    -- the tools' count of removed ordered jobs
//! ```
//!
//! # Bundles: one row per event, however many destinations
//!
//! An event stored for several destinations without a handoff (their pools
//! are busy, or they are paused) is one row, a *bundle*: the last
//! destination's job (the carrier), whose `pending` names the other
//! destinations in order ("crm,dw"). Their jobs' ids come before the row's
//! own (17 and 18, the row 19): the row takes the largest id of the event,
//! so AUTOINCREMENT never gives the others again, and the answer names them
//! all at once. Those jobs are waiting, never attempted, due since the event
//! came: nothing about them is stored but their names. A claim by any
//! destination writes bundles out (oldest first, 256 at most per claim, and
//! says to claim again at once while some are left) as the rows
//! `insert_event` would have written; a carrier is never claimed before its
//! bundle is written out. Operators' reads show a bundle's jobs where they
//! are, and never write; removing one clears its slot, or hands the
//! carrier's row to the last one, in place. The room the rows will take is
//! counted when the event is stored ("Bounded size" below), so a full store
//! can always write them out. So the ingest's durable write is one row per
//! event whatever the fan-out, and the rows are written by the delivery
//! that needs them. With a handoff, each handed-over job is its own leased
//! row, as a claim would have made it; the paused destinations' jobs of the
//! same event are the bundle. The rules, and the model that checks them:
//! `bundle.rs`. (Schema 5, which marks a removed slot `~`; a store written
//! by a newer version than this one is refused at open, untouched.)
//!
//! Indexes are partial, so that a job's trip through the states touches as few
//! B-trees as possible (the writer thread is the throughput limit):
//! `(destination, due_at_ms, seq)` of waiting/delayed jobs (claiming, each
//! destination apart), `seq` of bundles, `lease_until_ms` of active jobs (stall
//! recovery), `seq` of failed jobs (the dead-letter listing) and of completed
//! jobs (pruning). Counts by state scan the table: they serve the admin API,
//! not the hot path. (Schema 2 dropped a full `(state, seq)` index that cost
//! seven B-tree updates per event.)
//!
//! # One writer, group commit
//!
//! A single thread owns the connection. Every operation is a closure sent over a
//! channel; the thread takes whatever has queued up (up to 1,024 operations), runs
//! them in one transaction (should one fail after writing, the transaction is
//! rolled back and they run again each in its own savepoint, so that one failing operation
//! does not undo the others), commits once (one fsync with `COGRELAY_FSYNC=always`,
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
//!   the main file every 500 ms, or as soon as 512 operations were committed
//!   since the last one (see `writer.rs` `Cadence`), but under continuous
//!   writes it never catches up, and the WAL can only start over from its beginning once a checkpoint
//!   has copied all of it. So when the WAL passes [`WAL_RESTART_BYTES`] (or a
//!   quarter of `COGRELAY_MAX_DB_BYTES`, or a 64th of the file system), the
//!   writer itself runs a RESTART checkpoint between two batches, when
//!   nothing new is being appended; the PASSIVE checkpoints wait meanwhile
//!   (SQLite refuses a RESTART at once, without its busy handler, while
//!   another checkpoint runs). The WAL stays within a few times that
//!   size under any load, and a quiet store (nothing stored or completed
//!   since the last maintenance) truncates it.
//! * The main file: `auto_vacuum=INCREMENTAL`, and maintenance gives free
//!   pages back to the file system once they are more than half the file, or
//!   a quarter when the store is quiet, so a drained backlog does not leave a
//!   file sized for its peak.
//!   (A store created before this setting is compacted once at open.)
//! * `COGRELAY_MAX_DB_BYTES` caps the main file and the WAL together: SQLite's
//!   `max_page_count` stops the main file (SQLITE_FULL, as a full disk would),
//!   and a new event is refused while file + WAL + the room promised to the
//!   bundles' jobs + a delivery reserve (an eighth of the cap at most) reach
//!   the cap (the sizes are read after every batch). Either way ingress
//!   answers 503, and deliveries go on, so the store drains.
//! * A full disk: the relay keeps a reserve file (`cogrelay.reserve`,
//!   allocated blocks): a base reserve (twice the WAL's restart size plus
//!   1 MiB, at least a 64th of the file system, at most 64 MiB) and the
//!   room promised to the bundles' jobs. A new event is refused when the
//!   disk cannot hold it (or its bundle's promise); when a write of the
//!   delivery side fails for want of room, the base reserve is given back
//!   to the file system and new events are refused until the disk has room
//!   for it again. So whatever fills the disk, deliveries claim, finish and
//!   delete within the reserve, and the store drains (`space.rs`).
//! * A batch in which SQLite rolled the whole transaction back (a full disk
//!   can do that mid-batch) stops there: every request of it is answered
//!   unavailable, none as stored.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::{
    jobs_text, parse_jobs_text, DeliveryJob, DestinationName, JobRef, JobState, JobView, OrderKey,
    Page, QueueError, QueueResult, QueueSettings, Recipient, Routed,
};
use crate::event::{Event, EventKey, EventKind};
use crate::time::Clock;

mod bundle;
mod contract;

/// A destination's name as a SQL value: its text.
impl rusqlite::types::ToSql for crate::event::DestinationName {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::Borrowed(
            rusqlite::types::ValueRef::Text(self.as_str().as_bytes()),
        ))
    }
}

mod inspect;
mod keys;
mod schema;
mod space;
mod writer;

use bundle::Bundle;
use keys::Keys;
use schema::{ADDED_COLUMNS, SCHEMA, SCHEMA_VERSION};
use space::Space;
pub use space::{RESERVE_FILE, WAL_RESTART_BYTES};
use writer::*;

pub(crate) const DB_FILE: &str = "cogrelay.db";
const LOCK_FILE: &str = "cogrelay.lock";
const MAX_BATCH: usize = 1024;

pub struct EmbeddedQueue {
    tx: mpsc::Sender<Op>,
    path: PathBuf,
    /// Held for the life of the queue: one relay process per data dir.
    _lock: Option<File>,
    fsync: Fsync,
    /// Answered once the writer and checkpointer threads are gone (their
    /// connections closed): `close` waits for it.
    gone: std::sync::Mutex<Option<oneshot::Receiver<()>>>,
    /// The relay's reader thread, for operators' reads (and pause looks) off
    /// the writer thread: a listing of a large backlog never holds up the
    /// ingest. A tool reads through its one connection.
    reader: Option<mpsc::UnboundedSender<ReadOp>>,
    clock: Clock,
    /// The store's bytes on disk (main file and WAL) as the writer last
    /// read them, and its cap (0: none): `/metrics`.
    size: (std::sync::Arc<std::sync::atomic::AtomicU64>, u64),
}

impl std::fmt::Debug for EmbeddedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedQueue")
            .field("path", &self.path)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedOpenError {
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
    #[error("the embedded store {0} was written by a newer cogrelay (schema {1}, this one reads up to {SCHEMA_VERSION}): run that version, or move the file away to start with an empty queue")]
    Newer(PathBuf, i64),
    #[error("the embedded store {0} is of an older cogrelay (schema {1}, this one reads {SCHEMA_VERSION}): start the relay of this version once, which brings it up to date")]
    Older(PathBuf, i64),
}

/// Who opens the store, and so what the open may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The relay: takes the process lock, brings an older store up to date,
    /// puts back the jobs a dead process left active, keeps the reserve and
    /// maintains the store (prunes, checkpoints, gives free pages back).
    Relay,
    /// A tool that writes what an operator asks (retry, remove, pause),
    /// beside a running relay or none: no lock, no recovery, no maintenance
    /// (SQLite's WAL locking keeps the two processes' writes apart).
    Tool,
    /// A tool that only reads (lists, counts): a read-only connection that
    /// writes nothing, not even at its close.
    Reader,
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
    pub access: Access,
    /// Where the store reads the time (due times, leases, dedup expiry).
    pub clock: Clock,
}

/// Brings a store written by an older version up to the schema's columns.
fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, definition) in ADDED_COLUMNS {
        let mut stmt = conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        // No table yet (a new store): SCHEMA creates it whole.
        if !names.is_empty() && !names.iter().any(|n| n == column) {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
            ))?;
        }
    }
    Ok(())
}

impl EmbeddedQueue {
    /// Opens the store as `opts.access` says (see [`Access`]); the relay
    /// creates it if needed and takes the process lock, and active jobs left
    /// by a dead process go back to waiting.
    pub fn open(opts: EmbeddedOptions) -> Result<Self, EmbeddedOpenError> {
        let relay = opts.access == Access::Relay;
        if relay {
            // Only its owner may read the events it holds (the dirs it
            // creates; one that exists keeps its mode).
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&opts.data_dir)
                .map_err(|e| EmbeddedOpenError::CreateDir(opts.data_dir.clone(), e))?;
        }
        let lock = if relay {
            Some(take_lock(&opts.data_dir)?)
        } else {
            None
        };
        let path = opts.data_dir.join(DB_FILE);
        let sqlite_err = |e| EmbeddedOpenError::Sqlite(path.clone(), e);
        let conn = match opts.access {
            Access::Reader => open_reader(&path),
            _ => open_connection(&path, opts.fsync),
        }
        .map_err(sqlite_err)?;
        let space = Space::new(&opts.data_dir, &path, opts.max_db_bytes, relay);
        prepare(
            &conn,
            &path,
            relay,
            opts.max_db_bytes,
            space.wal_restart_bytes,
        )?;

        let (tx, rx) = mpsc::channel::<Op>(64 * 1024);
        let (gone_tx, gone) = oneshot::channel::<()>();
        let reader_clock = opts.clock.clone();
        let size = (space.shown.clone(), opts.max_db_bytes);
        let mut writer = Writer {
            settings: opts.settings,
            now_ms: opts.clock.now_ms(),
            clock: opts.clock,
            completed_since_prune: 0,
            stored_since_maintenance: 0,
            stop: false,
            space,
            maintains: relay,
            // A tool's transactions start deferred: one that only reads
            // (the check of a name before a write) writes nothing, not even
            // a WAL header.
            begin: if relay { "BEGIN IMMEDIATE" } else { "BEGIN" },
            recounted_at: None,
            paused: Default::default(),
            paused_read_at: None,
            // Read in the first batch.
            keys: Keys::new(relay),
            committed: Default::default(),
        };
        if relay {
            writer.space.promised = promised_bytes(&conn).map_err(sqlite_err)?;
            // The reserve now, or new events wait until the disk has room.
            if let Err(why) = writer.space.reserve_for(0) {
                tracing::warn!("{why}");
            }
        }
        writer.space.watch(&conn);
        spawn_writer(conn, writer, rx, (&path, opts.fsync), gone_tx)
            .map_err(|e| EmbeddedOpenError::Lock(path.clone(), e))?;
        let reader = if relay {
            Some(spawn_reader(&path)?)
        } else {
            None
        };
        Ok(Self {
            tx,
            path,
            _lock: lock,
            fsync: opts.fsync,
            gone: std::sync::Mutex::new(Some(gone)),
            reader,
            clock: reader_clock,
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer thread inside the next group transaction, and answers
    /// only after that transaction committed. `f` may run twice (see
    /// `writer.rs` `run_batch`): its last run's result is answered.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnMut(&Db<'_>, &mut Writer) -> QueueResult<T> + Send + 'static,
    ) -> QueueResult<T> {
        let (reply, answer) = oneshot::channel();
        let op: Op = Box::new(Call {
            f,
            res: None,
            reply,
        });
        self.tx
            .send(op)
            .await
            .map_err(|_| QueueError::Unavailable("the store is closed".into()))?;
        answer
            .await
            .map_err(|_| QueueError::Unavailable("the store writer stopped".into()))?
    }
}

/// An operation of [`EmbeddedQueue::call`]: its closure, its last run's
/// result, and its caller.
struct Call<F, T> {
    f: F,
    res: Option<QueueResult<T>>,
    reply: oneshot::Sender<QueueResult<T>>,
}

impl<F, T> Job for Call<F, T>
where
    F: FnMut(&Db<'_>, &mut Writer) -> QueueResult<T> + Send,
    T: Send,
{
    fn run(&mut self, conn: &Db<'_>, w: &mut Writer) -> bool {
        let res = (self.f)(conn, w);
        let ok = res.is_ok();
        self.res = Some(res);
        ok
    }

    fn answer(self: Box<Self>, commit: Result<(), QueueError>) {
        let Call { f, res, reply } = *self;
        // What the closure holds is gone before its caller wakes (`store`
        // takes its event back).
        drop(f);
        let res = res.unwrap_or_else(|| Err(QueueError::Unavailable("not run".into())));
        let _ = reply.send(commit.and(res));
    }
}

/// The columns a claim returns, as the job to deliver.
/// The columns a claim returns (see [`claimed_job`]): a macro, so that each
/// claim statement is one literal (no string built per claim).
macro_rules! claimed {
    () => {
        "seq, event_key, event_id, bot_id, kind, body, attempts_made, created_at_ms, order_key IS NOT NULL"
    };
}

fn claimed_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryJob> {
    let kind: String = r.get(4)?;
    Ok(DeliveryJob {
        id: r.get::<_, i64>(0)?.to_string(),
        key: EventKey::from_stored(r.get(1)?),
        event_id: r.get(2)?,
        bot_id: r.get(3)?,
        kind: EventKind::from_stored(&kind),
        body: r.get(5)?,
        attempts_made: r.get(6)?,
        created_at_ms: r.get(7)?,
        probe: None,
        ordered: r.get(8)?,
    })
}

/// Leases up to `max` of `destination`'s due jobs, earliest due first (one
/// statement: the hot path). A key's later jobs are not due (`keys.rs`).
fn claim_due(
    conn: &Connection,
    token: &str,
    until: i64,
    now: i64,
    max: usize,
    destination: &str,
) -> QueueResult<Vec<DeliveryJob>> {
    const SQL: &str = concat!(
        "UPDATE jobs SET state='active', lease_token=?1, lease_until_ms=?2
         WHERE seq IN (SELECT seq FROM jobs WHERE destination=?5 AND state IN ('waiting','delayed')
                       AND due_at_ms <= ?3 AND pending IS NULL ORDER BY due_at_ms, seq LIMIT ?4)
         RETURNING ",
        claimed!()
    );
    conn.prepare_cached(SQL)
        .and_then(|mut stmt| {
            stmt.query_map(
                params![token, until, now, max as i64, destination],
                claimed_job,
            )?
            .collect::<Result<Vec<_>, _>>()
        })
        .map_err(sql_err)
}

/// Leases a round of trials (see [`ClaimOrder::Trials`](super::ClaimOrder)).
fn claim_trials(
    conn: &Connection,
    token: &str,
    until: i64,
    now: i64,
    max: usize,
    destination: &str,
) -> QueueResult<Vec<DeliveryJob>> {
    const DUE: &str =
        "destination=?1 AND state IN ('waiting','delayed') AND due_at_ms <= ?2 AND pending IS NULL";
    let mut ids: Vec<i64> = Vec::new();
    if max >= 2 {
        let most: Option<i64> = conn
            .prepare_cached(&format!(
                "SELECT seq FROM jobs WHERE {DUE} AND attempts_made > 0 ORDER BY attempts_made DESC, seq LIMIT 1"
            ))
            .and_then(|mut s| s.query_row(params![destination, now], |r| r.get(0)).optional())
            .map_err(sql_err)?;
        ids.extend(most);
    }
    let fresh: Vec<i64> = conn
        .prepare_cached(&format!(
            "SELECT seq FROM jobs WHERE {DUE} AND seq != ?3 ORDER BY attempts_made, seq DESC LIMIT ?4"
        ))
        .and_then(|mut s| {
            s.query_map(
                params![destination, now, ids.first().copied().unwrap_or(0), (max - ids.len()) as i64],
                |r| r.get(0),
            )?
            .collect::<Result<_, _>>()
        })
        .map_err(sql_err)?;
    ids.extend(fresh);
    let mut take = conn
        .prepare_cached(concat!(
            "UPDATE jobs SET state='active', lease_token=?1, lease_until_ms=?2 WHERE seq=?3 RETURNING ",
            claimed!()
        ))
        .map_err(sql_err)?;
    let mut jobs = Vec::with_capacity(ids.len());
    for id in ids {
        jobs.push(
            take.query_row(params![token, until, id], claimed_job)
                .map_err(sql_err)?,
        );
    }
    Ok(jobs)
}

/// Stall recovery: an expired lease means its worker is gone; its job goes
/// back to waiting, its attempt not counted.
fn put_back_stalled(conn: &Connection, now: i64) -> QueueResult<u64> {
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
    Ok(stalled as u64)
}

impl EmbeddedQueue {
    /// Runs a read: on the relay's reader connection, off the writer thread
    /// (it sees what is committed); a tool's, on its one connection. `f`
    /// gets the clock's time.
    async fn read<T: Send + 'static>(
        &self,
        mut f: impl FnMut(&Connection, i64) -> QueueResult<T> + Send + 'static,
    ) -> QueueResult<T> {
        let Some(reader) = &self.reader else {
            return self.call(move |conn, w| f(conn, w.now_ms)).await;
        };
        let now = self.clock.now_ms();
        let (reply, answer) = oneshot::channel();
        reader
            .send(Box::new(move |conn| {
                let _ = reply.send(f(conn, now));
            }))
            .map_err(|_| QueueError::Unavailable("the store is closed".into()))?;
        answer
            .await
            .map_err(|_| QueueError::Unavailable("the store's reader stopped".into()))?
    }
}

/// A read for the relay's reader thread.
type ReadOp = Box<dyn FnOnce(&Connection) + Send>;

/// The exclusive lock of one relay per data dir.
/// The store's schema checked (a newer one refused, an older one brought up
/// to date by the relay only), its cap set, and the jobs a previous relay
/// process left active put back.
fn prepare(
    conn: &Connection,
    path: &Path,
    relay: bool,
    max_db_bytes: u64,
    wal_restart_bytes: u64,
) -> Result<(), EmbeddedOpenError> {
    let sqlite_err = |e| EmbeddedOpenError::Sqlite(path.to_path_buf(), e);
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sqlite_err)?;
    if version > SCHEMA_VERSION {
        // A newer version may keep jobs in a form this one cannot read
        // (as version 4's bundles are to version 3): refuse, lose nothing.
        return Err(EmbeddedOpenError::Newer(path.to_path_buf(), version));
    }
    if !relay && version < SCHEMA_VERSION {
        // Only the relay brings a store up to date: a tool writes nothing
        // but what the operator asked.
        return Err(EmbeddedOpenError::Older(path.to_path_buf(), version));
    }
    if relay {
        // A restarted WAL keeps its size (no shrinking and growing again
        // under load); a quiet store truncates it (see `maintenance`).
        conn.pragma_update(None, "journal_size_limit", wal_restart_bytes as i64)
            .map_err(sqlite_err)?;
        incremental_vacuum_on(conn).map_err(sqlite_err)?;
        add_missing_columns(conn).map_err(sqlite_err)?;
        if version == 6 {
            upgrade_ordered_jobs(conn).map_err(sqlite_err)?;
        }
        conn.execute_batch(SCHEMA).map_err(sqlite_err)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sqlite_err)?;
    }
    if max_db_bytes > 0 && relay {
        let page: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(sqlite_err)?;
        let pages = (max_db_bytes as i64 / page.max(1)).max(1);
        conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .map_err(sqlite_err)?;
    }
    let recovered = if !relay {
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
    Ok(())
}

/// Version 6's ordered jobs (the first with any) as version 7 keeps them (`keys.rs`), once,
/// before its key's index is dropped: a job behind its key's first is
/// parked (version 6 stored it due, and claims no longer look at keys),
/// and a job failed under `continue` has left its key.
fn upgrade_ordered_jobs(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(concat!(
        "UPDATE jobs SET due_at_ms = ",
        keys::parked!(),
        " WHERE state = 'waiting' AND order_key IS NOT NULL AND EXISTS (
            SELECT 1 FROM jobs e WHERE e.destination = jobs.destination AND e.order_key = jobs.order_key
            AND e.seq < jobs.seq AND ",
        keys::open_job!(),
        ");
         UPDATE jobs SET order_key = NULL WHERE state = 'failed' AND order_hold = 0;"
    ))
}

/// The relay's reader thread: operators' reads, off the writer.
fn spawn_reader(path: &Path) -> Result<mpsc::UnboundedSender<ReadOp>, EmbeddedOpenError> {
    let conn = open_reader(path).map_err(|e| EmbeddedOpenError::Sqlite(path.to_path_buf(), e))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<ReadOp>();
    std::thread::Builder::new()
        .name("cogrelay-reader".into())
        .spawn(move || {
            while let Some(op) = rx.blocking_recv() {
                op(&conn);
            }
        })
        .map_err(|e| EmbeddedOpenError::Lock(path.to_path_buf(), e))?;
    Ok(tx)
}

fn take_lock(data_dir: &Path) -> Result<File, EmbeddedOpenError> {
    let lock_path = data_dir.join(LOCK_FILE);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| EmbeddedOpenError::Lock(lock_path.clone(), e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(EmbeddedOpenError::Locked(data_dir.to_path_buf()))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(EmbeddedOpenError::Lock(lock_path, e)),
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::{Access, EmbeddedOptions, EmbeddedQueue, Fsync};
    use crate::queue::QueueSettings;
    use crate::time::Clock;

    /// The writer counts each operation it commits: the checkpointer's
    /// cadence reads that count (`writer.rs` `Cadence`), and without it a
    /// busy relay would checkpoint only every 500 ms.
    /// A relay's store in `dir`, without fsync.
    fn relay_store(dir: &std::path::Path) -> EmbeddedQueue {
        EmbeddedQueue::open(EmbeddedOptions {
            data_dir: dir.to_path_buf(),
            fsync: Fsync::Off,
            max_db_bytes: 0,
            settings: QueueSettings {
                dedup_ttl: Duration::from_secs(60),
                remove_on_complete: 100,
            },
            access: Access::Relay,
            clock: Clock::system(),
        })
        .unwrap()
    }

    /// A data dir the relay creates is its owner's only: the events in it
    /// are the contact centre's conversations (it was created 0755, and the
    /// store 0644, readable by every local user).
    #[tokio::test]
    async fn a_data_dir_the_relay_creates_is_its_owners_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("new").join("data");
        let _q = relay_store(&dir);
        for d in [root.path().join("new"), dir] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }

    #[tokio::test]
    async fn the_writer_counts_what_it_commits() {
        let dir = tempfile::tempdir().unwrap();
        let q = relay_store(dir.path());
        let count = || q.call(|_, w| Ok(w.committed.load(Ordering::Relaxed)));
        let before = count().await.unwrap();
        for _ in 0..3 {
            q.call(|_, _| Ok(())).await.unwrap();
        }
        // The first look's own operation, and the three.
        assert_eq!(count().await.unwrap() - before, 4);
    }

    /// The WAL whose size restarts it and counts toward the cap is the file
    /// SQLite writes: in a data dir whose name is not UTF-8, and beside the
    /// file a store that is a symbolic link points to.
    #[tokio::test]
    async fn the_store_finds_its_wal_under_any_name() {
        use std::os::unix::ffi::OsStrExt;
        let root = tempfile::tempdir().unwrap();
        let odd = root
            .path()
            .join(std::ffi::OsStr::from_bytes(b"data-\xff\xfe"));
        std::fs::create_dir(&odd).unwrap();
        let linked = root.path().join("linked");
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir(&linked).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("store.db"), b"").unwrap();
        std::os::unix::fs::symlink(elsewhere.join("store.db"), linked.join(super::DB_FILE))
            .unwrap();
        for dir in [&odd, &linked] {
            let q = relay_store(dir);
            q.call(|conn, _| {
                conn.execute_batch("CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (1);")
                    .map_err(|e| crate::queue::QueueError::Unavailable(e.to_string()))
            })
            .await
            .unwrap();
            let wal = super::space::wal_path(&dir.join(super::DB_FILE));
            let size = std::fs::metadata(&wal).map(|m| m.len());
            assert!(size.as_ref().is_ok_and(|n| *n > 0), "{wal:?}: {size:?}");
            drop(q);
        }
    }
}
