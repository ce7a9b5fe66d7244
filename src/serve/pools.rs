//! The relay's delivery pools, one per destination, started and stopped one
//! by one (a reload adds, replaces and removes them while the others run).
//!
//! A pool that ends while it was not asked to (it failed, panicked, or
//! stopped on its own) is reported on `ended`: `serve` then stops taking
//! events and exits 1, as nothing more would be delivered there.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::delivery::handoff::{Handoff, Lane};
use crate::delivery::{self, DeliveryConfig, PoolBoard, PoolSettings};
use crate::destination::Destination;
use crate::metrics::Metrics;
use crate::queue::{DestinationName, Store};

/// New events the ingress may hand to a pool directly (stored leased to this
/// relay), per delivery worker. Above the pool's prefetch (2 per worker):
/// under a burst the deliveries lag behind the acknowledgements, and a
/// handed-off event saves a round trip to the store (on Redis, a script) over
/// one that must be claimed back. Bounded so that one relay of many does not
/// hoard the work.
const HANDOFF_PER_WORKER: usize = 8;

/// A pool that ended: its destination, its generation, and why, if it failed.
pub type Ended = (DestinationName, u64, Result<(), String>);

struct Running {
    generation: u64,
    stop: watch::Sender<bool>,
    done: JoinHandle<anyhow::Result<()>>,
    handoff: Arc<Handoff>,
    wake: Arc<Notify>,
}

pub struct Pools {
    queue: Arc<Store>,
    board: PoolBoard,
    pool: PoolSettings,
    metrics: Arc<Metrics>,
    /// Where the pools run (the delivery runtime's handle).
    runtime: tokio::runtime::Handle,
    ended: mpsc::UnboundedSender<Ended>,
    running: HashMap<DestinationName, Running>,
    next_generation: u64,
}

impl Pools {
    pub fn new(
        queue: Arc<Store>,
        pool: PoolSettings,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
        board: PoolBoard,
    ) -> (Self, mpsc::UnboundedReceiver<Ended>) {
        let (ended, ended_rx) = mpsc::unbounded_channel();
        let pools = Self {
            queue,
            board,
            pool,
            metrics,
            runtime,
            ended,
            running: HashMap::new(),
            next_generation: 0,
        };
        (pools, ended_rx)
    }

    /// Starts `d`'s pool. One already running for this name keeps running
    /// until [`Pools::retire`]: the two share the destination's jobs through
    /// the store's leases meanwhile.
    pub fn start(&mut self, d: &Destination) -> Started {
        let (handoff, handoff_rx) = Handoff::new(
            d.delivery.concurrency * HANDOFF_PER_WORKER,
            self.pool.lock_duration,
        );
        let wake = Arc::new(Notify::new());
        let (stop, stop_rx) = watch::channel(false);
        let (pause_line, pause_notes) = mpsc::unbounded_channel();
        self.board.join(&d.name, pause_line, wake.clone());
        let generation = self.next_generation;
        self.next_generation += 1;
        let run = delivery::run(
            self.queue.clone(),
            DeliveryConfig::new(d.name.clone(), d.delivery.clone(), self.pool.clone())
                .renewing_here(),
            wake.clone(),
            handoff_rx,
            self.metrics.clone(),
            pause_notes,
            stop_rx,
        );
        let inner = self.runtime.spawn(run);
        let (ended, name) = (self.ended.clone(), d.name.clone());
        let done = tokio::spawn(async move {
            let result = match inner.await {
                Ok(r) => r,
                Err(e) if e.is_panic() => Err(anyhow::anyhow!("the delivery pool panicked: {e}")),
                Err(e) => Err(anyhow::anyhow!("the delivery pool was cancelled: {e}")),
            };
            let summary = result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}"));
            let _ = ended.send((name, generation, summary));
            result
        });
        Started {
            name: d.name.clone(),
            running: Running {
                generation,
                stop,
                done,
                handoff,
                wake,
            },
        }
    }

    /// Puts a started pool in place of the one running under its name (which
    /// is returned, still running, to be retired).
    pub fn install(&mut self, started: Started) -> Option<Retiring> {
        self.running
            .insert(started.name, started.running)
            .map(Retiring)
    }

    /// Removes `name`'s pool from the running ones (to be retired).
    pub fn remove(&mut self, name: &DestinationName) -> Option<Retiring> {
        self.running.remove(name).map(Retiring)
    }

    /// Wakes every running pool (to claim jobs given back to the store).
    pub fn wake_all(&self) {
        self.board.wake(None);
    }

    /// Whether an ended pool is one still running here (an unexpected end),
    /// rather than one retired on purpose.
    pub fn is_current(&self, name: &DestinationName, generation: u64) -> bool {
        self.running
            .get(name)
            .is_some_and(|r| r.generation == generation)
    }

    /// The lanes of the running pools, in `order`.
    pub fn lanes<'a>(&self, order: impl Iterator<Item = &'a DestinationName>) -> Vec<Lane> {
        order
            .filter_map(|name| {
                self.running.get(name).map(|r| Lane {
                    destination: name.clone(),
                    handoff: r.handoff.clone(),
                    wake: r.wake.clone(),
                })
            })
            .collect()
    }

    /// Stops every pool (in-flight deliveries get their grace), waits, and
    /// gives the first failure.
    pub async fn stop_all(&mut self) -> anyhow::Result<()> {
        let all: Vec<Retiring> = self.running.drain().map(|(_, r)| Retiring(r)).collect();
        for r in &all {
            let _ = r.0.stop.send(true);
        }
        let mut first = Ok(());
        for r in all {
            let result = match r.0.done.await {
                Ok(r) => r,
                Err(e) => Err(anyhow::anyhow!("the delivery pool panicked: {e}")),
            };
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}

/// A pool started, not yet installed.
pub struct Started {
    name: DestinationName,
    running: Running,
}

/// A pool taken out of service: stop it and wait for its drain.
pub struct Retiring(Running);

impl Retiring {
    /// Tells the pool to stop: it starts nothing more, and gives back what
    /// it holds.
    pub fn stop(&self) {
        let _ = self.0.stop.send(true);
    }

    /// Stops the pool and waits for its drain.
    pub async fn retire(self) {
        let _ = self.0.stop.send(true);
        if let Ok(Err(e)) = self.0.done.await {
            tracing::error!(
                error = format!("{e:#}"),
                "a retired delivery pool failed while draining"
            );
        }
    }
}
