//! Client-side rate limit: at most `max` requests in any rolling `per` window
//! (the Cognigy client's 100 a minute; a destination pool keeps its own
//! `rate_limit` window in its machine, `delivery/machine.rs`).
//! A caller over the limit waits until the oldest request leaves the window, so
//! a burst is paced rather than sent and answered 429. The window is measured
//! 5% longer than `per` (3 s on a minute): requests arrive at the server with
//! jitter, and one sent just outside our window could land inside the server's.
//!
//! Hand-written rather than `governor`: the promise is a rolling window ("never
//! more than 100 requests a minute", SPEC §4), and a GCRA limiter with a burst
//! of 100 admits up to about twice that within some 60 s window (the burst,
//! then the refill); with a burst of 1 it would pace every request 0.6 s
//! apart instead of letting a registration's few calls go at once.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub max: u32,
    pub per: Duration,
}

impl RateLimit {
    /// SPEC §4: "the client never sends more than 100 requests a minute".
    pub const REGISTER: RateLimit = RateLimit {
        max: 100,
        per: Duration::from_secs(60),
    };
}

#[derive(Debug)]
pub struct Limiter {
    limit: RateLimit,
    sent: tokio::sync::Mutex<VecDeque<Instant>>,
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            sent: tokio::sync::Mutex::new(VecDeque::new()),
        }
    }

    /// Records one more request in `sent` if it fits in the window now;
    /// else says when the oldest one leaves it.
    fn take(&self, sent: &mut VecDeque<Instant>) -> Result<(), Instant> {
        let window = self.limit.per + self.limit.per / 20;
        let now = Instant::now();
        while sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            sent.pop_front();
        }
        if (sent.len() as u32) < self.limit.max.max(1) {
            sent.push_back(now);
            return Ok(());
        }
        Err(*sent.front().unwrap_or(&now) + window)
    }

    /// Waits until one more request fits in the window, and records it.
    pub async fn acquire(&self) {
        let mut sent = self.sent.lock().await;
        while let Err(until) = self.take(&mut sent) {
            tokio::time::sleep_until(until).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_paced_to_the_window() {
        let l = Limiter::new(RateLimit {
            max: 3,
            per: Duration::from_secs(10),
        });
        let t0 = tokio::time::Instant::now();
        for _ in 0..3 {
            l.acquire().await;
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "the first three go at once");
        l.acquire().await;
        assert!(
            t0.elapsed() >= Duration::from_millis(10_500),
            "the fourth waits for the window (+5%)"
        );
        for _ in 0..2 {
            l.acquire().await;
        }
        assert!(t0.elapsed() < Duration::from_secs(11));
        l.acquire().await;
        assert!(t0.elapsed() >= Duration::from_secs(21));
    }
}
