//! `cogrelay serve`: wires the queue, the ingress, the worker pool and the admin
//! API together, and runs them until `shutdown` resolves.
//!
//! Listeners and the shutdown future are injected (tests bind port 0 and
//! trigger shutdown themselves). Shutdown order (SPEC §3.3): stop accepting (the
//! ingress answers 503 from then on), drain the worker pool (in-flight deliveries
//! finish within `SHUTDOWN_GRACE_MS`, the rest go back to the queue), close the
//! store, then stop the HTTP servers.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config::ServeConfig;
use crate::current::Current;
use crate::delivery::handoff::LaneSet;
use crate::destination::DestinationSet;
use crate::ingress::{self, auth::Authenticator, Ingress, Routing};
use crate::metrics::Metrics;
use crate::queue::{self, DestinationName, Opener, Queue, Store};
use crate::{admin, admin::Admin};
use pools::Pools;

/// How long the HTTP servers get to close connections after the drain.
const HTTP_CLOSE_GRACE: Duration = Duration::from_secs(2);

mod pools;
mod targets;

pub use pools::Ended;

pub async fn run(
    cfg: ServeConfig,
    ingress: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // No reloads: the sender stays alive (and silent) as long as the relay.
    let (_reload_tx, reload) = mpsc::channel(1);
    run_reloadable(cfg, ingress, admin, shutdown, reload).await
}

/// [`run`], re-reading the destinations file at each message on `reload`
/// (SIGHUP in the binary).
pub async fn run_reloadable(
    cfg: ServeConfig,
    ingress: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let opener = Opener::Relay {
        lock_duration: cfg.pool.lock_duration,
    };
    let queue = queue::open(&cfg.store, opener).await?;
    tracing::info!("{} open", queue.describe(&cfg.store));
    run_with_queue(cfg, Arc::new(queue), ingress, admin, shutdown, reload).await
}

pub async fn run_with_queue(
    cfg: ServeConfig,
    queue: Arc<Store>,
    ingress_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut reload: mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    // TLS first: a bad certificate stops start-up before anything listens.
    let tls = match &cfg.ingress.tls {
        Some((cert, key)) => Some(crate::tls::acceptor(cert, key)?),
        None => None,
    };
    // Each destination its own pool (workers, handoff, wake-up): the file's
    // destinations, or `default`.
    let destinations = cfg.destinations();
    if destinations.list.is_empty() {
        anyhow::bail!("no destination to deliver to");
    }
    // The delivery threads before anything listens: a relay that could not
    // deliver must not take events.
    let delivery_rt = DeliveryRuntime::new(cfg.pool.nice)?;
    let accepting = Arc::new(AtomicBool::new(true));
    let metrics = Arc::new(Metrics::default());
    let board = crate::delivery::PoolBoard::default();
    let (mut pools, mut ended) = Pools::new(
        queue.clone(),
        cfg.pool.clone(),
        metrics.clone(),
        delivery_rt.handle(),
        board.clone(),
    );
    let lanes = start_pools(&mut pools, &queue, &destinations).await;
    let ingress_state = ingress_state(&cfg, &queue, &destinations, lanes, &accepting, &metrics);
    let (stop_http_tx, stop_http_rx) = watch::channel(false);
    let ingress_addr = ingress_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let current_destinations = Arc::new(Current::new(destinations.clone()));
    let admin_state = admin_state(
        &cfg,
        &queue,
        &metrics,
        &accepting,
        admin_addr,
        &current_destinations,
        board,
    );
    let ingress_server = tokio::spawn(crate::tls::serve(
        ingress_listener,
        tls.clone(),
        ingress::router(ingress_state.clone()),
        cfg.ingress.request_read_timeout,
        stop_http_rx.clone(),
    ));
    let admin_server = serve_admin(admin_listener, &admin_state, &cfg, stop_http_rx);
    let sampler = tokio::spawn(sample_history(metrics.clone()));
    let url_watch = targets::Watch::start(&queue, &current_destinations, &metrics);
    let summary = cfg
        .summary_every
        .map(|every| tokio::spawn(summary_lines(queue.clone(), metrics.clone(), every)));
    log_destinations(&destinations);
    admin_state.remember(warn_of_orphans(&queue, &destinations).await);
    tracing::info!(
        ingress = %ingress_addr, admin = %admin_addr, destinations = destinations.list.len(),
        "cogrelay relay ready: POST events to {}://{ingress_addr}{}", if tls.is_some() { "https" } else { "http" }, ingress::PATH
    );

    // The pools run until shutdown; one that ends before would leave its
    // destination undelivered: stop taking events (readyz 503), close the
    // store, exit 1. A reload replaces the pools without stopping.
    let pool_result = until_stopped(
        shutdown,
        &mut reload,
        &mut ended,
        &mut pools,
        &cfg,
        &ingress_state,
        &admin_state,
        &accepting,
    )
    .await;
    url_watch.stop(&queue, &current_destinations.get()).await;
    let close_result = close_down(
        &queue,
        summary,
        sampler,
        stop_http_tx,
        [ingress_server, admin_server],
    )
    .await;
    pool_result?;
    close_result.context("failed to close the queue")?;
    tracing::info!("stopped");
    Ok(())
}

/// The relay's life after start: reloads on SIGHUP, until shutdown or a pool
/// that ends on its own (the relay then stops taking events: it cannot
/// deliver them).
#[allow(clippy::too_many_arguments)]
async fn until_stopped(
    shutdown: impl Future<Output = ()>,
    reload: &mut mpsc::Receiver<()>,
    ended: &mut mpsc::UnboundedReceiver<pools::Ended>,
    pools: &mut Pools,
    cfg: &ServeConfig,
    ingress_state: &Ingress,
    admin: &Admin,
    accepting: &AtomicBool,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => {
                tracing::info!("shutting down: no new events accepted");
                accepting.store(false, Ordering::Relaxed);
                break pools.stop_all().await.context("the delivery pool failed");
            }
            Some(()) = reload.recv() => {
                // The last reload's old pools end their deliveries first, so
                // that at most two pools of a destination deliver at once
                // (each reload's would add to them); a stop meanwhile is heard.
                let stopping = tokio::select! {
                    () = pools.retired() => false,
                    () = &mut shutdown => true,
                };
                if stopping {
                    tracing::info!("shutting down: no new events accepted");
                    accepting.store(false, Ordering::Relaxed);
                    break pools.stop_all().await.context("the delivery pool failed");
                }
                reload_destinations(cfg, pools, ingress_state, admin).await;
            }
            Some((name, generation, result)) = ended.recv() => {
                if !pools.is_current(&name, generation) {
                    continue; // retired on purpose
                }
                accepting.store(false, Ordering::Relaxed);
                let why = match result {
                    Ok(()) => anyhow::anyhow!("the delivery pool of {name} stopped on its own"),
                    Err(e) => anyhow::anyhow!("the delivery pool failed: {e}"),
                };
                tracing::error!(error = format!("{why:#}"), "nothing can be delivered: the relay stops taking events and exits");
                let _ = pools.stop_all().await;
                break Err(why);
            }
        }
    }
}

/// The admin API's state: the queue, the metrics, the token, the
/// destinations as reloaded, the pools' board.
fn admin_state(
    cfg: &ServeConfig,
    queue: &Arc<Store>,
    metrics: &Arc<Metrics>,
    accepting: &Arc<AtomicBool>,
    admin_addr: std::net::SocketAddr,
    current_destinations: &Arc<Current<DestinationSet>>,
    board: crate::delivery::PoolBoard,
) -> Arc<Admin> {
    Arc::new(Admin {
        queue: queue.clone(),
        metrics: metrics.clone(),
        token: cfg.admin.token.clone(),
        accepting: accepting.clone(),
        listen: admin_addr,
        destinations: current_destinations.clone(),
        board,
        known: std::sync::Mutex::new(
            current_destinations
                .get()
                .list
                .iter()
                .map(|d| d.name.clone())
                .collect(),
        ),
    })
}

/// Each destination's pool started (its shared rate limit set first), and
/// the ingress's lanes to them.
async fn start_pools(
    pools: &mut Pools,
    queue: &Arc<Store>,
    destinations: &DestinationSet,
) -> LaneSet {
    apply_rate_limits(queue, destinations).await;
    for d in &destinations.list {
        let started = pools.start(d);
        pools.install(started);
    }
    LaneSet::new(pools.lanes(destinations.list.iter().map(|d| &d.name)))
}

/// The ingress's state: who may post, the limits, the routing to the pools.
fn ingress_state(
    cfg: &ServeConfig,
    queue: &Arc<Store>,
    destinations: &DestinationSet,
    lanes: LaneSet,
    accepting: &Arc<AtomicBool>,
    metrics: &Arc<Metrics>,
) -> Arc<Ingress> {
    let auth = Authenticator::new(&cfg.ingress.signing_secrets, cfg.ingress.basic.as_ref());
    if auth.is_open() {
        tracing::warn!("ingress authentication is OFF (--allow-unauthenticated): anyone who can reach the port can queue events");
    }
    Arc::new(Ingress {
        queue: queue.clone(),
        auth,
        max_body_bytes: cfg.ingress.max_body_bytes,
        body_budget: ingress::body::BodyBudget::for_max_body(cfg.ingress.max_body_bytes),
        body_timeout: cfg.ingress.request_read_timeout,
        accepting: accepting.clone(),
        routing: Current::new(Routing {
            destinations: destinations.clone(),
            lanes,
        }),
        metrics: metrics.clone(),
        rate_limit: cfg
            .ingress
            .rate_limit
            .map(|(per_sec, burst)| crate::ingress::ratelimit::RateLimiter::new(per_sec, burst)),
        refusals: Default::default(),
        rejections: Default::default(),
        replay_window: ingress::ReplayWindow::for_dedup_ttl(cfg.store.retention.dedup_ttl),
    })
}

/// The dashboard's history: one point every `HISTORY_EVERY`.
async fn sample_history(metrics: Arc<Metrics>) {
    let mut every = tokio::time::interval(crate::metrics::HISTORY_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        metrics.sample();
    }
}

/// After the pools stopped: the background tasks end, the store closes, and
/// the HTTP servers get `HTTP_CLOSE_GRACE` to finish their connections.
async fn close_down(
    queue: &Store,
    summary: Option<tokio::task::JoinHandle<()>>,
    sampler: tokio::task::JoinHandle<()>,
    stop_http_tx: watch::Sender<bool>,
    servers: [tokio::task::JoinHandle<()>; 2],
) -> crate::queue::QueueResult<()> {
    if let Some(s) = summary {
        s.abort();
        let _ = s.await;
    }
    sampler.abort();
    let close_result = queue.close().await;
    let _ = stop_http_tx.send(true);
    for mut server in servers {
        // A server that outlives the grace is stopped. (Its connections run
        // as tasks of their own: one reading a slow body keeps the state,
        // and the closed queue, until `REQUEST_READ_TIMEOUT_MS` ends it.)
        if tokio::time::timeout(HTTP_CLOSE_GRACE, &mut server)
            .await
            .is_err()
        {
            server.abort();
            let _ = server.await;
        }
    }
    close_result
}

/// Jobs waiting for a destination that no longer exists wait until one of
/// that name does: say so once, with how to reach them. Gives back every
/// destination the embedded store has. Not on a queue shared by relays
/// (others may deliver them), where each name would open its queue here,
/// with its upkeep, for every name the registry ever held.
async fn warn_of_orphans(queue: &Store, destinations: &DestinationSet) -> Vec<DestinationName> {
    if queue.shared_by_relays() {
        return Vec::new();
    }
    let Ok(names) = queue.destination_names().await else {
        return Vec::new();
    };
    for name in names.iter().filter(|n| destinations.get(n).is_none()) {
        let Ok(c) = queue.counts_for(Some(name)).await else {
            continue;
        };
        let pending = c.waiting + c.active + c.delayed;
        if pending > 0 {
            tracing::warn!(
                destination = %name, pending, failed = c.failed,
                "jobs of a destination that is not configured wait until one of that name is (add it to the file, or list them with ?destination= and remove them)"
            );
        }
    }
    names
}

/// Each destination's rate limit where the store keeps it for every relay
/// (Redis: BullMQ's limit on its queue); a failure is a warning, the relay's
/// own limit still holds. Set side by side: while Redis hangs a start or a
/// reload waits the bound of one try (2 s a step), not one per destination.
async fn apply_rate_limits(queue: &Arc<Store>, destinations: &DestinationSet) {
    let mut sets = tokio::task::JoinSet::new();
    for d in &destinations.list {
        let (queue, name, limit) = (queue.clone(), d.name.clone(), d.delivery.rate_limit);
        sets.spawn(async move {
            if let Err(e) = queue.set_rate_limit(&name, limit).await {
                tracing::warn!(destination = %name, error = %e, "cannot set the rate limit in the store; each relay limits itself");
            }
        });
    }
    while let Some(set) = sets.join_next().await {
        if let Err(e) = set {
            tracing::error!(error = %e, "setting a destination's rate limit failed unexpectedly; each relay limits itself");
        }
    }
}

fn log_destinations(destinations: &DestinationSet) {
    for d in &destinations.list {
        tracing::info!(
            destination = %d.name, url = %crate::secret::mask_url(&d.delivery.target),
            concurrency = d.delivery.concurrency, attempts = d.delivery.attempts,
            "delivering to {}", d.name
        );
    }
}

/// SIGHUP (SPEC §7): the destinations file read again. New pools start for
/// every destination of the new file, the ingress routes to them, then the
/// old pools drain (their unstarted jobs go back to the store, where the new
/// pools take them): nothing lost, nothing sent twice. A destination that is
/// gone keeps its jobs in the store (listed, retryable, removable; the
/// admin is told its name, and shows it while it has any). A bad file
/// changes nothing, in one error line.
async fn reload_destinations(
    cfg: &ServeConfig,
    pools: &mut Pools,
    ingress: &Ingress,
    admin: &Admin,
) {
    let current = &admin.destinations;
    let Some(path) = cfg.destinations_file.as_ref().and_then(|d| d.file.clone()) else {
        tracing::warn!("reload asked (SIGHUP), but the relay runs without a destinations file: nothing to reload");
        return;
    };
    let globals = crate::config::destinations::Globals {
        delivery: cfg.delivery.clone(),
        lock_duration: cfg.pool.lock_duration,
    };
    let new = match crate::config::destinations::load(&path, &globals, &|v| std::env::var(v).ok()) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "destinations not reloaded: the running ones stay");
            return;
        }
    };
    apply_rate_limits(&ingress.queue, &new).await;
    let old = current.get();
    let mut retiring = Vec::new();
    for d in &new.list {
        let started = pools.start(d);
        retiring.extend(pools.install(started));
    }
    let removed: Vec<&DestinationName> = old
        .list
        .iter()
        .map(|d| &d.name)
        .filter(|name| new.get(name).is_none())
        .collect();
    for &name in &removed {
        retiring.extend(pools.remove(name));
    }
    // Before the admin stops finding them in the file.
    admin.remember(removed.iter().map(|&n| n.clone()).collect());
    let lanes = LaneSet::new(pools.lanes(new.list.iter().map(|d| &d.name)));
    ingress.routing.set(Routing {
        destinations: new.clone(),
        lanes,
    });
    current.set(new.clone());
    // Every old pool told to stop at once (none starts anything from now
    // on); their deliveries in flight end on their own, while the relay
    // goes on (a shutdown meanwhile gives them its grace).
    let board = admin.board.clone();
    let metrics = ingress.metrics.clone();
    let gone: Vec<String> = removed.iter().map(|n| n.as_str().to_string()).collect();
    pools.retire(retiring, move || {
        // What the old pools gave back as they stopped (jobs handed to them
        // while they closed) is claimed now, not at the new pools' next look.
        board.wake(None);
        // A removed destination's circuit is no longer anyone's: not in /metrics.
        for name in &gone {
            metrics.forget_circuit(name);
        }
    });
    let added: Vec<&str> = new
        .list
        .iter()
        .filter(|d| old.get(&d.name).is_none())
        .map(|d| d.name.as_str())
        .collect();
    tracing::info!(
        file = %path.display(), destinations = new.list.len(),
        "destinations reloaded: added {added:?}, removed {removed:?}, the others restarted with their new settings"
    );
    log_destinations(&new);
    admin.remember(warn_of_orphans(&ingress.queue, &new).await);
}

/// Where the delivery pool runs: its own runtime whose threads run at a lower
/// CPU priority (`DELIVERY_NICE`), so that under full load the ingress, whose
/// latency the sender waits on, gets the CPU first and deliveries a smaller
/// share (they are durable in the queue meanwhile). Their lease renewals stay
/// on the main runtime. With 0: the main runtime.
struct DeliveryRuntime(Option<tokio::runtime::Runtime>);

impl DeliveryRuntime {
    fn new(nice: u8) -> anyhow::Result<Self> {
        if nice == 0 {
            return Ok(Self(None));
        }
        // Half as many as the ingress threads (one per core unless
        // TOKIO_WORKER_THREADS says otherwise), at least one: delivery is the
        // lighter half of the work per event, and fewer threads switch less.
        let ingress = tokio::runtime::Handle::current().metrics().num_workers();
        let threads = ingress.div_ceil(2).max(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("cogrelay-delivery")
            .on_thread_start(move || lower_thread_priority(nice))
            .enable_all()
            .build()
            .context("cannot start the delivery threads")?;
        Ok(Self(Some(rt)))
    }

    /// Where to spawn the pools.
    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for DeliveryRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Adds `nice` to the calling thread's nice value (Linux: per thread). The
/// crate's only `unsafe`: three libc calls without pointers.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn lower_thread_priority(nice: u8) {
    // SAFETY: gettid, getpriority and setpriority take plain integers and touch
    // no memory; with PRIO_PROCESS and a thread id, Linux changes that thread only.
    let rc = unsafe {
        let tid = libc::gettid() as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (current + i32::from(nice)).min(19))
    };
    if rc != 0 {
        tracing::debug!("cannot lower the priority of a delivery thread");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_thread_priority(_nice: u8) {}

/// One line every `every` while anything moves, for a person watching the
/// terminal (pretty log mode): what was accepted, delivered, retried, failed
/// since the last line, and the queue depth.
async fn summary_lines(queue: Arc<Store>, metrics: Arc<Metrics>, every: Duration) {
    let mut last = metrics.totals();
    let mut idle_reported = false;
    loop {
        tokio::time::sleep(every).await;
        let now = metrics.totals();
        let counts = queue.counts_for(None).await.ok();
        let pending = counts
            .map(|c| c.waiting + c.active + c.delayed)
            .unwrap_or(0);
        if now == last && pending == 0 {
            if !idle_reported {
                tracing::info!("idle: nothing queued");
                idle_reported = true;
            }
            continue;
        }
        idle_reported = false;
        let queue_text = match counts {
            Some(c) => format!(
                "waiting {} active {} delayed {} failed {}",
                c.waiting, c.active, c.delayed, c.failed
            ),
            None => "unavailable".to_string(),
        };
        tracing::info!(
            "last {}s: accepted {} delivered {} retrying {} failed {} | queue: {queue_text}",
            every.as_secs(),
            now.accepted - last.accepted,
            now.delivered - last.delivered,
            now.retried - last.retried,
            now.failed - last.failed,
        );
        last = now;
    }
}

/// The admin port, served as the ingress is (without TLS): headers that
/// never finish are cut off after `REQUEST_READ_TIMEOUT_MS`, and at stop
/// every connection finishes its request and closes.
fn serve_admin(
    listener: TcpListener,
    state: &Arc<Admin>,
    cfg: &ServeConfig,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let app = admin::router(state.clone());
    let timeout = cfg.ingress.request_read_timeout;
    tokio::spawn(crate::tls::serve(listener, None, app, timeout, stop))
}

/// A listener on `port` of every interface, IPv6 and IPv4 (one dual-stack
/// socket on `[::]`); IPv4 only where the host has no IPv6.
pub fn listen_all_interfaces(port: u16) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let dual = || -> std::io::Result<Socket> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(s)
    };
    let socket = match dual() {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Err(e),
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)).into())?;
            s
        }
    };
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}
