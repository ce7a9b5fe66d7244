//! The dispatcher: carries out what the pool's [`Machine`] decides (claims,
//! starts, gives back, pause checks, circuit changes) and feeds it what
//! happens (claim answers, handed-over jobs, deliveries' ends, wake-ups, a
//! pause told by this relay's admin, shutdown), each with the time of the
//! pool's clock. It renews the leases it holds, and drains at shutdown (see
//! the module doc of [`super`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foldhash::HashSet;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

use super::attempt::{deliver, Done, Verdict};
use super::circuit::{Phase, Signal};
use super::machine::{Action, Machine, Settings};
use super::{
    handoff, target, DeliveryConfig, InFlight, Pool, PoolRunning, SendGate, TestFault, MAX_CLAIM,
};
use crate::cognigy::CognigyClient;
use crate::queue::{
    Claimed, DestinationName, LeaseRef, Leased, Queue, QueueError, QueueResult, Store,
};

/// A pause or resume told by this relay's admin: the pool stops starting
/// (and gives back what it holds) before `ack` is answered.
#[derive(Debug)]
pub struct PauseNote {
    pub paused: bool,
    pub ack: oneshot::Sender<()>,
}

/// Each running pool's lines for what this relay's admin tells it, by
/// destination (a reload may run an old and a new pool of one name a
/// moment): a pause or resume, and a wake when the admin made jobs ready.
#[derive(Debug, Clone, Default)]
pub struct PoolBoard(Arc<Mutex<HashMap<DestinationName, Vec<PoolLine>>>>);

#[derive(Debug, Clone)]
struct PoolLine {
    pauses: mpsc::UnboundedSender<PauseNote>,
    wake: Arc<Notify>,
}

impl PoolBoard {
    pub(crate) fn join(
        &self,
        destination: &DestinationName,
        pauses: mpsc::UnboundedSender<PauseNote>,
        wake: Arc<Notify>,
    ) {
        let mut board = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Ended pools leave (a destination reloaded away leaves with them).
        board.retain(|_, lines| running(lines));
        board
            .entry(destination.clone())
            .or_default()
            .push(PoolLine { pauses, wake });
    }

    /// `destination`'s running pools' lines (those of ended pools, and a
    /// destination's entry once all its pools ended, dropped).
    fn lines(&self, destination: &DestinationName) -> Vec<PoolLine> {
        let mut board = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(lines) = board.get_mut(destination) else {
            return Vec::new();
        };
        if !running(lines) {
            board.remove(destination);
        }
        board.get(destination).cloned().unwrap_or_default()
    }

    /// Tells `destination`'s running pools of a pause (or resume) and waits
    /// until each has stopped starting deliveries (and given back what it
    /// held), at most 2 s.
    pub async fn tell(&self, destination: &DestinationName, paused: bool) {
        let mut acks = Vec::new();
        for line in self.lines(destination) {
            let (ack, heard) = oneshot::channel();
            if line.pauses.send(PauseNote { paused, ack }).is_ok() {
                acks.push(heard);
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            for heard in acks {
                let _ = heard.await;
            }
        })
        .await;
    }

    /// Wakes `destination`'s running pools (every pool's for `None`), so
    /// that jobs the admin made ready (a retry, a removed job that held an
    /// ordered key) are claimed now, not at the next idle poll.
    pub fn wake(&self, destination: Option<&DestinationName>) {
        let mut board = self.0.lock().unwrap_or_else(|p| p.into_inner());
        board.retain(|name, lines| {
            if destination.is_none_or(|d| d == name) {
                for line in lines.iter().filter(|l| !l.pauses.is_closed()) {
                    line.wake.notify_one();
                }
            }
            running(lines)
        });
    }
}

/// Drops the lines of ended pools; whether any pool is left.
fn running(lines: &mut Vec<PoolLine>) -> bool {
    lines.retain(|l| !l.pauses.is_closed());
    !lines.is_empty()
}

/// What a pool is told to do (`run`'s `shutdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Run,
    /// Replaced or removed by a reload: start nothing more, give back what
    /// is held, and let the deliveries in flight end on their own (each
    /// within its timeout, its lease renewed meanwhile). Cut off after a
    /// grace, a delivery still at its target was sent again by the new
    /// pool: a duplicate. A [`Stop::Shutdown`] told later gives them the
    /// grace from then.
    Retire,
    /// The relay stops: the deliveries in flight get `SHUTDOWN_GRACE_MS`,
    /// then go back to the queue.
    Shutdown,
}

/// Runs the pool until `shutdown` leaves [`Stop::Run`], then drains (see
/// module doc).
pub async fn run(
    queue: Arc<Store>,
    cfg: DeliveryConfig,
    wake: Arc<Notify>,
    mut handoff: handoff::HandoffRx,
    metrics: Arc<crate::metrics::Metrics>,
    mut pause_notes: mpsc::UnboundedReceiver<PauseNote>,
    mut shutdown: watch::Receiver<Stop>,
) -> anyhow::Result<()> {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut d = Dispatch::start(queue, cfg, wake.clone(), metrics, done_tx).await?;
    let started = tokio::time::Instant::now();
    loop {
        let now = d.clock.mono_ms();
        let next = d.step(&mut handoff, now).await;
        // Sleep until the machine's next time, on the runtime's clock.
        let sleep_for = next.map(|t| Duration::from_millis(t.saturating_sub(now).max(1) as u64));
        let deadline = sleep_for.map_or(started, |d| tokio::time::Instant::now() + d);
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            Some(done) = done_rx.recv() => d.delivery_ended(done),
            Some(joined) = d.tasks.join_next_with_id(), if !d.tasks.is_empty() => d.task_joined(joined),
            answer = join_opt(&mut d.claiming) => d.claim_answered(answer),
            answer = join_opt(&mut d.checking) => d.pause_read(answer),
            Some(note) = pause_notes.recv() => d.pause_told(note),
            job = handoff.recv() => {
                if let Some(job) = job {
                    let now = d.clock.mono_ms();
                    d.handed(job, now);
                }
            }
            _ = wake.notified() => d.machine.woken(),
            _ = tokio::time::sleep_until(deadline), if sleep_for.is_some() => {}
        }
    }
    d.close(handoff, done_rx, shutdown).await
}

/// A claim's answer: what it took, how many were asked, when (pool clock).
type ClaimTask = JoinHandle<(QueueResult<Claimed>, usize, i64)>;
/// A look at the pause in the store: its answer and when it was asked.
type PauseTask = JoinHandle<(QueueResult<bool>, i64)>;

/// One running pool: its machine and what carries its commands out.
struct Dispatch {
    pool: Arc<Pool>,
    name: DestinationName,
    clock: crate::time::Clock,
    machine: Machine,
    renewer: JoinHandle<()>,
    done: mpsc::UnboundedSender<Done>,
    tasks: JoinSet<()>,
    /// Each delivery task's lease and whether it was a trial.
    task_leases: foldhash::HashMap<tokio::task::Id, (LeaseRef, bool)>,
    /// Deliveries whose HTTP part is over (their end was told).
    ended: HashSet<LeaseRef>,
    claiming: Option<ClaimTask>,
    checking: Option<PauseTask>,
    /// Pauses told by this relay's admin, answered once the machine heard them.
    pause_acks: Vec<oneshot::Sender<()>>,
    /// Counted as running until the pool stops or unwinds: last, so that it
    /// drops after the delivery tasks.
    _running: PoolRunning,
}

impl Dispatch {
    /// The pool's target client, lookup client and machine, its metrics
    /// set, and its lease renewer started.
    async fn start(
        queue: Arc<Store>,
        cfg: DeliveryConfig,
        wake: Arc<Notify>,
        metrics: Arc<crate::metrics::Metrics>,
        done: mpsc::UnboundedSender<Done>,
    ) -> anyhow::Result<Self> {
        if cfg.pool.test_fault == Some(TestFault::FailAtStart) {
            anyhow::bail!("injected fault: the pool failed to start");
        }
        let target = target::Target::new(
            &cfg.destination.target,
            cfg.destination.concurrency,
            cfg.destination.delivery_timeout,
        )?;
        let verifier = cfg
            .pool
            .verify_events
            .clone()
            .map(CognigyClient::new)
            .transpose()?;
        if cfg.pool.test_fault == Some(TestFault::PanicLater) {
            let _running = PoolRunning::new(metrics.clone());
            tokio::time::sleep(TestFault::PANIC_AFTER).await;
            panic!("injected fault: the pool panicked");
        }
        // Counted as running from here, until the pool stops or unwinds.
        let running = PoolRunning::new(metrics.clone());
        let clock = cfg.pool.clock.clone();
        let name = cfg.name.clone();
        let concurrency = cfg.destination.concurrency;
        let machine = Machine::new(Settings {
            concurrency,
            prefetch: (concurrency * 2).min(MAX_CLAIM),
            rate_limit: cfg.destination.rate_limit,
            circuit: cfg.destination.circuit,
            idle_poll_ms: i64::try_from(cfg.pool.idle_poll.as_millis()).unwrap_or(i64::MAX),
            pause_lease_ms: queue.pause_lease().as_millis() as i64,
        });
        let pool = Arc::new(Pool {
            queue,
            target,
            in_flight: InFlight::default(),
            wake,
            verifier,
            destination_metrics: metrics.destination(&name),
            clock: clock.clone(),
            gate: SendGate::new(),
            cfg,
            metrics,
        });
        pool.metrics.circuit(&name, Phase::Closed.as_str());
        pool.metrics.next_trial(&name, None);
        let renewer = (pool.cfg.renewals.clone())
            .unwrap_or_else(tokio::runtime::Handle::current)
            .spawn(renew_leases(pool.clone()));
        Ok(Self {
            pool,
            name,
            clock,
            machine,
            renewer,
            _running: running,
            done,
            tasks: JoinSet::new(),
            task_leases: Default::default(),
            ended: Default::default(),
            claiming: None,
            checking: None,
            pause_acks: Vec::new(),
        })
    }

    /// Takes the jobs handed over, carries out what the machine says now,
    /// and tells the ingress and the deliveries what it may do; the
    /// machine's next time.
    async fn step(&mut self, handoff: &mut handoff::HandoffRx, now: i64) -> Option<i64> {
        while let Some(job) = handoff.try_recv() {
            self.handed(job, now);
        }
        for command in self.machine.poll(now) {
            // A circuit shared with the other relays is told before this
            // relay claims again (its own next claim must not find the
            // trials it has just judged still out).
            if let Action::Circuit {
                phase,
                cooldown,
                share: true,
            } = command
            {
                // Boxed, as every future over the store here: the store's
                // futures are kilobytes, and a future held inline is
                // copied whole at each move (see `carry_out`).
                Box::pin(share_circuit(&self.pool, phase, cooldown)).await;
            }
            self.carry_out(command);
        }
        self.pool.gate.set(self.machine.lease_until());
        handoff.set_ready(self.machine.ready_len() + self.machine.running());
        handoff.set_open(self.machine.takes_handoffs(now));
        for ack in self.pause_acks.drain(..) {
            let _ = ack.send(());
        }
        self.machine.next_wake(now)
    }

    /// One machine command, carried out. The tasks spawned are boxed: a
    /// task's future is copied whole when it is spawned, when it finishes
    /// and when its output is read, and a delivery's future was 14 KB
    /// (copies of futures were a quarter of the relay's instructions per
    /// event; docs/benchmark.md).
    fn carry_out(&mut self, command: Action) {
        let pool = &self.pool;
        match command {
            Action::Claim { max, order } => {
                let p = pool.clone();
                self.claiming = Some(tokio::spawn(Box::pin(async move {
                    let asked_at = p.clock.mono_ms();
                    let r = p
                        .queue
                        .claim_for(&p.cfg.name, max, p.cfg.pool.lock_duration, order)
                        .await;
                    (r, max, asked_at)
                })));
            }
            Action::Start { job, trial } => {
                let lease = job.lease.clone();
                let handle = self.tasks.spawn(Box::pin(deliver(
                    pool.clone(),
                    job,
                    trial,
                    self.done.clone(),
                )));
                self.task_leases.insert(handle.id(), (lease, trial));
            }
            Action::Release(jobs) => release(pool, jobs),
            Action::CheckPause => {
                let p = pool.clone();
                self.checking = Some(tokio::spawn(Box::pin(async move {
                    let asked_at = p.clock.mono_ms();
                    (p.queue.is_paused(&p.cfg.name).await, asked_at)
                })));
            }
            Action::Circuit {
                phase, cooldown, ..
            } => circuit_changed(pool, &self.name, phase, cooldown),
        }
    }

    /// A job the ingress handed over, already leased.
    fn handed(&mut self, job: Leased, now: i64) {
        self.pool.in_flight.hold(&job.lease);
        self.machine.handed(job, now);
    }

    /// A delivery's HTTP part is over (or it gave its job back unsent).
    fn delivery_ended(&mut self, done: Done) {
        let now = self.clock.mono_ms();
        self.ended.insert(done.lease.clone());
        // The breaker names an event only when it failed (its run).
        let event = match &done.verdict {
            Verdict::Sent {
                signal: Signal::Failure,
                ..
            } => super::circuit::event_of(&done.lease.job_id),
            _ => 0,
        };
        match done.verdict {
            Verdict::Sent { signal, hold } => {
                self.machine
                    .finished(done.trial, (signal, event), hold, now)
            }
            Verdict::NotSent(job) => {
                self.machine
                    .finished(done.trial, (Signal::None, event), None, now);
                release(&self.pool, vec![*job]);
            }
        }
    }

    /// A delivery task is gone; one that died has its end told to the
    /// machine and its job back in the store (not active for ever).
    fn task_joined(&mut self, joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match &joined {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let Some((lease, trial)) = self.task_leases.remove(&id) else {
            return;
        };
        let told = self.ended.remove(&lease);
        if let Err(e) = joined {
            tracing::error!(destination = %self.name, job = %lease.job_id, error = %e, "a delivery task failed; its job goes back to the queue");
            if !told {
                self.machine
                    .finished(trial, (Signal::None, 0), None, self.clock.mono_ms());
            }
            self.pool.in_flight.ended(&lease);
            let queue = self.pool.queue.clone();
            tokio::spawn(Box::pin(async move {
                let _ = queue.release(vec![lease]).await;
            }));
        }
    }

    fn claim_answered(
        &mut self,
        answer: Result<(QueueResult<Claimed>, usize, i64), tokio::task::JoinError>,
    ) {
        self.claiming = None;
        let now = self.clock.mono_ms();
        let (result, asked, asked_at) = match answer {
            Ok(r) => r,
            Err(e) => (Err(QueueError::Unavailable(e.to_string())), 0, now),
        };
        let result = result.map_err(|e| {
            tracing::warn!(destination = %self.name, error = %e, "cannot claim jobs; trying again in a second");
            e.to_string()
        });
        if let Ok(c) = &result {
            for job in &c.jobs {
                self.pool.in_flight.hold(&job.lease);
            }
        }
        let wait = result
            .as_ref()
            .ok()
            .and_then(|c| c.next_due_ms)
            .map(|due| due.saturating_sub(self.clock.now_ms()));
        self.machine.claimed(result, asked, asked_at, wait, now);
    }

    fn pause_read(&mut self, answer: Result<(QueueResult<bool>, i64), tokio::task::JoinError>) {
        self.checking = None;
        let now = self.clock.mono_ms();
        let (result, asked_at) =
            answer.unwrap_or_else(|e| (Err(QueueError::Unavailable(e.to_string())), now));
        self.machine
            .pause_seen(result.map_err(|e| e.to_string()), asked_at, now);
    }

    fn pause_told(&mut self, note: PauseNote) {
        let now = self.clock.mono_ms();
        self.machine.pause_told(note.paused, now);
        self.pause_acks.push(note.ack);
    }

    /// Shutdown: nothing more starts, what is held goes back, the
    /// deliveries in flight finish (see [`Stop`]; after the grace period,
    /// those left go back).
    async fn close(
        mut self,
        mut handoff: handoff::HandoffRx,
        mut done_rx: mpsc::UnboundedReceiver<Done>,
        mut stop: watch::Receiver<Stop>,
    ) -> anyhow::Result<()> {
        self.machine.stop();
        let pool = self.pool.clone();
        pool.gate.set(i64::MIN);
        if let Some(h) = self.claiming.take() {
            if let Ok((Ok(claimed), _, _)) = h.await {
                release(&pool, claimed.jobs);
            }
        }
        if let Some(h) = self.checking.take() {
            h.abort();
        }
        let mut held: Vec<Leased> = handoff.close();
        for command in self.machine.poll(self.clock.mono_ms()) {
            if let Action::Release(jobs) = command {
                held.extend(jobs);
            }
        }
        // A failure to give them back is reported at the end, after the
        // drain: the deliveries in flight still finish and record their results.
        let mut released = Ok(());
        if !held.is_empty() {
            let leases: Vec<LeaseRef> = held.into_iter().map(|l| l.lease).collect();
            for l in &leases {
                pool.in_flight.ended(l);
            }
            if let Err(e) = pool.queue.release(leases).await {
                tracing::error!(error = %e, "cannot return unstarted jobs to the queue; they are taken over when their leases expire");
                released = Err(e);
            }
        }
        let drained = self.drain(&mut stop, &mut done_rx).await;
        // Deliveries that were told to give their job back meanwhile.
        while let Ok(done) = done_rx.try_recv() {
            give_back_unsent(&pool, &self.name, done).await;
        }
        // Awaited once aborted: the renewer holds the pool, and so the queue
        // (the embedded store's process lock), until it is really gone.
        self.renewer.abort();
        let _ = (&mut self.renewer).await;
        if !drained {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
            let leases = pool.in_flight.take_all();
            tracing::warn!(
                returned = leases.len(),
                "grace period over: unfinished deliveries go back to the queue"
            );
            pool.queue.release(leases).await?;
        }
        released.map_err(Into::into)
    }

    /// Lets in-flight deliveries finish: a retired pool's until they end
    /// or a shutdown is told (a job a delivery gave back unsent goes back
    /// to the store at once meanwhile, for the new pool), then (at
    /// shutdown) within the grace period; whether they all did.
    async fn drain(
        &mut self,
        stop: &mut watch::Receiver<Stop>,
        done_rx: &mut mpsc::UnboundedReceiver<Done>,
    ) -> bool {
        let busy = self.tasks.len();
        let grace = self.pool.cfg.pool.shutdown_grace;
        let retired = *stop.borrow_and_update() == Stop::Retire;
        if busy > 0 {
            tracing::info!(
                destination = %self.name,
                in_flight = busy,
                grace_ms = grace.as_millis() as u64,
                retired,
                "finishing in-flight deliveries"
            );
        }
        let tasks = &mut self.tasks;
        let all_ended = async { while tasks.join_next().await.is_some() {} };
        tokio::pin!(all_ended);
        if retired {
            let shutdown = async {
                while stop.changed().await.is_ok() {
                    if *stop.borrow() == Stop::Shutdown {
                        return;
                    }
                }
                // No one left to tell a shutdown: they end on their own.
                std::future::pending::<()>().await;
            };
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut all_ended => return true,
                    () = &mut shutdown => break,
                    Some(done) = done_rx.recv() => give_back_unsent(&self.pool, &self.name, done).await,
                }
            }
        }
        tokio::time::timeout(grace, all_ended).await.is_ok()
    }
}

/// A delivery that ended without sending its job, while the pool closes:
/// the job back to the store at once (not kept until its lease lapses).
async fn give_back_unsent(pool: &Arc<Pool>, name: &str, done: Done) {
    if let Verdict::NotSent(job) = done.verdict {
        pool.in_flight.ended(&job.lease);
        if let Err(e) = pool.queue.release(vec![job.lease]).await {
            tracing::warn!(destination = %name, error = %e, "cannot return an unsent job to the queue; it is taken over when its lease expires");
        }
    }
}

/// A circuit change: in the metrics and the admin API, and logged once.
fn circuit_changed(pool: &Arc<Pool>, name: &str, phase: Phase, cooldown: Duration) {
    pool.metrics.circuit(name, phase.as_str());
    let next = (phase == Phase::Open).then(|| {
        pool.clock
            .now_ms()
            .saturating_add(i64::try_from(cooldown.as_millis()).unwrap_or(i64::MAX))
    });
    pool.metrics.next_trial(name, next);
    match phase {
        Phase::Open => tracing::warn!(
            destination = %name, cooldown_ms = cooldown.as_millis() as u64,
            next_trial = %next.map(crate::time::rfc3339).unwrap_or_default(),
            "circuit open: the destination keeps failing; its jobs wait (keeping their attempts) until a trial"
        ),
        Phase::HalfOpen => {
            tracing::info!(destination = %name, "circuit half-open: trial deliveries")
        }
        Phase::Closed => {
            tracing::info!(destination = %name, "circuit closed: deliveries resume")
        }
    }
}

/// A circuit change in the store, for every relay (Redis; nothing to do on
/// the embedded store): an opening with its cool-down, a closing.
async fn share_circuit(pool: &Arc<Pool>, phase: Phase, cooldown: Duration) {
    if phase == Phase::HalfOpen || !pool.queue.shared_by_relays() {
        return;
    }
    let open_for = (phase == Phase::Open).then_some(cooldown);
    if let Err(e) = pool.queue.set_circuit(&pool.cfg.name, open_for).await {
        tracing::warn!(error = %e, "cannot share the circuit with the other relays");
    }
}

/// Jobs back to the store unstarted (waiting again, attempts unchanged).
fn release(pool: &Arc<Pool>, jobs: Vec<Leased>) {
    if jobs.is_empty() {
        return;
    }
    let leases: Vec<LeaseRef> = jobs.into_iter().map(|l| l.lease).collect();
    for l in &leases {
        pool.in_flight.ended(l);
    }
    let p = pool.clone();
    tokio::spawn(Box::pin(async move {
        if let Err(e) = p.queue.release(leases).await {
            tracing::warn!(error = %e, "cannot give jobs back to the queue; they are taken over when their leases expire");
        }
    }));
}

async fn renew_leases(pool: Arc<Pool>) {
    let every = pool.cfg.pool.lock_duration / 3;
    loop {
        tokio::time::sleep(every).await;
        let leases = pool.in_flight.all();
        if leases.is_empty() {
            continue;
        }
        if let Err(e) = pool.queue.renew(leases, pool.cfg.pool.lock_duration).await {
            tracing::warn!(error = %e, "cannot renew leases");
        }
    }
}

/// The task's result when there is one; never ready when there is none.
async fn join_opt<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wake reaches the running pools it names, and an ended pool's line
    /// (a destination reloaded away) is dropped from the board.
    #[tokio::test]
    async fn a_wake_reaches_the_named_running_pools_and_ended_ones_leave_the_board() {
        let board = PoolBoard::default();
        let (a, b) = (DestinationName::known("a"), DestinationName::known("b"));
        let (a_line, _a_notes) = mpsc::unbounded_channel();
        let (b_line, b_notes) = mpsc::unbounded_channel();
        let (a_wake, b_wake) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        board.join(&a, a_line, a_wake.clone());
        board.join(&b, b_line, b_wake.clone());
        let woken = |n: &Arc<Notify>| {
            let n = n.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), n.notified())
                    .await
                    .is_ok()
            }
        };

        board.wake(Some(&a));
        assert!(woken(&a_wake).await, "a is woken");
        // A permit is stored at once, so a zero wait sees one if it is there
        // (`timeout` polls the future before its clock).
        let has_permit = tokio::time::timeout(Duration::ZERO, b_wake.notified()).await;
        assert!(has_permit.is_err(), "b is not");
        board.wake(None);
        assert!(woken(&a_wake).await && woken(&b_wake).await, "every pool");

        drop(b_notes);
        board.wake(None);
        let names: Vec<_> = board.0.lock().expect("board").keys().cloned().collect();
        assert_eq!(names, [a], "b's pool ended: its entry is gone");
        assert!(board.lines(&b).is_empty());
    }
}
