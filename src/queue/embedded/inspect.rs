//! Reading jobs back: the rows as job views, and the operators' side of the
//! contract ([`Operate`]).

use super::{
    bundle, params, parse_id, sql_err, Bundle, Connection, Counts, EmbeddedQueue, JobState,
    JobView, Operate, OptionalExtension, Page, QueueError, QueueResult,
};
use crate::queue::StoredJob;

pub(super) const VIEW_COLUMNS: &str =
    "seq, state, event_key, event_id, bot_id, event_type, kind, attempts_made,
    created_at_ms, due_at_ms, finished_at_ms, failed_reason, attempts_log, destination";

pub(super) fn row_to_view(r: &rusqlite::Row<'_>, with_payload: bool) -> rusqlite::Result<JobView> {
    let state: String = r.get(1)?;
    let state = JobState::parse(&state).unwrap_or(JobState::Failed);
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
        due_at_ms: r.get(9)?,
        finished_at_ms: r.get(10)?,
        failed_reason: r.get(11)?,
        attempts: serde_json::from_str(&log).unwrap_or_default(),
        body,
    };
    Ok(stored.into_view(state, with_payload))
}

/// Job `seq`'s row as a view, if there is one.
fn view_of(conn: &Connection, seq: i64, with_payload: bool) -> QueueResult<Option<JobView>> {
    let sql = format!("SELECT {VIEW_COLUMNS}, body FROM jobs WHERE seq=?1");
    conn.prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_row([seq], |r| row_to_view(r, with_payload))
                .optional()
        })
        .map_err(sql_err)
}

/// A listing of waiting jobs, or of every state, newest first: the rows and
/// the jobs bundles name, where they are (an operator's look writes nothing).
/// One pass over the ids that match (a count needs it anyway), then the
/// views of the page's.
fn list_with_bundles(
    conn: &Connection,
    state: Option<JobState>,
    destination: Option<&str>,
    offset: u64,
    limit: u64,
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
        "SELECT seq, state, destination, pending FROM jobs
         WHERE (state = 'waiting' AND (?1 IS NULL OR destination = ?1)) OR pending IS NOT NULL
         ORDER BY seq DESC"
    } else {
        "SELECT seq, state, destination, pending FROM jobs
         WHERE ?1 IS NULL OR destination = ?1 OR pending IS NOT NULL
         ORDER BY seq DESC"
    };
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
        if wanted(&row_destination) && state.is_none_or(|s| s.as_str() == row_state) {
            take(Entry::Row(seq));
        }
        if let Some(p) = pending {
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
            Entry::Row(seq) => view_of(conn, seq, false)?,
            Entry::Slot {
                id,
                carrier,
                destination,
            } => view_of(conn, carrier, false)?.map(|c| bundle::virtual_view(&c, id, &destination)),
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

impl Operate for EmbeddedQueue {
    async fn counts_for(&self, destination: Option<&str>) -> QueueResult<Counts> {
        let destination = destination.map(str::to_string);
        self.read(move |conn, now| {
            let mut c = Counts::default();
            let mut stmt = conn
                .prepare_cached(
                    "SELECT state, count(*) FROM jobs WHERE ?1 IS NULL OR destination = ?1 GROUP BY state",
                )
                .map_err(sql_err)?;
            let rows = stmt
                .query_map([&destination], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))
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
            let oldest: Option<i64> = conn
                .prepare_cached(
                    "SELECT min(due_at_ms) FROM jobs WHERE state IN ('waiting','delayed') AND due_at_ms <= ?1
                     AND (?2 IS NULL OR destination = ?2)",
                )
                .and_then(|mut s| s.query_row(params![now, destination], |r| r.get(0)))
                .map_err(sql_err)?;
            // The jobs bundles name (waiting, due since their event came),
            // counted where they are rather than written out for a look.
            let (bundled, oldest_bundled): (u64, Option<i64>) = conn
                .prepare_cached(
                    "SELECT coalesce(sum(CASE WHEN ?1 IS NULL
                                              THEN length(pending) - length(replace(pending, ',', '')) + 1
                                                   - (length(pending) - length(replace(pending, '~', '')))
                                              ELSE instr(',' || pending || ',', ',' || ?1 || ',') > 0 END), 0),
                            min(CASE WHEN ?1 IS NULL OR instr(',' || pending || ',', ',' || ?1 || ',') > 0
                                     THEN due_at_ms END)
                     FROM jobs WHERE pending IS NOT NULL",
                )
                .and_then(|mut s| s.query_row([&destination], |r| Ok((r.get(0)?, r.get(1)?))))
                .map_err(sql_err)?;
            c.waiting += bundled;
            c.oldest_waiting_ms = match (oldest, oldest_bundled) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            Ok(c)
        })
        .await
    }

    async fn list_for(
        &self,
        state: Option<JobState>,
        destination: Option<&str>,
        offset: u64,
        limit: u64,
    ) -> QueueResult<Page> {
        let destination = destination.map(str::to_string);
        self.read(move |conn, _| {
            if matches!(state, None | Some(JobState::Waiting)) {
                return list_with_bundles(conn, state, destination.as_deref(), offset, limit);
            }
            // The state is a literal (from the enum), so the planner can use the
            // partial indexes of failed and completed jobs.
            let mut filter = state
                .map(|st| format!("WHERE state = '{}'", st.as_str()))
                .unwrap_or_else(|| "WHERE 1".into());
            filter.push_str(" AND (?3 IS NULL OR destination = ?3)");
            let total: u64 = conn
                // ?1 and ?2 (limit, offset) go unused here: SQLite numbers
                // the parameters up to ?3 all the same.
                .prepare_cached(&format!("SELECT count(*) FROM jobs {filter}"))
                .and_then(|mut s| {
                    s.query_row(params![limit as i64, offset as i64, destination], |r| {
                        r.get(0)
                    })
                })
                .map_err(sql_err)?;
            let sql = format!(
                "SELECT {VIEW_COLUMNS} FROM jobs {filter} ORDER BY seq DESC LIMIT ?1 OFFSET ?2"
            );
            let items = conn
                .prepare_cached(&sql)
                .and_then(|mut s| {
                    s.query_map(params![limit as i64, offset as i64, destination], |r| {
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
        self.read(move |conn, _| {
            let seq = parse_id(&id)?;
            if let Some(view) = view_of(conn, seq, true)? {
                return Ok(view);
            }
            // One of a bundle's jobs: shown from its carrier, nothing written.
            let Some(b) = bundle::holding(conn, seq)? else {
                return Err(QueueError::NotFound(id));
            };
            let carrier = view_of(conn, b.seq, true)?.ok_or(QueueError::NotFound(id.clone()))?;
            let destination = b.slots[b.slot_of(seq).unwrap_or(0)].clone();
            Ok(bundle::virtual_view(&carrier, seq, &destination))
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
            if bundle::holding(conn, seq)?.is_some() {
                return JobState::Waiting.check_retry(&id);
            }
            state_of(conn, seq, &id)?.check_retry(&id)?;
            Err(QueueError::NotFound(id))
        })
        .await
    }

    async fn retry_all_failed_for(&self, destination: Option<&str>) -> QueueResult<u64> {
        let destination = destination.map(str::to_string);
        self.call(move |conn, w| {
            conn.prepare_cached(
                "UPDATE jobs SET state='waiting', attempts_made=0, due_at_ms=?1, finished_at_ms=NULL, failed_reason=NULL
                 WHERE state='failed' AND (?2 IS NULL OR destination = ?2)",
            )
            .and_then(|mut s| s.execute(params![w.now_ms, destination]))
            .map(|n| n as u64)
            .map_err(sql_err)
        })
        .await
    }

    async fn remove(&self, id: &str) -> QueueResult<()> {
        let id = id.to_string();
        self.call(move |conn, w| {
            let seq = parse_id(&id)?;
            let row: Option<(String, Option<String>)> = conn
                .prepare_cached("SELECT state, pending FROM jobs WHERE seq=?1")
                .and_then(|mut s| {
                    s.query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(sql_err)?;
            match row {
                Some((state, pending)) => {
                    JobState::parse(&state)
                        .unwrap_or(JobState::Failed)
                        .check_remove(&id)?;
                    match pending {
                        // A carrier: its row goes to the bundle's last job.
                        Some(p) => bundle::hand_over(conn, &mut w.space, Bundle::parse(seq, &p)),
                        None => conn
                            .prepare_cached("DELETE FROM jobs WHERE seq=?1")
                            .and_then(|mut s| s.execute([seq]))
                            .map(|_| ())
                            .map_err(sql_err),
                    }
                }
                None => match bundle::holding(conn, seq)? {
                    Some(b) => bundle::remove_slot(conn, &mut w.space, b, seq),
                    None => Err(QueueError::NotFound(id)),
                },
            }
        })
        .await
    }

    async fn set_paused(&self, destination: &str, paused: bool) -> QueueResult<()> {
        // A resume is what lets a full store drain: on a full disk its first
        // write may find no room, which gives the store's reserve to the
        // deliveries (writer.rs); the second finds room in it.
        match self.set_paused_once(destination, paused).await {
            Err(QueueError::Unavailable(why))
                if why.starts_with("the store is full")
                    || why.contains("rolled a transaction back") =>
            {
                self.set_paused_once(destination, paused).await
            }
            other => other,
        }
    }

    async fn destination_names(&self) -> QueueResult<Vec<String>> {
        self.read(|conn, _| {
            // A bundle's own destination is in the first column; the others,
            // comma-separated, in the second (few distinct lists).
            let names = conn
                .prepare_cached(
                    "SELECT destination FROM jobs GROUP BY destination
                     UNION SELECT destination FROM paused
                     UNION SELECT DISTINCT pending FROM jobs WHERE pending IS NOT NULL",
                )
                .and_then(|mut s| {
                    s.query_map([], |r| r.get::<_, String>(0))?
                        .collect::<Result<Vec<_>, _>>()
                })
                .map_err(sql_err)?;
            let names: std::collections::BTreeSet<String> = names
                .iter()
                .flat_map(|n| n.split(','))
                .filter(|n| *n != bundle::REMOVED)
                .map(str::to_string)
                .collect();
            Ok(names.into_iter().collect())
        })
        .await
    }
}

impl EmbeddedQueue {
    /// One write of a pause or a resume.
    async fn set_paused_once(&self, destination: &str, paused: bool) -> QueueResult<()> {
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
