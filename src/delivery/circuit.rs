//! The circuit breaker of one destination (SPEC §7): it judges the
//! destination, not one event.
//!
//! * **Closed.** Retryable failures (5xx, 408, timeouts, connection errors;
//!   not a permanent 4xx, not 429) of `failures` *different* events in a
//!   row open it; any success or answer in between starts the run again.
//!   An event's own retries count once in a run: one event failing for its
//!   own reason, however often it is retried, opens nothing (each of its
//!   attempts counted once made three attempts of one bad event open a
//!   quiet destination, and a steady share of failing events open it again
//!   within milliseconds of each close). Counting first attempts only would
//!   hold nothing for a quiet destination whose retries all fail: its jobs
//!   would use up their attempts; `failures` different events retrying do
//!   open it. So does an ordered destination's run, which has one event per
//!   key at most (it tries each key's first): with fewer keys than
//!   `failures` an outage does not open it, and each first event uses up its
//!   attempts (counting each attempt there made one bad event on a quiet
//!   ordered destination its circuit's only trial, retried for a day).
//! * **Open.** Nothing is started for the cool-down; the pool gives back the
//!   jobs it holds (they wait in the store, unleased, with their attempts).
//! * **Half-open.** Up to [`TRIALS`] trial deliveries of *different* events
//!   (`ClaimOrder::Trials`: the one retried most, whose own trouble has
//!   likely passed, and the freshest, never attempted, newest): the first
//!   that succeeds or is answered closes the circuit (the destination is up;
//!   an event that fails for its own reason then retries on its own backoff,
//!   holding nothing else); only when every trial failed does it open again,
//!   for twice the cool-down (capped at `max_cooldown`). (Resilience4j's
//!   several calls when half-open; Envoy's outlier detection ejects a host,
//!   not a request.) A trial that ends without a verdict (the pool gave it
//!   back, a task died) frees its place for another; a failed trial does not
//!   use up its job's attempts (`attempt::decide`).
//! * **Up a moment ago.** A circuit that opens again within one cool-down of
//!   a trial's success opens for a quarter of the first cool-down: the
//!   destination answered moments ago, so the run of failures is more
//!   likely its events' own (a burst of them opens and closes it a few times,
//!   holding the rest seconds, not minutes). A failed round then doubles
//!   from the first cool-down as usual: a real outage still backs off.
//! * A 429 or 503 with `Retry-After` holds the whole destination that long,
//!   whatever the phase.
//!
//! [`Breaker`] is the state machine, pure: time is a parameter (milliseconds
//! of a monotonic clock), so the tests drive it through tables on a time
//! they choose. Every arithmetic on times saturates: no setting or header
//! overflows it.

use std::time::Duration;

use serde::Serialize;

/// Trial deliveries when half-open (at most the pool's concurrency).
pub use crate::queue::CIRCUIT_TRIALS as TRIALS;

/// The breaker's settings (`[destination.circuit]`, `CIRCUIT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CircuitSettings {
    /// Consecutive retryable failures that open it; 0 = off.
    pub failures: u32,
    /// The first cool-down; doubles after each failed round of trials.
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
    /// No verdict: the attempt did not reach the destination (given back
    /// before it was sent, its task died).
    None,
}

/// May a delivery start now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Yes; `trial` when it is one of the half-open circuit's trials (claim
    /// the freshest job for it).
    Go { trial: bool },
    /// Not before this time (cool-down or `Retry-After`).
    Until(i64),
    /// Not until the trials' results are in.
    Trials,
}

/// The state machine (see the module doc). Times are ms of one monotonic
/// clock.
#[derive(Debug, Clone)]
pub struct Breaker {
    settings: CircuitSettings,
    phase: Phase,
    /// The events (a hash of each job's id) whose retryable failures make
    /// the run while closed, each once; at most `failures` of them.
    run: Vec<u64>,
    cooldown_ms: i64,
    open_until: i64,
    held_until: Option<i64>,
    /// Trials started in this half-open round, and of those, failed.
    trials_out: u32,
    trials_failed: u32,
    /// Trials this round may start (`TRIALS`, at most the concurrency; on
    /// Redis the probes another relay's claim gave this one).
    trials: u32,
    /// When a trial last closed the circuit.
    closed_by_trial_at: Option<i64>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Breaker {
    /// A closed breaker; `trials` is the pool's limit of trials at once.
    pub fn new(settings: CircuitSettings, trials: u32) -> Self {
        Self {
            settings,
            phase: Phase::Closed,
            run: Vec::new(),
            cooldown_ms: ms(settings.cooldown),
            open_until: 0,
            held_until: None,
            trials_out: 0,
            trials_failed: 0,
            trials: trials.clamp(1, TRIALS),
            closed_by_trial_at: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When the next trial is due, while the circuit is open.
    pub fn next_trial_at(&self) -> Option<i64> {
        (self.phase == Phase::Open).then_some(self.open_until)
    }

    /// The cool-down in force (for the log line, and shared on Redis).
    pub fn cooldown(&self) -> Duration {
        Duration::from_millis(self.cooldown_ms.max(0) as u64)
    }

    /// Whether a target's `Retry-After` holds the destination at `now`.
    pub fn held(&self, now: i64) -> bool {
        self.held_until.is_some_and(|t| now < t)
    }

    /// Whether a delivery may start at `now` (an open circuit whose
    /// cool-down is over becomes half-open here).
    pub fn gate(&mut self, now: i64) -> Gate {
        if let Some(t) = self.held_until.filter(|t| now < *t) {
            return Gate::Until(t);
        }
        if self.phase == Phase::Open {
            if now < self.open_until {
                return Gate::Until(self.open_until);
            }
            self.half_open(self.trials);
        }
        match self.phase {
            Phase::HalfOpen if self.trials_out >= self.trials => Gate::Trials,
            Phase::HalfOpen => Gate::Go { trial: true },
            _ => Gate::Go { trial: false },
        }
    }

    fn half_open(&mut self, trials: u32) {
        self.phase = Phase::HalfOpen;
        self.trials = trials.max(1);
        self.trials_out = 0;
        self.trials_failed = 0;
    }

    /// A delivery starts (after [`Breaker::gate`] said `Go`).
    pub fn started(&mut self) {
        if self.phase == Phase::HalfOpen {
            self.trials_out += 1;
        }
    }

    /// An attempt's result, of the job whose id hashes to `event`
    /// ([`event_of`]). `trial`: it was started as a trial (its verdict is the
    /// round's); `hold` is the target's `Retry-After` on a 429 or 503
    /// (already capped). Returns the new phase when it changed.
    pub fn record(
        &mut self,
        signal: Signal,
        event: u64,
        trial: bool,
        hold: Option<Duration>,
        now: i64,
    ) -> Option<Phase> {
        if let Some(h) = hold {
            let until = now.saturating_add(ms(h));
            self.held_until = Some(self.held_until.map_or(until, |t| t.max(until)));
        }
        let before = self.phase;
        match (self.phase, trial, signal) {
            (Phase::HalfOpen, true, Signal::Success | Signal::Answered) => {
                self.close();
                self.closed_by_trial_at = Some(now);
            }
            (_, _, Signal::Success) => self.close(),
            (Phase::Closed, _, Signal::Answered) => self.run.clear(),
            (Phase::Closed, _, Signal::Failure) if self.settings.failures > 0 => {
                if !self.run.contains(&event) {
                    self.run.push(event);
                }
                if self.run.len() >= self.settings.failures as usize {
                    let base = ms(self.settings.cooldown);
                    let up_a_moment_ago = self
                        .closed_by_trial_at
                        .is_some_and(|t| now.saturating_sub(t) < base);
                    self.open(now);
                    if up_a_moment_ago {
                        self.open_until = now.saturating_add((base / 4).max(1));
                    }
                }
            }
            (Phase::HalfOpen, true, Signal::Failure) => {
                self.trials_failed += 1;
                if self.trials_failed >= self.trials {
                    self.cooldown_ms = self
                        .cooldown_ms
                        .saturating_mul(2)
                        .min(ms(self.settings.max_cooldown));
                    self.open(now);
                }
            }
            // A trial without a verdict: its place goes to another.
            (Phase::HalfOpen, true, Signal::None) => {
                self.trials_out = self.trials_out.saturating_sub(1);
            }
            // A delivery started before the circuit opened, or no verdict.
            _ => {}
        }
        (self.phase != before).then_some(self.phase)
    }

    /// The trials another relay's claim gave this one (Redis: the circuit is
    /// shared, and one claim takes a round's probes), with the shared
    /// cool-down in force: this relay's breaker judges them as its own round.
    pub fn shared_trials(&mut self, probes: u32, cooldown: Duration) -> Option<Phase> {
        let before = self.phase;
        self.cooldown_ms = ms(cooldown).max(ms(self.settings.cooldown));
        if self.phase != Phase::HalfOpen || self.trials_out >= self.trials {
            self.half_open(probes);
        }
        (self.phase != before).then_some(self.phase)
    }

    /// The shared circuit (Redis) is open until `until` on this clock, as a
    /// claim found it.
    pub fn shared_open(&mut self, until: i64) -> Option<Phase> {
        // Our own round of trials holds the others (Redis `cg:probeUntil`):
        // their verdict, not the hold, decides.
        if self.phase == Phase::HalfOpen && self.trials_out > 0 {
            return None;
        }
        let before = self.phase;
        if self.phase != Phase::Open || self.open_until < until {
            self.phase = Phase::Open;
            self.open_until = until;
            self.run.clear();
        }
        (self.phase != before).then_some(self.phase)
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.run.clear();
        self.cooldown_ms = ms(self.settings.cooldown);
        self.trials_out = 0;
        self.trials_failed = 0;
    }

    fn open(&mut self, now: i64) {
        self.phase = Phase::Open;
        self.open_until = now.saturating_add(self.cooldown_ms);
        self.run.clear();
        self.trials_out = 0;
        self.trials_failed = 0;
    }
}

/// The breaker's name for the job `id`'s event: a hash (the run keeps a
/// few of them, not the ids).
pub fn event_of(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes())
}

/// What an attempt's classified result says to the breaker, and how long a
/// `Retry-After` holds the destination (capped at `max_hold`).
pub fn signal(
    sent: &super::target::Sent,
    outcome: &super::classify::Outcome,
    max_hold: Duration,
) -> (Signal, Option<Duration>) {
    use super::classify::Outcome;
    match outcome {
        Outcome::Delivered => (Signal::Success, None),
        Outcome::Permanent { .. } => (Signal::Answered, None),
        Outcome::Retry { retry_after, .. } => {
            let hold = retry_after.map(|d| d.min(max_hold));
            if sent.as_ref().is_ok_and(|a| a.status == 429) {
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

    const SEC: i64 = 1000;

    /// The breaker as a table of transitions: (time s, what happens, the
    /// gate or phase that must follow).
    #[test]
    fn the_transitions_as_a_table() {
        #[derive(Debug, Clone, Copy)]
        enum Do {
            /// An attempt's result: signal, started as a trial.
            Rec(Signal, bool),
            Start,
            /// The gate must be this.
            Expect(Gate),
        }
        use Do::{Expect, Rec, Start};
        use Signal::{Answered, Failure, Success};
        let go = Expect(Gate::Go { trial: false });
        let trial = Expect(Gate::Go { trial: true });
        let (open, half, closed) = (
            Some(Phase::Open),
            Some(Phase::HalfOpen),
            Some(Phase::Closed),
        );
        let table: Vec<(i64, Do, Option<Phase>)> = vec![
            (0, Rec(Failure, false), None),
            (0, Rec(Answered, false), None), // a 4xx resets the count
            (0, Rec(Failure, false), None),
            (0, Rec(Failure, false), None),
            (1, Rec(Failure, false), open),           // 3 in a row
            (5, Expect(Gate::Until(11 * SEC)), None), // the cool-down
            (5, Rec(Failure, false), None),           // started before: no effect
            (11, trial, half),
            (11, Start, None),
            (11, trial, None),
            (11, Start, None),
            (11, trial, None),
            (11, Start, None),
            (11, Expect(Gate::Trials), None), // three trials at most
            (12, Rec(Failure, true), None),
            (12, Rec(Signal::None, true), None), // no verdict: its place is free
            (12, trial, None),
            (12, Start, None),
            (12, Rec(Failure, true), None),
            (12, Rec(Failure, true), open), // every trial failed
            (31, Expect(Gate::Until(32 * SEC)), None), // twice the cool-down
            (32, trial, half),
            (32, Start, None),
            (32, Start, None),
            (33, Rec(Failure, true), None),
            (33, Rec(Answered, true), closed), // one answered: it is up
            (33, go, None),
            (33, Rec(Failure, false), None),
            (33, Rec(Failure, false), None),
            (33, Rec(Failure, false), open),
            // Up a moment ago (a trial closed it at 33): a quarter of the
            // first cool-down, 2.5 s.
            (34, Expect(Gate::Until(35_500)), None),
            (36, trial, half),
            (36, Start, None),
            (36, Start, None),
            (36, Start, None),
            (37, Rec(Failure, true), None),
            (37, Rec(Failure, true), None),
            (37, Rec(Failure, true), open), // a failed round doubles from 10 s
            (56, Expect(Gate::Until(57 * SEC)), None),
            (57, trial, half),
            (57, Start, None),
            (57, Start, None),
            (57, Start, None),
            (58, Rec(Failure, true), None),
            (58, Rec(Failure, true), None),
            (58, Rec(Failure, true), open),
            (82, Expect(Gate::Until(83 * SEC)), None), // capped at 25 s
            (83, trial, half),
            (83, Start, None),
            (83, Rec(Success, true), closed),
        ];
        let mut b = Breaker::new(S, 16);
        for (i, (at, what, phase)) in table.into_iter().enumerate() {
            let now = at * SEC;
            let before = b.phase();
            match what {
                Rec(signal, trial) => {
                    assert_eq!(
                        b.record(signal, i as u64, trial, None, now),
                        phase,
                        "row {i}"
                    );
                }
                Start => b.started(),
                Expect(want) => assert_eq!(b.gate(now), want, "row {i}"),
            }
            if !matches!(what, Rec(..)) {
                let changed = (b.phase() != before).then_some(b.phase());
                assert_eq!(changed, phase, "row {i}: {what:?}");
            }
        }
    }

    #[test]
    fn retry_after_holds_the_destination_whatever_the_phase() {
        let mut b = Breaker::new(S, 16);
        assert_eq!(
            b.record(Signal::Answered, 1, false, Some(Duration::from_secs(30)), 0),
            None
        );
        assert_eq!(b.gate(0), Gate::Until(30 * SEC));
        assert_eq!(b.gate(30 * SEC), Gate::Go { trial: false });
        assert_eq!(b.phase(), Phase::Closed, "a 429 is no failure");
        // A hold of u64::MAX seconds and a clock near its end: no overflow.
        let huge = Duration::from_secs(u64::MAX);
        b.record(Signal::Failure, 1, false, Some(huge), i64::MAX - 5);
        assert_eq!(b.gate(i64::MAX - 1), Gate::Until(i64::MAX));
    }

    /// One event failing for its own reason, retried any number of times,
    /// opens nothing; `failures` different events in a row do; a success
    /// starts the run again.
    #[test]
    fn an_events_own_retries_count_once_in_a_run() {
        let mut b = Breaker::new(S, 16);
        for _ in 0..10 {
            assert_eq!(b.record(Signal::Failure, 7, false, None, 0), None);
        }
        assert_eq!(b.record(Signal::Failure, 8, false, None, 0), None);
        assert_eq!(b.record(Signal::Success, 9, false, None, 0), None);
        assert_eq!(
            b.record(Signal::Failure, 7, false, None, 0),
            None,
            "a new run"
        );
        assert_eq!(b.record(Signal::Failure, 8, false, None, 0), None);
        assert_eq!(
            b.record(Signal::Failure, 7, false, None, 0),
            None,
            "7 again"
        );
        assert_eq!(b.record(Signal::Answered, 11, false, None, 0), None);
        for event in [7, 8, 7, 8] {
            assert_eq!(b.record(Signal::Failure, event, false, None, 0), None);
        }
        assert_eq!(
            b.record(Signal::Failure, 10, false, None, 0),
            Some(Phase::Open),
            "three different events in a row"
        );
        assert_ne!(event_of("17"), event_of("18"));
    }

    #[test]
    fn zero_failures_is_no_breaker() {
        let mut b = Breaker::new(CircuitSettings { failures: 0, ..S }, 16);
        for _ in 0..100 {
            assert_eq!(b.record(Signal::Failure, 1, false, None, 0), None);
        }
        assert_eq!(b.gate(0), Gate::Go { trial: false });
    }

    #[test]
    fn trials_are_at_most_the_pools_concurrency() {
        let mut b = Breaker::new(CircuitSettings { failures: 1, ..S }, 1);
        b.record(Signal::Failure, 1, false, None, 0);
        assert_eq!(b.gate(10 * SEC), Gate::Go { trial: true });
        b.started();
        assert_eq!(b.gate(10 * SEC), Gate::Trials);
        assert_eq!(
            b.record(Signal::Failure, 1, true, None, 11 * SEC),
            Some(Phase::Open),
            "its one trial failed"
        );
    }

    #[test]
    fn a_shared_circuits_probes_are_a_round_of_trials() {
        let mut b = Breaker::new(S, 16);
        assert_eq!(b.shared_open(50 * SEC), Some(Phase::Open));
        assert_eq!(b.next_trial_at(), Some(50 * SEC));
        assert_eq!(
            b.shared_trials(2, Duration::from_secs(20)),
            Some(Phase::HalfOpen)
        );
        b.started();
        b.started();
        assert_eq!(b.record(Signal::Failure, 1, true, None, 51 * SEC), None);
        assert_eq!(
            b.record(Signal::Failure, 1, true, None, 51 * SEC),
            Some(Phase::Open)
        );
        assert_eq!(b.cooldown(), Duration::from_secs(25), "doubled, capped");
    }
}
