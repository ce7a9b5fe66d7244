//! The queue contract ([`Queue`]) on the embedded store: each operation one
//! closure on the writer thread (`writer.rs`), or, for operators' reads, on
//! the reader thread.

use std::time::Duration;

use rusqlite::{params, OptionalExtension};

use super::bundle::{self, Bundle};
use super::inspect::{list_with_bundles, row_to_view, state_of, view_of, VIEW_COLUMNS};
use super::keys::{self, parked};
use super::writer::{exec_cached, insert_event, Held};
use super::{claim_due, claim_trials, parse_id, put_back_stalled, sql_err, EmbeddedQueue, Fsync};
use crate::event::Event;
use crate::queue::{
    Attempt, ClaimOrder, Claimed, Counts, DeliveryJob, DestinationName, Disposition, HeldKey,
    JobState, JobView, LeaseRef, Leased, Page, Queue, QueueError, QueueResult, Recipient, Routed,
};

/// A delivery's outcome on its job (`finish`). Failed letting its key go
/// on, a job leaves its key for good: a retry delivers it on its own
/// (`keys.rs`). The attempt is appended to the log's text (`[..}]`, as
/// written here): json_insert parsed and wrote the whole log, 9,000
/// instructions a finish.
pub(super) const FINISH: &str =
    "UPDATE jobs SET state=?1, due_at_ms=?2, finished_at_ms=?3, failed_reason=?4,
        attempts_made=attempts_made+1, lease_token=NULL, lease_until_ms=NULL,
        attempts_log = CASE attempts_log WHEN '[]' THEN '[' || ?5 || ']'
                       ELSE rtrim(attempts_log, ']') || ',' || ?5 || ']' END,
        order_key = CASE WHEN ?1 = 'failed' AND order_hold = 0 THEN NULL ELSE order_key END
     WHERE seq=?6 AND lease_token=?7 AND state='active'";

impl Queue for EmbeddedQueue {
    async fn store(
        &self,
        event: Event,
        routes: Vec<Recipient>,
        lease: Option<Duration>,
    ) -> QueueResult<(Routed, Vec<Leased>)> {
        let token = lease.map(|_| format!("{:016x}", fastrand::u64(..)));
        let lease_token = token.clone();
        // Shared with the writer's closure, which may run twice; taken back
        // once it is answered (the closure is dropped first).
        let event = std::sync::Arc::new(event);
        let stored = event.clone();
        let (routed, leased, now) = self
            .call(move |conn, w| {
                let until = lease.map(|l| {
                    w.now_ms
                        .saturating_add(i64::try_from(l.as_millis()).unwrap_or(i64::MAX))
                });
                let lease = lease_token.as_deref().zip(until);
                let (routed, leased) = insert_event(conn, w, &stored, &routes, lease)?;
                Ok((routed, leased, w.now_ms))
            })
            .await?;
        let Some(token) = token else {
            return Ok((routed, Vec::new()));
        };
        let mut event = Some(std::sync::Arc::try_unwrap(event).unwrap_or_else(|e| (*e).clone()));
        // The last job takes the event (its body); the others a copy.
        let last = leased.len();
        let leased = leased
            .into_iter()
            .enumerate()
            .filter_map(|(k, i)| {
                let j = &routed.jobs[i];
                let event = if k + 1 == last {
                    event.take()
                } else {
                    event.clone()
                }?;
                let mut job = DeliveryJob::new(j.id.clone(), event);
                job.created_at_ms = Some(now);
                Some(Leased {
                    lease: LeaseRef {
                        job_id: j.id.clone(),
                        token: token.clone(),
                        destination: j.destination.clone(),
                    },
                    job,
                })
            })
            .collect();
        Ok((routed, leased))
    }

    async fn claim_for(
        &self,
        destination: &DestinationName,
        max: usize,
        lease: Duration,
        order: ClaimOrder,
    ) -> QueueResult<Claimed> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let destination = destination.clone();
        self.call(move |conn, w| {
            let now = w.now_ms;
            // The table itself, not the set the ingest reads: a pause made
            // by another process (the command line) holds from its commit.
            w.read_paused(conn)?;
            if w.paused.contains(destination.as_str()) {
                return Ok(Claimed {
                    paused: true,
                    ..Claimed::default()
                });
            }
            // Bundles first: their jobs are claimable like any other. A
            // write-out that fails (no room) undoes itself, and the claim
            // takes what is due all the same.
            exec_cached(conn, "SAVEPOINT write_out").map_err(sql_err)?;
            let more_bundles =
                match bundle::write_out(conn, &mut w.space, bundle::WRITE_OUT_PER_CLAIM) {
                    Ok(w) => {
                        exec_cached(conn, "RELEASE write_out").map_err(sql_err)?;
                        w.more
                    }
                    Err(e) => {
                        conn.execute_batch("ROLLBACK TO write_out; RELEASE write_out")
                            .map_err(sql_err)?;
                        w.space.promised_stale = true;
                        tracing::debug!(error = %e, "bundles not written out this time");
                        false
                    }
                };
            put_back_stalled(conn, now)?;
            let token = format!("{:016x}", fastrand::u64(..));
            let until = now.saturating_add(lease_ms);
            let rows = match order {
                ClaimOrder::Due => claim_due(conn, &token, until, now, max, &destination)?,
                ClaimOrder::Trials => {
                    claim_trials(conn, &token, until, now, max, &destination)?
                }
            };
            let mut jobs: Vec<Leased> = rows
                .into_iter()
                .map(|job| Leased {
                    lease: LeaseRef {
                        job_id: job.id.clone(),
                        token: token.clone(),
                        destination: destination.clone(),
                    },
                    job,
                })
                .collect();
            jobs.sort_by_key(|l| l.job.id.parse::<i64>().unwrap_or(0));
            let next_due_ms = if more_bundles {
                Some(now)
            } else if jobs.is_empty() {
                // A parked job is not due: its key's first is (or is active,
                // and its finish wakes the pool).
                conn.prepare_cached(concat!(
                    "SELECT min(t) FROM (
                        SELECT min(due_at_ms) AS t FROM jobs WHERE destination=?1 AND state IN ('waiting','delayed')
                        AND due_at_ms < ",
                    parked!(),
                    " UNION ALL SELECT min(lease_until_ms) FROM jobs WHERE state='active')"
                ))
                .and_then(|mut s| s.query_row([&destination], |r| r.get(0)))
                .map_err(sql_err)?
            } else {
                None
            };
            Ok(Claimed {
                jobs,
                next_due_ms,
                paused: false,
                circuit_open_for_ms: None,
            })
        })
        .await
    }

    async fn renew(&self, leases: Vec<LeaseRef>, lease: Duration) -> QueueResult<()> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        self.call(move |conn, w| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE jobs SET lease_until_ms=?1 WHERE seq=?2 AND lease_token=?3 AND state='active'",
                )
                .map_err(sql_err)?;
            for l in &leases {
                let seq = parse_id(&l.job_id)?;
                stmt.execute(params![w.now_ms.saturating_add(lease_ms), seq, l.token]).map_err(sql_err)?;
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
            let state = disposition.state();
            let (due, finished) = match &disposition {
                // Never as late as a parked job's due time (`keys.rs`).
                Disposition::RetryAt { due_at_ms, .. } => {
                    ((*due_at_ms).min(keys::PARKED - 1), None)
                }
                Disposition::Completed | Disposition::Failed { .. } => (now, Some(now)),
            };
            let changed = conn
                .with(Held::Finish, |s| {
                    s.execute(params![
                        state.as_str(),
                        due,
                        finished,
                        disposition.reason(),
                        log,
                        seq,
                        job.lease.token
                    ])
                })
                .map_err(sql_err)?;
            // Delivered, or failed letting its key go on: the key's next job
            // goes. (A key's open job is in the relay's map; `RETURNING`
            // the key from the update cost a temporary table, 18,000
            // instructions, at every finish.)
            if let Some((h, hold)) = w.keys.open_job(seq).filter(|_| changed == 1) {
                let leaves = match state {
                    JobState::Completed => true,
                    JobState::Failed => !hold,
                    _ => false,
                };
                if leaves {
                    w.keys.leave(conn, h, seq)?;
                }
            }
            if changed == 1 && state == JobState::Completed {
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

    fn store_bytes(&self) -> Option<(u64, u64)> {
        Some((
            self.size.0.load(std::sync::atomic::Ordering::Relaxed),
            self.size.1,
        ))
    }

    fn durability_risks(&self) -> Vec<(&'static str, bool)> {
        // COGRELAY_FSYNC=off: an acknowledged event survives a crash of the
        // relay, not a power loss.
        vec![("embedded_no_fsync", self.fsync == Fsync::Off)]
    }

    async fn is_paused(&self, destination: &DestinationName) -> QueueResult<bool> {
        let destination = destination.to_string();
        self.read(move |conn, _| {
            conn.prepare_cached("SELECT 1 FROM paused WHERE destination = ?1")
                .and_then(|mut s| s.exists([&destination]))
                .map_err(sql_err)
        })
        .await
    }

    async fn set_circuit(&self, _: &DestinationName, _: Option<Duration>) -> QueueResult<()> {
        // The one relay keeps its circuit itself (`delivery/circuit.rs`).
        Ok(())
    }

    fn shared_by_relays(&self) -> bool {
        false
    }

    async fn ping(&self) -> QueueResult<()> {
        self.call(|conn, _| {
            conn.prepare_cached("SELECT 1")
                .and_then(|mut s| s.query_row([], |_| Ok(())))
                .map_err(sql_err)
        })
        .await
    }

    /// Stops the writer, and returns once its threads and connections are
    /// gone: nothing touches the files after this.
    async fn close(&self) -> QueueResult<()> {
        let stopped = self
            .call(|_, w| {
                w.stop = true;
                Ok(())
            })
            .await;
        let gone = self.gone.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(gone) = gone {
            let _ = tokio::time::timeout(Duration::from_secs(5), gone).await;
        }
        stopped
    }

    // The operators' side.

    async fn set_rate_limit(&self, _: &DestinationName, _: u32) -> QueueResult<()> {
        // The one relay limits itself (`delivery/machine.rs`).
        Ok(())
    }

    async fn counts_for(&self, destination: Option<&DestinationName>) -> QueueResult<Counts> {
        let destination = destination.map(|d| d.to_string());
        self.read(move |conn, now| {
            let mut c = Counts::default();
            // A delayed job whose time has come waits (SPEC §7: also one an
            // open circuit holds back), as on Redis, whose claims move it.
            let mut stmt = conn
                .prepare_cached(
                    "SELECT CASE WHEN state = 'delayed' AND due_at_ms <= ?2 THEN 'waiting' ELSE state END AS s,
                            count(*) FROM jobs WHERE ?1 IS NULL OR destination = ?1 GROUP BY s",
                )
                .map_err(sql_err)?;
            let rows = stmt
                .query_map(params![destination, now], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?))
                })
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
            // A parked job has waited since it was stored.
            let oldest: Option<i64> = conn
                .prepare_cached(concat!(
                    "SELECT min(CASE WHEN due_at_ms = ",
                    parked!(),
                    " THEN created_at_ms ELSE due_at_ms END) FROM jobs
                     WHERE state IN ('waiting','delayed') AND (due_at_ms <= ?1 OR due_at_ms = ",
                    parked!(),
                    ") AND (?2 IS NULL OR destination = ?2)"
                ))
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
        destination: Option<&DestinationName>,
        offset: u64,
        limit: u64,
    ) -> QueueResult<Page> {
        let destination = destination.map(|d| d.to_string());
        self.read(move |conn, now| {
            if matches!(state, None | Some(JobState::Waiting)) {
                return list_with_bundles(
                    conn,
                    state,
                    destination.as_deref(),
                    (offset, limit),
                    now,
                );
            }
            // The state is a literal (from the enum), so the planner can use the
            // partial indexes of failed and completed jobs.
            let mut filter = state
                .map(|st| format!("WHERE state = '{}'", st.as_str()))
                .unwrap_or_else(|| "WHERE 1".into());
            // A delayed job fallen due is listed as waiting (`shown_state`).
            filter.push_str(
                " AND (?3 IS NULL OR destination = ?3)
                  AND (state <> 'delayed' OR due_at_ms IS NULL OR due_at_ms > ?4)",
            );
            let total: u64 = conn
                // ?1 and ?2 (limit, offset) go unused here: SQLite numbers
                // the parameters up to ?4 all the same.
                .prepare_cached(&format!("SELECT count(*) FROM jobs {filter}"))
                .and_then(|mut s| {
                    s.query_row(
                        params![limit as i64, offset as i64, destination, now],
                        |r| r.get(0),
                    )
                })
                .map_err(sql_err)?;
            let sql = format!(
                "SELECT {VIEW_COLUMNS} FROM jobs {filter} ORDER BY seq DESC LIMIT ?1 OFFSET ?2"
            );
            let items = conn
                .prepare_cached(&sql)
                .and_then(|mut s| {
                    s.query_map(
                        params![limit as i64, offset as i64, destination, now],
                        |r| row_to_view(r, false, now),
                    )?
                    .collect::<Result<Vec<_>, _>>()
                })
                .map_err(sql_err)?;
            Ok(Page { items, total })
        })
        .await
    }

    async fn get(&self, id: &str) -> QueueResult<JobView> {
        let id = id.to_string();
        self.read(move |conn, now| {
            let seq = parse_id(&id)?;
            if let Some(view) = view_of(conn, seq, true, now)? {
                return Ok(view);
            }
            // One of a bundle's jobs: shown from its carrier, nothing written.
            let Some(b) = bundle::holding(conn, seq)? else {
                return Err(QueueError::NotFound(id.clone()));
            };
            let carrier =
                view_of(conn, b.seq, true, now)?.ok_or(QueueError::NotFound(id.clone()))?;
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
            Err(QueueError::NotFound(id.clone()))
        })
        .await
    }

    async fn retry_all_failed_for(
        &self,
        destination: Option<&DestinationName>,
    ) -> QueueResult<u64> {
        let destination = destination.map(|d| d.to_string());
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
            // state, pending, destination, order_key, due_at_ms
            type Row = (String, Option<String>, String, Option<String>, i64);
            let row: Option<Row> = conn
                .prepare_cached(
                    "SELECT state, pending, destination, order_key, due_at_ms FROM jobs WHERE seq=?1",
                )
                .and_then(|mut s| {
                    s.query_row([seq], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .optional()
                })
                .map_err(sql_err)?;
            match row {
                Some((state, pending, destination, key, due)) => {
                    JobState::parse(&state)
                        .unwrap_or(JobState::Failed)
                        .check_remove(&id)?;
                    match pending {
                        // A carrier: its row goes to the bundle's last job.
                        Some(p) => bundle::hand_over(conn, &mut w.space, Bundle::parse(seq, &p)),
                        None => {
                            conn.prepare_cached("DELETE FROM jobs WHERE seq=?1")
                                .and_then(|mut s| s.execute([seq]))
                                .map_err(sql_err)?;
                            // An ordered job: its key's next may go. The
                            // relay's map says which; a tool's removal
                            // makes the relay read its map again.
                            match key {
                                Some(key) if w.maintains => {
                                    let h = w.keys.hash(&destination, &key);
                                    w.keys.leave(conn, h, seq)
                                }
                                // (A parked one's removal changes no
                                // key's first: the relay skips it.)
                                Some(_)
                                    if state != JobState::Completed.as_str()
                                        && due != keys::PARKED =>
                                {
                                    keys::count_removed_by_tool(conn)
                                }
                                Some(_) => Ok(()),
                                None => Ok(()),
                            }
                        }
                    }
                }
                None => match bundle::holding(conn, seq)? {
                    Some(b) => bundle::remove_slot(conn, &mut w.space, b, seq),
                    None => Err(QueueError::NotFound(id.clone())),
                },
            }
        })
        .await
    }

    async fn set_paused(&self, destination: &DestinationName, paused: bool) -> QueueResult<()> {
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

    async fn held_keys(
        &self,
        destination: &DestinationName,
        limit: u64,
    ) -> QueueResult<Vec<HeldKey>> {
        let destination = destination.clone();
        self.read(move |conn, _| {
            // A failed job holding its key: its key's first, which parks
            // the later ones (`keys.rs`), and the job an operator has to act
            // on.
            conn.prepare_cached(
                "SELECT order_key, seq, coalesce(finished_at_ms, created_at_ms) FROM jobs INDEXED BY jobs_failed
                 WHERE destination = ?1 AND state = 'failed' AND order_hold = 1 AND order_key IS NOT NULL
                 ORDER BY 3, seq LIMIT ?2",
            )
            .and_then(|mut s| {
                s.query_map(params![destination, limit as i64], |r| {
                    Ok(HeldKey {
                        key: r.get(0)?,
                        job_id: r.get::<_, i64>(1)?.to_string(),
                        since_ms: r.get(2)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(sql_err)
        })
        .await
    }

    async fn destination_names(&self) -> QueueResult<Vec<DestinationName>> {
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
            let names: std::collections::BTreeSet<DestinationName> = names
                .iter()
                .flat_map(|n| n.split(','))
                .filter(|n| *n != bundle::REMOVED)
                .map(DestinationName::known)
                .collect();
            Ok(names.into_iter().collect())
        })
        .await
    }
}

impl EmbeddedQueue {
    /// Puts back the jobs whose lease expired, now (a claim does it too).
    pub(crate) async fn check_stalled(&self) -> QueueResult<u64> {
        self.call(|conn, w| put_back_stalled(conn, w.now_ms)).await
    }
}
