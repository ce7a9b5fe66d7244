//! Direct handoff from the ingress to the local dispatcher.
//!
//! When the worker pool has room, the ingress stores a new job already leased
//! to this process (`Queue::enqueue_leased`) and passes it here, in memory, so
//! the dispatcher does not have to claim it back from the store. Room is
//! bounded: jobs in this channel plus the dispatcher's ready buffer stay within
//! `capacity` (`HANDOFF_PER_WORKER` per worker, see serve.rs). A job that was
//! stored but never reaches a worker (the process dies, or shutdown races) is
//! an ordinary leased job: it is recovered like any claimed job, never lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::event::Event;
use crate::queue::{Enqueued, Leased, Queue, QueueResult};

#[derive(Debug)]
pub struct Handoff {
    tx: mpsc::UnboundedSender<Leased>,
    /// Reserved or sent, not yet received by the dispatcher.
    queued: AtomicUsize,
    /// The dispatcher's ready buffer, as it last reported it.
    ready: AtomicUsize,
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
            capacity,
            lease,
        });
        (shared.clone(), HandoffRx { rx, shared })
    }

    /// Reserves room for one handed-off job; false when the pool is full.
    fn try_reserve(&self) -> bool {
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

    /// Passes a leased job to the dispatcher (uses the reservation).
    fn send(&self, job: Leased) {
        if self.tx.send(job).is_err() {
            // Dispatcher gone (shutting down): the job stays leased in the store
            // and is recovered when the lease expires or at the next start.
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Handoff {
    /// The ingress's one call: stores `event`, already leased to the local
    /// pool when it has room (and hands it over), else plainly (and wakes the
    /// dispatcher to claim it).
    pub async fn store<Q: Queue>(
        &self,
        queue: &Q,
        event: Event,
        wake: &Notify,
    ) -> QueueResult<Enqueued> {
        let reserved = self.try_reserve();
        let stored = if reserved {
            queue.enqueue_leased(event, self.lease).await
        } else {
            queue.enqueue(event).await.map(|e| (e, None))
        };
        if reserved && !matches!(stored, Ok((_, Some(_)))) {
            self.cancel();
        }
        let (enqueued, leased) = stored?;
        match (&enqueued, leased) {
            (Enqueued::Accepted(_), Some(job)) => self.send(job),
            (Enqueued::Accepted(_), None) => wake.notify_one(),
            (Enqueued::Duplicate(_), _) => {}
        }
        Ok(enqueued)
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
