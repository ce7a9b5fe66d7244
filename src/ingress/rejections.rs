//! Requests the ingress refuses (401, 413, 415, 400, 408, 429, and 503 for
//! a large body that got no room in the shared budget), logged at a
//! bounded rate so that a misconfigured sender is visible without a flood.
//!
//! The first refusal of each [`Kind`] is logged at once, with the reason, the
//! sender's address and a hint where one helps (a base64 signature, a wrong
//! secret, Basic credentials while only signatures are set, an old
//! timestamp). Later ones of that kind are counted; the next refusal of the
//! kind after [`EVERY`] logs one line with the count since the last line and
//! the latest reason. The `/metrics` counters still count every answer.
//! Nothing a sender presented (a signature, a password) is ever logged.

use std::net::SocketAddr;
use std::sync::Mutex;

use crate::time::Clock;

/// At most one line per kind per this many milliseconds.
pub const EVERY_MS: i64 = 10_000;

/// Why a request was refused, one log budget each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 401: no or wrong credentials or signature.
    Unauthorized,
    /// 401: the envelope's timestamp is outside the replay window.
    ReplayWindow,
    /// 413: the body exceeds `MAX_BODY_BYTES`.
    TooLarge,
    /// 415: not `application/json`.
    MediaType,
    /// 400: not JSON, or fields missing.
    BadRequest,
    /// 408: the body did not arrive in time.
    Timeout,
    /// 429: the sender's address is over `INGRESS_RATE_LIMIT`.
    RateLimited,
    /// 503: a large body got no room in the shared budget within a second
    /// (a flood, or connections that claim large bodies and hold them).
    NoRoom,
}

impl Kind {
    const ALL: usize = 8;

    fn index(self) -> usize {
        self as usize
    }

    pub fn status(self) -> u16 {
        match self {
            Self::Unauthorized | Self::ReplayWindow => 401,
            Self::TooLarge => 413,
            Self::MediaType => 415,
            Self::BadRequest => 400,
            Self::Timeout => 408,
            Self::RateLimited => 429,
            Self::NoRoom => 503,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::ReplayWindow => "replay_window",
            Self::TooLarge => "too_large",
            Self::MediaType => "unsupported_media_type",
            Self::BadRequest => "bad_request",
            Self::Timeout => "timeout",
            Self::RateLimited => "rate_limited",
            Self::NoRoom => "body_budget",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Budget {
    /// When this kind was last logged (monotonic ms); None = never.
    last_line: Option<i64>,
    /// Refused since that line, not yet reported.
    since_line: u64,
}

#[derive(Debug, Default)]
pub struct Rejections {
    clock: Clock,
    kinds: Mutex<[Budget; Kind::ALL]>,
}

impl Rejections {
    pub fn with_clock(clock: Clock) -> Self {
        Self {
            clock,
            kinds: Mutex::default(),
        }
    }

    /// One request refused as `kind` because of `reason`, with a `hint` for
    /// the sender's operator where one helps.
    pub fn refused(&self, kind: Kind, peer: Option<SocketAddr>, reason: &str, hint: Option<&str>) {
        self.refused_with(kind, peer, reason, || hint.map(str::to_owned));
    }

    /// As [`Rejections::refused`], the hint computed only when the line is
    /// logged (a hint may cost an HMAC over the body).
    pub fn refused_with(
        &self,
        kind: Kind,
        peer: Option<SocketAddr>,
        reason: &str,
        hint: impl FnOnce() -> Option<String>,
    ) {
        let now = self.clock.mono_ms();
        let refused = {
            let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
            let b = &mut kinds[kind.index()];
            b.since_line += 1;
            if b.last_line.is_some_and(|t| now - t < EVERY_MS) {
                return;
            }
            b.last_line = Some(now);
            std::mem::take(&mut b.since_line)
        };
        // An IPv4 sender on the dual-stack socket shows as IPv4.
        let peer = peer.map(|p| SocketAddr::new(p.ip().to_canonical(), p.port()).to_string());
        let peer = peer.as_deref().unwrap_or("unknown");
        let hint = hint();
        let hint = hint.as_deref().unwrap_or("");
        let message = if refused == 1 {
            "request refused".to_string()
        } else {
            format!(
                "requests refused: {refused} since the last line of this kind (the latest shown)"
            )
        };
        tracing::warn!(
            status = kind.status(),
            kind = kind.name(),
            peer,
            reason,
            hint,
            refused,
            "{message}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::test_log::logged;

    #[test]
    fn the_first_of_each_kind_at_once_then_a_count_every_interval() {
        let clock = Clock::manual(1_800_000_000_000);
        let r = Rejections::with_clock(clock.clone());
        let peer: SocketAddr = "10.1.2.3:4567".parse().expect("addr");
        let lines = logged(|| {
            for _ in 0..100 {
                r.refused(
                    Kind::Unauthorized,
                    Some(peer),
                    "Invalid webhook signature",
                    Some("wrong secret"),
                );
            }
            r.refused(
                Kind::TooLarge,
                Some(peer),
                "Body exceeds MAX_BODY_BYTES",
                None,
            );
            clock.step(EVERY_MS - 1);
            r.refused(
                Kind::Unauthorized,
                Some(peer),
                "Invalid webhook signature",
                None,
            );
            clock.step(1);
            r.refused(Kind::Unauthorized, None, "Invalid credentials", None);
            r.refused(Kind::Unauthorized, None, "Invalid credentials", None);
        });
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0].contains("kind=\"unauthorized\"") || lines[0].contains("kind=unauthorized"),
            "{lines:#?}"
        );
        assert!(
            lines[0].contains("10.1.2.3:4567") && lines[0].contains("wrong secret"),
            "{lines:#?}"
        );
        assert!(lines[1].contains("too_large"), "{lines:#?}");
        // 99 after the first, one more just before the interval, and the one that logs.
        assert!(lines[2].contains("refused=101"), "{lines:#?}");
        assert!(
            lines[2].contains("Invalid credentials") && lines[2].contains("peer=\"unknown\"")
                || lines[2].contains("peer=unknown"),
            "{lines:#?}"
        );
    }
}
