//! Two relays of a shared queue (Redis) whose destinations files give one
//! destination two URLs split its events between them, unseen: each
//! delivers what it claims with its own file. Each relay writes where it
//! delivers each destination (a digest of the URL) and reads the others'
//! (`queue/redis/targets.rs`) every [`LOOK_EVERY`] and after a reload; a
//! destination another relay gives another URL is logged (WARN, naming the
//! relays; again every [`WARN_AGAIN_AFTER`] while it lasts) and counted in
//! `cogrelay_destination_url_conflicts`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::current::Current;
use crate::destination::DestinationSet;
use crate::metrics::Metrics;
use crate::queue::{DestinationName, Store};

/// How often the relay writes and reads the targets.
const LOOK_EVERY: Duration = Duration::from_secs(30);
/// How often a conflict that lasts is logged again.
const WARN_AGAIN_AFTER: Duration = Duration::from_secs(600);

/// The relay's look at the others' targets, running.
pub(super) struct Watch {
    task: tokio::task::JoinHandle<()>,
    relay: String,
}

impl Watch {
    pub(super) fn start(
        queue: &Arc<Store>,
        destinations: &Arc<Current<DestinationSet>>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let relay = relay_name();
        let task = tokio::spawn(watch(
            queue.clone(),
            destinations.clone(),
            metrics.clone(),
            relay.clone(),
        ));
        Self { task, relay }
    }

    /// Stops the looks, then takes the relay's word out of the queue.
    pub(super) async fn stop(self, queue: &Store, destinations: &DestinationSet) {
        self.task.abort();
        let _ = self.task.await;
        forget(queue, &self.relay, destinations).await;
    }
}

/// Runs until the relay stops (aborted; then [`forget`]). On the embedded
/// store, which one relay has to itself, each destination's count is 0.
async fn watch(
    queue: Arc<Store>,
    destinations: Arc<Current<DestinationSet>>,
    metrics: Arc<Metrics>,
    relay: String,
) {
    let mut looked: Option<(Arc<DestinationSet>, Instant)> = None;
    let mut warned: HashMap<DestinationName, (Vec<String>, Instant)> = HashMap::new();
    let mut shown: Vec<DestinationName> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let current = destinations.get();
        let due = looked
            .as_ref()
            .is_none_or(|(set, at)| !Arc::ptr_eq(set, &current) || at.elapsed() >= LOOK_EVERY);
        if !due {
            continue;
        }
        looked = Some((current.clone(), Instant::now()));
        let targets: Vec<(DestinationName, String)> = current
            .list
            .iter()
            .map(|d| (d.name.clone(), fingerprint(&d.delivery.target)))
            .collect();
        let compared = match &*queue {
            Store::Redis(redis) => redis.compare_targets(&relay, &targets).await,
            Store::Embedded(_) => Ok(Vec::new()),
        };
        let conflicts = match compared {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot compare the destinations' URLs with the other relays'");
                continue;
            }
        };
        let counts: Vec<(&str, usize)> = targets
            .iter()
            .map(|(name, _)| {
                let n = conflicts
                    .iter()
                    .find(|c| &c.destination == name)
                    .map_or(0, |c| c.relays.len());
                (name.as_str(), n)
            })
            .collect();
        // (the destinations of the last look that this file no longer has)
        let gone: Vec<&str> = shown
            .iter()
            .map(DestinationName::as_str)
            .filter(|name| !counts.iter().any(|(n, _)| n == name))
            .collect();
        metrics.url_conflicts(&counts, &gone);
        if let (Store::Redis(redis), false) = (&*queue, gone.is_empty()) {
            let gone: Vec<DestinationName> = shown
                .iter()
                .filter(|name| gone.contains(&name.as_str()))
                .cloned()
                .collect();
            if let Err(e) = redis.forget_targets(&relay, &gone).await {
                tracing::debug!(error = %e, "cannot take a removed destination's URL out of the queue");
            }
        }
        shown = targets.iter().map(|(n, _)| n.clone()).collect();
        for c in &conflicts {
            let again = warned
                .get(&c.destination)
                .is_none_or(|(relays, at)| relays != &c.relays || at.elapsed() >= WARN_AGAIN_AFTER);
            if again {
                tracing::warn!(
                    destination = %c.destination, relay = %relay, others = ?c.relays,
                    "another relay of this queue delivers {} to another URL: its events are split between the two (give every relay the same destinations file)",
                    c.destination
                );
                warned.insert(c.destination.clone(), (c.relays.clone(), Instant::now()));
            }
        }
        warned.retain(|name, _| {
            let lasts = conflicts.iter().any(|c| &c.destination == name);
            if !lasts {
                tracing::info!(destination = %name, "every relay of this queue now delivers {name} to one URL");
            }
            lasts
        });
    }
}

/// `relay`'s fields deleted as it stops (the other relays would count it
/// for 90 s more, and the same relay restarted with another URL would count
/// its earlier self).
async fn forget(queue: &Store, relay: &str, destinations: &DestinationSet) {
    if let Store::Redis(redis) = queue {
        let names: Vec<DestinationName> =
            destinations.list.iter().map(|d| d.name.clone()).collect();
        if let Err(e) = redis.forget_targets(relay, &names).await {
            tracing::debug!(error = %e, "cannot take this relay's destinations' URLs out of the queue");
        }
    }
}

/// A digest of where a destination's URL sends: its scheme, host, port and
/// path (credentials and query left out: what is stored in Redis, which
/// others may read, must not let them test guesses of a token there; a
/// guess of the whole place, a token in the path included, can be
/// confirmed). Equal places give equal digests.
fn fingerprint(url: &reqwest::Url) -> String {
    let mut place = crate::secret::redact_url(url);
    if let Some(f) = place.find('#') {
        place.truncate(f);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, place.as_bytes());
    hex::encode(&digest.as_ref()[..12])
}

/// This relay's name for the others: its host and process, and a random
/// part (containers that share a host name all run as process 1).
fn relay_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host = if host.is_empty() { "host".into() } else { host };
    let mut random = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    format!("{host}:{}:{}", std::process::id(), hex::encode(random))
}
