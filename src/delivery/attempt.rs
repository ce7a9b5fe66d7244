//! One delivery attempt: the optional event lookup, the POST, the
//! classification of its answer, the decision ([`decide`], pure), and the
//! write-back.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use tokio::sync::OwnedSemaphorePermit;

use super::*;
use crate::cognigy::EventLookup;
use crate::event::EventKind;
use crate::queue::{now_ms, Attempt, AttemptOutcome, Disposition, Leased, Queue};
use backoff::Backoff;
use classify::{classify, AttemptResult, Outcome};

/// Where a job goes after attempt `n` with this outcome: a pure function of
/// the attempts allowed, the backoff, the clock (`now_ms`) and a random
/// `unit` in 0..1 for the jitter, so every case can be checked in a table.
fn decide(
    attempts: u32,
    backoff: &Backoff,
    n: u32,
    outcome: Outcome,
    now_ms: i64,
    unit: f64,
) -> (Disposition, AttemptOutcome) {
    match outcome {
        Outcome::Delivered => (Disposition::Completed, AttemptOutcome::Delivered),
        Outcome::Permanent { reason } => (Disposition::Failed { reason }, AttemptOutcome::Failed),
        Outcome::Retry { reason, .. } if n >= attempts => (
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
            let delay = backoff.delay(n, retry_after, unit);
            (
                Disposition::RetryAt {
                    due_at_ms: now_ms + delay.as_millis() as i64,
                    reason,
                },
                AttemptOutcome::Retry,
            )
        }
    }
}

/// [`decide`] now, with a fresh random jitter.
fn decide_now(cfg: &DeliveryConfig, n: u32, outcome: Outcome) -> (Disposition, AttemptOutcome) {
    decide(
        cfg.destination.attempts,
        &cfg.destination.backoff,
        n,
        outcome,
        now_ms(),
        fastrand::f64(),
    )
}

pub(super) async fn deliver<Q: Queue>(
    pool: Arc<Pool<Q>>,
    mut leased: Leased,
    permit: OwnedSemaphorePermit,
) {
    let n = leased.job.attempts_made + 1;
    let probe = leased.job.probe;
    let started_at_ms = now_ms();
    let t0 = Instant::now();
    let max_age = pool.cfg.destination.max_age;
    if let Some(created) = leased.job.created_at_ms {
        if started_at_ms.saturating_sub(created) > max_age.as_millis() as i64 {
            drop(permit);
            let reason = format!(
                "not delivered within max_age_secs ({} s)",
                max_age.as_secs()
            );
            let attempt = Attempt {
                n,
                started_at_ms,
                duration_ms: 0,
                status: None,
                error: Some(reason.clone()),
                outcome: AttemptOutcome::Failed,
            };
            record(&pool, leased, attempt, Disposition::Failed { reason }).await;
            return;
        }
    }
    if let (Some(client), EventKind::Envelope, Some(bot)) =
        (&pool.verifier, leased.job.kind, &leased.job.bot_id)
    {
        let outcome = match client.lookup_event(bot, &leased.job.event_id).await {
            EventLookup::Found => None,
            EventLookup::NotFound => Some(Outcome::Permanent {
                reason: "event not found in Cognigy".into(),
            }),
            EventLookup::Unavailable(reason) => Some(Outcome::Retry {
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
            let (disposition, result) = decide_now(&pool.cfg, n, outcome);
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
        .destination
        .signing_key
        .as_ref()
        .map(|key| signing::sign(key, job.key.as_str(), ts, &body));
    let sent = match target_headers(job, n, ts, signature.as_deref()) {
        Ok(mut headers) => {
            for (name, value) in &pool.cfg.destination.headers {
                if !headers.contains_key(name) {
                    headers.insert(name.clone(), value.clone());
                }
            }
            pool.target
                .post(headers, body, pool.cfg.destination.delivery_timeout)
                .await
        }
        Err(_) => Err(target::Failure::msg(
            "request failed: the event id or key cannot be a header value",
        )),
    };
    let duration_ms = t0.elapsed().as_millis() as u64;
    // The HTTP part is over: free the worker while the result is recorded.
    drop(permit);
    // One result: classified for the decision, kept for the history.
    let result = match &sent {
        Ok(answer) => AttemptResult::Response {
            status: answer.status,
            retry_after: answer.retry_after.as_deref(),
        },
        Err(f) if f.timed_out => AttemptResult::Timeout,
        Err(f) => AttemptResult::Transport(&f.message),
    };
    let classified = classify(&result, SystemTime::now());
    let (signal, hold) = circuit::signal(
        &result,
        &classified,
        pool.cfg.destination.backoff.max_retry_after,
    );
    // A change of the circuit is shared with the other relays where the
    // store can (Redis); a failure to share leaves this relay's own.
    match pool.circuit.record(signal, hold, probe) {
        Some((circuit::Phase::Open, cooldown)) => {
            let until = now_ms() + cooldown.as_millis() as i64;
            if let Err(e) = pool.queue.set_circuit(&pool.cfg.name, Some(until)).await {
                tracing::warn!(error = %e, "cannot share the open circuit with the other relays");
            }
        }
        Some((circuit::Phase::Closed, _)) => {
            if let Err(e) = pool.queue.set_circuit(&pool.cfg.name, None).await {
                tracing::warn!(error = %e, "cannot share the closed circuit with the other relays");
            }
        }
        _ => {}
    }
    let (disposition, outcome) = decide_now(&pool.cfg, n, classified);
    let error = match &sent {
        // A snippet of an error answer.
        Ok(answer) => {
            (!(200..300).contains(&answer.status) && !answer.body.is_empty()).then(|| {
                let b = &answer.body[..answer.body.len().min(ERROR_SNIPPET)];
                String::from_utf8_lossy(b).into_owned()
            })
        }
        Err(f) => Some(f.message.clone()),
    };
    let attempt = Attempt {
        n,
        started_at_ms,
        duration_ms,
        status: result.status(),
        error,
        outcome,
    };
    record(&pool, leased, attempt, disposition).await;
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
    pool.destination_metrics.attempt(attempt.outcome);
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
    use std::time::Duration;

    #[test]
    fn the_decision_after_an_attempt() {
        let backoff = Backoff {
            base: Duration::from_secs(2),
            jitter: 0.5,
            max_retry_after: Duration::from_secs(60),
        };
        let retry = |after: Option<u64>| Outcome::Retry {
            reason: "HTTP 503".into(),
            retry_after: after.map(Duration::from_secs),
        };
        let now = 1_000_000;
        let due = |ms: i64| Disposition::RetryAt {
            due_at_ms: now + ms,
            reason: "HTTP 503".into(),
        };
        let failed = |r: &str| Disposition::Failed { reason: r.into() };
        use AttemptOutcome as A;
        let table: Vec<(u32, Outcome, f64, (Disposition, AttemptOutcome))> = vec![
            (
                1,
                Outcome::Delivered,
                0.0,
                (Disposition::Completed, A::Delivered),
            ),
            (
                5,
                Outcome::Delivered,
                0.0,
                (Disposition::Completed, A::Delivered),
            ),
            (
                1,
                Outcome::Permanent {
                    reason: "HTTP 422".into(),
                },
                0.0,
                (failed("HTTP 422"), A::Failed),
            ),
            (1, retry(None), 0.0, (due(2_000), A::Retry)),
            (2, retry(None), 0.0, (due(4_000), A::Retry)),
            (4, retry(None), 0.0, (due(16_000), A::Retry)),
            (4, retry(None), 1.0, (due(8_000), A::Retry)), // jittered down by half at most
            (2, retry(Some(30)), 1.0, (due(30_000), A::Retry)), // Retry-After replaces the delay
            (2, retry(Some(3_600)), 0.0, (due(60_000), A::Retry)), // capped
            (
                5,
                retry(None),
                0.0,
                (failed("gave up after 5 attempts: HTTP 503"), A::Failed),
            ),
            (
                9,
                retry(Some(1)),
                0.0,
                (failed("gave up after 9 attempts: HTTP 503"), A::Failed),
            ),
        ];
        for (n, outcome, unit, want) in table {
            let got = decide(5, &backoff, n, outcome.clone(), now, unit);
            assert_eq!(got, want, "attempt {n}, {outcome:?}, jitter unit {unit}");
        }
        let one = decide(1, &backoff, 1, retry(None), now, 0.0);
        assert_eq!(one.0, failed("gave up after 1 attempt: HTTP 503"));
    }
}
