//! Reading an answer from a remote system (a target, Cognigy): its body
//! within a bound (an answer of 100 MB is read no further than what is kept,
//! so memory stays flat whatever a remote system sends), and `Retry-After`.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;

/// The first `max` bytes of `body`, and whether that was all of it (a
/// connection whose answer was not read to the end cannot be reused).
/// Reading stops as soon as `max` bytes are in hand; a broken body yields
/// what arrived before the break.
pub async fn first_bytes<B>(body: B, max: usize) -> (Bytes, bool)
where
    B: http_body::Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let mut kept = BytesMut::new();
    loop {
        match body.frame().await {
            None => return (kept.freeze(), true),
            Some(Err(_)) => return (kept.freeze(), false),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let room = max - kept.len();
                if data.len() > room {
                    kept.extend_from_slice(&data[..room]);
                    return (kept.freeze(), false);
                }
                kept.extend_from_slice(&data);
                if kept.len() == max && body.is_end_stream() {
                    return (kept.freeze(), true);
                }
            }
        }
    }
}

/// [`first_bytes`] of a reqwest answer.
pub async fn first_bytes_of(resp: reqwest::Response, max: usize) -> Bytes {
    first_bytes(reqwest::Body::from(resp), max).await.0
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3). A date in
/// the past means "now"; anything unparseable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}
