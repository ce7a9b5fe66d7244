//! Reading jobs back (views, states, listings) and what operators do, on one
//! destination's queue (`routed.rs` routes the contract's calls to it).

use std::collections::HashMap;

use super::{
    bounded, Attempt, BullQueue, Counts, JobState, JobView, Page, QueueError, QueueResult, Value,
    RETRY_BATCH,
};
use crate::queue::StoredJob;

/// Where BullMQ keeps each state's jobs (a list, or a sorted set), and the
/// state it is here.
/// `waiting-children` holds the jobs of an ordered key behind its first
/// (`lua/order.lua`): waiting, here.
const TYPES: [(&str, bool, JobState); 8] = [
    ("wait", false, JobState::Waiting),
    ("paused", false, JobState::Waiting),
    ("prioritized", true, JobState::Waiting),
    ("waiting-children", true, JobState::Waiting),
    ("active", false, JobState::Active),
    ("delayed", true, JobState::Delayed),
    ("completed", true, JobState::Completed),
    ("failed", true, JobState::Failed),
];

/// Failed jobs read per page by a bulk retry (each page's read is bounded
/// on its own: one read of a million took longer than the bound).
const RETRY_PAGE: usize = 5000;

/// The structures that hold `state`'s jobs (every state's for `None`).
fn types_of(state: Option<JobState>) -> impl Iterator<Item = (&'static str, bool, JobState)> {
    TYPES
        .into_iter()
        .filter(move |(_, _, st)| state.is_none_or(|s| s == *st))
}

impl BullQueue {
    pub(super) async fn raw<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> QueueResult<T> {
        let mut conn = self.conn.connection();
        bounded(cmd.query_async::<T>(&mut conn)).await
    }

    pub(super) async fn pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> QueueResult<T> {
        let mut conn = self.conn.connection();
        bounded(pipe.query_async::<T>(&mut conn)).await
    }

    /// Jobs by state: plain reads of BullMQ's lists and sets, in one round
    /// trip (an operator's read runs no script and writes nothing).
    pub(super) async fn count_states(&self) -> QueueResult<Counts> {
        let mut pipe = redis::pipe();
        for (key, zset, _) in TYPES {
            pipe.cmd(if zset { "ZCARD" } else { "LLEN" })
                .arg(self.hot.key(key));
        }
        // Delayed jobs whose time has come wait (SPEC §7: also those an open
        // circuit holds back, which no claim moves meanwhile): scores below
        // the next millisecond's (see `due_of`).
        let due = (self.hot.clock.now_ms().max(0) as u64 + 1) << 12;
        pipe.cmd("ZCOUNT")
            .arg(self.hot.key("delayed"))
            .arg("-inf")
            .arg(format!("({due}"));
        let mut n: Vec<u64> = self.pipe(&pipe).await?;
        let due = n.pop().unwrap_or(0);
        let mut c = Counts::default();
        for ((_, _, state), n) in TYPES.iter().zip(n) {
            match state {
                JobState::Waiting => c.waiting += n,
                JobState::Active => c.active += n,
                JobState::Delayed => c.delayed += n,
                JobState::Completed => c.completed += n,
                JobState::Failed => c.failed += n,
            }
        }
        let due = due.min(c.delayed);
        c.delayed -= due;
        c.waiting += due;
        Ok(c)
    }

    /// A page of jobs. One structure holds them (the usual case: a state's
    /// list or set): its own order, newest first, the page read as a range.
    /// Several (every state, or waiting that is also prioritized): newest
    /// first by id (one counter gives them all), merged from each one's first
    /// `offset + limit`.
    pub(super) async fn list_page(
        &self,
        state: Option<JobState>,
        offset: u64,
        limit: u64,
    ) -> QueueResult<Page> {
        let types: Vec<_> = types_of(state).collect();
        let mut pipe = redis::pipe();
        for (key, zset, _) in &types {
            pipe.cmd(if *zset { "ZCARD" } else { "LLEN" })
                .arg(self.hot.key(key));
        }
        let sizes: Vec<u64> = self.pipe(&pipe).await?;
        let total = sizes.iter().sum();
        let holding: Vec<_> = types
            .iter()
            .zip(&sizes)
            .filter(|(_, n)| **n > 0)
            .map(|(t, _)| *t)
            .collect();
        let (start, end) = match holding.len() {
            1 => (offset as i64, (offset + limit) as i64 - 1),
            _ => (0, (offset + limit) as i64 - 1),
        };
        let mut pipe = redis::pipe();
        for (key, zset, _) in &holding {
            pipe.cmd(if *zset { "ZREVRANGE" } else { "LRANGE" })
                .arg(self.hot.key(key))
                .arg(start)
                .arg(end);
        }
        let replies: Vec<Vec<String>> = if holding.is_empty() {
            Vec::new()
        } else {
            self.pipe(&pipe).await?
        };
        let mut ids: Vec<(String, JobState)> = Vec::new();
        for ((_, _, st), found) in holding.iter().zip(replies) {
            ids.extend(found.into_iter().map(|id| (id, *st)));
        }
        if holding.len() > 1 {
            ids.sort_by_key(|(id, _)| std::cmp::Reverse(id.parse::<u64>().unwrap_or(0)));
            ids.dedup_by(|a, b| a.0 == b.0);
            ids = ids
                .into_iter()
                .skip(offset as usize)
                .take(limit as usize)
                .collect();
        }
        let items = self.views(&ids, false).await?;
        Ok(Page { items, total })
    }

    /// Views of jobs whose state is known: each hash, attempt log and
    /// delayed score, for the whole page in one round trip. A job removed
    /// meanwhile is left out.
    pub(super) async fn views(
        &self,
        jobs: &[(String, JobState)],
        with_payload: bool,
    ) -> QueueResult<Vec<JobView>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (id, _) in jobs {
            pipe.cmd("HGETALL").arg(self.hot.key(id));
            pipe.cmd("LRANGE")
                .arg(self.hot.key(&format!("{id}:logs")))
                .arg(0)
                .arg(-1);
            pipe.cmd("ZSCORE").arg(self.hot.key("delayed")).arg(id);
        }
        let replies: Vec<redis::Value> = self.pipe(&pipe).await?;
        let mut out = Vec::with_capacity(jobs.len());
        for ((id, st), r) in jobs.iter().zip(replies.chunks(3)) {
            let fields: HashMap<String, String> =
                redis::from_redis_value(r[0].clone()).unwrap_or_default();
            if fields.is_empty() {
                continue;
            }
            let logs: Vec<String> = redis::from_redis_value(r[1].clone()).unwrap_or_default();
            let delayed: Option<f64> = redis::from_redis_value(r[2].clone()).unwrap_or(None);
            out.push(view_of(id, &fields, *st, &logs, delayed, with_payload));
        }
        Ok(out)
    }

    /// Job `id`'s state, read where BullMQ keeps it.
    pub(super) async fn state_of(&self, id: &str) -> QueueResult<JobState> {
        names_a_job(id)?;
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(self.hot.key(id));
        for key in ["completed", "failed", "delayed"] {
            pipe.cmd("ZSCORE").arg(self.hot.key(key)).arg(id);
        }
        pipe.cmd("LPOS").arg(self.hot.key("active")).arg(id);
        let r: Vec<redis::Value> = self.pipe(&pipe).await?;
        let some = |v: &redis::Value| !matches!(v, redis::Value::Nil);
        if redis::from_redis_value::<i64>(r[0].clone()).unwrap_or(0) == 0 {
            return Err(QueueError::NotFound(id.to_string()));
        }
        Ok(if some(&r[1]) {
            JobState::Completed
        } else if some(&r[2]) {
            JobState::Failed
        } else if some(&r[3]) {
            JobState::Delayed
        } else if some(&r[4]) {
            JobState::Active
        } else {
            JobState::Waiting
        })
    }

    /// Since when the longest-waiting job waits: for the one in wait BullMQ
    /// takes next (the list's tail), its creation or, if later, when it came
    /// back to wait (`cg:due`: a retry fell due, a dead letter was
    /// retried), as the embedded store ages it; or the creation of one of an ordered
    /// key parked behind its key's first (`waiting-children`, scored by
    /// creation time); or the due time of a delayed job whose time has come
    /// (which an open circuit leaves there: counted as waiting, see
    /// `count_states`).
    pub(super) async fn oldest_waiting_ms(&self) -> QueueResult<Option<i64>> {
        let mut pipe = redis::pipe();
        pipe.cmd("LINDEX").arg(self.hot.key("wait")).arg(-1);
        pipe.cmd("ZRANGE")
            .arg(self.hot.key("waiting-children"))
            .arg(0)
            .arg(0)
            .arg("WITHSCORES");
        pipe.cmd("ZRANGE")
            .arg(self.hot.key("delayed"))
            .arg(0)
            .arg(0)
            .arg("WITHSCORES");
        // Each sorted set's first member, with its score.
        type First = Vec<(String, f64)>;
        let (id, parked, delayed): (Option<String>, First, First) = self.pipe(&pipe).await?;
        let now = self.hot.clock.now_ms();
        let due = delayed
            .first()
            .map(|(_, score)| due_of(*score))
            .filter(|&due| due <= now);
        let waiting = match id {
            Some(id) => {
                let (created, due): (Option<i64>, Option<i64>) = self
                    .raw(
                        redis::cmd("HMGET")
                            .arg(self.hot.key(&id))
                            .arg("timestamp")
                            .arg("cg:due"),
                    )
                    .await?;
                created.max(due)
            }
            None => None,
        };
        let parked = parked.first().map(|(_, ts)| *ts as i64);
        Ok(waiting.into_iter().chain(parked).chain(due).min())
    }
}

/// When a delayed job is due, from its score in BullMQ's delayed set (`due
/// << 12 | n`, n a counter below 4096).
fn due_of(score: f64) -> i64 {
    (score as i64) >> 12
}

/// A job as the admin API shows it, from its hash and what [`BullQueue::views`] read.
fn view_of(
    id: &str,
    fields: &HashMap<String, String>,
    state: JobState,
    logs: &[String],
    delayed_score: Option<f64>,
    with_payload: bool,
) -> JobView {
    let attempts: Vec<Attempt> = logs
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let data: Value = fields
        .get("data")
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or(Value::Null);
    let s = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_owned);
    let number = |k: &str| fields.get(k).and_then(|v| v.parse::<i64>().ok());
    let timestamp = number("timestamp").unwrap_or(0);
    // A delayed job is due at its score in the delayed set (`due << 12 | n`);
    // the hash's `timestamp + delay` is creation time plus the last delay.
    let due_at_ms = (state == JobState::Delayed)
        .then(|| delayed_score.map_or(timestamp + number("delay").unwrap_or(0), due_of));
    let stored = StoredJob {
        id: id.to_string(),
        destination: s("destination").unwrap_or_default(),
        event_key: s("eventKey").unwrap_or_default(),
        event_id: s("eventId").unwrap_or_default(),
        bot_id: s("botId"),
        event_type: s("type"),
        kind: s("kind").unwrap_or_default(),
        attempts_made: number("atm").unwrap_or(0).max(0) as u32,
        created_at_ms: timestamp,
        due_at_ms,
        finished_at_ms: number("finishedOn"),
        failed_reason: fields.get("failedReason").cloned(),
        attempts,
        body: if with_payload { s("body") } else { None },
    };
    stored.into_view(state, with_payload)
}

/// What operators read and do, on one destination's queue (`RedisQueues`
/// routes to it).
impl BullQueue {
    pub(super) async fn counts(&self) -> QueueResult<Counts> {
        Ok(Counts {
            oldest_waiting_ms: self.oldest_waiting_ms().await?,
            ..self.count_states().await?
        })
    }

    pub(super) async fn list(
        &self,
        state: Option<JobState>,
        offset: u64,
        limit: u64,
    ) -> QueueResult<Page> {
        self.list_page(state, offset, limit).await
    }

    pub(super) async fn get(&self, id: &str) -> QueueResult<JobView> {
        // State first, then the hash: the two reads are not atomic, and a job
        // seen as completed/failed (terminal) must not show the attempt count
        // of the attempt before. A hash newer than the state is harmless.
        let state = self.state_of(id).await?;
        self.views(&[(id.to_string(), state)], true)
            .await?
            .pop()
            .ok_or_else(|| QueueError::NotFound(id.to_string()))
    }

    /// What BullMQ's retry of a failed job does (reprocessJob, attempts
    /// reset), by `lua/retry_failed.lua`, which also keeps when the job went
    /// back to wait (its age there).
    pub(super) async fn retry(&self, id: &str) -> QueueResult<()> {
        names_a_job(id)?;
        let mut state = match self.state_of(id).await {
            Err(QueueError::NotFound(_)) => {
                // An id left in the failed set by a tool that deleted its
                // hash leaves the set (as retry-all drops it): still a 404,
                // unless the job is there after all, and moved.
                if self.move_failed(None, &[id]).await?.1 == 1 {
                    return Ok(());
                }
                return Err(QueueError::NotFound(id.to_string()));
            }
            state => state?,
        };
        // No longer failed since the state was read: why not, unless it
        // failed again since (another operator's retry, delivered and
        // failed in between): then it is moved now.
        for _ in 0..3 {
            state.check_retry(id)?;
            if self.move_failed(None, &[id]).await?.1 == 1 {
                return Ok(());
            }
            state = self.state_of(id).await?;
        }
        state.check_retry(id)?;
        Err(QueueError::WrongState {
            id: id.to_string(),
            state: state.as_str(),
            hint: "other retries moved it first, and it failed again each time; try again",
        })
    }

    pub(super) async fn retry_all_failed(&self) -> QueueResult<u64> {
        // The failed set's jobs when it begins, read in pages (each read
        // bounded on its own), then moved in batches of RETRY_BATCH (each
        // reset and moved in one script, so every job moved has its attempts
        // reset and the count is what moved), each only if no retry moved it
        // since this one began (on Redis's clock): a job moved meanwhile, by
        // this retry or another, that failed again (a target refusing it at
        // once) is not moved and sent a second time, whatever the relays'
        // clocks.
        let (secs, micros): (u64, u64) = self.raw(&redis::cmd("TIME")).await?;
        let began = secs * 1000 + micros / 1000;
        let mut ids: Vec<String> = Vec::new();
        loop {
            let from = ids.len();
            let page: Vec<String> = self
                .raw(
                    redis::cmd("ZRANGE")
                        .arg(self.hot.key("failed"))
                        .arg(from)
                        .arg(from + RETRY_PAGE - 1),
                )
                .await?;
            let last = page.len() < RETRY_PAGE;
            ids.extend(page);
            if last {
                break;
            }
        }
        let mut moved = 0;
        for batch in ids.chunks(RETRY_BATCH as usize) {
            moved += self.move_failed(Some(began), batch).await?.1;
        }
        Ok(moved)
    }

    /// Moves these jobs back to wait, each if it is failed and, for a bulk
    /// retry that `began` then (Redis's clock, ms), no retry moved it since:
    /// how many were taken off the failed set, and how many of them moved
    /// (not those whose hash a tool deleted).
    async fn move_failed(
        &self,
        began: Option<u64>,
        ids: &[impl AsRef<str>],
    ) -> QueueResult<(u64, u64)> {
        let mut call = self.hot.prepare(
            &self.hot.retry_failed,
            &["failed", "wait", "meta", "active", "marker", "events"],
        );
        call.arg(self.hot.clock.now_ms())
            .arg(began.map_or(String::new(), |b| b.to_string()));
        for id in ids {
            call.arg(id.as_ref());
        }
        self.hot.invoke(&call).await
    }

    /// BullMQ's remove, done by `lua/remove.lua`, which also lets an
    /// ordered key's next job go in the same step.
    pub(super) async fn remove(&self, id: &str) -> QueueResult<()> {
        let state = self.state_of(id).await?;
        state.check_remove(id)?;
        let mut call = self.hot.prepare(&self.hot.remove, &[]);
        call.arg(id);
        match self.hot.invoke::<i64>(&call).await? {
            1 => Ok(()),
            // Claimed since the state was read.
            0 => JobState::Active.check_remove(id),
            _ => Err(QueueError::NotFound(id.to_string())),
        }
    }

    /// The keys this queue holds (see [`crate::queue::HeldKey`]): those of
    /// `cg:held` whose first job is still the failed one, oldest first. A
    /// key retried since stays in the set until it moves on, so the set is
    /// read a page at a time until `limit` keys are found.
    pub(super) async fn held_keys(&self, limit: u64) -> QueueResult<Vec<crate::queue::HeldKey>> {
        let page = limit.clamp(1, 10_000) as i64 + 100;
        let mut found = Vec::new();
        let mut from = 0;
        while (found.len() as u64) < limit {
            let listed: Vec<(String, f64)> = self
                .raw(
                    redis::cmd("ZRANGE")
                        .arg(self.hot.key("cg:held"))
                        .arg(from)
                        .arg(from + page - 1)
                        .arg("WITHSCORES"),
                )
                .await?;
            let last = (listed.len() as i64) < page;
            found.extend(self.still_held(listed).await?);
            if last {
                break;
            }
            from += page;
        }
        found.truncate(limit as usize);
        Ok(found)
    }

    /// Of keys listed in `cg:held` (key, since), those whose first job is
    /// still failed.
    async fn still_held(
        &self,
        listed: Vec<(String, f64)>,
    ) -> QueueResult<Vec<crate::queue::HeldKey>> {
        if listed.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (key, _) in &listed {
            pipe.cmd("LINDEX")
                .arg(self.hot.key(&format!("cg:ok:{key}")))
                .arg(0);
        }
        let heads: Vec<Option<String>> = self.pipe(&pipe).await?;
        let mut pipe = redis::pipe();
        for head in &heads {
            pipe.cmd("ZSCORE")
                .arg(self.hot.key("failed"))
                .arg(head.as_deref().unwrap_or(""));
        }
        let failed: Vec<Option<f64>> = self.pipe(&pipe).await?;
        Ok(listed
            .into_iter()
            .zip(heads)
            .zip(failed)
            .filter_map(|(((key, since), head), failed)| {
                failed?;
                Some(crate::queue::HeldKey {
                    key,
                    job_id: head?,
                    since_ms: since as i64,
                })
            })
            .collect())
    }

    /// BullMQ's own pause of the queue (every relay and BullMQ tool sees it).
    pub(super) async fn set_paused(&self, paused: bool) -> QueueResult<()> {
        if paused {
            bounded(self.port().await?.pause()).await
        } else {
            bounded(self.port().await?.resume()).await
        }
    }
}

/// The names BullMQ gives the queue's own keys (`bull:<queue>:<name>`)
/// besides those of [`TYPES`], where the jobs of each state are.
const OTHER_QUEUE_KEYS: &[&str] = &[
    "meta",
    "id",
    "events",
    "priority",
    "stalled",
    "stalled-check",
    "limiter",
    "marker",
    "pc",
    "repeat",
    "metrics",
];

/// `NotFound` unless `id` may name a job: not one of the queue's own keys,
/// and without a `:` (a key below another: a job's `:logs` or `:lock`, a
/// dedup record `de:...`, this relay's `cg:...`). Job ids are counted
/// (`INCRBY`), and BullMQ refuses a `:` in its own. Such an id was looked
/// up as a job's hash: a remove of `meta` deleted the queue's meta hash
/// (its pause, its rate limit), and `id` (a counter) answered 503.
fn names_a_job(id: &str) -> QueueResult<()> {
    let queue_key = TYPES.iter().any(|(name, ..)| *name == id) || OTHER_QUEUE_KEYS.contains(&id);
    if id.is_empty() || id.contains(':') || queue_key {
        return Err(QueueError::NotFound(id.to_string()));
    }
    Ok(())
}
