//! Classify, then act: what one delivery attempt's result means (SPEC §3.2).
//!
//! [`classify`] is pure: the worker only acts on the [`Outcome`] it returns.
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx | delivered |
//! | 400 401 403 404 405 410 413 415 422, and any other 4xx not below | permanent |
//! | 408 409 425 429, 5xx, 3xx, 1xx, timeout, connection error | retry |
//!
//! 4xx codes the spec does not name (402, 406, 411, 412, 414, 416-418, 421,
//! 423, 424, 426, 428, 431, 451) are permanent: a request the target refuses
//! will not become acceptable by sending it again. `Retry-After` is honoured on
//! 429 and 503 only, capped by the caller.

use std::time::{Duration, SystemTime};

use super::target::{Failure, Sent, TargetAnswer};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again; `retry_after` is the target's own wish, if it gave one.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    Permanent {
        reason: String,
    },
}

/// What one request's result means: the outcome of the attempt, whose
/// `decide` (`attempt.rs`) gives where the job goes. A timeout, a refused or
/// reset connection, a TLS failure, a broken answer: anything but an HTTP
/// status is retried.
pub fn classify(sent: &Sent, now: SystemTime) -> Outcome {
    match sent {
        Ok(TargetAnswer {
            status,
            retry_after,
            ..
        }) => match *status {
            200..=299 => Outcome::Delivered,
            408 | 409 | 425 | 429 | 100..=199 | 300..=399 | 500..=599 => Outcome::Retry {
                reason: format!("target answered HTTP {status}"),
                retry_after: if matches!(status, 429 | 503) {
                    retry_after
                        .as_deref()
                        .and_then(|v| parse_retry_after(v, now))
                } else {
                    None
                },
            },
            _ => Outcome::Permanent {
                reason: format!("target rejected the event: HTTP {status}"),
            },
        },
        Err(Failure {
            timed_out: true, ..
        }) => Outcome::Retry {
            reason: "target timed out".into(),
            retry_after: None,
        },
        Err(Failure { message, .. }) => Outcome::Retry {
            reason: format!("connection error: {message}"),
            retry_after: None,
        },
    }
}

pub use crate::answer::parse_retry_after;

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, retry_after: Option<&str>) -> Sent {
        Ok(TargetAnswer {
            status,
            retry_after: retry_after.map(str::to_string),
            body: Default::default(),
        })
    }

    fn status(s: u16) -> Outcome {
        classify(&answer(s, None), SystemTime::now())
    }

    #[test]
    fn the_outcome_table_of_spec_3_2() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(status(s), Outcome::Delivered, "{s}");
        }
        for s in [400, 401, 403, 404, 405, 410, 413, 415, 422, 402, 418, 451] {
            assert!(matches!(status(s), Outcome::Permanent { .. }), "{s}");
        }
        for s in [
            408, 409, 425, 429, 500, 502, 503, 504, 599, 301, 302, 307, 308,
        ] {
            assert!(matches!(status(s), Outcome::Retry { .. }), "{s}");
        }
        assert!(matches!(
            classify(
                &Err(Failure {
                    message: "timed out".into(),
                    timed_out: true
                }),
                SystemTime::now()
            ),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            classify(&Err(Failure::msg("reset")), SystemTime::now()),
            Outcome::Retry { .. }
        ));
    }

    #[test]
    fn retry_after_counts_on_429_and_503_only() {
        let now = SystemTime::now();
        let r = |status| classify(&answer(status, Some("7")), now);
        assert_eq!(
            r(429),
            Outcome::Retry {
                reason: "target answered HTTP 429".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert!(
            matches!(r(503), Outcome::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(7))
        );
        assert!(matches!(
            r(500),
            Outcome::Retry {
                retry_after: None,
                ..
            }
        ));
    }

    #[test]
    fn retry_after_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").expect("date");
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }
}
