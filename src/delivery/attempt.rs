//! One delivery attempt: the optional event lookup, the POST, the
//! classification of its answer, the decision ([`decide`], pure), and the
//! write-back.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};

use super::{backoff, classify, signing, target, DeliverySettings, Duration, Pool, ERROR_SNIPPET};
use crate::cognigy::EventLookup;
use crate::delivery::circuit;
use crate::event::EventKind;
use crate::queue::{Attempt, Disposition, Leased, Queue};
use backoff::Backoff;
use classify::{classify, Outcome};

/// What decides where a job goes after an attempt: a destination's
/// attempts, backoff and age limit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Policy {
    pub(super) attempts: u32,
    pub(super) backoff: Backoff,
    pub(super) max_age: std::time::Duration,
}

impl Policy {
    pub(super) fn of(d: &DeliverySettings) -> Self {
        Self {
            attempts: d.attempts,
            backoff: d.backoff,
            max_age: d.max_age,
        }
    }
}

/// Where a job goes after attempt `n` with this outcome: a pure function of
/// the policy, the clock (`now_ms`), when the job was stored, and a random
/// `unit` in 0..1 for the jitter, so every case can be checked in a table.
/// The age limit is checked after a failed attempt, never instead of one
/// (SPEC §7): a job retried by an operator, held by a pause or by an open
/// circuit is always tried again first. A circuit's `trial` that fails
/// retryably is not failed for its attempt count: the round judges the
/// destination, and a job held by an open circuit keeps its remaining
/// attempts (its next ordinary attempt is its last). Its delay is then its
/// last ordinary attempt's: one doubled at each round of a long outage (the
/// most retried job is a round's trial) held it for hours after the
/// destination was back.
pub(super) fn decide(
    p: &Policy,
    n: u32,
    outcome: Outcome,
    now_ms: i64,
    unit: f64,
    created_at_ms: Option<i64>,
    trial: bool,
) -> Disposition {
    match outcome {
        Outcome::Delivered => Disposition::Completed,
        Outcome::Permanent { reason } => Disposition::Failed { reason },
        Outcome::Retry { reason, .. } if n >= p.attempts && !trial => Disposition::Failed {
            reason: format!(
                "gave up after {n} attempt{}: {reason}",
                if n == 1 { "" } else { "s" }
            ),
        },
        Outcome::Retry { reason, .. }
            if created_at_ms.is_some_and(|c| {
                now_ms.saturating_sub(c) > i64::try_from(p.max_age.as_millis()).unwrap_or(i64::MAX)
            }) =>
        {
            Disposition::Failed {
                reason: format!(
                    "not delivered within max_age_secs ({} s): {reason}",
                    p.max_age.as_secs()
                ),
            }
        }
        Outcome::Retry {
            reason,
            retry_after,
        } => {
            let n = if trial {
                n.min(p.attempts.saturating_sub(1).max(1))
            } else {
                n
            };
            let delay = p.backoff.delay(n, retry_after, unit);
            let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            Disposition::RetryAt {
                due_at_ms: now_ms.saturating_add(delay_ms),
                reason,
            }
        }
    }
}

/// How a delivery task ends, for the dispatcher: the breaker's verdict on
/// it, or the job back unsent.
#[derive(Debug)]
pub(super) enum Verdict {
    /// The request went out (or the Cognigy lookup failed): what it says
    /// of the destination, and a `Retry-After` hold.
    Sent {
        signal: circuit::Signal,
        hold: Option<std::time::Duration>,
    },
    /// Not sent: a pause was told (or the pause lease ran out) after the
    /// dispatcher started it. The job goes back to the store unattempted.
    NotSent(Box<Leased>),
}

/// A delivery's end, as the dispatcher hears it (before the result is
/// written back: the worker is free once the HTTP exchange is over).
#[derive(Debug)]
pub(super) struct Done {
    pub(super) lease: crate::queue::LeaseRef,
    pub(super) trial: bool,
    pub(super) verdict: Verdict,
}

/// One delivery: the optional Cognigy lookup, the POST (unless the pause
/// gate closed meanwhile), the verdict to the dispatcher, the decision and
/// the write-back.
pub(super) async fn deliver(
    pool: Arc<Pool>,
    mut leased: Leased,
    trial: bool,
    done: tokio::sync::mpsc::UnboundedSender<Done>,
) {
    let n = leased.job.attempts_made + 1;
    let lease = leased.lease.clone();
    let tell = |verdict: Verdict| {
        let _ = done.send(Done {
            lease: lease.clone(),
            trial,
            verdict,
        });
    };
    let started_at_ms = pool.clock.now_ms();
    let t0 = Instant::now();
    let policy = Policy::of(&pool.cfg.destination);
    let created = leased.job.created_at_ms;
    if let Some(outcome) = verify(&pool, &leased.job).await {
        // Cognigy's trouble, not the destination's: no verdict on it.
        tell(Verdict::Sent {
            signal: circuit::Signal::None,
            hold: None,
        });
        let error = match &outcome {
            Outcome::Permanent { reason } | Outcome::Retry { reason, .. } => Some(reason.clone()),
            Outcome::Delivered => None,
        };
        let now = pool.clock.now_ms();
        let disposition = decide(&policy, n, outcome, now, fastrand::f64(), created, trial);
        let attempt = Attempt {
            n,
            started_at_ms,
            duration_ms: t0.elapsed().as_millis() as u64,
            status: None,
            error,
            outcome: disposition.attempt_outcome(),
        };
        record(&pool, leased, attempt, disposition).await;
        return;
    }
    // The last look at the pause: a pause told after the dispatcher started
    // this delivery stops it here, before anything is sent.
    if !pool.gate.may_send(pool.clock.mono_ms()) {
        tell(Verdict::NotSent(Box::new(leased)));
        return;
    }
    let sent = send(&pool, &mut leased.job, n, started_at_ms).await;
    let duration_ms = t0.elapsed().as_millis() as u64;
    // One result per stage: what was sent came to an outcome (classify),
    // and the outcome to a disposition (decide); the breaker reads both.
    let classified = classify(&sent, SystemTime::now());
    let (signal, hold) = circuit::signal(
        &sent,
        &classified,
        pool.cfg.destination.backoff.max_retry_after,
    );
    // The HTTP part is over: the worker is free, the breaker hears of it.
    tell(Verdict::Sent { signal, hold });
    let now = pool.clock.now_ms();
    let disposition = decide(&policy, n, classified, now, fastrand::f64(), created, trial);
    let attempt = Attempt {
        n,
        started_at_ms,
        duration_ms,
        status: sent.as_ref().ok().map(|a| a.status),
        error: error_of(&sent),
        outcome: disposition.attempt_outcome(),
    };
    record(&pool, leased, attempt, disposition).await;
}

/// The event looked up in Cognigy first (`VERIFY_EVENTS`, envelopes with a
/// bot): an outcome when it is not to be sent (not found: permanent;
/// Cognigy unavailable: retry), `None` when it is.
async fn verify(pool: &Pool, job: &crate::queue::DeliveryJob) -> Option<Outcome> {
    let (Some(client), EventKind::Envelope, Some(bot)) = (&pool.verifier, job.kind, &job.bot_id)
    else {
        return None;
    };
    match client.lookup_event(bot, &job.event_id).await {
        EventLookup::Found => None,
        EventLookup::NotFound => Some(Outcome::Permanent {
            reason: "event not found in Cognigy".into(),
        }),
        EventLookup::Unavailable(reason) => Some(Outcome::Retry {
            reason,
            retry_after: None,
        }),
    }
}

/// Attempt `n` of `job`'s POST (its body taken), signed when the
/// destination signs, with the destination's own headers.
async fn send(
    pool: &Pool,
    job: &mut crate::queue::DeliveryJob,
    n: u32,
    started_at_ms: i64,
) -> target::Sent {
    let body = std::mem::take(&mut job.body);
    let ts = started_at_ms / 1000;
    let destination = &pool.cfg.destination;
    let signature = destination
        .signing_key
        .as_ref()
        .map(|key| signing::sign(key, job.key.as_str(), ts, &body));
    match target_headers(job, n, ts, signature.as_deref()) {
        Ok(mut headers) => {
            for (name, value) in &destination.headers {
                if !headers.contains_key(name) {
                    headers.insert(name.clone(), value.clone());
                }
            }
            pool.target
                .post(headers, body, destination.delivery_timeout)
                .await
        }
        Err(_) => Err(target::Failure::msg(
            "request failed: the event id or key cannot be a header value",
        )),
    }
}

/// What the history keeps of a failed request: a snippet of an error
/// answer's body, or the transport error.
fn error_of(sent: &target::Sent) -> Option<String> {
    match sent {
        Ok(answer) => {
            (!(200..300).contains(&answer.status) && !answer.body.is_empty()).then(|| {
                let b = &answer.body[..answer.body.len().min(ERROR_SNIPPET)];
                String::from_utf8_lossy(b).into_owned()
            })
        }
        Err(f) => Some(f.message.clone()),
    }
}

/// Logs the attempt, writes it back and frees the lease; a retry wakes the
/// dispatcher (its due time may be the next one). A store that cannot take
/// the result now (full, busy) is asked again within half a lease: a result
/// lost is a delivery repeated when the lease expires.
async fn record(pool: &Pool, leased: Leased, attempt: Attempt, disposition: Disposition) {
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
            retry_in_ms = due_at_ms.saturating_sub(pool.clock.now_ms()), "delivery failed; will retry"
        ),
        Disposition::Failed { reason } => {
            tracing::warn!(job = %leased.job.id, attempt = n, reason = %reason, "delivery failed permanently; recording it in the failed list")
        }
    }
    let lease = leased.lease.clone();
    // A retry may now be the earliest due job; an ordered job's end lets
    // its key's next one be claimed (also one stored ordered before a reload
    // turned ordering off: its key's jobs still go one at a time).
    let wake = matches!(disposition, Disposition::RetryAt { .. })
        || pool.cfg.destination.ordering.is_some()
        || leased.job.ordered;
    let deadline = Instant::now() + pool.cfg.pool.lock_duration / 2;
    let mut leased = leased;
    let mut tries = 0u32;
    loop {
        // What finishing consumes, kept in case the store says "not now".
        let again = leased.clone_without_body();
        match pool
            .queue
            .finish(leased, attempt.clone(), disposition.clone())
            .await
        {
            Ok(true) => break,
            Ok(false) => {
                tracing::warn!(job = %lease.job_id, "lease was lost before the result was recorded; another worker owns the job");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                tries += 1;
                if tries == 1 {
                    tracing::warn!(job = %lease.job_id, error = %e, "cannot record the delivery result yet; trying again");
                }
                tokio::time::sleep(Duration::from_millis(100 * u64::from(tries.min(10)))).await;
                leased = again;
            }
            Err(e) => {
                tracing::error!(job = %lease.job_id, error = %e, "cannot record the delivery result; the job will be retried when its lease expires");
                break;
            }
        }
    }
    pool.in_flight.ended(&lease);
    if wake {
        pool.wake.notify_one();
    }
}

/// The headers' names and fixed values, made at compile time (a name given
/// as `&str` is parsed at each insert: 2,200 instructions a delivery).
mod names {
    use reqwest::header::{HeaderName, HeaderValue};
    pub const X_EVENT_ID: HeaderName = HeaderName::from_static("x-event-id");
    pub const X_SOURCE: HeaderName = HeaderName::from_static("x-source");
    pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
    pub const X_DELIVERY_ATTEMPT: HeaderName = HeaderName::from_static("x-delivery-attempt");
    pub const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
    pub const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
    pub const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
    pub const JSON: HeaderValue = HeaderValue::from_static("application/json");
    pub const RELAY: HeaderValue = HeaderValue::from_static("cognigy-webhook-relay");
}

/// The headers of attempt `n` of `job` (SPEC §3.2), with the Standard Webhooks
/// ones when the target is signed (`signature` made at `ts`, unix seconds).
fn target_headers(
    job: &crate::queue::DeliveryJob,
    n: u32,
    ts: i64,
    signature: Option<&str>,
) -> Result<HeaderMap, reqwest::header::InvalidHeaderValue> {
    use names::*;
    let mut h = HeaderMap::with_capacity(8);
    h.insert(CONTENT_TYPE, JSON);
    h.insert(X_EVENT_ID, HeaderValue::from_str(&job.event_id)?);
    h.insert(X_SOURCE, RELAY);
    h.insert(IDEMPOTENCY_KEY, HeaderValue::from_str(job.key.as_str())?);
    h.insert(X_DELIVERY_ATTEMPT, HeaderValue::from(n));
    if let Some(signature) = signature {
        h.insert(WEBHOOK_ID, HeaderValue::from_str(job.key.as_str())?);
        h.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(ts));
        h.insert(WEBHOOK_SIGNATURE, HeaderValue::from_str(signature)?);
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::AttemptOutcome;
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
        let p = Policy {
            attempts: 5,
            backoff,
            max_age: Duration::from_secs(3600),
        };
        for (n, outcome, unit, want) in table {
            let got = decide(&p, n, outcome.clone(), now, unit, Some(now - 1000), false);
            let got = (got.clone(), got.attempt_outcome());
            assert_eq!(got, want, "attempt {n}, {outcome:?}, jitter unit {unit}");
        }
        let one = decide(
            &Policy { attempts: 1, ..p },
            1,
            retry(None),
            now,
            0.0,
            None,
            false,
        );
        assert_eq!(one, failed("gave up after 1 attempt: HTTP 503"));
        let trial = decide(
            &Policy { attempts: 1, ..p },
            1,
            retry(None),
            now,
            0.0,
            None,
            true,
        );
        assert_eq!(
            trial,
            due(2_000),
            "a failed trial keeps the job's last attempt"
        );
        // A trial of a long outage: the job's 14th attempt waits as after
        // its 4th (the last ordinary attempt is the 5th), not 4.5 hours.
        for (n, want) in [(3, 8_000), (4, 16_000), (5, 16_000), (14, 16_000)] {
            let got = decide(&p, n, retry(None), now, 0.0, Some(now - 1000), true);
            assert_eq!(got, due(want), "trial attempt {n}");
        }
    }

    /// The age limit is checked after a failed attempt, never instead of
    /// one: an old job is tried (the attempt is made, then decided), a
    /// delivered old job is delivered, a failed one past the limit fails
    /// saying so; and no value overflows.
    #[test]
    fn the_age_limit_after_a_failed_attempt() {
        let p = Policy {
            attempts: 5,
            backoff: Backoff {
                base: Duration::from_secs(2),
                jitter: 0.0,
                max_retry_after: Duration::from_secs(3600),
            },
            max_age: Duration::from_secs(60),
        };
        let now = 10_000_000;
        let old = Some(now - 61_000);
        let retry = Outcome::Retry {
            reason: "HTTP 503".into(),
            retry_after: None,
        };
        assert_eq!(
            decide(&p, 1, Outcome::Delivered, now, 0.0, old, false),
            Disposition::Completed,
            "an old job delivered is delivered"
        );
        assert_eq!(
            decide(&p, 1, retry.clone(), now, 0.0, old, false),
            Disposition::Failed {
                reason: "not delivered within max_age_secs (60 s): HTTP 503".into()
            }
        );
        assert!(matches!(
            decide(&p, 1, retry.clone(), now, 0.0, Some(now - 59_000), false),
            Disposition::RetryAt { .. }
        ));
        assert!(
            matches!(
                decide(&p, 1, retry.clone(), now, 0.0, None, false),
                Disposition::RetryAt { .. }
            ),
            "no age known (an older version's job on Redis): no limit"
        );
        // The largest settings and answers: saturated, not wrapped.
        let huge = Policy {
            attempts: 100,
            backoff: Backoff {
                base: Duration::from_secs(u64::MAX / 4),
                jitter: 0.0,
                max_retry_after: Duration::from_secs(u64::MAX),
            },
            max_age: Duration::from_secs(u64::MAX),
        };
        let far = Outcome::Retry {
            reason: "HTTP 503".into(),
            retry_after: Some(Duration::from_secs(u64::MAX)),
        };
        let d = decide(&huge, 1, far, i64::MAX - 1, 0.0, Some(i64::MIN), false);
        assert_eq!(
            d,
            Disposition::RetryAt {
                due_at_ms: i64::MAX,
                reason: "HTTP 503".into()
            }
        );
    }
}
