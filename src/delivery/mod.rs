//! The worker pool: claims due jobs, delivers each as `POST TARGET_ENDPOINT`,
//! classifies the answer ([`classify`]) and writes the job back (SPEC §3.2).
//!
//! * The decisions (what to claim, start, give back, and when to look
//!   again) are a pure state machine, [`machine`]: claims in batches (up to
//!   2 × `CONCURRENCY` leased ahead), at most `CONCURRENCY` deliveries at
//!   once, the rate limit, the circuit breaker ([`circuit`]), the pause
//!   lease and shutdown. The [`dispatcher`] carries its commands out: one
//!   task per delivery, claims and pause checks as tasks of their own, and
//!   it feeds the machine what happened, with the time of an injectable
//!   clock (`time::Clock`).
//! * Retries are data, not sleeps: a failed attempt is written back as `delayed`
//!   with its due time; no worker waits on it.
//! * Leases of held jobs are renewed every `LOCK_DURATION_MS / 3`, at the
//!   ingress's CPU priority (see `DeliveryConfig::renewals`).
//! * Shutdown: stop claiming, let in-flight deliveries finish for up to
//!   `SHUTDOWN_GRACE_MS`, then abort the rest and return their leases.

pub(crate) mod backoff;
pub mod circuit;
pub mod classify;
pub mod handoff;
pub(crate) mod signing;
pub mod target;

mod attempt;
mod dispatcher;
pub mod machine;

pub use dispatcher::{run, PauseNote, PoolBoard, Stop};

use foldhash::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cognigy::CognigyClient;
use tokio::sync::Notify;

use crate::queue::{DestinationName, LeaseRef, Store};
use backoff::Backoff;
use signing::TargetSigningKey;

/// Most jobs claimed in one round trip to the store.
const MAX_CLAIM: usize = 256;
/// How long an idle dispatcher waits before looking at the store again.
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// Bytes of a target's answer kept in the attempt history.
const ERROR_SNIPPET: usize = 200;

/// How one destination is delivered to: where, how long an attempt may take,
/// how often and how far apart it is tried, how it is signed, how many at once
/// (SPEC §3.2). One value per destination; the pool's own settings are
/// [`PoolSettings`].
#[derive(Clone)]
pub struct DeliverySettings {
    pub target: reqwest::Url,
    pub delivery_timeout: Duration,
    /// Attempts per event, counting the first (>= 1).
    pub attempts: u32,
    pub backoff: Backoff,
    pub signing_key: Option<TargetSigningKey>,
    /// Deliveries in flight at once (this relay).
    pub concurrency: usize,
    /// Static headers of every delivery (a destination's `headers`), marked
    /// sensitive: they may be credentials. The relay's own headers win.
    pub headers: reqwest::header::HeaderMap,
    /// Requests per second to this destination over all relays; 0 = none.
    pub rate_limit: u32,
    /// A job still undelivered after this long is failed.
    pub max_age: Duration,
    pub circuit: circuit::CircuitSettings,
    /// `ordering = "session"`: one key's jobs one at a time, in the order
    /// stored; `None`: unordered.
    pub ordering: Option<Ordering>,
}

/// Every field, the target's credentials and query masked.
impl std::fmt::Debug for DeliverySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliverySettings")
            .field("target", &crate::secret::MaskedUrl(&self.target))
            .field("delivery_timeout", &self.delivery_timeout)
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .field("signing_key", &self.signing_key)
            .field("concurrency", &self.concurrency)
            .field("headers", &self.headers)
            .field("rate_limit", &self.rate_limit)
            .field("max_age", &self.max_age)
            .field("circuit", &self.circuit)
            .field("ordering", &self.ordering)
            .finish()
    }
}

/// A destination's `ordering = "session"` (SPEC §7): the events of one key
/// are delivered to it one at a time, in the order the relay accepted them;
/// a retrying event holds back only the later events of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ordering {
    /// `ordering_key`: a JSON pointer into an event envelope (an endpoint
    /// output's key is its `sessionId`). An event without one is unordered.
    pub pointer: String,
    /// `on_failure = "hold"`: a failed event holds its key's later events
    /// until an operator retries or removes it; else (`"continue"`) the key
    /// goes on with the next.
    pub hold: bool,
    /// `pointer`'s reference tokens, unescaped (`~1` is `/`, `~0` is `~`):
    /// read once here rather than for every event.
    pub tokens: Vec<String>,
}

impl Ordering {
    /// Ordered by the value at the JSON `pointer` (RFC 6901, checked by the
    /// caller).
    pub fn new(pointer: &str, hold: bool) -> Self {
        Ordering {
            pointer: pointer.to_string(),
            hold,
            tokens: crate::pointer::tokens(pointer),
        }
    }
}

/// The pointer `ordering_key` takes when left out.
pub const DEFAULT_ORDERING_KEY: &str = "/payload/sessionId";

/// Settings of the worker pool itself, whatever it delivers to.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// How long a claimed job stays leased without renewal. Invariant: greater
    /// than every destination's `delivery_timeout` (checked by `config`).
    pub lock_duration: Duration,
    pub shutdown_grace: Duration,
    /// Nice value added to the delivery threads (0..=19; 0 = same priority).
    pub nice: u8,
    /// Check each event envelope with Cognigy before delivering it.
    pub verify_events: Option<crate::cognigy::CognigyConfig>,
    /// A fault to inject, for tests of the relay's supervision: read from
    /// `COGRELAY_TEST_FAULT` in debug builds only, always `None` in release.
    pub test_fault: Option<TestFault>,
    /// Where the pool reads the time (the system's; tests step their own).
    pub clock: crate::time::Clock,
    /// How long an idle pool waits before looking at the store again
    /// ([`IDLE_POLL`]): what it is not told of (another process's retry, a
    /// job of another relay's Redis) waits this long at most.
    pub idle_poll: Duration,
}

/// What [`run`] takes: the destination, the pool, and where renewals run.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// The destination's name: the pool claims its jobs only.
    pub name: DestinationName,
    pub destination: DeliverySettings,
    pub pool: PoolSettings,
    /// Where the lease renewals run (None: beside the deliveries). Not at the
    /// deliveries' lower CPU priority: deliveries that a busy machine slows
    /// down must not also lose their leases to other relays (a duplicate).
    pub renewals: Option<tokio::runtime::Handle>,
}

/// Faults the tests inject to see the relay notice a dead pool (debug builds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestFault {
    /// `run` fails before it delivers anything.
    FailAtStart,
    /// The dispatcher panics after `PANIC_AFTER`.
    PanicLater,
}

impl TestFault {
    pub const PANIC_AFTER: Duration = Duration::from_millis(500);

    /// `COGRELAY_TEST_FAULT=delivery-start|delivery-panic`, in debug builds only.
    pub fn from_env() -> Option<Self> {
        if !cfg!(debug_assertions) {
            return None;
        }
        match std::env::var("COGRELAY_TEST_FAULT").ok()?.as_str() {
            "delivery-start" => Some(Self::FailAtStart),
            "delivery-panic" => Some(Self::PanicLater),
            _ => None,
        }
    }
}

impl DeliveryConfig {
    pub fn new(name: DestinationName, destination: DeliverySettings, pool: PoolSettings) -> Self {
        Self {
            name,
            destination,
            pool,
            renewals: None,
        }
    }

    /// Lease renewals on the runtime this is called on (see `renewals`).
    pub fn renewing_here(self) -> Self {
        Self {
            renewals: Some(tokio::runtime::Handle::current()),
            ..self
        }
    }
}

struct Pool {
    queue: Arc<Store>,
    cfg: DeliveryConfig,
    target: target::Target,
    /// Leases held by this pool, for renewal and for release at shutdown.
    in_flight: InFlight,
    /// Wakes the dispatcher: new jobs (ingress) and finished deliveries (a retry
    /// may now be the earliest due job, and a worker is free).
    wake: Arc<Notify>,
    /// One client (one token cache) for every worker's event verification.
    verifier: Option<CognigyClient>,
    metrics: Arc<crate::metrics::Metrics>,
    destination_metrics: crate::metrics::DestinationMetrics,
    /// Where the pool reads the time.
    clock: crate::time::Clock,
    /// Whether a started delivery may still send (the pause lease, as the
    /// dispatcher's machine last published it).
    gate: SendGate,
}

/// The last look a delivery takes before its request goes out: until when
/// the pause lease lets it (ms of the pool's monotonic clock), published by
/// the dispatcher after each of its machine's steps.
#[derive(Debug)]
struct SendGate(std::sync::atomic::AtomicI64);

impl SendGate {
    fn new() -> Self {
        Self(std::sync::atomic::AtomicI64::new(i64::MIN))
    }

    fn may_send(&self, now: i64) -> bool {
        now < self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set(&self, until: i64) {
        self.0.store(until, std::sync::atomic::Ordering::Release);
    }
}

/// The leases a pool holds (claimed or handed over, running or about to),
/// kept by lease (job and token), not by job: a job whose lease lapsed can be
/// claimed again here under a new token while its old attempt is still
/// finishing, and the end of the old attempt must not drop the new lease from
/// renewal (its job would then lapse again mid-delivery: a duplicate).
#[derive(Debug, Default)]
struct InFlight(Mutex<HashSet<LeaseRef>>);

impl InFlight {
    fn with<T>(&self, f: impl FnOnce(&mut HashSet<LeaseRef>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn hold(&self, lease: &LeaseRef) {
        self.with(|m| m.insert(lease.clone()));
    }

    fn ended(&self, lease: &LeaseRef) {
        self.with(|m| m.remove(lease));
    }

    /// Every lease held, to renew.
    fn all(&self) -> Vec<LeaseRef> {
        self.with(|m| m.iter().cloned().collect())
    }

    /// Every lease held, no longer held here (to give back).
    fn take_all(&self) -> Vec<LeaseRef> {
        self.with(|m| m.drain().collect())
    }
}

/// Counts the pool in `delivery_up` while it runs, however it ends.
struct PoolRunning(Arc<crate::metrics::Metrics>);

impl PoolRunning {
    fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        metrics
            .pools_up
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(metrics)
    }
}

impl Drop for PoolRunning {
    fn drop(&mut self) {
        self.0
            .pools_up
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(job: &str, token: &str) -> LeaseRef {
        LeaseRef {
            job_id: job.into(),
            token: token.into(),
            destination: DestinationName::DEFAULT,
        }
    }

    #[test]
    fn a_second_lease_of_a_job_outlives_the_end_of_the_first() {
        let held = InFlight::default();
        // Job 7's first lease lapsed; it was claimed again (token b) while
        // the attempt under token a was still running.
        held.hold(&lease("7", "a"));
        held.hold(&lease("7", "b"));
        held.hold(&lease("8", "c"));
        held.ended(&lease("7", "a"));
        let mut renewed = held.all();
        renewed.sort_by(|x, y| x.token.cmp(&y.token));
        assert_eq!(
            renewed,
            [lease("7", "b"), lease("8", "c")],
            "b is still renewed"
        );
        assert_eq!(held.take_all().len(), 2);
        assert!(held.all().is_empty());
    }
}
