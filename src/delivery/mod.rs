//! The worker pool: claims due jobs, delivers each as `POST TARGET_ENDPOINT`,
//! classifies the answer ([`classify`]) and writes the job back (SPEC §3.2).
//!
//! * One dispatcher task claims jobs in batches (up to 2 × `CONCURRENCY` leased
//!   ahead) and starts one delivery task per job whenever a worker permit is
//!   free (`CONCURRENCY` permits, held for the HTTP exchange). A claim runs as
//!   its own task, so free workers keep taking ready jobs while it is out.
//!   When the store has nothing due it is left alone until the next due time,
//!   a wake-up (a job the ingress stored for any worker, a retry written back),
//!   or one second (jobs changed by another process, e.g. an operator's retry
//!   or another relay).
//! * Retries are data, not sleeps: a failed attempt is written back as `delayed`
//!   with its due time; no worker waits on it.
//! * Leases of in-flight jobs are renewed every `LOCK_DURATION_MS / 3`, at the
//!   ingress's CPU priority (see `DeliveryConfig::renewals`).
//! * Shutdown: stop claiming, let in-flight deliveries finish for up to
//!   `SHUTDOWN_GRACE_MS`, then abort the rest and return their leases.

pub mod backoff;
pub mod classify;
pub mod handoff;
pub mod signing;
pub mod target;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::cognigy::CognigyClient;
use crate::config::{ServeConfig, TargetSigningKey};
use crate::ingress::envelope::EventKind;
use crate::queue::{
    now_ms, Attempt, AttemptOutcome, Claimed, Disposition, LeaseRef, Leased, Queue, QueueResult,
};
use backoff::Backoff;
use classify::{classify, AttemptResult, Outcome};

/// Most jobs claimed in one round trip to the store.
const MAX_CLAIM: usize = 256;
/// How long an idle dispatcher waits before looking at the store again.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Bytes of a target's answer kept in the attempt history.
const ERROR_SNIPPET: usize = 200;

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub target: reqwest::Url,
    pub delivery_timeout: Duration,
    pub attempts: u32,
    pub backoff: Backoff,
    pub signing_key: Option<TargetSigningKey>,
    pub concurrency: usize,
    pub lock_duration: Duration,
    pub shutdown_grace: Duration,
    /// Check each event envelope with Cognigy before delivering it.
    pub verify_events: Option<crate::cognigy::CognigyConfig>,
    /// Where the lease renewals run (None: beside the deliveries). Not at the
    /// deliveries' lower CPU priority: deliveries that a busy machine slows
    /// down must not also lose their leases to other relays (a duplicate).
    pub renewals: Option<tokio::runtime::Handle>,
    pub test_fault: Option<TestFault>,
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
    /// Lease renewals on the runtime this is called on (see `renewals`).
    pub fn renewing_here(self) -> Self {
        Self {
            renewals: Some(tokio::runtime::Handle::current()),
            ..self
        }
    }

    pub fn from_serve(c: &ServeConfig) -> Self {
        Self {
            target: c.target_endpoint.clone(),
            delivery_timeout: c.delivery_timeout,
            attempts: c.attempts,
            backoff: Backoff {
                base: c.backoff_delay,
                jitter: c.backoff_jitter,
                max_retry_after: c.max_retry_after,
            },
            signing_key: c.target_signing_key.clone(),
            concurrency: c.concurrency,
            lock_duration: c.lock_duration,
            shutdown_grace: c.shutdown_grace,
            verify_events: c.verify_events.clone(),
            test_fault: c.test_fault,
            renewals: None,
        }
    }
}

struct Pool<Q> {
    queue: Arc<Q>,
    cfg: DeliveryConfig,
    target: target::Target,
    /// Leases held by this pool, for renewal and for release at shutdown.
    in_flight: InFlight,
    /// Wakes the dispatcher: new jobs (ingress) and finished deliveries (a retry
    /// may now be the earliest due job, and a worker is free).
    wake: Arc<Notify>,
    /// One client (one token cache) for every worker's event verification.
    verifier: Option<CognigyClient>,
    metrics: Arc<crate::admin::metrics::Metrics>,
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

/// Clears `delivery_up` when the pool ends, however it ends.
struct Up(Arc<crate::admin::metrics::Metrics>);

impl Drop for Up {
    fn drop(&mut self) {
        self.0
            .delivery_up
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs the pool until `shutdown` turns true, then drains (see module doc).
pub async fn run<Q: Queue>(
    queue: Arc<Q>,
    cfg: DeliveryConfig,
    wake: Arc<Notify>,
    mut handoff: handoff::HandoffRx,
    metrics: Arc<crate::admin::metrics::Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if cfg.test_fault == Some(TestFault::FailAtStart) {
        anyhow::bail!("injected fault: the pool failed to start");
    }
    let target = target::Target::new(&cfg.target, cfg.concurrency, cfg.delivery_timeout)?;
    let verifier = cfg
        .verify_events
        .clone()
        .map(CognigyClient::new)
        .transpose()?;
    // Up from here; down when this returns or unwinds.
    metrics
        .delivery_up
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _up = Up(metrics.clone());
    if cfg.test_fault == Some(TestFault::PanicLater) {
        tokio::time::sleep(TestFault::PANIC_AFTER).await;
        panic!("injected fault: the pool panicked");
    }
    let pool = Arc::new(Pool {
        queue,
        cfg,
        target,
        in_flight: InFlight::default(),
        wake: wake.clone(),
        verifier,
        metrics,
    });
    let semaphore = Arc::new(Semaphore::new(pool.cfg.concurrency));
    let mut tasks = JoinSet::new();
    let renewer = (pool.cfg.renewals.clone())
        .unwrap_or_else(tokio::runtime::Handle::current)
        .spawn(renew_leases(pool.clone()));

    // Jobs claimed ahead of a free worker: claiming in batches keeps store round
    // trips per job low. They are leased and renewed like running ones.
    let mut ready: VecDeque<Leased> = VecDeque::new();
    let prefetch = (pool.cfg.concurrency * 2).min(MAX_CLAIM);
    let take = |pool: &Pool<Q>, ready: &mut VecDeque<Leased>, job: Leased| {
        pool.in_flight.hold(&job.lease);
        ready.push_back(job);
    };
    // A claim runs beside the dispatching (its own task): while it is out, free
    // workers keep taking ready jobs. After a claim that came back short, the
    // store is rested until a wake-up (a job stored by the ingress, a retry
    // written back), the next due time, or IDLE_POLL.
    let mut claiming: Option<JoinHandle<(usize, QueueResult<Claimed>)>> = None;
    let mut rest_until: Option<Instant> = None;
    let started = Instant::now();
    loop {
        while let Some(job) = handoff.try_recv() {
            take(&pool, &mut ready, job);
        }
        handoff.set_ready(ready.len());
        if claiming.is_none()
            && ready.len() < pool.cfg.concurrency
            && rest_until.is_none_or(|t| Instant::now() >= t)
        {
            let (p, asked) = (pool.clone(), prefetch - ready.len());
            claiming = Some(tokio::spawn(async move {
                (asked, p.queue.claim(asked, p.cfg.lock_duration).await)
            }));
        }
        // Any instant will do while the rest branch is off.
        let rest = rest_until.unwrap_or(started);
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            done = claim_result(&mut claiming) => {
                claiming = None;
                rest_until = None;
                // A failed claim or a failed claim task: one way.
                let done = done
                    .map_err(|e| e.to_string())
                    .and_then(|(asked, r)| r.map(|c| (asked, c)).map_err(|e| e.to_string()));
                match done {
                    Ok((asked, claimed)) => {
                        if claimed.jobs.len() < asked {
                            let wait = claimed
                                .next_due_ms
                                .map(|due| Duration::from_millis(due.saturating_sub(now_ms()).max(0) as u64))
                                .unwrap_or(IDLE_POLL)
                                .min(IDLE_POLL);
                            rest_until = Some(Instant::now() + wait);
                        }
                        for job in claimed.jobs {
                            take(&pool, &mut ready, job);
                        }
                    }
                    Err(e) => {
                        if ready.is_empty() {
                            tracing::error!(error = %e, "cannot claim jobs; trying again in 1 s");
                        } else {
                            tracing::warn!(error = %e, "cannot claim more jobs; trying again in 1 s");
                        }
                        rest_until = Some(Instant::now() + IDLE_POLL);
                    }
                }
            }
            p = semaphore.clone().acquire_owned(), if !ready.is_empty() => {
                let Ok(permit) = p else { break };
                if let Some(leased) = ready.pop_front() {
                    tasks.spawn(deliver(pool.clone(), leased, permit));
                }
                while tasks.try_join_next().is_some() {}
            }
            job = handoff.recv(), if ready.is_empty() => {
                if let Some(job) = job {
                    take(&pool, &mut ready, job);
                }
            }
            _ = wake.notified(), if rest_until.is_some() => rest_until = None,
            _ = tokio::time::sleep_until(rest.into()), if rest_until.is_some() => rest_until = None,
        }
    }
    // A claim still out: its jobs are taken back with the rest.
    if let Some(Ok((_, Ok(claimed)))) = match claiming {
        Some(h) => Some(h.await),
        None => None,
    } {
        for job in claimed.jobs {
            take(&pool, &mut ready, job);
        }
    }
    // Claimed (or handed off) but never started: straight back to the queue.
    for job in handoff.close() {
        take(&pool, &mut ready, job);
    }
    // A failure to give them back is reported at the end, after the drain:
    // the deliveries in flight still finish and record their results.
    let mut released = Ok(());
    if !ready.is_empty() {
        let leases: Vec<LeaseRef> = ready.drain(..).map(|l| l.lease).collect();
        for l in &leases {
            pool.in_flight.ended(l);
        }
        if let Err(e) = pool.queue.release(leases).await {
            tracing::error!(error = %e, "cannot return unstarted jobs to the queue; they are taken over when their leases expire");
            released = Err(e);
        }
    }

    // Drain: let in-flight deliveries finish within the grace period.
    while tasks.try_join_next().is_some() {}
    let busy = tasks.len();
    if busy > 0 {
        tracing::info!(
            in_flight = busy,
            grace_ms = pool.cfg.shutdown_grace.as_millis() as u64,
            "finishing in-flight deliveries"
        );
    }
    let drained = tokio::time::timeout(pool.cfg.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    renewer.abort();
    if drained.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let leases = pool.in_flight.take_all();
        tracing::warn!(
            returned = leases.len(),
            "grace period over: unfinished deliveries go back to the queue"
        );
        pool.queue.release(leases).await?;
    }
    released.map_err(Into::into)
}

async fn renew_leases<Q: Queue>(pool: Arc<Pool<Q>>) {
    let every = pool.cfg.lock_duration / 3;
    loop {
        tokio::time::sleep(every).await;
        let leases = pool.in_flight.all();
        if leases.is_empty() {
            continue;
        }
        if let Err(e) = pool.queue.renew(leases, pool.cfg.lock_duration).await {
            tracing::warn!(error = %e, "cannot renew leases");
        }
    }
}

/// Result of checking an event with Cognigy (SPEC §3.2, `VERIFY_EVENTS`).
enum Verification {
    Confirmed,
    /// 404: the event does not exist in Cognigy; delivering it would be wrong.
    NotFound,
    /// Anything else (auth, 5xx, network): try the attempt again later.
    Unavailable(String),
}

async fn verify_event(client: &CognigyClient, bot: &str, event: &str) -> Verification {
    let Some(url) = client.event_url(bot, event) else {
        return Verification::NotFound;
    };
    match client
        .send(
            reqwest::Method::GET,
            url,
            &[],
            None,
            "the event verification",
        )
        .await
    {
        Ok(a) if a.status.is_success() => Verification::Confirmed,
        Ok(a) if a.status == reqwest::StatusCode::NOT_FOUND => Verification::NotFound,
        Ok(a) => Verification::Unavailable(format!(
            "event verification: Cognigy answered HTTP {}: {}",
            a.status.as_u16(),
            crate::cognigy::detail(&a.json)
        )),
        Err(e) => Verification::Unavailable(format!("event verification: {e}")),
    }
}

/// Where a job goes after attempt `n` with this outcome.
fn decide(cfg: &DeliveryConfig, n: u32, outcome: Outcome) -> (Disposition, AttemptOutcome) {
    match outcome {
        Outcome::Delivered => (Disposition::Completed, AttemptOutcome::Delivered),
        Outcome::Permanent { reason } => (Disposition::Failed { reason }, AttemptOutcome::Failed),
        Outcome::Retry { reason, .. } if n >= cfg.attempts => (
            Disposition::Failed {
                reason: format!(
                    "gave up after {n} attempt{}: {reason}",
                    if n == 1 { "" } else { "s" }
                ),
            },
            AttemptOutcome::Failed,
        ),
        Outcome::Retry {
            reason,
            retry_after,
        } => {
            let delay = cfg.backoff.delay(n, retry_after, fastrand::f64());
            (
                Disposition::RetryAt {
                    due_at_ms: now_ms() + delay.as_millis() as i64,
                    reason,
                },
                AttemptOutcome::Retry,
            )
        }
    }
}

async fn deliver<Q: Queue>(pool: Arc<Pool<Q>>, mut leased: Leased, permit: OwnedSemaphorePermit) {
    let n = leased.job.attempts_made + 1;
    let started_at_ms = now_ms();
    let t0 = Instant::now();
    if let (Some(client), EventKind::Envelope, Some(bot)) =
        (&pool.verifier, leased.job.kind, &leased.job.bot_id)
    {
        let outcome = match verify_event(client, bot, &leased.job.event_id).await {
            Verification::Confirmed => None,
            Verification::NotFound => Some(Outcome::Permanent {
                reason: "event not found in Cognigy".into(),
            }),
            Verification::Unavailable(reason) => Some(Outcome::Retry {
                reason,
                retry_after: None,
            }),
        };
        if let Some(outcome) = outcome {
            drop(permit);
            let error = match &outcome {
                Outcome::Permanent { reason } | Outcome::Retry { reason, .. } => {
                    Some(reason.clone())
                }
                Outcome::Delivered => None,
            };
            let (disposition, result) = decide(&pool.cfg, n, outcome);
            let attempt = Attempt {
                n,
                started_at_ms,
                duration_ms: t0.elapsed().as_millis() as u64,
                status: None,
                error,
                outcome: result,
            };
            record(&pool, leased, attempt, disposition).await;
            return;
        }
    }
    let job = &mut leased.job;
    let body = std::mem::take(&mut job.body);
    let ts = started_at_ms / 1000;
    let signature = pool
        .cfg
        .signing_key
        .as_ref()
        .map(|key| signing::sign(key, job.key.as_str(), ts, &body));
    let sent = match target_headers(job, n, ts, signature.as_deref()) {
        Ok(headers) => {
            pool.target
                .post(headers, body, pool.cfg.delivery_timeout)
                .await
        }
        Err(_) => Err(target::Failure::msg(
            "request failed: the event id or key cannot be a header value",
        )),
    };
    let (status, retry_after, error, timed_out) = match sent {
        Ok(answer) => {
            // Keep a snippet of an error answer.
            let snippet =
                (!(200..300).contains(&answer.status) && !answer.body.is_empty()).then(|| {
                    let b = &answer.body[..answer.body.len().min(ERROR_SNIPPET)];
                    String::from_utf8_lossy(b).into_owned()
                });
            (Some(answer.status), answer.retry_after, snippet, false)
        }
        Err(f) => (None, None, Some(f.message), f.timed_out),
    };
    let duration_ms = t0.elapsed().as_millis() as u64;
    // The HTTP part is over: free the worker while the result is recorded.
    drop(permit);
    let result = match (status, timed_out) {
        (Some(status), _) => AttemptResult::Response {
            status,
            retry_after: retry_after.as_deref(),
        },
        (None, true) => AttemptResult::Timeout,
        (None, false) => AttemptResult::Transport(error.clone().unwrap_or_default()),
    };
    let (disposition, outcome) = decide(&pool.cfg, n, classify(&result, SystemTime::now()));
    let attempt = Attempt {
        n,
        started_at_ms,
        duration_ms,
        status,
        error,
        outcome,
    };
    record(&pool, leased, attempt, disposition).await;
}

/// The result of the claim in flight; never ready when there is none.
async fn claim_result(
    claiming: &mut Option<JoinHandle<(usize, QueueResult<Claimed>)>>,
) -> Result<(usize, QueueResult<Claimed>), tokio::task::JoinError> {
    match claiming {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

/// Logs the attempt, writes it back and frees the lease; a retry wakes the
/// dispatcher (its due time may be the next one).
async fn record<Q: Queue>(
    pool: &Pool<Q>,
    leased: Leased,
    attempt: Attempt,
    disposition: Disposition,
) {
    let n = attempt.n;
    pool.metrics
        .attempt(attempt.outcome, Duration::from_millis(attempt.duration_ms));
    match &disposition {
        Disposition::Completed => {
            tracing::debug!(job = %leased.job.id, attempt = n, duration_ms = attempt.duration_ms, "delivered")
        }
        Disposition::RetryAt { due_at_ms, reason } => tracing::info!(
            job = %leased.job.id, attempt = n, reason = %reason,
            retry_in_ms = due_at_ms - now_ms(), "delivery failed; will retry"
        ),
        Disposition::Failed { reason } => {
            tracing::warn!(job = %leased.job.id, attempt = n, reason = %reason, "delivery failed permanently; job is in the failed list")
        }
    }
    let lease = leased.lease.clone();
    let job_id = &lease.job_id;
    let retry = matches!(disposition, Disposition::RetryAt { .. });
    match pool.queue.finish(leased, attempt, disposition).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(job = %job_id, "lease was lost before the result was recorded; another worker owns the job")
        }
        Err(e) => {
            tracing::error!(job = %job_id, error = %e, "cannot record the delivery result; the job will be retried when its lease expires")
        }
    }
    pool.in_flight.ended(&lease);
    if retry {
        pool.wake.notify_one();
    }
}

/// The headers of attempt `n` of `job` (SPEC §3.2), with the Standard Webhooks
/// ones when the target is signed (`signature` made at `ts`, unix seconds).
fn target_headers(
    job: &crate::queue::DeliveryJob,
    n: u32,
    ts: i64,
    signature: Option<&str>,
) -> Result<HeaderMap, reqwest::header::InvalidHeaderValue> {
    let mut h = HeaderMap::with_capacity(8);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("x-event-id", HeaderValue::from_str(&job.event_id)?);
    h.insert(
        "x-source",
        HeaderValue::from_static("cognigy-webhook-relay"),
    );
    h.insert("idempotency-key", HeaderValue::from_str(job.key.as_str())?);
    h.insert("x-delivery-attempt", HeaderValue::from(n));
    if let Some(signature) = signature {
        h.insert("webhook-id", HeaderValue::from_str(job.key.as_str())?);
        h.insert("webhook-timestamp", HeaderValue::from(ts));
        h.insert("webhook-signature", HeaderValue::from_str(signature)?);
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(job: &str, token: &str) -> LeaseRef {
        LeaseRef {
            job_id: job.into(),
            token: token.into(),
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
