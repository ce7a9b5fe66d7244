//! Events refused because the queue is unavailable, logged without a flood.
//!
//! During an outage every request is answered 503; one log line per request
//! would bury everything else (thousands of lines a second under load). The
//! first refusal is logged at once, then one line per [`EVERY`] with how many
//! were refused since the last line, and one line when the queue accepts again
//! with the outage's total. The `/metrics` counters still count every answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::queue::QueueError;

/// At most one "still unavailable" line per this interval.
pub const EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct Refusals {
    /// Set while refusals are not yet reported as over: the accept path only
    /// reads this flag.
    open: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last_line: Option<Instant>,
    since_line: u64,
    total: u64,
    started: Option<Instant>,
}

impl Refusals {
    /// One event refused with 503 because of `e`.
    pub fn refused(&self, e: &QueueError) {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.open.store(true, Ordering::Release);
        s.total += 1;
        s.since_line += 1;
        s.started.get_or_insert(now);
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

    /// An event was stored: ends a run of refusals, if one is open.
    pub fn accepted(&self) {
        if !self.open.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !self.open.swap(false, Ordering::AcqRel) {
            return;
        }
        let secs = s.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        tracing::warn!(
            refused_total = s.total,
            "queue available again: events accepted; {} were refused with 503 over {secs:.1} s",
            s.total
        );
        *s = State::default();
    }
}
