//! Room to deliver: what the store keeps back so that a full store, or a
//! full disk, still delivers and drains (see "Bounded size" in the module
//! doc of [`super`]).
//!
//! * **Promised bytes.** A bundle's jobs are written out as rows of their
//!   own when a destination claims: room their event was acknowledged with.
//!   So the room they will take is counted at ingest ([`row_bytes`] each)
//!   as if it were taken: against `COGRELAY_MAX_DB_BYTES`, and in the reserve
//!   file below, which gives it back just before they are written.
//! * **The reserve file** (`cogrelay.reserve`, allocated blocks, never
//!   read): the base reserve plus the promised bytes. When the disk fills
//!   up, a new event is refused (its write fails, or the reserve cannot
//!   grow for its bundle); when a write of the delivery side fails for want
//!   of room, the base reserve is given back to the file system and new
//!   events are refused until the disk has room for the reserve again.
//!   Deliveries meanwhile claim, finish and delete rows (which frees room)
//!   within what was given back. The base reserve is sized to the WAL the
//!   writer keeps (see [`Space::new`]), which is what deliveries write.

use std::fs::File;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

/// The reserve grows and shrinks in steps of this (few system calls).
const STEP: u64 = 1024 * 1024;

/// The WAL size past which the writer restarts it, at most (see the module
/// doc of [`super`]); less on a small file system or under a small cap.
pub const WAL_RESTART_BYTES: u64 = 16 * 1024 * 1024;

/// Bytes a job row with a body of `body_len` bytes may take in the table
/// and its indexes, at most: a row over half a page takes a page of its own
/// (two do not fit), a larger one its overflow pages; smaller rows share
/// pages, with a quarter for what pages leave free.
pub(super) fn row_bytes(body_len: u64) -> u64 {
    const PAGE: u64 = 4096;
    let row = body_len + 256;
    if row > PAGE / 2 {
        row.div_ceil(PAGE - 128) * PAGE
    } else {
        row + row / 4
    }
}

/// The sizes and reserves of one store (owned by the writer thread).
pub(super) struct Space {
    db_path: PathBuf,
    wal_path: PathBuf,
    /// Main file + WAL, read after each batch.
    pub(super) disk_bytes: u64,
    /// `COGRELAY_MAX_DB_BYTES` (0: none).
    pub(super) max_bytes: u64,
    /// WAL size past which the writer restarts it.
    pub(super) wal_restart_bytes: u64,
    /// Bytes the bundles' jobs take once written out (see [`row_bytes`]).
    pub(super) promised: u64,
    /// `promised` may be off (a batch rolled back): counted again at the
    /// next maintenance.
    pub(super) promised_stale: bool,
    /// The relay's reserve file; `None` for a tool.
    reserve: Option<Reserve>,
    /// Held by the background checkpoint while it runs, and by the
    /// writer's RESTART: SQLite refuses a checkpoint at once (busy, without
    /// its busy handler) while another one runs, so the RESTART waits for
    /// the running one instead of failing (the WAL grew past its bound, 64
    /// MB, under load).
    pub(super) checkpoints: std::sync::Arc<std::sync::Mutex<()>>,
    /// `disk_bytes` as last read, for the `/metrics` gauge.
    pub(super) shown: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

struct Reserve {
    path: PathBuf,
    file: Option<File>,
    /// Kept for deliveries beyond the promised bytes.
    base: u64,
    /// Bytes allocated to the file now.
    allocated: u64,
    /// The disk is full: new events are refused until the reserve (base
    /// and promises) can be allocated again.
    refusing: bool,
    /// The base was given back to the deliveries.
    spent: bool,
}

/// What the file system holding `dir` has: (total, free) bytes.
fn file_system(dir: &Path) -> (u64, u64) {
    match rustix::fs::statvfs(dir) {
        Ok(s) => (
            s.f_blocks.saturating_mul(s.f_frsize),
            s.f_bavail.saturating_mul(s.f_frsize),
        ),
        Err(_) => (u64::MAX, u64::MAX),
    }
}

impl Space {
    /// The sizes of a store in `data_dir`; with `relay`, its reserve file
    /// too. The WAL is restarted past 16 MiB, a quarter of the cap, or a
    /// 64th of the file system, whichever is least; the base reserve holds
    /// twice that plus a step, and at least a 64th of the file system (at
    /// most 64 MiB).
    pub(super) fn new(data_dir: &Path, db_path: &Path, max_bytes: u64, relay: bool) -> Self {
        let (total, _) = file_system(data_dir);
        let mut wal_restart_bytes = WAL_RESTART_BYTES.min((total / 64).max(64 * 1024));
        if max_bytes > 0 {
            wal_restart_bytes = wal_restart_bytes.min(max_bytes / 4);
        }
        let base = (2 * wal_restart_bytes + STEP).max((total / 64).clamp(STEP, 64 * STEP));
        let mut space = Self {
            db_path: db_path.to_path_buf(),
            wal_path: wal_path(db_path),
            disk_bytes: 0,
            max_bytes,
            wal_restart_bytes,
            promised: 0,
            promised_stale: false,
            shown: Default::default(),
            checkpoints: Default::default(),
            reserve: relay.then(|| Reserve {
                path: data_dir.join(RESERVE_FILE),
                file: None,
                base,
                allocated: 0,
                refusing: false,
                spent: false,
            }),
        };
        if let Some(r) = &mut space.reserve {
            match File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&r.path)
            {
                Ok(f) => {
                    r.allocated = f.metadata().map_or(0, |m| m.len());
                    r.file = Some(f);
                }
                Err(e) => {
                    tracing::warn!(path = %r.path.display(), error = %e, "cannot create the store's reserve file: a full disk may stop deliveries");
                }
            }
        }
        space
    }

    /// Reads the sizes of the files; restarts the WAL if it grew too long.
    pub(super) fn watch(&mut self, conn: &Connection) {
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let mut wal = size(&self.wal_path);
        if wal > self.wal_restart_bytes {
            // Busy (1) when readers outlast the busy timeout (or another
            // process checkpoints): again after the next batch.
            let _one = self.checkpoints.lock().unwrap_or_else(|e| e.into_inner());
            match conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0)) {
                Ok(0) => wal = size(&self.wal_path),
                Ok(_) => tracing::debug!("wal restart: busy; again after the next batch"),
                Err(e) => tracing::debug!(error = %e, "wal restart"),
            }
        }
        self.disk_bytes = size(&self.db_path) + wal;
        self.shown
            .store(self.disk_bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Why a new event is refused now, if it is.
    pub(super) fn refusal(&self) -> Option<String> {
        if self.max_bytes > 0 {
            let reserve = self
                .reserve
                .as_ref()
                .map_or(0, |r| r.base)
                .min(self.max_bytes / 8);
            let needs = self.disk_bytes + self.promised + reserve;
            if needs >= self.max_bytes {
                return Some(format!(
                    "the store is full: database and WAL hold {} bytes, {} more are kept for the jobs already accepted and {reserve} for deliveries, of COGRELAY_MAX_DB_BYTES={}",
                    self.disk_bytes, self.promised, self.max_bytes
                ));
            }
        }
        if self.reserve.as_ref().is_some_and(|r| r.refusing) {
            return Some(
                "the disk is full: new events are refused until it has room again; deliveries go on"
                    .into(),
            );
        }
        None
    }

    /// Makes sure the reserve file holds the promised bytes plus `extra`
    /// (a new bundle's), before that bundle is stored.
    pub(super) fn reserve_for(&mut self, extra: u64) -> Result<(), String> {
        let want = self.promised + extra;
        let Some(r) = &mut self.reserve else {
            return Ok(());
        };
        if r.file.is_none() || r.allocated >= r.base + want {
            return Ok(());
        }
        let target = (r.base + want).div_ceil(STEP) * STEP + STEP;
        match r.grow(target) {
            Ok(()) => Ok(()),
            Err(e) => {
                if !r.refusing {
                    tracing::warn!(error = %e, "the disk is full: new events are refused until it has room again; deliveries go on");
                }
                r.refusing = true;
                Err("the disk is full: new events are refused until it has room again".into())
            }
        }
    }

    /// The promised bytes of bundles about to be written out (or removed):
    /// given back to the file system first, so that the rows find room.
    pub(super) fn release(&mut self, bytes: u64) {
        self.promised = self.promised.saturating_sub(bytes);
        if let Some(r) = &mut self.reserve {
            let keep = if r.spent { 0 } else { r.base };
            let target = (keep + self.promised).div_ceil(STEP) * STEP;
            if r.allocated >= target + STEP {
                r.shrink(target);
            }
        }
    }

    /// A write failed for want of room (SQLITE_FULL): if it was the disk
    /// (not the cap), the base reserve goes to the deliveries, and new
    /// events wait (see the module doc).
    pub(super) fn ran_out(&mut self) {
        let capped = self.max_bytes > 0 && self.disk_bytes + STEP >= self.max_bytes;
        let promised = self.promised;
        let Some(r) = &mut self.reserve else {
            return;
        };
        if r.spent || capped && file_system_has_room(&r.path, r.base) {
            return;
        }
        r.spent = true;
        r.refusing = true;
        r.shrink(promised.div_ceil(STEP) * STEP);
        tracing::warn!(
            released = r.base,
            "the disk is full: the store's reserve is given to the deliveries; new events are refused until the disk has room again"
        );
    }

    /// At maintenance: the reserve back once the disk has room for it.
    pub(super) fn maintain(&mut self) {
        let promised = self.promised;
        let Some(r) = &mut self.reserve else {
            return;
        };
        if !r.refusing || r.file.is_none() {
            return;
        }
        let target = (r.base + promised).div_ceil(STEP) * STEP;
        let more = target.saturating_sub(r.allocated);
        if !file_system_has_room(&r.path, more + r.base) {
            return;
        }
        if r.grow(target).is_ok() {
            r.spent = false;
            r.refusing = false;
            tracing::info!(
                "the disk has room again: the store's reserve is back, new events are accepted"
            );
        }
    }
}

/// The reserve file's name in the data directory.
pub const RESERVE_FILE: &str = "cogrelay.reserve";

fn file_system_has_room(path: &Path, bytes: u64) -> bool {
    let dir = path.parent().unwrap_or(path);
    file_system(dir).1 >= bytes
}

impl Reserve {
    fn grow(&mut self, to: u64) -> std::io::Result<()> {
        let Some(f) = &self.file else {
            return Ok(());
        };
        if to <= self.allocated {
            return Ok(());
        }
        let from = self.allocated;
        match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::empty(), from, to - from) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => write_zeros(f, from, to)?,
            Err(e) => {
                // Give back what a partial allocation may have taken.
                let _ = f.set_len(from);
                return Err(e.into());
            }
        }
        self.allocated = to;
        Ok(())
    }

    fn shrink(&mut self, to: u64) {
        let Some(f) = &self.file else {
            return;
        };
        if to < self.allocated && f.set_len(to).is_ok() {
            self.allocated = to;
        }
    }
}

/// The store's WAL file, where SQLite puts it: beside the database's file,
/// symbolic links resolved, its name's bytes as they are (a `display()`
/// would replace bytes that are not UTF-8, and the WAL's size, read from
/// a file that does not exist, would never restart it).
pub(super) fn wal_path(db_path: &Path) -> PathBuf {
    let mut name = std::fs::canonicalize(db_path)
        .unwrap_or_else(|_| db_path.to_path_buf())
        .into_os_string();
    name.push("-wal");
    PathBuf::from(name)
}

/// Allocates by writing, where the file system cannot allocate blocks.
fn write_zeros(f: &File, from: u64, to: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 64 * 1024];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        if let Err(e) = f.write_all_at(&zeros[..n], at) {
            let _ = f.set_len(from);
            return Err(e);
        }
        at += n as u64;
    }
    f.sync_data()
}
