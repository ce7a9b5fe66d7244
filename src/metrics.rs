//! Prometheus metrics, one registry per relay (`Arc<Metrics>`).
//!
//! Hand-written rather than the `metrics` crate: its recorder is process-global,
//! and a per-instance registry keeps every relay (and every test, many relays
//! to a process) exact and independent. Counters and histograms are atomics;
//! `render` writes the Prometheus text format, and adds the queue gauges read
//! at scrape time.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `cogrelay_ingress_requests_total` | counter | `status` |
//! | `cogrelay_ingress_ack_seconds` | histogram | (2xx answers) |
//! | `cogrelay_deliveries_total` | counter | `outcome` = delivered, retry, failed |
//! | `cogrelay_delivery_seconds` | histogram | (each attempt) |
//! | `cogrelay_queue_jobs` | gauge | `state` |
//! | `cogrelay_queue_oldest_waiting_seconds` | gauge | age of the oldest due job |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::event::AttemptOutcome;
use crate::queue::Counts;

/// Upper bounds (seconds) of the histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Ingress statuses with a counter of their own; anything else is `other`.
const STATUSES: [u16; 8] = [200, 400, 401, 404, 413, 415, 429, 503];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    ingress: [AtomicU64; STATUSES.len() + 1],
    pub ack: Histogram,
    delivered: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    pub delivery: Histogram,
    /// True while the delivery pool runs (set by the pool once it started):
    /// `/readyz` is 503 without it.
    pub delivery_up: std::sync::atomic::AtomicBool,
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
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        self.ingress[i].fetch_add(1, Ordering::Relaxed);
        if (200..300).contains(&status) {
            self.ack.observe(elapsed);
        }
    }

    pub fn attempt(&self, outcome: AttemptOutcome, elapsed: Duration) {
        let c = match outcome {
            AttemptOutcome::Delivered => &self.delivered,
            AttemptOutcome::Retry => &self.retried,
            AttemptOutcome::Failed => &self.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.delivery.observe(elapsed);
    }

    pub fn totals(&self) -> Totals {
        Totals {
            accepted: self.ingress[0].load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// The Prometheus text exposition, with the queue gauges if they could be read.
    pub fn render(&self, queue: Option<&Counts>, risks: &[(&'static str, bool)]) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP cogrelay_ingress_requests_total Ingress requests by answer status.\n# TYPE cogrelay_ingress_requests_total counter\n");
        for (i, s) in STATUSES.iter().enumerate() {
            let _ = writeln!(
                out,
                "cogrelay_ingress_requests_total{{status=\"{s}\"}} {}",
                self.ingress[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "cogrelay_ingress_requests_total{{status=\"other\"}} {}",
            self.ingress[STATUSES.len()].load(Ordering::Relaxed)
        );
        self.ack.render(
            &mut out,
            "cogrelay_ingress_ack_seconds",
            "Time to acknowledge an event (2xx answers).",
        );
        out.push_str("# HELP cogrelay_deliveries_total Delivery attempts by outcome (failed = dead-lettered).\n# TYPE cogrelay_deliveries_total counter\n");
        for (label, c) in [
            ("delivered", &self.delivered),
            ("retry", &self.retried),
            ("failed", &self.failed),
        ] {
            let _ = writeln!(
                out,
                "cogrelay_deliveries_total{{outcome=\"{label}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        self.delivery.render(
            &mut out,
            "cogrelay_delivery_seconds",
            "Duration of one delivery attempt.",
        );
        let _ = writeln!(
            out,
            "# HELP cogrelay_delivery_up 1 while the delivery pool runs.\n# TYPE cogrelay_delivery_up gauge\ncogrelay_delivery_up {}",
            u8::from(self.delivery_up.load(Ordering::Relaxed))
        );
        if let Some(c) = queue {
            out.push_str("# HELP cogrelay_queue_jobs Jobs in the queue by state.\n# TYPE cogrelay_queue_jobs gauge\n");
            for (state, n) in [
                ("waiting", c.waiting),
                ("active", c.active),
                ("delayed", c.delayed),
                ("completed", c.completed),
                ("failed", c.failed),
            ] {
                let _ = writeln!(out, "cogrelay_queue_jobs{{state=\"{state}\"}} {n}");
            }
            out.push_str("# HELP cogrelay_queue_oldest_waiting_seconds Age of the oldest job due for delivery (0 when none).\n# TYPE cogrelay_queue_oldest_waiting_seconds gauge\n");
            let age = c
                .oldest_waiting_ms
                .map(|t| (crate::time::now_ms() - t).max(0) as f64 / 1000.0)
                .unwrap_or(0.0);
            let _ = writeln!(out, "cogrelay_queue_oldest_waiting_seconds {age}");
        }
        if !risks.is_empty() {
            out.push_str("# HELP cogrelay_queue_durability_risk 1 where the store can lose an acknowledged event: redis_no_aof (no append-only file), redis_evicting (maxmemory-policy other than noeviction), embedded_no_fsync (COGRELAY_FSYNC=off: not power-loss safe).\n# TYPE cogrelay_queue_durability_risk gauge\n");
            for (risk, present) in risks {
                let _ = writeln!(
                    out,
                    "cogrelay_queue_durability_risk{{risk=\"{risk}\"}} {}",
                    u8::from(*present)
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2\n"));
        assert!(out.contains("x_count 2\n"));
    }
}
