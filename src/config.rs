//! Settings: parsed once from the CLI/environment into typed values.
//!
//! (Over 600 lines: every setting's parsing and its one-line error are kept in
//! this one place, which is the point of the module; a third is its tests.)
//!
//! [`ServeConfig::from_args`] turns the raw strings of [`crate::cli::ServeArgs`]
//! into a validated configuration, or one [`ConfigError`] line naming the setting
//! and the fix (`main` prints it and exits 2). Secret values never appear in an
//! error: only the name of the setting does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::cli::ServeArgs;
use crate::cognigy::{Api, CognigyConfig, Credentials, RateLimit};
use crate::secret::Secret;

/// One bad setting, as one line: what, why, and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    Embedded,
    Redis,
}

pub use crate::queue::embedded::Fsync;

pub use crate::delivery::signing::TargetSigningKey;
pub use crate::ingress::auth::BasicCredentials;

/// Where the queue is: what `serve`, `jobs` and `queue` share.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub queue: QueueKind,
    pub data_dir: PathBuf,
    pub fsync: Fsync,
    /// May hold a password: never print it.
    pub redis_url: Secret,
    pub queue_name: String,
    /// PEM of a CA to trust for `rediss://` (`REDIS_CA_FILE`), read at start-up.
    pub redis_ca: Option<Vec<u8>>,
}

impl StoreConfig {
    pub fn from_args(a: &crate::cli::StoreArgs) -> Result<Self, ConfigError> {
        let queue = match a.queue.as_deref().map(str::trim) {
            Some("embedded") => QueueKind::Embedded,
            Some("redis") => QueueKind::Redis,
            Some(other) => {
                return Err(bad(format!(
                    "COGRELAY_QUEUE={other:?} is not valid: use `embedded` or `redis`"
                )))
            }
            None if a.redis_url.is_some() || a.redis_host.is_some() => QueueKind::Redis,
            None => QueueKind::Embedded,
        };
        let redis_port: u16 = parse_num("REDIS_PORT", &a.redis_port, "a port number")?;
        let redis_url = Secret::new(match (&a.redis_url, &a.redis_host) {
            (Some(url), _) if !url.trim().is_empty() => {
                let url = url.trim();
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(bad("REDIS_URL is not valid: use redis://[user:password@]host:port[/db] or rediss://..."));
                }
                url.to_string()
            }
            (_, Some(host)) if !host.trim().is_empty() => {
                format!("redis://{}:{redis_port}", host.trim())
            }
            _ => format!("redis://127.0.0.1:{redis_port}"),
        });
        let queue_name = a.queue_name.trim().to_string();
        if queue_name.is_empty() || queue_name.contains(':') {
            return Err(bad(format!(
                "QUEUE_NAME={:?} is not valid: use a non-empty name without ':'",
                a.queue_name
            )));
        }
        let fsync = match a.fsync.trim() {
            "always" => Fsync::Always,
            "off" => Fsync::Off,
            other => {
                return Err(bad(format!(
                    "COGRELAY_FSYNC={other:?} is not valid: use `always` (survives power loss) or `off`"
                )))
            }
        };
        let redis_ca = match a.redis_ca_file.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                bad(format!("REDIS_CA_FILE={path:?} cannot be read ({e}): give the PEM file of the CA that signed Redis's certificate"))
            })?),
        };
        if redis_ca.is_some() && !redis_url.expose().starts_with("rediss://") {
            return Err(bad("REDIS_CA_FILE is set but REDIS_URL is not rediss://: use rediss://host:port for TLS, or unset REDIS_CA_FILE"));
        }
        Ok(Self {
            queue,
            data_dir: PathBuf::from(&a.data_dir),
            fsync,
            redis_url,
            queue_name,
            redis_ca,
        })
    }
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub port: u16,
    pub target_endpoint: reqwest::Url,
    /// Any of these may sign an ingress request (rotation); never empty when set.
    pub signing_secrets: Vec<Secret>,
    pub basic: Option<BasicCredentials>,
    pub allow_unauthenticated: bool,
    pub target_signing_key: Option<TargetSigningKey>,
    pub queue: QueueKind,
    pub data_dir: PathBuf,
    pub fsync: Fsync,
    /// 0 = no cap.
    pub max_db_bytes: u64,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<Secret>,
    pub concurrency: usize,
    /// Nice value added to the delivery threads (0..=19; 0 = same priority).
    pub delivery_nice: u8,
    /// Attempts per event, counting the first (>= 1).
    pub attempts: u32,
    pub backoff_delay: Duration,
    /// 0..=1.
    pub backoff_jitter: f64,
    pub max_retry_after: Duration,
    pub delivery_timeout: Duration,
    /// Invariant: greater than `delivery_timeout` (checked in `validate`).
    pub lock_duration: Duration,
    pub shutdown_grace: Duration,
    pub remove_on_complete: u32,
    pub dedup_ttl: Duration,
    pub max_body_bytes: usize,
    /// Event verification with Cognigy before delivery (`VERIFY_EVENTS`); None = off.
    pub verify_events: Option<crate::cognigy::CognigyConfig>,
    /// Per-source ingress limit: (events per second, burst); None = off.
    pub ingress_rate_limit: Option<(f64, u32)>,
    /// Longest a client may take to send a request's headers, and its body.
    pub request_read_timeout: Duration,
    /// Certificate chain and key (PEM files) for HTTPS on the ingress.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// A summary line this often (pretty log mode), None = off.
    pub summary_every: Option<Duration>,
    /// A fault to inject, for tests of the relay's supervision: read from
    /// `COGRELAY_TEST_FAULT` in debug builds only, always `None` in release.
    pub test_fault: Option<crate::delivery::TestFault>,
    /// Redis URL (redis queue only). May hold a password: never print it.
    pub redis_url: crate::secret::Secret,
    pub queue_name: String,
    pub redis_ca: Option<Vec<u8>>,
}

impl ServeConfig {
    /// Defaults of SPEC §1/§3 with the given target; the ingress is unauthenticated
    /// until a secret or credentials are set. Used by tests and benchmarks.
    /// The defaults of `cli::defaults`, with this target and data directory.
    pub fn new(target_endpoint: reqwest::Url, data_dir: PathBuf) -> Self {
        use crate::cli::defaults as d;
        /// A default parses: they are constants, checked by a unit test.
        fn def<T: FromStr>(raw: &str) -> T {
            raw.parse()
                .unwrap_or_else(|_| unreachable!("the default {raw:?} parses"))
        }
        let ms = |raw: &str| Duration::from_millis(def(raw));
        Self {
            port: def(d::PORT),
            target_endpoint,
            signing_secrets: Vec::new(),
            basic: None,
            allow_unauthenticated: false,
            target_signing_key: None,
            queue: QueueKind::Embedded,
            data_dir,
            fsync: Fsync::Always,
            max_db_bytes: def(d::MAX_DB_BYTES),
            admin_listen: def(d::ADMIN_LISTEN),
            admin_token: None,
            concurrency: def(d::CONCURRENCY),
            delivery_nice: def(d::DELIVERY_NICE),
            attempts: def(d::ATTEMPTS),
            backoff_delay: ms(d::BACKOFF_DELAY_MS),
            backoff_jitter: def(d::BACKOFF_JITTER),
            max_retry_after: Duration::from_secs(def(d::MAX_RETRY_AFTER_SECS)),
            delivery_timeout: ms(d::DELIVERY_TIMEOUT_MS),
            lock_duration: ms(d::LOCK_DURATION_MS),
            shutdown_grace: ms(d::SHUTDOWN_GRACE_MS),
            remove_on_complete: def(d::REMOVE_ON_COMPLETE),
            dedup_ttl: Duration::from_secs(def(d::DEDUP_TTL_SECS)),
            max_body_bytes: def(d::MAX_BODY_BYTES),
            verify_events: None,
            summary_every: None,
            test_fault: None,
            tls: None,
            request_read_timeout: ms(d::REQUEST_READ_TIMEOUT_MS),
            ingress_rate_limit: None,
            redis_url: Secret::new(d::REDIS_URL),
            queue_name: d::QUEUE_NAME.into(),
            redis_ca: None,
        }
    }

    pub fn from_args(a: &ServeArgs) -> Result<Self, ConfigError> {
        let target = a.target_endpoint.as_deref().filter(|s| !s.trim().is_empty()).ok_or_else(|| {
            bad("TARGET_ENDPOINT is not set: set --target-endpoint or TARGET_ENDPOINT to the URL events are delivered to")
        })?;
        let target_endpoint = parse_http_url("TARGET_ENDPOINT", target)?;
        let mut c = Self::new(target_endpoint, PathBuf::from(&a.store.data_dir));

        c.port = parse_num::<u16>("PORT", &a.port, "a port number from 1 to 65535")?;
        if c.port == 0 {
            return Err(bad(
                "PORT=0 is not valid: use a port number from 1 to 65535",
            ));
        }
        if let Some(raw) = a.webhook_signing_secret.as_deref() {
            c.signing_secrets = raw
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .collect();
            if c.signing_secrets.is_empty() {
                return Err(bad("WEBHOOK_SIGNING_SECRET is set but empty: give at least one secret (comma-separated for rotation) or unset it"));
            }
            let bad_standard = c.signing_secrets.iter().any(|s| {
                s.expose().starts_with("whsec_")
                    && standardwebhooks::Webhook::new(s.expose()).is_err()
            });
            if bad_standard {
                return Err(bad("WEBHOOK_SIGNING_SECRET has a whsec_ secret that is not valid: a Standard Webhooks secret is whsec_<base64>"));
            }
        }
        c.basic = match (&a.ingress_basic_user, &a.ingress_basic_password) {
            (None, None) => None,
            (Some(user), Some(pw)) if !user.is_empty() && !pw.is_empty() => Some(BasicCredentials {
                user: user.clone(),
                password: Secret::new(pw.clone()),
            }),
            _ => {
                return Err(bad("INGRESS_BASIC_USER and INGRESS_BASIC_PASSWORD go together: set both (non-empty) or neither"))
            }
        };
        c.allow_unauthenticated = a.allow_unauthenticated;
        c.tls =
            match (a.tls_cert.as_deref(), a.tls_key.as_deref()) {
                (None, None) => None,
                (Some(cert), Some(key)) if !cert.is_empty() && !key.is_empty() => {
                    for (name, path) in [("TLS_CERT_FILE", cert), ("TLS_KEY_FILE", key)] {
                        if !std::path::Path::new(path).is_file() {
                            return Err(bad(format!(
                                "{name}={path:?} is not a readable file: give the PEM file's path"
                            )));
                        }
                    }
                    Some((PathBuf::from(cert), PathBuf::from(key)))
                }
                _ => return Err(bad(
                    "TLS_CERT_FILE and TLS_KEY_FILE go together: set both (PEM files) or neither",
                )),
            };
        c.target_signing_key = a
            .target_signing_secret
            .as_deref()
            .map(|raw| TargetSigningKey::parse(raw).map_err(bad))
            .transpose()?;
        let store = StoreConfig::from_args(&a.store)?;
        c.queue = store.queue;
        c.data_dir = store.data_dir;
        c.fsync = store.fsync;
        c.redis_url = store.redis_url;
        c.queue_name = store.queue_name;
        c.redis_ca = store.redis_ca;
        c.max_db_bytes = parse_num(
            "COGRELAY_MAX_DB_BYTES",
            &a.max_db_bytes,
            "a size in bytes (0 = no cap)",
        )?;
        c.admin_listen = a.admin_listen.trim().parse().map_err(|_| {
            bad(format!(
                "ADMIN_LISTEN={:?} is not valid: use ip:port, e.g. 127.0.0.1:3001",
                a.admin_listen
            ))
        })?;
        c.admin_token = a
            .admin_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(Secret::new);
        c.concurrency = parse_num(
            "CONCURRENCY",
            &a.concurrency,
            "a whole number from 1 to 4096",
        )?;
        c.delivery_nice = parse_num(
            "DELIVERY_NICE",
            &a.delivery_nice,
            "a whole number from 0 to 19",
        )?;
        c.attempts = parse_num("ATTEMPTS", &a.attempts, "a whole number from 1 to 100")?;
        c.backoff_delay = ms("BACKOFF_DELAY_MS", &a.backoff_delay_ms)?;
        c.backoff_jitter = parse_num("BACKOFF_JITTER", &a.backoff_jitter, "a number from 0 to 1")?;
        c.max_retry_after = Duration::from_secs(parse_num(
            "MAX_RETRY_AFTER_SECS",
            &a.max_retry_after_secs,
            "a whole number of seconds",
        )?);
        c.delivery_timeout = ms("DELIVERY_TIMEOUT_MS", &a.delivery_timeout_ms)?;
        c.lock_duration = ms("LOCK_DURATION_MS", &a.lock_duration_ms)?;
        c.shutdown_grace = ms("SHUTDOWN_GRACE_MS", &a.shutdown_grace_ms)?;
        c.remove_on_complete = parse_num(
            "REMOVE_ON_COMPLETE",
            &a.remove_on_complete,
            "a whole number",
        )?;
        c.dedup_ttl = Duration::from_secs(parse_num(
            "DEDUP_TTL_SECS",
            &a.dedup_ttl_secs,
            "a whole number of seconds",
        )?);
        c.max_body_bytes = parse_num("MAX_BODY_BYTES", &a.max_body_bytes, "a size in bytes")?;
        c.request_read_timeout = ms("REQUEST_READ_TIMEOUT_MS", &a.request_read_timeout_ms)?;
        let rate: f64 = parse_num(
            "INGRESS_RATE_LIMIT",
            &a.ingress_rate_limit,
            "events per second (0 = no limit)",
        )?;
        let burst: u32 = parse_num(
            "INGRESS_RATE_BURST",
            &a.ingress_rate_burst,
            "a whole number of events",
        )?;
        if !(rate.is_finite() && rate >= 0.0) {
            return Err(bad(format!(
                "INGRESS_RATE_LIMIT={:?} is not valid: use events per second, 0 = no limit",
                a.ingress_rate_limit
            )));
        }
        c.ingress_rate_limit = (rate > 0.0).then_some((rate, burst.max(1)));
        if c.request_read_timeout.is_zero() {
            return Err(bad(
                "REQUEST_READ_TIMEOUT_MS=0 is not valid: use a positive number of milliseconds",
            ));
        }
        let per_min: u32 = parse_num(
            "COGNIGY_MAX_REQUESTS_PER_MIN",
            &a.cognigy_max_requests_per_min,
            "a whole number of requests per minute",
        )?;
        let limit = crate::cognigy::RateLimit {
            max: per_min.max(1),
            per: Duration::from_secs(60),
        };
        let cognigy = |required| {
            // No retries inside the client: a failed check is retried as a delivery attempt.
            cognigy_config(&a.cognigy, required, limit, 0, c.delivery_timeout)
        };
        c.verify_events = match a.verify_events.trim() {
            "off" => None,
            "on" => match cognigy(true)? {
                Some(cfg) if cfg.api == crate::cognigy::Api::Rest => return Err(bad(
                    "VERIFY_EVENTS=on needs COGNIGY_API=connectors: the Cognigy.AI REST API (rest) has no event lookup; set VERIFY_EVENTS=off or auto",
                )),
                other => other,
            },
            // The rest API has no event lookup: auto is off with it.
            "auto" => cognigy(false)?.filter(|cfg| cfg.api == crate::cognigy::Api::Connectors),
            other => {
                return Err(bad(format!(
                    "VERIFY_EVENTS={other:?} is not valid: use auto (on when Cognigy credentials are set), on or off"
                )))
            }
        };
        c.test_fault = crate::delivery::TestFault::from_env();
        c.validate()?;
        Ok(c)
    }

    /// Cross-field rules and ranges; also run by `serve::run` so that configs built
    /// in code obey them too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.signing_secrets.is_empty() && self.basic.is_none() && !self.allow_unauthenticated {
            return Err(bad("no ingress authentication: set WEBHOOK_SIGNING_SECRET or INGRESS_BASIC_USER/INGRESS_BASIC_PASSWORD, or pass --allow-unauthenticated for local testing"));
        }
        if !(1..=4096).contains(&self.concurrency) {
            return Err(bad(format!(
                "CONCURRENCY={} is out of range: use 1 to 4096",
                self.concurrency
            )));
        }
        if self.delivery_nice > 19 {
            return Err(bad(format!(
                "DELIVERY_NICE={} is out of range: use 0 to 19",
                self.delivery_nice
            )));
        }
        if !(1..=100).contains(&self.attempts) {
            return Err(bad(format!(
                "ATTEMPTS={} is out of range: use 1 to 100",
                self.attempts
            )));
        }
        if !(0.0..=1.0).contains(&self.backoff_jitter) {
            return Err(bad(format!(
                "BACKOFF_JITTER={} is out of range: use a number from 0 to 1",
                self.backoff_jitter
            )));
        }
        if self.delivery_timeout.is_zero() {
            return Err(bad(
                "DELIVERY_TIMEOUT_MS=0 is not valid: use a positive number of milliseconds",
            ));
        }
        if self.lock_duration <= self.delivery_timeout {
            return Err(bad(format!(
                "LOCK_DURATION_MS={} must be greater than DELIVERY_TIMEOUT_MS={}: raise LOCK_DURATION_MS or lower DELIVERY_TIMEOUT_MS",
                self.lock_duration.as_millis(),
                self.delivery_timeout.as_millis()
            )));
        }
        if self.max_body_bytes == 0 {
            return Err(bad(
                "MAX_BODY_BYTES=0 is not valid: use a positive size in bytes",
            ));
        }
        if !self.admin_listen.ip().is_loopback() && self.admin_token.is_none() {
            return Err(bad(format!(
                "ADMIN_LISTEN={} is not a loopback address and ADMIN_TOKEN is not set: set ADMIN_TOKEN, or listen on 127.0.0.1",
                self.admin_listen
            )));
        }
        Ok(())
    }
}

fn parse_num<T: FromStr>(name: &str, raw: &str, expected: &str) -> Result<T, ConfigError> {
    raw.trim()
        .parse()
        .map_err(|_| bad(format!("{name}={raw:?} is not valid: use {expected}")))
}

fn ms(name: &str, raw: &str) -> Result<Duration, ConfigError> {
    parse_num::<u64>(name, raw, "a whole number of milliseconds").map(Duration::from_millis)
}

/// An absolute http(s) URL with a host.
pub fn parse_http_url(name: &str, raw: &str) -> Result<reqwest::Url, ConfigError> {
    // The error lines show the URL without its userinfo (it may hold a password).
    let shown = crate::secret::redact_userinfo(raw);
    let url = reqwest::Url::parse(raw.trim()).map_err(|e| {
        bad(format!(
            "{name}={shown:?} is not a valid URL ({e}): use e.g. http://127.0.0.1:8080/events"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad(format!("{name}={shown:?} is not an http(s) URL with a host: use e.g. https://internal.example.com/events")));
    }
    Ok(url)
}

/// A destination's delivery settings from `serve`'s (the one destination).
impl crate::delivery::DeliveryConfig {
    pub fn from_serve(c: &ServeConfig) -> Self {
        Self {
            target: c.target_endpoint.clone(),
            delivery_timeout: c.delivery_timeout,
            attempts: c.attempts,
            backoff: crate::delivery::backoff::Backoff {
                base: c.backoff_delay,
                jitter: c.backoff_jitter,
                max_retry_after: c.max_retry_after,
            },
            signing_key: c.target_signing_key.clone(),
            concurrency: c.concurrency,
            lock_duration: c.lock_duration,
            shutdown_grace: c.shutdown_grace,
            verify_events: c.verify_events.clone(),
            test_fault: c.test_fault,
            renewals: None,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<ServeConfig, ConfigError> {
        let mut argv = vec!["cogrelay", "serve"];
        argv.extend_from_slice(args);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("clap accepts the strings");
        let crate::cli::Command::Serve(a) = cli.command else {
            panic!("serve")
        };
        ServeConfig::from_args(&a)
    }

    const OK: [&str; 4] = [
        "--target-endpoint",
        "http://127.0.0.1:9/x",
        "--webhook-signing-secret",
        "s1, s2",
    ];

    #[test]
    fn valid_settings_parse_with_rotation_list() {
        let c = parse(&OK).expect("valid");
        assert_eq!(c.signing_secrets.len(), 2);
        assert_eq!(c.signing_secrets[1].expose(), "s2");
        assert_eq!(c.attempts, 5);
        assert_eq!(c.backoff_delay, Duration::from_secs(2));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut args = OK.to_vec();
        args.extend([
            "--target-signing-secret",
            "whsec_c2VjcmV0",
            "--admin-token",
            "tok-123",
        ]);
        args.extend([
            "--ingress-basic-user",
            "u",
            "--ingress-basic-password",
            "pw-456",
        ]);
        let c = parse(&args).expect("valid");
        let dbg = format!("{c:?}");
        for secret in ["s1", "s2", "c2VjcmV0", "tok-123", "pw-456"] {
            assert!(!dbg.contains(secret), "{secret} leaked in {dbg}");
        }
    }

    #[test]
    fn each_bad_setting_names_itself() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--webhook-signing-secret", "s"],
                "TARGET_ENDPOINT is not set",
            ),
            (
                &[
                    "--target-endpoint",
                    "not a url",
                    "--webhook-signing-secret",
                    "s",
                ],
                "TARGET_ENDPOINT=",
            ),
            (
                &[
                    "--target-endpoint",
                    "ftp://x/y",
                    "--webhook-signing-secret",
                    "s",
                ],
                "TARGET_ENDPOINT=",
            ),
            (
                &[
                    "--target-endpoint",
                    "http://x/",
                    "--port",
                    "abc",
                    "--webhook-signing-secret",
                    "s",
                ],
                "PORT=\"abc\"",
            ),
            (
                &["--target-endpoint", "http://x/"],
                "no ingress authentication",
            ),
            (
                &[
                    "--target-endpoint",
                    "http://x/",
                    "--allow-unauthenticated",
                    "--lock-duration-ms",
                    "1000",
                    "--delivery-timeout-ms",
                    "1000",
                ],
                "LOCK_DURATION_MS=1000 must be greater than DELIVERY_TIMEOUT_MS=1000",
            ),
            (
                &[
                    "--target-endpoint",
                    "http://x/",
                    "--allow-unauthenticated",
                    "--attempts",
                    "five",
                ],
                "ATTEMPTS=\"five\"",
            ),
            (
                &[
                    "--target-endpoint",
                    "http://x/",
                    "--allow-unauthenticated",
                    "--backoff-jitter",
                    "2",
                ],
                "BACKOFF_JITTER=2",
            ),
            (
                &[
                    "--target-endpoint",
                    "http://x/",
                    "--allow-unauthenticated",
                    "--admin-listen",
                    "0.0.0.0:3001",
                ],
                "ADMIN_TOKEN is not set",
            ),
            (
                &[
                    "--target-endpoint",
                    "http://x/",
                    "--allow-unauthenticated",
                    "--queue",
                    "kafka",
                ],
                "COGRELAY_QUEUE=\"kafka\"",
            ),
            (
                &[
                    "--target-endpoint",
                    "http://x/",
                    "--allow-unauthenticated",
                    "--target-signing-secret",
                    "whsec_!!",
                ],
                "TARGET_SIGNING_SECRET is not valid",
            ),
            (
                &[
                    "--target-endpoint",
                    "http://x/",
                    "--allow-unauthenticated",
                    "--ingress-basic-user",
                    "u",
                ],
                "INGRESS_BASIC_USER and INGRESS_BASIC_PASSWORD go together",
            ),
        ];
        for (args, expected) in cases {
            let err = parse(args).expect_err(expected).to_string();
            assert!(err.contains(expected), "{args:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn verify_events_follows_the_cognigy_api() {
        let with = |api: &str, verify: &str| {
            let mut args = OK.to_vec();
            args.extend([
                "--cognigy-api",
                api,
                "--cognigy-base-url",
                "http://127.0.0.1:8600",
                "--cognigy-client-id",
                "id",
                "--cognigy-client-secret",
                "secret",
                "--verify-events",
                verify,
            ]);
            parse(&args).map(|c| c.verify_events.is_some())
        };
        assert_eq!(with("connectors", "auto").ok(), Some(true));
        assert_eq!(
            with("rest", "auto").ok(),
            Some(false),
            "rest has no event lookup"
        );
        assert_eq!(with("rest", "off").ok(), Some(false));
        let err = with("rest", "on").expect_err("on with rest").to_string();
        assert!(
            err.contains("VERIFY_EVENTS") && err.contains("COGNIGY_API"),
            "{err}"
        );
    }

    #[test]
    fn the_defaults_are_the_same_from_the_command_line_and_in_code() {
        let parsed = parse(&OK).expect("valid");
        let mut built = ServeConfig::new(parsed.target_endpoint.clone(), parsed.data_dir.clone());
        built.signing_secrets = parsed.signing_secrets.clone();
        built.test_fault = parsed.test_fault;
        assert_eq!(format!("{built:?}"), format!("{parsed:?}"));
    }
}
