//! Prometheus metrics, one registry per relay (`Arc<Metrics>`), with the
//! `prometheus-client` crate (per-instance registries: several relays in one
//! process, as in the tests, stay exact and apart).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `cogrelay_ingress_requests_total` | counter | `status` |
//! | `cogrelay_ingress_ack_seconds` | histogram | (2xx answers) |
//! | `cogrelay_deliveries_total` | counter | `outcome` = delivered, retry, failed |
//! | `cogrelay_delivery_seconds` | histogram | (each attempt) |
//! | `cogrelay_delivery_up` | gauge | 1 while the delivery pool runs |
//! | `cogrelay_delivery_pools` | gauge | delivery pools running (one a destination) |
//! | `cogrelay_destination_deliveries_total` | counter | `destination`, `outcome` |
//! | `cogrelay_events_unrouted_total` | counter | (events no destination wanted) |
//! | `cogrelay_events_duplicate_total` | counter | (events answered `duplicate`: already stored within `DEDUP_TTL_SECS`, nothing stored again) |
//! | `cogrelay_destination_circuit` | gauge | `destination`, `state` (1 for the state it is in) |
//! | `cogrelay_destination_url_conflicts` | gauge | `destination`: other relays of a shared queue (Redis) that deliver it to another URL |
//! | `cogrelay_held_keys` | gauge | `destination`: keys an ordered destination holds (`on_failure = "hold"`), read at scrape time, at most 1,000 counted |
//! | `cogrelay_queue_jobs` | gauge | `state` (read at scrape time) |
//! | `cogrelay_queue_oldest_waiting_seconds` | gauge | age of the oldest due job |
//! | `cogrelay_queue_durability_risk` | gauge | `risk` |
//! | `cogrelay_store_bytes` | gauge | the embedded store's bytes on disk |
//! | `cogrelay_store_max_bytes` | gauge | `COGRELAY_MAX_DB_BYTES` (0: no cap) |
//!
//! The counters of the hot path are created once (a label lookup per event
//! would take a lock); the queue gauges are made at each scrape, and left out
//! when the queue cannot be read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::event::AttemptOutcome;
use crate::queue::Counts;

/// Upper bounds (seconds) of the histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Ingress statuses with a counter of their own; anything else is `other`.
const STATUSES: [&str; 9] = [
    "200", "400", "401", "404", "413", "415", "429", "503", "other",
];
const OUTCOMES: [&str; 3] = ["delivered", "retry", "failed"];

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Debug)]
pub struct Metrics {
    by_status: Family<Labels, Counter>,
    ingress: [Counter; STATUSES.len()],
    ack: Histogram,
    by_outcome: Family<Labels, Counter>,
    outcomes: [Counter; OUTCOMES.len()],
    delivery: Histogram,
    /// Delivery pools running (each counts itself while it runs; a reload
    /// starts the new ones before the old ones end): `/readyz` is 503 and
    /// `cogrelay_delivery_up` 0 without one.
    pub pools_up: std::sync::atomic::AtomicUsize,
    /// Each destination's next circuit trial (unix ms), while it is open.
    next_trials: std::sync::Mutex<std::collections::BTreeMap<String, i64>>,
    by_destination: Family<Vec<(&'static str, String)>, Counter>,
    unrouted: Counter,
    duplicates: Counter,
    circuits: Family<Vec<(&'static str, String)>, Gauge>,
    held_keys: Family<Vec<(&'static str, String)>, Gauge>,
    url_conflicts: Family<Vec<(&'static str, String)>, Gauge>,
    /// The last hour, for the dashboard's charts.
    history: std::sync::Mutex<History>,
    /// Each destination's counters, for the history.
    destinations: std::sync::Mutex<Vec<(String, DestinationMetrics)>>,
}

/// How often the history takes a point, and how many it keeps (an hour).
pub const HISTORY_EVERY: Duration = Duration::from_secs(10);
const HISTORY_POINTS: usize = 360;

/// What happened in one interval (deltas of the totals).
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    /// The end of the interval (unix ms).
    pub at_ms: i64,
    pub accepted: u64,
    pub delivered: u64,
    pub retried: u64,
    pub failed: u64,
    /// Delivered, by destination.
    pub by_destination: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct History {
    points: std::collections::VecDeque<Point>,
    /// The totals at the last point.
    last: Option<(Totals, std::collections::BTreeMap<String, u64>)>,
}

/// One destination's delivery counters, created once per pool (no label
/// lookup per attempt).
#[derive(Debug, Clone)]
pub struct DestinationMetrics([Counter; OUTCOMES.len()]);

impl DestinationMetrics {
    pub fn attempt(&self, outcome: AttemptOutcome) {
        self.0[outcome_index(outcome)].inc();
    }
}

fn outcome_index(outcome: AttemptOutcome) -> usize {
    match outcome {
        AttemptOutcome::Delivered => 0,
        AttemptOutcome::Retry => 1,
        AttemptOutcome::Failed => 2,
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let by_status = Family::<Labels, Counter>::default();
        let by_outcome = Family::<Labels, Counter>::default();
        Self {
            ingress: STATUSES.map(|s| by_status.get_or_create(&vec![("status", s)]).clone()),
            outcomes: OUTCOMES.map(|o| by_outcome.get_or_create(&vec![("outcome", o)]).clone()),
            by_status,
            by_outcome,
            ack: Histogram::new(BUCKETS),
            delivery: Histogram::new(BUCKETS),
            pools_up: Default::default(),
            next_trials: Default::default(),
            by_destination: Family::default(),
            unrouted: Counter::default(),
            duplicates: Counter::default(),
            circuits: Family::default(),
            held_keys: Family::default(),
            url_conflicts: Family::default(),
            history: Default::default(),
            destinations: Default::default(),
        }
    }
}

/// Totals since start, for the periodic summary line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub accepted: u64,
    pub delivered: u64,
    pub retried: u64,
    pub failed: u64,
}

impl Metrics {
    pub fn ingress(&self, status: u16, elapsed: Duration) {
        let i = STATUSES
            .iter()
            .position(|s| s.parse::<u16>() == Ok(status))
            .unwrap_or(STATUSES.len() - 1);
        self.ingress[i].inc();
        if (200..300).contains(&status) {
            self.ack.observe(elapsed.as_secs_f64());
        }
    }

    /// The counters of `destination`'s deliveries.
    pub fn destination(&self, destination: &str) -> DestinationMetrics {
        let m = DestinationMetrics(OUTCOMES.map(|o| {
            self.by_destination
                .get_or_create(&vec![
                    ("destination", destination.to_string()),
                    ("outcome", o.to_string()),
                ])
                .clone()
        }));
        let mut all = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
        if !all.iter().any(|(name, _)| name == destination) {
            all.push((destination.to_string(), m.clone()));
        }
        m
    }

    fn delivered_by_destination(&self) -> std::collections::BTreeMap<String, u64> {
        let all = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .map(|(name, m)| (name.clone(), m.0[0].get()))
            .collect()
    }

    /// What happened since the last point, ending now (not kept).
    fn point_now(&self, h: &History) -> Point {
        let now = self.totals();
        let by_now = self.delivered_by_destination();
        let (last, by_last) = h.last.clone().unwrap_or_default();
        Point {
            at_ms: crate::time::now_ms(),
            accepted: now.accepted - last.accepted,
            delivered: now.delivered - last.delivered,
            retried: now.retried - last.retried,
            failed: now.failed - last.failed,
            by_destination: by_now
                .iter()
                .map(|(k, v)| (k.clone(), v - by_last.get(k).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Takes a point of the history (every [`HISTORY_EVERY`]).
    pub fn sample(&self) {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let point = self.point_now(&h);
        h.last = Some((self.totals(), self.delivered_by_destination()));
        h.points.push_back(point);
        while h.points.len() > HISTORY_POINTS {
            h.points.pop_front();
        }
    }

    /// The last hour: the points kept, then the one in progress.
    pub fn history(&self) -> Vec<Point> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Point> = h.points.iter().cloned().collect();
        out.push(self.point_now(&h));
        out
    }

    /// `destination`'s circuit is now in `state` (closed, open, half-open).
    pub fn circuit(&self, destination: &str, state: &str) {
        for s in ["closed", "open", "half-open"] {
            self.circuits
                .get_or_create(&vec![
                    ("destination", destination.to_string()),
                    ("state", s.to_string()),
                ])
                .set(i64::from(s == state));
        }
    }

    /// `destination` was removed (a reload): its circuit series and next
    /// trial go (its delivery counters stay: they count what happened).
    pub fn forget_circuit(&self, destination: &str) {
        for s in ["closed", "open", "half-open"] {
            self.circuits.remove(&vec![
                ("destination", destination.to_string()),
                ("state", s.to_string()),
            ]);
        }
        self.next_trial(destination, None);
        self.held_keys
            .remove(&vec![("destination", destination.to_string())]);
    }

    /// How many keys `destination` holds (see `cogrelay_held_keys`).
    pub fn held_keys(&self, destination: &str, n: usize) {
        self.held_keys
            .get_or_create(&vec![("destination", destination.to_string())])
            .set(n as i64);
    }

    /// For each of the relay's destinations, how many other relays deliver
    /// it to another URL (see `serve/targets.rs`); the destinations of an
    /// earlier file leave the metric.
    pub fn url_conflicts(&self, counts: &[(&str, usize)], gone: &[&str]) {
        for destination in gone {
            self.url_conflicts
                .remove(&vec![("destination", destination.to_string())]);
        }
        for (destination, n) in counts {
            self.url_conflicts
                .get_or_create(&vec![("destination", destination.to_string())])
                .set(*n as i64);
        }
    }

    /// Whether a delivery pool runs (see `pools_up`).
    pub fn delivery_up(&self) -> bool {
        self.pools_up.load(Ordering::Acquire) > 0
    }

    /// When `destination`'s circuit's next trial is due (unix ms), or none
    /// (it is not open).
    pub fn next_trial(&self, destination: &str, at_ms: Option<i64>) {
        let mut t = self.next_trials.lock().unwrap_or_else(|p| p.into_inner());
        match at_ms {
            Some(at) => t.insert(destination.to_string(), at),
            None => t.remove(destination),
        };
    }

    /// [`Metrics::next_trial`] as last set.
    pub fn next_trial_at(&self, destination: &str) -> Option<i64> {
        self.next_trials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(destination)
            .copied()
    }

    /// The state `destination`'s circuit is in (`closed` before its pool ran).
    pub fn circuit_state(&self, destination: &str) -> &'static str {
        ["open", "half-open"]
            .into_iter()
            .find(|s| {
                // A lookup, not a creation: a removed destination's series
                // stay gone.
                self.circuits
                    .get(&vec![
                        ("destination", destination.to_string()),
                        ("state", s.to_string()),
                    ])
                    .is_some_and(|g| g.get() == 1)
            })
            .unwrap_or("closed")
    }

    /// An event no destination wanted (SPEC §7: answered `unrouted`).
    pub fn unrouted(&self) {
        self.unrouted.inc();
    }

    /// An event answered `duplicate` (SPEC §3.1: stored already).
    pub fn duplicate(&self) {
        self.duplicates.inc();
    }

    pub fn attempt(&self, outcome: AttemptOutcome, elapsed: Duration) {
        self.outcomes[outcome_index(outcome)].inc();
        self.delivery.observe(elapsed.as_secs_f64());
    }

    pub fn totals(&self) -> Totals {
        Totals {
            accepted: self.ingress[0].get(),
            delivered: self.outcomes[0].get(),
            retried: self.outcomes[1].get(),
            failed: self.outcomes[2].get(),
        }
    }

    /// The counters and the pool gauges.
    fn register_counters(&self, r: &mut Registry) {
        r.register(
            "cogrelay_ingress_requests",
            "Ingress requests by answer status",
            self.by_status.clone(),
        );
        r.register(
            "cogrelay_ingress_ack_seconds",
            "Time to acknowledge an event (2xx answers)",
            self.ack.clone(),
        );
        r.register(
            "cogrelay_deliveries",
            "Delivery attempts by outcome (failed = dead-lettered)",
            self.by_outcome.clone(),
        );
        r.register(
            "cogrelay_delivery_seconds",
            "Duration of one delivery attempt",
            self.delivery.clone(),
        );
        r.register(
            "cogrelay_destination_deliveries",
            "Delivery attempts by destination and outcome",
            self.by_destination.clone(),
        );
        r.register(
            "cogrelay_destination_circuit",
            "Circuit breaker state of each destination (1 for its state)",
            self.circuits.clone(),
        );
        r.register(
            "cogrelay_held_keys",
            "Keys an ordered destination holds after a failure (on_failure = hold), until an operator retries or removes the job (at most 1000 counted)",
            self.held_keys.clone(),
        );
        r.register(
            "cogrelay_destination_url_conflicts",
            "Other relays of the shared queue (Redis) whose destinations file gives this destination another URL: its events are split between the two",
            self.url_conflicts.clone(),
        );
        r.register(
            "cogrelay_events_unrouted",
            "Events accepted that no destination wanted (nothing stored)",
            self.unrouted.clone(),
        );
        r.register(
            "cogrelay_events_duplicate",
            "Events answered duplicate: stored already within DEDUP_TTL_SECS (nothing stored again)",
            self.duplicates.clone(),
        );
        let up = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        up.set(i64::from(self.delivery_up()));
        r.register("cogrelay_delivery_up", "1 while the delivery pool runs", up);
        let pools = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        pools.set(self.pools_up.load(Ordering::Acquire) as i64);
        r.register(
            "cogrelay_delivery_pools",
            "Delivery pools running (one a destination; a reload runs the new ones before the old ones end)",
            pools,
        );
    }

    /// The text exposition, with the queue gauges if they could be read.
    /// `store`: the embedded store's bytes on disk and its cap (0: none).
    pub fn render(
        &self,
        queue: Option<&Counts>,
        risks: &[(&'static str, bool)],
        store: Option<(u64, u64)>,
    ) -> String {
        let mut r = Registry::default();
        self.register_counters(&mut r);
        if let Some(c) = queue {
            register_queue(&mut r, c);
        }
        if let Some((bytes, max)) = store {
            register_store(&mut r, bytes, max);
        }
        if !risks.is_empty() {
            let family = Family::<Labels, Gauge>::default();
            for (risk, present) in risks {
                family
                    .get_or_create(&vec![("risk", *risk)])
                    .set(i64::from(*present));
            }
            r.register(
                "cogrelay_queue_durability_risk",
                "1 where the store can lose an acknowledged event: redis_no_aof (no append-only file), redis_evicting (maxmemory-policy other than noeviction), embedded_no_fsync (COGRELAY_FSYNC=off: not power-loss safe)",
                family,
            );
        }
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &r);
        out
    }
}

/// The queue's gauges, read at scrape time.
fn register_queue(r: &mut Registry, c: &Counts) {
    let jobs = Family::<Labels, Gauge>::default();
    for (state, n) in [
        ("waiting", c.waiting),
        ("active", c.active),
        ("delayed", c.delayed),
        ("completed", c.completed),
        ("failed", c.failed),
    ] {
        jobs.get_or_create(&vec![("state", state)]).set(n as i64);
    }
    r.register("cogrelay_queue_jobs", "Jobs in the queue by state", jobs);
    let age = Gauge::<f64, AtomicU64>::default();
    age.set(
        c.oldest_waiting_ms
            .map(|t| (crate::time::now_ms() - t).max(0) as f64 / 1000.0)
            .unwrap_or(0.0),
    );
    r.register(
        "cogrelay_queue_oldest_waiting_seconds",
        "Age of the oldest job due for delivery (0 when none)",
        age,
    );
}

/// The embedded store's size and cap.
fn register_store(r: &mut Registry, bytes: u64, max: u64) {
    let used = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    used.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    r.register(
        "cogrelay_store_bytes",
        "The embedded store's bytes on disk (database and WAL)",
        used,
    );
    let cap = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    cap.set(i64::try_from(max).unwrap_or(i64::MAX));
    r.register(
        "cogrelay_store_max_bytes",
        "COGRELAY_MAX_DB_BYTES (0: no cap; new events are refused with 503 near it)",
        cap,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_the_names_labels_and_cumulative_buckets() {
        let m = Metrics::default();
        m.ingress(200, Duration::from_micros(300));
        m.ingress(200, Duration::from_millis(3));
        m.ingress(418, Duration::from_millis(1));
        m.attempt(AttemptOutcome::Delivered, Duration::from_millis(2));
        let out = m.render(None, &[("embedded_no_fsync", false)], None);
        for line in [
            "cogrelay_ingress_requests_total{status=\"200\"} 2",
            "cogrelay_ingress_requests_total{status=\"other\"} 1",
            "cogrelay_ingress_requests_total{status=\"503\"} 0",
            "cogrelay_ingress_ack_seconds_bucket{le=\"0.0005\"} 1",
            "cogrelay_ingress_ack_seconds_bucket{le=\"0.005\"} 2",
            "cogrelay_ingress_ack_seconds_bucket{le=\"+Inf\"} 2",
            "cogrelay_ingress_ack_seconds_count 2",
            "cogrelay_deliveries_total{outcome=\"delivered\"} 1",
            "cogrelay_deliveries_total{outcome=\"failed\"} 0",
            "cogrelay_delivery_up 0",
            "cogrelay_queue_durability_risk{risk=\"embedded_no_fsync\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
        }
        assert!(
            !out.contains("cogrelay_queue_jobs"),
            "no queue gauges without counts"
        );
        assert_eq!(m.totals().accepted, 2);
    }
}
