//! Retry delays (SPEC §3.2): delay before retry n = base × 2^(n-1), optionally
//! jittered down by up to `jitter` × delay; a target's `Retry-After` replaces the
//! computed delay, capped at `MAX_RETRY_AFTER_SECS`.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    /// 0..=1.
    pub jitter: f64,
    pub max_retry_after: Duration,
}

impl Backoff {
    /// Delay after failed attempt `n` (1-based), before attempt n+1.
    /// `unit` is a random number in [0, 1) (a parameter so this stays pure).
    pub fn delay(&self, n: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        if let Some(wish) = retry_after {
            return wish.min(self.max_retry_after);
        }
        let exp = n.saturating_sub(1).min(32);
        let raw = self
            .base
            .saturating_mul(1u32 << exp.min(31))
            .min(Duration::from_secs(7 * 86_400));
        if self.jitter > 0.0 {
            raw.mul_f64(1.0 - self.jitter * unit.clamp(0.0, 1.0))
        } else {
            raw
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_base() {
        let b = Backoff {
            base: Duration::from_secs(2),
            jitter: 0.0,
            max_retry_after: Duration::from_secs(3600),
        };
        let delays: Vec<u64> = (1..=4).map(|n| b.delay(n, None, 0.5).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16]);
        assert_eq!(
            b.delay(200, None, 0.0),
            Duration::from_secs(7 * 86_400),
            "bounded, no overflow"
        );
    }

    #[test]
    fn retry_after_replaces_and_is_capped() {
        let b = Backoff {
            base: Duration::from_secs(2),
            jitter: 0.0,
            max_retry_after: Duration::from_secs(60),
        };
        assert_eq!(
            b.delay(3, Some(Duration::from_secs(1)), 0.0),
            Duration::from_secs(1)
        );
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(9999)), 0.0),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let b = Backoff {
            base: Duration::from_millis(1000),
            jitter: 0.5,
            max_retry_after: Duration::ZERO,
        };
        assert_eq!(b.delay(1, None, 0.0), Duration::from_millis(1000));
        assert_eq!(b.delay(1, None, 1.0), Duration::from_millis(500));
    }
}
