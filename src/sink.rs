//! A recording HTTP/1.1 target: what the relay delivers to in local development,
//! tests and benchmarks.
//!
//! It is written on raw TCP (with `httparse`) rather than a framework so that it
//! can misbehave on purpose: answer any status with any headers, answer late,
//! never answer, or reset the connection (RST, via a zero linger). Behaviours are
//! scripted: each request takes what its [`Rule`] says (by event id and attempt
//! number), else the next scripted [`Behaviour`], or the default once the
//! script is empty. Every request is recorded when it arrives.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Answer with this status and headers (no body).
    Status(u16, Vec<(String, String)>),
    /// Wait, then answer with this status.
    Delay(Duration, u16),
    /// Close the connection with a TCP reset, without answering.
    Reset,
    /// Never answer (the client's timeout must fire).
    Hang,
}

impl Behaviour {
    pub fn status(code: u16) -> Self {
        Behaviour::Status(code, Vec::new())
    }

    pub fn retry_after(code: u16, value: &str) -> Self {
        Behaviour::Status(code, vec![("Retry-After".into(), value.into())])
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("received", &self.received.len())
            .field("script", &self.script)
            .field("default", &self.default)
            .field("rule", &self.rule.is_some())
            .finish()
    }
}

/// One request as the target saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// What the target was scripted to do with it.
    pub behaviour: Behaviour,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a request gets, decided by its `X-Event-Id` and
/// `X-Delivery-Attempt` (an event answered 503 on its first two attempts,
/// say); `None` leaves it to the script and the default.
pub type Rule = Arc<dyn Fn(&str, u32) -> Option<Behaviour> + Send + Sync>;

struct State {
    rule: Option<Rule>,
    received: Vec<Received>,
    script: VecDeque<Behaviour>,
    default: Behaviour,
    keep_bodies: bool,
    /// False: count requests but keep no record (long benchmark runs).
    record: bool,
    print: bool,
}

#[derive(Debug, Clone)]
pub struct Sink {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    count: watch::Receiver<usize>,
    posts: Arc<std::sync::atomic::AtomicUsize>,
}

impl Sink {
    /// Binds 127.0.0.1 on a free port and serves until the runtime ends.
    pub async fn start() -> std::io::Result<Self> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), false).await
    }

    /// Binds `addr`; with `print`, each request is printed to stdout.
    pub async fn bind(addr: SocketAddr, print: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            rule: None,
            received: Vec::new(),
            script: VecDeque::new(),
            default: Behaviour::status(200),
            keep_bodies: true,
            record: true,
            print,
        }));
        let (count_tx, count) = watch::channel(0usize);
        let count_tx = Arc::new(count_tx);
        let posts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (st, p) = (state.clone(), posts.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, st.clone(), count_tx.clone(), p.clone()));
            }
        });
        Ok(Self {
            addr,
            state,
            count,
            posts,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port/events`.
    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// The next request gets `b` (after those already scripted).
    pub fn push(&self, b: Behaviour) {
        self.with(|s| s.script.push_back(b));
    }

    /// Requests still scripted (not yet received).
    pub fn scripted(&self) -> usize {
        self.with(|s| s.script.len())
    }

    /// Sets (or with `None` takes off) the [`Rule`] every request asks first.
    pub fn set_rule(&self, rule: Option<Rule>) {
        self.with(|s| s.rule = rule);
    }

    /// What requests get once the script is used up.
    pub fn set_default(&self, b: Behaviour) {
        self.with(|s| s.default = b);
    }

    /// Drop bodies (benchmarks): only headers are kept.
    pub fn keep_bodies(&self, keep: bool) {
        self.with(|s| s.keep_bodies = keep);
    }

    /// Count requests only, keep no record of them (benchmarks).
    pub fn count_only(&self) {
        self.with(|s| s.record = false);
    }

    pub fn received(&self) -> Vec<Received> {
        self.with(|s| s.received.clone())
    }

    pub fn count(&self) -> usize {
        *self.count.borrow()
    }

    /// POST requests received (deliveries, as opposed to other calls).
    pub fn posts(&self) -> usize {
        self.posts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until at least `n` requests arrived; false on timeout.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.count.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // (State has no Debug: the rule is a closure.)
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

async fn connection(
    mut stream: TcpStream,
    state: Arc<Mutex<State>>,
    count: Arc<watch::Sender<usize>>,
    posts: Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Counting only (benchmarks): no copy of the request is made.
        let full = {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.record || s.print || s.rule.is_some()
        };
        let (req, consumed) = loop {
            match parse(&buf, full) {
                Ok(Some(done)) => break done,
                Ok(None) => {}
                Err(()) => return,
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let (received, post, body_len) = req;
        while buf.len() < consumed + body_len {
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = &buf[consumed..consumed + body_len];
        let behaviour = answer_to(&state, &posts, received, post, body);
        count.send_modify(|c| *c += 1);
        buf.drain(..consumed + body_len);
        let (status, headers) = match behaviour {
            Behaviour::Status(code, headers) => (code, headers),
            Behaviour::Delay(d, code) => {
                tokio::time::sleep(d).await;
                (code, Vec::new())
            }
            Behaviour::Reset => {
                let _ = stream.set_zero_linger();
                return;
            }
            Behaviour::Hang => {
                // Hold the connection open without answering until the client gives up.
                let mut sink = [0u8; 1024];
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
                return;
            }
        };
        let mut head = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// What the sink answers to one request (its rule, its script, or its
/// default), with the request recorded or printed as the sink is set to.
fn answer_to(
    state: &Mutex<State>,
    posts: &std::sync::atomic::AtomicUsize,
    received: Option<Received>,
    post: bool,
    body: &[u8],
) -> Behaviour {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if post {
        posts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let ruled = match (&s.rule, &received) {
        (Some(rule), Some(r)) => rule(
            r.header("x-event-id").unwrap_or(""),
            r.header("x-delivery-attempt")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        ),
        _ => None,
    };
    let b = match ruled {
        Some(b) => b,
        None => s.script.pop_front().unwrap_or_else(|| s.default.clone()),
    };
    if let Some(mut received) = received {
        if s.print {
            // Not `println!`, which panics when stdout is closed (`| head`).
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stdout(),
                "{} {} event={} attempt={} body={}",
                received.method,
                received.path,
                received.header("x-event-id").unwrap_or("-"),
                received.header("x-delivery-attempt").unwrap_or("-"),
                String::from_utf8_lossy(body)
            );
        }
        if s.record {
            if s.keep_bodies {
                received.body = body.to_vec();
            }
            received.behaviour = b.clone();
            s.received.push(received);
        }
    }
    b
}

/// A request head: the request (copied only when `full`), whether it is a
/// POST, and its body length; then the head's length.
type Parsed = ((Option<Received>, bool, usize), usize);

/// A complete request head in `buf`, copied into a [`Received`] when `full`.
fn parse(buf: &[u8], full: bool) -> Result<Option<Parsed>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => {
            let body_len = content_length(req.headers).unwrap_or(0);
            let method = req.method.unwrap_or("");
            let received = full.then(|| Received {
                method: method.to_string(),
                path: req.path.unwrap_or("").to_string(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
                body: Vec::new(),
                at: Instant::now(),
                behaviour: Behaviour::Status(0, Vec::new()),
            });
            Ok(Some(((received, method == "POST", body_len), head_len)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(()),
    }
}

/// The `content-length` of a parsed HTTP/1.1 head, if it has a valid one.
pub fn content_length(headers: &[httparse::Header<'_>]) -> Option<usize> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
}
