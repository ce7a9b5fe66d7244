//! `cogrelay sim`: a local Cognigy API simulator (SPEC §6), in memory.
//!
//! (Over 600 lines: both Cognigy APIs' routes share one in-memory state and
//! one gatekeeper for faults and rate limits; split by API, every piece of
//! state would be shared across files.)
//!
//! Serves both APIs `register` and `serve` call, so everything can be tried
//! without a Cognigy account, and the project's tests run against it:
//!
//! | route | behaviour |
//! |---|---|
//! | `POST /api/v1/auth/token`, `/auth/oauth2/token` (and the seed's `/api/v2/oauth/token`) | client credentials (Basic); `{access_token, expires_in}` |
//! | `POST /api/v1/connectors` | needs `Idempotency-Key`: 201 the first time, 409 with the same connector for 24 h |
//! | `GET /api/v1/connectors/{id}` | `pending` until polled `pending_polls` times, then `active` |
//! | `GET /api/v1/connectors?limit&offset` | `{items, total, limit, offset}` |
//! | `GET /api/v2/bots/{bot}/events/{event}` | 200; 404 for event ids starting with `unknown` |
//! | `GET/POST /new/v2.0/endpoints`, `GET /new/v2.0/endpoints/{id}` | REST endpoints; `active` after `pending_polls` polls |
//! | `POST /events`, `POST /gateway` | a target sink and a gateway-callback receiver (both recorded) |
//! | `GET /sim/stats`, `POST /sim/faults` | what the sim saw; inject failures (`{path, method?, status, times}`) |
//!
//! Auth: with `client_id`/`client_secret` set only those are accepted, else any
//! non-empty pair; API calls need a live bearer token, or (REST) an `X-API-Key`
//! (the configured one, or any when none is set). Each client (token's client id,
//! API key, else "anonymous") may make `rate_limit` requests per rolling window;
//! past that it gets 429 with `Retry-After`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cognigy::RateLimit;
use crate::secret::Secret;
use crate::time::now_ms;

#[derive(Debug, Clone)]
pub struct SimOptions {
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub api_key: Option<Secret>,
    pub token_ttl: Duration,
    /// Polls a connector/endpoint answers "pending" before it turns active.
    pub pending_polls: u32,
    pub rate_limit: RateLimit,
    pub idempotency_ttl: Duration,
    /// `expires_in` to announce, when it should differ from `token_ttl` (a
    /// server whose tokens die early, to exercise refresh-on-401).
    pub advertised_token_ttl: Option<Duration>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            client_id: None,
            client_secret: None,
            api_key: None,
            token_ttl: Duration::from_secs(3600),
            pending_polls: 2,
            rate_limit: RateLimit::REGISTER,
            idempotency_ttl: Duration::from_secs(86_400),
            advertised_token_ttl: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    /// Requests whose path starts with this are affected.
    pub path: String,
    #[serde(default)]
    pub method: Option<String>,
    pub status: u16,
    #[serde(default = "one")]
    pub times: u32,
    /// Run the request first, then answer `status` (the work is done but the
    /// caller never hears of it, like a connection dropped after the commit).
    #[serde(default)]
    pub after: bool,
    /// A `Location` header for the answer (a redirect).
    #[serde(default)]
    pub location: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Default)]
struct Inner {
    tokens: HashMap<String, (String, Instant)>,
    connectors: Vec<(Value, u32)>,
    idempotency: HashMap<String, (usize, Instant)>,
    endpoints: Vec<(Value, u32)>,
    windows: HashMap<String, VecDeque<Instant>>,
    faults: Vec<Fault>,
    token_requests: u64,
    requests: u64,
    rate_limited: u64,
    event_lookups: u64,
    events_received: Vec<Value>,
    gateway_calls: Vec<Value>,
    /// The SHA-256 (hex) of each connector's signing secret, as received:
    /// what a test compares, never the secret itself.
    signing_secret_digests: Vec<String>,
    /// The path of every request, as sent (still percent-encoded).
    paths: Vec<String>,
    /// Status of every answered API request, per client, in order.
    statuses: HashMap<String, Vec<u16>>,
}

#[derive(Debug)]
pub struct Sim {
    opts: SimOptions,
    inner: Mutex<Inner>,
}

impl Sim {
    pub fn new(opts: SimOptions) -> Arc<Self> {
        Arc::new(Self {
            opts,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a fault (same as `POST /sim/faults`).
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// What the simulator has seen (same as `GET /sim/stats`).
    pub fn stats(&self) -> Value {
        let s = self.lock();
        json!({
            "tokenRequests": s.token_requests,
            "requests": s.requests,
            "rateLimited": s.rate_limited,
            "eventLookups": s.event_lookups,
            "connectors": s.connectors.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>(),
            "endpoints": s.endpoints.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>(),
            "eventsReceived": s.events_received.len(),
            "gatewayCalls": s.gateway_calls,
            "signingSecretSha256": s.signing_secret_digests,
            "statuses": s.statuses,
            "paths": s.paths,
        })
    }
}

/// Serves the simulator on `listener` until the runtime ends.
pub async fn serve(listener: tokio::net::TcpListener, sim: Arc<Sim>) -> std::io::Result<()> {
    axum::serve(listener, router(sim)).await
}

/// Binds 127.0.0.1 on a free port and serves in the background (tests).
pub async fn spawn(opts: SimOptions) -> std::io::Result<(SocketAddr, Arc<Sim>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sim = Sim::new(opts);
    tokio::spawn(serve(listener, sim.clone()));
    Ok((addr, sim))
}

pub fn router(sim: Arc<Sim>) -> Router {
    let api = Router::new()
        .route("/api/v1/auth/token", post(token))
        .route("/auth/oauth2/token", post(token))
        .route("/api/v2/oauth/token", post(token))
        .route(
            "/api/v1/connectors",
            post(create_connector).get(list_connectors),
        )
        .route("/api/v1/connectors/{id}", get(get_connector))
        .route("/api/v2/bots/{bot}/events/{event}", get(get_event))
        .route(
            "/new/v2.0/endpoints",
            post(create_endpoint).get(list_endpoints),
        )
        .route("/new/v2.0/endpoints/{id}", get(get_endpoint))
        .route("/events", post(sink))
        .route("/gateway", post(gateway))
        .layer(middleware::from_fn_with_state(sim.clone(), gatekeeper));
    Router::new()
        .route(
            "/sim/stats",
            get(|State(s): State<Arc<Sim>>| async move { Json(s.stats()) }),
        )
        .route("/sim/faults", post(add_fault))
        .merge(api)
        .fallback(|| async {
            err(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route in the Cognigy simulator",
            )
        })
        .with_state(sim)
}

fn err(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

/// Who is calling: the client id behind a bearer token or Basic credentials,
/// the API key, else "anonymous".
fn client_of(sim: &Sim, headers: &HeaderMap) -> String {
    if let Some(id) = basic(headers).map(|(id, _)| id) {
        return id;
    }
    if let Some(t) = bearer(headers) {
        if let Some((client, _)) = sim.lock().tokens.get(&t) {
            return client.clone();
        }
    }
    if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return format!("key:{}", &k[..k.len().min(4)]);
    }
    "anonymous".into()
}

/// Counting, injected faults and the per-client rate limit, before any route.
async fn gatekeeper(State(sim): State<Arc<Sim>>, req: Request, next: Next) -> Response {
    let client = client_of(&sim, req.headers());
    let path = req.uri().path().to_string();
    let method = req.method().as_str().to_string();
    let (early, fault_after) = {
        let mut s = sim.lock();
        s.requests += 1;
        s.paths.push(path.clone());
        let fault = s.faults.iter_mut().find(|f| {
            f.times > 0
                && path.starts_with(&f.path)
                && f.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(&method))
        });
        let fault = fault.map(|f| {
            f.times -= 1;
            (f.status, f.after, f.location.clone())
        });
        s.faults.retain(|f| f.times > 0);
        match fault {
            Some((status, false, location)) => (Some(injected(status, location)), None),
            Some((status, true, _)) => (None, Some(status)),
            None => (rate_limited(&sim, &mut s, &client), None),
        }
    };
    let resp = match early {
        Some(r) => r,
        None => {
            let r = next.run(req).await;
            fault_after.map(|s| injected(s, None)).unwrap_or(r)
        }
    };
    sim.lock()
        .statuses
        .entry(client)
        .or_default()
        .push(resp.status().as_u16());
    resp
}

fn injected(status: u16, location: Option<String>) -> Response {
    let mut r = err(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        "injected",
        "fault injected by /sim/faults",
    );
    if let Some(v) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if matches!(status, 429 | 503) {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// Records the request in the client's window, or answers 429 when it is full.
fn rate_limited(sim: &Sim, s: &mut Inner, client: &str) -> Option<Response> {
    let now = Instant::now();
    let limit = sim.opts.rate_limit;
    let window = s.windows.entry(client.to_string()).or_default();
    while window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= limit.per)
    {
        window.pop_front();
    }
    if (window.len() as u32) < limit.max {
        window.push_back(now);
        return None;
    }
    let wait = window
        .front()
        .map(|t| limit.per.saturating_sub(now.duration_since(*t)))
        .unwrap_or(limit.per);
    s.rate_limited += 1;
    let mut r = err(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        &format!("more than {} requests in {:?}", limit.max, limit.per),
    );
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    Some(r)
}

fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let (id, secret) = std::str::from_utf8(&raw).ok()?.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(str::to_owned)
}

async fn token(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: String) -> Response {
    sim.lock().token_requests += 1;
    let form: HashMap<String, String> = body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.replace('+', " ").replace("%3A", ":").replace("%3a", ":"),
            )
        })
        .collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return err(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be client_credentials (form-urlencoded)",
        );
    }
    let Some((id, secret)) = basic(&headers) else {
        return err(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication (HTTP Basic) is required",
        );
    };
    let id_ok = sim.opts.client_id.as_ref().is_none_or(|want| *want == id) && !id.is_empty();
    let secret_ok = sim
        .opts
        .client_secret
        .as_ref()
        .is_none_or(|want| want.expose() == secret)
        && !secret.is_empty();
    if !(id_ok && secret_ok) {
        return err(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client id or secret is wrong",
        );
    }
    let value = format!("sim-{}", uuid::Uuid::new_v4().simple());
    sim.lock()
        .tokens
        .insert(value.clone(), (id, Instant::now() + sim.opts.token_ttl));
    Json(json!({
        "access_token": value,
        "token_type": "Bearer",
        "expires_in": sim.opts.advertised_token_ttl.unwrap_or(sim.opts.token_ttl).as_secs(),
        "scope": form.get("scope").cloned().unwrap_or_default(),
    }))
    .into_response()
}

/// A live bearer token, or (REST) an accepted API key. (A large `Err`: it is
/// the finished 401 answer, built once per refused call in the simulator.)
#[allow(clippy::result_large_err)]
fn authorized(sim: &Sim, headers: &HeaderMap, api_key_ok: bool) -> Result<(), Response> {
    if let Some(t) = bearer(headers) {
        return match sim.lock().tokens.get(&t) {
            Some((_, exp)) if Instant::now() < *exp => Ok(()),
            Some(_) => Err(err(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the access token has expired",
            )),
            None => Err(err(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "unknown access token",
            )),
        };
    }
    if api_key_ok {
        if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            let ok = !k.is_empty()
                && sim
                    .opts
                    .api_key
                    .as_ref()
                    .is_none_or(|want| want.expose() == k);
            return if ok {
                Ok(())
            } else {
                Err(err(
                    StatusCode::UNAUTHORIZED,
                    "invalid_api_key",
                    "the API key is wrong",
                ))
            };
        }
    }
    Err(err(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a bearer token is required",
    ))
}

/// Counts a poll of a connector/endpoint and turns it active after enough polls.
fn poll(entry: &mut (Value, u32), pending_polls: u32, rest: bool) -> Value {
    entry.1 += 1;
    if entry.1 > pending_polls {
        if rest {
            entry.0["active"] = json!(true);
        } else {
            entry.0["status"] = json!("active");
        }
    }
    entry.0.clone()
}

async fn create_connector(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorized(&sim, &headers, false) {
        return r;
    }
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
    else {
        return err(
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
            "the Idempotency-Key header is required",
        );
    };
    let Ok(Value::Object(payload)) = serde_json::from_slice::<Value>(&body) else {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body must be a JSON object",
        );
    };
    for field in ["name", "endpointUrl"] {
        if !payload.get(field).is_some_and(Value::is_string) {
            return err(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_connector",
                &format!("{field} is required"),
            );
        }
    }
    let mut s = sim.lock();
    let now = Instant::now();
    if let Some((idx, at)) = s.idempotency.get(key) {
        if now.duration_since(*at) < sim.opts.idempotency_ttl {
            let existing = s.connectors[*idx].0.clone();
            return (StatusCode::CONFLICT, Json(json!({ "error": "conflict", "error_description": "a connector was already created with this Idempotency-Key", "connector": existing }))).into_response();
        }
    }
    let id = format!("conn_{}", s.connectors.len() + 1);
    let mut connector = Value::Object(payload);
    if let Some(signing) = connector
        .get_mut("requestSigning")
        .and_then(Value::as_object_mut)
    {
        // Never echoed back; its digest is kept for the tests.
        if let Some(Value::String(secret)) = signing.remove("secret") {
            use sha2::Digest as _;
            let digest = hex::encode(sha2::Sha256::digest(secret.as_bytes()));
            s.signing_secret_digests.push(digest);
        }
    }
    connector["id"] = json!(id);
    connector["status"] = json!("pending");
    connector["createdAt"] = json!(now_ms());
    s.connectors.push((connector.clone(), 0));
    let idx = s.connectors.len() - 1;
    s.idempotency.insert(key.to_string(), (idx, now));
    (StatusCode::CREATED, Json(connector)).into_response()
}

#[derive(Debug, Deserialize)]
struct Paging {
    limit: Option<usize>,
    offset: Option<usize>,
    skip: Option<usize>,
    filter: Option<String>,
}

async fn list_connectors(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Query(p): Query<Paging>,
) -> Response {
    if let Err(r) = authorized(&sim, &headers, false) {
        return r;
    }
    let s = sim.lock();
    let (limit, offset) = (p.limit.unwrap_or(25).min(100), p.offset.unwrap_or(0));
    let items: Vec<Value> = s
        .connectors
        .iter()
        .skip(offset)
        .take(limit)
        .map(|(c, _)| c.clone())
        .collect();
    Json(json!({ "items": items, "total": s.connectors.len(), "limit": limit, "offset": offset }))
        .into_response()
}

async fn get_connector(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorized(&sim, &headers, false) {
        return r;
    }
    let pending = sim.opts.pending_polls;
    let mut s = sim.lock();
    match s
        .connectors
        .iter_mut()
        .find(|(c, _)| c["id"] == id.as_str())
    {
        Some(entry) => Json(poll(entry, pending, false)).into_response(),
        None => err(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("connector {id} not found"),
        ),
    }
}

async fn get_event(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path((bot, event)): Path<(String, String)>,
) -> Response {
    if let Err(r) = authorized(&sim, &headers, true) {
        return r;
    }
    sim.lock().event_lookups += 1;
    if event.starts_with("unknown") {
        return err(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("event {event} of bot {bot} not found"),
        );
    }
    Json(json!({ "botId": bot, "eventId": event, "status": "recorded" })).into_response()
}

async fn create_endpoint(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorized(&sim, &headers, true) {
        return r;
    }
    let Ok(Value::Object(payload)) = serde_json::from_slice::<Value>(&body) else {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body must be a JSON object",
        );
    };
    if !payload.get("name").is_some_and(Value::is_string)
        || payload.get("channel").and_then(Value::as_str) != Some("webhook")
    {
        return (StatusCode::BAD_REQUEST, Json(json!({ "title": "Bad Request", "status": 400, "detail": "name and channel \"webhook\" are required" }))).into_response();
    }
    let mut s = sim.lock();
    let mut endpoint = Value::Object(payload);
    endpoint["_id"] = json!(format!("{:024x}", s.endpoints.len() + 1));
    endpoint["active"] = json!(false);
    endpoint["createdAt"] = json!(now_ms());
    s.endpoints.push((endpoint.clone(), 0));
    (StatusCode::CREATED, Json(endpoint)).into_response()
}

async fn list_endpoints(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Query(p): Query<Paging>,
) -> Response {
    if let Err(r) = authorized(&sim, &headers, true) {
        return r;
    }
    let s = sim.lock();
    let matching: Vec<Value> = s
        .endpoints
        .iter()
        .map(|(e, _)| e.clone())
        .filter(|e| {
            p.filter
                .as_deref()
                .is_none_or(|f| e["name"].as_str().is_some_and(|n| n.contains(f)))
        })
        .collect();
    let (limit, skip) = (
        p.limit.unwrap_or(25).min(100),
        p.skip.or(p.offset).unwrap_or(0),
    );
    let items: Vec<Value> = matching.iter().skip(skip).take(limit).cloned().collect();
    Json(json!({ "items": items, "total": matching.len() })).into_response()
}

async fn get_endpoint(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorized(&sim, &headers, true) {
        return r;
    }
    let pending = sim.opts.pending_polls;
    let mut s = sim.lock();
    match s.endpoints.iter_mut().find(|(e, _)| e["_id"] == id.as_str()) {
        Some(entry) => Json(poll(entry, pending, true)).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({ "title": "Not Found", "status": 404, "detail": format!("endpoint {id} not found") }))).into_response(),
    }
}

async fn sink(State(sim): State<Arc<Sim>>, body: axum::body::Bytes) -> Response {
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    // A local target for trying the relay: each delivery on one line.
    let shown = String::from_utf8_lossy(&body[..body.len().min(2000)]).into_owned();
    tracing::info!(bytes = body.len(), "target received: {shown}");
    sim.lock().events_received.push(v);
    Json(json!({ "received": true })).into_response()
}

async fn gateway(State(sim): State<Arc<Sim>>, body: axum::body::Bytes) -> Response {
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    sim.lock().gateway_calls.push(v);
    Json(json!({ "ok": true })).into_response()
}

async fn add_fault(State(sim): State<Arc<Sim>>, Json(f): Json<Fault>) -> Response {
    sim.inject(f);
    (StatusCode::CREATED, Json(json!({ "ok": true }))).into_response()
}
