//! Target pre-flight (SPEC §4 step 2): TLS handshake with SNI against the trusted
//! roots (the built-in Mozilla roots plus `--ca-file`), certificate checks
//! (expiry, host name, issuer) done by rustls during the handshake, then `HEAD`
//! answering 2xx within the timeout. Records the content type and the measured
//! response time. Each failure is named: expired, wrong host, untrusted CA,
//! non-2xx, refused, timeout.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Url;
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PreflightError(pub String);

pub async fn check(
    target: &Url,
    ca_file: Option<&Path>,
    allow_http: bool,
    timeout: Duration,
) -> Result<Value, PreflightError> {
    let host = target.host_str().unwrap_or_default().to_string();
    let https = match target.scheme() {
        "https" => true,
        "http" if allow_http => false,
        "http" => {
            return Err(PreflightError(format!(
                "target {} is http://: Cognigy only calls https endpoints; use an https URL, or pass --allow-http for local testing", crate::secret::mask_url(target)
            )))
        }
        other => return Err(PreflightError(format!("target scheme {other}:// is not supported: use https"))),
    };
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!(
            "cogrelay/",
            env!("CARGO_PKG_VERSION"),
            " (pre-flight)"
        ));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            PreflightError(format!("cannot read --ca-file {}: {e}", path.display()))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            PreflightError(format!(
                "--ca-file {} is not a PEM certificate bundle: {e}",
                path.display()
            ))
        })?;
        if certs.is_empty() {
            return Err(PreflightError(format!(
                "--ca-file {} holds no certificate",
                path.display()
            )));
        }
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    let client = builder
        .build()
        .map_err(|e| PreflightError(format!("cannot set up the TLS client: {e}")))?;
    let t0 = Instant::now();
    let resp = client
        .head(target.clone())
        .send()
        .await
        .map_err(|e| PreflightError(describe(&e, &host, timeout)))?;
    let elapsed_ms = t0.elapsed().as_millis() as u64;
    let status = resp.status().as_u16();
    if !resp.status().is_success() {
        return Err(PreflightError(format!(
            "target answered HEAD with HTTP {status}, expected 2xx: make the endpoint answer HEAD (or check the path)"
        )));
    }
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok(json!({
        "tls": if https { json!({ "verified": true, "sni": host }) } else { json!({ "verified": false, "reason": "http allowed by --allow-http" }) },
        "status": status,
        "contentType": content_type,
        "responseTimeMs": elapsed_ms,
    }))
}

/// Names the cause of a failed pre-flight request.
fn describe(e: &reqwest::Error, host: &str, timeout: Duration) -> String {
    if let Some(tls) = find_rustls_error(e) {
        use rustls::CertificateError as C;
        return match tls {
            rustls::Error::InvalidCertificate(C::Expired)
            | rustls::Error::InvalidCertificate(C::ExpiredContext { .. }) => {
                format!("TLS: the certificate of {host} has expired: renew it")
            }
            rustls::Error::InvalidCertificate(C::NotValidForName)
            | rustls::Error::InvalidCertificate(C::NotValidForNameContext { .. }) => {
                format!("TLS: the certificate is not valid for host {host}: use the name the certificate was issued for")
            }
            rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
                format!("TLS: the certificate of {host} is not signed by a trusted CA: use a publicly trusted certificate (Cognigy requires one), or pass --ca-file for a private CA")
            }
            rustls::Error::InvalidCertificate(C::NotValidYet)
            | rustls::Error::InvalidCertificate(C::NotValidYetContext { .. }) => {
                format!("TLS: the certificate of {host} is not valid yet")
            }
            other => format!("TLS handshake with {host} failed: {other}"),
        };
    }
    if e.is_timeout() {
        return format!(
            "target {host} did not answer within {} ms (--timeout-ms)",
            timeout.as_millis()
        );
    }
    let text = crate::cognigy::network_detail(e);
    // The rustls error is not always reachable through `source()` (hyper-util
    // boxes it); its text is stable, so classify on that as well.
    let lower = text.to_ascii_lowercase();
    if lower.contains("invalid peer certificate") {
        return if lower.contains("expired") {
            format!("TLS: the certificate of {host} has expired: renew it")
        } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
            format!("TLS: the certificate is not valid for host {host}: use the name the certificate was issued for")
        } else if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
            format!("TLS: the certificate of {host} is not signed by a trusted CA: use a publicly trusted certificate (Cognigy requires one), or pass --ca-file for a private CA")
        } else {
            format!("TLS handshake with {host} failed: {text}")
        };
    }
    if e.is_connect() {
        if text.contains("refused") {
            return format!("connection to {host} refused: is the relay running and reachable?");
        }
        return format!("cannot connect to {host}: {text}");
    }
    format!("request to {host} failed: {text}")
}

fn find_rustls_error(e: &reqwest::Error) -> Option<&rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        // io::Error::source skips the wrapped error itself; look inside.
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(t) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return Some(t);
            }
        }
        cur = err.source();
    }
    None
}
