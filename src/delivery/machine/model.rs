//! The pool's machine against a model: random sequences of what happens to
//! one destination's pool (claims answered, short, failed, or saying the
//! shared circuit is open or handing out its probes; jobs handed over by
//! the ingress, also while the pool would refuse them; deliveries ending
//! with every signal and a target's `Retry-After`; pauses stored, resumed
//! and told by this relay's admin; wake-ups; time passing; shutdown), on a
//! time the test chooses. After every step, what must hold whatever the
//! order:
//!
//! * every job the pool was given is started once or given back once,
//!   never both, never twice, never one it was not given, and the pool's
//!   own counts are the model's;
//! * at most `concurrency` deliveries run, at most `rate_limit` start in
//!   any 1.05 s window, one claim and one look at the pause are out at once;
//! * nothing starts once the store has been paused for `pause_lease` (the
//!   words the pool hears are the store's at some time after they were
//!   asked), nor while a `Retry-After` holds the destination, nor after
//!   shutdown;
//! * nothing is held leased and unstarted while the pool is paused, the
//!   circuit open, a `Retry-After` holding, or the pool stopping: those
//!   jobs wait in the store, where an operator sees and can remove them;
//! * at the end, with the store resumed and the target up, every job given
//!   is started and ended (none is stranded in the pool), and the pool
//!   claims again.
//!
//! A failure prints the seed and the shrunk sequence:
//!
//! ```sh
//! MACHINE_MODEL_CASES=20000 cargo test --lib machine::model -- --nocapture
//! PROPTEST_RNG_SEED=<seed> cargo test --lib machine::model   # replay a failure
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

use super::{Action, Machine, Order, Settings, RATE_WINDOW_MS};
use crate::delivery::circuit::{CircuitSettings, Phase, Signal, TRIALS};
use crate::queue::Claimed;

#[derive(Debug, Clone)]
enum Op {
    /// Time passes by this many ms.
    Advance(u16),
    /// Time passes to the pool's next wake-up.
    ToWake,
    /// The claim that is out is answered: up to `n` jobs, or an error; the
    /// shared circuit open for this many ms; the jobs as its probes.
    AnswerClaim {
        n: u8,
        fail: bool,
        open_for: Option<u16>,
        probes: bool,
        wait: Option<u16>,
        stale: bool,
    },
    /// The look at the pause that is out is answered (or fails). `stale`:
    /// the store was read when it was asked, not now.
    AnswerCheck {
        fail: bool,
        stale: bool,
    },
    /// The ingress hands over this many jobs (whether the pool takes
    /// handoffs or not: the handoff's gate is set after a step).
    Hand(u8),
    /// A running delivery ends.
    Finish {
        pick: u8,
        signal: u8,
        hold: Option<u16>,
    },
    /// The store's pause is set or cleared; `told`: by this relay's admin.
    Pause {
        on: bool,
        told: bool,
    },
    Woken,
    Stop,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u16..3000).prop_map(Op::Advance),
        3 => Just(Op::ToWake),
        5 => (
            0u8..6,
            prop::bool::weighted(0.1),
            prop::option::weighted(0.1, 1u16..3000),
            prop::bool::weighted(0.1),
            prop::option::of(0u16..2000),
            any::<bool>(),
        )
            .prop_map(|(n, fail, open_for, probes, wait, stale)| Op::AnswerClaim {
                n,
                fail,
                open_for,
                probes,
                wait,
                stale
            }),
        2 => (prop::bool::weighted(0.15), any::<bool>())
            .prop_map(|(fail, stale)| Op::AnswerCheck { fail, stale }),
        3 => (1u8..4).prop_map(Op::Hand),
        5 => (
            any::<u8>(),
            0u8..4,
            prop::option::weighted(0.15, 0u16..4000)
        )
            .prop_map(|(pick, signal, hold)| Op::Finish { pick, signal, hold }),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(on, told)| Op::Pause { on, told }),
        1 => Just(Op::Woken),
        1 => Just(Op::Stop),
    ]
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        1usize..4,
        0usize..3,
        prop_oneof![Just(0u32), 1u32..4],
        0u32..3,
        100u64..2000,
        50i64..1000,
        200i64..1000,
    )
        .prop_map(
            |(concurrency, extra, rate_limit, failures, cooldown, idle, lease)| Settings {
                concurrency,
                prefetch: concurrency + extra,
                rate_limit,
                circuit: CircuitSettings {
                    failures,
                    cooldown: Duration::from_millis(cooldown),
                    max_cooldown: Duration::from_millis(cooldown * 4),
                },
                idle_poll_ms: idle,
                pause_lease_ms: lease,
            },
        )
}

/// The pool and what the model knows of it.
struct Pool {
    m: Machine,
    s: Settings,
    now: i64,
    next_id: u64,
    /// Given to the pool (claimed or handed), not started nor given back.
    held: BTreeSet<u64>,
    /// Started, not ended: whether as a trial.
    running: BTreeMap<u64, bool>,
    /// Started (and maybe ended) or given back: never again.
    gone: BTreeSet<u64>,
    claim_out: Option<(usize, Order, i64)>,
    /// Claims asked in all.
    claims: u64,
    check_out: Option<i64>,
    /// Since when the store says paused.
    paused_since: Option<i64>,
    /// The store's pause flag as it changed: (when, paused).
    pause_log: Vec<(i64, bool)>,
    /// Since when this relay's admin has answered a pause the store still
    /// holds.
    told_since: Option<i64>,
    /// Until when a target's `Retry-After` holds the destination.
    hold_until: i64,
    starts: VecDeque<i64>,
    stopped: bool,
}

type Checked = Result<(), TestCaseError>;

impl Pool {
    fn new(s: Settings) -> Self {
        Self {
            m: Machine::new(s),
            s,
            now: 0,
            next_id: 1,
            held: BTreeSet::new(),
            running: BTreeMap::new(),
            gone: BTreeSet::new(),
            claim_out: None,
            claims: 0,
            check_out: None,
            paused_since: None,
            pause_log: Vec::new(),
            told_since: None,
            hold_until: i64::MIN,
            starts: VecDeque::new(),
            stopped: false,
        }
    }

    fn new_job(&mut self, probe: Option<Duration>) -> crate::queue::Leased {
        let id = self.next_id;
        self.next_id += 1;
        self.held.insert(id);
        let mut l = super::tests::job(id, 0);
        l.job.probe = probe;
        l
    }

    fn apply(&mut self, op: &Op) -> Checked {
        let now = self.now;
        match *op {
            Op::Advance(ms) => self.now += i64::from(ms),
            Op::ToWake => {
                if let Some(t) = self.m.next_wake(now) {
                    self.now = t.max(now);
                }
            }
            Op::AnswerClaim {
                n,
                fail,
                open_for,
                probes,
                wait,
                stale,
            } => {
                let Some((max, order, asked_at)) = self.claim_out.take() else {
                    return Ok(());
                };
                let result = if fail {
                    Err("store down".to_string())
                } else {
                    let paused = self.paused_at(if stale { asked_at } else { now });
                    let n = if paused { 0 } else { usize::from(n).min(max) };
                    let probe = (probes && order == Order::Trials).then_some(
                        Duration::from_millis(self.s.circuit.cooldown.as_millis() as u64),
                    );
                    let jobs = (0..n).map(|_| self.new_job(probe)).collect();
                    Ok(Claimed {
                        jobs,
                        next_due_ms: None,
                        paused,
                        circuit_open_for_ms: open_for.map(i64::from),
                    })
                };
                self.m
                    .claimed(result, max, asked_at, wait.map(i64::from), now);
            }
            Op::AnswerCheck { fail, stale } => {
                let Some(asked_at) = self.check_out.take() else {
                    return Ok(());
                };
                let word = if fail {
                    Err("store down".to_string())
                } else {
                    Ok(self.paused_at(if stale { asked_at } else { now }))
                };
                self.m.pause_seen(word, asked_at, now);
            }
            Op::Hand(n) => {
                for _ in 0..n {
                    let job = self.new_job(None);
                    self.m.handed(job, now);
                }
                self.m.woken();
            }
            Op::Finish { pick, signal, hold } => self.finish(pick, signal, hold),
            Op::Pause { on, told } => {
                if on {
                    self.paused_since.get_or_insert(now);
                } else {
                    self.paused_since = None;
                    self.told_since = None;
                }
                self.pause_log.push((now, on));
                if told {
                    if on {
                        self.told_since.get_or_insert(now);
                    }
                    self.m.pause_told(on, now);
                }
            }
            Op::Woken => self.m.woken(),
            Op::Stop => {
                self.stopped = true;
                self.m.stop();
            }
        }
        self.poll()
    }

    /// The `pick`th running delivery ends, with a signal and a hold.
    fn finish(&mut self, pick: u8, signal: u8, hold: Option<u16>) {
        let now = self.now;
        let Some((&id, &trial)) = self
            .running
            .iter()
            .nth(usize::from(pick) % self.running.len().max(1))
        else {
            return;
        };
        self.running.remove(&id);
        let signal = [
            Signal::Success,
            Signal::Failure,
            Signal::Answered,
            Signal::None,
        ][usize::from(signal)];
        let hold = hold.map(|ms| Duration::from_millis(u64::from(ms)));
        if let Some(h) = hold {
            self.hold_until = self.hold_until.max(now + h.as_millis() as i64);
        }
        self.m.finished(trial, (signal, id), hold, now);
    }

    /// Whether the store was paused at time `t` (a read then).
    fn paused_at(&self, t: i64) -> bool {
        self.pause_log
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .is_some_and(|(_, on)| *on)
    }

    /// The pool's commands now, carried out and checked.
    fn poll(&mut self) -> Checked {
        let now = self.now;
        for action in self.m.poll(now) {
            match action {
                Action::Claim { max, order } => {
                    prop_assert!(self.claim_out.is_none(), "a second claim out");
                    prop_assert!(!self.stopped, "a claim after shutdown");
                    prop_assert!(max > 0, "a claim of nothing");
                    self.claim_out = Some((max, order, now));
                    self.claims += 1;
                }
                Action::CheckPause => {
                    prop_assert!(self.check_out.is_none(), "a second look out");
                    self.check_out = Some(now);
                }
                Action::Start { job, trial } => self.started(&job.job.id, trial)?,
                Action::Release(jobs) => {
                    prop_assert!(!jobs.is_empty(), "an empty release");
                    for j in jobs {
                        let id: u64 = j.job.id.parse().expect("id");
                        prop_assert!(self.held.remove(&id), "gave back job {} not held", id);
                        prop_assert!(self.gone.insert(id), "job {} gone twice", id);
                    }
                }
                Action::Circuit { .. } => {}
            }
        }
        self.check_state()
    }

    fn started(&mut self, id: &str, trial: bool) -> Checked {
        let now = self.now;
        let id: u64 = id.parse().expect("id");
        prop_assert!(self.held.remove(&id), "started job {} not held", id);
        prop_assert!(self.gone.insert(id), "job {} started after it went", id);
        prop_assert!(!self.stopped, "a start after shutdown");
        prop_assert!(now >= self.hold_until, "a start during a Retry-After hold");
        prop_assert!(
            self.told_since.is_none(),
            "a start after this relay answered a pause"
        );
        if let Some(since) = self.paused_since {
            prop_assert!(
                now < since + self.s.pause_lease_ms,
                "a start at {} ms, paused since {} ms",
                now,
                since
            );
        }
        self.running.insert(id, trial);
        prop_assert!(
            self.running.len() <= self.s.concurrency,
            "over the concurrency"
        );
        if self.s.rate_limit > 0 {
            self.starts.push_back(now);
            while self
                .starts
                .front()
                .is_some_and(|t| now - *t >= RATE_WINDOW_MS)
            {
                self.starts.pop_front();
            }
            prop_assert!(
                self.starts.len() <= self.s.rate_limit as usize,
                "over the rate limit"
            );
        }
        Ok(())
    }

    fn check_state(&self) -> Checked {
        prop_assert_eq!(self.m.ready_len(), self.held.len(), "jobs held");
        prop_assert_eq!(self.m.running(), self.running.len(), "jobs running");
        let trials = self.running.values().filter(|t| **t).count();
        prop_assert!(trials <= TRIALS as usize, "{} trials at once", trials);
        let why = if self.stopped {
            Some("stopping")
        } else if self.now < self.hold_until {
            Some("held by a Retry-After")
        } else if self.m.phase() == Phase::Open {
            Some("the circuit open")
        } else if self.m.is_paused() {
            Some("paused")
        } else {
            None
        };
        if let Some(why) = why {
            prop_assert!(self.held.is_empty(), "jobs held leased while {}", why);
        }
        Ok(())
    }

    /// The store resumed, the target up: every job given is started and
    /// ends (or, stopped, every job held is given back).
    fn drain(&mut self) -> Checked {
        if !self.stopped && self.paused_since.take().is_some() {
            self.told_since = None;
            self.pause_log.push((self.now, false));
            self.m.pause_told(false, self.now);
        }
        // (and, not stopped, it claims again: a pool that never did after a
        // hold, a pause or an opening would hold nothing and look drained)
        let claims = self.claims;
        for _ in 0..10_000 {
            let claimed_again = self.stopped || self.claims > claims;
            if self.held.is_empty()
                && self.running.is_empty()
                && self.claim_out.is_none()
                && claimed_again
            {
                return Ok(());
            }
            for (id, trial) in std::mem::take(&mut self.running) {
                self.m
                    .finished(trial, (Signal::Success, id), None, self.now);
            }
            // The store answers at once (a word as old as the pause lease
            // starts nothing).
            for _ in 0..4 {
                if let Some((max, _, asked_at)) = self.claim_out.take() {
                    let c = Claimed::default();
                    self.m.claimed(Ok(c), max, asked_at, None, self.now);
                }
                if let Some(asked_at) = self.check_out.take() {
                    self.m.pause_seen(Ok(false), asked_at, self.now);
                }
                self.poll()?;
            }
            let next = self.m.next_wake(self.now).unwrap_or(self.now + 1000);
            self.now = next.max(self.now + 1);
        }
        prop_assert!(
            false,
            "not drained: held {:?}, running {:?}, claimed again: {}",
            self.held,
            self.running,
            self.claims > claims
        );
        Ok(())
    }
}

fn run(s: Settings, ops: &[Op]) -> Checked {
    let mut pool = Pool::new(s);
    pool.poll()?;
    for op in ops {
        if matches!(op, Op::Stop) && pool.stopped {
            continue;
        }
        pool.apply(op)?;
    }
    pool.drain()
}

#[test]
fn the_pool_machine_follows_the_model() {
    let cases = std::env::var("MACHINE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("pool machine model: {cases} cases, seed {seed}");
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    });
    let strategy = (settings(), prop::collection::vec(op(), 1..120));
    match runner.run(&strategy, |(s, ops)| run(s, &ops)) {
        Ok(()) => eprintln!("pool machine model: {cases} cases passed (seed {seed})"),
        Err(TestError::Fail(why, case)) => panic!(
            "the pool's machine left the model: {why}\nshrunk case: {case:#?}\nreplay: PROPTEST_RNG_SEED={seed} cargo test --lib machine::model"
        ),
        Err(TestError::Abort(why)) => panic!("aborted: {why} (seed {seed})"),
    }
}
