//! Parsing an ingress body into an [`Event`]: the two shapes of SPEC §3.1.
//!
//! * **Event envelope** `{botId, eventId, type, payload, timestamp}`: key
//!   `cognigy-{botId}-{eventId}`, delivers `payload` (JSON `null` when absent).
//! * **Endpoint output** `{userId, sessionId, AIOutput|text|data}` (what a real
//!   Cognigy Webhook Endpoint posts, one request per output of a Flow turn, the
//!   turn's outputs sharing one `AIOutput.traceId`): key
//!   `cognigy-{sessionId}-{traceId}-{first 16 hex digits of sha256(body)}`, so
//!   each distinct output is its own event and only a byte-identical resend is
//!   a duplicate; without a traceId, `cognigy-{sessionId}-{random uuid}`: every
//!   request is its own event (a bot may say the same thing twice). Delivers
//!   the whole body.
//!
//! An envelope's `timestamp` (RFC 3339, or unix seconds or milliseconds) is
//! parsed here; the ingress refuses one outside the replay window.
//!
//! A body is an envelope when it has any of `botId`/`eventId`/`type`, an endpoint
//! output when it has any of `userId`/`sessionId`/`AIOutput` (and none of the
//! former); anything else is reported as an envelope missing its fields.
//! The top level is parsed into borrowed raw values, so the payload is delivered
//! byte for byte as Cognigy sent it and is never re-serialised.
//!
//! Identifiers travel in HTTP headers (`X-Event-Id`, `Idempotency-Key`), so they
//! must be printable ASCII (no control characters), at most 256 bytes; an
//! `eventId` (which is `X-Event-Id`, and ends the key) has no space at
//! either end, which HTTP would drop.

use std::borrow::Cow;
use std::fmt;

use ring::digest::{digest, SHA256};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

pub use crate::event::{Event, EventKey, EventKind};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("Body is not valid JSON: {0}")]
    NotJson(String),
    #[error("Body must be a JSON object")]
    NotObject,
    #[error("Missing required Cognigy webhook fields")]
    Missing(Vec<&'static str>),
    #[error("Invalid Cognigy webhook fields: {0} must be a non-empty string of printable ASCII, at most 256 bytes{dots}", dots = dots_refused(.0))]
    Invalid(&'static str),
    #[error("Invalid Cognigy webhook fields: eventId must not begin or end with a space (it is sent as the X-Event-Id header, which drops them)")]
    SpacedEventId,
    #[error("Invalid Cognigy webhook fields: timestamp must be an RFC 3339 date (e.g. 2026-12-01T10:30:00Z) or unix time in seconds or milliseconds")]
    BadTimestamp,
}

const ENVELOPE_FIELDS: [&str; 3] = ["botId", "eventId", "type"];
const OUTPUT_FIELDS: [&str; 2] = ["userId", "sessionId"];
const MAX_ID_BYTES: usize = 256;
/// Deepest nesting accepted (serde_json's own limit for values it builds).
/// Checked up front because raw values are skipped without a depth limit.
pub const MAX_DEPTH: usize = 128;

/// The body's top-level fields, in order; a name given twice counts with its
/// last value, as in a map. A few lookups among a few fields: a list is
/// cheaper than a hash map, whose SipHash of each name, and a `String` per
/// name, cost ~3,000 instructions an event. A name is borrowed from the body
/// unless it has escapes.
struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    fn contains_key(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // As serde words it for a map (the error a client reads).
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(8);
                while let Some((Name(n), v)) = map.next_entry::<Name<'de>, &'de RawValue>()? {
                    fields.push((n, v));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(Object)
    }
}

/// A field's name: borrowed when the body has it as it is.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(Text)
    }
}

pub fn parse(body: &[u8]) -> Result<Event, EnvelopeError> {
    if nesting_exceeds(body, MAX_DEPTH) {
        return Err(EnvelopeError::NotJson(format!(
            "nested deeper than {MAX_DEPTH} levels"
        )));
    }
    let fields: Fields<'_> = match serde_json::from_slice(body) {
        Ok(f) => f,
        Err(e) => {
            // Only on the error path: tell "not JSON" from "JSON, but not an
            // object" (which skipping a value does not check to be UTF-8).
            if let Err(u) = std::str::from_utf8(body) {
                return Err(EnvelopeError::NotJson(format!(
                    "not UTF-8 (byte {} is not)",
                    u.valid_up_to()
                )));
            }
            // An object whose fields could not be read (a top-level name
            // that is a lone surrogate escape, which skipping lets through)
            // is told as serde_json tells it, not as "not an object".
            let object = body.trim_ascii_start().starts_with(b"{");
            return Err(
                match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                    Ok(_) if !object => EnvelopeError::NotObject,
                    _ => EnvelopeError::NotJson(e.to_string()),
                },
            );
        }
    };
    let has = |name: &str| fields.contains_key(name);
    if !ENVELOPE_FIELDS.iter().any(|f| has(f))
        && (OUTPUT_FIELDS.iter().any(|f| has(f)) || has("AIOutput"))
    {
        parse_output(&fields, body)
    } else {
        parse_envelope(&fields)
    }
}

fn parse_envelope(fields: &Fields<'_>) -> Result<Event, EnvelopeError> {
    let [bot, event, kind] = required(fields, ENVELOPE_FIELDS)?;
    if let Some(name) = [("botId", &bot), ("eventId", &event)]
        .into_iter()
        .find_map(|(name, id)| is_dot_segment(id).then_some(name))
    {
        return Err(EnvelopeError::Invalid(name));
    }
    // `e2 ` would reach a target as `e2`'s id (and the end of its key).
    if event.starts_with(' ') || event.ends_with(' ') {
        return Err(EnvelopeError::SpacedEventId);
    }
    let body = fields
        .get("payload")
        .map(|raw| raw.get().as_bytes().to_vec())
        .unwrap_or_else(|| b"null".to_vec());
    let timestamp_ms = match fields.get("timestamp") {
        None => None,
        Some(raw) => timestamp_ms(raw.get()).ok_or(EnvelopeError::BadTimestamp)?,
    };
    Ok(Event {
        key: EventKey::new(format!("cognigy-{bot}-{event}")),
        event_id: event,
        bot_id: Some(bot),
        event_type: Some(kind),
        kind: EventKind::Envelope,
        body,
        timestamp_ms,
    })
}

/// Unix ms of a JSON `timestamp`: `null` is none; an RFC 3339 string; a
/// number (or a string of digits) is unix seconds, or milliseconds from
/// 10^11 on (the year 5138 in seconds). `None` (the outer) is not a date.
fn timestamp_ms(raw: &str) -> Option<Option<i64>> {
    const MS_FROM: i64 = 100_000_000_000;
    let unix = |n: i64| {
        Some(if n.unsigned_abs() >= MS_FROM.unsigned_abs() {
            n
        } else {
            n.saturating_mul(1000)
        })
    };
    if let Ok(n) = raw.parse::<i64>() {
        return Some(unix(n));
    }
    match serde_json::from_str::<Option<Cow<'_, str>>>(raw).ok()? {
        None => Some(None),
        Some(s) => match s.trim().parse::<i64>() {
            Ok(n) => Some(unix(n)),
            Err(_) => time::OffsetDateTime::parse(
                s.trim(),
                &time::format_description::well_known::Rfc3339,
            )
            .ok()
            .map(|t| Some((t.unix_timestamp_nanos() / 1_000_000) as i64)),
        },
    }
}

fn parse_output(fields: &Fields<'_>, body: &[u8]) -> Result<Event, EnvelopeError> {
    let [_user, session] = required(fields, OUTPUT_FIELDS)?;
    #[derive(serde::Deserialize)]
    struct AiOutput<'a> {
        #[serde(rename = "traceId", borrow)]
        trace_id: Option<Cow<'a, str>>,
    }
    let trace = fields
        .get("AIOutput")
        .and_then(|raw| serde_json::from_str::<AiOutput<'_>>(raw.get()).ok())
        .and_then(|o| o.trace_id)
        .filter(|t| valid_id(t));
    let derived = match trace {
        Some(t) => {
            let sum = digest(&SHA256, body);
            format!("{t}-{}", hex::encode(&sum.as_ref()[..8]))
        }
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    Ok(Event {
        key: EventKey::new(format!("cognigy-{session}-{derived}")),
        event_id: derived,
        bot_id: None,
        event_type: None,
        kind: EventKind::EndpointOutput,
        body: body.to_vec(),
        timestamp_ms: None,
    })
}

/// The named fields as strings, or every missing one (absent, null or empty),
/// or the first one of the wrong type or shape.
fn required<const N: usize>(
    fields: &Fields<'_>,
    names: [&'static str; N],
) -> Result<[String; N], EnvelopeError> {
    let mut missing = Vec::new();
    let mut invalid = None;
    let values = names.map(|name| {
        let Some(raw) = fields.get(name) else {
            missing.push(name);
            return String::new();
        };
        match serde_json::from_str::<Option<Cow<'_, str>>>(raw.get()) {
            Ok(None) => missing.push(name),
            Ok(Some(s)) if s.is_empty() => missing.push(name),
            Ok(Some(s)) if valid_id(&s) => return s.into_owned(),
            _ => {
                invalid.get_or_insert(name);
            }
        }
        String::new()
    });
    if !missing.is_empty() {
        return Err(EnvelopeError::Missing(missing));
    }
    if let Some(name) = invalid {
        return Err(EnvelopeError::Invalid(name));
    }
    Ok(values)
}

/// True when brackets outside strings nest deeper than `max`. One linear pass;
/// malformed input is left for the JSON parser to report. A string's
/// inside is skipped to its next quote or backslash with `memchr2` (most of
/// a body's bytes are in strings; byte by byte, the scan cost ~3,000
/// instructions for a 300-byte event).
fn nesting_exceeds(body: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        i += 1;
        match b {
            b'"' => loop {
                // In a string: to its closing quote, past escapes.
                let rest = body.get(i..).unwrap_or_default();
                let Some(at) = memchr::memchr2(b'"', b'\\', rest) else {
                    return false;
                };
                i += at + 1;
                if body[i - 1] == b'"' {
                    break;
                }
                i += 1; // the escaped byte
            },
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_BYTES && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// `.` and `..`: ids that a URL library would resolve, not keep, when they
/// become path segments (`botId` and `eventId` do, in the event lookup).
fn is_dot_segment(s: &str) -> bool {
    s == "." || s == ".."
}

/// What the error of an invalid `field` adds: the ids that become path
/// segments may not be `.` or `..` (an output's `sessionId` may).
fn dots_refused(field: &str) -> &'static str {
    if ENVELOPE_FIELDS[..2].contains(&field) {
        ", other than . and .."
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_keeps_payload_bytes_and_builds_the_key() {
        let e = parse(br#"{"botId":"b1","eventId":"e1","type":"message","payload":{"z":1, "a":[2]},"timestamp":"2026-12-01T10:30:00Z"}"#)
            .expect("valid");
        assert_eq!(e.key.as_str(), "cognigy-b1-e1");
        assert_eq!(e.event_id, "e1");
        assert_eq!(e.kind, EventKind::Envelope);
        assert_eq!(e.body, br#"{"z":1, "a":[2]}"#);
    }

    /// `cognigy-{botId}-{eventId}` names (`bot-a`, `x`) and (`bot`, `a-x`)
    /// alike: each has a record of its own for when the key is the other's.
    #[test]
    fn envelopes_that_share_a_key_have_records_of_their_own() {
        let envelope = |bot: &str, id: &str| {
            parse(format!(r#"{{"botId":"{bot}","eventId":"{id}","type":"t"}}"#).as_bytes())
                .expect("valid")
        };
        let (a, b) = (envelope("bot-a", "x"), envelope("bot", "a-x"));
        assert_eq!(a.key, b.key, "the key SPEC §3.1 gives both");
        let own = |e: &Event| e.key_sharer().map(|k| (k.bot.to_string(), k.own_record()));
        assert_eq!(own(&a), Some(("bot-a".into(), "cognigy:5:bot-a-x".into())));
        assert_eq!(own(&b), Some(("bot".into(), "cognigy:3:bot-a-x".into())));
        let (ka, kb) = (a.key_sharer().expect("a"), b.key_sharer().expect("b"));
        assert!(
            ka.bot_is_kept() && !kb.bot_is_kept(),
            "the longer botId is kept"
        );
        assert!(kb.is_other(Some("bot-a")) && !ka.is_other(Some("bot-a")));
        // No botId kept: the record's event has none with a `-`, as b.
        assert!(ka.is_other(None) && !kb.is_other(None));
        assert_eq!(
            envelope("b1", "e1").key_sharer(),
            None,
            "one split: no other event has it"
        );
        let output = parse(br#"{"userId":"u","sessionId":"s-1","AIOutput":{"traceId":"t-1"}}"#)
            .expect("valid");
        assert_eq!(
            output.key_sharer(),
            None,
            "a digest of its body ends its key"
        );
    }

    #[test]
    fn envelope_without_payload_delivers_null() {
        let e = parse(br#"{"botId":"b","eventId":"e","type":"t"}"#).expect("valid");
        assert_eq!(e.body, b"null");
    }

    #[test]
    fn endpoint_output_key_is_trace_id_and_body_digest_else_fresh() {
        let body = br#"{"userId":"u","sessionId":"s1","AIOutput":{"traceId":"tr-9","text":"hi"}}"#;
        let e = parse(body).expect("valid");
        // The RustCrypto crate as the reference for ring's digest.
        use sha2::{Digest as _, Sha256};
        let digest16 = &hex::encode(Sha256::digest(body))[..16];
        assert_eq!(e.key.as_str(), format!("cognigy-s1-tr-9-{digest16}"));
        assert_eq!(e.event_id, format!("tr-9-{digest16}"));
        assert_eq!(e.kind, EventKind::EndpointOutput);
        assert_eq!(e.body, body);
        assert_eq!(
            parse(body).expect("valid").key,
            e.key,
            "a resend is the same key"
        );
        let other = br#"{"userId":"u","sessionId":"s1","AIOutput":{"traceId":"tr-9","text":"ho"}}"#;
        assert_ne!(
            parse(other).expect("valid").key,
            e.key,
            "another output of the turn"
        );

        let body = br#"{"userId":"u","sessionId":"s1","text":"hi","data":{}}"#;
        let (a, b) = (parse(body).expect("valid"), parse(body).expect("valid"));
        assert!(a.key.as_str().starts_with("cognigy-s1-"));
        assert_ne!(
            a.key, b.key,
            "without a traceId every request is its own event"
        );
    }

    #[test]
    fn envelope_timestamps_in_every_accepted_form() {
        let at = |ts: &str| {
            parse(
                format!(r#"{{"botId":"b","eventId":"e","type":"t","timestamp":{ts}}}"#).as_bytes(),
            )
            .map(|e| e.timestamp_ms)
        };
        let ms = 1_795_356_423_000;
        assert_eq!(at(r#""2026-11-22T14:07:03Z""#), Ok(Some(ms)));
        assert_eq!(at(r#""2026-11-22T15:07:03.000+01:00""#), Ok(Some(ms)));
        assert_eq!(at("1795356423"), Ok(Some(ms)));
        assert_eq!(at("1795356423000"), Ok(Some(ms)));
        assert_eq!(at(r#""1795356423""#), Ok(Some(ms)));
        assert_eq!(at("null"), Ok(None));
        // As far as a number goes, either way: a date, not an overflow.
        assert_eq!(at("-9223372036854775808"), Ok(Some(i64::MIN)));
        assert_eq!(at("9223372036854775807"), Ok(Some(i64::MAX)));
        assert_eq!(at(r#""yesterday""#), Err(EnvelopeError::BadTimestamp));
        assert_eq!(at("{}"), Err(EnvelopeError::BadTimestamp));
        assert_eq!(
            parse(br#"{"botId":"b","eventId":"e","type":"t"}"#).map(|e| e.timestamp_ms),
            Ok(None)
        );
    }

    #[test]
    fn missing_fields_are_all_named() {
        assert_eq!(
            parse(br#"{"botId":"b","type":""}"#).unwrap_err(),
            EnvelopeError::Missing(vec!["eventId", "type"])
        );
        assert_eq!(
            parse(br#"{}"#).unwrap_err(),
            EnvelopeError::Missing(vec!["botId", "eventId", "type"])
        );
        assert_eq!(
            parse(br#"{"userId":"u","AIOutput":{}}"#).unwrap_err(),
            EnvelopeError::Missing(vec!["sessionId"])
        );
    }

    #[test]
    fn wrong_types_and_header_unsafe_ids_are_invalid() {
        assert_eq!(
            parse(br#"{"botId":7,"eventId":"e","type":"t"}"#).unwrap_err(),
            EnvelopeError::Invalid("botId")
        );
        assert_eq!(
            parse(br#"{"botId":"b","eventId":"e\r\nX-Evil: 1","type":"t"}"#).unwrap_err(),
            EnvelopeError::Invalid("eventId")
        );
        let long = format!(
            r#"{{"botId":"b","eventId":"{}","type":"t"}}"#,
            "x".repeat(257)
        );
        assert_eq!(
            parse(long.as_bytes()).unwrap_err(),
            EnvelopeError::Invalid("eventId")
        );
        for spaced in [" e", "e ", " "] {
            let body = format!(r#"{{"botId":"b","eventId":"{spaced}","type":"t"}}"#);
            assert_eq!(
                parse(body.as_bytes()).unwrap_err(),
                EnvelopeError::SpacedEventId,
                "{spaced:?}: a header would not keep its spaces"
            );
        }
        // An output's ids are no path segments: dots are ids like others,
        // and its error does not name them.
        assert!(parse(br#"{"userId":"..","sessionId":".","text":"t"}"#).is_ok());
        let long = format!(
            r#"{{"userId":"u","sessionId":"{}","text":"t"}}"#,
            "s".repeat(257)
        );
        let err = parse(long.as_bytes()).unwrap_err();
        assert_eq!(err, EnvelopeError::Invalid("sessionId"));
        assert!(!err.to_string().contains(".."), "{err}");
        assert!(EnvelopeError::Invalid("botId")
            .to_string()
            .ends_with("other than . and .."));
        // Inside a key or a body, spaces stay: these are ids as before.
        assert!(parse(br#"{"botId":" b ","eventId":"e f","type":"t "}"#).is_ok());
        assert!(parse(br#"{"userId":"u ","sessionId":" s","AIOutput":{"traceId":" t"}}"#).is_ok());
        for dots in [".", ".."] {
            let body = format!(r#"{{"botId":"{dots}","eventId":"e","type":"t"}}"#);
            assert_eq!(
                parse(body.as_bytes()).unwrap_err(),
                EnvelopeError::Invalid("botId")
            );
            let body = format!(r#"{{"botId":"b","eventId":"{dots}","type":"t"}}"#);
            assert_eq!(
                parse(body.as_bytes()).unwrap_err(),
                EnvelopeError::Invalid("eventId")
            );
        }
    }

    /// JSON is UTF-8: a body that is not is said to be so, not "not an
    /// object" (as skipping its bad string first said).
    #[test]
    fn a_body_not_utf8_is_said_to_be() {
        for body in [
            &b"{\"userId\":\"u\",\"sessionId\":\"s\",\"text\":\"\xff\"}"[..],
            b"{\"botId\":\"b\",\"eventId\":\"e\",\"type\":\"t\",\"payload\":{\"x\":\"\xff\"}}",
        ] {
            let err = parse(body).unwrap_err().to_string();
            assert!(err.contains("not UTF-8"), "{err}");
        }
    }

    #[test]
    fn not_json_and_not_object_are_told_apart() {
        assert!(matches!(
            parse(b"{nope").unwrap_err(),
            EnvelopeError::NotJson(_)
        ));
        assert!(matches!(
            parse(b"\xff\xfe").unwrap_err(),
            EnvelopeError::NotJson(_)
        ));
        assert_eq!(parse(b"[1,2]").unwrap_err(), EnvelopeError::NotObject);
        assert_eq!(parse(b"\"str\"").unwrap_err(), EnvelopeError::NotObject);
        // A top-level name serde_json cannot read: said as it says it (it
        // was "must be a JSON object").
        let err = parse(br#"{"botId":"b","eventId":"e","type":"t","\udc00":1}"#).unwrap_err();
        assert!(err.to_string().contains("surrogate"), "{err}");
    }

    #[test]
    fn deep_nesting_is_rejected_not_a_stack_overflow() {
        let nested = |n: usize| {
            format!(
                r#"{{"botId":"b","eventId":"e","type":"t","payload":{}{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert!(matches!(
            parse(nested(100_000).as_bytes()),
            Err(EnvelopeError::NotJson(_))
        ));
        assert!(
            matches!(
                parse(nested(MAX_DEPTH).as_bytes()),
                Err(EnvelopeError::NotJson(_))
            ),
            "envelope + 128 > 128"
        );
        assert!(parse(nested(MAX_DEPTH - 1).as_bytes()).is_ok());
        // Brackets inside strings do not count.
        let in_string = format!(
            r#"{{"botId":"b","eventId":"e","type":"t","payload":"{}\"{}"}}"#,
            "[".repeat(500),
            "{".repeat(500)
        );
        assert!(parse(in_string.as_bytes()).is_ok());
    }

    /// The byte-by-byte scan `nesting_exceeds` replaced, as the reference.
    fn nesting_exceeds_bytewise(body: &[u8], max: usize) -> bool {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &b in body {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > max {
                        return true;
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        false
    }

    proptest::proptest! {
        /// Skipping strings with `memchr2` finds what the byte-by-byte scan
        /// finds, on any mix of quotes, escapes and brackets (unterminated
        /// strings and a trailing backslash included).
        #[test]
        fn the_nesting_scan_agrees_with_the_bytewise_one(
            body in proptest::collection::vec(
                proptest::sample::select(b"\"\\[]{}a".to_vec()), 0..64),
            max in 0usize..6,
        ) {
            proptest::prop_assert_eq!(
                nesting_exceeds(&body, max),
                nesting_exceeds_bytewise(&body, max)
            );
        }
    }
}
