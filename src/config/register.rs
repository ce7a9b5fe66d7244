//! `cogrelay register`: its flags into [`RegisterConfig`].

use std::path::PathBuf;
use std::time::Duration;

use super::{cognigy_config, parse_http_url, ConfigError};
use crate::cli::RegisterArgs;
use crate::cognigy::{Api, RateLimit};
use crate::register::{default_idempotency_key, RegisterConfig};
use crate::secret::Secret;

/// The largest value of each number of `register` (docs/configuration.md):
/// an hour for the target's pre-flight and between two health checks, and
/// a thousand health checks.
pub const REGISTER_LIMITS: &[(&str, u64)] = &[
    ("--timeout-ms", 3_600_000),
    ("--health-attempts", 1_000),
    ("--health-delay-ms", 3_600_000),
];

/// The registration's settings, or the one line naming what is wrong.
pub fn register_config(a: &RegisterArgs) -> Result<RegisterConfig, ConfigError> {
    let bad = |m: String| ConfigError(m);
    let num = |name: &str, raw: &str| -> Result<u64, ConfigError> {
        let max = REGISTER_LIMITS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(u64::MAX, |(_, max)| *max);
        raw.trim()
            .parse()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| {
                bad(format!(
                    "{name}={raw:?} is not valid: use a whole number, at most {max}"
                ))
            })
    };
    let timeout = Duration::from_millis(num("--timeout-ms", &a.timeout_ms)?);
    let cognigy = cognigy_config(
        &a.cognigy,
        true,
        RateLimit::REGISTER,
        4,
        Duration::from_secs(30),
    )?
    .ok_or_else(|| bad("Cognigy is not configured".into()))?;
    let target_raw = a
        .target_url
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| bad("WEBHOOK_TARGET_URL is not set: set --target-url or WEBHOOK_TARGET_URL to the relay's public URL".into()))?;
    let target = parse_http_url("WEBHOOK_TARGET_URL", target_raw)?;
    let gateway = a
        .gateway_callback_url
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .map(|u| parse_http_url("GATEWAY_CALLBACK_URL", u))
        .transpose()?;
    let health_attempts = num("--health-attempts", &a.health_attempts)? as u32;
    if health_attempts == 0 {
        return Err(bad("--health-attempts=0 is not valid: use 1 or more".into()));
    }
    let flow_id = a.flow_id.clone().filter(|s| !s.trim().is_empty());
    if cognigy.api == Api::Rest && flow_id.is_none() {
        return Err(bad("COGNIGY_FLOW_ID is not set: the rest API creates an endpoint for a flow; set COGNIGY_FLOW_ID".into()));
    }
    let name = a.name.trim().to_string();
    if name.is_empty() {
        return Err(bad("--name is empty: give the connector a name".into()));
    }
    // Sent as a header: a key that cannot be one failed each request, and
    // was reported as Cognigy out of reach (exit 8) after the retries.
    if let Some(k) = a.idempotency_key.as_deref().map(str::trim) {
        if reqwest::header::HeaderValue::from_str(k).is_err() {
            return Err(bad(
                "IDEMPOTENCY_KEY is not valid: it is sent as a header, so use printable ASCII"
                    .into(),
            ));
        }
    }
    let idempotency_key = match a
        .idempotency_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty())
    {
        Some(k) => k.to_string(),
        None => default_idempotency_key(&cognigy.base, &target, &name),
    };
    Ok(RegisterConfig {
        cognigy,
        target,
        // The first of a rotation list (`serve` accepts any of them): the
        // whole list was sent, and every event signed with it refused.
        signing_secret: a
            .webhook_signing_secret
            .as_deref()
            .and_then(|raw| raw.split(',').map(str::trim).find(|s| !s.is_empty()))
            .map(Secret::new),
        gateway,
        name,
        idempotency_key,
        flow_id,
        ca_file: a
            .ca_file
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(ca_file)
            .transpose()?,
        allow_http: a.allow_http,
        timeout,
        health_attempts,
        health_delay: Duration::from_millis(num("--health-delay-ms", &a.health_delay_ms)?),
    })
}

/// `--ca-file`, read once here so that a missing or unreadable file, or one
/// with no PEM certificate, is a configuration error (exit 2) before any
/// request; the pre-flight reads it again to build its client.
fn ca_file(raw: &str) -> Result<PathBuf, ConfigError> {
    let bad = |why: String| {
        ConfigError(format!(
            "--ca-file (CA_FILE) {raw:?} {why}: give the PEM file of the CA that signed the target's certificate"
        ))
    };
    let pem = std::fs::read(raw).map_err(|e| bad(format!("cannot be read ({e})")))?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(PathBuf::from(raw)),
        Ok(_) => Err(bad("holds no certificate".into())),
        Err(e) => Err(bad(format!("is not a PEM certificate bundle ({e})"))),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{register_config, REGISTER_LIMITS};
    use crate::cli::{Cli, Command};

    /// `register_config` of the base flags and `extra` (with a target URL
    /// unless `extra` gives one), its error as text.
    fn run(extra: &[&str]) -> Result<(), String> {
        let mut argv = vec![
            "cogrelay",
            "register",
            "--cognigy-base-url",
            "https://api.example.com",
            "--cognigy-client-id",
            "id",
            "--cognigy-client-secret",
            "s",
        ];
        if !extra.contains(&"--target-url") {
            argv.extend([
                "--target-url",
                "https://relay.example.com/api/webhook/cognigy",
            ]);
        }
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).expect("flags");
        let Command::Register(args) = cli.command else {
            unreachable!("register")
        };
        register_config(&args)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Each number of `register` takes its largest value, and one more is
    /// one line naming it (a delay of 2^64-1 ms waited for ever).
    #[test]
    fn every_register_number_has_a_maximum() {
        for (flag, max) in REGISTER_LIMITS {
            assert_eq!(run(&[flag, &max.to_string()]), Ok(()), "{flag}={max}");
            let err = run(&[flag, &(max + 1).to_string()]).expect_err("over the maximum");
            assert!(
                err.contains(flag) && err.contains(&format!("at most {max}")),
                "{err}"
            );
        }
    }

    /// A `--ca-file` that is missing, empty of certificates or not PEM is a
    /// configuration error naming the flag (it was exit 3, a target failure,
    /// found only at the pre-flight).
    #[test]
    fn a_ca_file_that_cannot_serve_is_a_configuration_error() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").expect("write");
        for (path, why) in [
            (&missing, "cannot be read"),
            (&empty, "holds no certificate"),
        ] {
            let flag = format!("--ca-file={}", path.display());
            let err = run(&[&flag]).expect_err("refused");
            assert!(err.contains("--ca-file") && err.contains(why), "{err}");
        }
        assert_eq!(run(&["--ca-file="]), Ok(()), "empty: no CA file");
    }

    /// A bad URL's line shows what that setting looks like (the target's
    /// said `.../events`, a destination's example).
    #[test]
    fn a_bad_url_is_shown_what_its_setting_looks_like() {
        let err = run(&["--target-url", "relay.example.com"]).expect_err("no scheme");
        assert!(
            err.contains("e.g. https://relay.example.com/api/webhook/cognigy"),
            "{err}"
        );
        let err = run(&["--gateway-callback-url", "ftp://g"]).expect_err("not http");
        assert!(
            err.contains("GATEWAY_CALLBACK_URL") && err.contains("e.g. https://gateway."),
            "{err}"
        );
    }
}
