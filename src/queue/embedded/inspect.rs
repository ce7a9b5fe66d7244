//! Reading jobs back: the rows as job views (the operators' side of the
//! contract, in `contract.rs`, shows them).

use super::{
    bundle, sql_err, Bundle, Connection, EmbeddedQueue, JobState, JobView, OptionalExtension, Page,
    QueueError, QueueResult,
};
use crate::queue::StoredJob;

pub(super) const VIEW_COLUMNS: &str =
    "seq, state, event_key, event_id, bot_id, event_type, kind, attempts_made,
    created_at_ms, due_at_ms, finished_at_ms, failed_reason, attempts_log, destination";

/// A job's state as the operators see it at `now`: a delayed job whose time
/// has come waits, as the counts say (and as on Redis, whose claims move
/// it), though its row still says delayed until a claim takes it.
fn shown_state(state: &str, due_at_ms: Option<i64>, now: i64) -> JobState {
    match JobState::parse(state).unwrap_or(JobState::Failed) {
        JobState::Delayed if due_at_ms.is_some_and(|d| d <= now) => JobState::Waiting,
        other => other,
    }
}

pub(super) fn row_to_view(
    r: &rusqlite::Row<'_>,
    with_payload: bool,
    now: i64,
) -> rusqlite::Result<JobView> {
    let state: String = r.get(1)?;
    let state = shown_state(&state, r.get(9)?, now);
    let log: String = r.get(12)?;
    let body = if with_payload {
        String::from_utf8(r.get::<_, Vec<u8>>(14)?).ok()
    } else {
        None
    };
    let stored = StoredJob {
        id: r.get::<_, i64>(0)?.to_string(),
        destination: r.get(13)?,
        event_key: r.get(2)?,
        event_id: r.get(3)?,
        bot_id: r.get(4)?,
        event_type: r.get(5)?,
        kind: r.get(6)?,
        attempts_made: r.get(7)?,
        created_at_ms: r.get(8)?,
        // A parked job (`keys.rs`) is due when its key's first is done.
        due_at_ms: r
            .get::<_, Option<i64>>(9)?
            .filter(|&d| d != super::keys::PARKED),
        finished_at_ms: r.get(10)?,
        failed_reason: r.get(11)?,
        attempts: serde_json::from_str(&log).unwrap_or_default(),
        body,
    };
    Ok(stored.into_view(state, with_payload))
}

/// Job `seq`'s row as a view, if there is one.
pub(super) fn view_of(
    conn: &Connection,
    seq: i64,
    with_payload: bool,
    now: i64,
) -> QueueResult<Option<JobView>> {
    let sql = format!("SELECT {VIEW_COLUMNS}, body FROM jobs WHERE seq=?1");
    conn.prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_row([seq], |r| row_to_view(r, with_payload, now))
                .optional()
        })
        .map_err(sql_err)
}

/// A listing of waiting jobs, or of every state, newest first:
/// the rows and the jobs bundles name, where they are (an operator's look
/// writes nothing), each in its state at `now` ([`shown_state`], as the
/// counts). One pass over the ids that match (a count needs it anyway),
/// then the views of the page's.
pub(super) fn list_with_bundles(
    conn: &Connection,
    state: Option<JobState>,
    destination: Option<&str>,
    (offset, limit): (u64, u64),
    now: i64,
) -> QueueResult<Page> {
    enum Entry {
        Row(i64),
        Slot {
            id: i64,
            carrier: i64,
            destination: String,
        },
    }
    let sql = if state.is_some() {
        "SELECT seq, state, destination, pending, due_at_ms FROM jobs
         WHERE (state IN ('waiting','delayed') AND (?1 IS NULL OR destination = ?1))
            OR pending IS NOT NULL
         ORDER BY seq DESC"
    } else {
        "SELECT seq, state, destination, pending, due_at_ms FROM jobs
         WHERE ?1 IS NULL OR destination = ?1 OR pending IS NOT NULL
         ORDER BY seq DESC"
    };
    // A bundle's jobs wait (they are due since their event came).
    let slots_wanted = state.is_none_or(|s| s == JobState::Waiting);
    let wanted = |d: &str| destination.is_none_or(|w| w == d);
    let mut total = 0u64;
    let mut page = Vec::new();
    let mut take = |entry: Entry| {
        if total >= offset && total < offset.saturating_add(limit) {
            page.push(entry);
        }
        total += 1;
    };
    let mut stmt = conn.prepare_cached(sql).map_err(sql_err)?;
    let mut rows = stmt.query([destination]).map_err(sql_err)?;
    while let Some(r) = rows.next().map_err(sql_err)? {
        let seq: i64 = r.get(0).map_err(sql_err)?;
        let row_state: String = r.get(1).map_err(sql_err)?;
        let row_destination: String = r.get(2).map_err(sql_err)?;
        let pending: Option<String> = r.get(3).map_err(sql_err)?;
        let shown = shown_state(&row_state, r.get(4).map_err(sql_err)?, now);
        if wanted(&row_destination) && state.is_none_or(|s| s == shown) {
            take(Entry::Row(seq));
        }
        if let Some(p) = pending.filter(|_| slots_wanted) {
            let b = Bundle::parse(seq, &p);
            for (id, d) in b.live().rev().filter(|(_, d)| wanted(d)) {
                take(Entry::Slot {
                    id,
                    carrier: seq,
                    destination: d.to_string(),
                });
            }
        }
    }
    let mut items = Vec::with_capacity(page.len());
    for entry in page {
        let view = match entry {
            Entry::Row(seq) => view_of(conn, seq, false, now)?,
            Entry::Slot {
                id,
                carrier,
                destination,
            } => view_of(conn, carrier, false, now)?
                .map(|c| bundle::virtual_view(&c, id, &destination)),
        };
        items.extend(view);
    }
    Ok(Page { items, total })
}

pub(super) fn state_of(conn: &Connection, seq: i64, id: &str) -> QueueResult<JobState> {
    let state: Option<String> = conn
        .prepare_cached("SELECT state FROM jobs WHERE seq=?1")
        .and_then(|mut s| s.query_row([seq], |r| r.get(0)).optional())
        .map_err(sql_err)?;
    state
        .and_then(|s| JobState::parse(&s))
        .ok_or_else(|| QueueError::NotFound(id.to_string()))
}

impl EmbeddedQueue {
    /// One write of a pause or a resume.
    pub(super) async fn set_paused_once(&self, destination: &str, paused: bool) -> QueueResult<()> {
        let destination = destination.to_string();
        self.call(move |conn, w| {
            let sql = if paused {
                "INSERT OR IGNORE INTO paused (destination) VALUES (?1)"
            } else {
                "DELETE FROM paused WHERE destination = ?1"
            };
            conn.prepare_cached(sql)
                .and_then(|mut s| s.execute([&destination]))
                .map_err(sql_err)?;
            // Read again at the next look (this process's change at once).
            w.paused_read_at = None;
            Ok(())
        })
        .await
    }
}
