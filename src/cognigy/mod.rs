//! Cognigy API client: one token cache shared by every caller, typed errors that
//! carry the server's own explanation, retries, and a client-side rate limit.
//!
//! * **Auth**: OAuth 2.0 client credentials (form body `grant_type=client_credentials`
//!   [+ `scope` for the connectors API], `Authorization: Basic id:secret`), or an
//!   `X-API-Key` (`rest` API only). A token is reused until 80% of its
//!   `expires_in` has passed (at most 60 s before expiry; an `expires_in`
//!   over a day counts as a day); a 401 on use drops it, fetches a new one
//!   and retries once.
//! * **Retries**: 429, 5xx and network errors are retried `max_retries` times
//!   with 1 s × 2^n, or the server's `Retry-After` (capped at 60 s).
//! * **Rate limit**: at most `max` requests in any rolling `per` window (token
//!   requests and retries included); a caller over the limit waits its turn.
//!
//! Paths are the two APIs of SPEC §4: the tutorials' `connectors` API and the
//! real Cognigy.AI REST API (`rest`, under `/new/v2.0`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use crate::answer::parse_retry_after;
use crate::secret::Secret;
pub use crate::window::RateLimit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// The API the tutorials describe: `/api/v1/auth/token`, `/api/v1/connectors`.
    Connectors,
    /// The Cognigy.AI REST API: `/auth/oauth2/token`, `/new/v2.0/endpoints`.
    Rest,
}

#[derive(Debug, Clone)]
pub enum Credentials {
    OAuth {
        client_id: String,
        client_secret: Secret,
    },
    ApiKey(Secret),
}

/// Where and how to talk to Cognigy.
#[derive(Clone)]
pub struct CognigyConfig {
    pub api: Api,
    pub base: Url,
    pub credentials: Credentials,
    /// Overrides the API's token endpoint.
    pub token_url: Option<Url>,
    pub rate_limit: RateLimit,
    pub max_retries: u32,
    pub timeout: Duration,
}

/// Every field, the URLs' credentials and queries masked.
impl std::fmt::Debug for CognigyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CognigyConfig")
            .field("api", &self.api)
            .field("base", &crate::secret::MaskedUrl(&self.base))
            .field("credentials", &self.credentials)
            .field(
                "token_url",
                &self.token_url.as_ref().map(crate::secret::MaskedUrl),
            )
            .field("rate_limit", &self.rate_limit)
            .field("max_retries", &self.max_retries)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl CognigyConfig {
    /// The API host, for audit records.
    pub fn domain(&self) -> String {
        self.base.host_str().unwrap_or_default().to_string()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CognigyError {
    /// 401/403 from the token endpoint (or from an API call after a fresh token).
    #[error("Cognigy rejected the credentials (HTTP {status}): {description}")]
    Auth { status: u16, description: String },
    #[error("Cognigy answered HTTP {status} to {what}: {detail}")]
    Status {
        status: u16,
        what: String,
        detail: String,
    },
    #[error("cannot reach Cognigy for {what}: {detail}")]
    Network { what: String, detail: String },
    #[error("unexpected answer from Cognigy to {what}: {detail}")]
    Protocol { what: String, detail: String },
}

impl CognigyError {
    pub fn status(&self) -> Option<u16> {
        match self {
            CognigyError::Auth { status, .. } | CognigyError::Status { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}

struct Token {
    value: Secret,
    refresh_at: Instant,
}

/// The most of one Cognigy answer that is read: its JSON must be whole to be
/// parsed, and a listing of endpoints can be larger than a target's 64 KiB.
pub const MAX_ANSWER: usize = 1024 * 1024;
/// A token is used for at most this long, whatever its `expires_in`.
const MAX_TOKEN_TTL_SECS: u64 = 86_400;

pub struct CognigyClient {
    http: reqwest::Client,
    cfg: CognigyConfig,
    token: tokio::sync::Mutex<Option<Token>>,
    limiter: crate::window::Limiter,
    token_requests: AtomicU64,
    /// Told of each retry, one line (`cogrelay register`'s progress).
    on_retry: Option<Progress>,
}

/// Where progress lines go (stderr in the binary).
pub type Progress = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

impl std::fmt::Debug for CognigyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CognigyClient")
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// What Cognigy says of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventLookup {
    Found,
    /// 404: the event does not exist in Cognigy; delivering it would be wrong.
    NotFound,
    /// Anything else (auth, 5xx, network): try again later.
    Unavailable(String),
}

/// The answer to a request: status and parsed JSON body (`Null` if none).
#[derive(Debug, Clone)]
pub struct ApiAnswer {
    pub status: StatusCode,
    pub json: Value,
}

impl CognigyClient {
    pub fn new(cfg: CognigyConfig) -> Result<Self, CognigyError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .redirect(same_origin_redirects())
            .user_agent(concat!("cogrelay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CognigyError::Network {
                what: "client set-up".into(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            http,
            limiter: crate::window::Limiter::new(cfg.rate_limit),
            cfg,
            token: tokio::sync::Mutex::new(None),
            token_requests: AtomicU64::new(0),
            on_retry: None,
        })
    }

    /// Tells `progress` of each retry (what failed, the wait, the attempt).
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.on_retry = Some(progress);
        self
    }

    pub fn config(&self) -> &CognigyConfig {
        &self.cfg
    }

    /// Token requests made so far (each one a round trip to the token endpoint).
    pub fn token_requests(&self) -> u64 {
        self.token_requests.load(Ordering::Relaxed)
    }

    pub fn url(&self, path: &str) -> Url {
        let mut u = self.cfg.base.clone();
        let base_path = u.path().trim_end_matches('/').to_string();
        u.set_path(&format!("{base_path}{path}"));
        u
    }

    /// Looks one event up in Cognigy (`VERIFY_EVENTS`, SPEC §3.2): the
    /// connectors API's `GET /api/v2/bots/{botId}/events/{eventId}`.
    pub async fn lookup_event(&self, bot: &str, event: &str) -> EventLookup {
        let Some(url) = self.event_url(bot, event) else {
            return EventLookup::NotFound;
        };
        match self
            .send(
                reqwest::Method::GET,
                url,
                &[],
                None,
                "the event verification",
            )
            .await
        {
            Ok(a) if a.status.is_success() => EventLookup::Found,
            Ok(a) if a.status == StatusCode::NOT_FOUND => EventLookup::NotFound,
            Ok(a) => EventLookup::Unavailable(format!(
                "event verification: Cognigy answered HTTP {}: {}",
                a.status.as_u16(),
                detail(&a.json)
            )),
            Err(e) => EventLookup::Unavailable(format!("event verification: {e}")),
        }
    }

    /// `{base}/api/v2/bots/{bot}/events/{event}` with each id one path
    /// segment, percent-encoded (`%` too, so `%2e` stays text); `None` for an
    /// id that would still change the path (`.` or `..`, refused at ingress).
    pub fn event_url(&self, bot: &str, event: &str) -> Option<Url> {
        let [bot, event] = [bot, event].map(path_segment);
        let url = self.url(&format!("/api/v2/bots/{bot}/events/{event}"));
        url.path()
            .ends_with(&format!("/api/v2/bots/{bot}/events/{event}"))
            .then_some(url)
    }

    fn token_url(&self) -> Url {
        self.cfg
            .token_url
            .clone()
            .unwrap_or_else(|| match self.cfg.api {
                Api::Connectors => self.url("/api/v1/auth/token"),
                Api::Rest => self.url("/auth/oauth2/token"),
            })
    }

    /// A valid access token (OAuth only), fetched if none is cached or it is due
    /// for refresh. Concurrent callers share one fetch.
    pub async fn access_token(&self) -> Result<Option<Secret>, CognigyError> {
        let Credentials::OAuth {
            client_id,
            client_secret,
        } = &self.cfg.credentials
        else {
            return Ok(None);
        };
        let mut guard = self.token.lock().await;
        if let Some(t) = guard.as_ref() {
            if Instant::now() < t.refresh_at {
                return Ok(Some(t.value.clone()));
            }
        }
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{client_id}:{}", client_secret.expose()));
        let mut form = vec![("grant_type", "client_credentials")];
        if self.cfg.api == Api::Connectors {
            form.push(("scope", "connectors:write connectors:read"));
        }
        let body = serde_urlencode(&form);
        let what = "the token request";
        let mut attempt = 0;
        let answer = loop {
            self.limiter.acquire().await;
            self.token_requests.fetch_add(1, Ordering::Relaxed);
            let res = self
                .http
                .post(self.token_url())
                .header(reqwest::header::AUTHORIZATION, format!("Basic {basic}"))
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .header(reqwest::header::ACCEPT, "application/json")
                .body(body.clone())
                .send()
                .await;
            match self.retry_or_answer(res, what, &mut attempt).await? {
                Some(a) => break a,
                None => continue,
            }
        };
        if matches!(answer.status.as_u16(), 400 | 401 | 403) {
            return Err(CognigyError::Auth {
                status: answer.status.as_u16(),
                description: detail(&answer.json),
            });
        }
        if !answer.status.is_success() {
            return Err(CognigyError::Status {
                status: answer.status.as_u16(),
                what: what.into(),
                detail: detail(&answer.json),
            });
        }
        let value = answer.json["access_token"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| CognigyError::Protocol {
                what: what.into(),
                detail: "no access_token in the answer".into(),
            })?;
        // At most a day: a larger `expires_in` (u64::MAX was a panic when
        // added to now) is refreshed daily.
        let ttl = Duration::from_secs(
            answer.json["expires_in"]
                .as_u64()
                .unwrap_or(3600)
                .min(MAX_TOKEN_TTL_SECS),
        );
        let margin = (ttl / 5).min(Duration::from_secs(60));
        let token = Token {
            value: Secret::new(value),
            refresh_at: Instant::now() + ttl - margin,
        };
        let out = token.value.clone();
        *guard = Some(token);
        Ok(Some(out))
    }

    async fn forget_token(&self) {
        *self.token.lock().await = None;
    }

    /// Sends a request with authentication, rate limit and retries. `what` names
    /// the call in errors. Any HTTP status is returned as an [`ApiAnswer`]; only
    /// exhausted retries and network failures are errors.
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        headers: &[(&str, &str)],
        json: Option<&Value>,
        what: &str,
    ) -> Result<ApiAnswer, CognigyError> {
        let mut refreshed = false;
        let mut attempt = 0;
        loop {
            let token = self.access_token().await?;
            self.limiter.acquire().await;
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .header(reqwest::header::ACCEPT, "application/json");
            match (&token, &self.cfg.credentials) {
                (Some(t), _) => req = req.bearer_auth(t.expose()),
                (None, Credentials::ApiKey(key)) => req = req.header("X-API-Key", key.expose()),
                _ => {}
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(body) = json {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(serde_json::to_vec(body).unwrap_or_default());
            }
            let Some(answer) = self
                .retry_or_answer(req.send().await, what, &mut attempt)
                .await?
            else {
                continue;
            };
            if answer.status == StatusCode::UNAUTHORIZED && token.is_some() && !refreshed {
                // The token may have been revoked or expired early: once, with a fresh one.
                refreshed = true;
                self.forget_token().await;
                continue;
            }
            return Ok(answer);
        }
    }

    /// `Ok(Some)` for an answer to return, `Ok(None)` to try again (after the
    /// wait), `Err` when retries are exhausted on a network error.
    async fn retry_or_answer(
        &self,
        res: reqwest::Result<reqwest::Response>,
        what: &str,
        attempt: &mut u32,
    ) -> Result<Option<ApiAnswer>, CognigyError> {
        let mut failure = None;
        let (answer, retry_after) = match res {
            Ok(resp) => {
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                let bytes = crate::answer::first_bytes_of(resp, MAX_ANSWER).await;
                let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                    if bytes.is_empty() {
                        Value::Null
                    } else {
                        Value::String(
                            String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned(),
                        )
                    }
                });
                let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
                if !retryable || *attempt >= self.cfg.max_retries {
                    return Ok(Some(ApiAnswer { status, json }));
                }
                (Some(ApiAnswer { status, json }), retry_after)
            }
            Err(e) => {
                let detail = network_detail(&e);
                if *attempt >= self.cfg.max_retries {
                    return Err(CognigyError::Network {
                        what: what.into(),
                        detail,
                    });
                }
                failure = Some(detail);
                (None, None)
            }
        };
        let delay = retry_after
            .unwrap_or(Duration::from_secs(1) * 2u32.pow((*attempt).min(6)))
            .min(Duration::from_secs(60));
        if let Some(progress) = &self.on_retry {
            let why = match (&answer, &failure) {
                (Some(a), _) => format!("HTTP {}", a.status.as_u16()),
                (None, Some(e)) => e.clone(),
                (None, None) => "no answer".into(),
            };
            progress(&format!(
                "...  {what}: {why}; retrying in {:.1} s (retry {} of {})",
                delay.as_secs_f64(),
                *attempt + 1,
                self.cfg.max_retries
            ));
        }
        tracing::info!(
            what,
            attempt = *attempt + 1,
            status = answer.as_ref().map(|a| a.status.as_u16()),
            delay_ms = delay.as_millis() as u64,
            "Cognigy call failed; retrying"
        );
        *attempt += 1;
        tokio::time::sleep(delay).await;
        Ok(None)
    }
}

/// The server's own explanation: OAuth `error_description`, RFC 7807 `detail`,
/// or a `message`/`error` field; else the body as text.
pub fn detail(json: &Value) -> String {
    for key in ["error_description", "detail", "message", "error"] {
        if let Some(s) = json.get(key).and_then(Value::as_str) {
            return s.to_string();
        }
    }
    match json {
        Value::Null => "(no body)".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The error and its causes, without the URL.
pub fn network_detail(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    if e.is_timeout() {
        parts.push("timed out".to_string());
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    if parts.is_empty() {
        parts.push(e.without_url_string());
    }
    parts.join(": ")
}

trait WithoutUrl {
    fn without_url_string(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_string(&self) -> String {
        let mut s = self.to_string();
        if let Some(u) = self.url() {
            s = s.replace(u.as_str(), "<url>");
        }
        s
    }
}

fn serde_urlencode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// One id as a path segment: everything but unreserved characters is
/// percent-encoded, `%` and `/` included.
fn path_segment(id: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(id, SEGMENT).to_string()
}

/// Redirects are followed only within the same origin (scheme, host, port),
/// at most 5: the client sends `X-API-Key` or a bearer token with every
/// request, and reqwest strips only the standard credential headers when a
/// redirect leaves the host.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same = attempt
            .previous()
            .last()
            .is_some_and(|prev| prev.origin() == attempt.url().origin());
        if attempt.previous().len() > 5 {
            attempt.error("more than 5 redirects")
        } else if same {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_body_encodes_the_scope() {
        assert_eq!(
            serde_urlencode(&[
                ("grant_type", "client_credentials"),
                ("scope", "connectors:write connectors:read")
            ]),
            "grant_type=client_credentials&scope=connectors%3Awrite+connectors%3Aread"
        );
    }

    #[test]
    fn detail_prefers_the_servers_explanation() {
        assert_eq!(
            detail(&serde_json::json!({"error":"invalid_client","error_description":"bad secret"})),
            "bad secret"
        );
        assert_eq!(
            detail(&serde_json::json!({"title":"Conflict","detail":"exists"})),
            "exists"
        );
        assert_eq!(detail(&Value::Null), "(no body)");
    }
}
