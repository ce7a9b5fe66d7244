//! The queue contract: the handful of operations the relay needs, and the job
//! states every backend shares (named as BullMQ names them).
//!
//! Life of a job:
//!
//! ```text
//!   store ──> waiting ──claim──> active ──finish(Completed)──> completed (pruned)
//!                ^                 │  └──finish(Failed)──────> failed (dead letter)
//!                │                 └──finish(RetryAt)──> delayed ──(due)──┐
//!                ├── lease expired (stalled: attempt not counted) <───────┤
//!                └── retry (operator), release (shutdown)          claim ─┘
//! ```
//!
//! Rules every backend keeps (and `tests/it/queue_conformance.rs` checks):
//! * `store` returns only once the jobs are durable; an event key seen within
//!   the dedup TTL returns the first jobs' ids, marked `duplicate`.
//! * `claim_for` leases due jobs (waiting, or delayed whose due time has passed) and
//!   takes over active jobs whose lease expired, without counting their attempt.
//! * `finish` and `release` take the lease by value and apply only while that
//!   lease is still the job's: a late answer from a stalled attempt changes nothing.
//! * `attempts_made` counts finished attempts; attempt n is delivered with
//!   `X-Delivery-Attempt: n = attempts_made + 1`.

mod batch;
pub mod embedded;
pub mod redis;
mod store;

pub use store::{open, OpenError, Opener, QueueKind, Store, StoreSettings};

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use crate::event::{Attempt, AttemptOutcome};
use crate::event::{Event, EventKey, EventKind};
pub use crate::time::now_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Waiting,
    Active,
    Delayed,
    Completed,
    Failed,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Waiting,
        JobState::Active,
        JobState::Delayed,
        JobState::Completed,
        JobState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Active => "active",
            JobState::Delayed => "delayed",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The rule of `retry`: only a failed job can be retried.
    pub fn check_retry(self, id: &str) -> QueueResult<()> {
        match self {
            JobState::Failed => Ok(()),
            state => Err(QueueError::WrongState {
                id: id.to_string(),
                state: state.as_str(),
                hint: "only failed jobs can be retried",
            }),
        }
    }

    /// The rule of `remove`: a job being delivered cannot be removed.
    pub fn check_remove(self, id: &str) -> QueueResult<()> {
        match self {
            JobState::Active => Err(QueueError::WrongState {
                id: id.to_string(),
                state: self.as_str(),
                hint: "a job being delivered cannot be removed; try again when it has finished",
            }),
            _ => Ok(()),
        }
    }
}

pub use crate::event::DestinationName;

/// Where one job of an event goes: its destination, and the key that
/// destination delivers in order, if it is ordered and the event has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub destination: DestinationName,
    pub order: Option<OrderKey>,
}

impl From<DestinationName> for Recipient {
    /// An unordered job.
    fn from(destination: DestinationName) -> Self {
        Recipient {
            destination,
            order: None,
        }
    }
}

/// The key an ordered destination delivers a job in order by (SPEC §7,
/// `ordering = "session"`): of one destination's jobs with one key, only the
/// first unfinished one (stored first) may be claimed or handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderKey {
    pub key: String,
    /// `on_failure = "hold"`: once failed, the job keeps holding its key's
    /// later jobs until an operator retries or removes it.
    pub hold: bool,
}

/// Held keys read per destination at most, for the admin API, `/metrics`
/// and the command line.
pub const HELD_KEYS_SHOWN: u64 = 1000;

/// A key an ordered destination holds (`on_failure = "hold"`): its failed
/// job, which holds every later job of the key until an operator retries or
/// removes it, and since when (unix ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldKey {
    pub key: String,
    pub job_id: String,
    pub since_ms: i64,
}

/// One job of an event: which destination it is for, and its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobRef {
    pub destination: DestinationName,
    pub id: String,
}

/// What [`Queue::store`] did with an event: its jobs, one per destination in
/// the order asked, or, for an event key seen within the dedup TTL, the first
/// event's jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub duplicate: bool,
    pub jobs: Vec<JobRef>,
}

/// How long an event's dedup record lasts, in ms: `ttl` from now, or from
/// its envelope's `timestamp` when that is ahead of now. The replay window
/// admits an envelope dated up to 5 minutes ahead for `ttl` after its date
/// (SPEC §3.1), so a record kept `ttl` from now lapsed while a resend of it
/// was still admitted, and that resend became a new job. 0 stays 0 (no
/// deduplication).
pub(crate) fn dedup_ttl_ms(ttl: Duration, event: &Event, now_ms: i64) -> u64 {
    let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if ttl == 0 {
        return 0;
    }
    let ahead = event.timestamp_ms.map_or(0, |ts| {
        u64::try_from(ts.saturating_sub(now_ms)).unwrap_or(0)
    });
    ttl.saturating_add(ahead)
}

/// The `destination=id,...` form the stores keep a deduplicated event's jobs in.
pub(crate) fn jobs_text(jobs: &[JobRef]) -> String {
    let parts: Vec<String> = jobs
        .iter()
        .map(|j| format!("{}={}", j.destination, j.id))
        .collect();
    parts.join(",")
}

/// The inverse of [`jobs_text`] (destination names hold no `=` or `,`).
pub(crate) fn parse_jobs_text(text: &str) -> Vec<JobRef> {
    text.split(',')
        .filter_map(|part| part.split_once('='))
        .map(|(destination, id)| JobRef {
            destination: DestinationName::known(destination),
            id: id.to_string(),
        })
        .collect()
}

/// Proof that this worker holds a job's lease. Not `Clone` on purpose: finishing
/// or releasing consumes it, so a job cannot be acknowledged twice by one worker.
#[derive(Debug)]
pub struct Leased {
    pub job: DeliveryJob,
    pub lease: LeaseRef,
}

impl Leased {
    /// The lease and the job without its body (what finishing needs), for
    /// asking the store again when it could not take a result.
    pub fn clone_without_body(&self) -> Leased {
        let j = &self.job;
        Leased {
            lease: self.lease.clone(),
            job: DeliveryJob {
                id: j.id.clone(),
                key: j.key.clone(),
                event_id: j.event_id.clone(),
                bot_id: j.bot_id.clone(),
                kind: j.kind,
                body: Vec::new(),
                attempts_made: j.attempts_made,
                created_at_ms: j.created_at_ms,
                probe: j.probe,
                ordered: j.ordered,
            },
        }
    }
}

/// The identity of a lease, for renewal and for returning it at shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    pub job_id: String,
    pub token: String,
    /// Whose job it is (on Redis: which BullMQ queue holds it).
    pub destination: DestinationName,
}

/// What a worker needs to deliver one job.
#[derive(Debug, Clone)]
pub struct DeliveryJob {
    pub id: String,
    pub key: EventKey,
    pub event_id: String,
    pub bot_id: Option<String>,
    pub kind: EventKind,
    pub body: Vec<u8>,
    /// Finished attempts so far; this delivery is attempt `attempts_made + 1`.
    pub attempts_made: u32,
    /// When it was stored (unix ms); `None` for a job of an older version
    /// (on Redis), which no age limit applies to.
    pub created_at_ms: Option<i64>,
    /// Claimed as the probe of a circuit shared by every relay (Redis), with
    /// the cool-down in force: its result closes the circuit or opens it
    /// again for twice that.
    pub probe: Option<Duration>,
    /// Claimed with an ordered key: its end may make the key's next job
    /// due, so the pool claims again at once, even when its destination is
    /// no longer ordered (a reload turned ordering off). A job handed over
    /// at ingest says `false`: the lane it came by is its pool's, whose own
    /// ordering covers it (a reload swaps the routing and the lanes in one
    /// step, and wakes the new pools once the old ones' last job is done).
    pub ordered: bool,
}

impl DeliveryJob {
    /// A new job for `event`: no attempt made yet.
    pub fn new(id: String, event: Event) -> Self {
        Self {
            id,
            key: event.key,
            event_id: event.event_id,
            bot_id: event.bot_id,
            kind: event.kind,
            body: event.body,
            attempts_made: 0,
            created_at_ms: Some(now_ms()),
            probe: None,
            ordered: false,
        }
    }
}

/// Where a job goes after an attempt (`delivery/attempt.rs` `decide`).
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    Completed,
    RetryAt { due_at_ms: i64, reason: String },
    Failed { reason: String },
}

impl Disposition {
    /// The job's state after it: what every store keeps (the SQL `state`,
    /// the BullMQ list `finish.lua` moves the job to). The one mapping.
    pub fn state(&self) -> JobState {
        match self {
            Disposition::Completed => JobState::Completed,
            Disposition::RetryAt { .. } => JobState::Delayed,
            Disposition::Failed { .. } => JobState::Failed,
        }
    }

    /// The attempt's outcome in the job's history and the metrics.
    pub fn attempt_outcome(&self) -> AttemptOutcome {
        match self {
            Disposition::Completed => AttemptOutcome::Delivered,
            Disposition::RetryAt { .. } => AttemptOutcome::Retry,
            Disposition::Failed { .. } => AttemptOutcome::Failed,
        }
    }

    /// Why it is not delivered (none when it is).
    pub fn reason(&self) -> Option<&str> {
        match self {
            Disposition::Completed => None,
            Disposition::RetryAt { reason, .. } | Disposition::Failed { reason } => Some(reason),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub waiting: u64,
    pub active: u64,
    pub delayed: u64,
    pub completed: u64,
    pub failed: u64,
    /// When the oldest job now due for delivery became due (unix ms); for
    /// metrics, not part of `/admin/queue`.
    #[serde(skip)]
    pub oldest_waiting_ms: Option<i64>,
}

/// A job as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub id: String,
    pub state: JobState,
    pub destination: DestinationName,
    pub event_key: String,
    pub event_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    pub kind: &'static str,
    pub attempts_made: u32,
    pub created_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub due_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_reason: Option<String>,
    pub attempts: Vec<Attempt>,
    /// The delivered body (only in single-job views).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
}

/// A job as a backend reads it back for operators, before it is a
/// [`JobView`]: the one mapping from stored fields to the view.
#[derive(Debug, Default)]
pub(crate) struct StoredJob {
    pub id: String,
    /// Empty (a job stored before destinations): the `default` destination.
    pub destination: String,
    pub event_key: String,
    pub event_id: String,
    pub bot_id: Option<String>,
    pub event_type: Option<String>,
    /// As stored (see [`EventKind::from_stored`]).
    pub kind: String,
    pub attempts_made: u32,
    pub created_at_ms: i64,
    /// When it is (or was last) due; shown for waiting and delayed jobs only.
    pub due_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// Empty is none.
    pub failed_reason: Option<String>,
    pub attempts: Vec<Attempt>,
    /// The body as stored; becomes the view's payload when asked for.
    pub body: Option<String>,
}

impl StoredJob {
    pub(crate) fn into_view(self, state: JobState, with_payload: bool) -> JobView {
        JobView {
            id: self.id,
            state,
            destination: DestinationName::known(&self.destination),
            event_key: self.event_key,
            event_id: self.event_id,
            bot_id: self.bot_id,
            event_type: self.event_type,
            kind: EventKind::from_stored(&self.kind).as_str(),
            attempts_made: self.attempts_made,
            created_at_ms: self.created_at_ms,
            due_at_ms: self
                .due_at_ms
                .filter(|_| matches!(state, JobState::Waiting | JobState::Delayed)),
            finished_at_ms: self.finished_at_ms,
            failed_reason: self.failed_reason.filter(|r| !r.is_empty()),
            attempts: self.attempts,
            payload: self
                .body
                .filter(|_| with_payload)
                .and_then(|b| RawValue::from_string(b).ok()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub items: Vec<JobView>,
    pub total: u64,
}

/// Jobs a half-open circuit's round of trials takes at most (the breaker,
/// `delivery/circuit.rs`; on Redis the claim script takes a shared
/// circuit's round, so the number lives here, below both).
pub const CIRCUIT_TRIALS: u32 = 3;

/// Which due jobs a claim takes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOrder {
    /// The earliest due (the queue's order).
    Due,
    /// A half-open circuit's round of trials, which judges the destination,
    /// not one event's own trouble: with room for two or more, the due job
    /// with the most attempts made (a failure of its own has likely passed by
    /// its late retries); the others never attempted first, newest first.
    Trials,
}

/// Jobs claimed, and when to look again if none were due.
#[derive(Debug, Default)]
pub struct Claimed {
    pub jobs: Vec<Leased>,
    /// Earliest due time (or lease expiry) of what is left, in unix ms.
    pub next_due_ms: Option<i64>,
    /// The destination is paused: no claim takes anything until it is
    /// resumed (its dispatcher then claims once a second, not at each new
    /// job: a paused destination costs the ingest nothing).
    pub paused: bool,
    /// The circuit shared by every relay (Redis) is open: its next trial is
    /// due in this many ms (the store's clock counted from the claim).
    pub circuit_open_for_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The store cannot take or give work now (disk full, broken file, closed).
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("job {0} not found")]
    NotFound(String),
    /// An operator named a destination the queue has never had.
    #[error("no destination {0:?} in this queue: `cogrelay destinations list` (or GET /admin/destinations) names them")]
    UnknownDestination(String),
    /// The operation does not apply to a job in this state.
    #[error("job {id} is {state}: {hint}")]
    WrongState {
        id: String,
        state: &'static str,
        hint: &'static str,
    },
}

pub type QueueResult<T> = Result<T, QueueError>;

/// Settings of a queue that are the same on every backend.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub dedup_ttl: Duration,
    pub remove_on_complete: u32,
}

/// The queue contract: what the relay, its admin API and the tools ask of a
/// store, every method with a caller in the relay or the tools (the tests'
/// shortcuts live in `tests/it/helpers.rs`). [`Store`] is the one dispatch
/// point over the backends (`EmbeddedQueue`, `RedisQueues`), each of which
/// states every method, doing nothing where it has nothing to do.
/// Futures are `Send` so callers can spawn them.
///
/// The hot path (the ingress and the delivery pools):
pub trait Queue: Send + Sync + 'static {
    /// Stores `event` as one job for each of `routes` (in that order)
    /// together with its dedup record, in one durable step: all of them or
    /// none. With `lease`, a backend that can stores the new jobs already
    /// leased to the caller for that long and returns them (a direct handoff
    /// to the local worker pools that saves a claim; the lease rules are those
    /// of a claimed job); the others are stored waiting, and so is a job its
    /// key holds back ([`OrderKey`]).
    fn store(
        &self,
        event: Event,
        routes: Vec<Recipient>,
        lease: Option<Duration>,
    ) -> impl Future<Output = QueueResult<(Routed, Vec<Leased>)>> + Send;
    /// Leases due jobs of `destination`, `order`'s first (see the module
    /// doc). A claim may take fewer than are due only when it says to come
    /// back at once (`next_due_ms` now).
    fn claim_for(
        &self,
        destination: &DestinationName,
        max: usize,
        lease: Duration,
        order: ClaimOrder,
    ) -> impl Future<Output = QueueResult<Claimed>> + Send;
    /// Whether `destination` is paused, read from the store now (a pool's
    /// pause lease, and operators).
    fn is_paused(
        &self,
        destination: &DestinationName,
    ) -> impl Future<Output = QueueResult<bool>> + Send;
    fn renew(
        &self,
        leases: Vec<LeaseRef>,
        lease: Duration,
    ) -> impl Future<Output = QueueResult<()>> + Send;
    /// Records the attempt and moves the job; `Ok(false)` if the lease was lost.
    fn finish(
        &self,
        job: Leased,
        attempt: Attempt,
        disposition: Disposition,
    ) -> impl Future<Output = QueueResult<bool>> + Send;
    /// Returns leased jobs to waiting without counting an attempt (shutdown).
    fn release(&self, leases: Vec<LeaseRef>) -> impl Future<Output = QueueResult<()>> + Send;
    fn ping(&self) -> impl Future<Output = QueueResult<()>> + Send;
    /// The destination's circuit opened (for `open_for`, counted on the
    /// store's clock) or closed, where the store shares it with every relay
    /// (Redis: its claims then take nothing until then, and one round of
    /// trials after). The embedded store's one relay keeps its circuit
    /// itself: nothing to do.
    fn set_circuit(
        &self,
        destination: &DestinationName,
        open_for: Option<Duration>,
    ) -> impl Future<Output = QueueResult<()>> + Send;
    /// Whether other relays share this store (Redis), rather than this one
    /// relay owning it (embedded): a pause then waits out their pause lease,
    /// and jobs of a destination no relay has are not this relay's to name.
    fn shared_by_relays(&self) -> bool;
    /// How long a word that a destination is not paused lets a pool start
    /// deliveries (its pause lease): a pause told from elsewhere (another
    /// relay, the command line) is answered this long, and a margin, after
    /// it is stored. One second where relays share the store; five on the
    /// embedded store, whose one relay hears its own admin at once and
    /// whose answers may queue behind a busy ingest.
    fn pause_lease(&self) -> Duration {
        if self.shared_by_relays() {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        }
    }
    /// The store's bytes on disk and its cap (0: none), where the backend
    /// keeps its own files (the embedded store); `None` elsewhere.
    fn store_bytes(&self) -> Option<(u64, u64)>;
    /// Ways this store can lose an acknowledged event, as found at start-up:
    /// `(name, present)` for each one the backend knows of.
    fn durability_risks(&self) -> Vec<(&'static str, bool)>;
    fn close(&self) -> impl Future<Output = QueueResult<()>> + Send;

    // What operators need besides the hot path: counts, listings, and the
    // dead-letter actions. The state rules are [`JobState::check_retry`] and
    // [`JobState::check_remove`], the same on every backend.

    /// Jobs by state, of one destination or (None) of all.
    fn counts_for(
        &self,
        destination: Option<&DestinationName>,
    ) -> impl Future<Output = QueueResult<Counts>> + Send;
    /// Newest first. `state: None` lists every state, `destination: None`
    /// every destination.
    fn list_for(
        &self,
        state: Option<JobState>,
        destination: Option<&DestinationName>,
        offset: u64,
        limit: u64,
    ) -> impl Future<Output = QueueResult<Page>> + Send;
    fn get(&self, id: &str) -> impl Future<Output = QueueResult<JobView>> + Send;
    /// A failed job back to waiting with its attempt count reset.
    fn retry(&self, id: &str) -> impl Future<Output = QueueResult<()>> + Send;
    /// Every failed job (of one destination) back to waiting; how many moved.
    fn retry_all_failed_for(
        &self,
        destination: Option<&DestinationName>,
    ) -> impl Future<Output = QueueResult<u64>> + Send;
    fn remove(&self, id: &str) -> impl Future<Output = QueueResult<()>> + Send;
    /// Pauses (or resumes) a destination: its jobs are stored but not
    /// claimed, by any relay, until resumed. Kept in the store: a restart
    /// keeps it.
    fn set_paused(
        &self,
        destination: &DestinationName,
        paused: bool,
    ) -> impl Future<Output = QueueResult<()>> + Send;
    /// Applies a destination's `rate_limit` (requests a second; 0 = none)
    /// where the store can hold it for every relay. The embedded store's one
    /// relay limits itself: nothing to do.
    fn set_rate_limit(
        &self,
        destination: &DestinationName,
        per_second: u32,
    ) -> impl Future<Output = QueueResult<()>> + Send;
    /// The keys `destination` holds (see [`HeldKey`]), oldest first, at
    /// most `limit`.
    fn held_keys(
        &self,
        destination: &DestinationName,
        limit: u64,
    ) -> impl Future<Output = QueueResult<Vec<HeldKey>>> + Send;
    /// The destinations the store has jobs of, or has paused; sorted.
    fn destination_names(&self) -> impl Future<Output = QueueResult<Vec<DestinationName>>> + Send;
}
