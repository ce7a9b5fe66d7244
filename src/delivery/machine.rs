//! The dispatcher's decisions as a value: what one destination's pool
//! claims, starts, gives back and when it looks again, given what happened
//! and the time. Pure: every event carries its time (milliseconds of one
//! monotonic clock), and [`Machine::poll`] answers with [`Action`]s that
//! the dispatcher (`dispatcher.rs`) carries out. So the rules are checked in
//! tables and in simulations on a time the tests choose (see the tests
//! below), not by sleeping.
//!
//! The rules:
//! * **Claims.** Up to `prefetch` jobs are leased ahead of a free worker,
//!   one claim at a time. A claim that came back short rests the pool until
//!   the store's next due time, a wake-up (the ingress stored a job, a retry
//!   was written back, the admin retried or removed a job) or `idle_poll`,
//!   whichever is first. A claim that failed rests 1 s (or `idle_poll` if
//!   shorter, but at least 10 ms).
//! * **Starts.** At most `concurrency` deliveries at once, at most
//!   `rate_limit` started in any 1.05 s, only while the circuit lets
//!   ([`circuit`](super::circuit)) and the pause lease holds (below).
//! * **Circuit.** When it opens, the jobs held and not started go back to the
//!   store (they wait there unleased, as waiting jobs); when half-open, the
//!   pool claims its trials freshest first, and starts nothing else.
//! * **Pause lease.** A start needs a fresh word that the destination is not
//!   paused: a claim's answer, or a look of its own ([`Action::CheckPause`])
//!   at most `pause_lease` old, counted from when it was asked. So a pause,
//!   answered `pause_lease` after it is stored, is honoured by every relay
//!   (SPEC §7). A pause seen, or told by this relay's admin, gives back every
//!   job held and not started.
//! * **Shutdown.** Nothing more is claimed or started; the jobs held go
//!   back.

use std::collections::VecDeque;
use std::time::Duration;

use super::circuit::{Breaker, CircuitSettings, Gate, Phase, Signal};
use crate::queue::{Claimed, Leased};

/// The pool's limits.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub concurrency: usize,
    /// Jobs leased ahead of a free worker, at most.
    pub prefetch: usize,
    /// Starts in any 1.05 s; 0 = none.
    pub rate_limit: u32,
    pub circuit: CircuitSettings,
    /// The longest rest between two claims.
    pub idle_poll_ms: i64,
    pub pause_lease_ms: i64,
}

pub use crate::queue::ClaimOrder as Order;

/// What the dispatcher is to do. (A `Start` carries its job inline: each
/// is moved once, straight into its delivery task; a box would be one more
/// allocation per delivery.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Action {
    Claim {
        max: usize,
        order: Order,
    },
    Start {
        job: Leased,
        trial: bool,
    },
    /// Back to the store, unstarted (waiting, attempts unchanged).
    Release(Vec<Leased>),
    /// Ask the store whether the destination is paused.
    CheckPause,
    /// The circuit changed: log it, show it, and with `share`, tell the
    /// other relays (Redis).
    Circuit {
        phase: Phase,
        cooldown: Duration,
        share: bool,
    },
}

#[derive(Debug)]
struct Ready {
    job: Leased,
    trial: bool,
}

#[derive(Debug)]
pub struct Machine {
    s: Settings,
    breaker: Breaker,
    ready: VecDeque<Ready>,
    /// Deliveries started whose HTTP exchange has not ended.
    running: usize,
    claim_out: bool,
    /// Woken while a claim was out: the store may have changed after the
    /// claim read it (an ordered key's job finished), so a short answer
    /// rests not.
    woken_in_claim: bool,
    check_out: bool,
    /// No claim before this (a short claim's rest).
    rest_until: Option<i64>,
    paused: bool,
    /// Starts allowed until this (the pause lease).
    lease_until: i64,
    /// When the word on the pause last heard was asked: an older one is
    /// ignored (a claim answered after a pause was told must not undo it).
    word_at: i64,
    /// No pause check before this (the last one failed).
    check_after: i64,
    /// When the last starts were (the rate limit's window).
    starts: VecDeque<i64>,
    stopping: bool,
    out: Vec<Action>,
}

/// The rate limit's window, 5% longer than a second (see `window.rs`).
const RATE_WINDOW_MS: i64 = 1050;

/// How long a failed claim or look at the pause rests the pool, at most.
const ERROR_REST_MS: i64 = 1000;

impl Machine {
    pub fn new(s: Settings) -> Self {
        Self {
            breaker: Breaker::new(s.circuit, s.concurrency.min(u32::MAX as usize) as u32),
            s,
            ready: VecDeque::new(),
            running: 0,
            claim_out: false,
            woken_in_claim: false,
            check_out: false,
            rest_until: None,
            paused: false,
            lease_until: i64::MIN,
            word_at: i64::MIN,
            check_after: i64::MIN,
            starts: VecDeque::new(),
            stopping: false,
            out: Vec::new(),
        }
    }

    /// Jobs held and not started (the handoff's room is counted with them).
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn phase(&self) -> Phase {
        self.breaker.phase()
    }

    /// When the next trial is due, while the circuit is open.
    pub fn next_trial_at(&self) -> Option<i64> {
        self.breaker.next_trial_at()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether a delivery may be sent now (the delivery itself asks, just
    /// before its request goes out: a pause told meanwhile stops it).
    pub fn may_send(&self, now: i64) -> bool {
        !self.stopping && !self.paused && now < self.lease_until
    }

    /// When starts are allowed until (published to the deliveries).
    pub fn lease_until(&self) -> i64 {
        if self.paused || self.stopping {
            i64::MIN
        } else {
            self.lease_until
        }
    }

    /// A job the ingress stored leased to this pool: held while the circuit
    /// is closed and no `Retry-After` holds the destination; else back to
    /// the store, where it waits (a half-open circuit's trials are claimed,
    /// freshest first).
    pub fn handed(&mut self, job: Leased, now: i64) {
        if self.takes_handoffs(now) {
            self.ready.push_back(Ready { job, trial: false });
        } else {
            self.out.push(Action::Release(vec![job]));
        }
    }

    /// Whether the ingress may hand jobs to this pool (it would give them
    /// back at once otherwise). Not while a `Retry-After` holds the
    /// destination: jobs held here would wait out the hold leased, shown
    /// active, and an operator could not remove them.
    pub fn takes_handoffs(&self, now: i64) -> bool {
        !self.stopping
            && !self.paused
            && self.breaker.phase() == Phase::Closed
            && !self.breaker.held(now)
    }

    /// A claim's answer; it was asked at `asked_at`; `wait_ms` is how long
    /// until the store's next due job (from its next due time).
    pub fn claimed(
        &mut self,
        result: Result<Claimed, String>,
        asked: usize,
        asked_at: i64,
        wait_ms: Option<i64>,
        now: i64,
    ) {
        self.claim_out = false;
        let woken = std::mem::take(&mut self.woken_in_claim);
        let claimed = match result {
            Ok(c) => c,
            Err(_) => {
                self.rest_until = Some(now.saturating_add(self.error_rest_ms()));
                return;
            }
        };
        self.pause_word(claimed.paused, asked_at, now);
        if let Some(open_for) = claimed.circuit_open_for_ms {
            let phase = self
                .breaker
                .shared_open(now.saturating_add(open_for.max(0)));
            self.circuit_changed(phase, false, now);
        }
        let probes = claimed
            .jobs
            .iter()
            .filter(|j| j.job.probe.is_some())
            .count();
        if let Some(cooldown) = claimed.jobs.iter().find_map(|j| j.job.probe) {
            let phase = self.breaker.shared_trials(probes as u32, cooldown);
            self.circuit_changed(phase, false, now);
        }
        let trial = self.breaker.phase() == Phase::HalfOpen;
        let short = claimed.jobs.len() < asked;
        for job in claimed.jobs {
            self.take(job, trial, now);
        }
        if short && !woken {
            let wait = wait_ms
                .unwrap_or(self.s.idle_poll_ms)
                .clamp(0, self.s.idle_poll_ms);
            self.rest_until = Some(now.saturating_add(wait));
        }
    }

    fn take(&mut self, job: Leased, trial: bool, now: i64) {
        if self.stopping
            || self.paused
            || matches!(self.breaker.phase(), Phase::Open)
            || self.breaker.held(now)
        {
            self.out.push(Action::Release(vec![job]));
        } else {
            self.ready.push_back(Ready { job, trial });
        }
    }

    /// This relay's admin told of a pause or resume, now. (A look at the
    /// pause that is out stays out: its answer is still to come.)
    pub fn pause_told(&mut self, paused: bool, now: i64) {
        self.pause_word(paused, now, now);
    }

    /// The answer of a [`Action::CheckPause`] asked at `asked_at`.
    pub fn pause_seen(&mut self, result: Result<bool, String>, asked_at: i64, now: i64) {
        self.check_out = false;
        match result {
            Ok(paused) => self.pause_word(paused, asked_at, now),
            // No word: starts stop when the lease runs out; look again in a
            // while (a store that fails at once is not asked in a loop).
            Err(_) => self.check_after = now.saturating_add(self.error_rest_ms()),
        }
    }

    /// A word on whether the destination is paused, asked at `asked_at`:
    /// applied unless a later one was heard already. Paused: what is held
    /// goes back, nothing starts. Not paused: starts are allowed for the
    /// pause lease from when it was asked.
    fn pause_word(&mut self, paused: bool, asked_at: i64, now: i64) {
        if asked_at < self.word_at {
            return;
        }
        self.word_at = asked_at;
        if paused {
            self.paused = true;
            self.release_ready();
            self.rest_until = Some(now.saturating_add(self.s.idle_poll_ms));
        } else {
            let resumed = self.paused;
            self.paused = false;
            self.lease_until = self
                .lease_until
                .max(asked_at.saturating_add(self.s.pause_lease_ms));
            if resumed {
                self.rest_until = None;
            }
        }
    }

    /// A delivery's HTTP exchange ended (or it never went out: `Signal::None`),
    /// of the job whose id hashes to `event` ([`super::circuit::event_of`];
    /// only a failure's is read).
    pub fn finished(
        &mut self,
        trial: bool,
        (signal, event): (Signal, u64),
        hold: Option<Duration>,
        now: i64,
    ) {
        self.running = self.running.saturating_sub(1);
        let phase = self.breaker.record(signal, event, trial, hold, now);
        if self.breaker.held(now) {
            // Held by a `Retry-After`: waiting in the store, not leased here.
            self.release_ready();
        }
        self.circuit_changed(phase, true, now);
    }

    fn circuit_changed(&mut self, phase: Option<Phase>, share: bool, now: i64) {
        let Some(phase) = phase else {
            return;
        };
        if phase == Phase::Open {
            // Held by an open circuit: waiting in the store, not leased here.
            self.release_ready();
        }
        if phase == Phase::Closed {
            self.rest_until = None;
        }
        // While open: how long it stays so (the cool-down, or less when the
        // destination was up a moment ago), for the log and the other relays.
        let cooldown = match self.breaker.next_trial_at() {
            Some(at) => Duration::from_millis(at.saturating_sub(now).max(1) as u64),
            None => self.breaker.cooldown(),
        };
        self.out.push(Action::Circuit {
            phase,
            cooldown,
            share,
        });
    }

    fn release_ready(&mut self) {
        if !self.ready.is_empty() {
            let jobs = self.ready.drain(..).map(|r| r.job).collect();
            self.out.push(Action::Release(jobs));
        }
    }

    /// How long a store that failed a claim or a look at the pause is left
    /// alone: 1 s, or the idle poll if shorter (a longer idle poll does not
    /// leave a failed claim that long), at least 10 ms (not a loop).
    fn error_rest_ms(&self) -> i64 {
        self.s.idle_poll_ms.clamp(10, ERROR_REST_MS)
    }

    /// Something may be due in the store (the ingress stored a job, a retry
    /// was written back, the admin retried or removed a job): end a claim's
    /// rest.
    pub fn woken(&mut self) {
        if !self.paused {
            self.rest_until = None;
            self.woken_in_claim = self.claim_out;
        }
    }

    /// Shutdown: nothing more is started; what is held goes back.
    pub fn stop(&mut self) {
        self.stopping = true;
        self.release_ready();
    }

    /// What to do now.
    pub fn poll(&mut self, now: i64) -> Vec<Action> {
        if self.stopping {
            return std::mem::take(&mut self.out);
        }
        let before = self.breaker.phase();
        let gate = self.breaker.gate(now);
        if self.breaker.phase() != before {
            self.circuit_changed(Some(self.breaker.phase()), true, now);
        }
        // Starts.
        while self.running < self.s.concurrency
            && !self.ready.is_empty()
            && self.may_send(now)
            && self.rate_allows(now)
        {
            let gate = self.breaker.gate(now);
            let Gate::Go { trial } = gate else { break };
            let Some(r) = self.ready.pop_front() else {
                break;
            };
            self.breaker.started();
            self.running += 1;
            if self.s.rate_limit > 0 {
                self.starts.push_back(now);
            }
            self.out.push(Action::Start {
                job: r.job,
                trial: trial || r.trial,
            });
        }
        // Claims.
        let resting = self.rest_until.is_some_and(|t| now < t);
        if !self.claim_out && !resting {
            let claim = match gate {
                _ if self.paused => Some((1, Order::Due)),
                Gate::Go { trial: false } if self.ready.len() < self.s.concurrency => {
                    Some((self.s.prefetch.saturating_sub(self.ready.len()), Order::Due))
                }
                Gate::Go { trial: true } => {
                    let want = (super::circuit::TRIALS as usize)
                        .min(self.s.concurrency)
                        .saturating_sub(self.ready.len() + self.running);
                    (want > 0).then_some((want, Order::Trials))
                }
                _ => None,
            };
            if let Some((max, order)) = claim.filter(|(max, _)| *max > 0) {
                self.claim_out = true;
                self.out.push(Action::Claim { max, order });
            }
        }
        // The pause lease, refreshed before it runs out when no claim is
        // out to refresh it (handed-over jobs need no claim).
        let refresh_at = self.lease_until.saturating_sub(self.s.pause_lease_ms / 3);
        if !self.paused
            && !self.claim_out
            && !self.check_out
            && now >= refresh_at
            && now >= self.check_after
        {
            self.check_out = true;
            self.out.push(Action::CheckPause);
        }
        std::mem::take(&mut self.out)
    }

    fn rate_allows(&mut self, now: i64) -> bool {
        if self.s.rate_limit == 0 {
            return true;
        }
        while self
            .starts
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= RATE_WINDOW_MS)
        {
            self.starts.pop_front();
        }
        self.starts.len() < self.s.rate_limit as usize
    }

    /// When [`Machine::poll`] may have something new to do without another
    /// event: the end of a rest, a cool-down or hold, the rate window, the
    /// pause lease's refresh.
    pub fn next_wake(&mut self, now: i64) -> Option<i64> {
        if self.stopping {
            return None;
        }
        let mut at: Option<i64> = None;
        let mut consider = |t: Option<i64>| {
            if let Some(t) = t.filter(|t| *t > now) {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        consider(self.rest_until);
        if let Gate::Until(t) = self.breaker.gate(now) {
            consider(Some(t));
        }
        if self.s.rate_limit > 0 && !self.ready.is_empty() {
            consider(
                self.starts
                    .front()
                    .map(|t| t.saturating_add(RATE_WINDOW_MS)),
            );
        }
        if !self.paused {
            let refresh = self.lease_until.saturating_sub(self.s.pause_lease_ms / 3);
            consider(Some(refresh.max(self.check_after)));
        }
        at
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
