//! The value at a JSON pointer (RFC 6901) in a document, read from its
//! bytes one level at a time: at each object or array on the pointer's
//! path, the member or element wanted is taken as raw text (nothing built)
//! and the rest skipped; only the value at the end is built. The ordering
//! key of every event of an ordered destination, and each `where`
//! condition, is read this way (docs/destinations.md); building each object
//! on the way as a map cost about a tenth of the ingest's CPU.
//!
//! Of a name written twice in one object, the last is read, as
//! `serde_json::Value` and the envelope's own fields read it: a condition
//! or a key read from the first routed or ordered an event by a member the
//! target never saw as its value. What serde_json cannot build (a lone
//! surrogate escape, a number beyond `f64`, nesting at its limit) may be
//! anywhere else, in a member name or an earlier member of the same name,
//! as the ingress lets it through: it is skipped, never built.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// The reference tokens of a JSON `pointer` (RFC 6901, checked by the
/// caller), unescaped: `~1` is `/`, `~0` is `~`.
pub fn tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// The value at the pointer whose reference tokens (unescaped) are `tokens`
/// in the JSON document `bytes`, as `serde_json::Value::pointer` finds it;
/// `None` when there is none, or it is not JSON that serde_json can build.
pub fn pointed<T: AsRef<str>>(bytes: &[u8], tokens: &[T]) -> Option<Value> {
    let mut text = std::str::from_utf8(bytes).ok()?;
    for token in tokens {
        let token = token.as_ref();
        let mut de = serde_json::Deserializer::from_str(text);
        let next = match text.trim_start().as_bytes().first() {
            Some(b'{') => de.deserialize_map(Member(token)),
            Some(b'[') => de.deserialize_seq(Element(token)),
            // A scalar where the pointer goes on: nothing there.
            _ => return None,
        };
        text = next.ok()??.get();
    }
    serde_json::from_str(text).ok()
}

/// The last member named so in an object, as raw text.
struct Member<'t>(&'t str);

impl<'de> Visitor<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut last = None;
        while let Some(is) = map.next_key_seed(NameIs(self.0))? {
            if is {
                last = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(last)
    }
}

/// The element at an index (digits without a leading zero, as RFC 6901
/// and serde_json say) of an array, as raw text.
struct Element<'t>(&'t str);

impl<'de> Visitor<'de> for Element<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let want = self.0;
        let plain =
            want.bytes().all(|b| b.is_ascii_digit()) && !want.starts_with('0') || want == "0";
        let mut found = None;
        if let Some(index) = plain.then(|| want.parse::<usize>().ok()).flatten() {
            let mut skipped = 0;
            while skipped < index && seq.next_element::<IgnoredAny>()?.is_some() {
                skipped += 1;
            }
            if skipped == index {
                found = seq.next_element::<&'de RawValue>()?;
            }
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(found)
    }
}

/// Whether a member's name is the one wanted, read as bytes without being
/// kept (a name that is a lone surrogate escape is no name wanted, and no
/// error).
struct NameIs<'w>(&'w str);

impl<'de> DeserializeSeed<'de> for NameIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de> Visitor<'de> for NameIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_bytes<E>(self, name: &[u8]) -> Result<bool, E> {
        Ok(name == self.0.as_bytes())
    }

    fn visit_str<E>(self, name: &str) -> Result<bool, E> {
        Ok(name == self.0)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::pointed;

    fn at(bytes: &[u8], pointer: &str) -> Option<serde_json::Value> {
        pointed(bytes, &super::tokens(pointer))
    }

    #[test]
    fn a_pointer_is_read_along_its_path_as_serde_json_reads_it() {
        let doc = json!({
            "payload": {"sessionId": "s-1", "n": 7, "a/b": {"~x": [1, "two", {"k": true}]}},
            "x": null,
            "after": [1, {"deep": [2, 3]}]
        });
        let bytes = serde_json::to_vec(&doc).expect("json");
        for pointer in [
            "/payload/sessionId",
            "/payload/n",
            "/payload/a~1b/~0x/1",
            "/payload/a~1b/~0x/2/k",
            "/payload/a~1b/~0x/01",
            "/payload/a~1b/~0x/+1",
            "/payload/sessionId/0",
            "/payload/n/x",
            "/x",
            "/x/y",
            "/nope",
            "/payload/a~1b/~0x/9",
            "/after/1/deep/1",
            "",
        ] {
            assert_eq!(
                at(&bytes, pointer),
                doc.pointer(pointer).cloned(),
                "{pointer}"
            );
        }
        assert_eq!(at(b"not json", "/a"), None);
        // The object on the path is read to its end.
        assert_eq!(at(br#"{"a": 1, "b": tru"#, "/a"), None);
        assert_eq!(at(br#"{"b": tru, "a": 1}"#, "/a"), None);
        // A name written twice: the last, as serde_json's `Value` reads it
        // (and the envelope's fields: its `payload` is the last one).
        for (doc, pointer) in [
            (r#"{"a": 1, "a": 2}"#, "/a"),
            (r#"{"a": {"b": 1}, "a": {"c": 2}}"#, "/a/b"),
            (r#"{"a": 1, "a": {"b": 2}}"#, "/a/b"),
            (r#"{"a": {"b": 2}, "a": 1}"#, "/a/b"),
            (r#"{"p": {"c": "chat"}, "p": {"c": "voice"}}"#, "/p/c"),
            (r#"{"p": {"c": "chat", "k": "w", "c": "voice"}}"#, "/p"),
            (r#"{"p": {"c": "chat", "k": "w", "c": "voice"}}"#, "/p/c"),
            (r#"{"x": [1, 2, 3], "x": [4]}"#, "/x/2"),
            (r#"{"x": [1, 2, 3], "y": 0}"#, "/x/1"),
        ] {
            let v: serde_json::Value = serde_json::from_str(doc).expect("json");
            assert_eq!(
                at(doc.as_bytes(), pointer),
                v.pointer(pointer).cloned(),
                "{doc} {pointer}"
            );
        }
        // Beside the value, what serde_json cannot build: a lone surrogate
        // in a name or a value, a number beyond `f64`.
        assert_eq!(at(br#"{"\ud83d": 1, "a": 2}"#, "/a"), Some(json!(2)));
        assert_eq!(
            at(br#"{"b": "\ud83d", "a": 2, "c": 1e400}"#, "/a"),
            Some(json!(2))
        );
        assert_eq!(at(br#"{"a": "\ud83d"}"#, "/a"), None);
        // An earlier member of the same name that serde_json cannot build
        // is skipped: the last is read.
        for first in [
            r#""\ud83d""#,
            "1e400",
            r#"{"c": "\ud83d"}"#,
            r#"{"c": 1e400}"#,
        ] {
            let doc = format!(r#"{{"p": {first}, "p": {{"c": "voice"}}}}"#);
            assert_eq!(at(doc.as_bytes(), "/p/c"), Some(json!("voice")), "{doc}");
        }
        // Nesting at serde_json's limit on the way: each level is read alone.
        let deep = format!(r#"{{"a": {}"x"{}}}"#, "[".repeat(127), "]".repeat(127));
        let pointer = format!("/a{}", "/0".repeat(127));
        assert_eq!(at(deep.as_bytes(), &pointer), Some(json!("x")));
        assert_eq!(at(br#"{"a": "\u00e9t\u00e9"}"#, "/a"), Some(json!("été")));
        assert_eq!(at(br#"{"\u0061": 2}"#, "/a"), Some(json!(2)));
    }
}
