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

/// The URL with its credentials and query shown as `***` (config check,
/// the admin's destinations, the start log): the operator sees that they
/// are there, not what they are.
pub fn mask_url(url: &reqwest::Url) -> String {
    redact_url_text(url.as_str())
}

/// `raw` with what may be a credential hidden, for error lines about a URL
/// that may not even parse: the userinfo of its authority (`user:password@`)
/// as `***@`, and its query and fragment (`?token=...`) as `?***`. Text
/// that is not URL-shaped is returned as it is.
pub fn redact_url_text(raw: &str) -> String {
    let Some(start) = raw.find("://").map(|i| i + 3) else {
        return raw.to_string();
    };
    let authority_end = raw[start..]
        .find(['/', '?', '#'])
        .map_or(raw.len(), |i| start + i);
    let authority = match raw[start..authority_end].rfind('@') {
        Some(at) => format!("***{}", &raw[start + at..authority_end]),
        None => raw[start..authority_end].to_string(),
    };
    let rest = &raw[authority_end..];
    let rest = match rest.find(['?', '#']) {
        Some(q) => format!("{}?***", &rest[..q]),
        None => rest.to_string(),
    };
    format!("{}{authority}{rest}", &raw[..start])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_text_hides_userinfo_and_query() {
        assert_eq!(
            redact_url_text("ftp://u:pw@host:1/p?token=abc#frag"),
            "ftp://***@host:1/p?***"
        );
        assert_eq!(redact_url_text("https://h/hook?t=1"), "https://h/hook?***");
        assert_eq!(redact_url_text("https://h?t=1"), "https://h?***");
        assert_eq!(redact_url_text("https://h/p"), "https://h/p");
        assert_eq!(redact_url_text("not a url"), "not a url");
    }

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }
}
