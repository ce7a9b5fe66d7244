//! The dispatcher: claims due jobs in batches, starts one delivery per free
//! worker, renews the leases it holds, and drains at shutdown (see the
//! module doc of [`super`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::attempt::deliver;
use super::circuit::{self, Gate};
use super::*;
use crate::cognigy::CognigyClient;
use crate::queue::{now_ms, Claimed, LeaseRef, Leased, Queue, QueueResult};

/// Runs the pool until `shutdown` turns true, then drains (see module doc).
pub async fn run<Q: Queue>(
    queue: Arc<Q>,
    cfg: DeliveryConfig,
    wake: Arc<Notify>,
    mut handoff: handoff::HandoffRx,
    metrics: Arc<crate::metrics::Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if cfg.pool.test_fault == Some(TestFault::FailAtStart) {
        anyhow::bail!("injected fault: the pool failed to start");
    }
    let target = target::Target::new(
        &cfg.destination.target,
        cfg.destination.concurrency,
        cfg.destination.delivery_timeout,
    )?;
    let verifier = cfg
        .pool
        .verify_events
        .clone()
        .map(CognigyClient::new)
        .transpose()?;
    // Up from here; down when this returns or unwinds.
    metrics
        .delivery_up
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _up = Up(metrics.clone());
    if cfg.pool.test_fault == Some(TestFault::PanicLater) {
        tokio::time::sleep(TestFault::PANIC_AFTER).await;
        panic!("injected fault: the pool panicked");
    }
    let cfg_name = cfg.name.clone();
    let circuit_settings = cfg.destination.circuit;
    let rate_limit = cfg.destination.rate_limit;
    let pool = Arc::new(Pool {
        queue,
        cfg,
        target,
        in_flight: InFlight::default(),
        wake: wake.clone(),
        verifier,
        destination_metrics: metrics.destination(&cfg_name),
        circuit: circuit::Circuit::new(&cfg_name, circuit_settings, metrics.clone()),
        limiter: (rate_limit > 0).then(|| {
            crate::window::Limiter::new(crate::window::RateLimit {
                max: rate_limit,
                per: Duration::from_secs(1),
            })
        }),
        metrics,
    });
    let semaphore = Arc::new(Semaphore::new(pool.cfg.destination.concurrency));
    let mut tasks = JoinSet::new();
    let renewer = (pool.cfg.renewals.clone())
        .unwrap_or_else(tokio::runtime::Handle::current)
        .spawn(renew_leases(pool.clone()));

    // Jobs claimed ahead of a free worker: claiming in batches keeps store round
    // trips per job low. They are leased and renewed like running ones.
    let mut ready: VecDeque<Leased> = VecDeque::new();
    let prefetch = (pool.cfg.destination.concurrency * 2).min(MAX_CLAIM);
    let take = |pool: &Pool<Q>, ready: &mut VecDeque<Leased>, job: Leased| {
        pool.in_flight.hold(&job.lease);
        ready.push_back(job);
    };
    // A claim runs beside the dispatching (its own task): while it is out, free
    // workers keep taking ready jobs. After a claim that came back short, the
    // store is rested until a wake-up (a job stored by the ingress, a retry
    // written back), the next due time, or IDLE_POLL. A paused destination's
    // rest is IDLE_POLL whatever the ingress stores (a resume shows within it).
    let mut claiming: Option<JoinHandle<(usize, QueueResult<Claimed>)>> = None;
    let mut rest_until: Option<Instant> = None;
    let mut paused = false;
    // The rate limit's next free slot, when the last start found none.
    let mut rate_until: Option<Instant> = None;
    let started = Instant::now();
    loop {
        while let Some(job) = handoff.try_recv() {
            take(&pool, &mut ready, job);
        }
        handoff.set_ready(ready.len());
        // An open circuit (or a `Retry-After` hold) starts nothing and claims
        // nothing: the jobs wait in the store with their attempts.
        let gate = pool.circuit.gate();
        let rate_wait = rate_until.filter(|t| *t > Instant::now());
        let can_start = gate == Gate::Go && rate_wait.is_none();
        let gate_until = match gate {
            Gate::Until(t) => Some(t),
            _ => rate_wait,
        };
        if claiming.is_none()
            && can_start
            && ready.len() < pool.cfg.destination.concurrency
            && rest_until.is_none_or(|t| Instant::now() >= t)
        {
            let (p, asked) = (pool.clone(), prefetch - ready.len());
            claiming = Some(tokio::spawn(async move {
                (
                    asked,
                    p.queue
                        .claim_for(&p.cfg.name, asked, p.cfg.pool.lock_duration)
                        .await,
                )
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
                paused = false;
                // A failed claim or a failed claim task: one way.
                let done = done
                    .map_err(|e| e.to_string())
                    .and_then(|(asked, r)| r.map(|c| (asked, c)).map_err(|e| e.to_string()));
                match done {
                    Ok((asked, claimed)) => {
                        paused = claimed.paused;
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
            p = semaphore.clone().acquire_owned(), if !ready.is_empty() && can_start => {
                let Ok(permit) = p else { break };
                // The rate limit's slot first: the circuit's probe, once
                // marked as started, must start.
                let slot = pool.limiter.as_ref().map_or(Ok(()), |l| l.try_acquire());
                match slot {
                    Err(until) => rate_until = Some(until.into_std()),
                    Ok(()) if pool.circuit.try_start() == Gate::Go => {
                        if let Some(leased) = ready.pop_front() {
                            tasks.spawn(deliver(pool.clone(), leased, permit));
                        }
                    }
                    Ok(()) => {}
                }
                while tasks.try_join_next().is_some() {}
            }
            _ = tokio::time::sleep_until(gate_until.unwrap_or(started).into()), if gate_until.is_some() => {}
            _ = pool.circuit.changed.notified(), if !can_start => {}
            job = handoff.recv(), if ready.is_empty() => {
                if let Some(job) = job {
                    take(&pool, &mut ready, job);
                }
            }
            _ = wake.notified(), if rest_until.is_some() && !paused => rest_until = None,
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
            grace_ms = pool.cfg.pool.shutdown_grace.as_millis() as u64,
            "finishing in-flight deliveries"
        );
    }
    let drained = tokio::time::timeout(pool.cfg.pool.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    // Awaited once aborted: the renewer holds the pool, and so the queue
    // (the embedded store's process lock), until it is really gone.
    renewer.abort();
    let _ = renewer.await;
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
    let every = pool.cfg.pool.lock_duration / 3;
    loop {
        tokio::time::sleep(every).await;
        let leases = pool.in_flight.all();
        if leases.is_empty() {
            continue;
        }
        if let Err(e) = pool.queue.renew(leases, pool.cfg.pool.lock_duration).await {
            tracing::warn!(error = %e, "cannot renew leases");
        }
    }
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
