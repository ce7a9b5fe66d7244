//! Admin API (SPEC §3.6) on `ADMIN_LISTEN`: health, readiness, queue counts and
//! the job routes an operator uses for the dead-letter queue.
//!
//! Queue errors map to status codes in one place ([`queue_error`]): not found
//! 404, wrong state 409, store unavailable 503. With `ADMIN_TOKEN` set every
//! `/admin/*` route needs `Authorization: Bearer <token>` (scheme in any case,
//! token compared in constant time); `/healthz` and `/readyz` stay open for
//! probes. Without a token (loopback only), an `/admin/*` request that a web
//! page could have made is refused with 403: an `Origin` other than the
//! admin's own, `Sec-Fetch-Site` other than `same-origin`/`none`, or a `Host`
//! that is neither the listen address nor `localhost` (DNS rebinding).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::queue::{DestinationName, Queue, QueueError, Store};

use crate::metrics;
use crate::secret::Secret;

use crate::listing::Listing;

/// Beyond the pause lease, what a pause's answer waits on a shared store:
/// a start decided just before the lease ran out has sent its request.
pub const PAUSE_MARGIN: std::time::Duration = std::time::Duration::from_millis(250);

/// Jobs in one page of `GET /admin/jobs` when `limit` is not given (SPEC §3.6).
const DEFAULT_LIMIT: u64 = 50;

/// Where the admin API listens, and the bearer token it asks for.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: std::net::SocketAddr,
    /// Required when `listen` is not loopback (checked by `config`).
    pub token: Option<crate::secret::Secret>,
}

pub struct Admin {
    pub queue: Arc<Store>,
    pub metrics: Arc<metrics::Metrics>,
    pub token: Option<Secret>,
    pub accepting: Arc<AtomicBool>,
    /// The address the admin API is bound to: its own origin.
    pub listen: std::net::SocketAddr,
    /// The relay's destinations (SPEC §7), as last (re)loaded.
    pub destinations: Arc<crate::current::Current<crate::destination::DestinationSet>>,
    /// The running pools' lines: a pause told here, a wake for jobs made ready.
    pub board: crate::delivery::PoolBoard,
    /// Every destination the embedded store had at start, every one the
    /// file has given since (as the admin saw them: `names_shown`), and
    /// every one a reload removed.
    pub known: std::sync::Mutex<std::collections::BTreeSet<DestinationName>>,
}

impl Admin {
    /// Destinations the embedded store has (at start and at each reload),
    /// and those a reload removed: one the file lacks is shown while it
    /// holds jobs or keys.
    pub fn remember(&self, names: Vec<DestinationName>) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.extend(names);
    }

    /// The destinations in force, and those the file no longer gives (a
    /// reload removed them, or the store had them at start): such a
    /// destination keeps its jobs and its held keys in the store (SPEC §7:
    /// listed until an operator acts), so it is shown while it has any.
    fn names_shown(
        &self,
    ) -> (
        Arc<crate::destination::DestinationSet>,
        Vec<DestinationName>,
    ) {
        let current = self.destinations.get();
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.extend(current.list.iter().map(|d| d.name.clone()));
        let gone = known
            .iter()
            .filter(|n| current.get(n).is_none())
            .cloned()
            .collect();
        (current, gone)
    }
}

pub fn router(state: Arc<Admin>) -> Router {
    let admin = Router::new()
        .route("/admin/queue", get(queue_counts))
        .route("/admin/jobs", get(list_jobs))
        .route("/admin/jobs/retry", post(retry_all))
        .route("/admin/jobs/{id}", get(show_job).delete(remove_job))
        .route("/admin/jobs/{id}/retry", post(retry_job))
        .route("/admin/destinations", get(list_destinations))
        .route("/admin/history", get(history))
        .route("/admin/destinations/{name}/pause", post(pause))
        .route("/admin/destinations/{name}/resume", post(resume))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(dashboard_html))
        .route("/dashboard.js", get(dashboard_js))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(ready))
        .route("/metrics", get(prometheus))
        .merge(admin)
        .fallback(|| async { err(StatusCode::NOT_FOUND, "Not found") })
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

fn err(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

/// Every error of the admin API is JSON, `{"error": ...}`: axum's own
/// answers (a query or a path it cannot read, a wrong method), plain text or
/// empty, are rewritten here, their other headers (`Allow`) kept. Outside
/// the routes' token and origin checks, which answer first.
async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let resp = next.run(req).await;
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !resp.status().is_client_error() || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let msg = match String::from_utf8_lossy(&text).trim() {
        "" if parts.status == StatusCode::METHOD_NOT_ALLOWED => {
            format!("Method {method} is not allowed here (see the Allow header)")
        }
        "" => parts
            .status
            .canonical_reason()
            .unwrap_or("Bad request")
            .to_string(),
        t => t.to_string(),
    };
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut r = err(parts.status, &msg);
    r.headers_mut().extend(parts.headers);
    r
}

fn queue_error(e: QueueError) -> Response {
    let status = match e {
        QueueError::NotFound(_) | QueueError::UnknownDestination(_) => StatusCode::NOT_FOUND,
        QueueError::WrongState { .. } => StatusCode::CONFLICT,
        QueueError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    err(status, &e.to_string())
}

async fn require_token(State(s): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    match &s.token {
        Some(token) => {
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map_or("", |(_, t)| t.trim());
            let ok: bool = Sha256::digest(presented.as_bytes())
                .ct_eq(&Sha256::digest(token.expose().as_bytes()))
                .into();
            if !ok {
                let mut r = err(
                    StatusCode::UNAUTHORIZED,
                    "Missing or wrong bearer token (ADMIN_TOKEN)",
                );
                // RFC 9110: a 401 names the scheme it asks for.
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"cogrelay admin\""),
                );
                return r;
            }
        }
        None => {
            if let Err(why) = same_origin(req.headers(), s.listen) {
                return err(StatusCode::FORBIDDEN, &format!("Forbidden: {why}; without ADMIN_TOKEN the admin API answers only its own origin"));
            }
        }
    }
    next.run(req).await
}

/// Whether a request may come from a web page other than the admin's own
/// (CSRF) or through a name that resolves to loopback (DNS rebinding).
fn same_origin(
    headers: &header::HeaderMap,
    listen: std::net::SocketAddr,
) -> Result<(), &'static str> {
    let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or("\u{0}"));
    let own_host = |host: &str| {
        host == listen.to_string()
            || host.eq_ignore_ascii_case("localhost")
            || host.eq_ignore_ascii_case(&format!("localhost:{}", listen.port()))
    };
    let host = text(header::HOST);
    if host.is_some_and(|h| !own_host(h)) {
        return Err("Host is not the admin listen address or localhost");
    }
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        if !(site.eq_ignore_ascii_case("same-origin") || site.eq_ignore_ascii_case("none")) {
            return Err("a request from another site");
        }
    }
    if let Some(origin) = text(header::ORIGIN) {
        let own = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| own_host(o) && host.is_none_or(|h| h.eq_ignore_ascii_case(o)));
        if !own {
            return Err("Origin is not the admin's own");
        }
    }
    Ok(())
}

async fn ready(State(s): State<Arc<Admin>>) -> Response {
    if !s.accepting.load(Ordering::Relaxed) {
        return err(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    if !s.metrics.delivery_up() {
        return err(
            StatusCode::SERVICE_UNAVAILABLE,
            "the delivery pool is not running",
        );
    }
    match s.queue.ping().await {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// The dashboard: static, compiled into the binary; its data calls go to the
/// admin API (with the bearer token when ADMIN_TOKEN is set). The CSP lets only
/// the dashboard's own script run: markup inside a payload stays text.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

async fn dashboard_html() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

async fn dashboard_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        include_str!("dashboard.js"),
    )
        .into_response()
}

async fn prometheus(State(s): State<Arc<Admin>>) -> Response {
    // Every destination's held keys: a key held while it was stored with
    // "hold" stays held after a reload changed the setting or removed it.
    // Read side by side, and beside the counts: a Redis that does not answer
    // costs the scrape one bound (2 s), not one per destination (a scrape
    // has 10 s by default).
    let (current, gone) = s.names_shown();
    let names = current.list.iter().map(|d| d.name.clone()).chain(gone);
    let held = each_destination(s.queue.clone(), names, |queue, name| async move {
        queue.held_keys(&name, crate::queue::HELD_KEYS_SHOWN).await
    });
    // Queue gauges are read at scrape time; counters still render when the queue is down.
    let (held, counts) = tokio::join!(held, s.queue.counts_for(None));
    for (name, held) in held {
        if let Ok(held) = held {
            s.metrics.held_keys(&name, held.len());
        }
    }
    let counts = counts.ok();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(
            counts.as_ref(),
            &s.queue.durability_risks(),
            s.queue.store_bytes(),
        ),
    )
        .into_response()
}

async fn queue_counts(State(s): State<Arc<Admin>>) -> Response {
    match s.queue.counts_for(None).await {
        Ok(c) => Json(c).into_response(),
        Err(e) => queue_error(e),
    }
}

/// A parameter the route does not know is refused: a misspelt
/// `destination` must not widen a bulk retry to every destination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    destination: Option<String>,
    offset: Option<String>,
    limit: Option<String>,
}

async fn list_jobs(State(s): State<Arc<Admin>>, Query(q): Query<ListQuery>) -> Response {
    let listing = match Listing::parse(
        q.state.as_deref(),
        q.offset.as_deref(),
        q.limit.as_deref(),
        DEFAULT_LIMIT,
    )
    .and_then(|l| l.with_destination(q.destination.as_deref()))
    {
        Ok(l) => l,
        Err(e) => return err(StatusCode::BAD_REQUEST, &e.explain("")),
    };
    if let Some(d) = &listing.destination {
        if let Err(r) = known_destination(&s, d).await {
            return r;
        }
    }
    match s
        .queue
        .list_for(
            listing.state,
            listing.destination.as_ref(),
            listing.offset,
            listing.limit,
        )
        .await
    {
        Ok(page) => Json(listing.answer(&page)).into_response(),
        Err(e) => queue_error(e),
    }
}

async fn show_job(State(s): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    match s.queue.get(&id).await {
        Ok(job) => Json(job).into_response(),
        Err(e) => queue_error(e),
    }
}

async fn retry_job(State(s): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    let destination = destination_of(&s, &id).await;
    match s.queue.retry(&id).await {
        Ok(()) => {
            s.board.wake(destination.as_ref());
            let mut answer = json!({ "retried": 1, "jobId": id });
            let gone: Vec<_> = destination
                .into_iter()
                .filter(|d| !configured(&s, d))
                .collect();
            if let Some(w) = waiting_for(&gone) {
                answer["warning"] = w.into();
            }
            Json(answer).into_response()
        }
        Err(e) => queue_error(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryAllQuery {
    state: Option<String>,
    destination: Option<String>,
}

async fn retry_all(State(s): State<Arc<Admin>>, Query(q): Query<RetryAllQuery>) -> Response {
    if q.state.as_deref().is_some_and(|st| st != "failed") {
        return err(StatusCode::BAD_REQUEST, "only state=failed can be retried");
    }
    let destination = match crate::listing::destination(q.destination.as_deref()) {
        Ok(d) => d,
        Err(e) => return err(StatusCode::BAD_REQUEST, &e.explain("")),
    };
    if let Some(d) = &destination {
        if let Err(r) = known_destination(&s, d).await {
            return r;
        }
    }
    match s.queue.retry_all_failed_for(destination.as_ref()).await {
        Ok(n) => {
            s.board.wake(destination.as_ref());
            let mut answer = json!({ "retried": n });
            let gone = match &destination {
                _ if n == 0 => Vec::new(),
                Some(d) => Vec::from_iter((!configured(&s, d)).then(|| d.clone())),
                None => unconfigured_with_waiting(&s).await,
            };
            if let Some(w) = waiting_for(&gone) {
                answer["warning"] = w.into();
            }
            Json(answer).into_response()
        }
        Err(e) => {
            // Some may have moved (a queue left out, a store error midway).
            s.board.wake(destination.as_ref());
            queue_error(e)
        }
    }
}

async fn remove_job(State(s): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    let destination = destination_of(&s, &id).await;
    match s.queue.remove(&id).await {
        Ok(()) => {
            // A removed job may have held its ordered key's later jobs.
            s.board.wake(destination.as_ref());
            Json(json!({ "removed": 1, "jobId": id })).into_response()
        }
        Err(e) => queue_error(e),
    }
}

fn configured(s: &Admin, d: &DestinationName) -> bool {
    s.destinations.get().get(d).is_some()
}

/// The destinations the queue has jobs of that this relay's configuration
/// lacks, with jobs waiting (after a retry of every destination's dead
/// letters): read side by side, a Redis that does not answer costing one
/// bound; none when they cannot be read.
async fn unconfigured_with_waiting(s: &Admin) -> Vec<DestinationName> {
    let Ok(names) = s.queue.destination_names().await else {
        return Vec::new();
    };
    let names = names.into_iter().filter(|d| !configured(s, d));
    let waiting = each_destination(s.queue.clone(), names, |queue, d| async move {
        queue
            .counts_for(Some(&d))
            .await
            .is_ok_and(|c| c.waiting > 0)
    });
    let mut gone: Vec<_> = waiting
        .await
        .into_iter()
        .filter(|(_, w)| *w)
        .map(|(d, _)| d)
        .collect();
    gone.sort();
    gone
}

/// `read` of each destination, side by side (a Redis that does not answer
/// costs the caller one bound, not one per destination); in no order, and
/// without a read that panicked.
async fn each_destination<T, F, Fut>(
    queue: Arc<Store>,
    names: impl IntoIterator<Item = DestinationName>,
    read: F,
) -> Vec<(DestinationName, T)>
where
    F: Fn(Arc<Store>, DestinationName) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut reads = tokio::task::JoinSet::new();
    for name in names {
        let answer = read(queue.clone(), name.clone());
        reads.spawn(async move { (name, answer.await) });
    }
    let mut out = Vec::new();
    while let Some(read) = reads.join_next().await {
        out.extend(read.ok());
    }
    out
}

/// What a retry's answer adds when its jobs' destinations are not in the
/// running configuration (a reload removed or renamed them, or the relay
/// started without them): they stay retryable (SPEC §7), but wait until
/// destinations of those names are back.
fn waiting_for(gone: &[DestinationName]) -> Option<String> {
    let names: Vec<_> = gone.iter().map(|d| d.to_string()).collect();
    match names.as_slice() {
        [] => None,
        [d] => Some(format!("destination {d} is not in this relay's running configuration: its jobs wait until a destination named {d} is added back, here or on a relay sharing the queue (or remove them)")),
        _ => Some(format!("destinations {} are not in this relay's running configuration: their jobs wait until destinations of those names are added back, here or on a relay sharing the queue (or remove them)", names.join(", "))),
    }
}

/// The destination of job `id`, whose pools a retry or a removal wakes;
/// `None` (every pool) when it cannot be read. A job keeps its destination
/// (a bundle's slot is read as its own job), so the read may come first.
async fn destination_of(s: &Admin, id: &str) -> Option<DestinationName> {
    s.queue.get(id).await.ok().map(|job| job.destination)
}

/// 404 for a destination that is neither configured nor in the queue (an
/// operator's typo: on Redis it would otherwise open a queue for it).
async fn known_destination(s: &Admin, name: &DestinationName) -> Result<(), Response> {
    if s.destinations.get().get(name).is_some() {
        return Ok(());
    }
    match s.queue.destination_names().await {
        Ok(names) if names.contains(name) => Ok(()),
        Ok(_) => Err(queue_error(QueueError::UnknownDestination(
            name.to_string(),
        ))),
        Err(e) => Err(queue_error(e)),
    }
}

/// `GET /admin/destinations` (SPEC §7): each destination with its URL (no
/// credentials), circuit, pause, job counts and limits, its ordering and the
/// keys it holds (`{key, jobId, sinceMs}`, oldest first).
async fn list_destinations(State(s): State<Arc<Admin>>) -> Response {
    let (destinations, gone) = s.names_shown();
    // Every destination's state read at once: a Redis that does not answer
    // costs the list one bound (2 s), not one per destination (queues still
    // to be opened open side by side).
    let mut reads = tokio::task::JoinSet::new();
    for (i, d) in destinations.list.iter().enumerate() {
        let (queue, name) = (s.queue.clone(), d.name.clone());
        reads.spawn(async move { (i, queue.destination_state(&name).await) });
    }
    let mut states: Vec<Option<crate::queue::QueueResult<_>>> =
        destinations.list.iter().map(|_| None).collect();
    while let Some(read) = reads.join_next().await {
        if let Ok((i, state)) = read {
            states[i] = Some(state);
        }
    }
    let mut out = Vec::with_capacity(destinations.list.len());
    // One whose queue cannot be read now (on Redis, a queue that cannot be
    // opened) is shown with why; the list fails only if none can be read.
    let mut unread: Option<String> = None;
    for (d, state) in destinations.list.iter().zip(states) {
        let state = state.unwrap_or_else(|| Err(QueueError::Unavailable("not read".into())));
        let (counts, paused, held_keys, error) = match state {
            Ok((counts, paused, held)) => (json!(counts), json!(paused), json!(held), None),
            Err(e) => {
                let why = e.to_string();
                unread.get_or_insert_with(|| why.clone());
                (Value::Null, Value::Null, Value::Null, Some(why))
            }
        };
        let mut entry = json!({
            "name": d.name,
            "configured": true,
            "ordering": d.delivery.ordering.as_ref().map_or("none", |_| "session"),
            "held_keys": held_keys,
            "url": crate::secret::mask_url(&d.delivery.target),
            "circuit": s.metrics.circuit_state(&d.name),
            "paused": paused,
            "counts": counts,
            "rate_limit": d.delivery.rate_limit,
            "concurrency": d.delivery.concurrency,
        });
        // While open: when the next trial is due (SPEC §7).
        if let Some(at) = s.metrics.next_trial_at(&d.name) {
            entry["next_probe_at"] = json!(crate::time::rfc3339(at));
        }
        if let Some(why) = error {
            entry["error"] = json!(why);
        }
        out.push(entry);
    }
    if let Some(why) = unread.filter(|_| out.iter().all(|d| d.get("error").is_some())) {
        return err(StatusCode::SERVICE_UNAVAILABLE, &why);
    }
    // One that cannot be read (unknown to a Redis registry, a blip) is left
    // out, not the whole list.
    for name in gone {
        match removed_destination(&s, &name).await {
            Ok(Some(entry)) => out.push(entry),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(destination = %name, error = %e, "removed destination not shown")
            }
        }
    }
    Json(out).into_response()
}

/// A destination the file no longer gives, while the store has unfinished
/// jobs of it or a key it holds: no URL, circuit or limits (no pool
/// delivers it).
async fn removed_destination(
    s: &Admin,
    name: &DestinationName,
) -> Result<Option<Value>, QueueError> {
    let (counts, paused, held_keys) = s.queue.destination_state(name).await?;
    let unfinished = counts.waiting + counts.active + counts.delayed + counts.failed;
    if unfinished == 0 && held_keys.is_empty() {
        return Ok(None);
    }
    Ok(Some(json!({
        "name": name,
        "configured": false,
        "ordering": null,
        "held_keys": held_keys,
        "url": null,
        "circuit": null,
        "paused": paused,
        "counts": counts,
    })))
}

async fn pause(State(s): State<Arc<Admin>>, Path(name): Path<String>) -> Response {
    set_paused(&s, &name, true).await
}

async fn resume(State(s): State<Arc<Admin>>, Path(name): Path<String>) -> Response {
    set_paused(&s, &name, false).await
}

async fn set_paused(s: &Admin, name: &str, paused: bool) -> Response {
    let Some(name) = DestinationName::parse(name) else {
        return err(
            StatusCode::NOT_FOUND,
            &format!("no destination {name:?}: GET /admin/destinations lists them"),
        );
    };
    // The file's, or the queue's: on Redis one only another relay's file
    // gives is paused for every relay, as the command line does.
    if let Err(r) = known_destination(s, &name).await {
        return r;
    }
    let name = &name;
    if let Err(e) = s.queue.set_paused(name, paused).await {
        return queue_error(e);
    }
    // This relay's pools stop starting before the answer; on a store other
    // relays share, the answer waits out their pause lease too (SPEC §7:
    // once a pause is answered, no new attempt starts on any relay).
    s.board.tell(name, paused).await;
    if paused && s.queue.shared_by_relays() {
        tokio::time::sleep(s.queue.pause_lease() + PAUSE_MARGIN).await;
    }
    tracing::info!(destination = %name, paused, "destination {}", if paused { "paused" } else { "resumed" });
    Json(json!({ "name": name, "paused": paused })).into_response()
}

/// `GET /admin/history`: what happened in each 10 s of the last hour (kept by
/// the relay, so a dashboard opened during an incident shows what came
/// before), the last point being the interval in progress.
async fn history(State(s): State<Arc<Admin>>) -> Response {
    Json(json!({
        "intervalSecs": metrics::HISTORY_EVERY.as_secs(),
        "points": s.metrics.history(),
    }))
    .into_response()
}
