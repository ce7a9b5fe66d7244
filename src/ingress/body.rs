//! Reading a request body within a memory budget shared by every connection.
//!
//! Cognigy needs a public endpoint, and a body must be read whole before its
//! signature can be checked, so anyone can make the relay hold bodies. Every
//! body may use [`FREE_BYTES`] of its own (real events are a few KiB, so they
//! never wait); what lies beyond comes out of one budget for the whole
//! process ([`BodyBudget`]), taken before the memory is allocated and given
//! back when the request is answered. A body that cannot get its share within
//! [`BUDGET_WAIT`] is answered 503 with `Retry-After`, so a flood of large
//! unsigned bodies slows large bodies down but never the small signed ones,
//! and the relay's memory stays bounded: about connections × [`FREE_BYTES`]
//! plus the budget.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What each body may hold without drawing on the shared budget.
pub const FREE_BYTES: usize = 16 * 1024;
/// The shared budget is at least this, and at least 4 bodies of
/// `MAX_BODY_BYTES`, so that a few large legitimate bodies fit at once.
pub const MIN_BUDGET_BYTES: usize = 64 * 1024 * 1024;
/// How long a body waits for its share of the budget before a 503.
pub const BUDGET_WAIT: Duration = Duration::from_secs(1);
/// How long the body of a request refused at its headers is read and
/// thrown away ([`discard`]) before the answer, at most.
pub const DISCARD_WAIT: Duration = Duration::from_secs(1);
/// The budget is counted in these units (a semaphore permit each).
const UNIT: usize = 1024;

/// Body bytes beyond [`FREE_BYTES`] that all requests together may hold.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    total_bytes: usize,
}

impl BodyBudget {
    pub fn for_max_body(max_body_bytes: usize) -> Self {
        Self::new(MIN_BUDGET_BYTES.max(max_body_bytes.saturating_mul(4)))
    }

    pub fn new(total_bytes: usize) -> Self {
        let units = total_bytes.div_ceil(UNIT).min(Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(units)),
            total_bytes,
        }
    }

    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Bytes of the budget not held by any request now.
    pub fn available_bytes(&self) -> usize {
        self.permits.available_permits() * UNIT
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// More than `max` bytes.
    TooLarge,
    /// The connection broke or the body was malformed.
    Broken,
    /// The shared budget had no room within [`BUDGET_WAIT`].
    NoRoom,
}

/// The body, whole, and the share of the budget it holds (keep it until the
/// request is answered).
pub struct Read {
    pub bytes: Vec<u8>,
    pub held: Vec<OwnedSemaphorePermit>,
}

/// Reads `body` up to `max` bytes, allocating only what the budget allows.
/// The caller bounds the total time (`REQUEST_READ_TIMEOUT_MS`).
pub async fn read(
    mut body: Body,
    max: usize,
    declared: Option<u64>,
    budget: &BodyBudget,
) -> Result<Read, ReadError> {
    let mut bytes = Vec::new();
    let mut held = Vec::new();
    let mut held_units = 0usize;
    // A declared length is allocated at once (the server enforces it); else
    // the buffer doubles as the body comes.
    let declared = declared.map(|n| n as usize).filter(|&n| n <= max);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if limit {
                ReadError::TooLarge
            } else {
                ReadError::Broken
            }
        })?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        let need = bytes.len() + chunk.len();
        if need > max {
            return Err(ReadError::TooLarge);
        }
        if need > bytes.capacity() {
            let capacity = declared
                .filter(|&d| d >= need)
                .unwrap_or_else(|| need.max(bytes.capacity() * 2).min(max));
            let units = capacity.saturating_sub(FREE_BYTES).div_ceil(UNIT);
            if units > held_units {
                let more = u32::try_from(units - held_units).map_err(|_| ReadError::NoRoom)?;
                let permit = tokio::time::timeout(
                    BUDGET_WAIT,
                    budget.permits.clone().acquire_many_owned(more),
                )
                .await
                .map_err(|_| ReadError::NoRoom)?
                .map_err(|_| ReadError::NoRoom)?;
                held.push(permit);
                held_units = units;
            }
            bytes.reserve_exact(capacity - bytes.len());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Read { bytes, held })
}

/// Reads `body` and throws it away, until its end, an error or more than
/// `max` bytes: a request refused at its headers, so that a sender that
/// writes its whole body before it reads hears the answer (hyper closes a
/// connection whose body is left unread, and such a sender's writes fail).
/// Holds no memory; the caller bounds the time ([`DISCARD_WAIT`]).
pub async fn discard(mut body: Body, max: usize) {
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        seen += frame.data_ref().map_or(0, |chunk| chunk.len());
        if seen > max {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(chunks: Vec<Vec<u8>>) -> Body {
        let stream = tokio_stream_of(chunks);
        Body::from_stream(stream)
    }

    fn tokio_stream_of(
        chunks: Vec<Vec<u8>>,
    ) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
        struct Chunks(std::collections::VecDeque<Vec<u8>>);
        impl futures_core::Stream for Chunks {
            type Item = Result<Vec<u8>, std::io::Error>;
            fn poll_next(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Self::Item>> {
                std::task::Poll::Ready(self.0.pop_front().map(Ok))
            }
        }
        Chunks(chunks.into())
    }

    #[tokio::test]
    async fn small_bodies_take_nothing_large_ones_hold_their_share_until_dropped() {
        let budget = BodyBudget::new(80 * 1024);
        let small = read(body_of(vec![vec![b'a'; 1000]; 16]), 1 << 20, None, &budget)
            .await
            .expect("read");
        assert_eq!(small.bytes.len(), 16_000);
        assert_eq!(
            budget.available_bytes(),
            80 * 1024,
            "within the free allowance"
        );

        let large = read(
            body_of(vec![vec![b'b'; 4096]; 16]),
            1 << 20,
            Some(65_536),
            &budget,
        )
        .await
        .expect("read");
        assert_eq!(large.bytes.len(), 65_536);
        assert_eq!(
            budget.available_bytes(),
            80 * 1024 - (65_536 - FREE_BYTES),
            "the declared length beyond the allowance"
        );
        // No room for another such body: 503 after the wait, nothing allocated.
        let other = read(body_of(vec![vec![b'c'; 65_536]]), 1 << 20, None, &budget).await;
        assert_eq!(other.err(), Some(ReadError::NoRoom));
        drop(large);
        assert_eq!(budget.available_bytes(), 80 * 1024, "given back");
        let again = read(body_of(vec![vec![b'c'; 65_536]]), 1 << 20, None, &budget).await;
        assert_eq!(again.map(|r| r.bytes.len()).ok(), Some(65_536));
    }

    #[tokio::test]
    async fn over_the_limit_is_too_large() {
        let budget = BodyBudget::new(1 << 20);
        let r = read(body_of(vec![vec![0; 600]; 2]), 1000, None, &budget).await;
        assert_eq!(r.err(), Some(ReadError::TooLarge));
        assert_eq!(budget.available_bytes(), 1 << 20);
    }
}
