//! Redis queue in BullMQ layout, built on the official BullMQ Rust port
//! (`bullmq-official`, the same Lua scripts as BullMQ for Node), so BullMQ's own
//! tools (dashboards, Node producers and consumers) see and work with it.
//!
//! # Layout
//!
//! A BullMQ queue named `QUEUE_NAME` under the prefix `bull` (`bull:<name>:wait`,
//! `:active`, `:delayed`, `:completed`, `:failed`, `bull:<name>:<id>` hashes).
//! Each job is named `deliver-event`; its data is
//! `{eventKey, eventId, botId?, type?, kind, body}` where `body` is the exact
//! JSON text to deliver. Every attempt is appended to the job's BullMQ log
//! (`bull:<name>:<id>:logs`) as one JSON line: that is the attempt history.
//! Deduplication uses BullMQ's own deduplication key (`bull:<name>:de:<eventKey>`
//! with `DEDUP_TTL_SECS`), so the same event sent to two relays is one job.
//!
//! # Leases
//!
//! Jobs are fetched in BullMQ's manual mode (`Worker::get_next_job_nonblocking`
//! with a token per claim): BullMQ's lock is the lease (`LOCK_DURATION_MS`),
//! extended by `renew`. Stalled jobs (a dead relay's locks expired) are moved
//! back to wait by BullMQ's `moveStalledJobsToWait`, run by a second, paused
//! worker whose only job is the stalled check (every `LOCK_DURATION_MS / 2`).
//! BullMQ's attempt counter (`atm`) counts finished attempts as on the embedded
//! backend.
//!
//! **Work-around** (bullmq-official 1.4.4): in manual mode `Job::move_to_delayed`
//! always skips the attempt increment and `Job::move_to_failed` never retries, so
//! there is no public call that retries *and* counts the attempt. A retry here
//! is `HINCRBY <job> atm 1` followed by `move_to_delayed`. A crash between the two
//! counts the attempt without moving the job; it then stalls and is retried, one
//! attempt "early": never lost.
//!
//! # Failures
//!
//! Every call is bounded by a timeout (`REDIS_TIMEOUT`): with Redis down the
//! ingress answers 503 quickly instead of hanging, and recovers on its own when
//! Redis is back (the connection manager reconnects).

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::sync::Mutex;
use std::time::Duration;

use bullmq as bull;
use serde_json::{json, value::RawValue, Value};

use super::{
    Attempt, Claimed, Counts, DeliveryJob, Disposition, Enqueued, JobState, JobView, LeaseRef,
    Leased, Page, Queue, QueueError, QueueResult, QueueSettings,
};
use crate::ingress::envelope::{Event, EventKey, EventKind};

pub const JOB_NAME: &str = "deliver-event";
/// Upper bound on one Redis operation, so Redis trouble becomes a quick 503.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempt-history lines kept per job.
const KEEP_LOGS: u32 = 100;

#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    pub queue_name: String,
    pub lock_duration: Duration,
    pub settings: QueueSettings,
}

pub struct RedisQueue {
    queue: bull::Queue,
    fetcher: bull::Worker,
    stall_checker: bull::Worker,
    /// Jobs this process holds a lock on, by (job id, lock token), with their
    /// script context. Keyed by token too: a job retaken after its own lease
    /// expired must not be finished through the stale lease.
    claimed: Mutex<HashMap<(String, String), bull::Job>>,
    opts: RedisOptions,
    /// Prunes completed jobs beyond `REMOVE_ON_COMPLETE` (see `prune_loop`).
    maintenance: tokio::task::JoinHandle<()>,
    /// Circuit breaker of the ingress path: after a Redis failure, `enqueue`
    /// answers Unavailable at once until then (a fast 503 rather than one
    /// timeout per request), and then tries Redis again.
    down_until: Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("queue", &self.opts.queue_name)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(format!("redis: {e}"))
}

async fn bounded<T>(fut: impl Future<Output = Result<T, bull::Error>>) -> QueueResult<T> {
    match tokio::time::timeout(REDIS_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable("no answer within 2 s")),
    }
}

fn connection(url: &str) -> bull::options::RedisConnectionOptions {
    bull::options::RedisConnectionOptions::new().url(url)
}

impl RedisQueue {
    pub async fn connect(opts: RedisOptions) -> Result<Self, QueueError> {
        let lock_ms = opts.lock_duration.as_millis() as u64;
        let mut qopts = bull::QueueOptions::new();
        qopts.connection = connection(&opts.url);
        let queue = bounded(bull::Queue::with_options(&opts.queue_name, qopts)).await?;
        let noop = |_job: bull::Job, _cancel: bull::worker::CancellationToken| async move {
            Ok::<Value, bull::Error>(Value::Null)
        };
        let worker_opts = |skip_stalled: bool| bull::WorkerOptions {
            connection: connection(&opts.url),
            autorun: false,
            lock_duration: lock_ms,
            stalled_interval: (lock_ms / 2).max(1000),
            max_stalled_count: u32::MAX,
            skip_stalled_check: skip_stalled,
            // Leases are renewed by the delivery pool (`renew`), not by BullMQ's timer.
            skip_lock_renewal: true,
            concurrency: 1,
            ..Default::default()
        };
        let fetcher = bounded(bull::Worker::with_options(
            &opts.queue_name,
            noop,
            worker_opts(true),
        ))
        .await?;
        let stall_checker = bounded(bull::Worker::with_options(
            &opts.queue_name,
            noop,
            worker_opts(false),
        ))
        .await?;
        stall_checker.pause();
        bounded(stall_checker.run()).await?;
        let keep_completed = i64::from(opts.settings.remove_on_complete);
        Ok(Self {
            queue: queue.clone(),
            fetcher,
            stall_checker,
            claimed: Mutex::new(HashMap::new()),
            opts,
            maintenance: tokio::spawn(prune_loop(queue.clone(), keep_completed)),
            down_until: Mutex::new(None),
        })
    }

    fn claimed(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), bull::Job>> {
        self.claimed.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn raw<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> QueueResult<T> {
        let mut conn = self.queue.connection().connection();
        match tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable("no answer within 2 s")),
        }
    }

    fn job_key(&self, id: &str) -> String {
        format!("{}{}", self.queue.keys().key_prefix(), id)
    }

    async fn view(
        &self,
        job: &bull::Job,
        state: JobState,
        with_payload: bool,
    ) -> QueueResult<JobView> {
        let (logs, _) = bounded(self.queue.get_job_logs(job.id(), 0, -1, true)).await?;
        let attempts: Vec<Attempt> = logs
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let d = job.data();
        let s = |k: &str| d.get(k).and_then(Value::as_str).map(str::to_owned);
        let payload = if with_payload {
            s("body").and_then(|b| RawValue::from_string(b).ok())
        } else {
            None
        };
        let reason = job.failed_reason();
        Ok(JobView {
            id: job.id().to_string(),
            state,
            event_key: s("eventKey").unwrap_or_default(),
            event_id: s("eventId").unwrap_or_default(),
            bot_id: s("botId"),
            event_type: s("type"),
            kind: EventKind::parse(&s("kind").unwrap_or_default())
                .unwrap_or(EventKind::Envelope)
                .as_str(),
            attempts_made: job.attempts_made(),
            created_at_ms: job.timestamp() as i64,
            due_at_ms: (state == JobState::Delayed).then(|| (job.timestamp() + job.delay()) as i64),
            finished_at_ms: job.finished_on().map(|t| t as i64),
            failed_reason: (!reason.is_empty()).then(|| reason.to_string()),
            attempts,
            payload,
        })
    }

    async fn state_of(&self, id: &str) -> QueueResult<JobState> {
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
    async fn oldest_waiting_ms(&self) -> QueueResult<Option<i64>> {
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

    /// Earliest due time of a delayed job (BullMQ scores are `timestamp << 12 | n`).
    async fn next_delayed_ms(&self) -> QueueResult<Option<i64>> {
        let key = format!("{}delayed", self.queue.keys().key_prefix());
        let first: Vec<(String, f64)> = self
            .raw(
                redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(0)
                    .arg("WITHSCORES"),
            )
            .await?;
        Ok(first.first().map(|(_, score)| (*score as i64) >> 12))
    }
}

fn types_of(state: Option<JobState>) -> Vec<&'static str> {
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

impl RedisQueue {
    async fn enqueue_now(&self, event: Event) -> QueueResult<Enqueued> {
        let key = event.key.as_str().to_string();
        if let Some(id) = bounded(self.queue.get_deduplication_job_id(&key)).await? {
            return Ok(Enqueued::Duplicate(id));
        }
        let body = String::from_utf8(event.body)
            .map_err(|_| QueueError::Unavailable("payload is not UTF-8".into()))?;
        let data = json!({
            "eventKey": key,
            "eventId": event.event_id,
            "botId": event.bot_id,
            "type": event.event_type,
            "kind": event.kind.as_str(),
            "body": body,
        });
        let dedup = bull::DeduplicationOptions {
            id: key,
            ttl: Some(self.opts.settings.dedup_ttl.as_millis() as u64),
            ..Default::default()
        };
        let add = self
            .queue
            .add(JOB_NAME, data)
            .deduplication(dedup)
            .remove_on_complete(bull::types::RemoveOnFinish::Count(
                self.opts.settings.remove_on_complete as usize,
            ))
            .remove_on_fail(bull::types::RemoveOnFinish::Bool(false))
            .keep_logs(KEEP_LOGS);
        let job = bounded(add.into_future()).await?;
        Ok(Enqueued::Accepted(job.id().to_string()))
    }
}

/// Removes the oldest completed jobs beyond `ARGV[2]` (at most `ARGV[3]` per
/// call): their hash and log, and their entry in the completed set. Dedup keys
/// are left alone on purpose: they must outlive the job for `DEDUP_TTL_SECS`.
const PRUNE_COMPLETED_LUA: &str = r#"
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if excess <= 0 then return 0 end
if excess > tonumber(ARGV[3]) then excess = tonumber(ARGV[3]) end
local ids = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
for _, id in ipairs(ids) do
  redis.call('DEL', ARGV[1] .. id, ARGV[1] .. id .. ':logs')
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
return excess
"#;

/// Keeps the newest `keep` completed jobs, once a second. Work-around: in manual
/// mode bullmq-official 1.4.4's `move_to_completed` sends `keepJobs {count: -1}`
/// (keep all) whatever the job's `removeOnComplete` says. Several relays may run
/// this at once; each call is atomic and idempotent.
async fn prune_loop(queue: bull::Queue, keep: i64) {
    let prefix = queue.keys().key_prefix().to_string();
    let script = redis::Script::new(PRUNE_COMPLETED_LUA);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut conn = queue.connection().connection();
        let mut call = script.key(format!("{prefix}completed"));
        call.arg(&prefix).arg(keep).arg(5000);
        match tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "pruning completed jobs"),
            Err(_) => tracing::debug!("pruning completed jobs: timed out"),
        }
    }
}

/// How long the ingress fails fast after a Redis failure.
const BREAKER_OPEN: Duration = Duration::from_millis(500);

impl Queue for RedisQueue {
    async fn enqueue(&self, event: Event) -> QueueResult<Enqueued> {
        {
            let down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
            if down.is_some_and(|t| std::time::Instant::now() < t) {
                return Err(unavailable("unreachable (will retry shortly)"));
            }
        }
        let res = self.enqueue_now(event).await;
        let mut down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        *down = match &res {
            Err(QueueError::Unavailable(_)) => Some(std::time::Instant::now() + BREAKER_OPEN),
            _ => None,
        };
        res
    }

    async fn claim(&self, max: usize, _lease: Duration) -> QueueResult<Claimed> {
        let mut jobs = Vec::new();
        while jobs.len() < max {
            let token = uuid::Uuid::new_v4().to_string();
            let Some(job) = bounded(self.fetcher.get_next_job_nonblocking(&token)).await? else {
                break;
            };
            let d = job.data();
            let s = |k: &str| d.get(k).and_then(Value::as_str).map(str::to_owned);
            let delivery = DeliveryJob {
                id: job.id().to_string(),
                key: EventKey::from_stored(s("eventKey").unwrap_or_default()),
                event_id: s("eventId").unwrap_or_default(),
                bot_id: s("botId"),
                kind: EventKind::parse(&s("kind").unwrap_or_default())
                    .unwrap_or(EventKind::Envelope),
                body: s("body").unwrap_or_else(|| "null".into()).into_bytes(),
                attempts_made: job.attempts_made(),
            };
            let lease = LeaseRef {
                job_id: delivery.id.clone(),
                token,
            };
            self.claimed()
                .insert((lease.job_id.clone(), lease.token.clone()), job);
            jobs.push(Leased {
                job: delivery,
                lease,
            });
        }
        let next_due_ms = if jobs.is_empty() {
            self.next_delayed_ms().await?
        } else {
            None
        };
        Ok(Claimed { jobs, next_due_ms })
    }

    async fn renew(&self, leases: Vec<LeaseRef>, lease: Duration) -> QueueResult<()> {
        for l in leases {
            let job = self
                .claimed()
                .get(&(l.job_id.clone(), l.token.clone()))
                .cloned();
            if let Some(job) = job {
                if let Err(e) = bounded(job.extend_lock(&l.token, lease.as_millis() as u64)).await {
                    tracing::warn!(job = %l.job_id, error = %e, "cannot extend the lock");
                }
            }
        }
        Ok(())
    }

    async fn finish(
        &self,
        leased: Leased,
        attempt: Attempt,
        disposition: Disposition,
    ) -> QueueResult<bool> {
        let Some(mut job) = self
            .claimed()
            .remove(&(leased.lease.job_id.clone(), leased.lease.token.clone()))
        else {
            return Ok(false);
        };
        let line = serde_json::to_string(&attempt).map_err(unavailable)?;
        bounded(job.log(&line)).await?;
        let moved = match disposition {
            Disposition::Completed => bounded(job.move_to_completed("delivered")).await,
            Disposition::Failed { reason } => bounded(job.move_to_failed(&reason)).await,
            Disposition::RetryAt { due_at_ms, reason } => {
                let key = self.job_key(job.id());
                self.raw::<i64>(redis::cmd("HINCRBY").arg(&key).arg("atm").arg(1))
                    .await?;
                self.raw::<i64>(
                    redis::cmd("HSET")
                        .arg(&key)
                        .arg("failedReason")
                        .arg(&reason),
                )
                .await?;
                bounded(job.move_to_delayed(due_at_ms.max(0) as u64)).await
            }
        };
        match moved {
            Ok(()) => Ok(true),
            // The lock is gone: the job stalled and another relay owns it now.
            Err(QueueError::Unavailable(msg))
                if msg.contains("lock") || msg.contains("not in the expected state") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn release(&self, leases: Vec<LeaseRef>) -> QueueResult<()> {
        for l in leases {
            let job = self.claimed().remove(&(l.job_id.clone(), l.token.clone()));
            if let Some(job) = job {
                if let Err(e) = bounded(job.move_to_wait(Some(&l.token))).await {
                    tracing::warn!(job = %l.job_id, error = %e, "cannot return the job; it will be taken over when its lock expires");
                }
            }
        }
        Ok(())
    }

    async fn counts(&self) -> QueueResult<Counts> {
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

    async fn list(&self, state: Option<JobState>, offset: u64, limit: u64) -> QueueResult<Page> {
        let types = types_of(state);
        let total = bounded(self.queue.get_job_count_by_types(&types)).await?;
        let jobs =
            bounded(
                self.queue
                    .get_jobs(&types, offset as i64, (offset + limit) as i64 - 1, false),
            )
            .await?;
        let mut items = Vec::with_capacity(jobs.len());
        for job in &jobs {
            let st = match state {
                Some(s) => s,
                None => self.state_of(job.id()).await.unwrap_or(JobState::Waiting),
            };
            items.push(self.view(job, st, false).await?);
        }
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
        self.view(&job, state, true).await
    }

    async fn retry(&self, id: &str) -> QueueResult<()> {
        let state = self.state_of(id).await?;
        if state != JobState::Failed {
            return Err(QueueError::WrongState {
                id: id.to_string(),
                state: state.as_str(),
                hint: "only failed jobs can be retried",
            });
        }
        let mut job = bounded(self.queue.get_job(id))
            .await?
            .ok_or_else(|| QueueError::NotFound(id.to_string()))?;
        let opts = bull::RetryOptions {
            reset_attempts_made: true,
            reset_attempts_started: true,
        };
        bounded(job.retry("failed", Some(opts))).await
    }

    async fn retry_all_failed(&self) -> QueueResult<u64> {
        let n = bounded(self.queue.get_failed_count()).await?;
        let key = |id: &str| self.job_key(id);
        // Reset attempts like a single retry, then move them all (BullMQ's retryJobs).
        let failed = bounded(self.queue.get_jobs(&["failed"], 0, -1, true)).await?;
        for job in &failed {
            self.raw::<i64>(
                redis::cmd("HSET")
                    .arg(key(job.id()))
                    .arg("atm")
                    .arg(0)
                    .arg("ats")
                    .arg(0),
            )
            .await?;
        }
        bounded(self.queue.retry_jobs("failed", 1000, None)).await?;
        Ok(n)
    }

    async fn remove(&self, id: &str) -> QueueResult<()> {
        let state = self.state_of(id).await?;
        if state == JobState::Active {
            return Err(QueueError::WrongState {
                id: id.to_string(),
                state: state.as_str(),
                hint: "a job being delivered cannot be removed; try again when it has finished",
            });
        }
        if bounded(self.queue.remove(id)).await? {
            Ok(())
        } else {
            Err(QueueError::NotFound(id.to_string()))
        }
    }

    async fn ping(&self) -> QueueResult<()> {
        self.raw::<String>(&redis::cmd("PING")).await.map(|_| ())
    }

    async fn close(&self) -> QueueResult<()> {
        self.maintenance.abort();
        let _ = bounded(self.stall_checker.close(1000)).await;
        let _ = bounded(self.fetcher.close(1000)).await;
        self.queue.close().await;
        Ok(())
    }
}

impl Drop for RedisQueue {
    fn drop(&mut self) {
        self.maintenance.abort();
    }
}
