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
//! # Hot path: batched scripts in BullMQ's layout
//!
//! The port runs one Lua script per job and per step (add, take, log, finish),
//! each about 35 µs of Redis time, which caps one Redis at about 5,000 events/s.
//! The four steps of every event therefore go through our own scripts
//! (`src/queue/lua/`), which do per job what BullMQ's `addStandardJob`,
//! `moveToActive`, `moveToFinished`/`moveToDelayed`, `extendLocks` and
//! `moveJobFromActiveToWait` do, in the same keys and fields, with the same
//! events, but for a whole batch per call. Requests are gathered by a group
//! commit (`batch.rs`): under load one call carries many jobs; alone, a job goes
//! out at once. Everything else (counts, listing, retry, remove, the stalled
//! check) uses the port.
//!
//! A new event the relay's own worker pool has room for is stored already
//! locked in `active` (a handoff, as on the embedded store), which saves the
//! take step.
//! Adds have a Redis connection of their own, so an acknowledgement does not
//! wait behind delivery traffic on one pipeline.
//!
//! # Leases
//!
//! BullMQ's lock (`<job>:lock` = token, `LOCK_DURATION_MS`) is the lease,
//! extended by `renew`. Stalled jobs (a dead relay's locks expired) are moved
//! back to wait by BullMQ's `moveStalledJobsToWait`, run by a paused worker of
//! the port whose only job is the stalled check (every `LOCK_DURATION_MS / 2`).
//! BullMQ's attempt counter (`atm`) counts finished attempts as on the embedded
//! backend: a retry counts the attempt and moves the job to delayed in one
//! script (the port's manual mode cannot do both, see tests/it/bullmq_port.rs).
//!
//! # Failures
//!
//! Every call is bounded by a timeout (`REDIS_TIMEOUT`): with Redis down the
//! ingress answers 503 quickly instead of hanging, and recovers on its own when
//! Redis is back (the connection manager reconnects).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bullmq as bull;
use serde_json::{value::RawValue, Value};

use super::batch::Batcher;
use super::{
    Attempt, Claimed, Counts, DeliveryJob, Disposition, Enqueued, JobState, JobView, LeaseRef,
    Leased, Operate, Page, Queue, QueueError, QueueResult, QueueSettings,
};
use crate::event::{Event, EventKey, EventKind};

pub const JOB_NAME: &str = "deliver-event";
/// Upper bound on one Redis operation, so Redis trouble becomes a quick 503.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempt-history lines kept per job.
const KEEP_LOGS: u32 = 100;

#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    /// PEM of a CA to trust besides the web PKI roots (`rediss://` only).
    pub ca_pem: Option<Vec<u8>>,
    pub queue_name: String,
    pub lock_duration: Duration,
    pub settings: QueueSettings,
}

/// Most jobs in one batched script call.
const MAX_BATCH: usize = 256;

pub struct RedisQueue {
    queue: bull::Queue,
    stall_checker: bull::Worker,
    hot: Arc<Hot>,
    adds: Batcher<NewJob, (char, String)>,
    finishes: Batcher<Finished, bool>,
    opts: RedisOptions,
    /// Prunes completed jobs beyond `REMOVE_ON_COMPLETE` (see `prune_loop`).
    maintenance: tokio::task::JoinHandle<()>,
    /// Circuit breaker of the ingress path: after a Redis failure, `enqueue`
    /// answers Unavailable at once until then (a fast 503 rather than one
    /// timeout per request), and then tries Redis again.
    down_until: Mutex<Option<std::time::Instant>>,
    /// What `INFO` said at start-up (see [`durability`]).
    risks: Vec<(&'static str, bool)>,
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

async fn bounded<T, E: std::fmt::Display>(
    fut: impl Future<Output = Result<T, E>>,
) -> QueueResult<T> {
    match tokio::time::timeout(REDIS_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable("no answer within 2 s")),
    }
}

/// Whether this Redis keeps what it acknowledged, from `INFO` (which managed
/// services allow where `CONFIG GET` is disabled): without AOF, a 200 is lost
/// if Redis stops before its next snapshot; with a `maxmemory-policy` other
/// than `noeviction`, a full Redis may evict queued jobs. One WARN line each.
async fn durability(queue: &bull::Queue) -> Vec<(&'static str, bool)> {
    let mut conn = queue.connection().connection();
    let mut info = String::new();
    for section in ["persistence", "memory"] {
        match bounded(
            redis::cmd("INFO")
                .arg(section)
                .query_async::<String>(&mut conn),
        )
        .await
        {
            Ok(text) => info.push_str(&text),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read Redis's persistence settings (INFO); make sure it runs with appendonly yes and maxmemory-policy noeviction, or acknowledged events can be lost");
                return Vec::new();
            }
        }
    }
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let no_aof = field("aof_enabled") != Some("1");
    if no_aof {
        tracing::warn!("Redis has no append-only file (appendonly no): an event answered 200 is lost if Redis stops before its next snapshot; set appendonly yes");
    }
    let policy = field("maxmemory_policy").unwrap_or("noeviction");
    let evicting = policy != "noeviction";
    if evicting {
        tracing::warn!(maxmemory_policy = policy, "Redis may evict keys when full: queued jobs, acknowledged ones too, can vanish; set maxmemory-policy noeviction");
    }
    vec![("redis_no_aof", no_aof), ("redis_evicting", evicting)]
}

/// Failed jobs moved back per script call by `retry_all_failed` (one call
/// holds Redis for about a millisecond per hundred jobs).
const RETRY_BATCH: u64 = 500;

fn connection(opts: &RedisOptions) -> bull::options::RedisConnectionOptions {
    let mut c = bull::options::RedisConnectionOptions::new().url(&opts.url);
    if let Some(pem) = &opts.ca_pem {
        c.tls_certs = Some(bull::options::TlsCerts {
            root_cert: Some(pem.clone()),
            client_cert: None,
            client_key: None,
        });
    }
    c
}

/// One connection and a PING, straight with the redis crate, before the
/// port's connection manager (which retries a failed connection quietly, so
/// a refused certificate would only show as a timeout): a TLS, certificate,
/// password or network failure is reported as the error it is.
async fn first_connection(opts: &RedisOptions) -> QueueResult<()> {
    let client = match &opts.ca_pem {
        None => redis::Client::open(opts.url.as_str()),
        Some(pem) => redis::Client::build_with_tls(
            opts.url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            },
        ),
    }
    .map_err(unavailable)?;
    let mut conn = bounded(client.get_multiplexed_async_connection()).await?;
    bounded(redis::cmd("PING").query_async::<String>(&mut conn)).await?;
    Ok(())
}

/// A new job for the add script.
struct NewJob {
    dedup_id: String,
    data: String,
    opts: String,
    /// Set: store it locked with this token (a handoff).
    token: Option<String>,
}

/// A finished attempt for the finish script.
struct Finished {
    id: String,
    token: String,
    outcome: &'static str,
    line: String,
    reason: String,
    due_at_ms: i64,
    /// Finished attempts before this one.
    attempts_made: u32,
}

/// The job data of a new job (see [`JobData`]).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct NewJobData<'a> {
    event_key: &'a str,
    event_id: &'a str,
    bot_id: Option<&'a str>,
    #[serde(rename = "type")]
    event_type: Option<&'a str>,
    kind: &'a str,
    body: &'a str,
}

/// The job data, as stored in the job hash's `data` field.
#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobData {
    #[serde(default)]
    event_key: String,
    #[serde(default)]
    event_id: String,
    #[serde(default)]
    bot_id: Option<String>,
    #[serde(default)]
    kind: String,
    /// The exact JSON text to deliver. Jobs added by other producers may hold
    /// something else here; they deliver `null`.
    #[serde(default)]
    body: Option<Value>,
}

/// The batched scripts (see the module doc), their keys and a connection.
struct Hot {
    queue: bull::Queue,
    /// A second connection, for adds only: an acknowledgement then waits for
    /// its own batch, not behind the delivery side's replies on one pipeline.
    ingress: bull::Queue,
    prefix: String,
    worker: String,
    /// Lock tokens: this process's random id and a counter (BullMQ's shape,
    /// `<id>:<n>`), so a token costs no call for random bytes.
    token_base: String,
    tokens: std::sync::atomic::AtomicU64,
    lock_ms: u64,
    add: redis::Script,
    claim: redis::Script,
    finish: redis::Script,
    extend: redis::Script,
    release: redis::Script,
    retry_failed: redis::Script,
}

impl Hot {
    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// A lock token no other lock of this process or another has.
    fn token(&self) -> String {
        let n = self
            .tokens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}:{n}", self.token_base)
    }

    /// A call of `script` with these queue keys and the key prefix as ARGV[1]
    /// (the order every script in `lua/` expects).
    fn prepare<'a>(&self, script: &'a redis::Script, keys: &[&str]) -> redis::ScriptInvocation<'a> {
        let mut call = script.prepare_invoke();
        for k in keys {
            call.key(self.key(k));
        }
        call.arg(&self.prefix);
        call
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> QueueResult<T> {
        self.invoke_on(&self.queue, call).await
    }

    async fn invoke_on<T: redis::FromRedisValue>(
        &self,
        on: &bull::Queue,
        call: &redis::ScriptInvocation<'_>,
    ) -> QueueResult<T> {
        let mut conn = on.connection().connection();
        bounded(call.invoke_async::<T>(&mut conn)).await
    }

    async fn add(&self, jobs: Vec<NewJob>, dedup_ttl_ms: u64) -> QueueResult<Vec<(char, String)>> {
        let mut call = self.prepare(
            &self.add,
            &["wait", "active", "meta", "id", "events", "marker"],
        );
        call.arg(super::now_ms())
            .arg(dedup_ttl_ms)
            .arg(JOB_NAME)
            .arg(self.lock_ms)
            .arg(&self.worker);
        for j in &jobs {
            call.arg(&j.dedup_id)
                .arg(&j.data)
                .arg(&j.opts)
                .arg(j.token.as_deref().unwrap_or(""));
        }
        let out: Vec<(String, String)> = self.invoke_on(&self.ingress, &call).await?;
        Ok(out
            .into_iter()
            .map(|(kind, id)| (kind.chars().next().unwrap_or('a'), id))
            .collect())
    }

    async fn finish(&self, jobs: Vec<Finished>) -> QueueResult<Vec<bool>> {
        let mut call = self.prepare(
            &self.finish,
            &[
                "wait",
                "active",
                "prioritized",
                "events",
                "stalled",
                "delayed",
                "meta",
                "completed",
                "failed",
                "marker",
            ],
        );
        call.arg(super::now_ms()).arg(KEEP_LOGS);
        for j in &jobs {
            call.arg(&j.id)
                .arg(&j.token)
                .arg(j.outcome)
                .arg(&j.line)
                .arg(&j.reason)
                .arg(j.due_at_ms)
                .arg(j.attempts_made + 1);
        }
        let out: Vec<i64> = self.invoke(&call).await?;
        Ok(out.into_iter().map(|d| d == 1).collect())
    }
}

impl RedisQueue {
    pub async fn connect(opts: RedisOptions) -> Result<Self, QueueError> {
        first_connection(&opts).await?;
        let lock_ms = opts.lock_duration.as_millis() as u64;
        let mut qopts = bull::QueueOptions::new();
        qopts.connection = connection(&opts);
        let queue = bounded(bull::Queue::with_options(&opts.queue_name, qopts)).await?;
        let noop = |_job: bull::Job, _cancel: bull::worker::CancellationToken| async move {
            Ok::<Value, bull::Error>(Value::Null)
        };
        let worker_opts = |skip_stalled: bool| bull::WorkerOptions {
            connection: connection(&opts),
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
        let stall_checker = bounded(bull::Worker::with_options(
            &opts.queue_name,
            noop,
            worker_opts(false),
        ))
        .await?;
        stall_checker.pause();
        bounded(stall_checker.run()).await?;
        let keep_completed = i64::from(opts.settings.remove_on_complete);
        let mut iopts = bull::QueueOptions::new();
        iopts.connection = connection(&opts);
        let ingress = bounded(bull::Queue::with_options(&opts.queue_name, iopts)).await?;
        let hot = Arc::new(Hot {
            ingress,
            queue: queue.clone(),
            prefix: queue.keys().key_prefix().to_string(),
            worker: format!("cogrelay-{}", std::process::id()),
            token_base: uuid::Uuid::new_v4().to_string(),
            tokens: std::sync::atomic::AtomicU64::new(0),
            lock_ms,
            add: redis::Script::new(include_str!("lua/add.lua")),
            claim: redis::Script::new(include_str!("lua/claim.lua")),
            finish: redis::Script::new(include_str!("lua/finish.lua")),
            extend: redis::Script::new(include_str!("lua/extend.lua")),
            release: redis::Script::new(include_str!("lua/release.lua")),
            retry_failed: redis::Script::new(include_str!("lua/retry_failed.lua")),
        });
        let ttl_ms = opts.settings.dedup_ttl.as_millis() as u64;
        let h = hot.clone();
        let adds = Batcher::spawn(MAX_BATCH, move |jobs| {
            let h = h.clone();
            async move { h.add(jobs, ttl_ms).await }
        });
        let h = hot.clone();
        let finishes = Batcher::spawn(MAX_BATCH, move |jobs| {
            let h = h.clone();
            async move { h.finish(jobs).await }
        });
        Ok(Self {
            queue: queue.clone(),
            stall_checker,
            hot,
            adds,
            finishes,
            opts,
            maintenance: tokio::spawn(prune_loop(queue.clone(), keep_completed)),
            down_until: Mutex::new(None),
            risks: durability(&queue).await,
        })
    }

    async fn raw<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> QueueResult<T> {
        let mut conn = self.queue.connection().connection();
        bounded(cmd.query_async::<T>(&mut conn)).await
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
        // A delayed job is due at its score in the delayed set (`due << 12 | n`);
        // the hash's `timestamp + delay` is creation time plus the last delay.
        let due_at_ms = if state == JobState::Delayed {
            let score: Option<f64> = self
                .raw(
                    redis::cmd("ZSCORE")
                        .arg(self.hot.key("delayed"))
                        .arg(job.id()),
                )
                .await?;
            Some(score.map_or((job.timestamp() + job.delay()) as i64, |s| (s as i64) >> 12))
        } else {
            None
        };
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
            due_at_ms,
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
    /// Adds the job; answers the add script's kind ('a' added, 'l' added
    /// locked with `token`, 'd' duplicate) and the job id.
    async fn enqueue_now(
        &self,
        event: &Event,
        token: Option<String>,
    ) -> QueueResult<(char, String)> {
        let key = event.key.as_str().to_string();
        let body = std::str::from_utf8(&event.body)
            .map_err(|_| QueueError::Unavailable("payload is not UTF-8".into()))?;
        let data = serde_json::to_string(&NewJobData {
            event_key: &key,
            event_id: &event.event_id,
            bot_id: event.bot_id.as_deref(),
            event_type: event.event_type.as_deref(),
            kind: event.kind.as_str(),
            body,
        })
        .map_err(unavailable)?;
        // The options BullMQ would store for this job (`opts` field).
        let opts = format!(
            r#"{{"removeOnComplete":{},"removeOnFail":false,"keepLogs":{KEEP_LOGS},"de":{{"id":{},"ttl":{}}}}}"#,
            self.opts.settings.remove_on_complete,
            serde_json::to_string(&key).map_err(unavailable)?,
            self.opts.settings.dedup_ttl.as_millis(),
        );
        self.adds
            .call(NewJob {
                dedup_id: key,
                data,
                opts,
                token,
            })
            .await
    }

    /// `enqueue_now` behind the circuit breaker (see `down_until`).
    async fn enqueue_guarded(
        &self,
        event: &Event,
        token: Option<String>,
    ) -> QueueResult<(char, String)> {
        {
            let down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
            if down.is_some_and(|t| std::time::Instant::now() < t) {
                return Err(unavailable("unreachable (will retry shortly)"));
            }
        }
        let res = self.enqueue_now(event, token).await;
        let mut down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        *down = match &res {
            Err(QueueError::Unavailable(_)) => Some(std::time::Instant::now() + BREAKER_OPEN),
            _ => None,
        };
        res
    }
}

fn delivery_job(id: String, data: &str, atm: &str) -> DeliveryJob {
    let d: JobData = serde_json::from_str(data).unwrap_or_default();
    let body = match d.body {
        Some(Value::String(b)) => b.into_bytes(),
        _ => b"null".to_vec(),
    };
    DeliveryJob {
        id,
        key: EventKey::from_stored(d.event_key),
        event_id: d.event_id,
        bot_id: d.bot_id,
        kind: EventKind::parse(&d.kind).unwrap_or(EventKind::Envelope),
        body,
        attempts_made: atm.parse().unwrap_or(0),
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
-- Deleted 250 jobs (500 keys) per call, not one call per job.
local keys = {}
for i, id in ipairs(ids) do
  keys[#keys + 1] = ARGV[1] .. id
  keys[#keys + 1] = ARGV[1] .. id .. ':logs'
  if #keys == 500 or i == #ids then
    redis.call('DEL', unpack(keys))
    keys = {}
  end
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
        Ok(match self.enqueue_guarded(&event, None).await? {
            ('d', id) => Enqueued::Duplicate(id),
            (_, id) => Enqueued::Accepted(id),
        })
    }

    async fn enqueue_leased(
        &self,
        event: Event,
        _lease: Duration,
    ) -> QueueResult<(Enqueued, Option<Leased>)> {
        // The lock lasts LOCK_DURATION_MS, which is what the handoff asks for.
        let token = self.hot.token();
        let id = match self.enqueue_guarded(&event, Some(token.clone())).await? {
            ('d', id) => return Ok((Enqueued::Duplicate(id), None)),
            // Stored in wait (the queue is paused): no handoff.
            ('a', id) => return Ok((Enqueued::Accepted(id), None)),
            (_, id) => id,
        };
        let job = DeliveryJob::new(id.clone(), event);
        let lease = LeaseRef {
            job_id: id.clone(),
            token,
        };
        Ok((Enqueued::Accepted(id), Some(Leased { job, lease })))
    }

    async fn claim(&self, max: usize, _lease: Duration) -> QueueResult<Claimed> {
        let h = &self.hot;
        let mut call = h.prepare(
            &h.claim,
            &[
                "wait",
                "active",
                "prioritized",
                "events",
                "limiter",
                "delayed",
                "meta",
                "pc",
                "marker",
            ],
        );
        call.arg(super::now_ms())
            .arg(h.lock_ms)
            .arg(max)
            .arg(h.token())
            .arg(&h.worker);
        let (flat, next_due_ms): (Vec<String>, Option<i64>) = h.invoke(&call).await?;
        let mut jobs = Vec::with_capacity(flat.len() / 4);
        let mut it = flat.into_iter();
        while let (Some(id), Some(token), Some(data), Some(atm)) =
            (it.next(), it.next(), it.next(), it.next())
        {
            let job = delivery_job(id.clone(), &data, &atm);
            jobs.push(Leased {
                job,
                lease: LeaseRef { job_id: id, token },
            });
        }
        Ok(Claimed {
            next_due_ms: if jobs.is_empty() { next_due_ms } else { None },
            jobs,
        })
    }

    async fn renew(&self, leases: Vec<LeaseRef>, lease: Duration) -> QueueResult<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let h = &self.hot;
        let mut call = h.prepare(&h.extend, &["stalled"]);
        call.arg(lease.as_millis() as u64);
        for l in &leases {
            call.arg(&l.job_id).arg(&l.token);
        }
        let lost: Vec<String> = h.invoke(&call).await?;
        for id in lost {
            tracing::warn!(job = %id, "lock lost: the job may be taken over by another worker");
        }
        Ok(())
    }

    async fn finish(
        &self,
        leased: Leased,
        attempt: Attempt,
        disposition: Disposition,
    ) -> QueueResult<bool> {
        let line = serde_json::to_string(&attempt).map_err(unavailable)?;
        let (outcome, reason, due_at_ms) = match disposition {
            Disposition::Completed => ("completed", String::new(), 0),
            Disposition::Failed { reason } => ("failed", reason, 0),
            Disposition::RetryAt { due_at_ms, reason } => ("delayed", reason, due_at_ms),
        };
        self.finishes
            .call(Finished {
                attempts_made: leased.job.attempts_made,
                id: leased.lease.job_id,
                token: leased.lease.token,
                outcome,
                line,
                reason,
                due_at_ms,
            })
            .await
    }

    async fn release(&self, leases: Vec<LeaseRef>) -> QueueResult<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let h = &self.hot;
        let mut call = h.prepare(
            &h.release,
            &[
                "active",
                "wait",
                "stalled",
                "prioritized",
                "meta",
                "marker",
                "events",
            ],
        );
        for l in &leases {
            call.arg(&l.job_id).arg(&l.token);
        }
        if let Err(e) = h.invoke::<i64>(&call).await {
            tracing::warn!(error = %e, jobs = leases.len(), "cannot return jobs; they will be taken over when their locks expire");
        }
        Ok(())
    }

    fn durability_risks(&self) -> Vec<(&'static str, bool)> {
        self.risks.clone()
    }

    async fn ping(&self) -> QueueResult<()> {
        self.raw::<String>(&redis::cmd("PING")).await.map(|_| ())
    }

    async fn close(&self) -> QueueResult<()> {
        self.maintenance.abort();
        let _ = bounded(self.stall_checker.close(1000)).await;
        self.queue.close().await;
        self.hot.ingress.close().await;
        Ok(())
    }
}

impl Operate for RedisQueue {
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

    async fn retry_all_failed(&self) -> QueueResult<u64> {
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
}

impl Drop for RedisQueue {
    fn drop(&mut self) {
        self.maintenance.abort();
    }
}
