//! Reading jobs back (views, states, listings) and the operators' side of
//! the contract ([`Operate`]).

use super::*;
use crate::queue::StoredJob;

impl RedisQueue {
    pub(super) async fn raw<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> QueueResult<T> {
        let mut conn = self.queue.connection().connection();
        bounded(cmd.query_async::<T>(&mut conn)).await
    }

    /// Views of `jobs` with what the hashes do not hold (each attempt log,
    /// each delayed job's due time, and with `state: None` each job's state),
    /// read for the whole page in one pipelined round trip.
    pub(super) async fn views(
        &self,
        jobs: &[bull::Job],
        state: Option<JobState>,
        with_payload: bool,
    ) -> QueueResult<Vec<JobView>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let key = |k: &str| self.hot.key(k);
        let mut pipe = redis::pipe();
        for job in jobs {
            let id = job.id();
            pipe.cmd("LRANGE")
                .arg(key(&format!("{id}:logs")))
                .arg(0)
                .arg(-1);
            pipe.cmd("ZSCORE").arg(key("delayed")).arg(id);
            if state.is_none() {
                pipe.cmd("ZSCORE").arg(key("completed")).arg(id);
                pipe.cmd("ZSCORE").arg(key("failed")).arg(id);
                pipe.cmd("LPOS").arg(key("active")).arg(id);
            }
        }
        let mut conn = self.queue.connection().connection();
        let replies: Vec<redis::Value> = bounded(pipe.query_async(&mut conn)).await?;
        let per_job = if state.is_none() { 5 } else { 2 };
        let mut out = Vec::with_capacity(jobs.len());
        for (job, r) in jobs.iter().zip(replies.chunks(per_job)) {
            let logs: Vec<String> = redis::from_redis_value(r[0].clone()).unwrap_or_default();
            let delayed: Option<f64> = redis::from_redis_value(r[1].clone()).unwrap_or(None);
            let some = |v: &redis::Value| !matches!(v, redis::Value::Nil);
            let st = state.unwrap_or_else(|| {
                if some(&r[2]) {
                    JobState::Completed
                } else if some(&r[3]) {
                    JobState::Failed
                } else if delayed.is_some() {
                    JobState::Delayed
                } else if some(&r[4]) {
                    JobState::Active
                } else {
                    JobState::Waiting
                }
            });
            out.push(view_of(job, st, &logs, delayed, with_payload));
        }
        Ok(out)
    }

    pub(super) async fn state_of(&self, id: &str) -> QueueResult<JobState> {
        match bounded(self.queue.get_job_state(id)).await? {
            bull::JobState::Waiting
            | bull::JobState::Prioritized
            | bull::JobState::WaitingChildren => Ok(JobState::Waiting),
            bull::JobState::Active => Ok(JobState::Active),
            bull::JobState::Delayed => Ok(JobState::Delayed),
            bull::JobState::Completed => Ok(JobState::Completed),
            bull::JobState::Failed => Ok(JobState::Failed),
            bull::JobState::Unknown => Err(QueueError::NotFound(id.to_string())),
        }
    }

    /// Creation time of the oldest job in wait (BullMQ takes jobs from the
    /// list's tail).
    pub(super) async fn oldest_waiting_ms(&self) -> QueueResult<Option<i64>> {
        let prefix = self.queue.keys().key_prefix().to_string();
        let id: Option<String> = self
            .raw(redis::cmd("LINDEX").arg(format!("{prefix}wait")).arg(-1))
            .await?;
        let Some(id) = id else { return Ok(None) };
        let ts: Option<i64> = self
            .raw(
                redis::cmd("HGET")
                    .arg(format!("{prefix}{id}"))
                    .arg("timestamp"),
            )
            .await?;
        Ok(ts)
    }
}

/// A job as the admin API shows it, from its hash and what [`RedisQueue::views`] read.
fn view_of(
    job: &bull::Job,
    state: JobState,
    logs: &[String],
    delayed_score: Option<f64>,
    with_payload: bool,
) -> JobView {
    let attempts: Vec<Attempt> = logs
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let d = job.data();
    let s = |k: &str| d.get(k).and_then(Value::as_str).map(str::to_owned);
    // A delayed job is due at its score in the delayed set (`due << 12 | n`);
    // the hash's `timestamp + delay` is creation time plus the last delay.
    let due_at_ms = (state == JobState::Delayed).then(|| {
        delayed_score.map_or((job.timestamp() + job.delay()) as i64, |s| (s as i64) >> 12)
    });
    let stored = StoredJob {
        id: job.id().to_string(),
        destination: s("destination").unwrap_or_default(),
        event_key: s("eventKey").unwrap_or_default(),
        event_id: s("eventId").unwrap_or_default(),
        bot_id: s("botId"),
        event_type: s("type"),
        kind: s("kind").unwrap_or_default(),
        attempts_made: job.attempts_made(),
        created_at_ms: job.timestamp() as i64,
        due_at_ms,
        finished_at_ms: job.finished_on().map(|t| t as i64),
        failed_reason: Some(job.failed_reason().to_string()),
        attempts,
        body: if with_payload { s("body") } else { None },
    };
    stored.into_view(state, with_payload)
}

pub(super) fn types_of(state: Option<JobState>) -> Vec<&'static str> {
    match state {
        None => vec![
            "waiting",
            "prioritized",
            "active",
            "delayed",
            "completed",
            "failed",
        ],
        Some(JobState::Waiting) => vec!["waiting", "prioritized"],
        Some(s) => vec![s.as_str()],
    }
}

impl Operate for RedisQueue {
    // One destination per relay on Redis so far (config refuses more): its
    // one BullMQ queue is that destination's, whatever the filter names.
    async fn counts_for(&self, _destination: Option<&str>) -> QueueResult<Counts> {
        let c = bounded(self.queue.get_job_counts()).await?;
        Ok(Counts {
            waiting: c.waiting + c.prioritized,
            active: c.active,
            delayed: c.delayed,
            completed: c.completed,
            failed: c.failed,
            oldest_waiting_ms: self.oldest_waiting_ms().await?,
        })
    }

    async fn list_for(
        &self,
        state: Option<JobState>,
        _destination: Option<&str>,
        offset: u64,
        limit: u64,
    ) -> QueueResult<Page> {
        let types = types_of(state);
        let total = bounded(self.queue.get_job_count_by_types(&types)).await?;
        let jobs =
            bounded(
                self.queue
                    .get_jobs(&types, offset as i64, (offset + limit) as i64 - 1, false),
            )
            .await?;
        let items = self.views(&jobs, state, false).await?;
        Ok(Page { items, total })
    }

    async fn get(&self, id: &str) -> QueueResult<JobView> {
        // State first, then the hash: the two reads are not atomic, and a job
        // seen as completed/failed (terminal) must not show the attempt count
        // of the attempt before. A hash newer than the state is harmless.
        let state = self.state_of(id).await?;
        let job = bounded(self.queue.get_job(id))
            .await?
            .ok_or_else(|| QueueError::NotFound(id.to_string()))?;
        let mut views = self
            .views(std::slice::from_ref(&job), Some(state), true)
            .await?;
        views
            .pop()
            .ok_or_else(|| QueueError::NotFound(id.to_string()))
    }

    async fn retry(&self, id: &str) -> QueueResult<()> {
        self.state_of(id).await?.check_retry(id)?;
        let mut job = bounded(self.queue.get_job(id))
            .await?
            .ok_or_else(|| QueueError::NotFound(id.to_string()))?;
        let opts = bull::RetryOptions {
            reset_attempts_made: true,
            reset_attempts_started: true,
        };
        bounded(job.retry("failed", Some(opts))).await
    }

    async fn retry_all_failed_for(&self, _destination: Option<&str>) -> QueueResult<u64> {
        // Batches of RETRY_BATCH, each reset and moved in one script, so every
        // job moved has its attempts reset and the count is what moved.
        let mut moved = 0;
        loop {
            let mut call = self.hot.prepare(
                &self.hot.retry_failed,
                &["failed", "wait", "meta", "active", "marker", "events"],
            );
            call.arg(RETRY_BATCH);
            let n: u64 = self.hot.invoke(&call).await?;
            moved += n;
            if n < RETRY_BATCH {
                return Ok(moved);
            }
        }
    }

    async fn remove(&self, id: &str) -> QueueResult<()> {
        self.state_of(id).await?.check_remove(id)?;
        if bounded(self.queue.remove(id)).await? {
            Ok(())
        } else {
            Err(QueueError::NotFound(id.to_string()))
        }
    }

    /// BullMQ's own pause of the queue (every relay and BullMQ tool sees it).
    async fn set_paused(&self, _destination: &str, paused: bool) -> QueueResult<()> {
        if paused {
            bounded(self.queue.pause()).await
        } else {
            bounded(self.queue.resume()).await
        }
    }

    /// The one destination of this queue, as its newest job names it.
    async fn destination_names(&self) -> QueueResult<Vec<String>> {
        let page = self.list_for(None, None, 0, 1).await?;
        Ok(page.items.into_iter().map(|j| j.destination).collect())
    }

    async fn is_paused(&self, _destination: &str) -> QueueResult<bool> {
        bounded(self.queue.is_paused()).await
    }
}
