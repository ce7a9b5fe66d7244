//! Ingress rate limiting per source address (`INGRESS_RATE_LIMIT` events/s,
//! `INGRESS_RATE_BURST`; off by default): a token bucket per client IP, checked
//! before the body is read, so one noisy client cannot fill the queue. Over the
//! limit: 429 with `Retry-After` (whole seconds until a token is back).
//!
//! The address is the TCP peer's. Behind a load balancer every event comes from
//! the balancer's address: rate-limit there instead, or leave this off.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The TCP peer of a request (set by the accept loop).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Buckets untouched this long are forgotten (they would be full anyway).
const IDLE: Duration = Duration::from_secs(60);
const MAX_TRACKED: usize = 100_000;

impl RateLimiter {
    pub fn new(per_sec: f64, burst: u32) -> Self {
        Self {
            per_sec,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok` to go on, or `Err(seconds to wait)`.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > MAX_TRACKED {
            map.retain(|_, (_, at)| now.duration_since(*at) < IDLE);
        }
        let (tokens, at) = map.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_sec).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let l = RateLimiter::new(2.0, 3);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check(ip, t0), Ok(()));
        }
        assert_eq!(l.check(ip, t0), Err(1));
        assert_eq!(l.check(other, t0), Ok(()), "per source");
        assert_eq!(
            l.check(ip, t0 + Duration::from_millis(500)),
            Ok(()),
            "2/s refills one in 0.5 s"
        );
        assert!(l.check(ip, t0 + Duration::from_millis(500)).is_err());
    }
}
