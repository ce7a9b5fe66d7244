//! Events refused because the queue is unavailable, logged without a flood.
//!
//! During an outage every request is answered 503; one log line per request
//! would bury everything else (thousands of lines a second under load). The
//! first refusal is logged at once, then one line per [`EVERY`] with how many
//! were refused since the last line. Once events are accepted again and no
//! refusal came for [`QUIET`], one line closes the outage with its total (a
//! queue that flaps between refusing and accepting stays one outage, reported
//! every [`EVERY`], not a line per flap). The `/metrics` counters still count
//! every answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::queue::QueueError;

/// At most one "still unavailable" line per this interval.
pub const EVERY: Duration = Duration::from_secs(5);
/// An outage is over when events are accepted and none was refused for this long.
pub const QUIET: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Refusals {
    /// Set while an outage is not yet reported as over (changed only under
    /// `state`'s lock): outside an outage the accept path only reads this flag.
    open: AtomicBool,
    state: Mutex<Outage>,
}

#[derive(Debug, Default)]
struct Outage {
    started: Option<Instant>,
    last_refusal: Option<Instant>,
    last_line: Option<Instant>,
    since_line: u64,
    total: u64,
}

impl Refusals {
    /// One event refused with 503 because of `e`.
    pub fn refused(&self, e: &QueueError) {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.open.store(true, Ordering::Release);
        s.started.get_or_insert(now);
        s.last_refusal = Some(now);
        s.total += 1;
        s.since_line += 1;
        if s.last_line.is_some_and(|t| now.duration_since(t) < EVERY) {
            return;
        }
        if s.total == 1 {
            tracing::error!(error = %e, "event not accepted: queue unavailable; answering 503 until it is back");
        } else {
            tracing::error!(
                error = %e,
                refused = s.since_line,
                refused_total = s.total,
                "events not accepted: queue still unavailable"
            );
        }
        s.last_line = Some(now);
        s.since_line = 0;
    }

    /// An event was stored: ends the outage, if one is open and quiet.
    pub fn accepted(&self) {
        if !self.open.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Another request may have closed the outage while this one waited.
        if s.total == 0 || s.last_refusal.is_some_and(|t| t.elapsed() < QUIET) {
            return;
        }
        self.open.store(false, Ordering::Release);
        let secs = s.started.zip(s.last_refusal).map_or(0.0, |(first, last)| {
            last.duration_since(first).as_secs_f64()
        });
        tracing::warn!(
            refused_total = s.total,
            "queue available again: events accepted; {} were refused with 503 over {secs:.1} s",
            s.total
        );
        *s = Outage::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::test_log::logged;

    #[test]
    fn a_flapping_queue_is_one_outage_not_a_line_per_flap() {
        let r = Refusals::default();
        let e = QueueError::Unavailable("redis: timed out".into());
        let lines = logged(|| {
            for _ in 0..1000 {
                r.refused(&e);
                r.accepted();
            }
        });
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].contains("queue unavailable"), "{lines:#?}");
    }

    #[test]
    fn accepting_after_a_quiet_second_closes_the_outage_with_its_total() {
        let r = Refusals::default();
        let e = QueueError::Unavailable("redis: unreachable".into());
        let lines = logged(|| {
            for _ in 0..3 {
                r.refused(&e);
            }
            r.accepted();
            std::thread::sleep(QUIET + Duration::from_millis(50));
            r.accepted();
            r.accepted();
        });
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[1].contains("queue available again"), "{lines:#?}");
        assert!(lines[1].contains("refused_total=3"), "{lines:#?}");
    }
}
