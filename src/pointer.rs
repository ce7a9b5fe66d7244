//! The value at a JSON pointer (RFC 6901) in a document, read in one pass
//! over its bytes: the members on the way are skipped without being built,
//! and nothing after the objects and arrays on the pointer's path is read
//! (the ingress has checked the document already). The ordering key of
//! every event of an ordered destination, and each `where` condition, is
//! read this way (docs/destinations.md); building each object on the way as
//! a map cost about a tenth of the ingest's CPU.
//!
//! Of a name written twice in one object, the last is read, as
//! `serde_json::Value` and the envelope's own fields read it: a condition
//! or a key read from the first routed or ordered an event by a member the
//! target never saw as its value. Member names and skipped values may hold
//! what serde_json cannot build (a lone surrogate escape, a number beyond
//! `f64`, nesting at its limit), as the ingress lets them through.

use std::cell::Cell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
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
/// `None` when there is none, or it (or the object or array it is in) is
/// not JSON that serde_json can build.
pub fn pointed<T: AsRef<str>>(bytes: &[u8], tokens: &[T]) -> Option<Value> {
    let found = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Seek(tokens, &found).deserialize(&mut de).ok()?;
    found.into_inner()
}

/// The value at the rest of the pointer, in the value being read, is put in
/// the cell (`None` when it has none); the value is read to its end.
struct Seek<'p, T>(&'p [T], &'p Cell<Option<Value>>);

impl<'de, T: AsRef<str>> DeserializeSeed<'de> for Seek<'_, T> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.1.set(None);
        if self.0.is_empty() {
            self.1.set(Some(serde::Deserialize::deserialize(d)?));
            return Ok(());
        }
        d.deserialize_any(self)
    }
}

impl<'de, T: AsRef<str>> Visitor<'de> for Seek<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (want, rest) = self.0.split_first().expect("a token left");
        // Every member of that name is sought in (each one's finding, or
        // none, replaces the one before): the last is the value.
        while let Some(is) = map.next_key_seed(NameIs(want.as_ref()))? {
            if is {
                map.next_value_seed(Seek(rest, self.1))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (want, rest) = self.0.split_first().expect("a token left");
        let want = want.as_ref();
        // RFC 6901: digits without a leading zero (serde_json's rule too).
        let plain =
            want.bytes().all(|b| b.is_ascii_digit()) && !want.starts_with('0') || want == "0";
        if let Some(index) = plain.then(|| want.parse::<usize>().ok()).flatten() {
            for _ in 0..index {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(());
                }
            }
            seq.next_element_seed(Seek(rest, self.1))?;
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    // A scalar where the pointer goes on: nothing there.
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
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
        assert_eq!(at(br#"{"a": "\u00e9t\u00e9"}"#, "/a"), Some(json!("été")));
        assert_eq!(at(br#"{"\u0061": 2}"#, "/a"), Some(json!(2)));
    }
}
