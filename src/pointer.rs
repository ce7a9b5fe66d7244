//! The value at a JSON pointer (RFC 6901) in a document, read in one pass
//! over its bytes up to that value: the members before it are skipped
//! without being built, and nothing after it is read (the ingress has
//! checked the document already). The ordering key of every event of an
//! ordered destination is read this way (docs/destinations.md); building
//! each object on the way as a map cost about a tenth of the ingest's CPU.

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
/// in the JSON document `bytes`, as `serde_json::Value::pointer` finds it
/// (but for a name written twice in one object: the first here); `None`
/// when there is none or the document is not JSON up to it.
pub fn pointed<T: AsRef<str>>(bytes: &[u8], tokens: &[T]) -> Option<Value> {
    let found = std::cell::Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    // Once found, an error ends the read where it is.
    let _ = Seek(tokens, &found).deserialize(&mut de);
    found.into_inner()
}

/// The value at the rest of the pointer, in the value being read, is put in
/// the cell; then the read stops (an error).
struct Seek<'p, T>(&'p [T], &'p std::cell::Cell<Option<Value>>);

impl<'de, T: AsRef<str>> DeserializeSeed<'de> for Seek<'_, T> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.0.is_empty() {
            self.1.set(Some(serde::Deserialize::deserialize(d)?));
            return Err(serde::de::Error::custom("found"));
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
        // The first member of that name: the read stops there (serde_json's
        // `Value` keeps the last of a name written twice, which the JSON
        // RFC leaves open).
        while let Some(is) = map.next_key_seed(NameIs(want.as_ref()))? {
            if is {
                return map.next_value_seed(Seek(rest, self.1));
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (want, rest) = self.0.split_first().expect("a token left");
        let want = want.as_ref();
        // RFC 6901: digits without a leading zero (serde_json's rule too).
        let plain =
            want.bytes().all(|b| b.is_ascii_digit()) && !want.starts_with('0') || want == "0";
        let Some(index) = plain.then(|| want.parse::<usize>().ok()).flatten() else {
            return Ok(());
        };
        for _ in 0..index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Seek(rest, self.1)).map(|_| ())
    }

    // A scalar where the pointer goes on: nothing there (the default
    // visits are errors, which end the read as well).
}

/// Whether a member's name is the one wanted, read without being kept.
struct NameIs<'w>(&'w str);

impl<'de> DeserializeSeed<'de> for NameIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NameIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
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
        // Nothing after the value is read.
        assert_eq!(at(br#"{"a": 1, "b": tru"#, "/a"), Some(json!(1)));
        assert_eq!(at(br#"{"b": tru, "a": 1}"#, "/a"), None);
        assert_eq!(at(br#"{"a": "\u00e9t\u00e9"}"#, "/a"), Some(json!("été")));
        assert_eq!(at(br#"{"\u0061": 2}"#, "/a"), Some(json!(2)));
    }
}
