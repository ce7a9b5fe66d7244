//! Settings: flags and environment into each module's own settings type, and
//! nothing else. One [`ConfigError`] line per bad setting, naming it and the
//! fix (`main` prints it and exits 2). Secret values never appear in an error:
//! only the name of the setting does.
//!
//! * [`serve`]: `cogrelay serve` into [`ServeConfig`] (ingress, store,
//!   delivery, pool and admin settings).
//! * [`destinations`]: the destinations file (`COGRELAY_CONFIG`, SPEC §7).
//! * [`store`]: the queue's settings, shared by `serve`, `jobs` and `queue`.
//! * [`register`]: `cogrelay register` into `register::RegisterConfig`.
//! * [`sim`]: `cogrelay sim` into `sim::SimOptions`.
//! * here: the parsers every command shares (numbers, durations, URLs, Cognigy).
//!
//! Every default is written once, in `cli::defaults` (clap shows and applies
//! it; [`ServeConfig::new`] starts from it).

pub mod destinations;
pub mod dotenv;
mod register;
mod serve;
mod sim;
mod store;

use std::str::FromStr;
use std::time::Duration;

use crate::cognigy::{Api, CognigyConfig, Credentials, RateLimit};
use crate::secret::Secret;
use crate::telemetry::LogFormat;

pub use crate::delivery::signing::TargetSigningKey;
pub use crate::ingress::auth::BasicCredentials;
pub use crate::queue::embedded::Fsync;
pub use crate::queue::{QueueKind, StoreSettings};
pub use register::register_config;
pub use serve::ServeConfig;
pub use sim::sim_options;
pub use store::{store_settings, TOOL_RETENTION};

/// `LOG_FORMAT` (every command): default pretty on a terminal, else json.
pub fn log_format(raw: Option<&str>) -> Result<LogFormat, ConfigError> {
    use std::io::IsTerminal as _;
    match raw.map(str::trim) {
        None | Some("") => Ok(if std::io::stderr().is_terminal() {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        }),
        Some("json") => Ok(LogFormat::Json),
        Some("pretty") => Ok(LogFormat::Pretty),
        Some(other) => Err(bad(format!(
            "LOG_FORMAT={other:?} is not valid: use `json` or `pretty`"
        ))),
    }
}

/// One bad setting, as one line: what, why, and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

pub(crate) fn parse_num<T: FromStr>(
    name: &str,
    raw: &str,
    expected: &str,
) -> Result<T, ConfigError> {
    raw.trim()
        .parse()
        .map_err(|_| bad(format!("{name}={raw:?} is not valid: use {expected}")))
}

pub(crate) fn ms(name: &str, raw: &str) -> Result<Duration, ConfigError> {
    parse_num::<u64>(name, raw, "a whole number of milliseconds").map(Duration::from_millis)
}

/// An absolute http(s) URL with a host.
pub fn parse_http_url(name: &str, raw: &str) -> Result<reqwest::Url, ConfigError> {
    // The error lines show the URL without its userinfo or query (they may
    // hold a password or a token).
    let shown = crate::secret::redact_url_text(raw);
    let example = example_url(name);
    let url = reqwest::Url::parse(raw.trim()).map_err(|e| {
        bad(format!(
            "{name}={shown:?} is not a valid URL ({e}): use e.g. {example}"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad(format!(
            "{name}={shown:?} is not an http(s) URL with a host: use e.g. {example}"
        )));
    }
    Ok(url)
}

/// What a URL setting looks like, for its error line.
fn example_url(name: &str) -> &'static str {
    match name {
        "WEBHOOK_TARGET_URL" => "https://relay.example.com/api/webhook/cognigy",
        "GATEWAY_CALLBACK_URL" => "https://gateway.example.com/hooks/cognigy",
        "COGNIGY_BASE_URL" => "https://api-trial.cognigy.ai",
        "COGNIGY_DOMAIN" => "acme.cognigy.com (a host name: https is implied)",
        "COGNIGY_TOKEN_URL" => "https://api-trial.cognigy.ai/auth/oauth2/token",
        _ => "https://internal.example.com/events",
    }
}

/// `COGNIGY_API`.
pub fn cognigy_api(raw: Option<&str>) -> Result<Api, ConfigError> {
    match raw.map(str::trim) {
        None | Some("") | Some("connectors") => Ok(Api::Connectors),
        Some("rest") => Ok(Api::Rest),
        Some(other) => Err(ConfigError(format!(
            "COGNIGY_API={other:?} is not valid: use `connectors` (the tutorials' API) or `rest` (Cognigy.AI REST API)"
        ))),
    }
}

/// Cognigy's settings from the shared CLI settings. `Ok(None)` when neither a
/// base nor any credentials are set and they are not `required`.
pub fn cognigy_config(
    a: &crate::cli::CognigyArgs,
    required: bool,
    rate_limit: RateLimit,
    max_retries: u32,
    timeout: Duration,
) -> Result<Option<CognigyConfig>, ConfigError> {
    let bad = |m: String| ConfigError(m);
    let api = cognigy_api(Some(&a.api))?;
    let nonempty = |o: &Option<String>| {
        o.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let (base_url, domain) = (nonempty(&a.base_url), nonempty(&a.domain));
    let (id, secret, key) = (
        nonempty(&a.client_id),
        nonempty(&a.client_secret),
        nonempty(&a.api_key),
    );
    if !required
        && base_url.is_none()
        && domain.is_none()
        && id.is_none()
        && secret.is_none()
        && key.is_none()
    {
        return Ok(None);
    }
    let base = match (base_url, domain) {
        (Some(u), _) => parse_http_url("COGNIGY_BASE_URL", &u)?,
        (None, Some(d)) => {
            let d = d.trim_start_matches("https://").trim_end_matches('/');
            // `http://host` became `https://http//host`, and a DNS error
            // once the retries were spent (exit 8).
            if d.contains("://") {
                return Err(bad(format!(
                    "COGNIGY_DOMAIN={:?} is not a host name: give e.g. acme.cognigy.com, or set COGNIGY_BASE_URL for another scheme",
                    crate::secret::redact_url_text(d)
                )));
            }
            parse_http_url("COGNIGY_DOMAIN", &format!("https://{d}"))?
        }
        (None, None) => {
            return Err(bad("Cognigy is not configured: set COGNIGY_DOMAIN (e.g. acme.cognigy.com) or COGNIGY_BASE_URL".into()))
        }
    };
    let credentials = match (id, secret, key) {
        (_, _, Some(k)) if api == Api::Rest => Credentials::ApiKey(Secret::new(k)),
        (_, _, Some(_)) => {
            return Err(bad("COGNIGY_API_KEY works with COGNIGY_API=rest only: set COGNIGY_API=rest, or use COGNIGY_CLIENT_ID/COGNIGY_CLIENT_SECRET".into()))
        }
        (Some(client_id), Some(s), None) => Credentials::OAuth { client_id, client_secret: Secret::new(s) },
        _ => {
            return Err(bad(
                "Cognigy credentials are missing: set COGNIGY_CLIENT_ID and COGNIGY_CLIENT_SECRET (or COGNIGY_API_KEY with COGNIGY_API=rest)".into(),
            ))
        }
    };
    let token_url = nonempty(&a.token_url)
        .map(|u| parse_http_url("COGNIGY_TOKEN_URL", &u))
        .transpose()?;
    Ok(Some(CognigyConfig {
        api,
        base,
        credentials,
        token_url,
        rate_limit,
        max_retries,
        timeout,
    }))
}
