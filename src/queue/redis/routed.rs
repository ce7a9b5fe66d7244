//! Destinations on Redis: each destination its own BullMQ queue, so BullMQ
//! tools show each one, and BullMQ's pause, rate limit and global concurrency
//! on a queue are that destination's.
//!
//! * `default` is `QUEUE_NAME` itself (a relay moving from `TARGET_ENDPOINT`
//!   keeps its queue); destination `crm` is `QUEUE_NAME.crm`.
//! * An event for several destinations is added by one script
//!   (`lua/add_routed.lua`): every destination's job and the dedup record in
//!   one step. Ids come from `QUEUE_NAME`'s counter, so an id names one job
//!   over every queue; the dedup key is `QUEUE_NAME`'s and names every job
//!   (`crm=17,warehouse=18`). A relay whose one destination is `default` adds
//!   through `QUEUE_NAME`'s own script, as before destinations (plain ids).
//! * A destination's queue is opened when it is first used (a reload may add
//!   one), and its name is kept in a registry, the set
//!   `bull:QUEUE_NAME:cg:destinations`, which the relay adds to and tools
//!   read: no `KEYS` or `SCAN` over the keyspace at start-up or for a
//!   command (a day of dedup keys is millions). An operator's read of a name
//!   the registry does not hold is `UnknownDestination` and opens nothing.
//!   A store of an earlier version has no registry: a relay finds its
//!   destinations' queues once by a `SCAN` in the background.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{
    Attempt, BatchedScripts, Batcher, BullQueue, Claimed, Counts, DeliveryJob, Disposition, Event,
    JobState, JobView, LeaseRef, Leased, Page, Queue, QueueError, QueueResult, RedisOptions,
    Routed, JOB_NAME, MAX_BATCH,
};
use crate::queue::{parse_jobs_text, DestinationName, HeldKey, JobRef, Recipient};

/// The queue name of `destination`'s jobs.
pub fn queue_name(base: &str, destination: &DestinationName) -> String {
    if destination.is_default() {
        base.to_string()
    } else {
        format!("{base}.{destination}")
    }
}

/// An event for the routed add script.
struct RoutedJob {
    dedup_id: String,
    /// How long its dedup record lasts (`queue::dedup_ttl_ms`).
    dedup_ttl_ms: u64,
    data: String,
    opts: String,
    lock: Option<(String, u64)>,
    /// `Event::key_sharer`: its botId and own record.
    sharer: Option<(String, String)>,
    /// Each destination's queue key prefix and name, and the job's key if
    /// the destination is ordered.
    targets: Vec<(String, Recipient)>,
}

/// What the routed add did with one event.
enum RoutedAdded {
    /// (destination, id, added locked)
    Added(Vec<(DestinationName, String, bool)>),
    /// The first event's dedup record.
    Duplicate(Vec<JobRef>),
    /// Not added, nothing written: why (a queue of it a tool broke).
    Refused(String),
}

pub struct RedisQueues {
    opts: RedisOptions,
    /// `QUEUE_NAME`: the `default` destination's queue, the id counter and
    /// the dedup keys.
    pub(super) base: Arc<BullQueue>,
    /// The other destinations' queues. A plain lock, never held across an
    /// await: a tokio `RwLock` read on every add cost a quarter of the
    /// relay's CPU on Redis (docs/benchmark.md).
    others: std::sync::RwLock<BTreeMap<DestinationName, Arc<BullQueue>>>,
    /// Whether `others` holds any queue (read on every add).
    has_others: std::sync::atomic::AtomicBool,
    /// Per destination, held while its queue is being opened, so that it is
    /// opened once; queues of different destinations open side by side (one
    /// lock for all made each wait behind the others' tries while Redis
    /// hung: up to 2 s per queue for the destinations list).
    opening: std::sync::Mutex<BTreeMap<DestinationName, Arc<tokio::sync::Mutex<()>>>>,
    /// Queues that could not be opened, and when: a registered one is not
    /// tried again by counts and lists for [`OPEN_AGAIN_AFTER`] (each try
    /// holds its `opening` lock), and a destination's events are refused at
    /// once for [`REFUSE_AFTER_FAILED_OPEN`].
    failed_opens: std::sync::Mutex<BTreeMap<DestinationName, std::time::Instant>>,
    adds: Batcher<RoutedJob, RoutedAdded>,
}

/// How long a registered queue that could not be opened is left out of a
/// look at the whole queue before it is tried again.
const OPEN_AGAIN_AFTER: Duration = Duration::from_secs(60);

/// How long the events of a destination whose queue could not be opened are
/// refused at once (503): the 2 s bound of a try and the second its pool
/// waits between two, so that while Redis hangs its events do not each wait
/// on a try of their own.
const REFUSE_AFTER_FAILED_OPEN: Duration = Duration::from_secs(3);

impl std::fmt::Debug for RedisQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueues")
            .field("queue_name", &self.opts.queue_name)
            .finish_non_exhaustive()
    }
}

impl RedisQueues {
    /// Puts back the jobs whose lease expired, now, in every destination's
    /// queue (each one's maintenance does it every half lease).
    pub(crate) async fn check_stalled(&self) -> QueueResult<u64> {
        let mut n = 0;
        for q in self.all().await {
            n += q.check_stalled().await?;
        }
        Ok(n)
    }

    /// Opens `QUEUE_NAME` and the destinations' queues found beside it.
    pub async fn connect(opts: RedisOptions) -> Result<Self, QueueError> {
        let base = Arc::new(
            BullQueue::connect(RedisOptions {
                destination: DestinationName::DEFAULT,
                ..opts.clone()
            })
            .await?,
        );
        let hot = base.hot.clone();
        let script = Arc::new(redis::Script::new(concat!(
            include_str!("../lua/order.lua"),
            include_str!("../lua/dedup.lua"),
            include_str!("../lua/check.lua"),
            include_str!("../lua/add_routed.lua")
        )));
        let ttl_ms = opts.settings.dedup_ttl.as_millis() as u64;
        let adds = Batcher::spawn(MAX_BATCH, move |jobs: Vec<RoutedJob>| {
            let (hot, script) = (hot.clone(), script.clone());
            async move {
                hot.breaker.check()?;
                add_routed(&hot, &script, jobs, ttl_ms).await
            }
        });
        let queues = Self {
            opts,
            base,
            others: Default::default(),
            has_others: Default::default(),
            opening: Default::default(),
            failed_opens: Default::default(),
            adds,
        };
        let registered: Vec<String> = queues
            .base
            .raw(redis::cmd("SMEMBERS").arg(queues.registry()))
            .await?;
        if registered.is_empty() && queues.opts.relay {
            let (base, registry, prefix) = (
                queues.base.clone(),
                queues.registry(),
                queues.base.hot.key(""),
            );
            tokio::spawn(async move { find_destinations(&base, &registry, &prefix).await });
        }
        // (`default` is the base queue: a registry entry of it, which a
        // tool's `bull:<queue>.default:` keys could make, opens nothing)
        for name in registered
            .iter()
            .filter_map(|d| DestinationName::parse(d))
            .filter(|d| !d.is_default())
        {
            queues.open(&name, false).await?;
        }
        Ok(queues)
    }

    /// The key of the registry of destinations (see the module doc).
    fn registry(&self) -> String {
        self.base.hot.key("cg:destinations")
    }

    /// `destination`'s queue for the relay's own work (a configured
    /// destination): registered and opened on first use.
    async fn queue(&self, destination: &DestinationName) -> QueueResult<Arc<BullQueue>> {
        if destination.is_default() {
            return Ok(self.base.clone());
        }
        if let Some(q) = self.opened(destination) {
            return Ok(q);
        }
        self.open(destination, true).await
    }

    /// For an event: Unavailable at once while `destination`'s queue is not
    /// open and could not be opened within [`REFUSE_AFTER_FAILED_OPEN`], so
    /// that its events do not each wait on another try (the others' go on).
    fn refuse_if_failed(&self, destination: &DestinationName) -> QueueResult<()> {
        if self.opened(destination).is_some() {
            return Ok(());
        }
        let failed = self.failed_opens.lock().unwrap_or_else(|p| p.into_inner());
        if failed
            .get(destination)
            .is_some_and(|at| at.elapsed() < REFUSE_AFTER_FAILED_OPEN)
        {
            return Err(could_not_open(destination));
        }
        Ok(())
    }

    /// `destination`'s queue for an operator: one the registry holds, else
    /// `UnknownDestination` (nothing opened).
    async fn existing(&self, destination: &DestinationName) -> QueueResult<Arc<BullQueue>> {
        if destination.is_default() {
            return Ok(self.base.clone());
        }
        if let Some(q) = self.opened(destination) {
            return Ok(q);
        }
        let known: bool = self
            .base
            .raw(
                redis::cmd("SISMEMBER")
                    .arg(self.registry())
                    .arg(destination.as_str()),
            )
            .await?;
        if !known {
            return Err(QueueError::UnknownDestination(destination.to_string()));
        }
        self.open(destination, false).await
    }

    /// Opens `destination`'s queue (once), registering it first if asked.
    async fn open(
        &self,
        destination: &DestinationName,
        register: bool,
    ) -> QueueResult<Arc<BullQueue>> {
        let asked = std::time::Instant::now();
        let lock = self
            .opening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(destination.clone())
            .or_default()
            .clone();
        let _opening = lock.lock().await;
        if let Some(q) = self.opened(destination) {
            return Ok(q);
        }
        // Waited behind a try of the same queue that failed: its outcome.
        let failed_meanwhile = self
            .failed_opens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(destination)
            .is_some_and(|&at| at >= asked);
        if failed_meanwhile {
            return Err(could_not_open(destination));
        }
        let opened = self.connect_queue(destination, register).await;
        if opened.is_err() {
            // Noted before the lock is let go, for those waiting on it.
            self.failed_opens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(destination.clone(), std::time::Instant::now());
        }
        opened
    }

    /// What [`Self::open`] does under its lock.
    async fn connect_queue(
        &self,
        destination: &DestinationName,
        register: bool,
    ) -> QueueResult<Arc<BullQueue>> {
        if register {
            let _: i64 = self
                .base
                .raw(
                    redis::cmd("SADD")
                        .arg(self.registry())
                        .arg(destination.as_str()),
                )
                .await?;
        }
        let q = Arc::new(
            BullQueue::connect(RedisOptions {
                queue_name: queue_name(&self.opts.queue_name, destination),
                destination: destination.clone(),
                ..self.opts.clone()
            })
            .await?,
        );
        self.others
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(destination.clone(), q.clone());
        self.has_others
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(q)
    }

    fn opened(&self, destination: &str) -> Option<Arc<BullQueue>> {
        self.others
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(destination)
            .cloned()
    }

    /// Every queue the registry names (`default`'s first), those registered
    /// since this relay started opened now: an operator's look at the whole
    /// queue takes in the destinations only other relays' files give.
    /// One that cannot be opened is left out (as before it was registered),
    /// said in a WARN line, and, for counts and lists, tried again after
    /// [`OPEN_AGAIN_AFTER`]: the others are still shown.
    async fn every(&self) -> Vec<Arc<BullQueue>> {
        self.every_but(false).await.0
    }

    /// [`Self::every`], and the registered queues it left out; `again`: those
    /// that failed lately are tried again now (an operator's lookup by id or
    /// retry-all, which answer 503 naming what they could not look in, and
    /// so must not go on doing so once Redis is back).
    async fn every_but(&self, again: bool) -> (Vec<Arc<BullQueue>>, Vec<DestinationName>) {
        let registered: Vec<String> = match self
            .base
            .raw(redis::cmd("SMEMBERS").arg(self.registry()))
            .await
        {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the registry of destinations: only the queues opened are shown");
                Vec::new()
            }
        };
        let mut left_out = Vec::new();
        for name in registered.iter().filter_map(|d| DestinationName::parse(d)) {
            if name.is_default() || self.opened(&name).is_some() {
                continue;
            }
            if !again && self.failed_lately(&name) {
                left_out.push(name);
                continue;
            }
            if let Err(e) = self.open(&name, false).await {
                tracing::warn!(destination = %name, error = %e, "cannot open a destination's queue that another relay registered: left out of the counts and lists for a minute");
                left_out.push(name);
            }
        }
        (self.all().await, left_out)
    }

    /// Why an operator's look at every queue is not whole: the queues
    /// `left_out` (`what` is what was done without them), if any.
    fn unless_whole(
        left_out: &[DestinationName],
        what: impl FnOnce() -> String,
    ) -> QueueResult<()> {
        if left_out.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = left_out.iter().map(DestinationName::as_str).collect();
        Err(QueueError::Unavailable(format!(
            "{}; the queue of {} could not be opened (see the relay's log) and is tried again at the next such call",
            what(),
            names.join(", ")
        )))
    }

    /// Whether `name` could not be opened within [`OPEN_AGAIN_AFTER`].
    fn failed_lately(&self, name: &DestinationName) -> bool {
        self.failed_opens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .is_some_and(|at| at.elapsed() < OPEN_AGAIN_AFTER)
    }

    /// Every queue opened: `default`'s first.
    async fn all(&self) -> Vec<Arc<BullQueue>> {
        let mut all = vec![self.base.clone()];
        let others = self.others.read().unwrap_or_else(|p| p.into_inner());
        all.extend(others.values().cloned());
        all
    }

    /// The queue holding job `id`, if any.
    async fn holding(&self, id: &str) -> QueueResult<Arc<BullQueue>> {
        let (queues, left_out) = self.every_but(true).await;
        for q in queues {
            match q.get(id).await {
                Ok(_) => return Ok(q),
                Err(QueueError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        // Not found where it looked: a 404 only if it looked everywhere.
        Self::unless_whole(&left_out, || {
            format!("job {id} is in none of the queues this relay could open")
        })?;
        Err(QueueError::NotFound(id.to_string()))
    }
}

async fn add_routed(
    hot: &BatchedScripts,
    script: &redis::Script,
    jobs: Vec<RoutedJob>,
    ttl_ms: u64,
) -> QueueResult<Vec<RoutedAdded>> {
    let mut call = script.prepare_invoke();
    call.key(hot.key("id"));
    call.arg(&hot.prefix)
        .arg(hot.clock.now_ms())
        .arg(ttl_ms)
        .arg(JOB_NAME)
        .arg(&hot.worker);
    for j in &jobs {
        call.arg(&j.dedup_id)
            .arg(&j.data)
            .arg(&j.opts)
            .arg(j.lock.as_ref().map_or("", |(t, _)| t.as_str()))
            .arg(j.lock.as_ref().map_or(0, |(_, ms)| *ms))
            .arg(j.sharer.as_ref().map_or("", |(bot, _)| bot.as_str()))
            .arg(j.sharer.as_ref().map_or("", |(_, own)| own.as_str()))
            .arg(j.dedup_ttl_ms)
            .arg(j.targets.len());
        for (prefix, to) in &j.targets {
            let order = to.order.as_ref();
            call.arg(prefix)
                .arg(to.destination.as_str())
                .arg(order.map_or("", |o| o.key.as_str()))
                .arg(if order.is_some_and(|o| o.hold) {
                    "1"
                } else {
                    "0"
                });
        }
    }
    let out: Vec<(String, String)> = hot.invoke_add(&call).await?;
    Ok(out
        .into_iter()
        .map(|(kind, text)| match kind.as_str() {
            "d" if text.contains('=') => RoutedAdded::Duplicate(parse_jobs_text(&text)),
            "d" => RoutedAdded::Duplicate(vec![JobRef {
                destination: DestinationName::DEFAULT,
                id: text,
            }]),
            "e" => RoutedAdded::Refused(text),
            _ => RoutedAdded::Added(
                text.split(',')
                    .filter_map(|part| {
                        let mut it = part.split('=');
                        Some((
                            DestinationName::known(it.next()?),
                            it.next()?.to_string(),
                            it.next()? == "l",
                        ))
                    })
                    .collect(),
            ),
        })
        .collect())
}

impl RedisQueues {
    /// `store` through the routed script (see [`Queue::store`]).
    async fn store_routed(
        &self,
        event: Event,
        routes: Vec<Recipient>,
        lease: Option<Duration>,
    ) -> QueueResult<(Routed, Vec<Leased>)> {
        // Redis failing: at once, before a queue is looked for or opened.
        self.base.hot.breaker.check()?;
        let mut targets = Vec::with_capacity(routes.len());
        for to in &routes {
            self.refuse_if_failed(&to.destination)?;
        }
        for to in routes {
            let q = self.queue(&to.destination).await?;
            targets.push((q.hot.prefix.clone(), to));
        }
        let (dedup_id, data, opts, dedup_ttl_ms) = self.base.job_fields(&event, None)?;
        let token = lease.map(|_| self.base.hot.token());
        let lock = token.clone().zip(lease.map(|l| l.as_millis() as u64));
        // Behind the breaker of `default`'s own add (one Redis); a queue that
        // could not be opened above is that destination's trouble alone.
        let added = self
            .base
            .hot
            .breaker
            .guarded(self.adds.call(RoutedJob {
                dedup_ttl_ms,
                dedup_id,
                data,
                opts,
                lock,
                sharer: super::scripts::sharer(&event),
                targets,
            }))
            .await?;
        Ok(match added {
            RoutedAdded::Duplicate(jobs) => (
                Routed {
                    duplicate: true,
                    jobs,
                },
                Vec::new(),
            ),
            RoutedAdded::Refused(why) => return Err(QueueError::Unavailable(why)),
            RoutedAdded::Added(jobs) => {
                let leased = jobs
                    .iter()
                    .filter(|(_, _, locked)| *locked)
                    .filter_map(|(d, id, _)| {
                        let mut job = DeliveryJob::new(id.clone(), event.clone());
                        job.created_at_ms = Some(self.base.hot.clock.now_ms());
                        Some(Leased {
                            job,
                            lease: LeaseRef {
                                job_id: id.clone(),
                                token: token.clone()?,
                                destination: d.clone(),
                            },
                        })
                    })
                    .collect();
                let jobs = jobs
                    .into_iter()
                    .map(|(destination, id, _)| JobRef { destination, id })
                    .collect();
                (
                    Routed {
                        duplicate: false,
                        jobs,
                    },
                    leased,
                )
            }
        })
    }
}

impl Queue for RedisQueues {
    async fn store(
        &self,
        event: Event,
        routes: Vec<Recipient>,
        lease: Option<Duration>,
    ) -> QueueResult<(Routed, Vec<Leased>)> {
        // One relay, one unordered `default` destination: its own queue's
        // add, as before destinations.
        if let [only] = routes.as_slice() {
            if only.destination.is_default()
                && only.order.is_none()
                && !self.has_others.load(std::sync::atomic::Ordering::Acquire)
            {
                return self.base.store(event, lease).await;
            }
        }
        self.store_routed(event, routes, lease).await
    }
    async fn claim_for(
        &self,
        destination: &DestinationName,
        max: usize,
        lease: Duration,
        order: crate::queue::ClaimOrder,
    ) -> QueueResult<Claimed> {
        self.queue(destination)
            .await?
            .claim(max, lease, order)
            .await
    }

    async fn renew(&self, leases: Vec<LeaseRef>, lease: Duration) -> QueueResult<()> {
        for (d, group) in by_destination(leases) {
            self.queue(&d).await?.renew(group, lease).await?;
        }
        Ok(())
    }

    async fn finish(
        &self,
        job: Leased,
        attempt: Attempt,
        disposition: Disposition,
    ) -> QueueResult<bool> {
        self.queue(&job.lease.destination)
            .await?
            .finish(job, attempt, disposition)
            .await
    }

    async fn release(&self, leases: Vec<LeaseRef>) -> QueueResult<()> {
        for (d, group) in by_destination(leases) {
            self.queue(&d).await?.release(group).await?;
        }
        Ok(())
    }

    /// The shared circuit in the destination queue's meta hash (read by the
    /// claim and add scripts of every relay), its open period counted on
    /// Redis's clock (`TIME`), not this relay's.
    async fn set_circuit(
        &self,
        destination: &DestinationName,
        open_for: Option<Duration>,
    ) -> QueueResult<()> {
        let q = self.queue(destination).await?;
        let script = redis::Script::new(include_str!("../lua/circuit.lua"));
        let mut call = script.key(q.hot.key("meta"));
        match open_for {
            Some(cooldown) => call.arg("open").arg(cooldown.as_millis().max(1) as u64),
            None => call.arg("close").arg(0),
        };
        q.hot.invoke::<i64>(&call).await.map(|_| ())
    }

    async fn ping(&self) -> QueueResult<()> {
        self.base.ping().await
    }

    async fn is_paused(&self, destination: &DestinationName) -> QueueResult<bool> {
        self.existing(destination).await?.is_paused().await
    }

    fn durability_risks(&self) -> Vec<(&'static str, bool)> {
        self.base.durability_risks()
    }

    fn store_bytes(&self) -> Option<(u64, u64)> {
        None
    }

    fn shared_by_relays(&self) -> bool {
        true
    }

    async fn close(&self) -> QueueResult<()> {
        for q in self.all().await {
            q.close().await?;
        }
        Ok(())
    }

    // The operators' side.
    async fn counts_for(&self, destination: Option<&DestinationName>) -> QueueResult<Counts> {
        if let Some(d) = destination {
            return self.existing(d).await?.counts().await;
        }
        let mut sum = Counts::default();
        for q in self.every().await {
            let c = q.counts().await?;
            sum.waiting += c.waiting;
            sum.active += c.active;
            sum.delayed += c.delayed;
            sum.completed += c.completed;
            sum.failed += c.failed;
            sum.oldest_waiting_ms = match (sum.oldest_waiting_ms, c.oldest_waiting_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(sum)
    }

    async fn list_for(
        &self,
        state: Option<JobState>,
        destination: Option<&DestinationName>,
        offset: u64,
        limit: u64,
    ) -> QueueResult<Page> {
        if let Some(d) = destination {
            return self.existing(d).await?.list(state, offset, limit).await;
        }
        let all = self.every().await;
        if all.len() == 1 {
            return self.base.list(state, offset, limit).await;
        }
        // Newest first over every queue: each one's first offset + limit,
        // merged by id (one counter for all).
        let mut items = Vec::new();
        let mut total = 0;
        for q in all {
            let page = q.list(state, 0, offset + limit).await?;
            total += page.total;
            items.extend(page.items);
        }
        items.sort_by_key(|j| std::cmp::Reverse(j.id.parse::<u64>().unwrap_or(0)));
        let items = items
            .into_iter()
            .skip(offset as usize)
            .take(limit as usize)
            .collect();
        Ok(Page { items, total })
    }

    async fn get(&self, id: &str) -> QueueResult<JobView> {
        self.holding(id).await?.get(id).await
    }

    async fn retry(&self, id: &str) -> QueueResult<()> {
        match self.holding(id).await {
            // Its hash is nowhere: each queue's retry drops the id from its
            // failed set, if a tool that deleted the hash left it there.
            Err(QueueError::NotFound(_)) => {
                for q in self.all().await {
                    match q.retry(id).await {
                        Err(QueueError::NotFound(_)) => continue,
                        done => return done,
                    }
                }
                Err(QueueError::NotFound(id.to_string()))
            }
            held => held?.retry(id).await,
        }
    }

    async fn retry_all_failed_for(
        &self,
        destination: Option<&DestinationName>,
    ) -> QueueResult<u64> {
        if let Some(d) = destination {
            return self.existing(d).await?.retry_all_failed().await;
        }
        let mut n = 0;
        let (queues, left_out) = self.every_but(true).await;
        for q in queues {
            n += q.retry_all_failed().await?;
        }
        Self::unless_whole(&left_out, || {
            format!("{n} failed jobs went back to waiting")
        })?;
        Ok(n)
    }

    async fn remove(&self, id: &str) -> QueueResult<()> {
        self.holding(id).await?.remove(id).await
    }

    async fn set_paused(&self, destination: &DestinationName, paused: bool) -> QueueResult<()> {
        // A write an operator asked for, of a name the caller checked (a
        // configured destination, or one the queue or the file names).
        self.queue(destination).await?.set_paused(paused).await
    }

    /// BullMQ's global rate limit on the destination's queue (`max` jobs a
    /// `duration` ms, in its meta hash, enforced by the claim script for
    /// every relay), shaped by [`limit_shape`] so that no second holds more
    /// than 5% over `per_second` starts wherever they are claimed, and a
    /// busy destination gets at least 95% of it. With 0 the limit is taken
    /// off.
    async fn set_rate_limit(
        &self,
        destination: &DestinationName,
        per_second: u32,
    ) -> QueueResult<()> {
        let q = self.queue(destination).await?;
        let meta = q.hot.key("meta");
        let cmd = match limit_shape(per_second) {
            None => {
                let mut c = redis::cmd("HDEL");
                c.arg(&meta).arg("max").arg("duration");
                c
            }
            Some((max, duration_ms)) => {
                let mut c = redis::cmd("HSET");
                c.arg(&meta)
                    .arg("max")
                    .arg(max)
                    .arg("duration")
                    .arg(duration_ms);
                c
            }
        };
        let _: i64 = q.raw(&cmd).await?;
        Ok(())
    }

    async fn held_keys(
        &self,
        destination: &DestinationName,
        limit: u64,
    ) -> QueueResult<Vec<HeldKey>> {
        match self.existing(destination).await {
            Ok(q) => q.held_keys(limit).await,
            // No queue yet: no job, no key held.
            Err(QueueError::UnknownDestination(_)) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// `default`, and the registry's (see the module doc).
    async fn destination_names(&self) -> QueueResult<Vec<DestinationName>> {
        let registered: Vec<String> = self
            .base
            .raw(redis::cmd("SMEMBERS").arg(self.registry()))
            .await?;
        let mut names: std::collections::BTreeSet<DestinationName> = registered
            .iter()
            .filter_map(|d| DestinationName::parse(d))
            .collect();
        names.insert(DestinationName::DEFAULT);
        names.extend(
            self.others
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned(),
        );
        Ok(names.into_iter().collect())
    }
}

/// The destinations of a store written before the registry (its queues'
/// `meta` keys), found once by a `SCAN` in the background (a relay's start
/// does not wait for it) and registered.
async fn find_destinations(base: &BullQueue, registry: &str, prefix: &str) {
    let dotted = format!("{}.", prefix.trim_end_matches(':'));
    let pattern = format!("{dotted}*:meta");
    let mut cursor: u64 = 0;
    let mut found = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(10_000);
        let (next, keys): (u64, Vec<String>) = match base.raw(&cmd).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for the destinations of an earlier version's queue; start the relay again to retry");
                return;
            }
        };
        for d in keys
            .iter()
            .filter_map(|k| k.strip_prefix(&dotted)?.strip_suffix(":meta"))
            .filter_map(DestinationName::parse)
            .filter(|d| !d.is_default())
        {
            let added: QueueResult<i64> = base
                .raw(redis::cmd("SADD").arg(registry).arg(d.as_str()))
                .await;
            if added.is_ok_and(|n| n > 0) {
                found += 1;
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    if found > 0 {
        tracing::info!(found, "destinations of an earlier version's queue registered (counts, lists and the command line show them)");
    }
}

/// The most `rate_limit` a Redis queue's shared limit holds within 5%
/// (checked at start: `config`).
pub const MAX_RATE_LIMIT: u32 = 5_000;

/// BullMQ's limiter for `per_second` starts a second over every relay:
/// (`max`, `duration` ms). Its window opens at the first start after the
/// last one closed, and holds `max` starts; so any second holds at most
/// `max × (⌈1000 / duration⌉ + 1)` starts (with `max` 1, starts are a
/// `duration` apart: `⌈1000 / duration⌉`), and a destination kept busy gets
/// `1000 × max / duration` a second. The shape is the one that gives the
/// most of `per_second` without any second over 5% above it. `None`: no
/// limit (0).
pub fn limit_shape(per_second: u32) -> Option<(u32, u64)> {
    if per_second == 0 {
        return None;
    }
    let r = u64::from(per_second);
    let cap = r * 105 / 100;
    let rate = |m: u64, d: u64| 1000 * m * 1_000_000 / d; // millionths a second
    let mut shapes = Vec::new();
    for d in 1..=2_000u64 {
        let windows = 1000u64.div_ceil(d);
        // The most starts a window may hold: one spaces them `d` apart;
        // more bunch at a window's end (the worst case above).
        let one = u64::from(windows <= cap);
        let m = (cap / (windows + 1)).max(one);
        if m > 0 && rate(m, d) <= r * 1_000_000 {
            shapes.push((m, d));
        }
    }
    // The most of the rate; of shapes within 1% of it, the largest window
    // (a claim then takes many jobs at once, not one a round trip).
    let most = shapes.iter().map(|&(m, d)| rate(m, d)).max()?;
    let best = shapes
        .into_iter()
        .filter(|&(m, d)| rate(m, d) * 100 >= most * 99)
        .max_by_key(|&(m, d)| (m, std::cmp::Reverse(d)));
    best.map(|(m, d)| (m as u32, d))
}

fn by_destination(leases: Vec<LeaseRef>) -> BTreeMap<DestinationName, Vec<LeaseRef>> {
    let mut out: BTreeMap<DestinationName, Vec<LeaseRef>> = BTreeMap::new();
    for l in leases {
        out.entry(l.destination.clone()).or_default().push(l);
    }
    out
}

/// A queue that could not be opened, just now, for an event or a caller
/// that waited behind that try.
fn could_not_open(destination: &DestinationName) -> QueueError {
    QueueError::Unavailable(format!(
        "the queue of destination {destination} could not be opened just now; it is tried again shortly"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rate a destination may have: no second over 5% above it, and
    /// at least 95% of it for a busy destination.
    #[test]
    fn the_shared_limit_holds_every_rate_within_five_percent() {
        assert_eq!(limit_shape(0), None);
        for r in 1..=MAX_RATE_LIMIT {
            let (m, d) = limit_shape(r).unwrap_or_else(|| panic!("no shape for {r}"));
            let (m, d, r) = (u64::from(m), d, u64::from(r));
            let worst = if m == 1 {
                1000u64.div_ceil(d)
            } else {
                m * (1000u64.div_ceil(d) + 1)
            };
            assert!(
                worst * 100 <= r * 105,
                "{r}/s: {worst} in a second ({m} per {d} ms)"
            );
            let busy = 1000 * m * 100 / d;
            assert!(
                busy >= r * 95,
                "{r}/s: only {} a second ({m} per {d} ms)",
                busy / 100
            );
        }
    }
}
