//! Ingress authentication (SPEC §3.1), checked before anything is parsed or stored.
//!
//! * `X-Webhook-Signature: [sha256=]<hex HMAC-SHA256(secret, raw body)>`: any
//!   secret of the rotation list may match; compared with ring's
//!   `hmac::verify` (constant time). The keyed HMAC state is built once per
//!   secret at start-up. ring, not the RustCrypto `sha2` crate, for the
//!   SHA-256 of every request: on a CPU without SHA extensions `sha2` falls
//!   back to portable code (~3,500 instructions a 64-byte block), where
//!   ring has SIMD assembly; on one with them both use them.
//! * Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature:
//!   v1,<base64>`): verified by the `standardwebhooks` crate with every
//!   `whsec_` secret of the list, with its 5-minute timestamp tolerance. The
//!   signature covers the id and the timestamp, so a captured request stops
//!   verifying after 5 minutes.
//! * HTTP Basic: SHA-256 of the presented `user:password` compared in constant
//!   time with SHA-256 of the configured one (hashing first hides the length).
//!
//! Any configured method suffices. With none configured the ingress is open
//! (only reachable with `--allow-unauthenticated`, see `config`). The Basic
//! credentials, and whether a signature was sent at all, are looked at
//! before the body is read ([`Authenticator::by_headers`]): a request that
//! no configured method could accept takes no memory for its body.

use axum::http::{HeaderMap, HeaderName};
use base64::Engine as _;
use ring::digest::{digest, SHA256};
use ring::hmac;
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// HTTP Basic credentials accepted on the ingress.
#[derive(Debug, Clone)]
pub struct BasicCredentials {
    pub user: String,
    pub password: Secret,
}

pub const SIGNATURE_HEADER: &str = "x-webhook-signature";
/// The Standard Webhooks signature header; its presence selects that scheme.
pub const STANDARD_SIGNATURE_HEADER: &str = "webhook-signature";
/// The two as header names, for the lookups of every request (a `&str` is
/// checked and lowered at each lookup).
static SIGNATURE: HeaderName = HeaderName::from_static(SIGNATURE_HEADER);
static STANDARD_SIGNATURE: HeaderName = HeaderName::from_static(STANDARD_SIGNATURE_HEADER);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("Missing X-Webhook-Signature header, Standard Webhooks headers or Basic credentials")]
    Missing,
    #[error("Invalid webhook signature")]
    BadSignature,
    #[error("Invalid credentials")]
    BadCredentials,
    #[error("webhook-timestamp outside the 5-minute tolerance")]
    StaleTimestamp,
}

/// The Standard Webhooks timestamp tolerance, either way (the crate's).
const STANDARD_TOLERANCE_SECS: i64 = 5 * 60;

pub struct Authenticator {
    macs: Vec<hmac::Key>,
    /// One verifier per `whsec_` secret of the list.
    standard: Vec<standardwebhooks::Webhook>,
    basic_digest: Option<[u8; 32]>,
}

impl Authenticator {
    pub fn new(secrets: &[Secret], basic: Option<&BasicCredentials>) -> Self {
        let macs = secrets
            .iter()
            .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.expose().as_bytes()))
            .collect();
        // `config` has checked that each whsec_ secret decodes.
        let standard = secrets
            .iter()
            .filter(|s| s.expose().starts_with("whsec_"))
            .filter_map(|s| standardwebhooks::Webhook::new(s.expose()).ok())
            .collect();
        let basic_digest = basic.map(|b| {
            let mut h = ring::digest::Context::new(&SHA256);
            h.update(b.user.as_bytes());
            h.update(b":");
            h.update(b.password.expose().as_bytes());
            let mut sum = [0u8; 32];
            sum.copy_from_slice(h.finish().as_ref());
            sum
        });
        Self {
            macs,
            standard,
            basic_digest,
        }
    }

    pub fn is_open(&self) -> bool {
        self.macs.is_empty() && self.basic_digest.is_none()
    }

    /// Standard Webhooks headers checked with each `whsec_` secret; `None`
    /// when the request does not use that scheme (or no such secret is set).
    fn standard_webhooks(&self, headers: &HeaderMap, body: &[u8]) -> Option<Result<(), AuthError>> {
        if self.standard.is_empty() || !headers.contains_key(&STANDARD_SIGNATURE) {
            return None;
        }
        // The crate counts `now - timestamp` unchecked: a timestamp far in
        // the past overflowed it (a panic in a debug build; a signature that
        // never expires in a release build). Such a timestamp is stale here.
        let timestamp = headers
            .get("webhook-timestamp")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok());
        let now = crate::time::now_ms() / 1000;
        if timestamp.is_some_and(|ts| {
            now.checked_sub(ts)
                .is_none_or(|late| late > STANDARD_TOLERANCE_SECS)
        }) {
            return Some(Err(AuthError::StaleTimestamp));
        }
        let mut failure = AuthError::BadSignature;
        for webhook in &self.standard {
            match webhook.verify(body, headers) {
                Ok(()) => return Some(Ok(())),
                Err(
                    standardwebhooks::WebhookError::TimestampTooOldError
                    | standardwebhooks::WebhookError::FutureTimestampError,
                ) => failure = AuthError::StaleTimestamp,
                Err(_) => {}
            }
        }
        Some(Err(failure))
    }

    pub fn check(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), AuthError> {
        self.by_headers(headers)
            .unwrap_or_else(|| self.by_body(headers, body))
    }

    /// What the headers alone decide, before the body is read: accepted
    /// (the ingress is open, or the Basic credentials match), or refused
    /// when the request carries no signature a configured scheme could
    /// check. `None`: a signature is to be checked against the body
    /// ([`Self::by_body`]). So a sender without credentials is refused
    /// before its body takes any memory (a Cognigy Webhook Endpoint sends
    /// Basic credentials only).
    pub fn by_headers(&self, headers: &HeaderMap) -> Option<Result<(), AuthError>> {
        if self.is_open() {
            return Some(Ok(()));
        }
        let basic = self.basic_digest.as_ref().and_then(|expected| {
            let presented = basic_credentials(headers)?;
            Some(bool::from(
                digest(&SHA256, &presented).as_ref().ct_eq(expected),
            ))
        });
        if basic == Some(true) {
            return Some(Ok(()));
        }
        let signed = (!self.standard.is_empty() && headers.contains_key(&STANDARD_SIGNATURE))
            || (!self.macs.is_empty() && headers.contains_key(&SIGNATURE));
        if signed {
            return None;
        }
        Some(Err(match basic {
            Some(_) => AuthError::BadCredentials,
            None => AuthError::Missing,
        }))
    }

    /// The signatures of a request [`Self::by_headers`] left undecided.
    /// When they fail, the Basic credentials (if any) failed too, and the
    /// signature's failure is the one reported.
    pub fn by_body(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), AuthError> {
        let mut failure = AuthError::BadSignature;
        if let Some(result) = self.standard_webhooks(headers, body) {
            match result {
                Ok(()) => return Ok(()),
                Err(e) => failure = e,
            }
        }
        if !self.macs.is_empty() {
            if let Some(sig) = headers.get(&SIGNATURE) {
                if self.signature_matches(sig.as_bytes(), body) {
                    return Ok(());
                }
            }
        }
        Err(failure)
    }

    fn signature_matches(&self, header: &[u8], body: &[u8]) -> bool {
        let hex_sig = header.strip_prefix(b"sha256=").unwrap_or(header);
        // Into an array: only 64 hex digits can match (no allocation; the
        // `Vec` decode cost 2,400 instructions a request).
        let mut sig = [0u8; 32];
        if hex::decode_to_slice(hex_sig.trim_ascii(), &mut sig).is_err() {
            return false;
        }
        // Check every secret, so the time taken does not depend on which matched.
        self.macs
            .iter()
            .fold(false, |ok, key| hmac::verify(key, body, &sig).is_ok() | ok)
    }
}

impl Authenticator {
    /// A hint for the sender's operator on why `check` refused with `err`:
    /// computed only for refused requests. Names settings and formats, never
    /// what the sender presented.
    pub fn hint(&self, headers: &HeaderMap, body: &[u8], err: AuthError) -> Option<&'static str> {
        let sent_basic = basic_credentials(headers).is_some();
        let sent_signature = headers.contains_key(SIGNATURE_HEADER);
        match err {
            AuthError::Missing if sent_basic && self.basic_digest.is_none() => Some(
                "Basic credentials were sent but INGRESS_BASIC_USER/INGRESS_BASIC_PASSWORD are not set \
                 (a Cognigy Webhook Endpoint authenticates with Basic credentials only: set them)",
            ),
            AuthError::Missing if sent_signature && self.macs.is_empty() => Some(
                "X-Webhook-Signature was sent but WEBHOOK_SIGNING_SECRET is not set",
            ),
            AuthError::Missing if headers.contains_key(axum::http::header::AUTHORIZATION) => Some(
                "the Authorization header is not valid Basic credentials \
                 (`Basic base64(user:password)`; Bearer tokens are not accepted)",
            ),
            AuthError::Missing => Some(
                "send X-Webhook-Signature: the lowercase hex HMAC-SHA256 of the raw body \
                 (optional sha256= prefix), or Basic credentials",
            ),
            AuthError::BadSignature => {
                let Some(sig) = headers.get(SIGNATURE_HEADER) else {
                    return Some("the Standard Webhooks signature does not match any whsec_ secret");
                };
                let sig = sig.as_bytes();
                let sig = sig.strip_prefix(b"sha256=").unwrap_or(sig).trim_ascii();
                if hex::decode(sig).is_ok() {
                    return Some(if sig.len() == 64 {
                        "no WEBHOOK_SIGNING_SECRET matches: a different secret, or the body \
                         was changed after signing (sign the exact raw bytes sent)"
                    } else {
                        "the signature must be 64 hex digits (HMAC-SHA256)"
                    });
                }
                let b64 = base64::engine::general_purpose::STANDARD.decode(sig).ok();
                let right = b64.as_deref().is_some_and(|raw| {
                    self.macs
                        .iter()
                        .any(|key| hmac::verify(key, body, raw).is_ok())
                });
                Some(match (b64, right) {
                    (_, true) => "the signature is the right HMAC in base64: send it as lowercase hex",
                    (Some(_), false) => {
                        "the signature looks like base64: send the lowercase hex HMAC-SHA256 of the raw body"
                    }
                    (None, _) => {
                        "the signature is not hex: send the lowercase hex HMAC-SHA256 of the raw body \
                         (optional sha256= prefix)"
                    }
                })
            }
            AuthError::BadCredentials => {
                Some("the user or password differs from INGRESS_BASIC_USER/INGRESS_BASIC_PASSWORD")
            }
            AuthError::StaleTimestamp => Some(
                "webhook-timestamp is more than 5 minutes from the relay's clock: \
                 check the sender's clock, or this is a replay",
            ),
        }
    }
}

/// Decoded `user:password` of an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<Vec<u8>> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
}

/// Hex HMAC-SHA256 of `body`: what a sender puts in `X-Webhook-Signature`.
/// With the RustCrypto crates: the tests check the ingress's ring against
/// another implementation.
pub fn sign_hex(secret: &str, body: &[u8]) -> String {
    use ::hmac::{Hmac, Mac};
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("ascii"));
        }
        h
    }

    fn auth() -> Authenticator {
        let basic = BasicCredentials {
            user: "cognigy".into(),
            password: Secret::new("pw"),
        };
        Authenticator::new(&[Secret::new("old"), Secret::new("new")], Some(&basic))
    }

    #[test]
    fn any_rotation_secret_and_the_prefix_are_accepted() {
        let a = auth();
        let body = b"{}";
        assert_eq!(
            a.check(&headers(&[(SIGNATURE_HEADER, sign_hex("old", body))]), body),
            Ok(())
        );
        assert_eq!(
            a.check(
                &headers(&[(
                    SIGNATURE_HEADER,
                    format!("sha256={}", sign_hex("new", body))
                )]),
                body
            ),
            Ok(())
        );
        assert_eq!(
            a.check(
                &headers(&[(SIGNATURE_HEADER, sign_hex("other", body))]),
                body
            ),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            a.check(&headers(&[(SIGNATURE_HEADER, "zz".into())]), body),
            Err(AuthError::BadSignature)
        );
        assert_eq!(a.check(&HeaderMap::new(), body), Err(AuthError::Missing));
    }

    /// A `webhook-timestamp` as far in the past as a number goes is stale,
    /// not an overflow (it panicked the request's task in a debug build).
    #[test]
    fn the_oldest_standard_webhooks_timestamp_is_stale() {
        let a = Authenticator::new(
            &[Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
            None,
        );
        for ts in [i64::MIN.to_string(), "-1".into(), i64::MAX.to_string()] {
            let h = headers(&[
                ("webhook-id", "msg_1".into()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", "v1,AAAA".into()),
            ]);
            assert_eq!(a.check(&h, b"{}"), Err(AuthError::StaleTimestamp), "{ts}");
        }
    }

    #[test]
    fn basic_credentials_are_checked() {
        let a = auth();
        let ok = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("cognigy:pw")
        );
        let bad = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("cognigy:px")
        );
        assert_eq!(a.check(&headers(&[("authorization", ok)]), b"x"), Ok(()));
        assert_eq!(
            a.check(&headers(&[("authorization", bad)]), b"x"),
            Err(AuthError::BadCredentials)
        );
    }

    /// The headers decide what they can: Basic credentials that match are
    /// accepted and wrong ones refused, and a request with no signature a
    /// configured scheme checks is refused, all before its body is read; a
    /// signature is left to the body, whatever the Basic credentials.
    #[test]
    fn the_headers_decide_all_but_the_signatures() {
        let a = auth();
        let basic = |pw: &str| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(format!("cognigy:{pw}"));
            ("authorization", format!("Basic {b64}"))
        };
        let sig = (SIGNATURE_HEADER, sign_hex("old", b"{}"));
        let standard = (STANDARD_SIGNATURE_HEADER, "v1,AAAA".to_string());
        assert_eq!(a.by_headers(&headers(&[basic("pw")])), Some(Ok(())));
        assert_eq!(
            a.by_headers(&headers(&[basic("px")])),
            Some(Err(AuthError::BadCredentials))
        );
        assert_eq!(
            a.by_headers(&HeaderMap::new()),
            Some(Err(AuthError::Missing))
        );
        // No whsec_ secret: the Standard Webhooks header checks nothing.
        assert_eq!(
            a.by_headers(&headers(&[standard])),
            Some(Err(AuthError::Missing))
        );
        assert_eq!(a.by_headers(&headers(std::slice::from_ref(&sig))), None);
        assert_eq!(a.by_headers(&headers(&[basic("px"), sig.clone()])), None);
        assert_eq!(
            a.check(&headers(&[basic("px"), sig]), b"{}"),
            Ok(()),
            "the signature passes where the credentials fail"
        );
        let basic_only = Authenticator::new(
            &[],
            Some(&BasicCredentials {
                user: "cognigy".into(),
                password: Secret::new("pw"),
            }),
        );
        let signed = headers(&[(SIGNATURE_HEADER, sign_hex("old", b"{}"))]);
        assert_eq!(
            basic_only.by_headers(&signed),
            Some(Err(AuthError::Missing))
        );
        let open = Authenticator::new(&[], None);
        assert_eq!(open.by_headers(&HeaderMap::new()), Some(Ok(())));
    }

    proptest::proptest! {
        /// ring's HMAC check accepts what the RustCrypto crates sign
        /// (`sign_hex`), for keys up to past three SHA-256 blocks (a key
        /// longer than one block is hashed first: a `whsec_` secret used as
        /// a raw key is ~90 characters), and refuses another key's.
        #[test]
        fn the_hmac_check_agrees_with_an_independent_signer(
            secret in "[ -~]{1,200}",
            other in "[ -~]{1,200}",
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let auth = Authenticator::new(&[Secret::new(&secret)], None);
            let h = headers(&[(SIGNATURE_HEADER, sign_hex(&secret, &body))]);
            proptest::prop_assert_eq!(auth.check(&h, &body), Ok(()));
            if other != secret {
                let h = headers(&[(SIGNATURE_HEADER, sign_hex(&other, &body))]);
                proptest::prop_assert_eq!(auth.check(&h, &body), Err(AuthError::BadSignature));
            }
        }
    }

    #[test]
    fn refusals_come_with_a_hint_that_names_the_mistake() {
        let body = b"{}";
        let hmac_only = Authenticator::new(&[Secret::new("s3")], None);
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("cognigy:pw")
        );
        let h = headers(&[("authorization", basic)]);
        let e = hmac_only.check(&h, body).expect_err("refused");
        assert!(hmac_only
            .hint(&h, body, e)
            .expect("hint")
            .contains("INGRESS_BASIC_USER"));

        use ::hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3").expect("key");
        mac.update(body);
        let raw = mac.finalize().into_bytes();
        let h = headers(&[(
            SIGNATURE_HEADER,
            base64::engine::general_purpose::STANDARD.encode(raw),
        )]);
        let e = hmac_only.check(&h, body).expect_err("base64 is refused");
        assert!(hmac_only
            .hint(&h, body, e)
            .expect("hint")
            .contains("right HMAC in base64"));

        let h = headers(&[(SIGNATURE_HEADER, sign_hex("other", body))]);
        let e = hmac_only.check(&h, body).expect_err("wrong secret");
        assert!(hmac_only
            .hint(&h, body, e)
            .expect("hint")
            .contains("no WEBHOOK_SIGNING_SECRET matches"));

        let e = hmac_only
            .check(&HeaderMap::new(), body)
            .expect_err("nothing");
        assert!(hmac_only
            .hint(&HeaderMap::new(), body, e)
            .expect("hint")
            .contains("lowercase hex"));
    }
}
