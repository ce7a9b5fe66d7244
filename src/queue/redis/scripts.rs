//! The hot path's batched scripts (`queue/lua/`): what each job carries to
//! them, the calls, and the pruning of completed jobs.

use super::{
    bounded, settled, unavailable, Arc, BullQueue, DeliveryJob, Duration, Event, EventKey,
    EventKind, JobState, QueueError, QueueResult, RedisConnection, Value, BREAKER_OPEN, JOB_NAME,
    KEEP_LOGS, REDIS_TIMEOUT,
};

/// What the add script did with one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Added {
    /// Stored in wait (no lock asked, or the queue is paused or at its
    /// global concurrency): the dispatcher claims it.
    Waiting(String),
    /// Stored in active, locked with the caller's token (a handoff).
    Locked(String),
    /// The event key was seen within the TTL: the first job's id.
    Duplicate(String),
}

/// Failed jobs moved back per script call by `retry_all_failed` (one call
/// holds Redis for about a millisecond per hundred jobs).
pub(super) const RETRY_BATCH: u64 = 500;

/// A new job for the add script.
pub(super) struct NewJob {
    pub(super) dedup_id: String,
    /// How long its dedup record lasts (`queue::dedup_ttl_ms`).
    pub(super) dedup_ttl_ms: u64,
    pub(super) data: String,
    pub(super) opts: String,
    /// Set: store it locked with this token for this long (a handoff).
    pub(super) lock: Option<(String, u64)>,
    /// An event that may share its key: its botId and own record
    /// (`Event::key_sharer`).
    pub(super) sharer: Option<(String, String)>,
}

/// A finished attempt for the finish script.
pub(super) struct Finished {
    pub(super) id: String,
    pub(super) token: String,
    /// Where the job goes (`Disposition::state`).
    pub(super) state: JobState,
    pub(super) line: String,
    pub(super) reason: String,
    pub(super) due_at_ms: i64,
    /// Finished attempts before this one.
    pub(super) attempts_made: u32,
}

/// The job data of a new job (see [`JobData`]).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct NewJobData<'a> {
    pub(super) event_key: &'a str,
    pub(super) event_id: &'a str,
    pub(super) bot_id: Option<&'a str>,
    #[serde(rename = "type")]
    pub(super) event_type: Option<&'a str>,
    pub(super) kind: &'a str,
    pub(super) body: &'a str,
    /// Left out by the routed add, which puts each job's own in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) destination: Option<&'a str>,
    pub(super) created_at_ms: i64,
}

/// The job data, as stored in the job hash's `data` field.
#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct JobData {
    #[serde(default)]
    pub(super) event_key: String,
    #[serde(default)]
    pub(super) event_id: String,
    #[serde(default)]
    pub(super) bot_id: Option<String>,
    #[serde(default)]
    pub(super) kind: String,
    /// The exact JSON text to deliver. Jobs added by other producers may hold
    /// something else here; they deliver `null`.
    #[serde(default)]
    pub(super) body: Option<Value>,
    #[serde(default)]
    pub(super) created_at_ms: Option<i64>,
}

/// The batched scripts (see the module doc), their keys and a connection.
pub(super) struct BatchedScripts {
    pub(super) conn: RedisConnection,
    /// A second connection, for adds only: an acknowledgement then waits for
    /// its own batch, not behind the delivery side's replies on one pipeline
    /// (the relay's; a tool's is `conn`).
    pub(super) ingress: RedisConnection,
    pub(super) prefix: String,
    pub(super) worker: String,
    pub(super) clock: crate::time::Clock,
    /// Lock tokens: this process's random id and a counter (BullMQ's shape,
    /// `<id>:<n>`), so a token costs no call for random bytes.
    pub(super) token_base: String,
    pub(super) tokens: std::sync::atomic::AtomicU64,
    pub(super) add: redis::Script,
    pub(super) claim: redis::Script,
    pub(super) finish: redis::Script,
    pub(super) extend: redis::Script,
    pub(super) release: redis::Script,
    pub(super) retry_failed: redis::Script,
    pub(super) stalled: redis::Script,
    pub(super) remove: redis::Script,
    /// The adds' circuit breaker.
    pub(super) breaker: Breaker,
    /// Warnings of a key a tool broke, which come at each finish (or each
    /// stalled check) until it is mended: at most one a period per queue.
    pub(super) finish_warned: Throttle,
    pub(super) stalled_warned: Throttle,
}

/// Lets a repeated warning through at most once per `every_ms` of a clock
/// that never goes back (`Clock::mono_ms`; the rest go to debug).
pub(super) struct Throttle {
    every_ms: i64,
    last_ms: std::sync::atomic::AtomicI64,
}

impl Throttle {
    pub(super) const fn every(every_ms: i64) -> Self {
        Throttle {
            every_ms,
            last_ms: std::sync::atomic::AtomicI64::new(i64::MIN / 2),
        }
    }

    /// Whether this one, at `now` (ms), goes out.
    pub(super) fn due(&self, now: i64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last_ms.load(Relaxed);
        now - last >= self.every_ms
            && self
                .last_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}

impl BatchedScripts {
    pub(super) fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// A lock token no other lock of this process or another has.
    pub(super) fn token(&self) -> String {
        let n = self
            .tokens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}:{n}", self.token_base)
    }

    /// A call of `script` with these queue keys and the key prefix as ARGV[1]
    /// (the order every script in `lua/` expects).
    pub(super) fn prepare<'a>(
        &self,
        script: &'a redis::Script,
        keys: &[&str],
    ) -> redis::ScriptInvocation<'a> {
        let mut call = script.prepare_invoke();
        for k in keys {
            call.key(self.key(k));
        }
        call.arg(&self.prefix);
        call
    }

    pub(super) async fn invoke<T: redis::FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> QueueResult<T> {
        self.invoke_on(&self.conn, call).await
    }

    pub(super) async fn invoke_on<T: redis::FromRedisValue>(
        &self,
        on: &RedisConnection,
        call: &redis::ScriptInvocation<'_>,
    ) -> QueueResult<T> {
        let mut conn = on.connection();
        bounded(call.invoke_async::<T>(&mut conn)).await
    }

    /// A call of an add script, whose outcome sets the breaker ([`Breaker`])
    /// before it returns: before the next batch of adds goes.
    pub(super) async fn invoke_add<T: redis::FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> QueueResult<T> {
        let mut conn = self.ingress.connection();
        let res = tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async::<T>(&mut conn)).await;
        self.breaker.record(match &res {
            Ok(Ok(_)) => false,
            Ok(Err(e)) => redis_down(e),
            Err(_) => true,
        });
        settled(res)
    }

    pub(super) async fn add(
        &self,
        jobs: Vec<NewJob>,
        dedup_ttl_ms: u64,
    ) -> QueueResult<Vec<Added>> {
        let mut call = self.prepare(
            &self.add,
            &["wait", "active", "meta", "id", "events", "marker"],
        );
        call.arg(self.clock.now_ms())
            .arg(dedup_ttl_ms)
            .arg(JOB_NAME)
            .arg(&self.worker);
        for j in &jobs {
            call.arg(&j.dedup_id)
                .arg(&j.data)
                .arg(&j.opts)
                .arg(j.lock.as_ref().map_or("", |(token, _)| token.as_str()))
                .arg(j.lock.as_ref().map_or(0, |(_, ms)| *ms))
                .arg(j.sharer.as_ref().map_or("", |(bot, _)| bot.as_str()))
                .arg(j.sharer.as_ref().map_or("", |(_, own)| own.as_str()))
                .arg(j.dedup_ttl_ms);
        }
        let out: Vec<(String, String)> = self.invoke_add(&call).await?;
        Ok(out
            .into_iter()
            .map(|(kind, id)| match kind.as_str() {
                "d" => Added::Duplicate(id),
                "l" => Added::Locked(id),
                _ => Added::Waiting(id),
            })
            .collect())
    }

    /// Per job: done, or the lock was not the caller's any more (false), or
    /// refused (the set a failure or a retry goes to is of another type:
    /// nothing of it written, its lock kept). What could not be written of
    /// jobs that are done (a key a tool broke) is logged.
    pub(super) async fn finish(&self, jobs: Vec<Finished>) -> QueueResult<Vec<QueueResult<bool>>> {
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
        call.arg(self.clock.now_ms()).arg(KEEP_LOGS);
        for j in &jobs {
            call.arg(&j.id)
                .arg(&j.token)
                .arg(j.state.as_str())
                .arg(&j.line)
                .arg(&j.reason)
                .arg(j.due_at_ms)
                .arg(j.attempts_made + 1);
        }
        let (out, late): (Vec<redis::Value>, Option<String>) = self.invoke(&call).await?;
        if let Some(late) = late {
            if self.finish_warned.due(self.clock.mono_ms()) {
                tracing::warn!(queue = %self.prefix, "a finish could not write all it should (logged once in 10 s): {late}");
            } else {
                tracing::debug!(queue = %self.prefix, "{late}");
            }
        }
        Ok(out
            .into_iter()
            .map(|d| match d {
                redis::Value::Int(d) => Ok(d == 1),
                why => Err(QueueError::Unavailable(
                    redis::from_redis_value::<String>(why)
                        .unwrap_or_else(|e| format!("a finish answered {e}")),
                )),
            })
            .collect())
    }
}

/// `Event::key_sharer`, owned (for the add scripts' arguments).
pub(super) fn sharer(event: &Event) -> Option<(String, String)> {
    event
        .key_sharer()
        .map(|k| (k.bot.to_string(), k.own_record()))
}

impl BullQueue {
    /// The dedup id, `data` and `opts` of a new job for `event`, and how
    /// long its dedup record lasts (`queue::dedup_ttl_ms`), from one read of
    /// the clock.
    pub(super) fn job_fields(
        &self,
        event: &Event,
        destination: Option<&str>,
    ) -> QueueResult<(String, String, String, u64)> {
        let now = self.hot.clock.now_ms();
        let ttl_ms = crate::queue::dedup_ttl_ms(self.opts.settings.dedup_ttl, event, now);
        let key = event.key.as_str();
        let body = std::str::from_utf8(&event.body)
            .map_err(|_| QueueError::Unavailable("payload is not UTF-8".into()))?;
        let data = serde_json::to_string(&NewJobData {
            event_key: key,
            event_id: &event.event_id,
            bot_id: event.bot_id.as_deref(),
            event_type: event.event_type.as_deref(),
            kind: event.kind.as_str(),
            body,
            destination,
            created_at_ms: now,
        })
        .map_err(unavailable)?;
        // The options BullMQ would store for this job (`opts` field).
        let opts = format!(
            r#"{{"removeOnComplete":{},"removeOnFail":false,"keepLogs":{KEEP_LOGS},"de":{{"id":{},"ttl":{}}}}}"#,
            self.opts.settings.remove_on_complete,
            serde_json::to_string(key).map_err(unavailable)?,
            ttl_ms,
        );
        Ok((key.to_string(), data, opts, ttl_ms))
    }

    /// Adds the job (see [`Added`]).
    pub(super) async fn enqueue_now(
        &self,
        event: &Event,
        destination: &str,
        lock: Option<(String, u64)>,
    ) -> QueueResult<Added> {
        let (key, data, opts, dedup_ttl_ms) = self.job_fields(event, Some(destination))?;
        self.adds
            .call(NewJob {
                dedup_ttl_ms,
                dedup_id: key,
                data,
                opts,
                lock,
                sharer: sharer(event),
            })
            .await
    }

    /// `enqueue_now` behind the circuit breaker ([`Breaker`]).
    pub(super) async fn enqueue_guarded(
        &self,
        event: &Event,
        destination: &str,
        lock: Option<(String, u64)>,
    ) -> QueueResult<Added> {
        self.hot
            .breaker
            .guarded(self.enqueue_now(event, destination, lock))
            .await
    }
}

/// Whether an add's error means Redis cannot take adds now: no answer, a lost
/// or refused connection, a Redis loading, read-only (a failover), out of
/// memory, unable to persist, short of replicas, busy with a script, asking
/// for a password. An error the script met in its keys (a tool's data:
/// `ERR`, `WRONGTYPE`) is not: Redis answered, and it is that batch's alone,
/// not every destination's.
fn redis_down(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    const DOWN: [&str; 6] = ["OOM", "MISCONF", "BUSY", "NOREPLICAS", "NOAUTH", "READONLY"];
    match e.kind() {
        // Before Redis 7, a command's refusal inside a script came back as
        // `ERR Error running script ... -OOM command not allowed ...`.
        ErrorKind::Server(ServerErrorKind::ResponseError) => e.detail().is_some_and(|d| {
            d.starts_with("max number of clients reached")
                || (d.starts_with("Error running script")
                    && DOWN.iter().any(|code| d.contains(&format!("-{code} "))))
        }),
        ErrorKind::Extension => e.code().is_some_and(|code| DOWN.contains(&code)),
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => false,
        _ => true,
    }
}

/// The ingress's circuit breaker over one Redis: after an add fails for
/// want of Redis, adds are refused at once for [`BREAKER_OPEN`] (a fast 503
/// rather than one timeout per request), then Redis is tried again. The
/// batches of adds look at it, and a batch's outcome sets it before the next
/// batch goes: those queued behind a hung one fail with it, rather than
/// each waiting out the bound in turn.
#[derive(Default)]
pub(super) struct Breaker(std::sync::Mutex<Option<std::time::Instant>>);

impl Breaker {
    /// Unavailable while open.
    pub(super) fn check(&self) -> QueueResult<()> {
        let open = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| std::time::Instant::now() < until);
        if open {
            return Err(unavailable("unreachable (will retry shortly)"));
        }
        Ok(())
    }

    /// An add's outcome: a failure for want of Redis (`redis_down`) opens
    /// it (one open keeps its end: refusals do not hold it open), an answer
    /// closes it, an error in the script's keys too (Redis answered).
    pub(super) fn record(&self, redis_down: bool) {
        let mut down = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        *down = if redis_down {
            Some(
                down.filter(|&until| now < until)
                    .unwrap_or(now + BREAKER_OPEN),
            )
        } else {
            None
        };
    }

    /// An ingest's add `op` behind it: while it is open, Unavailable at once.
    /// Its batch records the outcome (once, in the order batches end; a
    /// request's own late record could open it after a later batch closed
    /// it).
    pub(super) async fn guarded<T>(
        &self,
        op: impl std::future::Future<Output = QueueResult<T>>,
    ) -> QueueResult<T> {
        self.check()?;
        op.await
    }
}

/// A claimed job from its hash's `data` and `atm`, and whether it has an
/// ordered key (`cg:ok`).
pub(super) fn delivery_job(id: String, data: &str, atm: &str, ordered: bool) -> DeliveryJob {
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
        kind: EventKind::from_stored(&d.kind),
        body,
        attempts_made: atm.parse().unwrap_or(0),
        created_at_ms: d.created_at_ms,
        probe: None,
        ordered,
    }
}

/// Removes the oldest completed jobs beyond `ARGV[2]` (at most `ARGV[3]` per
/// call): their hash and log, and their entry in the completed set. Dedup keys
/// are left alone on purpose: they must outlive the job for `DEDUP_TTL_SECS`.
pub(super) const PRUNE_COMPLETED_LUA: &str = include_str!("../lua/prune.lua");

/// The relay's upkeep of one queue: keeps the newest `keep` completed jobs
/// (once a second), and puts back in wait the jobs of a relay that died
/// (every half lease, at least a second apart). Work-around: in manual mode
/// bullmq-official 1.4.4's `move_to_completed` sends `keepJobs {count: -1}`
/// (keep all) whatever the job's `removeOnComplete` says. Several relays may
/// run this at once; each call is atomic and idempotent.
pub(super) async fn upkeep(hot: Arc<BatchedScripts>, keep: i64, lock_ms: u64) {
    let prefix = hot.prefix.clone();
    let script = redis::Script::new(PRUNE_COMPLETED_LUA);
    let stalled_every = Duration::from_millis((lock_ms / 2).max(1000));
    let mut last_stalled = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut conn = hot.conn.connection();
        let mut call = script.key(format!("{prefix}completed"));
        call.arg(&prefix).arg(keep).arg(5000);
        match tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "pruning completed jobs"),
            Err(_) => tracing::debug!("pruning completed jobs: timed out"),
        }
        if last_stalled.elapsed() >= stalled_every {
            last_stalled = std::time::Instant::now();
            if let Err(e) = hot.put_back_stalled().await {
                // (a key a tool broke, or Redis down: at each look)
                if hot.stalled_warned.due(hot.clock.mono_ms()) {
                    tracing::warn!(queue = %prefix, error = %e, "the check for stalled jobs failed: it puts back the jobs of a relay that died and lets parked ordered jobs go (the error says which; checked again every half lease, logged once a minute)");
                } else {
                    tracing::debug!(error = %e, "checking for stalled jobs");
                }
            }
        }
    }
}

impl BatchedScripts {
    /// Puts back in wait the active jobs whose lock expired (their relay
    /// died); how many.
    pub(super) async fn put_back_stalled(&self) -> QueueResult<u64> {
        let call = self.prepare(
            &self.stalled,
            &["active", "wait", "stalled", "meta", "marker", "events"],
        );
        let (n, stopped): (u64, Option<String>) = self.invoke(&call).await?;
        if n > 0 {
            tracing::warn!(stalled = n, "locks expired; jobs taken over");
        }
        match stopped {
            Some(why) => Err(QueueError::Unavailable(why)),
            None => Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redis_down;

    /// The error Redis answers `reply` with (a RESP error line).
    fn answered(reply: &str) -> redis::RedisError {
        match redis::parse_redis_value(format!("-{reply}\r\n").as_bytes()) {
            Ok(redis::Value::ServerError(e)) => e.into(),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn a_throttled_warning_goes_out_once_a_period() {
        let t = super::Throttle::every(60_000);
        assert!(t.due(0), "the first");
        assert!(!t.due(59_999), "the next, within the period");
        assert!(t.due(60_000), "a period later");
    }

    #[test]
    fn only_a_redis_that_cannot_take_adds_is_down() {
        for reply in [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "READONLY You can't write against a read only replica.",
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
            "NOREPLICAS Not enough good replicas to write.",
            "BUSY Redis is busy running a script.",
            "LOADING Redis is loading the dataset in memory",
            "NOAUTH Authentication required.",
            "ERR Error running script (call to f_1): @user_script:12: @user_script: 12: -OOM command not allowed when used memory > 'maxmemory'. ",
            "ERR max number of clients reached",
        ] {
            assert!(redis_down(&answered(reply)), "{reply}");
        }
        for reply in [
            "ERR user_script:43: attempt to compare nil with number script: 92ad, on @user_script:43.",
            "WRONGTYPE Operation against a key holding the wrong kind of value script: 92ad, on @user_script:120.",
            "ERR the queue has a concurrency of \"Error running script -OOM x\" in its meta, not a number",
        ] {
            assert!(!redis_down(&answered(reply)), "{reply}");
        }
        let lost =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(redis_down(&lost));
    }
}
