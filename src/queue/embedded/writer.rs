//! The store's single writer: the group commit over one connection, the
//! WAL checkpoints, the maintenance, and the insert of a new job.

use std::cell::RefCell;
use std::sync::atomic::AtomicU64;

use rusqlite::Statement;

use super::keys::{self, Keys};
use super::{
    bundle, jobs_text, mpsc, params, parse_jobs_text, Arc, AtomicBool, Bundle, Clock, Connection,
    DestinationName, Duration, Event, Fsync, Instant, JobRef, OptionalExtension, OrderKey,
    Ordering, Path, PathBuf, QueueError, QueueResult, QueueSettings, Recipient, Routed, Space,
    MAX_BATCH,
};

/// An operation queued for the writer. A batch runs its operations in one
/// transaction and, if one of them fails after writing, rolls it back and
/// runs them again each in its own savepoint (see [`run_batch`]): so an
/// operation may run twice, and only its last run's result is answered.
pub(super) trait Job: Send {
    /// Runs the operation; whether it succeeded (else its writes are undone).
    fn run(&mut self, conn: &Db<'_>, w: &mut Writer) -> bool;
    /// Answers its caller with the commit's outcome (an operation dropped
    /// unanswered answers `Unavailable`).
    fn answer(self: Box<Self>, commit: Result<(), QueueError>);
}

pub(super) type Op = Box<dyn Job>;

/// The writer's connection, with the statements every event runs held
/// prepared ([`Held`]). rusqlite's statement cache trims and hashes the SQL
/// text, and allocates its key, at each use: about 8,000 instructions a
/// delivered event for these statements and its share of BEGIN and
/// COMMIT. Every other
/// statement goes through that cache (a `Db` derefs to its connection).
/// A held statement keeps its last parameters bound (the cache cleared
/// them): the last event's body, which SQLite's page cache holds anyway.
pub(super) struct Db<'c> {
    conn: &'c Connection,
    /// The writer's [`Writer::begin`].
    begin: &'static str,
    held: [RefCell<Option<Statement<'c>>>; Held::ALL],
}

/// The statements a [`Db`] holds, prepared at their first use.
#[derive(Clone, Copy)]
pub(super) enum Held {
    Begin,
    Commit,
    /// A new job's row (`insert_row`).
    Insert,
    /// The jobs of an event already stored (`first_jobs`).
    FirstJobs,
    /// An event's key remembered (`remember`).
    Remember,
    /// A delivery's outcome (`contract.rs` `finish`).
    Finish,
}

impl Held {
    const ALL: usize = Held::Finish as usize + 1;
}

impl<'c> Db<'c> {
    pub(super) fn new(conn: &'c Connection, begin: &'static str) -> Self {
        Self {
            conn,
            begin,
            held: Default::default(),
        }
    }

    /// Runs `f` with the statement `which`, prepared at its first use; as
    /// rusqlite's own cache does, `f` leaves it reset.
    pub(super) fn with<T>(
        &self,
        which: Held,
        f: impl FnOnce(&mut Statement<'c>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let mut slot = self.held[which as usize].borrow_mut();
        let stmt = match &mut *slot {
            Some(stmt) => stmt,
            empty => empty.insert(self.conn.prepare(self.sql(which))?),
        };
        f(stmt)
    }

    fn sql(&self, which: Held) -> &'static str {
        match which {
            Held::Begin => self.begin,
            Held::Commit => "COMMIT",
            Held::Insert => INSERT_ROW,
            Held::FirstJobs => FIRST_JOBS,
            Held::Remember => REMEMBER,
            Held::Finish => super::contract::FINISH,
        }
    }

    /// Runs the parameterless statement `which`.
    fn exec(&self, which: Held) -> rusqlite::Result<()> {
        self.with(which, |s| s.execute([]).map(|_| ()))
    }
}

impl std::ops::Deref for Db<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// State owned by the writer thread.
pub(super) struct Writer {
    pub(super) settings: QueueSettings,
    pub(super) clock: Clock,
    /// The clock's reading for the batch being run.
    pub(super) now_ms: i64,
    pub(super) completed_since_prune: u64,
    /// Jobs stored since the last maintenance (with `completed_since_prune`:
    /// whether the store is quiet).
    pub(super) stored_since_maintenance: u64,
    pub(super) stop: bool,
    /// Sizes, the cap and the reserves (see `space.rs`).
    pub(super) space: Space,
    /// Only the relay maintains the store (prunes, checkpoints, vacuums):
    /// a tool beside it writes what the operator asked and nothing else.
    pub(super) maintains: bool,
    /// BEGIN IMMEDIATE (a writer) or BEGIN (a reader, which takes no lock).
    pub(super) begin: &'static str,
    /// When the room promised to bundles was last counted again on a
    /// refusal (see `insert_event`).
    pub(super) recounted_at: Option<Instant>,
    /// The paused destinations, as last read (see [`Writer::is_paused`]).
    pub(super) paused: foldhash::HashSet<String>,
    pub(super) paused_read_at: Option<Instant>,
    /// The ordered keys' jobs (the relay's; a tool's is empty): `keys.rs`.
    pub(super) keys: Keys,
    /// Operations committed, for the checkpointer's [`Cadence`].
    pub(super) committed: Arc<AtomicU64>,
}

/// How stale the paused set may be for the ingest's choice of a handoff: a
/// pause set by another process (the command line) shows within this; this
/// process's own at once. Claims read the table itself.
const PAUSED_FRESH: Duration = Duration::from_secs(1);

impl Writer {
    /// Whether `destination` is paused, from the set read at most
    /// `PAUSED_FRESH` ago (a query per event and destination cost about 5%
    /// of the ingest with four destinations).
    pub(super) fn is_paused(&mut self, conn: &Connection, destination: &str) -> QueueResult<bool> {
        if self
            .paused_read_at
            .is_none_or(|t| t.elapsed() >= PAUSED_FRESH)
        {
            self.read_paused(conn)?;
        }
        Ok(self.paused.contains(destination))
    }

    /// Reads the paused destinations from the table.
    pub(super) fn read_paused(&mut self, conn: &Connection) -> QueueResult<()> {
        self.paused = conn
            .prepare_cached("SELECT destination FROM paused")
            .and_then(|mut s| {
                s.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<_, _>>()
            })
            .map_err(sql_err)?;
        self.paused_read_at = Some(Instant::now());
        Ok(())
    }
}

/// A reader's connection: read-only, so that it writes nothing even when
/// it closes last (a writer's last close checkpoints the WAL).
pub(super) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    use rusqlite::OpenFlags;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

pub(super) fn open_connection(path: &Path, fsync: Fsync) -> rusqlite::Result<Connection> {
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

/// Checkpoints the WAL into the main file off the commit path, until `stop`
/// (looked at every 50 ms at most, so that a closed store is soon left
/// alone), as often as [`Cadence`] says from `committed`, the writer's count
/// of committed operations. Not while writes go on and the WAL is past
/// `restart_bytes` (the writer's connection cuts the file back to that size
/// when the log starts over, `journal_size_limit`): the writer's RESTART
/// between two batches is then due, and a RESTART that finds this
/// checkpoint running is refused at once (busy), so under a checkpoint
/// every 10 ms on a loaded machine the WAL grew past its bound (79 MB for
/// 64 in one run of `disk::a_300k_backlog_…`). The 500 ms one still runs
/// (a writer with nothing to do tries no RESTART). One that is running when
/// the RESTART comes is waited for (`one_at_a_time`, `Space::checkpoints`).
pub(super) fn spawn_checkpointer(
    path: PathBuf,
    fsync: Fsync,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    restart_bytes: u64,
    one_at_a_time: Arc<std::sync::Mutex<()>>,
) -> Option<std::thread::JoinHandle<()>> {
    let wal_path = super::space::wal_path(&path);
    std::thread::Builder::new()
        .name("cogrelay-checkpoint".into())
        .spawn(move || {
            let Ok(conn) = open_connection(&path, fsync) else {
                return;
            };
            let mut cadence = Cadence::default();
            while !stop.load(Ordering::Acquire) {
                let tick = cadence.tick();
                std::thread::sleep(tick);
                if !cadence.looked(tick, committed.load(Ordering::Relaxed))
                    || stop.load(Ordering::Acquire)
                    || (cadence.busy
                        && std::fs::metadata(&wal_path).is_ok_and(|m| m.len() > restart_bytes))
                {
                    continue;
                }
                let _one = one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::debug!(error = %e, "wal checkpoint");
                }
            }
        })
        .ok()
}

/// When the WAL is checkpointed: every 500 ms, and sooner once the writer
/// has committed [`Cadence::OPS`] operations since the last checkpoint,
/// looked at every 10 ms while that is what triggers them, else every 50
/// ms. The count is of operations, not bytes (about 1 MiB of WAL under the
/// benchmark's load; the maintenance's writes are not in it): the 500 ms
/// and the writer's RESTART cover what it misses. Under continuous writes the WAL cannot start over (see "Bounded
/// size" in the module doc of [`super`]), and the writer's RESTART between
/// two batches copies what these checkpoints have not: the more of it they
/// copied, the shorter that stall of the commits (the ack p99 at 32
/// connections: docs/benchmark.md). A light load (or a relay slowed down by
/// a profiler) keeps the 500 ms: each checkpoint copies its pages once.
#[derive(Debug, Default)]
struct Cadence {
    /// The writer's count at the last checkpoint.
    seen: u64,
    /// Since the last checkpoint.
    waited: Duration,
    /// The last checkpoint came for the operations, not the time.
    busy: bool,
}

impl Cadence {
    /// About 250 events (an ingest and a finish each).
    const OPS: u64 = 512;
    const EVERY: Duration = Duration::from_millis(500);

    fn tick(&self) -> Duration {
        Duration::from_millis(if self.busy { 10 } else { 50 })
    }

    /// After a sleep of `tick`, with the writer's count now: whether to
    /// checkpoint.
    fn looked(&mut self, tick: Duration, committed: u64) -> bool {
        self.waited += tick;
        let grown = committed.wrapping_sub(self.seen) >= Self::OPS;
        if !grown && self.waited < Self::EVERY {
            return false;
        }
        self.busy = grown;
        self.seen = committed;
        self.waited = Duration::ZERO;
        true
    }
}

/// Starts the store's writer thread (and, for the relay, its checkpointer),
/// which answers `gone` once both have ended.
pub(super) fn spawn_writer(
    conn: Connection,
    writer: Writer,
    rx: mpsc::Receiver<Op>,
    (path, fsync): (&Path, Fsync),
    gone: tokio::sync::oneshot::Sender<()>,
) -> std::io::Result<()> {
    let stop_checkpoints = Arc::new(AtomicBool::new(false));
    let mut checkpointer = if writer.maintains {
        spawn_checkpointer(
            path.to_path_buf(),
            fsync,
            stop_checkpoints.clone(),
            writer.committed.clone(),
            writer.space.wal_restart_bytes,
            writer.space.checkpoints.clone(),
        )
    } else {
        None
    };
    let stop_on_error = stop_checkpoints.clone();
    std::thread::Builder::new()
        .name("cogrelay-store".into())
        .spawn(move || {
            let mut stop = || {
                stop_checkpoints.store(true, Ordering::Release);
                if let Some(c) = checkpointer.take() {
                    let _ = c.join();
                }
            };
            writer_loop(conn, writer, rx, &mut stop);
            // Closed without a `close` (every sender dropped).
            stop();
            let _ = gone.send(());
        })
        .map(|_| ())
        .inspect_err(|_| stop_on_error.store(true, Ordering::Release))
}

/// Runs the batches until the store is closed; `stop_checkpoints` (which
/// stops and waits for the checkpointer) runs before the last checkpoint,
/// so that the two do not meet there.
pub(super) fn writer_loop(
    conn: Connection,
    mut w: Writer,
    mut rx: mpsc::Receiver<Op>,
    stop_checkpoints: impl FnOnce(),
) {
    let mut stop_checkpoints = Some(stop_checkpoints);
    let mut batch: Vec<Op> = Vec::with_capacity(MAX_BATCH);
    let mut last_maintenance = Instant::now();
    let db = Db::new(&conn, w.begin);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        w.now_ms = w.clock.now_ms();
        run_batch(&db, &mut w, &mut batch);
        if ran_out() {
            w.space.ran_out();
        }
        w.space.watch(&conn);
        if w.maintains
            && (last_maintenance.elapsed() >= Duration::from_millis(500)
                || w.completed_since_prune > 1000)
        {
            last_maintenance = Instant::now();
            maintenance(&conn, &mut w);
        }
        if w.stop {
            if let Some(stop) = stop_checkpoints.take() {
                stop();
            }
            if w.maintains {
                let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            }
            drop(db);
            drop(conn);
            rx.close();
            while let Ok(op) = rx.try_recv() {
                drop(op);
            }
            return;
        }
    }
}

/// Runs every queued operation in one transaction and answers them after
/// COMMIT. The operations run side by side, with no savepoint of their own:
/// a savepoint copies every page its operation first touches, a sixth of
/// the ingest's instructions. One that fails having written nothing (a
/// store refused when full, a job not found) is answered with its error
/// and the others go on. One that fails after writing: the transaction is
/// rolled back, what the batch counted in memory is put back, and the batch
/// runs again with a savepoint per operation, so that the failing one
/// undoes only its own writes ([`run_apart`]). An operation that could not
/// run is dropped, which answers its caller `Unavailable`. When the
/// transaction cannot begin (a tool holding the lock past the busy
/// timeout, a disk error), each is answered why, and may try again.
pub(super) fn run_batch(conn: &Db<'_>, w: &mut Writer, batch: &mut Vec<Op>) {
    let read = match begin(conn, w) {
        Ok(read) => read,
        Err(why) => return refuse_all(batch, &why),
    };
    let counted = Counted::of(w);
    match run_together(conn, w, batch, read) {
        Some(keys_touched) => commit(conn, w, batch.drain(..), keys_touched, counted),
        None => {
            counted.put_back(w);
            run_apart(conn, w, batch, counted);
        }
    }
}

/// What operations count in the writer's memory, as it was before a batch:
/// put back when the batch is rolled back, to run again or not at all (else
/// a bundle's room would be promised, or given back, twice or for nothing).
#[derive(Clone, Copy)]
struct Counted {
    promised: u64,
    recounted_at: Option<Instant>,
    completed_since_prune: u64,
    stored_since_maintenance: u64,
}

impl Counted {
    fn of(w: &Writer) -> Self {
        Self {
            promised: w.space.promised,
            recounted_at: w.recounted_at,
            completed_since_prune: w.completed_since_prune,
            stored_since_maintenance: w.stored_since_maintenance,
        }
    }

    fn put_back(self, w: &mut Writer) {
        // The paused set may hold a pause or resume undone: read again.
        w.paused_read_at = None;
        w.space.promised = self.promised;
        w.recounted_at = self.recounted_at;
        w.completed_since_prune = self.completed_since_prune;
        w.stored_since_maintenance = self.stored_since_maintenance;
    }
}

/// Begins the batch's transaction and reads the ordered keys' map if it is
/// not trusted; whether it was read, or why the batch cannot run.
fn begin(conn: &Db<'_>, w: &mut Writer) -> Result<bool, String> {
    if !conn.is_autocommit() {
        // A rollback that failed left a transaction open.
        let _ = conn.execute_batch("ROLLBACK");
    }
    if let Err(e) = conn.exec(Held::Begin) {
        let why = store_error(&e);
        tracing::error!(error = %why, "store: cannot begin a transaction");
        return Err(format!("the store cannot begin a transaction ({why})"));
    }
    // Whether the batch changed the ordered keys' map: if its writes are
    // undone, the map is read again (`keys.rs`).
    let read = refresh_keys(conn, w);
    w.keys.touched();
    if conn.is_autocommit() {
        // The read's writes made SQLite roll the transaction back: nothing
        // of this batch runs.
        w.keys.distrust();
        tracing::error!("store: the transaction was rolled back while reading the ordered keys");
        return Err("the store rolled a transaction back while reading the ordered keys".into());
    }
    Ok(read)
}

/// Answers every operation of `batch` that it could not run, and why.
fn refuse_all(batch: &mut Vec<Op>, why: &str) {
    let err = QueueError::Unavailable(why.to_string());
    for op in batch.drain(..) {
        op.answer(Err(err.clone()));
    }
}

/// Runs the batch's operations in the open transaction with no savepoint;
/// whether the ordered keys' map changed, or `None` when one of them failed
/// after writing (or SQLite rolled the transaction back): then the
/// transaction is rolled back, and the map distrusted if it changed.
fn run_together(
    conn: &Db<'_>,
    w: &mut Writer,
    batch: &mut [Op],
    mut keys_touched: bool,
) -> Option<bool> {
    for op in batch.iter_mut() {
        let changes = conn.total_changes();
        let ok = op.run(conn, w);
        let touched = w.keys.touched();
        keys_touched |= touched;
        // SQLite rolled the transaction back (it may on a full disk).
        let undone = conn.is_autocommit();
        if ok && !undone {
            continue;
        }
        // What it counted in memory (bundles' room) may be off now.
        w.space.promised_stale = true;
        if !undone {
            // SQLite undoes a failed statement, and counts the rows of
            // those that completed: no row changed, nothing to undo.
            if conn.total_changes() == changes && !touched {
                continue;
            }
            if let Err(e) = exec_cached(conn, "ROLLBACK") {
                tracing::error!(error = %store_error(&e), "store: rollback");
            }
        }
        if keys_touched {
            w.keys.distrust();
        }
        return None;
    }
    Some(keys_touched)
}

/// Runs the batch again, each operation in its own savepoint, after one of
/// them failed when they ran together.
fn run_apart(conn: &Db<'_>, w: &mut Writer, batch: &mut Vec<Op>, counted: Counted) {
    let mut keys_touched = match begin(conn, w) {
        Ok(read) => read,
        // Rolled back and not begun again (a tool holding the lock, a full
        // disk): each is told so, as when SQLite rolls a batch back, and
        // may try again.
        Err(why) => return refuse_all(batch, &format!("after a rollback, {why}")),
    };
    let mut ran: Vec<Op> = Vec::with_capacity(batch.len());
    let mut ops = batch.drain(..);
    while let Some(mut op) = ops.next() {
        if let Err(e) = exec_cached(conn, "SAVEPOINT op") {
            let why = store_error(&e);
            tracing::error!(error = %why, "store: savepoint");
            op.answer(Err(QueueError::Unavailable(format!(
                "the store cannot open a savepoint ({why})"
            ))));
            if conn.is_autocommit() {
                return undone(w, keys_touched, counted, ran, ops);
            }
            continue;
        }
        let done = op.run(conn, w);
        ran.push(op);
        let touched = w.keys.touched();
        keys_touched |= touched;
        if conn.is_autocommit() {
            return undone(w, keys_touched, counted, ran, ops);
        }
        if !done {
            // What it counted in memory (bundles' room, keys) may be off now.
            w.space.promised_stale = true;
            if touched {
                // Later operations of the batch do not trust it either.
                w.keys.distrust();
            }
        }
        let end = if done {
            exec_cached(conn, "RELEASE op")
        } else {
            conn.execute_batch("ROLLBACK TO op; RELEASE op")
        };
        if let Err(e) = end {
            tracing::error!(error = %store_error(&e), "store: savepoint");
            if !done {
                // The failed operation's writes may still stand, and would
                // be committed with an error answered (a retry stored
                // twice, its dedup record undone): the whole batch goes.
                let _ = conn.execute_batch("ROLLBACK");
                return undone(w, keys_touched, counted, ran, ops);
            }
        }
        if conn.is_autocommit() {
            // The savepoint's end failed and took the transaction with it: a
            // next SAVEPOINT would begin a new one, and the commit would
            // answer what ran before as stored.
            return undone(w, keys_touched, counted, ran, ops);
        }
    }
    drop(ops);
    commit(conn, w, ran.into_iter(), keys_touched, counted);
}

/// SQLite rolled the whole transaction back (it may on a full disk): what
/// ran before is undone, and what would run now would commit on its own.
/// Nothing of the batch is stored: each operation, run or not, is told so.
fn undone(
    w: &mut Writer,
    keys_touched: bool,
    counted: Counted,
    ran: Vec<Op>,
    not_run: std::vec::Drain<'_, Op>,
) {
    if keys_touched {
        w.keys.distrust();
    }
    counted.put_back(w);
    w.space.promised_stale = true;
    let err = QueueError::Unavailable("the store rolled a transaction back (disk full?)".into());
    tracing::error!(error = %err, not_run = not_run.len(), "store: nothing of this batch was acknowledged");
    for op in ran.into_iter().chain(not_run) {
        op.answer(Err(err.clone()));
    }
}

/// Commits the batch and answers its operations: after the commit, so that
/// a 200 never precedes durability.
/// When the commit fails, what the batch counted in memory is put back.
fn commit(
    conn: &Db<'_>,
    w: &mut Writer,
    ran: impl Iterator<Item = Op>,
    keys_touched: bool,
    counted: Counted,
) {
    let commit = conn.exec(Held::Commit).map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        counted.put_back(w);
        w.space.promised_stale = true;
        if keys_touched {
            w.keys.distrust();
        }
        let err = QueueError::Unavailable(store_error(&e));
        tracing::error!(error = %err, "store: commit failed; nothing of this batch was acknowledged");
        err
    });
    let mut n = 0;
    for op in ran {
        op.answer(commit.clone());
        n += 1;
    }
    if commit.is_ok() {
        w.committed.fetch_add(n, Ordering::Relaxed);
    }
}

/// Runs a parameterless statement through the statement cache: the group-commit
/// loop runs BEGIN/SAVEPOINT/RELEASE/COMMIT thousands of times a second, and
/// parsing them each time showed in profiles.
pub(super) fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Reads the ordered keys' map when it is not trusted, in a savepoint of
/// the batch's transaction (`keys.rs`); whether it was read.
fn refresh_keys(conn: &Connection, w: &mut Writer) -> bool {
    if !w.keys.is_stale() {
        return false;
    }
    let read = exec_cached(conn, "SAVEPOINT keys")
        .map_err(sql_err)
        .and_then(|_| w.keys.refresh(conn));
    let end = match &read {
        Ok(()) => exec_cached(conn, "RELEASE keys"),
        Err(e) => {
            tracing::error!(error = %e, "store: cannot read the ordered keys; new ordered jobs are parked until it can");
            conn.execute_batch("ROLLBACK TO keys; RELEASE keys")
        }
    };
    if let Err(e) = end {
        tracing::error!(error = %store_error(&e), "store: savepoint");
    }
    read.is_ok()
}

/// Prunes completed jobs beyond REMOVE_ON_COMPLETE and expired dedup keys.
pub(super) fn maintenance(conn: &Connection, w: &mut Writer) {
    if let Err(e) = w.keys.check_tools(conn) {
        tracing::warn!(error = %e, "store: cannot read the tools' removals; the ordered keys will be read again");
        w.keys.distrust();
    }
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
    if w.space.promised_stale {
        match promised_bytes(conn) {
            Ok(n) => {
                w.space.promised = n;
                w.space.promised_stale = false;
            }
            Err(e) => tracing::debug!(error = %e, "counting the bundles' room"),
        }
    }
    w.space.maintain();
    let quiet = w.completed_since_prune == 0 && w.stored_since_maintenance == 0;
    w.completed_since_prune = 0;
    w.stored_since_maintenance = 0;
    give_back_free_pages(conn, quiet);
    if quiet && w.space.disk_bytes > 0 {
        // Nothing is being written: the WAL can go to zero bytes.
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "wal truncate");
        }
    }
}

/// Turns on `auto_vacuum=INCREMENTAL`: before the first table for a new
/// store; with a one-time VACUUM for a store made before.
pub(super) fn incremental_vacuum_on(conn: &Connection) -> rusqlite::Result<()> {
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
pub(super) fn give_back_free_pages(conn: &Connection, quiet: bool) {
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

thread_local! {
    /// A statement of this thread failed for want of room since the last look
    /// (the writer thread gives its reserve to deliveries then: `space.rs`).
    static RAN_OUT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a statement failed for want of room since the last call.
pub(super) fn ran_out() -> bool {
    RAN_OUT.with(|r| r.replace(false))
}

/// Bytes the bundles' jobs are promised (see `space.rs`), counted.
pub(super) fn promised_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let rows: Vec<(String, usize)> = conn
        .prepare_cached("SELECT pending, length(body) FROM jobs WHERE pending IS NOT NULL")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows
        .iter()
        .map(|(p, len)| bundle::promise(Bundle::parse(0, p).live().count(), *len))
        .sum())
}

pub(super) fn store_error(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => {
            RAN_OUT.with(|r| r.set(true));
            "the store is full (disk full or COGRELAY_MAX_DB_BYTES reached)".into()
        }
        Some(rusqlite::ErrorCode::DatabaseCorrupt) | Some(rusqlite::ErrorCode::NotADatabase) => {
            format!("the store file is damaged: {e}")
        }
        _ => format!("store error: {e}"),
    }
}

pub(super) fn sql_err(e: rusqlite::Error) -> QueueError {
    QueueError::Unavailable(store_error(&e))
}

/// A job id as the store gives it: digits without a sign or a leading zero
/// (`01` and `+1` are no job's id, as on Redis, where an id is a key's name).
pub(super) fn parse_id(id: &str) -> QueueResult<i64> {
    Some(id)
        .filter(|id| id.bytes().all(|b| b.is_ascii_digit()) && !id.starts_with('0'))
        .and_then(|id| id.parse::<i64>().ok())
        .ok_or_else(|| QueueError::NotFound(id.to_string()))
}

/// Stores an event as a new job (or finds its duplicate). With `lease`, the job
/// is stored already leased (`active`, token, expiry): a direct handoff to the
/// caller's worker pool that saves the claim.
pub(super) fn insert_event(
    conn: &Db<'_>,
    w: &mut Writer,
    event: &Event,
    routes: &[Recipient],
    lease: Option<(&str, i64)>,
) -> QueueResult<(Routed, Vec<usize>)> {
    let now = w.now_ms;
    if routes.is_empty() {
        return Err(QueueError::Unavailable(
            "an event for no destination".into(),
        ));
    }
    let ttl_ms = crate::queue::dedup_ttl_ms(w.settings.dedup_ttl, event, now) as i64;
    // DEDUP_TTL_SECS=0: every event a new job.
    let record = if ttl_ms > 0 {
        match dedup_record(conn, event, now)? {
            Record::Duplicate(first) => return Ok((first, Vec::new())),
            record => Some(record),
        }
    } else {
        None
    };
    // A duplicate stores nothing, so it is answered even when full.
    check_room(conn, w)?;
    // Jobs stored waiting (no handoff asked for, a paused destination's, or
    // one its key holds back: never handed over) and jobs handed over,
    // leased. An ordered job is a row of its own, never in a bundle.
    let mut held = Vec::with_capacity(routes.len());
    let mut ids = vec![0i64; routes.len()];
    let mut leased = Vec::new();
    // Rows of their own: (route, its key's hash if ordered).
    let mut own_rows = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        let key = route
            .order
            .as_ref()
            .map(|o| w.keys.hash(&route.destination, &o.key));
        let handed = lease.is_some()
            && !w.is_paused(conn, &route.destination)?
            && key.is_none_or(|h| w.keys.is_free(h));
        if handed {
            leased.push(i);
        }
        match (handed, key) {
            (false, None) => held.push(i),
            _ => own_rows.push((i, key)),
        }
    }
    insert_held(conn, w, event, routes, &held, &mut ids)?;
    for &(i, key) in &own_rows {
        let route = &routes[i];
        // A job of a key that has one stored before it is parked.
        let parked = key.is_some_and(|h| !w.keys.is_free(h));
        ids[i] = insert_row(
            conn,
            event,
            now,
            NewRow {
                destination: &route.destination,
                lease: lease.filter(|_| leased.contains(&i)),
                pending: None,
                bundled: 0,
                order: route.order.as_ref(),
                parked,
            },
        )?;
        if let (Some(h), Some(o)) = (key, &route.order) {
            w.keys.add(h, ids[i], parked, o.hold);
        }
    }
    let jobs: Vec<JobRef> = routes
        .iter()
        .zip(&ids)
        .map(|(r, id)| JobRef {
            destination: r.destination.clone(),
            id: id.to_string(),
        })
        .collect();
    w.stored_since_maintenance += 1;
    if let Some(record) = &record {
        write_record(conn, event, record, &jobs, now.saturating_add(ttl_ms))?;
    }
    Ok((
        Routed {
            duplicate: false,
            jobs,
        },
        leased,
    ))
}

/// The jobs stored waiting (`held`: no handoff asked for, or a paused
/// destination's), their ids in `ids`: one row, or for two or more a bundle:
/// one row, the last one's job, naming the others, whose ids come before its
/// own and whose rows a claim writes out, in the room promised here (see
/// `bundle.rs`).
fn insert_held(
    conn: &Db<'_>,
    w: &mut Writer,
    event: &Event,
    routes: &[Recipient],
    held: &[usize],
    ids: &mut [i64],
) -> QueueResult<()> {
    let Some((&last, rest)) = held.split_last() else {
        return Ok(());
    };
    let now = w.now_ms;
    let promised = bundle::promise(rest.len(), event.body.len());
    if promised > 0 {
        w.space
            .reserve_for(promised)
            .map_err(QueueError::Unavailable)?;
    }
    let pending = (!rest.is_empty()).then(|| {
        let names: Vec<&str> = rest
            .iter()
            .map(|&i| routes[i].destination.as_str())
            .collect();
        names.join(",")
    });
    let bundled = if rest.is_empty() {
        0
    } else {
        held.len() as i64
    };
    let id = insert_row(
        conn,
        event,
        now,
        NewRow {
            destination: &routes[last].destination,
            lease: None,
            pending: pending.as_deref(),
            bundled,
            order: None,
            parked: false,
        },
    )?;
    for (k, &i) in held.iter().rev().enumerate() {
        ids[i] = id - k as i64;
    }
    w.space.promised += promised;
    Ok(())
}

/// One row of `jobs` for an event.
struct NewRow<'a> {
    destination: &'a str,
    /// Stored active, leased with this token until then (handed over);
    /// else waiting.
    lease: Option<(&'a str, i64)>,
    /// A bundle's other destinations, comma-separated.
    pending: Option<&'a str>,
    /// A bundle's number of jobs (0: not a bundle).
    bundled: i64,
    /// The key its destination delivers it in order by.
    order: Option<&'a OrderKey>,
    /// Behind an earlier job of its key: due at `keys.rs` `PARKED`.
    parked: bool,
}

/// Inserts `r` for `event`, stored at `now`; its id.
/// ?13 > 0: a bundle of ?13 jobs, whose row takes the last of their ids,
/// which reserves the others (AUTOINCREMENT keeps the largest id given);
/// else the next id.
const INSERT_ROW: &str = concat!(
    "INSERT INTO jobs (seq, event_key, event_id, bot_id, event_type, kind, body, state, due_at_ms, created_at_ms,
                       lease_token, lease_until_ms, destination, pending, order_key, order_hold)
     VALUES (CASE WHEN ?13 > 0
                  THEN coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0) + ?13 END,
             ?1, ?2, ?3, ?4, ?5, ?6, ?7, CASE WHEN ?16 THEN ",
    keys::parked!(),
    " ELSE ?8 END, ?8,
             ?9, ?10, ?11, ?12, ?14, ?15)"
);

fn insert_row(conn: &Db<'_>, event: &Event, now: i64, r: NewRow<'_>) -> QueueResult<i64> {
    let (state, token, until) = match r.lease {
        Some((token, until)) => ("active", Some(token), Some(until)),
        None => ("waiting", None, None),
    };
    conn.with(Held::Insert, |insert| {
        insert.execute(params![
            event.key.as_str(),
            event.event_id,
            event.bot_id,
            event.event_type,
            event.kind.as_str(),
            event.body,
            state,
            now,
            token,
            until,
            r.destination,
            r.pending,
            r.bundled,
            r.order.map(|o| o.key.as_str()),
            r.order.is_some_and(|o| o.hold),
            r.parked,
        ])
    })
    .map(|_| conn.last_insert_rowid())
    .map_err(sql_err)
}

const FIRST_JOBS: &str =
    "SELECT job_seq, jobs, bot FROM dedup WHERE event_key=?1 AND expires_at_ms > ?2";

/// An event's dedup record: another's within the TTL (the event is its
/// duplicate), or the one it is to write: its key's, or its own.
enum Record {
    Duplicate(Routed),
    Key,
    Own(String),
}

/// The record `event` is deduplicated under (`Event::key_sharer`): its key,
/// unless the key's record is another event's.
fn dedup_record(conn: &Db<'_>, event: &Event, now: i64) -> QueueResult<Record> {
    let key = event.key.as_str();
    let Some((first, owner)) = first_jobs(conn, key, now)? else {
        return Ok(Record::Key);
    };
    let Some(sharer) = event.key_sharer() else {
        return Ok(Record::Duplicate(first));
    };
    if !sharer.is_other(owner.as_deref()) {
        return Ok(Record::Duplicate(first));
    }
    // Another event's key: this one's own record.
    let own = sharer.own_record();
    if let Some((first, _)) = first_jobs(conn, &own, now)? {
        return Ok(Record::Duplicate(first));
    }
    Ok(Record::Own(own))
}

/// Writes the dedup record of an event stored as `jobs`.
fn write_record(
    conn: &Db<'_>,
    event: &Event,
    record: &Record,
    jobs: &[JobRef],
    expires_at_ms: i64,
) -> QueueResult<()> {
    match record {
        // The key's, with the botId of an event that may share it.
        Record::Key => {
            let bot = event
                .key_sharer()
                .filter(|k| k.bot_is_kept())
                .map(|k| k.bot);
            remember(conn, event.key.as_str(), bot, jobs, expires_at_ms)
        }
        // Its own, the key being another event's: the key's lasts as long,
        // so that a resend of this event finds it, and so its own.
        Record::Own(own) => {
            conn.prepare_cached(
                "UPDATE dedup SET expires_at_ms = max(expires_at_ms, ?2) WHERE event_key = ?1",
            )
            .and_then(|mut s| s.execute(params![event.key.as_str(), expires_at_ms]))
            .map_err(sql_err)?;
            remember(conn, own, None, jobs, expires_at_ms)
        }
        Record::Duplicate(_) => Ok(()),
    }
}

/// The jobs of an event with this dedup record stored within the dedup
/// TTL, as a duplicate's answer, and the botId beside it.
fn first_jobs(
    conn: &Db<'_>,
    dedup_id: &str,
    now: i64,
) -> QueueResult<Option<(Routed, Option<String>)>> {
    let existing: Option<(i64, Option<String>, Option<String>)> = conn
        .with(Held::FirstJobs, |s| {
            s.query_row(params![dedup_id, now], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
        })
        .map_err(sql_err)?;
    Ok(existing.map(|(seq, jobs, bot)| {
        // A row of an older version names one job, the default destination's.
        let jobs = jobs.map(|t| parse_jobs_text(&t)).unwrap_or_else(|| {
            vec![JobRef {
                destination: DestinationName::DEFAULT,
                id: seq.to_string(),
            }]
        });
        let routed = Routed {
            duplicate: true,
            jobs,
        };
        (routed, bot)
    }))
}

/// Whether a new event may be stored: not while the store is refusing
/// (see `space.rs`). The room promised to bundles may be less than counted
/// (the command line removed some of their jobs): counted again, at most
/// every 5 s, before a refusal.
fn check_room(conn: &Connection, w: &mut Writer) -> QueueResult<()> {
    let Some(why) = w.space.refusal() else {
        return Ok(());
    };
    if w.space.promised > 0
        && w.recounted_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
    {
        w.recounted_at = Some(Instant::now());
        w.space.promised = promised_bytes(conn).map_err(sql_err)?;
        if w.space.refusal().is_none() {
            return Ok(());
        }
    }
    Err(QueueError::Unavailable(why))
}

const REMEMBER: &str =
    "INSERT OR REPLACE INTO dedup (event_key, job_seq, expires_at_ms, jobs, bot) VALUES (?1, ?2, ?3, ?4, ?5)";

/// The event's dedup record (its key, or its own: [`dedup_record`], in the
/// `event_key` column), its first job, every job's `destination=id` and,
/// on the key's record, a botId that holds a `-`; until `expires_at_ms`.
fn remember(
    conn: &Db<'_>,
    dedup_id: &str,
    bot: Option<&str>,
    jobs: &[JobRef],
    expires_at_ms: i64,
) -> QueueResult<()> {
    let first: i64 = jobs
        .first()
        .and_then(|j| j.id.parse().ok())
        .unwrap_or_default();
    conn.with(Held::Remember, |s| {
        s.execute(params![
            dedup_id,
            first,
            expires_at_ms,
            jobs_text(jobs),
            bot
        ])
    })
    .map_err(sql_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Cadence;

    /// Checkpoints every 500 ms under a light load; once 512 operations were
    /// committed since the last one, at the next look, and looks every 10 ms
    /// while that goes on.
    #[test]
    fn checkpoints_follow_the_writes_and_keep_500_ms_under_a_light_load() {
        let mut c = Cadence::default();
        let mut at = 0;
        // A light load: 100 operations a second.
        let mut checkpoints = Vec::new();
        for _ in 0..40 {
            let tick = c.tick();
            at += tick.as_millis() as u64;
            if c.looked(tick, at / 10) {
                checkpoints.push(at);
            }
        }
        assert_eq!(checkpoints, [500, 1000, 1500, 2000], "every 500 ms");
        assert_eq!(c.tick(), Duration::from_millis(50));
        // 512 more operations: at the next look, then every 10 ms.
        let base = at / 10;
        assert!(c.looked(c.tick(), base + 512), "grown: now");
        assert_eq!(c.tick(), Duration::from_millis(10));
        assert!(!c.looked(c.tick(), base + 1000), "488 more: not yet");
        assert!(c.looked(c.tick(), base + 1024));
        // The burst is over: the next checkpoint 500 ms after the last (49
        // looks of 10 ms that find nothing), then looked at every 50 ms.
        let mut looks = 0;
        while !c.looked(c.tick(), base + 1024) {
            looks += 1;
        }
        assert_eq!(looks, 49);
        assert_eq!(c.tick(), Duration::from_millis(50));
    }
}
