//! Outbound Standard Webhooks signatures (SPEC §3.4):
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.

use base64::Engine as _;
use ring::hmac;

/// A `whsec_<base64>` key for Standard Webhooks signatures, decoded and
/// keyed once (each signature starts from the keyed state: keying hashes
/// two blocks, a third of a small event's signature). ring's SHA-256, as
/// the ingress's (`ingress/auth.rs`).
#[derive(Clone)]
pub struct TargetSigningKey {
    keyed: hmac::Key,
}

impl TargetSigningKey {
    /// The error names the setting, as a configuration error line.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let b64 = raw.strip_prefix("whsec_").unwrap_or(raw);
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| {
                "TARGET_SIGNING_SECRET is not valid: expected whsec_<base64>, as Standard Webhooks secrets are"
            })?;
        if key.is_empty() {
            return Err("TARGET_SIGNING_SECRET is empty: set it to whsec_<base64> or unset it");
        }
        Ok(Self {
            keyed: hmac::Key::new(hmac::HMAC_SHA256, &key),
        })
    }
}

impl std::fmt::Debug for TargetSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

pub fn sign(key: &TargetSigningKey, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = hmac::Context::with_key(&key.keyed);
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.sign())
    )
}
