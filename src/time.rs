//! Time: unix milliseconds, RFC 3339 in UTC without a date crate, and the
//! [`Clock`] the stateful parts read (the store, the dispatcher), which tests
//! replace with one they step by hand.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Unix time in milliseconds: due times and leases outlive the process, so they
/// are wall-clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where the stateful parts of the relay read the time: the system's, or
/// (tests) a manual one that moves only when stepped, so that leases, due
/// times, cool-downs and age limits are checked on a time the test chooses.
///
/// Two readings: [`Clock::now_ms`], unix wall-clock milliseconds (due times
/// and leases outlive the process, so they are wall-clock), and
/// [`Clock::mono_ms`], milliseconds that never go back (cool-downs and
/// holds, which a wall-clock step must not stretch or cut). A manual clock's
/// step moves both, its monotonic reading forward only.
#[derive(Debug, Clone, Default)]
pub struct Clock(Option<Arc<Manual>>);

#[derive(Debug)]
struct Manual {
    wall_ms: AtomicI64,
    mono_ms: AtomicI64,
}

/// The origin of the system clock's monotonic reading.
fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Self {
        Self(None)
    }

    /// A clock at `wall_ms` that moves only by [`Clock::step`].
    pub fn manual(wall_ms: i64) -> Self {
        Self(Some(Arc::new(Manual {
            wall_ms: AtomicI64::new(wall_ms),
            mono_ms: AtomicI64::new(0),
        })))
    }

    pub fn is_manual(&self) -> bool {
        self.0.is_some()
    }

    /// Unix time in milliseconds.
    pub fn now_ms(&self) -> i64 {
        match &self.0 {
            None => now_ms(),
            Some(m) => m.wall_ms.load(Ordering::Acquire),
        }
    }

    /// Milliseconds since an origin of this clock's; never decreases.
    pub fn mono_ms(&self) -> i64 {
        match &self.0 {
            None => process_start().elapsed().as_millis() as i64,
            Some(m) => m.mono_ms.load(Ordering::Acquire),
        }
    }

    /// Moves a manual clock by `ms` (back when negative: the wall-clock
    /// reading only); the system clock is not moved.
    pub fn step(&self, ms: i64) {
        if let Some(m) = &self.0 {
            m.wall_ms.fetch_add(ms, Ordering::AcqRel);
            if ms > 0 {
                m.mono_ms.fetch_add(ms, Ordering::AcqRel);
            }
        }
    }
}

/// `2026-11-22T14:07:03.123Z` for unix milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_414), (2025, 11, 22));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(rfc3339(1_795_356_423_123), "2026-11-22T14:07:03.123Z");
    }

    #[test]
    fn a_manual_clock_moves_only_when_stepped_and_its_monotonic_reading_never_back() {
        let c = Clock::manual(1_000);
        assert_eq!((c.now_ms(), c.mono_ms()), (1_000, 0));
        c.step(500);
        assert_eq!((c.now_ms(), c.mono_ms()), (1_500, 500));
        c.step(-2_000);
        assert_eq!((c.now_ms(), c.mono_ms()), (-500, 500));
        let s = Clock::system();
        assert!(!s.is_manual() && s.now_ms() > 1_700_000_000_000);
        let a = s.mono_ms();
        assert!(s.mono_ms() >= a);
    }
}
