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
//!   one); a tool finds the queues there are by their `meta` keys.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::queue::{parse_jobs_text, JobRef, DEFAULT_DESTINATION};

/// The queue name of `destination`'s jobs.
pub fn queue_name(base: &str, destination: &str) -> String {
    if destination == DEFAULT_DESTINATION {
        base.to_string()
    } else {
        format!("{base}.{destination}")
    }
}

/// An event for the routed add script.
struct RoutedJob {
    dedup_id: String,
    data: String,
    opts: String,
    lock: Option<(String, u64)>,
    /// Each destination's queue key prefix and name.
    targets: Vec<(String, String)>,
}

/// What the routed add did with one event.
enum RoutedAdded {
    /// (destination, id, added locked)
    Added(Vec<(String, String, bool)>),
    /// The first event's dedup record.
    Duplicate(Vec<JobRef>),
}

pub struct RedisQueues {
    opts: RedisOptions,
    /// `QUEUE_NAME`: the `default` destination's queue, the id counter and
    /// the dedup keys.
    base: Arc<RedisQueue>,
    /// The other destinations' queues. A plain lock, never held across an
    /// await: a tokio `RwLock` read on every add cost a quarter of the
    /// relay's CPU on Redis (docs/benchmark.md).
    others: std::sync::RwLock<BTreeMap<String, Arc<RedisQueue>>>,
    /// Whether `others` holds any queue (read on every add).
    has_others: std::sync::atomic::AtomicBool,
    /// Held while a queue is being opened, so that it is opened once.
    opening: tokio::sync::Mutex<()>,
    adds: Batcher<RoutedJob, RoutedAdded>,
}

impl std::fmt::Debug for RedisQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueues")
            .field("queue_name", &self.opts.queue_name)
            .finish_non_exhaustive()
    }
}

impl RedisQueues {
    /// Opens `QUEUE_NAME` and the destinations' queues found beside it.
    pub async fn connect(opts: RedisOptions) -> Result<Self, QueueError> {
        let base = Arc::new(
            RedisQueue::connect(RedisOptions {
                destination: DEFAULT_DESTINATION.into(),
                ..opts.clone()
            })
            .await?,
        );
        let hot = base.hot.clone();
        let script = Arc::new(redis::Script::new(include_str!("../lua/add_routed.lua")));
        let ttl_ms = opts.settings.dedup_ttl.as_millis() as u64;
        let adds = Batcher::spawn(MAX_BATCH, move |jobs: Vec<RoutedJob>| {
            let (hot, script) = (hot.clone(), script.clone());
            async move { add_routed(&hot, &script, jobs, ttl_ms).await }
        });
        let queues = Self {
            opts,
            base,
            others: Default::default(),
            has_others: Default::default(),
            opening: Default::default(),
            adds,
        };
        for name in queues.found_destinations().await? {
            queues.queue(&name).await?;
        }
        Ok(queues)
    }

    /// Destinations whose queues exist beside `QUEUE_NAME` (`meta` keys).
    async fn found_destinations(&self) -> QueueResult<Vec<String>> {
        let pattern = format!("{}*:meta", self.base.hot.key("").trim_end_matches(':'));
        let dotted = format!("{}.", self.base.hot.key("").trim_end_matches(':'));
        let mut cmd = redis::cmd("KEYS");
        cmd.arg(&pattern);
        let keys: Vec<String> = self.base.raw(&cmd).await?;
        Ok(keys
            .iter()
            .filter_map(|k| k.strip_prefix(&dotted))
            .filter_map(|k| k.strip_suffix(":meta"))
            .filter(|d| crate::destination::valid_name(d))
            .map(str::to_string)
            .collect())
    }

    /// `destination`'s queue, opened on first use.
    async fn queue(&self, destination: &str) -> QueueResult<Arc<RedisQueue>> {
        if destination == DEFAULT_DESTINATION {
            return Ok(self.base.clone());
        }
        if let Some(q) = self.opened(destination) {
            return Ok(q);
        }
        let _opening = self.opening.lock().await;
        if let Some(q) = self.opened(destination) {
            return Ok(q);
        }
        let q = Arc::new(
            RedisQueue::connect(RedisOptions {
                queue_name: queue_name(&self.opts.queue_name, destination),
                destination: destination.to_string(),
                ..self.opts.clone()
            })
            .await?,
        );
        self.others
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(destination.to_string(), q.clone());
        self.has_others
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(q)
    }

    fn opened(&self, destination: &str) -> Option<Arc<RedisQueue>> {
        self.others
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(destination)
            .cloned()
    }

    /// Every queue opened: `default`'s first.
    async fn all(&self) -> Vec<Arc<RedisQueue>> {
        let mut all = vec![self.base.clone()];
        let others = self.others.read().unwrap_or_else(|p| p.into_inner());
        all.extend(others.values().cloned());
        all
    }

    /// The queue holding job `id`, if any.
    async fn holding(&self, id: &str) -> QueueResult<Arc<RedisQueue>> {
        for q in self.all().await {
            match q.get(id).await {
                Ok(_) => return Ok(q),
                Err(QueueError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(QueueError::NotFound(id.to_string()))
    }
}

async fn add_routed(
    hot: &Hot,
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
            .arg(j.targets.len());
        for (prefix, name) in &j.targets {
            call.arg(prefix).arg(name);
        }
    }
    let out: Vec<(String, String)> = hot.invoke_on(&hot.ingress, &call).await?;
    Ok(out
        .into_iter()
        .map(|(kind, text)| match kind.as_str() {
            "d" if text.contains('=') => RoutedAdded::Duplicate(parse_jobs_text(&text)),
            "d" => RoutedAdded::Duplicate(vec![JobRef {
                destination: DEFAULT_DESTINATION.into(),
                id: text,
            }]),
            _ => RoutedAdded::Added(
                text.split(',')
                    .filter_map(|part| {
                        let mut it = part.split('=');
                        Some((
                            it.next()?.to_string(),
                            it.next()?.to_string(),
                            it.next()? == "l",
                        ))
                    })
                    .collect(),
            ),
        })
        .collect())
}

impl Queue for RedisQueues {
    async fn store(
        &self,
        event: Event,
        destinations: Vec<String>,
        lease: Option<Duration>,
    ) -> QueueResult<(Routed, Vec<Leased>)> {
        // One relay, one `default` destination: its own queue's add, as
        // before destinations.
        if destinations == [DEFAULT_DESTINATION]
            && !self.has_others.load(std::sync::atomic::Ordering::Acquire)
        {
            return self.base.store(event, destinations, lease).await;
        }
        let mut targets = Vec::with_capacity(destinations.len());
        for d in &destinations {
            let q = self.queue(d).await?;
            targets.push((q.hot.prefix.clone(), d.clone()));
        }
        let (dedup_id, data, opts) = self.base.job_fields(&event, None)?;
        let token = lease.map(|_| self.base.hot.token());
        let lock = token.clone().zip(lease.map(|l| l.as_millis() as u64));
        let added = self
            .adds
            .call(RoutedJob {
                dedup_id,
                data,
                opts,
                lock,
                targets,
            })
            .await?;
        Ok(match added {
            RoutedAdded::Duplicate(jobs) => (
                Routed {
                    duplicate: true,
                    jobs,
                },
                Vec::new(),
            ),
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

    async fn claim_for(
        &self,
        destination: &str,
        max: usize,
        lease: Duration,
    ) -> QueueResult<Claimed> {
        self.queue(destination)
            .await?
            .claim_for(destination, max, lease)
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
    /// claim and add scripts of every relay).
    async fn set_circuit(&self, destination: &str, open_until_ms: Option<i64>) -> QueueResult<()> {
        let q = self.queue(destination).await?;
        let meta = q.hot.key("meta");
        let mut cmd;
        match open_until_ms {
            Some(until) => {
                cmd = redis::cmd("HSET");
                let cooldown = (until - crate::time::now_ms()).max(1);
                // The probe comes after the new cool-down, whoever takes it.
                cmd.arg(&meta)
                    .arg("cg:openUntil")
                    .arg(until)
                    .arg("cg:probeUntil")
                    .arg(until)
                    .arg("cg:cooldown")
                    .arg(cooldown);
            }
            None => {
                cmd = redis::cmd("HDEL");
                cmd.arg(&meta)
                    .arg("cg:openUntil")
                    .arg("cg:probeUntil")
                    .arg("cg:cooldown");
            }
        }
        let _: i64 = q.raw(&cmd).await?;
        Ok(())
    }

    async fn ping(&self) -> QueueResult<()> {
        self.base.ping().await
    }

    async fn check_stalled(&self) -> QueueResult<u64> {
        let mut n = 0;
        for q in self.all().await {
            n += q.check_stalled().await?;
        }
        Ok(n)
    }

    fn durability_risks(&self) -> Vec<(&'static str, bool)> {
        self.base.durability_risks()
    }

    async fn close(&self) -> QueueResult<()> {
        for q in self.all().await {
            q.close().await?;
        }
        Ok(())
    }
}

fn by_destination(leases: Vec<LeaseRef>) -> BTreeMap<String, Vec<LeaseRef>> {
    let mut out: BTreeMap<String, Vec<LeaseRef>> = BTreeMap::new();
    for l in leases {
        out.entry(l.destination.clone()).or_default().push(l);
    }
    out
}

impl Operate for RedisQueues {
    async fn counts_for(&self, destination: Option<&str>) -> QueueResult<Counts> {
        if let Some(d) = destination {
            return self.queue(d).await?.counts().await;
        }
        let mut sum = Counts::default();
        for q in self.all().await {
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
        destination: Option<&str>,
        offset: u64,
        limit: u64,
    ) -> QueueResult<Page> {
        if let Some(d) = destination {
            return self.queue(d).await?.list(state, offset, limit).await;
        }
        let all = self.all().await;
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
        self.holding(id).await?.retry(id).await
    }

    async fn retry_all_failed_for(&self, destination: Option<&str>) -> QueueResult<u64> {
        if let Some(d) = destination {
            return self.queue(d).await?.retry_all_failed().await;
        }
        let mut n = 0;
        for q in self.all().await {
            n += q.retry_all_failed().await?;
        }
        Ok(n)
    }

    async fn remove(&self, id: &str) -> QueueResult<()> {
        self.holding(id).await?.remove(id).await
    }

    async fn set_paused(&self, destination: &str, paused: bool) -> QueueResult<()> {
        self.queue(destination)
            .await?
            .set_paused(destination, paused)
            .await
    }

    async fn is_paused(&self, destination: &str) -> QueueResult<bool> {
        self.queue(destination).await?.is_paused(destination).await
    }

    /// BullMQ's global rate limit on the destination's queue (`max` jobs a
    /// `duration` ms, in its meta hash, enforced by the claim script for
    /// every relay): one job each `1050 / per_second` ms, so that no second
    /// holds more than `per_second` starts wherever they are claimed (a fixed
    /// window of `per_second` a second would allow twice that across its
    /// edge). With 0 the limit is taken off.
    async fn set_rate_limit(&self, destination: &str, per_second: u32) -> QueueResult<()> {
        let q = self.queue(destination).await?;
        let meta = q.hot.key("meta");
        let cmd = if per_second == 0 {
            let mut c = redis::cmd("HDEL");
            c.arg(&meta).arg("max").arg("duration");
            c
        } else {
            let spacing_ms = 1050_u64.div_ceil(u64::from(per_second));
            let mut c = redis::cmd("HSET");
            c.arg(&meta)
                .arg("max")
                .arg(1)
                .arg("duration")
                .arg(spacing_ms.max(1));
            c
        };
        let _: i64 = q.raw(&cmd).await?;
        Ok(())
    }

    async fn destination_names(&self) -> QueueResult<Vec<String>> {
        let mut names = vec![DEFAULT_DESTINATION.to_string()];
        names.extend(
            self.others
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned(),
        );
        names.sort();
        Ok(names)
    }
}
