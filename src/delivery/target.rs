//! The HTTP client that posts to `TARGET_ENDPOINT`.
//!
//! A plain `http://` target, with no proxy variable in the environment, gets a
//! lean HTTP/1.1 client: hyper's connection API and a pool of keep-alive
//! connections (at most `CONCURRENCY` idle). Per request it does what a
//! delivery needs and nothing more. reqwest spends about 11 µs of CPU more per
//! request on its layers (redirect policy, URL re-parsing, header copies),
//! which is a third of a delivery's CPU in the relay.
//!
//! An `https://` target, a target URL with credentials (`user:pass@`, sent as
//! Basic authorization), or any of `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`
//! (either case) set, uses reqwest: TLS with the web PKI roots, the
//! credentials, the proxy.
//!
//! Both answer the same way: the status, `Retry-After`, and up to
//! [`MAX_ANSWER`] bytes of the body; or a failure with its message.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderValue, HOST, RETRY_AFTER, USER_AGENT};
use hyper_util::rt::TokioIo;

/// Bytes of an answer's body read; a longer one is cut (the status stands)
/// and its connection is not reused.
pub const MAX_ANSWER: usize = 64 * 1024;
const AGENT: &str = concat!("cogrelay/", env!("CARGO_PKG_VERSION"));

/// The target's answer.
#[derive(Debug)]
pub struct TargetAnswer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Bytes,
}

/// What one request came to: the target's answer, or none. The attempt's
/// first result; [`super::classify::classify`] reads it as an outcome.
pub type Sent = Result<TargetAnswer, Failure>;

/// No answer: why, without the URL (it may carry credentials).
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub timed_out: bool,
}

impl Failure {
    /// A failure that is not a timeout.
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            timed_out: false,
        }
    }

    /// `what`, then `e` and its causes.
    fn new(what: &str, e: &dyn std::error::Error) -> Self {
        let mut message = what.to_string();
        let mut source = Some(e);
        while let Some(s) = source {
            let text = s.to_string();
            if !message.ends_with(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = s.source();
        }
        Self::msg(message)
    }
}

pub enum Target {
    Plain(Plain),
    Reqwest {
        client: reqwest::Client,
        url: reqwest::Url,
    },
}

impl Target {
    /// The client for `url`; `timeout` bounds connecting (the caller bounds
    /// the whole exchange).
    pub fn new(url: &reqwest::Url, concurrency: usize, timeout: Duration) -> anyhow::Result<Self> {
        // Credentials in the URL: reqwest sends them as Basic authorization.
        let credentials = !url.username().is_empty() || url.password().is_some();
        if url.scheme() == "http" && !credentials && !proxy_in_env() {
            if let Some(host) = url.host_str() {
                let port = url.port_or_known_default().unwrap_or(80);
                let authority = match url.port() {
                    Some(p) => format!("{host}:{p}"),
                    None => host.to_string(),
                };
                let path = match url.query() {
                    Some(q) => format!("{}?{q}", url.path()),
                    None => url.path().to_string(),
                };
                return Ok(Self::Plain(Plain {
                    connect_to: format!("{host}:{port}"),
                    host: HeaderValue::from_str(&authority)?,
                    path: path.parse()?,
                    idle: Mutex::new(Vec::new()),
                    max_idle: concurrency.max(1),
                }));
            }
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(concurrency)
            .connect_timeout(timeout)
            .user_agent(AGENT)
            .build()?;
        Ok(Self::Reqwest {
            client,
            url: url.clone(),
        })
    }

    /// `POST` of `body` with `headers`, within `timeout` in all.
    pub async fn post(
        &self,
        headers: HeaderMap,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<TargetAnswer, Failure> {
        let exchange = async {
            match self {
                Self::Plain(p) => p.post(headers, Bytes::from(body)).await,
                Self::Reqwest { client, url } => {
                    let resp = client
                        .post(url.clone())
                        .headers(headers)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| reqwest_failure(&e))?;
                    let status = resp.status().as_u16();
                    let retry_after = retry_after(resp.headers());
                    let body = crate::answer::first_bytes_of(resp, MAX_ANSWER).await;
                    Ok(TargetAnswer {
                        status,
                        retry_after,
                        body,
                    })
                }
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Failure {
                timed_out: true,
                ..Failure::msg("timed out")
            }),
        }
    }
}

/// A proxy variable reqwest would honour for this target.
fn proxy_in_env() -> bool {
    ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"]
        .iter()
        .any(|v| env_set(v) || env_set(&v.to_ascii_lowercase()))
}

fn env_set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

fn retry_after(headers: &HeaderMap) -> Option<String> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn reqwest_failure(e: &reqwest::Error) -> Failure {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let f = match std::error::Error::source(e) {
        Some(s) => Failure::new(what, s),
        None => Failure::msg(what),
    };
    Failure {
        timed_out: e.is_timeout(),
        ..f
    }
}

/// A plain HTTP/1.1 target and its idle keep-alive connections.
pub struct Plain {
    /// `host:port` to connect to.
    connect_to: String,
    /// The `Host` header: the URL's authority.
    host: HeaderValue,
    path: hyper::Uri,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    max_idle: usize,
}

impl Plain {
    async fn post(&self, mut headers: HeaderMap, body: Bytes) -> Result<TargetAnswer, Failure> {
        headers.insert(HOST, self.host.clone());
        headers.insert(USER_AGENT, HeaderValue::from_static(AGENT));
        let mut req = hyper::Request::post(self.path.clone())
            .body(Full::new(body))
            .map_err(|e| Failure::new("request failed", &e))?;
        *req.headers_mut() = headers;
        // An idle connection first. One the target closed meanwhile gives the
        // request back unsent: it goes out on the next one, or a new one.
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(Failure::msg("request failed: connection closed"));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = retry_after(resp.headers());
                    let (body, whole) =
                        crate::answer::first_bytes(resp.into_body(), MAX_ANSWER).await;
                    if whole {
                        self.put_idle(sender);
                    }
                    return Ok(TargetAnswer {
                        status,
                        retry_after,
                        body,
                    });
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => req = back,
                    _ => return Err(Failure::new("request failed", &e.into_error())),
                },
            }
        }
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<Full<Bytes>>) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle {
                idle.push(sender);
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let stream = tokio::net::TcpStream::connect(self.connect_to.as_str())
            .await
            .map_err(|e| Failure::new("cannot connect", &e))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::new("cannot connect", &e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}
