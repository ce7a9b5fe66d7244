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
use crate::delivery::{self, DeliveryConfig, PoolBoard, PoolSettings, Stop};
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
    stop: watch::Sender<Stop>,
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
    /// Each reload's pools taken out of service, whose deliveries in
    /// flight may not have ended, and the task that waits for them
    /// ([`Pools::retire`]): told of a shutdown, which waits for them.
    retirements: Vec<(Vec<watch::Sender<Stop>>, JoinHandle<()>)>,
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
            retirements: Vec::new(),
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
        let (stop, stop_rx) = watch::channel(Stop::Run);
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

    /// Stops every pool, and the ones still retiring (in-flight deliveries
    /// get their grace), waits, and gives the first failure.
    pub async fn stop_all(&mut self) -> anyhow::Result<()> {
        let all: Vec<Retiring> = self.running.drain().map(|(_, r)| Retiring(r)).collect();
        for r in &all {
            let _ = r.0.stop.send(Stop::Shutdown);
        }
        for stop in self.retirements.iter().flat_map(|(stops, _)| stops) {
            let _ = stop.send(Stop::Shutdown);
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
        for (_, task) in self.retirements.drain(..) {
            let _ = task.await;
        }
        first
    }

    /// Once every pool retired so far has ended its deliveries in flight
    /// (said once, if it must wait).
    pub async fn retired(&mut self) {
        self.retirements.retain(|(_, task)| !task.is_finished());
        if !self.retirements.is_empty() {
            tracing::info!(
                retirements = self.retirements.len(),
                "reload waits for the last reload's old pools to end their deliveries in flight"
            );
        }
        while let Some((_, task)) = self.retirements.first_mut() {
            let _ = task.await;
            // No await between: a finished task is never polled again.
            self.retirements.remove(0);
        }
    }

    /// Takes `pools` (replaced or removed by a reload) out of service
    /// without waiting for them: each is told to stop at once (it starts
    /// nothing more and gives back what it holds), and its deliveries in
    /// flight end on their own ([`Stop::Retire`]); then `after` runs.
    pub fn retire(&mut self, pools: Vec<Retiring>, after: impl FnOnce() + Send + 'static) {
        self.retirements.retain(|(_, task)| !task.is_finished());
        let mut stops = Vec::with_capacity(pools.len());
        let mut dones = Vec::with_capacity(pools.len());
        for Retiring(r) in pools {
            let _ = r.stop.send(Stop::Retire);
            stops.push(r.stop);
            dones.push(r.done);
        }
        let task = tokio::spawn(async move {
            for done in dones {
                if let Ok(Err(e)) = done.await {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "a retired delivery pool failed while draining"
                    );
                }
            }
            after();
        });
        self.retirements.push((stops, task));
    }
}

/// A pool started, not yet installed.
pub struct Started {
    name: DestinationName,
    running: Running,
}

/// A pool taken out of service, to be given to [`Pools::retire`].
pub struct Retiring(Running);
