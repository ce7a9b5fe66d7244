//! The domain core: an event as the relay knows it once accepted, and one
//! delivery attempt with its outcome. Imports no HTTP, queue or settings code:
//! everything else is written in these terms.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// A destination's name: `[a-z0-9_-]`, 1 to 32 characters (it becomes part
/// of queue names, metric labels and URLs). The one type every layer names a
/// destination with; [`DestinationName::DEFAULT`] is the destination of a
/// relay without a destinations file (SPEC §7), and of every job stored
/// before destinations existed.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DestinationName(Cow<'static, str>);

/// The one place the `default` destination's name is written.
const DEFAULT_NAME: &str = "default";

impl DestinationName {
    pub const DEFAULT: DestinationName = DestinationName(Cow::Borrowed(DEFAULT_NAME));

    /// The name, if it keeps the rule.
    pub fn parse(name: &str) -> Option<Self> {
        valid(name).then(|| Self::known(name))
    }

    /// A name the relay or a store wrote (empty: a job stored before
    /// destinations, the default one's), taken as it is.
    pub(crate) fn known(name: &str) -> Self {
        match name {
            "" => Self::DEFAULT,
            name if name == DEFAULT_NAME => Self::DEFAULT,
            name => Self(Cow::Owned(name.to_string())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_default(&self) -> bool {
        self.as_str() == DEFAULT_NAME
    }
}

/// The rule of a destination's name.
fn valid(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl std::ops::Deref for DestinationName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for DestinationName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// As the text it is (`"crm"`), in messages that quote a name.
impl std::fmt::Debug for DestinationName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The name itself, padded as asked (`{name:<32}` lines up a table).
impl std::fmt::Display for DestinationName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(&self.0)
    }
}

impl PartialEq<str> for DestinationName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for DestinationName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
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

impl Event {
    /// For an envelope whose ids hold a `-`, the one kind of event that can
    /// share its key with another envelope: its botId, and
    /// ([`KeySharer::own_record`]) the record it is deduplicated under when
    /// the key's record is another event's. (An endpoint output's key ends
    /// with a digest of its body: only an envelope whose eventId were made
    /// to end with that digest would share it, and is not told apart.)
    ///
    /// `cognigy-{botId}-{eventId}` (SPEC §3.1) names (`bot-a`, `x`) and
    /// (`bot`, `a-x`) alike: of two events sharing a key, one has a `-` in
    /// its botId and the other in its eventId (a key of ids without `-` has
    /// one split). The queue keeps the key as the record (as before, and as
    /// relays of an earlier version on the same queue do), with a botId that
    /// holds a `-` beside it ([`KeySharer::bot_is_kept`]). An event that
    /// finds the key's record another event's ([`KeySharer::is_other`]) is
    /// deduplicated under its own record,
    /// `cognigy:{bytes of botId}:{botId}-{eventId}`, which names one event
    /// and is no event's key (they begin `cognigy-`).
    pub fn key_sharer(&self) -> Option<KeySharer<'_>> {
        let bot = self.bot_id.as_deref()?;
        let shares =
            self.kind == EventKind::Envelope && (bot.contains('-') || self.event_id.contains('-'));
        shares.then_some(KeySharer {
            bot,
            event_id: &self.event_id,
        })
    }
}

/// An envelope that may share its key with another event (`Event::key_sharer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySharer<'a> {
    pub bot: &'a str,
    event_id: &'a str,
}

impl KeySharer<'_> {
    /// Whether its botId holds a `-`, and so is kept beside the key's
    /// record. Of two events sharing a key, the one with the longer botId
    /// has a `-` in it: when the key's record keeps no botId, it is an
    /// event's whose botId has none, and so this event's (same key, same
    /// split) exactly when this botId has none either. (A record of an
    /// earlier version keeps none: an envelope whose botId holds a `-`,
    /// recorded by it and sent again within the TTL, is stored again.)
    pub fn bot_is_kept(&self) -> bool {
        self.bot.contains('-')
    }

    /// Whether the key's record, keeping `owner` (`None`: no botId), is
    /// another event's.
    pub fn is_other(&self, owner: Option<&str>) -> bool {
        match owner {
            Some(o) => o != self.bot,
            None => self.bot_is_kept(),
        }
    }

    /// Its own dedup record, for when the key's is another event's.
    pub fn own_record(&self) -> String {
        format!("cognigy:{}:{}-{}", self.bot.len(), self.bot, self.event_id)
    }
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

#[cfg(test)]
mod tests {
    use super::DestinationName;

    #[test]
    fn a_destination_name_keeps_the_rule_and_reads_as_its_text() {
        let crm = DestinationName::parse("crm").expect("valid");
        assert_eq!(format!("{crm:<6}|"), "crm   |", "padded in tables");
        assert_eq!(format!("{crm:?}"), "\"crm\"", "quoted in messages");
        assert!(DestinationName::parse("CRM").is_none());
        assert!(DestinationName::parse("").is_none());
        assert_eq!(DestinationName::known(""), DestinationName::DEFAULT);
        assert!(DestinationName::known("default").is_default());
        assert!(!crm.is_default());
    }
}
