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
//! with `DEDUP_TTL_SECS`), so the same event sent to two relays is one job;
//! an envelope that may share its key with another (`Event::key_sharer`)
//! is told apart by the botId kept beside it (`cg:deb:<eventKey>`,
//! `lua/dedup.lua`).
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
use std::sync::Arc;
use std::time::Duration;

use bullmq as bull;
use bullmq::redis_connection::RedisConnection;
use serde_json::Value;

use super::batch::Batcher;
use super::{
    Attempt, Claimed, Counts, DeliveryJob, Disposition, JobRef, JobState, JobView, LeaseRef,
    Leased, Page, Queue, QueueError, QueueResult, QueueSettings, Routed,
};
use crate::event::{DestinationName, Event, EventKey, EventKind};

pub const JOB_NAME: &str = "deliver-event";
/// Upper bound on one Redis operation, so Redis trouble becomes a quick 503.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempt-history lines kept per job.
const KEEP_LOGS: u32 = 100;

#[derive(Clone)]
pub struct RedisOptions {
    pub url: String,
    /// PEM of a CA to trust besides the web PKI roots (`rediss://` only).
    pub ca_pem: Option<Vec<u8>>,
    pub queue_name: String,
    pub lock_duration: Duration,
    pub settings: QueueSettings,
    /// The destination whose jobs this queue holds (`default` for
    /// `QUEUE_NAME` itself; see `routed.rs`).
    pub destination: DestinationName,
    /// Where the relay's side reads the time (due times, creation times);
    /// leases and dedup records expire on Redis's own clock.
    pub clock: crate::time::Clock,
    /// The relay's open: it keeps the queue up (prunes completed jobs, puts
    /// back the jobs of a relay that died); a tool's open writes nothing by
    /// itself.
    pub relay: bool,
}

/// Every field, the URL's password masked.
impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &crate::secret::RedactedUrlText(&self.url))
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("queue_name", &self.queue_name)
            .field("lock_duration", &self.lock_duration)
            .field("settings", &self.settings)
            .field("destination", &self.destination)
            .field("clock", &self.clock)
            .field("relay", &self.relay)
            .finish()
    }
}

/// Most jobs in one batched script call.
const MAX_BATCH: usize = 256;

/// The BullMQ queue of one destination (`bull:<QUEUE_NAME>[:<destination>]:*`),
/// private to this backend: the relay and the tools use [`RedisQueues`],
/// which routes to one of these per destination.
pub(crate) struct BullQueue {
    /// The connection every read and script of this queue goes through.
    conn: RedisConnection,
    /// The BullMQ port's queue, for the operators' writes done its way
    /// (retry, remove, pause): made at the first one, since making it
    /// writes the queue's meta (a tool that reads writes nothing).
    port: tokio::sync::OnceCell<bull::Queue>,
    hot: Arc<BatchedScripts>,
    adds: Batcher<NewJob, Added>,
    finishes: Batcher<Finished, QueueResult<bool>>,
    opts: RedisOptions,
    /// The relay's upkeep of the queue (see `upkeep`): none for a tool.
    maintenance: Option<tokio::task::JoinHandle<()>>,
    /// What `INFO` said at start-up (see [`durability`]).
    risks: Vec<(&'static str, bool)>,
}

impl std::fmt::Debug for BullQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BullQueue")
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
    settled(tokio::time::timeout(REDIS_TIMEOUT, fut).await)
}

/// A call's outcome within [`REDIS_TIMEOUT`], as [`bounded`] answers it.
fn settled<T, E: std::fmt::Display>(
    res: Result<Result<T, E>, tokio::time::error::Elapsed>,
) -> QueueResult<T> {
    match res {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable("no answer within 2 s")),
    }
}

/// Whether this Redis keeps what it acknowledged, from `INFO` (which managed
/// services allow where `CONFIG GET` is disabled): without AOF, a 200 is lost
/// if Redis stops before its next snapshot; with a `maxmemory-policy` other
/// than `noeviction`, a full Redis may evict queued jobs. One WARN line each.
async fn durability(queue: &RedisConnection) -> Vec<(&'static str, bool)> {
    let mut conn = queue.connection();
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

mod inspect;
mod routed;
mod scripts;
mod targets;

pub use routed::{limit_shape, queue_name, RedisQueues, MAX_RATE_LIMIT};
pub use targets::TargetConflict;

use scripts::*;

impl BullQueue {
    pub async fn connect(opts: RedisOptions) -> Result<Self, QueueError> {
        first_connection(&opts).await?;
        let lock_ms = opts.lock_duration.as_millis() as u64;
        let conn = bounded(RedisConnection::new_managed_only(&connection(&opts))).await?;
        let keep_completed = i64::from(opts.settings.remove_on_complete);
        // The relay's adds go over a connection of their own (see the module doc).
        let ingress = if opts.relay {
            bounded(RedisConnection::new_managed_only(&connection(&opts))).await?
        } else {
            conn.clone()
        };
        let prefix = bull::QueueKeys::new(&opts.queue_name, Some("bull"))
            .key_prefix()
            .to_string();
        let hot = Arc::new(BatchedScripts {
            ingress,
            conn: conn.clone(),
            prefix,
            worker: format!("cogrelay-{}", std::process::id()),
            clock: opts.clock.clone(),
            token_base: uuid::Uuid::new_v4().to_string(),
            tokens: std::sync::atomic::AtomicU64::new(0),
            add: redis::Script::new(concat!(
                include_str!("../lua/dedup.lua"),
                include_str!("../lua/check.lua"),
                include_str!("../lua/add.lua")
            )),
            claim: redis::Script::new(concat!(
                include_str!("../lua/check.lua"),
                include_str!("../lua/claim.lua")
            )),
            finish: redis::Script::new(concat!(
                include_str!("../lua/order.lua"),
                include_str!("../lua/check.lua"),
                include_str!("../lua/finish.lua")
            )),
            extend: redis::Script::new(include_str!("../lua/extend.lua")),
            release: redis::Script::new(concat!(
                include_str!("../lua/check.lua"),
                include_str!("../lua/release.lua")
            )),
            retry_failed: redis::Script::new(concat!(
                include_str!("../lua/check.lua"),
                include_str!("../lua/retry_failed.lua")
            )),
            stalled: redis::Script::new(concat!(
                include_str!("../lua/order.lua"),
                include_str!("../lua/check.lua"),
                include_str!("../lua/stalled.lua")
            )),
            remove: redis::Script::new(concat!(
                include_str!("../lua/order.lua"),
                include_str!("../lua/check.lua"),
                include_str!("../lua/remove.lua")
            )),
            breaker: Breaker::default(),
            finish_warned: scripts::Throttle::every(10_000),
            stalled_warned: scripts::Throttle::every(60_000),
        });
        let ttl_ms = opts.settings.dedup_ttl.as_millis() as u64;
        let h = hot.clone();
        let adds = Batcher::spawn(MAX_BATCH, move |jobs| {
            let h = h.clone();
            async move {
                h.breaker.check()?;
                h.add(jobs, ttl_ms).await
            }
        });
        let h = hot.clone();
        let finishes = Batcher::spawn(MAX_BATCH, move |jobs| {
            let h = h.clone();
            async move { h.finish(jobs).await }
        });
        let maintenance = opts
            .relay
            .then(|| tokio::spawn(upkeep(hot.clone(), keep_completed, lock_ms)));
        Ok(Self {
            maintenance,
            // Once a relay: its `QUEUE_NAME` queue's (the others' share its Redis).
            risks: if opts.destination.is_default() {
                durability(&conn).await
            } else {
                Vec::new()
            },
            conn,
            port: tokio::sync::OnceCell::new(),
            hot,
            adds,
            finishes,
            opts,
        })
    }

    /// The port's queue (see `port`), made at the first write through it.
    async fn port(&self) -> QueueResult<&bull::Queue> {
        self.port
            .get_or_try_init(|| async {
                bounded(bull::Queue::with_connection(
                    &self.opts.queue_name,
                    self.conn.clone(),
                    bull::QueueOptions::new(),
                ))
                .await
            })
            .await
    }
}

/// How long the ingress fails fast after a Redis failure.
const BREAKER_OPEN: Duration = Duration::from_millis(500);

/// One destination's BullMQ queue. Not the queue contract: [`RedisQueues`]
/// keeps that, routing each destination's calls to its own queue (and
/// storing an event for several destinations with one script over all of
/// theirs), so nothing here takes a destination.
impl BullQueue {
    /// Stores `event` for this queue's destination (the `default` one of a
    /// relay without others: BullMQ's own add, as before destinations).
    pub(super) async fn store(
        &self,
        event: Event,
        lease: Option<Duration>,
    ) -> QueueResult<(Routed, Vec<Leased>)> {
        let destination = &self.opts.destination;
        let token = lease.map(|_| self.hot.token());
        let lock = token.clone().zip(lease.map(|l| l.as_millis() as u64));
        let added = self.enqueue_guarded(&event, destination, lock).await?;
        let job = |id: &str| JobRef {
            destination: destination.clone(),
            id: id.to_string(),
        };
        Ok(match (added, token) {
            // A dedup record written by a relay with several destinations
            // names each job (`destination=id,...`).
            (Added::Duplicate(text), _) if text.contains('=') => (
                Routed {
                    duplicate: true,
                    jobs: super::parse_jobs_text(&text),
                },
                Vec::new(),
            ),
            (Added::Duplicate(id), _) => (
                Routed {
                    duplicate: true,
                    jobs: vec![job(&id)],
                },
                Vec::new(),
            ),
            (Added::Locked(id), Some(token)) => {
                let mut delivery = DeliveryJob::new(id.clone(), event);
                delivery.created_at_ms = Some(self.hot.clock.now_ms());
                let leased = Leased {
                    job: delivery,
                    lease: LeaseRef {
                        job_id: id.clone(),
                        token,
                        destination: destination.clone(),
                    },
                };
                (
                    Routed {
                        duplicate: false,
                        jobs: vec![job(&id)],
                    },
                    vec![leased],
                )
            }
            // Stored in wait (no lease asked, or the queue is paused or at
            // its global concurrency): no handoff.
            (Added::Waiting(id) | Added::Locked(id), _) => (
                Routed {
                    duplicate: false,
                    jobs: vec![job(&id)],
                },
                Vec::new(),
            ),
        })
    }

    pub(super) async fn claim(
        &self,
        max: usize,
        lease: Duration,
        order: super::ClaimOrder,
    ) -> QueueResult<Claimed> {
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
        call.arg(h.clock.now_ms())
            .arg(lease.as_millis() as u64)
            .arg(max)
            .arg(h.token())
            .arg(&h.worker)
            .arg(match order {
                super::ClaimOrder::Due => "due",
                super::ClaimOrder::Trials => "trials",
            })
            .arg(super::CIRCUIT_TRIALS);
        // {jobs, next, probe, paused[, circuit]}: Lua drops a trailing nil.
        let reply: Vec<redis::Value> = h.invoke(&call).await?;
        let at = |i: usize| reply.get(i).cloned().unwrap_or(redis::Value::Nil);
        let flat: Vec<String> = redis::from_redis_value(at(0)).map_err(unavailable)?;
        let next_due_ms: Option<i64> = redis::from_redis_value(at(1)).unwrap_or(None);
        let probe: i64 = redis::from_redis_value(at(2)).unwrap_or(0);
        let paused: i64 = redis::from_redis_value(at(3)).unwrap_or(0);
        let circuit: Option<i64> = redis::from_redis_value(at(4)).unwrap_or(None);
        let mut jobs = Vec::with_capacity(flat.len() / 5);
        let mut it = flat.into_iter();
        while let (Some(id), Some(token), Some(data), Some(atm), Some(ordered)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        {
            let mut job = delivery_job(id.clone(), &data, &atm, ordered == "1");
            job.probe = (probe > 0).then(|| Duration::from_millis(probe as u64));
            jobs.push(Leased {
                job,
                lease: LeaseRef {
                    job_id: id,
                    token,
                    destination: self.opts.destination.clone(),
                },
            });
        }
        Ok(Claimed {
            // With jobs, a next time is the rate limit's: claim again then.
            next_due_ms,
            jobs,
            paused: paused == 1,
            circuit_open_for_ms: circuit,
        })
    }

    pub(super) async fn renew(&self, leases: Vec<LeaseRef>, lease: Duration) -> QueueResult<()> {
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

    pub(super) async fn finish(
        &self,
        leased: Leased,
        attempt: Attempt,
        disposition: Disposition,
    ) -> QueueResult<bool> {
        let line = serde_json::to_string(&attempt).map_err(unavailable)?;
        let state = disposition.state();
        let due_at_ms = match disposition {
            Disposition::RetryAt { due_at_ms, .. } => due_at_ms,
            Disposition::Completed | Disposition::Failed { .. } => 0,
        };
        let reason = disposition.reason().unwrap_or_default().to_string();
        self.finishes
            .call(Finished {
                attempts_made: leased.job.attempts_made,
                id: leased.lease.job_id,
                token: leased.lease.token,
                state,
                line,
                reason,
                due_at_ms,
            })
            .await?
    }

    pub(super) async fn release(&self, leases: Vec<LeaseRef>) -> QueueResult<()> {
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

    pub(super) fn durability_risks(&self) -> Vec<(&'static str, bool)> {
        self.risks.clone()
    }

    pub(super) async fn ping(&self) -> QueueResult<()> {
        self.raw::<String>(&redis::cmd("PING")).await.map(|_| ())
    }

    pub(super) async fn is_paused(&self) -> QueueResult<bool> {
        let paused: Option<String> = self
            .raw(redis::cmd("HGET").arg(self.hot.key("meta")).arg("paused"))
            .await?;
        Ok(paused.is_some())
    }

    pub(super) async fn check_stalled(&self) -> QueueResult<u64> {
        self.hot.put_back_stalled().await
    }

    pub(super) async fn close(&self) -> QueueResult<()> {
        if let Some(m) = &self.maintenance {
            m.abort();
        }
        self.conn.close().await;
        self.hot.ingress.close().await;
        Ok(())
    }
}

impl Drop for BullQueue {
    fn drop(&mut self) {
        if let Some(m) = &self.maintenance {
            m.abort();
        }
    }
}
