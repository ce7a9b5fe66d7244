//! Bundles: one row for an event, however many destinations it is for (see
//! "Bundles" in the module doc of [`super`]).
//!
//! A bundle is the row of an event stored for several destinations without
//! a handoff: the last destination's job (the *carrier*), whose `pending`
//! names the other jobs' destinations in order, one *slot* each
//! ("crm,dw"). Slot k's job id is the carrier's id minus the number of
//! slots plus k: the carrier takes the largest id of its event, so
//! AUTOINCREMENT never gives the others again. A slot whose job an operator
//! removed is [`REMOVED`]; a bundle with no live slot is a plain row.
//!
//! Rules, which the model in `tests/it/queue_model.rs` checks:
//! * a bundle's jobs are waiting, never attempted, due since the event came;
//!   so is the carrier while it is one: it is never claimed before its
//!   bundle is written out (a carrier deleted with its slots would lose
//!   them);
//! * a claim writes bundles out, oldest first, a bounded number at a time,
//!   into the room promised for them at ingest (`space.rs`); when some are
//!   left it says to claim again at once;
//! * nothing else writes one out: operators' reads show the slots' jobs as
//!   they are ([`virtual_view`]), a removal clears a slot or hands the
//!   carrier's row to the last live slot, in place.

use rusqlite::{params, Connection, OptionalExtension};

use super::space::{row_bytes, Space};
use super::writer::sql_err;
use crate::queue::{JobState, JobView, QueueResult};

/// A removed job's slot (not a destination name: names are `[a-z0-9_-]`).
pub(super) const REMOVED: &str = "~";

/// How many bundles a claim writes out at most (a backlog stored while
/// every destination of its events was paused is written out over several
/// claims, oldest first, so one claim never holds the writer for long).
pub(super) const WRITE_OUT_PER_CLAIM: i64 = 256;

/// A bundle as stored: the carrier's id and its slots.
#[derive(Debug, Clone)]
pub(super) struct Bundle {
    pub(super) seq: i64,
    pub(super) slots: Vec<String>,
}

impl Bundle {
    pub(super) fn parse(seq: i64, pending: &str) -> Self {
        Self {
            seq,
            slots: pending.split(',').map(str::to_string).collect(),
        }
    }

    /// The id of slot `k`.
    pub(super) fn id_of(&self, k: usize) -> i64 {
        self.seq - self.slots.len() as i64 + k as i64
    }

    /// The slot of job `id`, if it is one of this bundle's live jobs.
    pub(super) fn slot_of(&self, id: i64) -> Option<usize> {
        let first = self.id_of(0);
        (first..self.seq)
            .contains(&id)
            .then(|| (id - first) as usize)
            .filter(|&k| self.slots[k] != REMOVED)
    }

    /// (id, destination) of each live slot, in id order.
    pub(super) fn live(&self) -> impl DoubleEndedIterator<Item = (i64, &str)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, d)| *d != REMOVED)
            .map(|(k, d)| (self.id_of(k), d.as_str()))
    }

    /// The `pending` column for these slots: NULL once none is live.
    fn text(&self) -> Option<String> {
        (self.live().next().is_some()).then(|| self.slots.join(","))
    }
}

/// The room a bundle of `live` jobs with a body of `body_len` bytes is
/// promised (see `space.rs`).
pub(super) fn promise(live: usize, body_len: usize) -> u64 {
    live as u64 * row_bytes(body_len as u64)
}

/// Writes out at most `max` bundles, oldest first, as the rows the ingest
/// would have written (waiting, never attempted, due since the event came).
pub(super) fn write_out(conn: &Connection, space: &mut Space, max: i64) -> QueueResult<WrittenOut> {
    let bundles: Vec<(Bundle, usize)> = conn
        .prepare_cached(
            "SELECT seq, pending, length(body) FROM jobs WHERE pending IS NOT NULL ORDER BY seq LIMIT ?1",
        )
        .and_then(|mut s| {
            s.query_map([max], |r| {
                Ok((Bundle::parse(r.get(0)?, &r.get::<_, String>(1)?), r.get(2)?))
            })?
            .collect::<Result<_, _>>()
        })
        .map_err(sql_err)?;
    // As many as one transaction's WAL may hold without growing past what
    // the writer restarts it at (at least one): on a small disk the WAL's
    // copy of the rows comes from the base reserve.
    let budget = space.wal_restart_bytes / 2;
    let mut promised = 0;
    let mut take = 0;
    for (b, len) in &bundles {
        let p = promise(b.live().count(), *len);
        if take > 0 && promised + p > budget {
            break;
        }
        promised += p;
        take += 1;
    }
    let more = take < bundles.len() || bundles.len() as i64 == max;
    let bundles = &bundles[..take];
    // The room they were promised goes back to the file system first.
    space.release(promised);
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO jobs (seq, event_key, event_id, bot_id, event_type, kind, body, state, due_at_ms,
                               created_at_ms, destination)
             SELECT ?1, event_key, event_id, bot_id, event_type, kind, body, 'waiting', created_at_ms,
                    created_at_ms, ?2
             FROM jobs WHERE seq = ?3",
        )
        .map_err(sql_err)?;
    let mut clear = conn
        .prepare_cached("UPDATE jobs SET pending = NULL WHERE seq = ?1")
        .map_err(sql_err)?;
    for (b, _) in bundles {
        for (id, destination) in b.live() {
            insert
                .execute(params![id, destination, b.seq])
                .map_err(|e| {
                    space.promised_stale = true;
                    sql_err(e)
                })?;
        }
        clear.execute([b.seq]).map_err(sql_err)?;
    }
    Ok(WrittenOut { more })
}

/// What [`write_out`] did: whether some bundles are left.
pub(super) struct WrittenOut {
    pub(super) more: bool,
}

/// The bundle holding job `id` as one of its slots, if one does (its carrier
/// is the first bundle after `id`).
pub(super) fn holding(conn: &Connection, id: i64) -> QueueResult<Option<Bundle>> {
    let found: Option<(i64, String)> = conn
        .prepare_cached(
            "SELECT seq, pending FROM jobs WHERE pending IS NOT NULL AND seq > ?1 ORDER BY seq LIMIT 1",
        )
        .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(sql_err)?;
    Ok(found
        .map(|(seq, pending)| Bundle::parse(seq, &pending))
        .filter(|b| b.slot_of(id).is_some()))
}

/// Removes a slot's job (an operator's removal): its slot is cleared, in
/// place; the room it was promised is given back.
pub(super) fn remove_slot(
    conn: &Connection,
    space: &mut Space,
    mut bundle: Bundle,
    id: i64,
) -> QueueResult<()> {
    let Some(k) = bundle.slot_of(id) else {
        return Ok(());
    };
    bundle.slots[k] = REMOVED.to_string();
    let body_len: usize = conn
        .prepare_cached("SELECT length(body) FROM jobs WHERE seq = ?1")
        .and_then(|mut s| s.query_row([bundle.seq], |r| r.get(0)))
        .map_err(sql_err)?;
    conn.prepare_cached("UPDATE jobs SET pending = ?1 WHERE seq = ?2")
        .and_then(|mut s| s.execute(params![bundle.text(), bundle.seq]))
        .map_err(sql_err)?;
    space.release(promise(1, body_len));
    Ok(())
}

/// Removes a carrier's own job (an operator's removal) while its bundle
/// holds others: the row becomes the last live slot's job, in place (its
/// id, destination and the slots before it), so no other job moves and no
/// room is needed.
pub(super) fn hand_over(conn: &Connection, space: &mut Space, bundle: Bundle) -> QueueResult<()> {
    let Some((id, destination)) = bundle.live().next_back() else {
        return Ok(());
    };
    let k = bundle.slot_of(id).unwrap_or(0);
    let rest = Bundle {
        seq: id,
        slots: bundle.slots[..k].to_vec(),
    };
    let body_len: usize = conn
        .prepare_cached(
            "UPDATE jobs SET seq = ?1, destination = ?2, pending = ?3 WHERE seq = ?4 RETURNING length(body)",
        )
        .and_then(|mut s| {
            s.query_row(
                params![id, destination, rest.text(), bundle.seq],
                |r| r.get(0),
            )
        })
        .map_err(sql_err)?;
    space.release(promise(1, body_len));
    Ok(())
}

/// The view of slot `id`'s job, from its carrier's view: the same event,
/// waiting since it came, never attempted.
pub(super) fn virtual_view(carrier: &JobView, id: i64, destination: &str) -> JobView {
    JobView {
        id: id.to_string(),
        state: JobState::Waiting,
        destination: crate::queue::DestinationName::known(destination),
        attempts_made: 0,
        due_at_ms: Some(carrier.created_at_ms),
        finished_at_ms: None,
        failed_reason: None,
        attempts: Vec::new(),
        ..carrier.clone()
    }
}
