//! The circuit breaker of one destination (SPEC §7).
//!
//! After `failures` consecutive retryable failures (5xx, 408, timeouts,
//! connection errors; not a permanent 4xx, not 429) the circuit opens: the
//! pool starts nothing for the cool-down, and its jobs wait with their
//! remaining attempts. Then one probe: success (or any answer that is not a
//! retryable failure) closes it; failure opens it again for twice the
//! cool-down, up to `max_cooldown`. A 429 or 503 with `Retry-After` holds the
//! whole destination that long, whatever the circuit's state. Each change of
//! state is logged once.
//!
//! [`Breaker`] is the state machine, pure (the time is a parameter, so the
//! tests drive it); [`Circuit`] is a pool's breaker behind a lock, with a
//! wake-up for the dispatcher and the state in the metrics.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

/// The breaker's settings (`[destination.circuit]`, `CIRCUIT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CircuitSettings {
    /// Consecutive retryable failures that open it; 0 = off.
    pub failures: u32,
    /// The first cool-down; doubles after each failed probe.
    #[serde(rename = "cooldown_ms", serialize_with = "millis")]
    pub cooldown: Duration,
    #[serde(rename = "max_cooldown_ms", serialize_with = "millis")]
    pub max_cooldown: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Closed,
    Open,
    HalfOpen,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen => "half-open",
        }
    }
}

/// What an attempt's result says about the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Delivered.
    Success,
    /// 5xx, 408, timeout, connection error: counts towards opening.
    Failure,
    /// An answer that is neither (a permanent 4xx, a 429): the destination
    /// is up, but this was not a success.
    Answered,
}

/// May a delivery start now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Go,
    /// Not before this instant (cool-down or `Retry-After`).
    Until(Instant),
    /// Not until the probe's result is in.
    Probing,
}

/// The state machine (see the module doc).
#[derive(Debug, Clone)]
pub struct Breaker {
    settings: CircuitSettings,
    phase: Phase,
    failures: u32,
    cooldown: Duration,
    open_until: Option<Instant>,
    held_until: Option<Instant>,
    probe_out: bool,
}

impl Breaker {
    pub fn new(settings: CircuitSettings) -> Self {
        Self {
            settings,
            phase: Phase::Closed,
            failures: 0,
            cooldown: settings.cooldown,
            open_until: None,
            held_until: None,
            probe_out: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether a delivery may start at `now` (an open circuit whose cool-down
    /// is over becomes half-open here).
    pub fn gate(&mut self, now: Instant) -> Gate {
        if let Some(t) = self.held_until.filter(|t| now < *t) {
            return Gate::Until(t);
        }
        if self.phase == Phase::Open {
            match self.open_until {
                Some(t) if now < t => return Gate::Until(t),
                _ => {
                    self.phase = Phase::HalfOpen;
                    self.probe_out = false;
                }
            }
        }
        match self.phase {
            Phase::HalfOpen if self.probe_out => Gate::Probing,
            _ => Gate::Go,
        }
    }

    /// A delivery starts (call after [`Breaker::gate`] said `Go`).
    pub fn started(&mut self) {
        if self.phase == Phase::HalfOpen {
            self.probe_out = true;
        }
    }

    /// An attempt's result; `hold` is the target's `Retry-After` on a 429 or
    /// 503 (already capped). Returns the new phase when it changed.
    pub fn record(
        &mut self,
        signal: Signal,
        hold: Option<Duration>,
        now: Instant,
    ) -> Option<Phase> {
        if let Some(h) = hold {
            let until = now + h;
            self.held_until = Some(self.held_until.map_or(until, |t| t.max(until)));
        }
        let before = self.phase;
        match (signal, self.phase) {
            (Signal::Success | Signal::Answered, Phase::HalfOpen) | (Signal::Success, _) => {
                self.phase = Phase::Closed;
                self.failures = 0;
                self.cooldown = self.settings.cooldown;
                self.probe_out = false;
            }
            (Signal::Answered, _) => self.failures = 0,
            (Signal::Failure, Phase::Closed) => {
                self.failures += 1;
                if self.settings.failures > 0 && self.failures >= self.settings.failures {
                    self.open(now);
                }
            }
            (Signal::Failure, Phase::HalfOpen) => {
                self.cooldown = (self.cooldown * 2).min(self.settings.max_cooldown);
                self.open(now);
            }
            // A delivery that started before the circuit opened.
            (Signal::Failure, Phase::Open) => {}
        }
        (self.phase != before).then_some(self.phase)
    }

    /// The result of a probe claimed for a circuit shared by every relay:
    /// as this relay's own half-open probe, from the shared cool-down.
    pub fn record_probe(
        &mut self,
        signal: Signal,
        hold: Option<Duration>,
        cooldown: Duration,
        now: Instant,
    ) -> Option<Phase> {
        self.phase = Phase::HalfOpen;
        self.cooldown = cooldown.max(self.settings.cooldown);
        self.probe_out = true;
        self.record(signal, hold, now).or(Some(self.phase))
    }

    fn open(&mut self, now: Instant) {
        self.phase = Phase::Open;
        self.open_until = Some(now + self.cooldown);
        self.probe_out = false;
    }

    /// The cool-down now in force (for the log line).
    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }
}

/// A pool's breaker: shared by its dispatcher and its deliveries.
#[derive(Debug)]
pub struct Circuit {
    destination: String,
    breaker: Mutex<Breaker>,
    /// Wakes the dispatcher when a result came in (a probe's, say).
    pub changed: Notify,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Circuit {
    pub fn new(
        destination: &str,
        settings: CircuitSettings,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Self {
        metrics.circuit(destination, Phase::Closed.as_str());
        Self {
            destination: destination.to_string(),
            breaker: Mutex::new(Breaker::new(settings)),
            changed: Notify::new(),
            metrics,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Breaker) -> T) -> T {
        f(&mut self.breaker.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn phase(&self) -> Phase {
        self.with(|b| b.phase())
    }

    /// [`Breaker::gate`] now, starting nothing.
    pub fn gate(&self) -> Gate {
        self.with(|b| {
            let before = b.phase();
            let gate = b.gate(Instant::now());
            if b.phase() != before {
                self.changed_to(b.phase(), b);
            }
            gate
        })
    }

    /// [`Breaker::gate`], and [`Breaker::started`] when it says `Go`.
    pub fn try_start(&self) -> Gate {
        self.with(|b| {
            let before = b.phase();
            let gate = b.gate(Instant::now());
            if b.phase() != before {
                self.changed_to(b.phase(), b);
            }
            if gate == Gate::Go {
                b.started();
            }
            gate
        })
    }

    /// An attempt's result; `probe` is the shared cool-down when the job was
    /// a shared circuit's probe. Returns the new phase and cool-down when it
    /// changed, for the store to share.
    pub fn record(
        &self,
        signal: Signal,
        hold: Option<Duration>,
        probe: Option<Duration>,
    ) -> Option<(Phase, Duration)> {
        let changed = self.with(|b| {
            if let Some(h) = hold {
                tracing::warn!(destination = %self.destination, hold_ms = h.as_millis() as u64,
                    "the destination asked to wait (Retry-After): nothing is sent to it until then");
            }
            let now = Instant::now();
            let phase = match probe {
                Some(cooldown) => b.record_probe(signal, hold, cooldown, now),
                None => b.record(signal, hold, now),
            };
            phase.map(|p| {
                self.changed_to(p, b);
                (p, b.cooldown())
            })
        });
        self.changed.notify_one();
        changed
    }

    fn changed_to(&self, phase: Phase, b: &Breaker) {
        self.metrics.circuit(&self.destination, phase.as_str());
        match phase {
            Phase::Open => tracing::warn!(
                destination = %self.destination, cooldown_ms = b.cooldown().as_millis() as u64,
                "circuit open: the destination keeps failing; its jobs wait (keeping their attempts) until a probe"
            ),
            Phase::HalfOpen => {
                tracing::info!(destination = %self.destination, "circuit half-open: one probe delivery")
            }
            Phase::Closed => {
                tracing::info!(destination = %self.destination, "circuit closed: deliveries resume")
            }
        }
    }
}

/// What an attempt's classified result says to the breaker, and how long a
/// `Retry-After` holds the destination (capped at `max_hold`).
pub fn signal(
    result: &super::classify::AttemptResult<'_>,
    outcome: &super::classify::Outcome,
    max_hold: Duration,
) -> (Signal, Option<Duration>) {
    use super::classify::Outcome;
    match outcome {
        Outcome::Delivered => (Signal::Success, None),
        Outcome::Permanent { .. } => (Signal::Answered, None),
        Outcome::Retry { retry_after, .. } => {
            let hold = retry_after.map(|d| d.min(max_hold));
            if result.status() == Some(429) {
                (Signal::Answered, hold)
            } else {
                (Signal::Failure, hold)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: CircuitSettings = CircuitSettings {
        failures: 3,
        cooldown: Duration::from_secs(10),
        max_cooldown: Duration::from_secs(25),
    };

    #[test]
    fn consecutive_failures_open_it_and_probes_double_the_cooldown() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = Breaker::new(S);
        assert_eq!(b.record(Signal::Failure, None, at(0)), None);
        assert_eq!(
            b.record(Signal::Answered, None, at(0)),
            None,
            "a 4xx resets the count"
        );
        assert_eq!(b.record(Signal::Failure, None, at(0)), None);
        assert_eq!(b.record(Signal::Failure, None, at(0)), None);
        assert_eq!(b.record(Signal::Failure, None, at(1)), Some(Phase::Open));
        assert_eq!(
            b.gate(at(5)),
            Gate::Until(at(11)),
            "nothing during the cool-down"
        );
        assert_eq!(b.gate(at(11)), Gate::Go, "one probe");
        assert_eq!(b.phase(), Phase::HalfOpen);
        b.started();
        assert_eq!(b.gate(at(11)), Gate::Probing, "only one");
        assert_eq!(b.record(Signal::Failure, None, at(12)), Some(Phase::Open));
        assert_eq!(b.gate(at(31)), Gate::Until(at(32)), "twice the cool-down");
        assert_eq!(b.gate(at(32)), Gate::Go);
        b.started();
        assert_eq!(b.record(Signal::Failure, None, at(33)), Some(Phase::Open));
        assert_eq!(
            b.gate(at(57)),
            Gate::Until(at(58)),
            "capped at max_cooldown"
        );
        assert_eq!(b.gate(at(58)), Gate::Go);
        b.started();
        assert_eq!(b.record(Signal::Success, None, at(58)), Some(Phase::Closed));
        assert_eq!(b.gate(at(58)), Gate::Go);
        // Closed again, from the first cool-down.
        for _ in 0..3 {
            b.record(Signal::Failure, None, at(60));
        }
        assert_eq!(b.gate(at(60)), Gate::Until(at(70)));
    }

    #[test]
    fn retry_after_holds_the_destination_whatever_the_phase() {
        let t0 = Instant::now();
        let mut b = Breaker::new(S);
        assert_eq!(
            b.record(Signal::Answered, Some(Duration::from_secs(30)), t0),
            None
        );
        assert_eq!(b.gate(t0), Gate::Until(t0 + Duration::from_secs(30)));
        assert_eq!(b.gate(t0 + Duration::from_secs(30)), Gate::Go);
        assert_eq!(b.phase(), Phase::Closed, "a 429 is no failure");
    }

    #[test]
    fn zero_failures_is_no_breaker() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CircuitSettings { failures: 0, ..S });
        for _ in 0..100 {
            assert_eq!(b.record(Signal::Failure, None, t0), None);
        }
        assert_eq!(b.gate(t0), Gate::Go);
    }

    #[test]
    fn a_probe_answered_with_a_4xx_closes_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CircuitSettings { failures: 1, ..S });
        b.record(Signal::Failure, None, t0);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.gate(later), Gate::Go);
        b.started();
        assert_eq!(b.record(Signal::Answered, None, later), Some(Phase::Closed));
    }
}
