//! The domain core: an event as the relay knows it once accepted, and one
//! delivery attempt with its outcome. Imports no HTTP, queue or settings code:
//! everything else is written in these terms.

use serde::{Deserialize, Serialize};

/// The destination of a relay without a destinations file (SPEC §7): the
/// one name every layer uses for it.
pub const DEFAULT_DESTINATION: &str = "default";

/// A destination's name: `[a-z0-9_-]`, 1 to 32 characters (it becomes part of
/// queue names, metric labels and URLs).
pub fn valid_destination_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The idempotency key of an event (`cognigy-...`); printable ASCII by construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventKey(String);

impl EventKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A key built by the ingress's parser (printable ASCII by construction).
    pub(crate) fn new(key: String) -> Self {
        Self(key)
    }

    /// Re-wrap a key read back from the queue, where it was stored after parsing.
    pub fn from_stored(key: String) -> Self {
        Self(key)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Envelope,
    EndpointOutput,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Envelope => "event",
            EventKind::EndpointOutput => "endpoint_output",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "event" => Some(EventKind::Envelope),
            "endpoint_output" => Some(EventKind::EndpointOutput),
            _ => None,
        }
    }

    /// The kind a store kept; a job stored before kinds existed (or with an
    /// unknown one) is an envelope, the seeds' only kind.
    pub fn from_stored(s: &str) -> Self {
        Self::parse(s).unwrap_or(EventKind::Envelope)
    }
}

/// An authenticated, validated event, ready to be queued.
#[derive(Debug, Clone)]
pub struct Event {
    pub key: EventKey,
    /// `eventId`, or the derived id (traceId / body hash) of an endpoint output.
    pub event_id: String,
    pub bot_id: Option<String>,
    pub event_type: Option<String>,
    pub kind: EventKind,
    /// Exactly the bytes POSTed to the target.
    pub body: Vec<u8>,
    /// The envelope's `timestamp` in unix ms; `None` when it has none (and
    /// for endpoint outputs, which carry no date).
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttemptOutcome {
    Delivered,
    Retry,
    Failed,
}

/// One delivery attempt, as kept in a job's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub n: u32,
    pub started_at_ms: i64,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub outcome: AttemptOutcome,
}
