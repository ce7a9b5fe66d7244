//! `Secret`: a string that must never reach a log, an error or `--help`.
//!
//! The only way to read it is [`Secret::expose`], so every place that uses the
//! value is greppable. `Debug` and `Display` print `***`.

use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself. Call only where the value is used (HMAC keys,
    /// credentials on the wire), never where it could be printed.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// scheme://host:port/path, without credentials or query (either may hold secrets).
pub fn redact_url(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.to_string()
}

/// The URL with its credentials, query and fragment shown as `***`
/// (config check, the admin's destinations, the start log): the operator
/// sees that they are there, not what they are.
pub fn mask_url(url: &reqwest::Url) -> String {
    let creds = !url.username().is_empty() || url.password().is_some();
    let mut shown = redact_url(url);
    if creds {
        shown.insert_str(url.scheme().len() + 3, "***@");
    }
    if let Some(f) = shown.find('#') {
        shown.truncate(f);
    }
    if url.query().is_some() {
        shown.push_str("?***");
    }
    if url.fragment().is_some() {
        shown.push_str("#***");
    }
    shown
}

/// A URL in `Debug` output, as [`mask_url`] shows it (a derived `Debug`
/// of `reqwest::Url` prints its password and query).
pub struct MaskedUrl<'a>(pub &'a reqwest::Url);

impl std::fmt::Debug for MaskedUrl<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&mask_url(self.0))
    }
}

/// A URL's text in `Debug` output, as [`redact_url_text`] shows it.
pub struct RedactedUrlText<'a>(pub &'a str);

impl std::fmt::Debug for RedactedUrlText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url_text(self.0))
    }
}

/// `raw` with what may be a credential hidden, for error lines about a URL
/// that may not even parse: everything between `://` and the last `@` (a
/// password may hold `/`, `?` or `#`; an `@` in a query then hides the host
/// too, which is the safe side) as `***@`, and the query and fragment as
/// `?***` / `#***`; text with no `://` the same from its start.
pub fn redact_url_text(raw: &str) -> String {
    // After `scheme://`, or from the start of text that is not URL-shaped
    // (`relay:pw@host/x`, `http//u:pw@h`).
    let start = raw
        .find("://")
        .filter(|&i| is_scheme(&raw[..i]))
        .map_or(0, |i| i + 3);
    // After the userinfo, if any: an `@` anywhere may end one.
    let (masked, host_at) = match raw[start..].rfind('@') {
        Some(at) => ("***@", start + at + 1),
        None => ("", start),
    };
    let rest = &raw[host_at..];
    let rest = match rest.find(['?', '#']) {
        Some(q) => format!("{}{}***", &rest[..q], &rest[q..q + 1]),
        None => rest.to_string(),
    };
    format!("{}{masked}{rest}", &raw[..start])
}

/// RFC 3986's scheme: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_text_hides_userinfo_and_query() {
        for (text, shown) in [
            (
                "ftp://u:pw@host:1/p?token=abc#frag",
                "ftp://***@host:1/p?***",
            ),
            ("https://h/hook?t=1", "https://h/hook?***"),
            ("https://h?t=1", "https://h?***"),
            ("https://h/p", "https://h/p"),
            ("not a url", "not a url"),
            // A password with `/`, `?` or `#` (base64 has `/`): the URL does
            // not parse, and nothing of it is shown.
            (
                "https://svc:ab/cd@crm.internal/hook",
                "https://***@crm.internal/hook",
            ),
            ("https://u:ab?cd@h/x", "https://***@h/x"),
            ("https://u:a#b@h", "https://***@h"),
            ("https://h/p#x", "https://h/p#***"),
            ("relay:p4ss@crm/hook", "***@crm/hook"),
            ("http//u:p4ss@h/x", "***@h/x"),
            ("crm/hook?token=t", "crm/hook?***"),
            // `://` only in the query is not a scheme's.
            ("relay:pw@crm/hook?next=https://x", "***@crm/hook?***"),
        ] {
            assert_eq!(redact_url_text(text), shown, "{text}");
        }
    }

    #[test]
    fn a_masked_url_shows_where_credentials_query_and_fragment_are() {
        let masked = |u: &str| mask_url(&reqwest::Url::parse(u).expect("url"));
        assert_eq!(
            masked("http://relay:s%2Fx@crm.internal:8080/in?token=t#f"),
            "http://***@crm.internal:8080/in?***#***"
        );
        assert_eq!(masked("https://u@[::1]:9/p"), "https://***@[::1]:9/p");
        assert_eq!(masked("https://h/p?e=a@b"), "https://h/p?***");
        assert_eq!(masked("https://h/p#x"), "https://h/p#***");
        assert_eq!(masked("https://h/p"), "https://h/p");
    }

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }
}
