//! HTTP receive (SPEC §3.1): `POST /api/webhook/cognigy`.
//!
//! Checks run cheapest first, and nothing is stored until all pass:
//! accepting? (503 while shutting down) → the sender's rate (429) →
//! declared size (413) → content type (415) → credentials, when no
//! signature is to be checked (401) → body read within `MAX_BODY_BYTES`
//! (413) → signature (401) →
//! JSON shape and fields (400) → envelope timestamp inside the replay window
//! (401) → durable enqueue (200 `accepted`/`duplicate`,
//! or 503 `Queue unavailable` with `Retry-After`).

pub mod auth;
pub(crate) mod body;
pub mod envelope;
pub(crate) mod ratelimit;
pub(crate) mod refusals;
pub(crate) mod rejections;

/// What a piece of code logs, for the unit tests of the log lines.
#[cfg(test)]
pub(crate) mod test_log {
    use std::sync::{Arc, Mutex};

    /// What `f` logs, one string per line.
    pub(crate) fn logged(f: impl FnOnce()) -> Vec<String> {
        let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Writer(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&buf.lock().expect("buf")).into_owned();
        text.lines().map(str::to_owned).collect()
    }

    struct Writer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Writer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buf").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use crate::current::Current;
use crate::destination::{DestinationSet, OUTPUT_TYPE};
use crate::event::{Event, EventKind};
use crate::metrics::Metrics;
use crate::queue::{OrderKey, Recipient, Routed, Store};
use auth::Authenticator;
use envelope::EnvelopeError;

pub const PATH: &str = "/api/webhook/cognigy";
/// Seconds a sender is asked to wait after a 503.
const RETRY_AFTER_SECS: &str = "5";

/// The ingress's settings (SPEC §3.1): where it listens, who may post, and
/// the limits a request must keep.
#[derive(Debug, Clone)]
pub struct IngressSettings {
    pub port: u16,
    /// Any of these may sign a request (rotation); never empty when set.
    pub signing_secrets: Vec<crate::secret::Secret>,
    pub basic: Option<auth::BasicCredentials>,
    /// No authentication at all (local testing only).
    pub allow_unauthenticated: bool,
    pub max_body_bytes: usize,
    /// Per-source limit: (events per second, burst); None = off.
    pub rate_limit: Option<(f64, u32)>,
    /// Longest a client may take to send a request's headers, and its body.
    pub request_read_timeout: std::time::Duration,
    /// Certificate chain and key (PEM files) for HTTPS.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Which destinations want which events (SPEC §7), and each one's pool:
/// direct handoff of new jobs when it has room, else a wake-up of its
/// dispatcher.
#[derive(Debug)]
pub struct Routing {
    pub destinations: DestinationSet,
    pub lanes: crate::delivery::handoff::LaneSet,
}

pub struct Ingress {
    pub queue: Arc<Store>,
    pub auth: Authenticator,
    pub max_body_bytes: usize,
    /// Memory all bodies together may hold beyond their free allowance.
    pub body_budget: body::BodyBudget,
    /// Longest the body may take to arrive (408 after).
    pub body_timeout: std::time::Duration,
    /// False once shutdown began: new requests get 503.
    pub accepting: Arc<AtomicBool>,
    /// Which destinations want which events, and their pools (swapped whole
    /// on a reload).
    pub routing: Current<Routing>,
    pub metrics: Arc<Metrics>,
    /// Per-source rate limit; None = off.
    pub rate_limit: Option<ratelimit::RateLimiter>,
    /// Refusals while the queue is unavailable, logged without a flood.
    pub refusals: refusals::Refusals,
    /// Requests refused (401, 413, 415, 400, 408, 429; 503 for want of body room), logged without a flood.
    pub rejections: rejections::Rejections,
    /// How far an envelope's `timestamp` may lie from now.
    pub replay_window: ReplayWindow,
}

/// The replay window of SPEC §3.1: an envelope dated older than the dedup TTL
/// (its dedup record may be gone, so a replay would be a new job) or further
/// ahead than [`ReplayWindow::AHEAD`] is refused. With dedup off
/// (`DEDUP_TTL_SECS=0`) the past bound is [`ReplayWindow::AHEAD`] too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayWindow {
    pub behind: std::time::Duration,
    pub ahead: std::time::Duration,
}

impl ReplayWindow {
    /// Clock skew tolerated ahead of now (Standard Webhooks' tolerance).
    pub const AHEAD: std::time::Duration = std::time::Duration::from_secs(300);

    pub fn for_dedup_ttl(ttl: std::time::Duration) -> Self {
        Self {
            behind: if ttl.is_zero() { Self::AHEAD } else { ttl },
            ahead: Self::AHEAD,
        }
    }

    pub fn admits(&self, timestamp_ms: i64, now_ms: i64) -> bool {
        let age = i128::from(now_ms) - i128::from(timestamp_ms);
        age <= self.behind.as_millis() as i128 && -age <= self.ahead.as_millis() as i128
    }
}

pub fn router(state: Arc<Ingress>) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        // HEAD answers 200 so `cogrelay register` (and Cognigy) can pre-flight the URL.
        .route(PATH, post(receive).head(|| async { StatusCode::OK }))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "Not found: events go to POST /api/webhook/cognigy",
            )
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("Method {method} is not allowed: events go to POST /api/webhook/cognigy"),
            )
        })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(metrics, track))
}

/// Counts every answer by status and times the acknowledgements.
async fn track(
    State(metrics): State<Arc<Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let t0 = std::time::Instant::now();
    let resp = next.run(req).await;
    metrics.ingress(resp.status().as_u16(), t0.elapsed());
    resp
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

fn unavailable(msg: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, msg);
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    r
}

/// The request's `Content-Length`, if it has a valid one.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.len() > 5
            && essence[essence.len() - 5..].eq_ignore_ascii_case("+json")
            && essence.contains('/'))
}

/// A `Content-Encoding` other than `identity` (as [`shown`]): the body is
/// not the JSON it was signed as, and the relay does not decompress (a
/// bomb would be read before the signature is checked).
fn content_coding(headers: &HeaderMap) -> Option<String> {
    let codings = headers.get_all(header::CONTENT_ENCODING);
    let coded = codings
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"));
    if coded {
        shown(codings)
    } else {
        None
    }
}

/// A header's values as a sender's hint shows them: joined, lossy, the
/// first 80 characters; `None` when it has none.
fn shown(values: header::GetAll<'_, HeaderValue>) -> Option<String> {
    let all: Vec<_> = values
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .collect();
    (!all.is_empty()).then(|| all.join(", ").chars().take(80).collect())
}

impl Ingress {
    /// Answers `status` with `msg`, and logs the refusal (bounded per kind).
    fn refuse(
        &self,
        peer: Option<std::net::SocketAddr>,
        kind: rejections::Kind,
        msg: &str,
        hint: Option<&str>,
    ) -> Response {
        self.rejections.refused(kind, peer, msg, hint);
        let status = StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::BAD_REQUEST);
        error(status, msg)
    }

    /// What the headers alone answer, in the order of the module doc: a
    /// refusal (given after [`Self::before_the_body`]), or, to go on,
    /// whether the credentials already let the request in (else its
    /// signature is checked against the body). Refused here, a sender
    /// without credentials takes no share of the body budget.
    fn at_the_headers(
        &self,
        peer: Option<std::net::SocketAddr>,
        headers: &HeaderMap,
        declared: Option<u64>,
    ) -> Result<bool, Box<Response>> {
        use rejections::Kind;
        if !self.accepting.load(Ordering::Relaxed) {
            return Err(Box::new(unavailable(
                "Queue unavailable: the relay is shutting down",
            )));
        }
        if let (Some(limiter), Some(peer)) = (&self.rate_limit, peer) {
            if let Err(wait) = limiter.check(peer.ip()) {
                let mut r = self.refuse(
                    Some(peer),
                    Kind::RateLimited,
                    "Too many requests from this address",
                    Some("INGRESS_RATE_LIMIT is per sender address"),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(wait));
                return Err(Box::new(r));
            }
        }
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(Box::new(self.too_large(peer)));
        }
        if !is_json(headers) {
            let hint = match shown(headers.get_all(header::CONTENT_TYPE)) {
                Some(ct) => format!("the request's Content-Type was {ct:?}"),
                None => "the request had no Content-Type".to_string(),
            };
            return Err(Box::new(self.refuse(
                peer,
                Kind::MediaType,
                "Content-Type must be application/json",
                Some(&hint),
            )));
        }
        if let Some(coding) = content_coding(headers) {
            return Err(Box::new(self.refuse(
                peer,
                Kind::MediaType,
                "Content-Encoding is not supported: send the JSON body uncompressed",
                Some(&format!("the request's Content-Encoding was {coding:?}")),
            )));
        }
        match self.auth.by_headers(headers) {
            Some(Err(e)) => Err(Box::new(self.unauthorized(peer, headers, e, &[]))),
            decided => Ok(decided.is_some()),
        }
    }

    fn too_large(&self, peer: Option<std::net::SocketAddr>) -> Response {
        self.refuse(
            peer,
            rejections::Kind::TooLarge,
            &format!(
                "Body exceeds MAX_BODY_BYTES ({} bytes)",
                self.max_body_bytes
            ),
            None,
        )
    }

    /// `answer`, given at the headers (503 while shutting down, 429, 413, 415, or
    /// a 401 of [`auth::Authenticator::by_headers`]), once the body was read
    /// for a moment and thrown away (`body::discard`): a sender that writes
    /// its whole body before it reads then hears it, where hyper would close
    /// the connection under its writes. Not a body that waits for `Expect:
    /// 100-continue` (reading it would ask the sender for it, and it has
    /// sent nothing a close could break), nor one declared longer than
    /// `MAX_BODY_BYTES` (a 413, or another answer to such a body: the
    /// discard would stop before its end, and the connection close under
    /// it anyway).
    async fn before_the_body(&self, headers: &HeaderMap, body: Body, answer: Response) -> Response {
        let waits = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waits && declared_length(headers).is_none_or(|n| n <= self.max_body_bytes as u64) {
            let wait = self.body_timeout.min(body::DISCARD_WAIT);
            let _ = tokio::time::timeout(wait, body::discard(body, self.max_body_bytes)).await;
        }
        answer
    }

    /// Answers 401 for `e`, logged with a hint (computed only if logged).
    fn unauthorized(
        &self,
        peer: Option<std::net::SocketAddr>,
        headers: &HeaderMap,
        e: auth::AuthError,
        body: &[u8],
    ) -> Response {
        let reason = e.to_string();
        self.rejections
            .refused_with(rejections::Kind::Unauthorized, peer, &reason, || {
                self.auth.hint(headers, body, e).map(str::to_owned)
            });
        error(StatusCode::UNAUTHORIZED, &reason)
    }
}

async fn receive(
    State(s): State<Arc<Ingress>>,
    peer: Option<axum::Extension<ratelimit::PeerAddr>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    use rejections::Kind;
    let peer = peer.map(|axum::Extension(p)| p.0);
    let declared = declared_length(&headers);
    let authenticated = match s.at_the_headers(peer, &headers, declared) {
        Ok(authenticated) => authenticated,
        // (boxed, so that the requests that go on do not carry its wait)
        Err(r) => return Box::pin(s.before_the_body(&headers, body, *r)).await,
    };
    let read = tokio::time::timeout(
        s.body_timeout,
        body::read(body, s.max_body_bytes, declared, &s.body_budget),
    )
    .await;
    let Ok(read) = read else {
        return s.refuse(
            peer,
            Kind::Timeout,
            "The request body did not arrive in time",
            None,
        );
    };
    // `_budget` holds this body's share of the memory budget until answered.
    let (bytes, _budget) = match read {
        Ok(body::Read { bytes, held }) => (bytes, held),
        Err(body::ReadError::TooLarge) => return s.too_large(peer),
        Err(body::ReadError::Broken) => {
            return s.refuse(
                peer,
                Kind::BadRequest,
                "Could not read the request body",
                None,
            )
        }
        Err(body::ReadError::NoRoom) => {
            let msg = "Too many large request bodies at once: retry shortly";
            let hint = format!(
                "bodies over {} KiB share {} MiB, held by other requests (before their signature is checked) for the last second",
                body::FREE_BYTES / 1024,
                s.body_budget.total_bytes() >> 20
            );
            s.rejections.refused(Kind::NoRoom, peer, msg, Some(&hint));
            return unavailable(msg);
        }
    };
    if !authenticated {
        if let Err(e) = s.auth.by_body(&headers, &bytes) {
            return s.unauthorized(peer, &headers, e, &bytes);
        }
    }
    let event = match envelope::parse(&bytes) {
        Ok(ev) => ev,
        Err(EnvelopeError::Missing(missing)) => {
            let hint = format!("missing: {}", missing.join(", "));
            s.rejections.refused(
                Kind::BadRequest,
                peer,
                "Missing required Cognigy webhook fields",
                Some(&hint),
            );
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": "Missing required Cognigy webhook fields", "missing": missing })),
            )
                .into_response();
        }
        Err(e) => return s.refuse(peer, Kind::BadRequest, &e.to_string(), None),
    };
    if let Some(ts) = event.timestamp_ms {
        let now = crate::time::now_ms();
        if !s.replay_window.admits(ts, now) {
            let age = (i128::from(now) - i128::from(ts)) / 1000;
            let hint = format!(
                "the envelope's timestamp is {age} s old; the window is {} s behind (DEDUP_TTL_SECS) \
                 and {} s ahead: check the sender's clock, or this is a replay",
                s.replay_window.behind.as_secs(),
                s.replay_window.ahead.as_secs()
            );
            return s.refuse(
                peer,
                Kind::ReplayWindow,
                "event timestamp outside the replay window",
                Some(&hint),
            );
        }
    }
    let routing = s.routing.get();
    let routes = routes(&routing.destinations, &event, &bytes);
    if routes.is_empty() {
        s.metrics.unrouted();
        return Json(json!({ "status": "unrouted" })).into_response();
    }
    match routing.lanes.store(&s.queue, event, routes).await {
        Ok(routed) => {
            // Reloaded while the event was stored: the pools it was stored
            // for were replaced, and the new ones are told.
            if let Some(now) = s.routing.replaced(&routing) {
                now.lanes.wake(routed.jobs.iter().map(|j| &j.destination));
            }
            if routed.duplicate {
                s.metrics.duplicate();
            }
            s.refusals.accepted();
            Json(answer(&routed, routing.destinations.file.is_some())).into_response()
        }
        Err(e) => {
            s.refusals.refused(&e);
            unavailable("Queue unavailable")
        }
    }
}

/// The destinations that want `event` (SPEC §7), in the file's order, each
/// with the key it delivers the event in order by (an ordered destination's
/// `ordering_key`). An endpoint output's type is `cognigy.output`; a
/// `where` condition and an ordering key are read along their pointers
/// alone, in the received document.
fn routes(destinations: &DestinationSet, event: &Event, bytes: &[u8]) -> Vec<Recipient> {
    let event_type = match event.kind {
        EventKind::EndpointOutput => OUTPUT_TYPE,
        EventKind::Envelope => event.event_type.as_deref().unwrap_or(""),
    };
    destinations
        .routes(event_type, event.bot_id.as_deref(), bytes)
        .map(|d| Recipient {
            destination: d.name.clone(),
            order: d
                .delivery
                .ordering
                .as_ref()
                .and_then(|o| order_key(o, event, bytes)),
        })
        .collect()
}

/// The key an ordered destination delivers this event in order by: the
/// value at its `ordering_key` pointer in an envelope, an endpoint output's
/// `sessionId`; a string or a number. `None` (unordered) when there is none.
/// A pointer into an envelope's payload is read in the payload the event
/// already holds (its body), not from the top of the document.
fn order_key(o: &crate::delivery::Ordering, event: &Event, bytes: &[u8]) -> Option<OrderKey> {
    let found = match event.kind {
        EventKind::EndpointOutput => crate::pointer::pointed(bytes, &["sessionId"]),
        EventKind::Envelope => match o.tokens.split_first() {
            Some((first, rest)) if first == "payload" => crate::pointer::pointed(&event.body, rest),
            _ => crate::pointer::pointed(bytes, &o.tokens),
        },
    };
    let key = match found? {
        serde_json::Value::String(s) if !s.is_empty() => s,
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    Some(OrderKey { key, hold: o.hold })
}

/// `{"status","jobId"}` as the seeds answer; with a destinations file also
/// `"jobs": {destination: id}` (`jobId` is the first destination's).
/// Serialized from borrows (no JSON tree built per event).
#[derive(serde::Serialize)]
struct Acknowledgement<'a> {
    status: &'static str,
    #[serde(rename = "jobId")]
    job_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    jobs: Option<JobIds<'a>>,
}

struct JobIds<'a>(&'a [crate::queue::JobRef]);

impl serde::Serialize for JobIds<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|j| (&j.destination, &j.id)))
    }
}

fn answer(routed: &Routed, with_jobs: bool) -> Acknowledgement<'_> {
    Acknowledgement {
        status: if routed.duplicate {
            "duplicate"
        } else {
            "accepted"
        },
        job_id: routed.jobs.first().map(|j| j.id.as_str()).unwrap_or(""),
        jobs: with_jobs.then_some(JobIds(&routed.jobs)),
    }
}

#[cfg(test)]
mod tests {
    use super::ReplayWindow;
    use std::time::Duration;

    #[test]
    fn an_ordering_key_is_read_in_the_payload_or_the_whole_document() {
        let key = |pointer: &str, body: &str| {
            let o = crate::delivery::Ordering::new(pointer, false);
            let event = super::envelope::parse(body.as_bytes()).expect("event");
            super::order_key(&o, &event, body.as_bytes()).map(|k| k.key)
        };
        let envelope = r#"{"botId":"b","eventId":"e","type":"t","payload":{"sessionId":"s-1","n":7},"payloadX":{"sessionId":"x"}}"#;
        assert_eq!(key("/payload/sessionId", envelope).as_deref(), Some("s-1"));
        assert_eq!(key("/payload/n", envelope).as_deref(), Some("7"));
        assert_eq!(key("/botId", envelope).as_deref(), Some("b"));
        assert_eq!(key("/payloadX/sessionId", envelope).as_deref(), Some("x"));
        assert_eq!(key("/payload", envelope), None, "an object is no key");
        assert_eq!(key("/payload/nope", envelope), None);
        let without = r#"{"botId":"b","eventId":"e","type":"t"}"#;
        assert_eq!(key("/payload/sessionId", without), None);
        let output = r#"{"userId":"u","sessionId":"s-9","text":"hi"}"#;
        assert_eq!(key("/payload/sessionId", output).as_deref(), Some("s-9"));
    }

    #[test]
    fn the_replay_window_is_the_dedup_ttl_behind_and_five_minutes_ahead() {
        let w = ReplayWindow::for_dedup_ttl(Duration::from_secs(3600));
        let now = 1_800_000_000_000;
        assert!(w.admits(now, now));
        assert!(w.admits(now - 3_600_000, now));
        assert!(!w.admits(now - 3_600_001, now));
        assert!(w.admits(now + 300_000, now));
        assert!(!w.admits(now + 300_001, now));
        assert!(!w.admits(i64::MIN, now) && !w.admits(i64::MAX, now));
        let off = ReplayWindow::for_dedup_ttl(Duration::ZERO);
        assert!(off.admits(now - 300_000, now) && !off.admits(now - 300_001, now));
    }
}
