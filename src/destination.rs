//! Destinations (SPEC §7): the internal systems a relay delivers to, each with
//! the events it wants ([`Filter`]), how it is delivered to
//! ([`DeliverySettings`]), its static headers, rate limit, age limit and
//! circuit breaker settings.
//!
//! Without a destinations file the relay has one destination, `default`, made
//! from `TARGET_ENDPOINT` and the global settings (`config::serve`); with one,
//! `config::destinations` reads it into a [`DestinationSet`].

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde_json::Value;

pub use crate::delivery::circuit::CircuitSettings;
use crate::delivery::DeliverySettings;

/// The type an endpoint output is routed by (SPEC §7): outputs of a Flow turn
/// carry no event type of their own.
pub const OUTPUT_TYPE: &str = "cognigy.output";

/// A destination's name is checked where the store's layer can use it too.
pub use crate::event::DestinationName;

/// Which events a destination wants: every glob list, bot list and condition
/// must hold.
#[derive(Debug, Clone)]
pub struct Filter {
    /// The globs as written (for `config check`), and compiled.
    pub events: Vec<String>,
    events_set: GlobSet,
    /// One of the globs is `*`: every event type (the default), no matching.
    every_type: bool,
    /// `None`: every bot.
    pub bots: Option<Vec<String>>,
    /// JSON pointer into the received document, and the value it must hold.
    pub conditions: Vec<(String, Value)>,
    /// Each condition's pointer's reference tokens, unescaped.
    condition_tokens: Vec<Vec<String>>,
}

/// A glob that does not compile, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{glob:?} is not a valid glob ({reason})")]
pub struct BadGlob {
    pub glob: String,
    pub reason: String,
}

impl Filter {
    /// Every event of every bot.
    pub fn everything() -> Self {
        Self::new(vec!["*".into()], None, Vec::new()).unwrap_or_else(|_| unreachable!("* compiles"))
    }

    pub fn new(
        events: Vec<String>,
        bots: Option<Vec<String>>,
        conditions: Vec<(String, Value)>,
    ) -> Result<Self, BadGlob> {
        let mut set = GlobSetBuilder::new();
        for g in &events {
            // `*` spans dots: `conversation.*` is every conversation event.
            let glob = Glob::new(g).map_err(|e| BadGlob {
                glob: g.clone(),
                reason: e.kind().to_string(),
            })?;
            set.add(glob);
        }
        let events_set = set.build().map_err(|e| BadGlob {
            glob: events.join(","),
            reason: e.to_string(),
        })?;
        let condition_tokens = conditions
            .iter()
            .map(|(pointer, _)| crate::pointer::tokens(pointer))
            .collect();
        Ok(Self {
            every_type: events.iter().any(|g| g == "*"),
            events,
            events_set,
            bots,
            conditions,
            condition_tokens,
        })
    }

    /// Whether the destination wants an event of `event_type` from `bot`,
    /// whose received document is `doc` (read only when there are
    /// conditions). Each condition's value is read along its pointer alone
    /// (`pointer::pointed`), as the ordering key is: the ingress accepts
    /// documents serde_json cannot build whole (a lone surrogate escape, a
    /// number beyond `f64`, nesting at its limit), and a condition elsewhere
    /// in such a document still holds.
    pub fn wants(&self, event_type: &str, bot: Option<&str>, doc: &[u8]) -> bool {
        if !self.every_type && !self.events_set.is_match(event_type) {
            return false;
        }
        if let Some(bots) = &self.bots {
            if !bot.is_some_and(|b| bots.iter().any(|x| x == b)) {
                return false;
            }
        }
        self.conditions
            .iter()
            .zip(&self.condition_tokens)
            .all(|((_, want), tokens)| crate::pointer::pointed(doc, tokens).as_ref() == Some(want))
    }
}

/// One internal system the relay delivers to.
#[derive(Debug, Clone)]
pub struct Destination {
    pub name: DestinationName,
    pub filter: Filter,
    /// Where and how: URL, headers, limits, retries, age limit, circuit.
    pub delivery: DeliverySettings,
}

/// Every destination of a relay, in the file's order (the first one's job id
/// is the answer's `jobId`, SPEC §7).
#[derive(Debug, Clone)]
pub struct DestinationSet {
    pub list: Vec<Destination>,
    /// The file they came from; `None` for the one `default` destination.
    pub file: Option<std::path::PathBuf>,
}

impl DestinationSet {
    /// The destinations that want this event, in order.
    pub fn routes<'a>(
        &'a self,
        event_type: &'a str,
        bot: Option<&'a str>,
        doc: &'a [u8],
    ) -> impl Iterator<Item = &'a Destination> + 'a {
        self.list
            .iter()
            .filter(move |d| d.filter.wants(event_type, bot, doc))
    }

    pub fn get(&self, name: &DestinationName) -> Option<&Destination> {
        self.list.iter().find(|d| &d.name == name)
    }

    /// What `cogrelay config check` prints: every resolved setting, the URL's
    /// credentials and query, header values and the signing secret as `***`.
    pub fn resolved(&self) -> Value {
        let list: Vec<Value> = self
            .list
            .iter()
            .map(|d| {
                let headers: serde_json::Map<String, Value> = d
                    .delivery
                    .headers
                    .keys()
                    .map(|k| (k.as_str().to_string(), Value::from("***")))
                    .collect();
                serde_json::json!({
                    "name": d.name,
                    "url": crate::secret::mask_url(&d.delivery.target),
                    "events": d.filter.events,
                    "bots": d.filter.bots,
                    "where": d.filter.conditions.iter().cloned().collect::<serde_json::Map<_, _>>(),
                    "headers": headers,
                    "signing_secret": d.delivery.signing_key.as_ref().map(|_| "***"),
                    "concurrency": d.delivery.concurrency,
                    "rate_limit": d.delivery.rate_limit,
                    "timeout_ms": d.delivery.delivery_timeout.as_millis() as u64,
                    "attempts": d.delivery.attempts,
                    "backoff_ms": d.delivery.backoff.base.as_millis() as u64,
                    "max_age_secs": d.delivery.max_age.as_secs(),
                    "circuit": d.delivery.circuit,
                    "ordering": d.delivery.ordering.as_ref().map(|o| serde_json::json!({
                        "ordering": "session",
                        "ordering_key": o.pointer,
                        "on_failure": if o.hold { "hold" } else { "continue" },
                    })),
                })
            })
            .collect();
        serde_json::json!({
            "file": self.file.as_ref().map(|f| f.display().to_string()),
            "destinations": list,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(events: &[&str], bots: Option<&[&str]>, cond: &[(&str, Value)]) -> Filter {
        Filter::new(
            events.iter().map(|s| s.to_string()).collect(),
            bots.map(|b| b.iter().map(|s| s.to_string()).collect()),
            cond.iter()
                .map(|(p, v)| (p.to_string(), v.clone()))
                .collect(),
        )
        .expect("valid")
    }

    #[test]
    fn globs_bots_and_conditions_must_all_hold() {
        let doc = json!({"payload": {"channel": "voice"}}).to_string();
        let doc = doc.as_bytes();
        let f = filter(
            &["conversation.*"],
            Some(&["bot-sales"]),
            &[("/payload/channel", json!("voice"))],
        );
        let table: &[(&str, Option<&str>, &[u8], bool)] = &[
            ("conversation.started", Some("bot-sales"), doc, true),
            ("conversation.a.b", Some("bot-sales"), doc, true),
            ("handover.requested", Some("bot-sales"), doc, false),
            ("conversation.started", Some("bot-other"), doc, false),
            ("conversation.started", None, doc, false),
            ("conversation.started", Some("bot-sales"), b"", false),
            ("conversation.started", Some("bot-sales"), b"{}", false),
        ];
        for (ty, bot, doc, want) in table {
            assert_eq!(f.wants(ty, *bot, doc), *want, "{ty} {bot:?}");
        }
        let chat = json!({"payload": {"channel": "chat"}}).to_string();
        assert!(!f.wants("conversation.started", Some("bot-sales"), chat.as_bytes()));
        assert!(Filter::everything().wants(OUTPUT_TYPE, None, b""));
        assert!(filter(&["cognigy.output"], None, &[]).wants(OUTPUT_TYPE, None, b""));
        assert!(!filter(&["conversation.*"], None, &[]).wants(OUTPUT_TYPE, None, b""));
    }

    /// Documents the ingress accepts but serde_json cannot build whole: a
    /// lone surrogate escape (what JavaScript writes for half an emoji), a
    /// number beyond `f64`, nesting at serde_json's limit. A condition on
    /// another member still holds (these events were answered `unrouted`
    /// and dropped when the whole document was built for the conditions).
    #[test]
    fn conditions_hold_in_documents_serde_json_cannot_build_whole() {
        let f = filter(&["*"], None, &[("/payload/channel", json!("voice"))]);
        let deep = format!("{}{}", "[".repeat(126), "]".repeat(126));
        for odd in [r#""hi \ud83d""#, "1e400", deep.as_str()] {
            for doc in [
                format!(r#"{{"payload":{{"channel":"voice","odd":{odd}}}}}"#),
                format!(r#"{{"payload":{{"odd":{odd},"channel":"voice"}}}}"#),
            ] {
                assert!(
                    serde_json::from_str::<Value>(&doc).is_err(),
                    "not built whole: {doc:.80}"
                );
                assert!(f.wants("t", None, doc.as_bytes()), "{doc:.80}");
                let chat = doc.replace("voice", "chat");
                assert!(!f.wants("t", None, chat.as_bytes()), "{chat:.80}");
            }
        }
        // A member written twice: the last, the one delivered (the envelope's
        // `payload` is its last).
        let twice = r#"{"payload":{"channel":"chat"},"payload":{"channel":"voice"}}"#;
        assert!(f.wants("t", None, twice.as_bytes()));
        let twice = r#"{"payload":{"channel":"voice","channel":"chat"}}"#;
        assert!(!f.wants("t", None, twice.as_bytes()));
        let name = r#"{"payload":{"\ud83d":1,"channel":"voice"}}"#;
        assert!(f.wants("t", None, name.as_bytes()), "a lone surrogate name");
        let at_the_odd = filter(&["*"], None, &[("/payload/text", json!("hi"))]);
        let doc = r#"{"payload":{"text":"hi \ud83d"}}"#;
        assert!(!at_the_odd.wants("t", None, doc.as_bytes()));
    }

    #[test]
    fn a_bad_glob_is_named() {
        let err = Filter::new(vec!["conv[".into()], None, Vec::new()).expect_err("bad");
        assert!(err.to_string().contains("\"conv[\""), "{err}");
    }

    #[test]
    fn names_are_short_lowercase_words() {
        for ok in ["crm", "data-warehouse", "t_1", "a", &"x".repeat(32)] {
            assert!(DestinationName::parse(ok).is_some(), "{ok}");
        }
        for bad in ["", "CRM", "a b", "a.b", "crm/1", &"x".repeat(33), "é"] {
            assert!(DestinationName::parse(bad).is_none(), "{bad}");
        }
    }
}
