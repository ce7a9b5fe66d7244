//! Ordered keys on the embedded store: which job of a key may go.
//!
//! A destination with `ordering` delivers a key's jobs one at a time, in the
//! order they were stored (docs/destinations.md). The store *parks* a key's
//! later jobs: waiting, due at [`PARKED`], so no claim takes them, and they
//! count and list as waiting. The relay's writer keeps, per destination and
//! key, the key's *open* jobs (due, active, delayed, or failed holding the
//! key) and its parked ones in order ([`Keys`]). A new job of a key that has
//! any is parked; when the last open one leaves its key (delivered, failed
//! under `continue`, removed), the first parked one is made due, in the same
//! transaction. So the ingest of an ordered event writes its row and nothing
//! else (an index by key cost 8% of the ingest), and claims read no key:
//! only a key's first job is ever due, as on Redis (`lua/order.lua`).
//!
//! A job failed under `continue` leaves its key for good (its `order_key` is
//! cleared): an operator's retry delivers it on its own, as on Redis.
//!
//! The map is read from the store ([`Keys::read`], in the first batch after
//! the relay opens it); again after an operation that changed it was undone;
//! and after a tool beside the relay (the command line) removed an ordered
//! job that was not finished, which the tool counts in the table `changes`
//! and the relay's maintenance looks at every half second. The read also
//! parks what an older version stored unparked, and lets a key go on whose
//! open job is gone. Until it is read ([`Keys::stale`]) the map is not
//! trusted, and nothing is lost or overtaken: every new ordered job is
//! parked and none is let go (the read lets each key's first go). The read
//! is a scan of the unfinished jobs (about 0.6 s for a million) on the
//! writer thread.

use std::collections::VecDeque;

use foldhash::HashMap;

use rusqlite::{Connection, OptionalExtension};

use super::{sql_err, QueueResult};

/// The due time of a parked job: never.
pub(super) const PARKED: i64 = i64::MAX;

/// [`PARKED`] in SQL text.
macro_rules! parked {
    () => {
        "9223372036854775807"
    };
}
pub(super) use parked;

/// SQL over a job's own columns: it is its key's open job if it has a key
/// (unfinished, or failed holding its key). The one statement of the rule
/// for `let_go` and the upgrade of a version-6 store (`mod.rs`
/// `upgrade_ordered_jobs`); [`Keys::read`] reads the same jobs through the
/// partial index of each state.
macro_rules! open_job {
    () => {
        "(order_key IS NOT NULL AND (state IN ('waiting','active','delayed') OR (state = 'failed' AND order_hold = 1)))"
    };
}
pub(super) use open_job;

/// The name of the tools' count of removed ordered jobs in `changes`.
const REMOVED_BY_TOOLS: &str = "ordered jobs removed by a tool";

/// The ordered keys with jobs in the store (see the module doc).
#[derive(Debug)]
pub(super) struct Keys {
    map: HashMap<u64, Key>,
    /// The open jobs' keys and whether a failure holds them: a finish
    /// looks its job up here, not in the store.
    open: HashMap<i64, (u64, bool)>,
    /// The seed of [`Keys::hash`], this process's own: a collision would
    /// make two keys wait for each other, and a key's hash is not known
    /// outside.
    seed: u64,
    /// Whether the map changed since [`Keys::touched`] was last asked: an
    /// undone operation that changed it makes it [`Keys::stale`].
    changed: bool,
    /// Not trusted: read it from the store (see the module doc).
    stale: bool,
    /// The tools' count of removed ordered jobs, as last read.
    tools_seen: i64,
}

impl Keys {
    /// A map to read before its first use (the relay's), or none that is
    /// used (a tool's: it neither stores nor finishes jobs).
    pub(super) fn new(relay: bool) -> Keys {
        Keys {
            map: HashMap::default(),
            open: HashMap::default(),
            seed: fastrand::u64(..),
            changed: false,
            stale: relay,
            tools_seen: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Key {
    /// How many of its jobs are out of the parked line (one, but for what
    /// an older version left); which ones: [`Keys::open`].
    open: usize,
    /// With whether a failure holds the key.
    parked: VecDeque<(i64, bool)>,
}

impl Keys {
    /// A destination's key, as the map knows it.
    pub(super) fn hash(&self, destination: &str, key: &str) -> u64 {
        use xxhash_rust::xxh3::xxh3_64_with_seed;
        xxh3_64_with_seed(
            key.as_bytes(),
            xxh3_64_with_seed(destination.as_bytes(), self.seed),
        )
    }

    /// Whether a new job of key `h` may go at once: the key has none (and
    /// the map is trusted).
    pub(super) fn is_free(&self, h: u64) -> bool {
        !self.stale && !self.map.contains_key(&h)
    }

    /// Whether the map must be read before it is trusted again.
    pub(super) fn is_stale(&self) -> bool {
        self.stale
    }

    /// Not to be trusted until read again.
    pub(super) fn distrust(&mut self) {
        self.stale = true;
    }

    /// Notes job `seq` of key `h`, stored parked or not, held by a failure
    /// or not.
    pub(super) fn add(&mut self, h: u64, seq: i64, parked: bool, hold: bool) {
        if self.stale {
            return;
        }
        self.changed = true;
        let key = self.map.entry(h).or_default();
        if parked {
            key.parked.push_back((seq, hold));
        } else {
            key.open += 1;
            self.open.insert(seq, (h, hold));
        }
    }

    /// Open job `seq`'s key, and whether a failure holds it; none for a job
    /// that is not an ordered key's open one (or while the map is stale).
    pub(super) fn open_job(&self, seq: i64) -> Option<(u64, bool)> {
        self.open.get(&seq).copied().filter(|_| !self.stale)
    }

    /// Job `seq` of key `h` left it (or, parked, was removed): when no job
    /// of the key is open any more, the first parked one that is still
    /// there is made due.
    pub(super) fn leave(&mut self, conn: &Connection, h: u64, seq: i64) -> QueueResult<()> {
        if self.stale {
            return Ok(());
        }
        let Some(key) = self.map.get_mut(&h) else {
            return Ok(());
        };
        self.changed = true;
        if self.open.remove(&seq).is_some() {
            key.open -= 1;
        } else if let Some(i) = key.parked.iter().position(|&(s, _)| s == seq) {
            key.parked.remove(i);
        }
        while key.open == 0 {
            let Some((next, hold)) = key.parked.pop_front() else {
                break;
            };
            if let_go(conn, next)? {
                key.open += 1;
                self.open.insert(next, (h, hold));
            }
        }
        if key.open == 0 {
            self.map.remove(&h);
        }
        Ok(())
    }

    /// Whether the map changed since the last call.
    pub(super) fn touched(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Distrusts the map if a tool removed an unfinished ordered job since
    /// it was read.
    pub(super) fn check_tools(&mut self, conn: &Connection) -> QueueResult<()> {
        if tools_count(conn)? != self.tools_seen {
            self.stale = true;
        }
        Ok(())
    }

    /// Reads the map from the store (inside a write transaction: it parks
    /// and lets go as the module doc says). On failure it stays stale.
    pub(super) fn refresh(&mut self, conn: &Connection) -> QueueResult<()> {
        *self = Keys::read(conn, self.seed)?;
        Ok(())
    }

    /// The keys of the store's open and parked ordered jobs.
    fn read(conn: &Connection, seed: u64) -> QueueResult<Keys> {
        // From the partial indexes of waiting/delayed, active and failed
        // jobs: not the whole history.
        let rows: Vec<(i64, String, String, String, i64, bool)> = conn
            .prepare_cached(
                "SELECT seq, destination, order_key, state, due_at_ms, order_hold FROM jobs INDEXED BY jobs_due_by_destination
                  WHERE state IN ('waiting','delayed') AND order_key IS NOT NULL
                 UNION ALL
                 SELECT seq, destination, order_key, state, due_at_ms, order_hold FROM jobs INDEXED BY jobs_lease
                  WHERE state = 'active' AND order_key IS NOT NULL
                 UNION ALL
                 SELECT seq, destination, order_key, state, due_at_ms, order_hold FROM jobs INDEXED BY jobs_failed
                  WHERE state = 'failed' AND order_hold = 1 AND order_key IS NOT NULL
                 ORDER BY seq",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                })?
                    .collect::<Result<_, _>>()
            })
            .map_err(sql_err)?;
        let mut keys = Keys {
            tools_seen: tools_count(conn)?,
            seed,
            ..Keys::new(false)
        };
        for (seq, destination, key, state, due, hold) in rows {
            let h = keys.hash(&destination, &key);
            let first = keys.is_free(h);
            let waiting = state == "waiting";
            let parked = if waiting && due == PARKED {
                !(first && let_go(conn, seq)?)
            } else if waiting && !first {
                // Stored due by an older version behind its key's first.
                park(conn, seq)?;
                true
            } else {
                false
            };
            keys.add(h, seq, parked, hold);
        }
        Ok(keys)
    }
}

/// A tool (not the relay, which keeps the map) removed an unfinished
/// ordered job: the relay reads its map again (see the module doc).
pub(super) fn count_removed_by_tool(conn: &Connection) -> QueueResult<()> {
    conn.prepare_cached(
        "INSERT INTO changes (what, n) VALUES (?1, 1) ON CONFLICT (what) DO UPDATE SET n = n + 1",
    )
    .and_then(|mut s| s.execute([REMOVED_BY_TOOLS]))
    .map(|_| ())
    .map_err(sql_err)
}

fn tools_count(conn: &Connection) -> QueueResult<i64> {
    conn.prepare_cached("SELECT n FROM changes WHERE what = ?1")
        .and_then(|mut s| s.query_row([REMOVED_BY_TOOLS], |r| r.get(0)).optional())
        .map(|n| n.unwrap_or(0))
        .map_err(sql_err)
}

/// Makes parked job `seq` due, since it was stored (claims take the
/// earliest due first); whether it is now its key's open job (false: it is
/// gone, or finished).
fn let_go(conn: &Connection, seq: i64) -> QueueResult<bool> {
    let changed = conn
        .prepare_cached(concat!(
            "UPDATE jobs SET due_at_ms = created_at_ms WHERE seq = ?1 AND state = 'waiting' AND due_at_ms = ",
            parked!()
        ))
        .and_then(|mut s| s.execute([seq]))
        .map_err(sql_err)?;
    if changed == 1 {
        return Ok(true);
    }
    // Not parked any more: open if it is still there unfinished.
    conn.prepare_cached(concat!(
        "SELECT 1 FROM jobs WHERE seq = ?1 AND ",
        open_job!()
    ))
    .and_then(|mut s| s.exists([seq]))
    .map_err(sql_err)
}

fn park(conn: &Connection, seq: i64) -> QueueResult<()> {
    conn.prepare_cached(concat!(
        "UPDATE jobs SET due_at_ms = ",
        parked!(),
        " WHERE seq = ?1"
    ))
    .and_then(|mut s| s.execute([seq]))
    .map(|_| ())
    .map_err(sql_err)
}
