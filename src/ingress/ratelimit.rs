//! Ingress rate limiting per source address (`INGRESS_RATE_LIMIT` events/s,
//! `INGRESS_RATE_BURST`; off by default): `governor`'s keyed GCRA limiter (a
//! token bucket per client IP, `burst` deep, refilled at the rate), checked
//! before the body is read, so one noisy client cannot fill the queue. Over
//! the limit: 429 with `Retry-After` (whole seconds until a request may pass),
//! once the body was read for a moment and thrown away (`before_the_body` in
//! the ingress): the limit bounds what is stored, not the bytes read.
//!
//! The address is the TCP peer's. Behind a load balancer every event comes from
//! the balancer's address: rate-limit there instead, or leave this off.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::Quota;

/// The TCP peer of a request (set by the accept loop).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Addresses tracked before the idle ones are forgotten (a full bucket is
/// the same as none).
const MAX_TRACKED: usize = 100_000;

type Keyed<C> = governor::RateLimiter<
    IpAddr,
    DefaultKeyedStateStore<IpAddr>,
    C,
    NoOpMiddleware<<C as Clock>::Instant>,
>;

pub struct RateLimiter<C: Clock = DefaultClock> {
    limiter: Keyed<C>,
    clock: C,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").finish_non_exhaustive()
    }
}

fn quota(per_sec: f64, burst: u32) -> Quota {
    // A nanosecond at least: `with_period` refuses a zero one (and its
    // fallback below is one a second). The configuration caps the rate.
    let period = Duration::from_secs_f64(1.0 / per_sec.max(1e-6)).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

impl RateLimiter {
    pub fn new(per_sec: f64, burst: u32) -> Self {
        Self::with_clock(per_sec, burst, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimiter<C> {
    pub fn with_clock(per_sec: f64, burst: u32, clock: C) -> Self {
        Self {
            limiter: governor::RateLimiter::dashmap_with_clock(
                quota(per_sec, burst),
                clock.clone(),
            ),
            clock,
        }
    }

    /// `Ok` to go on, or `Err(whole seconds to wait, at least 1)`.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        if self.limiter.len() > MAX_TRACKED {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            wait.as_secs_f64().ceil().max(1.0) as u64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn a_burst_then_the_rate() {
        let clock = FakeRelativeClock::default();
        let l = RateLimiter::with_clock(2.0, 3, clock.clone());
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        for _ in 0..3 {
            assert_eq!(l.check(ip), Ok(()));
        }
        assert_eq!(l.check(ip), Err(1));
        assert_eq!(l.check(other), Ok(()), "per source");
        clock.advance(Duration::from_millis(500));
        assert_eq!(l.check(ip), Ok(()), "2/s refills one in 0.5 s");
        assert!(l.check(ip).is_err());
    }
}
