//! Direct handoff from the ingress to the local dispatcher.
//!
//! When the worker pool has room, the ingress stores a new job already leased
//! to this process (`Queue::store` with a lease) and passes it here, in memory, so
//! the dispatcher does not have to claim it back from the store. Room is
//! bounded: jobs in this channel plus the dispatcher's ready buffer stay within
//! `capacity` (`HANDOFF_PER_WORKER` per worker, see `serve/pools.rs`). A job that was
//! stored but never reaches a worker (the process dies, or shutdown races) is
//! an ordinary leased job: it is recovered like any claimed job, never lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::event::Event;
use crate::queue::{
    DestinationName, LeaseRef, Leased, Queue, QueueResult, Recipient, Routed, Store,
};

#[derive(Debug)]
pub struct Handoff {
    tx: mpsc::UnboundedSender<Leased>,
    /// Reserved or sent, not yet received by the dispatcher.
    queued: AtomicUsize,
    /// The dispatcher's ready buffer, as it last reported it.
    ready: AtomicUsize,
    /// Whether the pool takes handoffs now (not while its circuit is open
    /// or half-open, a target's `Retry-After` holds it, or it is paused: it
    /// would give them back at once).
    open: std::sync::atomic::AtomicBool,
    capacity: usize,
    pub lease: Duration,
}

#[derive(Debug)]
pub struct HandoffRx {
    rx: mpsc::UnboundedReceiver<Leased>,
    shared: Arc<Handoff>,
}

impl Handoff {
    pub fn new(capacity: usize, lease: Duration) -> (Arc<Self>, HandoffRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Self {
            tx,
            queued: AtomicUsize::new(0),
            ready: AtomicUsize::new(0),
            open: std::sync::atomic::AtomicBool::new(true),
            capacity,
            lease,
        });
        (shared.clone(), HandoffRx { rx, shared })
    }

    /// Reserves room for one handed-off job; false when the pool is full.
    fn try_reserve(&self) -> bool {
        if !self.open.load(Ordering::Acquire) {
            return false;
        }
        let before = self.queued.fetch_add(1, Ordering::AcqRel);
        if before + self.ready.load(Ordering::Acquire) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back a reservation that was not used.
    fn cancel(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }

    /// Passes a leased job to the dispatcher (uses the reservation); its
    /// lease back when the dispatcher no longer takes any (its pool stopped:
    /// a reload or a shutdown while the job was being stored).
    fn send(&self, job: Leased) -> Result<(), LeaseRef> {
        self.tx.send(job).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            e.0.lease
        })
    }
}

/// One destination's pool as the ingress sees it: its handoff and the
/// wake-up of its dispatcher.
#[derive(Debug)]
pub struct Lane {
    pub destination: DestinationName,
    pub handoff: Arc<Handoff>,
    pub wake: Arc<Notify>,
}

/// Every destination's [`Lane`], in the destinations' order.
#[derive(Debug)]
pub struct LaneSet(Vec<Lane>);

impl LaneSet {
    pub fn new(lanes: Vec<Lane>) -> Self {
        Self(lanes)
    }

    fn get(&self, destination: &str) -> Option<&Lane> {
        self.0.iter().find(|l| l.destination == destination)
    }

    /// The ingress's one call: stores `event` as a job for each of `routes`
    /// (one durable step), leased to the local pools when every one of them
    /// has room (and hands each its job), else plainly (and wakes their
    /// dispatchers to claim them).
    pub async fn store(
        &self,
        queue: &Store,
        event: Event,
        routes: Vec<Recipient>,
    ) -> QueueResult<Routed> {
        let lanes: Vec<&Lane> = routes
            .iter()
            .filter_map(|r| self.get(&r.destination))
            .collect();
        // Room in every lane, or in none.
        let taken = lanes.iter().take_while(|l| l.handoff.try_reserve()).count();
        let mut reserved = Reserved(lanes);
        if taken < reserved.0.len() {
            reserved.0.truncate(taken);
            reserved.give_back_all();
        }
        let lease = reserved.0.first().map(|l| l.handoff.lease);
        // Should the caller stop waiting (a sender that hangs up drops the
        // request's future), `reserved` gives the room back as it is dropped.
        let (routed, leased) = queue.store(event, routes, lease).await?;
        if routed.duplicate {
            return Ok(routed);
        }
        let mut leased: Vec<Option<Leased>> = leased.into_iter().map(Some).collect();
        let mut unsent = Vec::new();
        for job in &routed.jobs {
            let Some(lane) = self.get(&job.destination) else {
                continue;
            };
            let handed = leased
                .iter_mut()
                .find(|l| l.as_ref().is_some_and(|l| l.job.id == job.id))
                .and_then(Option::take);
            match handed {
                Some(l) => {
                    reserved.used(lane);
                    if let Err(lease) = lane.handoff.send(l) {
                        unsent.push(lease);
                    }
                }
                None => {
                    reserved.give_back(lane);
                    lane.wake.notify_one();
                }
            }
        }
        if !unsent.is_empty() {
            // Its pool stopped while the event was stored: the jobs go back
            // to the store for the pool that follows (a reload's), not
            // leased until their leases lapse. Should that fail they are
            // taken over then, as any job whose relay died.
            if let Err(e) = queue.release(unsent).await {
                tracing::warn!(error = %e, "jobs stored for a pool that stopped stay leased until their leases lapse");
            }
        }
        Ok(routed)
    }

    /// Wakes the pools of `destinations` (to claim what was stored for
    /// them without a handoff).
    pub fn wake<'a>(&self, destinations: impl Iterator<Item = &'a DestinationName>) {
        for name in destinations {
            if let Some(lane) = self.get(name) {
                lane.wake.notify_one();
            }
        }
    }
}

/// The room one store took in its lanes: each is used by a job handed
/// over, or given back: when the store answers, or when this is dropped
/// with the store still pending (on 788cf99 a dropped request kept its
/// room for good, and a pool whose room was all kept took no handoff
/// again until a reload).
struct Reserved<'a>(Vec<&'a Lane>);

impl Reserved<'_> {
    /// Takes `lane`'s reservation out, if it holds one; whether it did.
    fn take(&mut self, lane: &Lane) -> bool {
        let at = self.0.iter().position(|l| std::ptr::eq(*l, lane));
        at.map(|i| self.0.swap_remove(i)).is_some()
    }

    /// `lane`'s reservation used by the job sent to it.
    fn used(&mut self, lane: &Lane) {
        self.take(lane);
    }

    fn give_back(&mut self, lane: &Lane) {
        if self.take(lane) {
            lane.handoff.cancel();
        }
    }

    fn give_back_all(&mut self) {
        for lane in self.0.drain(..) {
            lane.handoff.cancel();
        }
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.give_back_all();
    }
}

impl HandoffRx {
    pub fn try_recv(&mut self) -> Option<Leased> {
        let job = self.rx.try_recv().ok();
        if job.is_some() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
        job
    }

    pub async fn recv(&mut self) -> Option<Leased> {
        let job = self.rx.recv().await;
        if job.is_some() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
        job
    }

    /// Reports the dispatcher's ready-buffer size (for `try_reserve`).
    pub fn set_ready(&self, n: usize) {
        self.shared.ready.store(n, Ordering::Release);
    }

    /// Reports whether the pool takes handoffs now (for `try_reserve`).
    pub fn set_open(&self, open: bool) {
        self.shared.open.store(open, Ordering::Release);
    }

    /// Stops the channel; returns what is still in it.
    pub fn close(&mut self) -> Vec<Leased> {
        self.rx.close();
        let mut left = Vec::new();
        while let Some(j) = self.try_recv() {
            left.push(j);
        }
        left
    }
}
