//! Where the queue is, and the one way to open it: [`open`] for the relay and
//! for the tools (`cogrelay jobs`, `cogrelay queue`), giving a [`Store`] that
//! is either backend behind the same two traits.

use std::path::PathBuf;
use std::time::Duration;

use super::embedded::{Access, EmbeddedOptions, EmbeddedQueue, Fsync};
use super::redis::{RedisOptions, RedisQueues};
use super::{
    embedded, Attempt, ClaimOrder, Claimed, Counts, DestinationName, Disposition, Event, HeldKey,
    JobState, JobView, LeaseRef, Leased, Page, Queue, QueueError, QueueResult, QueueSettings,
    Recipient, Routed,
};
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    Embedded,
    Redis,
}

/// The queue's settings: which backend, where it keeps its data, and what it
/// keeps (SPEC §3.5).
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub kind: QueueKind,
    pub data_dir: PathBuf,
    pub fsync: Fsync,
    /// Database + WAL of the embedded store, in bytes; 0 = no cap.
    pub max_db_bytes: u64,
    /// May hold a password: never print it.
    pub redis_url: Secret,
    pub queue_name: String,
    /// PEM of a CA to trust for `rediss://` (`REDIS_CA_FILE`), read at start-up.
    pub redis_ca: Option<Vec<u8>>,
    /// How long dedup records and completed jobs are kept.
    pub retention: QueueSettings,
    /// Where the store reads the time (the system's; tests step their own).
    pub clock: crate::time::Clock,
}

impl StoreSettings {
    /// host:port of the Redis URL, without credentials (for log and error lines).
    pub fn redis_host(&self) -> String {
        reqwest::Url::parse(self.redis_url.expose())
            .ok()
            .map(|u| {
                format!(
                    "{}:{}",
                    u.host_str().unwrap_or("?"),
                    u.port().unwrap_or(6379)
                )
            })
            .unwrap_or_else(|| "?".into())
    }
}

/// Who opens the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opener {
    /// The relay: takes the embedded store's process lock and puts back the
    /// jobs a dead relay left active; on Redis, checks for stalled jobs with
    /// this lease length.
    Relay { lock_duration: Duration },
    /// A tool beside a running relay (or none) that writes what an operator
    /// asks (retry, remove, pause): no lock, no recovery, no maintenance,
    /// and a missing embedded store is an error rather than created.
    Tool,
    /// A tool that only reads (lists, counts, stats): writes nothing at all
    /// (embedded: a read-only connection; Redis: no script, no key set).
    Reader,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Its message says what failed and how to fix it; not also a source,
    /// so that a chain printed with `{:#}` says it once.
    #[error("failed to open the embedded queue: {0}")]
    Embedded(super::embedded::EmbeddedOpenError),
    #[error(
        "no embedded queue in {0} (COGRELAY_DATA_DIR): point it at the relay's data directory"
    )]
    NoEmbeddedStore(PathBuf),
    #[error("failed to connect to Redis at {host} (REDIS_URL / REDIS_HOST): {error}")]
    Redis { host: String, error: QueueError },
}

/// Either backend, opened by [`open`].
#[derive(Debug)]
pub enum Store {
    Embedded(EmbeddedQueue),
    /// Boxed: a Redis queue holds its connections and scripts inline.
    Redis(Box<RedisQueues>),
}

/// Lease length of a tool's Redis connection (it leases nothing; BullMQ's
/// worker options need one).
const TOOL_LOCK_DURATION: Duration = Duration::from_secs(30);

/// Opens the queue `settings` name, for the relay or for a tool.
pub async fn open(settings: &StoreSettings, opener: Opener) -> Result<Store, OpenError> {
    match settings.kind {
        QueueKind::Embedded => {
            let relay = matches!(opener, Opener::Relay { .. });
            if !relay && !settings.data_dir.join(embedded::DB_FILE).exists() {
                return Err(OpenError::NoEmbeddedStore(settings.data_dir.clone()));
            }
            let q = EmbeddedQueue::open(EmbeddedOptions {
                data_dir: settings.data_dir.clone(),
                fsync: settings.fsync,
                max_db_bytes: if relay { settings.max_db_bytes } else { 0 },
                settings: settings.retention.clone(),
                access: match opener {
                    Opener::Relay { .. } => Access::Relay,
                    Opener::Tool => Access::Tool,
                    Opener::Reader => Access::Reader,
                },
                clock: settings.clock.clone(),
            })
            .map_err(OpenError::Embedded)?;
            Ok(Store::Embedded(q))
        }
        QueueKind::Redis => {
            let lock_duration = match opener {
                Opener::Relay { lock_duration } => lock_duration,
                Opener::Tool | Opener::Reader => TOOL_LOCK_DURATION,
            };
            let q = RedisQueues::connect(RedisOptions {
                url: settings.redis_url.expose().to_string(),
                ca_pem: settings.redis_ca.clone(),
                queue_name: settings.queue_name.clone(),
                lock_duration,
                settings: settings.retention.clone(),
                destination: DestinationName::DEFAULT,
                clock: settings.clock.clone(),
                relay: matches!(opener, Opener::Relay { .. }),
            })
            .await
            .map_err(|error| OpenError::Redis {
                host: settings.redis_host(),
                error,
            })?;
            Ok(Store::Redis(Box::new(q)))
        }
    }
}

/// `$body` with `$q` bound to the backend behind `$store`.
/// The hot path's calls box the backend's future: a store future held inline
/// is kilobytes (the larger backend's), copied whole at each move by every
/// future that awaits it; a box is one allocation (docs/benchmark.md).
macro_rules! on_backend {
    ($store:expr, $q:ident => $body:expr) => {
        match $store {
            Store::Embedded($q) => $body,
            Store::Redis($q) => $body,
        }
    };
}

impl Store {
    /// Puts back the jobs whose lease expired (their worker is gone), now;
    /// how many. Not part of the contract: the relay's store does it on its
    /// own (the embedded store at each claim, Redis every half lease). For
    /// the queue model's tests, which cannot wait out half a lease.
    #[doc(hidden)]
    pub async fn check_stalled(&self) -> QueueResult<u64> {
        on_backend!(self, q => q.check_stalled().await)
    }

    /// A destination as operators see it (the admin API, the command line):
    /// its jobs by state, whether paused, and the keys it holds (whatever
    /// the file says now: a job keeps the hold it was stored with).
    pub async fn destination_state(
        &self,
        name: &DestinationName,
    ) -> QueueResult<(Counts, bool, Vec<HeldKey>)> {
        let counts = self.counts_for(Some(name)).await?;
        let paused = self.is_paused(name).await?;
        let held = self.held_keys(name, super::HELD_KEYS_SHOWN).await?;
        Ok((counts, paused, held))
    }

    /// Where the store is, for a log line: the file, or Redis's host and queue.
    pub fn describe(&self, settings: &StoreSettings) -> String {
        match self {
            Store::Embedded(q) => format!("embedded queue {}", q.path().display()),
            Store::Redis(_) => format!(
                "redis queue {} at {} (BullMQ layout)",
                settings.queue_name,
                settings.redis_host()
            ),
        }
    }
}

impl Queue for Store {
    async fn store(
        &self,
        event: Event,
        routes: Vec<Recipient>,
        lease: Option<Duration>,
    ) -> QueueResult<(Routed, Vec<Leased>)> {
        on_backend!(self, q => Box::pin(q.store(event, routes, lease)).await)
    }
    async fn claim_for(
        &self,
        destination: &DestinationName,
        max: usize,
        lease: Duration,
        order: ClaimOrder,
    ) -> QueueResult<Claimed> {
        on_backend!(self, q => Box::pin(q.claim_for(destination, max, lease, order)).await)
    }
    async fn renew(&self, leases: Vec<LeaseRef>, lease: Duration) -> QueueResult<()> {
        on_backend!(self, q => Box::pin(q.renew(leases, lease)).await)
    }
    async fn finish(
        &self,
        job: Leased,
        attempt: Attempt,
        disposition: Disposition,
    ) -> QueueResult<bool> {
        on_backend!(self, q => Box::pin(q.finish(job, attempt, disposition)).await)
    }
    async fn release(&self, leases: Vec<LeaseRef>) -> QueueResult<()> {
        on_backend!(self, q => Box::pin(q.release(leases)).await)
    }
    async fn ping(&self) -> QueueResult<()> {
        on_backend!(self, q => q.ping().await)
    }
    async fn is_paused(&self, destination: &DestinationName) -> QueueResult<bool> {
        on_backend!(self, q => Box::pin(q.is_paused(destination)).await)
    }
    async fn set_circuit(
        &self,
        destination: &DestinationName,
        open_for: Option<Duration>,
    ) -> QueueResult<()> {
        on_backend!(self, q => q.set_circuit(destination, open_for).await)
    }
    fn store_bytes(&self) -> Option<(u64, u64)> {
        on_backend!(self, q => q.store_bytes())
    }

    fn durability_risks(&self) -> Vec<(&'static str, bool)> {
        on_backend!(self, q => q.durability_risks())
    }
    fn shared_by_relays(&self) -> bool {
        on_backend!(self, q => q.shared_by_relays())
    }
    async fn close(&self) -> QueueResult<()> {
        on_backend!(self, q => q.close().await)
    }

    async fn counts_for(&self, destination: Option<&DestinationName>) -> QueueResult<Counts> {
        on_backend!(self, q => q.counts_for(destination).await)
    }
    async fn list_for(
        &self,
        state: Option<JobState>,
        destination: Option<&DestinationName>,
        offset: u64,
        limit: u64,
    ) -> QueueResult<Page> {
        on_backend!(self, q => q.list_for(state, destination, offset, limit).await)
    }
    async fn get(&self, id: &str) -> QueueResult<JobView> {
        on_backend!(self, q => q.get(id).await)
    }
    async fn retry(&self, id: &str) -> QueueResult<()> {
        on_backend!(self, q => q.retry(id).await)
    }
    async fn retry_all_failed_for(
        &self,
        destination: Option<&DestinationName>,
    ) -> QueueResult<u64> {
        on_backend!(self, q => q.retry_all_failed_for(destination).await)
    }
    async fn set_paused(&self, destination: &DestinationName, paused: bool) -> QueueResult<()> {
        on_backend!(self, q => q.set_paused(destination, paused).await)
    }

    async fn held_keys(
        &self,
        destination: &DestinationName,
        limit: u64,
    ) -> QueueResult<Vec<HeldKey>> {
        on_backend!(self, q => q.held_keys(destination, limit).await)
    }
    async fn destination_names(&self) -> QueueResult<Vec<DestinationName>> {
        on_backend!(self, q => q.destination_names().await)
    }
    async fn set_rate_limit(
        &self,
        destination: &DestinationName,
        per_second: u32,
    ) -> QueueResult<()> {
        on_backend!(self, q => q.set_rate_limit(destination, per_second).await)
    }
    async fn remove(&self, id: &str) -> QueueResult<()> {
        on_backend!(self, q => q.remove(id).await)
    }
}
