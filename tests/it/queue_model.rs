//! The queue against a model: random sequences of what the relay and its
//! operators do to the store, on both backends through `queue::open` (the
//! type production uses), each step checked against a small in-memory model
//! of what must exist.
//!
//! Operations: store an event for 1 to 4 destinations (with a handoff or
//! not, a duplicate of an earlier one, a burst of hundreds, a few at once
//! beside operations that fail), claim, finish
//! with each outcome (a stale lease's finish too), release, renew, pause,
//! resume, retry, retry all, remove, restart (a crash: leases abandoned),
//! the clock stepped forward and back, and stores that fill up (a small
//! `COGRELAY_MAX_DB_BYTES` with large events). Cases run with
//! `REMOVE_ON_COMPLETE` 0 and 2.
//!
//! After every step: no accepted (event, destination) job is missing, each
//! destination's counts and listings are the model's, a claim takes what is
//! due (or says to come back at once), delivery operations never fail for
//! want of room, and operators' reads write nothing. At the end, with
//! everything resumed and due, the queue drains: every (event, destination)
//! completed or failed exactly once.
//!
//! A failure prints the seed of the run and the shrunk sequence. A few
//! hundred cases run with the suite; the hardening run (docs/guarantees.md):
//!
//! ```sh
//! QUEUE_MODEL_CASES=10000 cargo test --release --test it queue_model -- --nocapture
//! PROPTEST_RNG_SEED=<seed> cargo test --test it queue_model   # replay a failure
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use cogrelay::config::Fsync;
use cogrelay::ingress::envelope;
use cogrelay::queue::{
    self, Attempt, AttemptOutcome, ClaimOrder, DestinationName, Disposition, JobState, LeaseRef,
    Leased, Opener, OrderKey, Queue, QueueError, QueueKind, QueueSettings, Recipient, Store,
    StoreSettings,
};
use cogrelay::time::Clock;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

use crate::helpers::{dn, Backend};

const DESTS: [&str; 4] = ["default", "b", "c", "d"];
/// The clock at the start of a case (a fixed date: replays are the same).
const T0: i64 = 1_800_000_000_000;

#[derive(Debug, Clone)]
enum Op {
    Store {
        dests: u8,
        handoff: bool,
        dup: Option<usize>,
        big: bool,
        /// The event's session: its key at the ordered destinations.
        session: Option<u8>,
    },
    StoreMany {
        n: usize,
        dests: u8,
    },
    /// Stores sent at once (on the embedded store, one group commit when
    /// they queue up together), each maybe followed by another operation:
    /// one that fails having written nothing, one that fails after writing,
    /// or a held job's delivery. A failure must not undo the others.
    Burst {
        /// (destinations, handoff, session, what follows it)
        stores: Vec<(u8, bool, Option<u8>, Extra)>,
    },
    Claim {
        dest: usize,
        max: usize,
        /// Freshest first (a circuit's trials), else the queue's order.
        fresh: bool,
    },
    Finish {
        lease: usize,
        outcome: Outcome,
    },
    FinishStale {
        lease: usize,
    },
    Release {
        lease: usize,
    },
    Renew,
    Pause {
        dest: usize,
    },
    Resume {
        dest: usize,
    },
    Retry {
        job: usize,
    },
    RetryAll {
        dest: Option<usize>,
    },
    Remove {
        job: usize,
    },
    Reopen,
    Clock {
        ms: i64,
    },
}

/// What follows a store in a burst.
#[derive(Debug, Clone, Copy)]
enum Extra {
    None,
    /// A retry of a job that does not exist (fails, writes nothing).
    Missing,
    /// Embedded: a release of a held job and of an id that cannot exist
    /// (fails after putting the first back: nothing of it may stay).
    ReleaseThenBad(usize),
    /// A held job delivered.
    Deliver(usize),
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Delivered,
    Retry { in_ms: i64 },
    Fail,
}

#[derive(Debug, Clone)]
struct Case {
    remove_on_complete: u32,
    /// `COGRELAY_MAX_DB_BYTES` (embedded; 0 = none).
    cap: u64,
    ops: Vec<Op>,
}

fn op() -> impl Strategy<Value = Op> {
    let outcome = prop_oneof![
        3 => Just(Outcome::Delivered),
        2 => prop_oneof![Just(0i64), Just(1_000), Just(60_000)].prop_map(|in_ms| Outcome::Retry { in_ms }),
        1 => Just(Outcome::Fail),
    ];
    prop_oneof![
        8 => (1u8..16, any::<bool>(), proptest::option::weighted(0.15, 0usize..64), proptest::bool::weighted(0.2), proptest::option::weighted(0.8, 0u8..3))
            .prop_map(|(dests, handoff, dup, big, session)| Op::Store { dests, handoff, dup, big, session }),
        1 => (1usize..300, 1u8..16).prop_map(|(n, dests)| Op::StoreMany { n, dests }),
        2 => proptest::collection::vec(
            (1u8..16, any::<bool>(), proptest::option::weighted(0.8, 0u8..3), prop_oneof![
                4 => Just(Extra::None),
                2 => Just(Extra::Missing),
                1 => (0usize..64).prop_map(Extra::ReleaseThenBad),
                2 => (0usize..64).prop_map(Extra::Deliver),
            ]),
            2..12,
        )
        .prop_map(|stores| Op::Burst { stores }),
        8 => (0usize..4, 1usize..12, proptest::bool::weighted(0.2))
            .prop_map(|(dest, max, fresh)| Op::Claim { dest, max, fresh }),
        8 => (0usize..64, outcome).prop_map(|(lease, outcome)| Op::Finish { lease, outcome }),
        1 => (0usize..64).prop_map(|lease| Op::FinishStale { lease }),
        2 => (0usize..64).prop_map(|lease| Op::Release { lease }),
        1 => Just(Op::Renew),
        2 => (0usize..4).prop_map(|dest| Op::Pause { dest }),
        2 => (0usize..4).prop_map(|dest| Op::Resume { dest }),
        2 => (0usize..4096).prop_map(|job| Op::Retry { job }),
        1 => proptest::option::of(0usize..4).prop_map(|dest| Op::RetryAll { dest }),
        2 => (0usize..4096).prop_map(|job| Op::Remove { job }),
        1 => Just(Op::Reopen),
        3 => prop_oneof![-5_000i64..0, 0i64..5_000, 20_000i64..120_000].prop_map(|ms| Op::Clock { ms }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(0u32), Just(2)],
        prop_oneof![3 => Just(0u64), 1 => Just(192 * 1024)],
        proptest::collection::vec(op(), 1..48),
    )
        .prop_map(|(remove_on_complete, cap, ops)| Case {
            remove_on_complete,
            cap,
            ops,
        })
}

/// A job as the model knows it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum St {
    /// Waiting or delayed: claimable from `due` on (embedded); on Redis, at
    /// once unless `delayed` (a retry's due time not yet passed at a claim).
    Waiting {
        due: i64,
        delayed: bool,
    },
    /// Leased until `until`; `due` is the due time it had (kept by a
    /// restart of the embedded store).
    Active {
        until: i64,
        due: i64,
    },
    /// Leased by a relay that died (Redis: locked until its lease expires).
    Orphan,
    Completed,
    Failed,
    Removed,
}

#[derive(Debug)]
struct JobM {
    dest: usize,
    /// Its key at an ordered destination, and whether a failure holds it.
    key: Option<(u8, bool)>,
    /// Retried by an operator after it failed (it may then be delivered
    /// after its key's later jobs: the operator's call).
    retried: bool,
    st: St,
    attempts: u32,
    completions: u32,
}

impl JobM {
    /// One more attempt, and it was taken.
    fn delivered(&mut self) {
        self.completions += 1;
        self.attempts += 1;
        self.st = St::Completed;
    }
}

struct Model {
    backend: Backend,
    remove_on_complete: u32,
    lease_ms: i64,
    now: i64,
    jobs: BTreeMap<i64, JobM>,
    /// Each accepted event: its key and its jobs (destination, id).
    events: Vec<(String, Vec<(String, String)>)>,
    paused: [bool; 4],
    /// The last job delivered of each (destination, key).
    last_delivered: BTreeMap<(usize, u8), i64>,
}

impl Model {
    /// Whether a waiting job is due now.
    fn due(&self, st: &St) -> bool {
        match *st {
            St::Waiting { due, delayed } => match self.backend {
                Backend::Embedded => due <= self.now,
                Backend::Redis => !delayed || due <= self.now,
            },
            _ => false,
        }
    }

    fn claimable(&self, dest: usize) -> usize {
        if self.paused[dest] {
            return 0;
        }
        self.jobs
            .iter()
            .filter(|(id, j)| j.dest == dest && self.due(&j.st) && self.first_of_key(**id))
            .count()
    }

    /// A first successful delivery of job `id`: of its destination and key,
    /// it comes after every one delivered so far (acceptance order), unless
    /// an operator retried it.
    fn delivered_in_order(&mut self, id: i64) -> Result<(), String> {
        let j = &self.jobs[&id];
        let (Some((key, _)), false, 0) = (j.key, j.retried, j.completions) else {
            return Ok(());
        };
        let last = self.last_delivered.entry((j.dest, key)).or_insert(0);
        if id < *last {
            return Err(format!(
                "job {id} of key s{key} delivered after job {last}, stored later"
            ));
        }
        *last = id;
        Ok(())
    }

    /// Whether job `id` may be claimed or handed over as far as its key
    /// goes: no job of its destination and key stored before it is
    /// unfinished, or failed holding the key.
    fn first_of_key(&self, id: i64) -> bool {
        let Some(j) = self.jobs.get(&id) else {
            return true;
        };
        let Some((key, _)) = j.key else {
            return true;
        };
        if self.outside_its_key(j) {
            return true;
        }
        !self.jobs.range(..id).any(|(_, e)| {
            e.dest == j.dest
                && e.key.is_some_and(|(k, _)| k == key)
                && !self.outside_its_key(e)
                && match e.st {
                    St::Waiting { .. } | St::Active { .. } | St::Orphan => true,
                    St::Failed => e.key.is_some_and(|(_, hold)| hold),
                    St::Completed | St::Removed => false,
                }
        })
    }

    /// A job an operator retried after it failed and let its key go on
    /// (`continue`) left its key; it neither waits for the key nor holds it
    /// back (both backends).
    fn outside_its_key(&self, j: &JobM) -> bool {
        j.retried && j.key.is_some_and(|(_, hold)| !hold)
    }

    /// A waiting job from now (new, released, retried, taken back).
    fn waiting(&self) -> St {
        St::Waiting {
            due: self.now,
            delayed: false,
        }
    }

    fn count(&self, dest: usize, pred: impl Fn(&St) -> bool) -> u64 {
        self.jobs
            .values()
            .filter(|j| j.dest == dest && pred(&j.st))
            .count() as u64
    }
}

/// The system under test: one store, reopened as a restart does.
struct Sut {
    backend: Backend,
    settings: StoreSettings,
    clock: Clock,
    store: Option<Store>,
    _dir: tempfile::TempDir,
}

impl Sut {
    async fn open(&mut self) {
        let lock_duration = Duration::from_secs(600);
        let q = queue::open(&self.settings, Opener::Relay { lock_duration })
            .await
            .expect("open the store");
        // As the relay does at start for its configured destinations.
        for d in DESTS {
            q.set_rate_limit(&dn(d), 0)
                .await
                .expect("a destination's queue");
        }
        self.store = Some(q);
    }

    fn q(&self) -> &Store {
        self.store.as_ref().expect("open")
    }

    fn db_path(&self) -> PathBuf {
        self.settings.data_dir.join("cogrelay.db")
    }

    /// What the embedded file holds (rows but the completed ones, which the
    /// relay prunes on its own, and the bundles' slots), read on a
    /// connection of its own: operators' reads must not change it.
    fn fingerprint(&self) -> Option<(i64, i64, i64)> {
        if self.backend != Backend::Embedded {
            return None;
        }
        let c = rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .ok()?;
        c.query_row(
            "SELECT count(*) FILTER (WHERE state != 'completed'), coalesce(sum(length(pending)), 0),
                    coalesce(max(seq), 0) FROM jobs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .ok()
    }
}

/// The model's event `key` ("e{n}"). Each two in a row are different
/// events sharing one SPEC key (`cognigy-b-x-{n}`, docs/guarantees.md):
/// (`b`, `x-1`) then (`b-x`, `1`), and (`b-x`, `3`) then (`b`, `x-3`), so
/// that the store tells them apart whichever comes first.
fn ev(key: &str, big: bool) -> envelope::Event {
    let payload = if big {
        serde_json::json!({ "n": key, "blob": "x".repeat(3000) })
    } else {
        serde_json::json!({ "n": key })
    };
    let n: u64 = key.trim_start_matches('e').parse().expect("e{n}");
    let (bot, id) = match n % 4 {
        1 => ("b", format!("x-{n}")),
        2 => ("b-x", format!("{}", n - 1)),
        3 => ("b-x", format!("{n}")),
        _ => ("b", format!("x-{}", n - 1)),
    };
    let body = serde_json::json!({
        "botId": bot, "eventId": id, "type": "t",
        "timestamp": cogrelay::time::rfc3339(cogrelay::time::now_ms()),
        "payload": payload,
    });
    envelope::parse(&serde_json::to_vec(&body).expect("json")).expect("event")
}

fn dests_of(mask: u8) -> Vec<DestinationName> {
    (0..4)
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| dn(DESTS[i]))
        .collect()
}

fn dest_index(name: &str) -> usize {
    DESTS
        .iter()
        .position(|d| *d == name)
        .expect("a model destination")
}

/// A new event a step stores, as the model needs it.
#[derive(Debug)]
struct Stored {
    key: String,
    routes: Vec<DestinationName>,
    session: Option<u8>,
    handoff: bool,
}

/// An operation of a burst, as the model takes its answer.
#[derive(Debug)]
enum Part {
    Store(Stored),
    Missing,
    ReleaseThenBad(i64, Leased),
    Deliver(i64),
}

/// What an operation of a burst answered.
#[derive(Debug)]
enum Answer {
    Stored(Result<(cogrelay::queue::Routed, Vec<Leased>), QueueError>),
    Done(Result<(), QueueError>),
    Finished(Result<bool, QueueError>),
}

/// The key of destination `d` for an event of `session`: `c` goes on after
/// a failure, `d` holds the key (the first two are not ordered).
fn order_of(session: Option<u8>, d: usize) -> Option<(u8, bool)> {
    session.filter(|_| d >= 2).map(|s| (s, d == 3))
}

fn recipients(routes: &[DestinationName], session: Option<u8>) -> Vec<Recipient> {
    routes
        .iter()
        .map(|d| Recipient {
            destination: d.clone(),
            order: order_of(session, dest_index(d)).map(|(s, hold)| OrderKey {
                key: format!("s{s}"),
                hold,
            }),
        })
        .collect()
}

/// Runs `calls` at once, each polled in turn from the first (so each sends
/// its operation in that order); their answers, in the same order.
async fn all_at_once<T>(calls: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> Vec<T> {
    let mut calls: Vec<_> = calls.into_iter().map(Some).collect();
    let mut answers: Vec<Option<T>> = calls.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (call, answer) in calls.iter_mut().zip(answers.iter_mut()) {
            if let Some(f) = call {
                match f.as_mut().poll(cx) {
                    Poll::Ready(a) => {
                        *answer = Some(a);
                        *call = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    answers.into_iter().flatten().collect()
}

/// Takes a new event's jobs, as the store answered them, into the model.
fn take_stored(
    m: &mut Model,
    held: &mut Vec<(i64, Leased)>,
    new: Stored,
    (routed, leased): (cogrelay::queue::Routed, Vec<Leased>),
    at: &dyn Fn(&str) -> String,
) -> Result<(), TestCaseError> {
    prop_assert!(!routed.duplicate, "{}", at("a new key seen as a duplicate"));
    let got: Vec<DestinationName> = routed.jobs.iter().map(|j| j.destination.clone()).collect();
    prop_assert_eq!(
        &got,
        &new.routes,
        "{}",
        at("one job per destination, in order")
    );
    for j in &routed.jobs {
        let id: i64 = j.id.parse().map_err(|_| fail(at("an id")))?;
        prop_assert!(
            !m.jobs.contains_key(&id),
            "{}",
            at(&format!("id {id} given twice"))
        );
        let dest = dest_index(&j.destination);
        m.jobs.insert(
            id,
            JobM {
                dest,
                key: order_of(new.session, dest),
                retried: false,
                st: m.waiting(),
                attempts: 0,
                completions: 0,
            },
        );
    }
    for l in leased {
        prop_assert!(new.handoff, "{}", at("a lease nobody asked for"));
        let id: i64 = l.lease.job_id.parse().map_err(|_| fail("id"))?;
        let j = m
            .jobs
            .get(&id)
            .ok_or_else(|| fail(at("leased an unknown job")))?;
        prop_assert!(
            !m.paused[j.dest],
            "{}",
            at("a paused destination's job handed over")
        );
        prop_assert!(
            m.first_of_key(id),
            "{}",
            at(&format!(
                "job {id} handed over before its key's earlier one"
            ))
        );
        let until = m.now + m.lease_ms;
        let j = m.jobs.get_mut(&id).expect("job");
        j.st = St::Active { until, due: m.now };
        held.push((id, l));
    }
    m.events.push((
        new.key,
        routed
            .jobs
            .iter()
            .map(|j| (j.destination.to_string(), j.id.clone()))
            .collect(),
    ));
    Ok(())
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

fn attempt(now: i64, outcome: AttemptOutcome) -> Attempt {
    Attempt {
        n: 1,
        started_at_ms: now,
        duration_ms: 1,
        status: Some(200),
        error: None,
        outcome,
    }
}

async fn run_case(
    backend: Backend,
    redis: Option<&crate::redis_server::RedisServer>,
    case: Case,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tmp");
    let clock = Clock::manual(T0);
    let kind = match backend {
        Backend::Embedded => QueueKind::Embedded,
        Backend::Redis => QueueKind::Redis,
    };
    if let Some(r) = redis {
        assert!(r.command("FLUSHALL"), "flush the model's redis");
    }
    let settings = StoreSettings {
        kind,
        data_dir: dir.path().join("data"),
        fsync: Fsync::Off,
        max_db_bytes: if backend == Backend::Embedded {
            case.cap
        } else {
            0
        },
        redis_url: cogrelay::secret::Secret::new(redis.map(|r| r.url()).unwrap_or_default()),
        queue_name: "model".into(),
        redis_ca: None,
        retention: QueueSettings {
            dedup_ttl: Duration::from_secs(86_400),
            remove_on_complete: case.remove_on_complete,
        },
        clock: clock.clone(),
    };
    let mut sut = Sut {
        backend,
        settings,
        clock: clock.clone(),
        store: None,
        _dir: dir,
    };
    sut.open().await;
    let mut m = Model {
        backend,
        remove_on_complete: case.remove_on_complete,
        // Embedded leases expire on the clock the model steps; Redis's on
        // its own (real) clock, long after a case.
        lease_ms: if backend == Backend::Embedded {
            30_000
        } else {
            600_000
        },
        now: T0,
        jobs: BTreeMap::new(),
        events: Vec::new(),
        paused: [false; 4],
        last_delivered: BTreeMap::new(),
    };
    let lease = Duration::from_millis(m.lease_ms as u64);
    let mut held: Vec<(i64, Leased)> = Vec::new();
    let mut stale: Vec<Leased> = Vec::new();
    let mut keys = 0;
    for (step, op) in case.ops.iter().enumerate() {
        let at = |what: &str| format!("step {step} ({op:?}): {what}");
        match op {
            Op::Store {
                dests,
                handoff,
                dup,
                big,
                session,
            } => {
                let dup = dup
                    .filter(|_| !m.events.is_empty())
                    .map(|i| i % m.events.len());
                let key = match dup {
                    Some(i) => m.events[i].0.clone(),
                    None => {
                        keys += 1;
                        format!("e{keys}")
                    }
                };
                let routes = dests_of(*dests);
                let stored = sut
                    .q()
                    .store(
                        ev(&key, *big),
                        recipients(&routes, *session),
                        handoff.then_some(lease),
                    )
                    .await;
                let stored = match stored {
                    Ok(r) => r,
                    Err(QueueError::Unavailable(why)) if case.cap > 0 && dup.is_none() => {
                        prop_assert!(why.contains("full"), "{}", at(&why));
                        continue;
                    }
                    Err(e) => return Err(fail(at(&format!("store: {e}")))),
                };
                if let Some(i) = dup {
                    let (routed, leased) = stored;
                    prop_assert!(routed.duplicate, "{}", at("not a duplicate"));
                    let got: Vec<(String, String)> = routed
                        .jobs
                        .iter()
                        .map(|j| (j.destination.to_string(), j.id.clone()))
                        .collect();
                    prop_assert_eq!(&got, &m.events[i].1, "{}", at("the first event's jobs"));
                    prop_assert!(leased.is_empty());
                    continue;
                }
                let new = Stored {
                    key,
                    routes,
                    session: *session,
                    handoff: *handoff,
                };
                take_stored(&mut m, &mut held, new, stored, &at)?;
            }
            Op::Burst { stores } => {
                // Each call's part in the model, in the order sent.
                let mut parts = Vec::new();
                let mut calls: Vec<Pin<Box<dyn Future<Output = Answer> + '_>>> = Vec::new();
                for &(dests, handoff, session, extra) in stores {
                    keys += 1;
                    let new = Stored {
                        key: format!("e{keys}"),
                        routes: dests_of(dests),
                        session,
                        handoff,
                    };
                    let q = sut.q();
                    let (event, to) = (ev(&new.key, false), recipients(&new.routes, session));
                    calls.push(Box::pin(async move {
                        Answer::Stored(q.store(event, to, handoff.then_some(lease)).await)
                    }));
                    parts.push(Part::Store(new));
                    match extra {
                        Extra::Missing => {
                            calls.push(Box::pin(async move {
                                Answer::Done(q.retry("999999999").await)
                            }));
                            parts.push(Part::Missing);
                        }
                        Extra::ReleaseThenBad(k)
                            if !held.is_empty() && backend == Backend::Embedded =>
                        {
                            let (id, l) = held.remove(k % held.len());
                            let bad = LeaseRef {
                                job_id: "x".into(),
                                ..l.lease.clone()
                            };
                            let leases = vec![l.lease.clone(), bad];
                            calls.push(Box::pin(
                                async move { Answer::Done(q.release(leases).await) },
                            ));
                            parts.push(Part::ReleaseThenBad(id, l));
                        }
                        Extra::Deliver(k) if !held.is_empty() => {
                            let (id, l) = held.remove(k % held.len());
                            let a = attempt(m.now, AttemptOutcome::Delivered);
                            calls.push(Box::pin(async move {
                                Answer::Finished(q.finish(l, a, Disposition::Completed).await)
                            }));
                            parts.push(Part::Deliver(id));
                        }
                        _ => {}
                    }
                }
                // At once on the embedded store, whose one writer takes them
                // in the order sent; one by one on Redis (the same order).
                let answers = if backend == Backend::Embedded {
                    all_at_once(calls).await
                } else {
                    let mut answers = Vec::new();
                    for c in calls {
                        answers.push(c.await);
                    }
                    answers
                };
                for (part, answer) in parts.into_iter().zip(answers) {
                    match (part, answer) {
                        (Part::Store(new), Answer::Stored(r)) => match r {
                            Ok(r) => take_stored(&mut m, &mut held, new, r, &at)?,
                            Err(QueueError::Unavailable(why)) if case.cap > 0 => {
                                prop_assert!(why.contains("full"), "{}", at(&why));
                            }
                            Err(e) => return Err(fail(at(&format!("store: {e}")))),
                        },
                        (Part::Missing, Answer::Done(Err(QueueError::NotFound(_)))) => {}
                        // Refused whole: the job is still leased.
                        (Part::ReleaseThenBad(id, l), Answer::Done(Err(_))) => held.push((id, l)),
                        (Part::Deliver(id), Answer::Finished(Ok(true))) => {
                            m.delivered_in_order(id).map_err(|e| fail(at(&e)))?;
                            let j = m.jobs.get_mut(&id).expect("held job");
                            j.attempts += 1;
                            j.completions += 1;
                            j.st = St::Completed;
                        }
                        (part, answer) => {
                            return Err(fail(at(&format!("{part:?} answered {answer:?}"))))
                        }
                    }
                }
            }
            Op::StoreMany { n, dests } => {
                for _ in 0..*n {
                    keys += 1;
                    let key = format!("e{keys}");
                    let routed = match sut
                        .q()
                        .store(
                            ev(&key, false),
                            dests_of(*dests).into_iter().map(Recipient::from).collect(),
                            None,
                        )
                        .await
                    {
                        Ok((r, _)) => r,
                        Err(QueueError::Unavailable(_)) if case.cap > 0 => break,
                        Err(e) => return Err(fail(at(&format!("store: {e}")))),
                    };
                    for j in &routed.jobs {
                        let id: i64 = j.id.parse().map_err(|_| fail("id"))?;
                        prop_assert!(!m.jobs.contains_key(&id), "{}", at("an id given twice"));
                        m.jobs.insert(
                            id,
                            JobM {
                                key: None,
                                retried: false,
                                dest: dest_index(&j.destination),
                                st: m.waiting(),
                                attempts: 0,
                                completions: 0,
                            },
                        );
                    }
                    m.events.push((
                        key,
                        routed
                            .jobs
                            .iter()
                            .map(|j| (j.destination.to_string(), j.id.clone()))
                            .collect(),
                    ));
                }
            }
            Op::Claim { dest, max, fresh } => {
                let order = if *fresh {
                    ClaimOrder::Trials
                } else {
                    ClaimOrder::Due
                };
                let claimed = sut
                    .q()
                    .claim_for(&dn(DESTS[*dest]), *max, lease, order)
                    .await
                    .map_err(|e| fail(at(&format!("a claim failed: {e}"))))?;
                // Redis: a claim moves the destination's due retries to wait.
                let now = m.now;
                for j in m.jobs.values_mut() {
                    if let St::Waiting { due, delayed: true } = j.st {
                        if j.dest == *dest && due <= now {
                            j.st = St::Waiting {
                                due,
                                delayed: false,
                            };
                        }
                    }
                }
                if m.paused[*dest] {
                    prop_assert!(
                        claimed.jobs.is_empty() && claimed.paused,
                        "{}",
                        at("a paused destination's claim")
                    );
                    continue;
                }
                // Embedded: any claim takes back the leases that expired.
                if m.backend == Backend::Embedded {
                    let expired: Vec<i64> = m
                        .jobs
                        .iter()
                        .filter(|(_, j)| matches!(j.st, St::Active { until, .. } if until <= m.now))
                        .map(|(id, _)| *id)
                        .collect();
                    let waiting = m.waiting();
                    for id in expired {
                        m.jobs.get_mut(&id).expect("job").st = waiting;
                        if let Some(k) = held.iter().position(|(h, _)| *h == id) {
                            stale.push(held.remove(k).1);
                        }
                    }
                }
                let want = m.claimable(*dest).min(*max);
                if *fresh && m.backend == Backend::Embedded {
                    // A round of trials: at most one job already attempted
                    // while one never attempted is left due.
                    let taken: Vec<i64> = claimed
                        .jobs
                        .iter()
                        .filter_map(|l| l.lease.job_id.parse().ok())
                        .collect();
                    let attempted = taken
                        .iter()
                        .filter(|id| m.jobs.get(id).is_some_and(|j| j.attempts > 0))
                        .count();
                    let fresh_left = m.jobs.iter().any(|(id, j)| {
                        j.dest == *dest
                            && m.due(&j.st)
                            && m.first_of_key(*id)
                            && !taken.contains(id)
                            && j.attempts == 0
                    });
                    prop_assert!(
                        !(fresh_left && attempted > 1),
                        "{}",
                        at("a round of trials left a never-attempted job for a second retry")
                    );
                }
                let again = claimed.next_due_ms.is_some_and(|t| t <= m.now);
                prop_assert!(
                    claimed.jobs.len() == want || (claimed.jobs.len() < want && again),
                    "{}",
                    at(&format!(
                        "claimed {} of {want} due (next {:?})",
                        claimed.jobs.len(),
                        claimed.next_due_ms
                    ))
                );
                for l in claimed.jobs {
                    let id: i64 = l.lease.job_id.parse().map_err(|_| fail("id"))?;
                    let st = m
                        .jobs
                        .get(&id)
                        .map(|j| j.st)
                        .ok_or_else(|| fail(at(&format!("claimed an unknown job {id}"))))?;
                    prop_assert!(
                        m.due(&st),
                        "{}",
                        at(&format!("job {id} claimed while {st:?}"))
                    );
                    prop_assert!(
                        m.first_of_key(id),
                        "{}",
                        at(&format!("job {id} claimed before its key's earlier one"))
                    );
                    let (now, lease_ms) = (m.now, m.lease_ms);
                    let j = m.jobs.get_mut(&id).expect("job");
                    prop_assert_eq!(
                        j.dest,
                        *dest,
                        "{}",
                        at(&format!("job {id} of another destination"))
                    );
                    prop_assert_eq!(l.job.attempts_made, j.attempts, "{}", at("attempts made"));
                    let St::Waiting { due, .. } = st else {
                        unreachable!()
                    };
                    j.st = St::Active {
                        until: now + lease_ms,
                        due,
                    };
                    held.push((id, l));
                }
            }
            Op::Finish { lease: k, outcome } => {
                if held.is_empty() {
                    continue;
                }
                let (id, l) = held.remove(k % held.len());
                let (disposition, result) = match outcome {
                    Outcome::Delivered => (Disposition::Completed, AttemptOutcome::Delivered),
                    Outcome::Retry { in_ms } => (
                        Disposition::RetryAt {
                            due_at_ms: m.now + in_ms,
                            reason: "HTTP 503".into(),
                        },
                        AttemptOutcome::Retry,
                    ),
                    Outcome::Fail => (
                        Disposition::Failed {
                            reason: "HTTP 422".into(),
                        },
                        AttemptOutcome::Failed,
                    ),
                };
                let done = sut
                    .q()
                    .finish(l, attempt(m.now, result), disposition)
                    .await
                    .map_err(|e| fail(at(&format!("a finish failed: {e}"))))?;
                prop_assert!(done, "{}", at(&format!("the lease of job {id} was lost")));
                m.jobs.get_mut(&id).expect("held job").attempts += 1;
                if matches!(outcome, Outcome::Delivered) {
                    m.delivered_in_order(id).map_err(|e| fail(at(&e)))?;
                }
                let j = m.jobs.get_mut(&id).expect("held job");
                j.st = match outcome {
                    Outcome::Delivered => {
                        j.completions += 1;
                        St::Completed
                    }
                    Outcome::Retry { in_ms } => St::Waiting {
                        due: m.now + in_ms,
                        delayed: true,
                    },
                    Outcome::Fail => St::Failed,
                };
            }
            Op::FinishStale { lease: k } => {
                if stale.is_empty() {
                    continue;
                }
                let l = stale.remove(k % stale.len());
                let done = sut
                    .q()
                    .finish(
                        l,
                        attempt(m.now, AttemptOutcome::Delivered),
                        Disposition::Completed,
                    )
                    .await
                    .map_err(|e| fail(at(&format!("a finish failed: {e}"))))?;
                prop_assert!(!done, "{}", at("a stale lease finished a job"));
            }
            Op::Release { lease: k } => {
                if held.is_empty() {
                    continue;
                }
                let (id, l) = held.remove(k % held.len());
                sut.q()
                    .release(vec![l.lease.clone()])
                    .await
                    .map_err(|e| fail(at(&format!("a release failed: {e}"))))?;
                let waiting = m.waiting();
                m.jobs.get_mut(&id).expect("held job").st = waiting;
                stale.push(l);
            }
            Op::Renew => {
                let leases = held.iter().map(|(_, l)| l.lease.clone()).collect();
                sut.q()
                    .renew(leases, lease)
                    .await
                    .map_err(|e| fail(at(&format!("a renewal failed: {e}"))))?;
                for (id, _) in &held {
                    let (now, lease_ms) = (m.now, m.lease_ms);
                    let j = m.jobs.get_mut(id).expect("held job");
                    if let St::Active { due, .. } = j.st {
                        j.st = St::Active {
                            until: now + lease_ms,
                            due,
                        };
                    }
                }
            }
            Op::Pause { dest } | Op::Resume { dest } => {
                let pause = matches!(op, Op::Pause { .. });
                sut.q()
                    .set_paused(&dn(DESTS[*dest]), pause)
                    .await
                    .map_err(|e| fail(at(&e.to_string())))?;
                m.paused[*dest] = pause;
            }
            Op::Retry { job } => {
                if m.jobs.is_empty() {
                    continue;
                }
                let id = *m.jobs.keys().nth(job % m.jobs.len()).expect("job");
                let r = sut.q().retry(&id.to_string()).await;
                let j = m.jobs.get_mut(&id).expect("job");
                match j.st {
                    St::Failed => {
                        prop_assert!(r.is_ok(), "{}", at(&format!("retry of failed {id}: {r:?}")));
                        j.st = St::Waiting {
                            due: m.now,
                            delayed: false,
                        };
                        j.attempts = 0;
                        j.retried = true;
                    }
                    St::Removed => prop_assert!(
                        matches!(r, Err(QueueError::NotFound(_))),
                        "{}",
                        at(&format!("{r:?}"))
                    ),
                    St::Completed => prop_assert!(
                        matches!(
                            r,
                            Err(QueueError::NotFound(_) | QueueError::WrongState { .. })
                        ),
                        "{}",
                        at(&format!("{r:?}"))
                    ),
                    _ => prop_assert!(
                        matches!(r, Err(QueueError::WrongState { .. })),
                        "{}",
                        at(&format!("retry of {id} {:?}: {r:?}", j.st))
                    ),
                }
            }
            Op::RetryAll { dest } => {
                let n = sut
                    .q()
                    .retry_all_failed_for(dest.map(|d| dn(DESTS[d])).as_ref())
                    .await
                    .map_err(|e| fail(at(&e.to_string())))?;
                let mut want = 0;
                let waiting = m.waiting();
                for j in m.jobs.values_mut() {
                    if j.st == St::Failed && dest.is_none_or(|d| d == j.dest) {
                        j.st = waiting;
                        j.attempts = 0;
                        j.retried = true;
                        want += 1;
                    }
                }
                prop_assert_eq!(n, want, "{}", at("retried"));
            }
            Op::Remove { job } => {
                if m.jobs.is_empty() {
                    continue;
                }
                let id = *m.jobs.keys().nth(job % m.jobs.len()).expect("job");
                let r = sut.q().remove(&id.to_string()).await;
                let j = m.jobs.get_mut(&id).expect("job");
                match j.st {
                    St::Active { .. } | St::Orphan => prop_assert!(
                        matches!(r, Err(QueueError::WrongState { .. })),
                        "{}",
                        at(&format!("{r:?}"))
                    ),
                    St::Removed => prop_assert!(
                        matches!(r, Err(QueueError::NotFound(_))),
                        "{}",
                        at(&format!("{r:?}"))
                    ),
                    St::Completed => {
                        prop_assert!(
                            r.is_ok() || matches!(r, Err(QueueError::NotFound(_))),
                            "{}",
                            at(&format!("{r:?}"))
                        );
                        j.st = St::Removed;
                    }
                    _ => {
                        prop_assert!(
                            r.is_ok(),
                            "{}",
                            at(&format!("remove {id} {:?}: {r:?}", j.st))
                        );
                        j.st = St::Removed;
                    }
                }
            }
            Op::Reopen => {
                // A crash: nothing released, the process's leases gone with it.
                let q = sut.store.take().expect("open");
                let _ = q.close().await;
                drop(q);
                sut.open().await;
                for (id, l) in held.drain(..) {
                    let j = m.jobs.get_mut(&id).expect("held job");
                    match m.backend {
                        // The next owner puts them back at open, due as they were.
                        Backend::Embedded => stale.push(l),
                        // Locked until their leases expire.
                        Backend::Redis => j.st = St::Orphan,
                    }
                }
                if m.backend == Backend::Embedded {
                    for j in m.jobs.values_mut() {
                        if let St::Active { due, .. } = j.st {
                            j.st = St::Waiting {
                                due,
                                delayed: false,
                            };
                        }
                    }
                }
            }
            Op::Clock { ms } => {
                sut.clock.step(*ms);
                m.now += ms;
            }
        }
        check(&sut, &m, step).await?;
    }
    drain(&mut sut, &mut m, held, redis).await?;
    if let Some(q) = sut.store.take() {
        let _ = q.close().await;
    }
    Ok(())
}

/// After a step: counts, listings and every job the model says exists.
async fn check(sut: &Sut, m: &Model, step: usize) -> Result<(), TestCaseError> {
    let before = sut.fingerprint();
    let q = sut.q();
    for (i, d) in DESTS.iter().enumerate() {
        let c = q
            .counts_for(Some(&dn(d)))
            .await
            .map_err(|e| fail(format!("step {step}: counts: {e}")))?;
        let waiting = m.count(i, |s| matches!(s, St::Waiting { .. }));
        prop_assert_eq!(
            c.waiting + c.delayed,
            waiting,
            "step {}: waiting of {}",
            step,
            d
        );
        prop_assert_eq!(
            c.active,
            m.count(i, |s| matches!(s, St::Active { .. } | St::Orphan)),
            "step {}: active of {}",
            step,
            d
        );
        prop_assert_eq!(
            c.failed,
            m.count(i, |s| *s == St::Failed),
            "step {}: failed of {}",
            step,
            d
        );
        prop_assert!(
            c.completed <= m.count(i, |s| *s == St::Completed),
            "step {}: completed of {}",
            step,
            d
        );
        let failed = q
            .list_for(Some(JobState::Failed), Some(&dn(d)), 0, 500)
            .await
            .map_err(|e| fail(format!("step {step}: list: {e}")))?;
        prop_assert_eq!(
            failed.total,
            c.failed,
            "step {}: failed listed of {}",
            step,
            d
        );
        let listed = q
            .list_for(Some(JobState::Waiting), Some(&dn(d)), 0, 500)
            .await
            .map_err(|e| fail(format!("step {step}: list: {e}")))?;
        let delayed = q
            .list_for(Some(JobState::Delayed), Some(&dn(d)), 0, 500)
            .await
            .map_err(|e| fail(format!("step {step}: list: {e}")))?;
        prop_assert_eq!(
            listed.total + delayed.total,
            waiting,
            "step {}: waiting listed of {}",
            step,
            d
        );
        for v in listed.items.iter().chain(&failed.items) {
            prop_assert_eq!(
                &v.destination,
                d,
                "step {}: listed job {} of another destination",
                step,
                &v.id
            );
        }
    }
    // Every job the model says exists, in its state (the newest 16 and a
    // spread of the rest: a burst has hundreds; the end checks every one).
    let ids: Vec<i64> = m.jobs.keys().copied().collect();
    let sample = ids
        .iter()
        .rev()
        .take(16)
        .chain(ids.iter().step_by((ids.len() / 8).max(1)));
    for id in sample {
        check_job(q, m, *id, step).await?;
    }
    prop_assert_eq!(
        sut.fingerprint(),
        before,
        "step {}: an operator's read wrote to the store",
        step
    );
    Ok(())
}

async fn check_job(q: &Store, m: &Model, id: i64, step: usize) -> Result<(), TestCaseError> {
    let j = &m.jobs[&id];
    let got = q.get(&id.to_string()).await;
    match (&j.st, &got) {
        (St::Removed, Err(QueueError::NotFound(_))) => {}
        (St::Completed, Err(QueueError::NotFound(_))) => {}
        (_, Ok(v)) => {
            let want: &[JobState] = match j.st {
                St::Waiting { .. } => &[JobState::Waiting, JobState::Delayed],
                St::Active { .. } | St::Orphan => &[JobState::Active],
                St::Completed => &[JobState::Completed],
                St::Failed => &[JobState::Failed],
                St::Removed => &[],
            };
            prop_assert!(
                want.contains(&v.state),
                "step {}: job {} is {:?}, the model says {:?}",
                step,
                id,
                v.state,
                j.st
            );
            prop_assert_eq!(
                &v.destination,
                DESTS[j.dest],
                "step {}: job {}'s destination",
                step,
                id
            );
            prop_assert_eq!(
                v.attempts_made,
                j.attempts,
                "step {}: job {}'s attempts",
                step,
                id
            );
        }
        (st, Err(e)) => return Err(fail(format!("step {step}: job {id} ({st:?}) is gone: {e}"))),
    }
    Ok(())
}

/// Everything resumed, due and delivered: each (event, destination)
/// completed or failed exactly once.
/// Finishes `l` as delivered; its lease must still hold.
async fn finish_delivered(sut: &Sut, now: i64, id: i64, l: Leased) -> Result<(), TestCaseError> {
    let done = sut
        .q()
        .finish(
            l,
            attempt(now, AttemptOutcome::Delivered),
            Disposition::Completed,
        )
        .await
        .map_err(|e| fail(format!("drain: finish: {e}")))?;
    prop_assert!(done, "drain: the lease of {} was lost", id);
    Ok(())
}

async fn drain(
    sut: &mut Sut,
    m: &mut Model,
    held: Vec<(i64, Leased)>,
    redis: Option<&crate::redis_server::RedisServer>,
) -> Result<(), TestCaseError> {
    for (id, l) in held {
        finish_delivered(sut, m.now, id, l).await?;
        m.delivered_in_order(id).map_err(fail)?;
        m.jobs.get_mut(&id).expect("job").delivered();
    }
    // A held key's failed job is removed, as an operator would: the key's
    // later jobs go on.
    let blocking: Vec<i64> = m
        .jobs
        .iter()
        .filter(|(_, j)| j.st == St::Failed && j.key.is_some_and(|(_, hold)| hold))
        .map(|(id, _)| *id)
        .collect();
    for id in blocking {
        sut.q()
            .remove(&id.to_string())
            .await
            .map_err(|e| fail(format!("drain: remove the held key's job {id}: {e}")))?;
        m.jobs.get_mut(&id).expect("job").st = St::Removed;
    }
    if m.jobs.values().any(|j| j.st == St::Orphan) {
        // A dead relay's leases run out (on Redis's clock: here at once),
        // and a live relay's check for stalled jobs takes them over.
        if let Some(r) = redis {
            for (id, j) in &m.jobs {
                if j.st == St::Orphan {
                    let queue = match DESTS[j.dest] {
                        "default" => "model".to_string(),
                        d => format!("model.{d}"),
                    };
                    r.command(&format!("DEL bull:{queue}:{id}:lock"));
                }
            }
        }
        sut.q()
            .check_stalled()
            .await
            .map_err(|e| fail(format!("drain: stalled check: {e}")))?;
        let waiting = m.waiting();
        for j in m.jobs.values_mut() {
            if j.st == St::Orphan {
                j.st = waiting;
            }
        }
    }
    for (i, d) in DESTS.iter().enumerate() {
        sut.q()
            .set_paused(&dn(d), false)
            .await
            .map_err(|e| fail(e.to_string()))?;
        m.paused[i] = false;
    }
    // Past every due time.
    sut.clock.step(3_600_000);
    m.now += 3_600_000;
    for round in 0.. {
        prop_assert!(round < 10_000, "drain: the queue does not drain");
        let mut claimed_any = false;
        for d in DESTS {
            let c = sut
                .q()
                .claim_for(&dn(d), 64, Duration::from_secs(600), ClaimOrder::Due)
                .await
                .map_err(|e| fail(format!("drain: claim: {e}")))?;
            let again = c.next_due_ms.is_some_and(|t| t <= m.now);
            claimed_any |= !c.jobs.is_empty() || again;
            for l in c.jobs {
                let id: i64 = l.lease.job_id.parse().map_err(|_| fail("id"))?;
                finish_delivered(sut, m.now, id, l).await?;
                let j = m
                    .jobs
                    .get_mut(&id)
                    .ok_or_else(|| fail(format!("drain: claimed unknown job {id}")))?;
                prop_assert!(
                    matches!(j.st, St::Waiting { .. }),
                    "drain: job {} claimed while {:?}",
                    id,
                    j.st
                );
                prop_assert!(
                    m.first_of_key(id),
                    "drain: job {} claimed before its key's earlier one",
                    id
                );
                m.delivered_in_order(id).map_err(fail)?;
                m.jobs.get_mut(&id).expect("job").delivered();
            }
        }
        if !claimed_any {
            break;
        }
    }
    for (id, j) in &m.jobs {
        match j.st {
            St::Removed => prop_assert!(
                j.completions <= 1,
                "job {} completed {} times",
                id,
                j.completions
            ),
            St::Failed => prop_assert_eq!(j.completions, 0, "failed job {} completed", id),
            St::Completed => prop_assert_eq!(
                j.completions,
                1,
                "job {} completed {} times",
                id,
                j.completions
            ),
            other => return Err(fail(format!("job {id} never finished: {other:?}"))),
        }
        check_job(sut.q(), m, *id, usize::MAX).await?;
    }
    let _ = m.remove_on_complete;
    Ok(())
}

/// Runs `cases` random cases (`QUEUE_MODEL_CASES` overrides) on `backend`.
fn run_model(backend: Backend, cases: u32) {
    let redis = match backend {
        Backend::Embedded => None,
        Backend::Redis => {
            if !crate::redis_server::available() {
                return;
            }
            Some(crate::redis_server::RedisServer::start(false).expect("redis-server"))
        }
    };
    let cases = std::env::var("QUEUE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    eprintln!("queue model ({backend:?}): {cases} cases, seed {seed}");
    let mut runner = TestRunner::new(config);
    let ran = std::cell::Cell::new(0u64);
    let result = runner.run(&case(), |c| {
        // Progress on long runs (shrinking counts too: it runs cases).
        ran.set(ran.get() + 1);
        if ran.get().is_multiple_of(1000) {
            eprintln!("queue model ({backend:?}): {} cases run", ran.get());
        }
        rt.block_on(run_case(backend, redis.as_ref(), c))
    });
    match result {
        Ok(()) => eprintln!("queue model ({backend:?}): {cases} cases passed (seed {seed})"),
        Err(TestError::Fail(why, case)) => panic!(
            "the {backend:?} queue left the model: {why}\nshrunk case: {case:#?}\nreplay: PROPTEST_RNG_SEED={seed} cargo test --test it queue_model"
        ),
        Err(TestError::Abort(why)) => panic!("aborted: {why} (seed {seed})"),
    }
}

#[test]
fn the_embedded_queue_follows_the_model() {
    run_model(Backend::Embedded, 200);
}

#[test]
fn the_redis_queue_follows_the_model() {
    run_model(Backend::Redis, 64);
}
