//! `cogrelay serve`: its flags into each module's settings, and the rules
//! across them.
//!
//! (Over 600 lines: every setting's parsing and its one-line error are kept
//! here, the point of the module; a third is their tests.)

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use super::destinations::Globals;
use super::{bad, cognigy_config, ms, parse_http_url, parse_num, store_settings, ConfigError};
use crate::admin::AdminSettings;
use crate::cli::ServeArgs;
use crate::delivery::backoff::Backoff;
use crate::delivery::signing::TargetSigningKey;
use crate::delivery::{DeliverySettings, PoolSettings};
use crate::destination::{CircuitSettings, Destination, DestinationSet, Filter};
use crate::ingress::auth::BasicCredentials;
use crate::ingress::IngressSettings;
use crate::queue::embedded::Fsync;
use crate::queue::{QueueKind, QueueSettings, StoreSettings};
use crate::secret::Secret;

/// Everything `serve` needs, validated: each module's own settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub ingress: IngressSettings,
    pub store: StoreSettings,
    /// The global delivery settings: the `default` destination's without a
    /// destinations file (`TARGET_ENDPOINT`), and what a destination of the
    /// file takes for a setting it leaves out (its `target` is then unused).
    pub delivery: DeliverySettings,
    /// The destinations file's, resolved; `None` without a file.
    pub destinations_file: Option<DestinationSet>,
    pub pool: PoolSettings,
    pub admin: AdminSettings,
    /// A summary line this often (pretty log mode), None = off.
    pub summary_every: Option<Duration>,
}

impl ServeConfig {
    /// The defaults of `cli::defaults` (SPEC §1/§3), with this target and data
    /// directory; the ingress is unauthenticated until a secret or credentials
    /// are set. Used by `from_args`, tests and benchmarks.
    pub fn new(target_endpoint: reqwest::Url, data_dir: PathBuf) -> Self {
        use crate::cli::defaults as d;
        /// A default parses: they are constants, checked by a unit test.
        fn def<T: FromStr>(raw: &str) -> T {
            raw.parse()
                .unwrap_or_else(|_| unreachable!("the default {raw:?} parses"))
        }
        let ms = |raw: &str| Duration::from_millis(def(raw));
        Self {
            ingress: IngressSettings {
                port: def(d::PORT),
                signing_secrets: Vec::new(),
                basic: None,
                allow_unauthenticated: false,
                max_body_bytes: def(d::MAX_BODY_BYTES),
                rate_limit: None,
                request_read_timeout: ms(d::REQUEST_READ_TIMEOUT_MS),
                tls: None,
            },
            store: StoreSettings {
                kind: QueueKind::Embedded,
                data_dir,
                fsync: Fsync::Always,
                max_db_bytes: def(d::MAX_DB_BYTES),
                redis_url: Secret::new(d::REDIS_URL),
                queue_name: d::QUEUE_NAME.into(),
                redis_ca: None,
                retention: QueueSettings {
                    dedup_ttl: Duration::from_secs(def(d::DEDUP_TTL_SECS)),
                    remove_on_complete: def(d::REMOVE_ON_COMPLETE),
                },
                clock: Default::default(),
            },
            delivery: DeliverySettings {
                target: target_endpoint,
                delivery_timeout: ms(d::DELIVERY_TIMEOUT_MS),
                attempts: def(d::ATTEMPTS),
                backoff: Backoff {
                    base: ms(d::BACKOFF_DELAY_MS),
                    jitter: def(d::BACKOFF_JITTER),
                    max_retry_after: Duration::from_secs(def(d::MAX_RETRY_AFTER_SECS)),
                },
                signing_key: None,
                concurrency: def(d::CONCURRENCY),
                headers: Default::default(),
                rate_limit: 0,
                max_age: Duration::from_secs(def(d::MAX_AGE_SECS)),
                circuit: CircuitSettings {
                    failures: def(d::CIRCUIT_FAILURES),
                    cooldown: ms(d::CIRCUIT_COOLDOWN_MS),
                    max_cooldown: ms(d::CIRCUIT_MAX_COOLDOWN_MS),
                },
                ordering: None,
            },
            pool: PoolSettings {
                lock_duration: ms(d::LOCK_DURATION_MS),
                shutdown_grace: ms(d::SHUTDOWN_GRACE_MS),
                nice: def(d::DELIVERY_NICE),
                verify_events: None,
                test_fault: None,
                clock: Default::default(),
                idle_poll: crate::delivery::IDLE_POLL,
            },
            admin: AdminSettings {
                listen: def(d::ADMIN_LISTEN),
                token: None,
            },
            destinations_file: None,
            summary_every: None,
        }
    }

    /// Every destination: the file's, or the one `default` destination made
    /// of `TARGET_ENDPOINT` and the global settings.
    pub fn destinations(&self) -> DestinationSet {
        if let Some(file) = &self.destinations_file {
            return file.clone();
        }
        DestinationSet {
            list: vec![Destination {
                name: crate::event::DestinationName::DEFAULT,
                filter: Filter::everything(),
                delivery: self.delivery.clone(),
            }],
            file: None,
        }
    }

    pub fn from_args(a: &ServeArgs) -> Result<Self, ConfigError> {
        let (mut c, file) = Self::settings(a)?;
        if let Some(path) = file {
            let dests =
                super::destinations::load(&path, &c.globals(), &|var| std::env::var(var).ok())?;
            c.take_destinations(dests);
        }
        Ok(c)
    }

    /// `cogrelay config check`: every problem of the settings and of the
    /// destinations file, one line each (the relay stops at the first). No
    /// ingress secret is needed to check a file: its absence is a note (the
    /// second value), since `serve` refuses to start without one.
    pub fn check(a: &ServeArgs) -> (Result<Self, Vec<ConfigError>>, Vec<String>) {
        let mut notes = Vec::new();
        let mut relaxed = a.clone();
        let no_auth = a.webhook_signing_secret.is_none()
            && a.ingress_basic_user.is_none()
            && !a.allow_unauthenticated;
        if no_auth {
            relaxed.allow_unauthenticated = true;
            notes.push("note: no ingress authentication is set (WEBHOOK_SIGNING_SECRET, or INGRESS_BASIC_USER and INGRESS_BASIC_PASSWORD): `cogrelay serve` refuses to start without one".to_string());
        }
        let (mut c, file) = match Self::settings(&relaxed) {
            Ok(r) => r,
            Err(e) => return (Err(vec![e]), notes),
        };
        let Some(path) = file else {
            return (Ok(c), notes);
        };
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                return (
                    Err(vec![bad(format!(
                        "{shown}: cannot be read ({e}): check COGRELAY_CONFIG"
                    ))]),
                    notes,
                )
            }
        };
        match super::destinations::check(&text, &shown, &c.globals(), &|var| {
            std::env::var(var).ok()
        }) {
            Ok(list) => {
                c.take_destinations(DestinationSet {
                    list,
                    file: Some(path),
                });
                (Ok(c), notes)
            }
            Err(problems) => (Err(problems), notes),
        }
    }

    /// What a destination takes from the global settings.
    fn globals(&self) -> Globals {
        Globals {
            delivery: self.delivery.clone(),
            lock_duration: self.pool.lock_duration,
        }
    }

    fn take_destinations(&mut self, dests: DestinationSet) {
        if let Some(first) = dests.list.first() {
            self.delivery.target = first.delivery.target.clone();
        }
        self.destinations_file = Some(dests);
    }

    /// Every setting but the destinations file; and the file, if there is one.
    fn settings(a: &ServeArgs) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let file = match a.config_file.as_deref().map(str::trim) {
            Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
            _ => {
                let default = Path::new(crate::cli::defaults::CONFIG_FILE);
                default.exists().then(|| default.to_path_buf())
            }
        };
        let target = a
            .target_endpoint
            .as_deref()
            .filter(|s| !s.trim().is_empty());
        let target_endpoint = match (&file, target) {
            (Some(f), Some(_)) => return Err(bad(format!(
                "TARGET_ENDPOINT is set and so is the destinations file {} (COGRELAY_CONFIG): list the target in the file as a [[destination]], or unset one of them",
                f.display()
            ))),
            (None, None) => return Err(bad(
                "TARGET_ENDPOINT is not set: set --target-endpoint or TARGET_ENDPOINT to the URL events are delivered to, or give a destinations file (COGRELAY_CONFIG)",
            )),
            (None, Some(t)) => parse_http_url("TARGET_ENDPOINT", t)?,
            // Replaced by the first destination's below; never delivered to.
            (Some(_), None) => reqwest::Url::parse("http://destinations.invalid/").map_err(|e| bad(e.to_string()))?,
        };
        let mut c = Self::new(target_endpoint, PathBuf::from(&a.store.data_dir));

        c.read_ingress_auth(a)?;
        c.delivery.signing_key = a
            .target_signing_secret
            .as_deref()
            .map(|raw| TargetSigningKey::parse(raw).map_err(bad))
            .transpose()?;
        c.store = StoreSettings {
            retention: c.store.retention.clone(),
            ..store_settings(&a.store)?
        };
        c.store.max_db_bytes = parse_num(
            "COGRELAY_MAX_DB_BYTES",
            &a.max_db_bytes,
            "a size in bytes (0 = no cap)",
        )?;
        if c.store.kind == QueueKind::Embedded && (1..MIN_DB_BYTES).contains(&c.store.max_db_bytes)
        {
            // Else the relay would start, say it is ready, and refuse every event.
            return Err(bad(format!(
                "COGRELAY_MAX_DB_BYTES={} is too small: an empty store takes about 200 KB; \
                 use at least {MIN_DB_BYTES} (1 MiB), or 0 for no cap",
                c.store.max_db_bytes
            )));
        }
        c.admin.listen = a.admin_listen.trim().parse().map_err(|_| {
            bad(format!(
                "ADMIN_LISTEN={:?} is not valid: use ip:port, e.g. 127.0.0.1:3001",
                a.admin_listen
            ))
        })?;
        // Read without white space at its ends, as a presented Bearer token
        // is (a secret file's trailing newline locked the operators out);
        // one of white space only is a mistake, not "no token".
        c.admin.token = match a.admin_token.as_deref().filter(|t| !t.is_empty()) {
            Some(t) if t.trim().is_empty() => {
                return Err(bad(
                    "ADMIN_TOKEN is only white space: set a token, or leave it unset",
                ))
            }
            t => t.map(|t| Secret::new(t.trim())),
        };
        c.read_delivery(a)?;
        c.store.retention.remove_on_complete = parse_num(
            "REMOVE_ON_COMPLETE",
            &a.remove_on_complete,
            "a whole number",
        )?;
        c.store.retention.dedup_ttl = Duration::from_secs(parse_num(
            "DEDUP_TTL_SECS",
            &a.dedup_ttl_secs,
            "a whole number of seconds",
        )?);
        c.read_ingress_limits(a)?;
        c.read_verification(a)?;
        c.read_circuit_and_age(a)?;
        c.pool.test_fault = crate::delivery::TestFault::from_env();
        c.validate()?;
        Ok((c, file))
    }

    /// The ingress: port, who may post (secrets, Basic credentials), TLS.
    fn read_ingress_auth(&mut self, a: &ServeArgs) -> Result<(), ConfigError> {
        self.ingress.port = parse_num::<u16>("PORT", &a.port, "a port number from 1 to 65535")?;
        if self.ingress.port == 0 {
            return Err(bad(
                "PORT=0 is not valid: use a port number from 1 to 65535",
            ));
        }
        if let Some(raw) = a.webhook_signing_secret.as_deref() {
            self.ingress.signing_secrets = raw
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .collect();
            if self.ingress.signing_secrets.is_empty() {
                return Err(bad("WEBHOOK_SIGNING_SECRET is set but empty: give at least one secret (comma-separated for rotation) or unset it"));
            }
            let bad_standard = self.ingress.signing_secrets.iter().any(|s| {
                s.expose().starts_with("whsec_")
                    && standardwebhooks::Webhook::new(s.expose()).is_err()
            });
            if bad_standard {
                return Err(bad("WEBHOOK_SIGNING_SECRET has a whsec_ secret that is not valid: a Standard Webhooks secret is whsec_<base64>"));
            }
        }
        self.ingress.basic = match (&a.ingress_basic_user, &a.ingress_basic_password) {
            (None, None) => None,
            (Some(user), Some(pw)) if !user.is_empty() && !pw.is_empty() => Some(BasicCredentials {
                user: user.clone(),
                password: Secret::new(pw.clone()),
            }),
            _ => {
                return Err(bad("INGRESS_BASIC_USER and INGRESS_BASIC_PASSWORD go together: set both (non-empty) or neither"))
            }
        };
        self.ingress.allow_unauthenticated = a.allow_unauthenticated;
        self.ingress.tls =
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
                    // Read now, so that a file that is not a PEM certificate
                    // or key is a configuration error (exit 2, and `config
                    // check` says so), not a failure once started (exit 1).
                    crate::tls::acceptor(Path::new(cert), Path::new(key))
                        .map_err(|e| bad(format!("{e:#}")))?;
                    Some((PathBuf::from(cert), PathBuf::from(key)))
                }
                _ => return Err(bad(
                    "TLS_CERT_FILE and TLS_KEY_FILE go together: set both (PEM files) or neither",
                )),
            };
        Ok(())
    }

    /// How a destination is delivered to: workers, attempts, backoff, timeouts.
    fn read_delivery(&mut self, a: &ServeArgs) -> Result<(), ConfigError> {
        self.delivery.concurrency = parse_num(
            "CONCURRENCY",
            &a.concurrency,
            "a whole number from 1 to 4096",
        )?;
        self.pool.nice = parse_num(
            "DELIVERY_NICE",
            &a.delivery_nice,
            "a whole number from 0 to 19",
        )?;
        self.delivery.attempts =
            parse_num("ATTEMPTS", &a.attempts, "a whole number from 1 to 100")?;
        self.delivery.backoff.base = ms("BACKOFF_DELAY_MS", &a.backoff_delay_ms)?;
        self.delivery.backoff.jitter =
            parse_num("BACKOFF_JITTER", &a.backoff_jitter, "a number from 0 to 1")?;
        self.delivery.backoff.max_retry_after = Duration::from_secs(parse_num(
            "MAX_RETRY_AFTER_SECS",
            &a.max_retry_after_secs,
            "a whole number of seconds",
        )?);
        self.delivery.delivery_timeout = ms("DELIVERY_TIMEOUT_MS", &a.delivery_timeout_ms)?;
        self.pool.lock_duration = ms("LOCK_DURATION_MS", &a.lock_duration_ms)?;
        self.pool.shutdown_grace = ms("SHUTDOWN_GRACE_MS", &a.shutdown_grace_ms)?;
        Ok(())
    }

    /// The ingress's limits: body size, read timeout, per-source rate.
    fn read_ingress_limits(&mut self, a: &ServeArgs) -> Result<(), ConfigError> {
        self.ingress.max_body_bytes =
            parse_num("MAX_BODY_BYTES", &a.max_body_bytes, "a size in bytes")?;
        self.ingress.request_read_timeout =
            ms("REQUEST_READ_TIMEOUT_MS", &a.request_read_timeout_ms)?;
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
        self.ingress.rate_limit = (rate > 0.0).then_some((rate, burst.max(1)));
        if self.ingress.request_read_timeout.is_zero() {
            return Err(bad(
                "REQUEST_READ_TIMEOUT_MS=0 is not valid: use a positive number of milliseconds",
            ));
        }
        Ok(())
    }

    /// Event verification with Cognigy (`VERIFY_EVENTS`).
    fn read_verification(&mut self, a: &ServeArgs) -> Result<(), ConfigError> {
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
            cognigy_config(
                &a.cognigy,
                required,
                limit,
                0,
                self.delivery.delivery_timeout,
            )
        };
        self.pool.verify_events = match a.verify_events.trim() {
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
        Ok(())
    }

    /// The circuit breaker's settings and the age limit.
    fn read_circuit_and_age(&mut self, a: &ServeArgs) -> Result<(), ConfigError> {
        self.delivery.circuit = CircuitSettings {
            failures: parse_num(
                "CIRCUIT_FAILURES",
                &a.circuit_failures,
                "a whole number (0 = no circuit breaker)",
            )?,
            cooldown: ms("CIRCUIT_COOLDOWN_MS", &a.circuit_cooldown_ms)?,
            max_cooldown: ms("CIRCUIT_MAX_COOLDOWN_MS", &a.circuit_max_cooldown_ms)?,
        };
        self.delivery.max_age = Duration::from_secs(parse_num(
            "MAX_AGE_SECS",
            &a.max_age_secs,
            "a whole number of seconds",
        )?);
        Ok(())
    }

    /// Cross-field rules and ranges; also run by `serve::run` so that configs built
    /// in code obey them too. Every number has a maximum ([`LIMITS`], in
    /// docs/configuration.md): no setting, and no header a target sends,
    /// can overflow a time or a size.
    /// Every numeric setting within its documented maximum (`LIMITS`).
    fn check_limits(&self) -> Result<(), ConfigError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        for (name, value) in [
            ("BACKOFF_DELAY_MS", ms(self.delivery.backoff.base)),
            (
                "MAX_RETRY_AFTER_SECS",
                self.delivery.backoff.max_retry_after.as_secs(),
            ),
            ("DELIVERY_TIMEOUT_MS", ms(self.delivery.delivery_timeout)),
            ("LOCK_DURATION_MS", ms(self.pool.lock_duration)),
            ("SHUTDOWN_GRACE_MS", ms(self.pool.shutdown_grace)),
            (
                "REMOVE_ON_COMPLETE",
                u64::from(self.store.retention.remove_on_complete),
            ),
            ("DEDUP_TTL_SECS", self.store.retention.dedup_ttl.as_secs()),
            ("MAX_BODY_BYTES", self.ingress.max_body_bytes as u64),
            (
                "REQUEST_READ_TIMEOUT_MS",
                ms(self.ingress.request_read_timeout),
            ),
            (
                "CIRCUIT_FAILURES",
                u64::from(self.delivery.circuit.failures),
            ),
            ("CIRCUIT_COOLDOWN_MS", ms(self.delivery.circuit.cooldown)),
            (
                "CIRCUIT_MAX_COOLDOWN_MS",
                ms(self.delivery.circuit.max_cooldown),
            ),
            ("MAX_AGE_SECS", self.delivery.max_age.as_secs()),
            ("COGRELAY_MAX_DB_BYTES", self.store.max_db_bytes),
            // Events per second, rounded up (1e10 was a period under a
            // nanosecond: one event a second).
            (
                "INGRESS_RATE_LIMIT",
                self.ingress.rate_limit.map_or(0, |(r, _)| r.ceil() as u64),
            ),
        ] {
            within(name, value)?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_limits()?;
        if self.delivery.circuit.cooldown.is_zero()
            || self.delivery.circuit.max_cooldown < self.delivery.circuit.cooldown
        {
            return Err(bad(format!(
                "CIRCUIT_COOLDOWN_MS={} and CIRCUIT_MAX_COOLDOWN_MS={} are not valid: use a positive cool-down and a maximum at least as long",
                self.delivery.circuit.cooldown.as_millis(),
                self.delivery.circuit.max_cooldown.as_millis()
            )));
        }
        if self.delivery.max_age.is_zero() {
            return Err(bad(
                "MAX_AGE_SECS=0 is not valid: use a positive number of seconds",
            ));
        }
        if self.ingress.signing_secrets.is_empty()
            && self.ingress.basic.is_none()
            && !self.ingress.allow_unauthenticated
        {
            return Err(bad("no ingress authentication: set WEBHOOK_SIGNING_SECRET or INGRESS_BASIC_USER/INGRESS_BASIC_PASSWORD, or pass --allow-unauthenticated for local testing"));
        }
        if !(1..=4096).contains(&self.delivery.concurrency) {
            return Err(bad(format!(
                "CONCURRENCY={} is out of range: use 1 to 4096",
                self.delivery.concurrency
            )));
        }
        if self.pool.nice > 19 {
            return Err(bad(format!(
                "DELIVERY_NICE={} is out of range: use 0 to 19",
                self.pool.nice
            )));
        }
        if !(1..=100).contains(&self.delivery.attempts) {
            return Err(bad(format!(
                "ATTEMPTS={} is out of range: use 1 to 100",
                self.delivery.attempts
            )));
        }
        if !(0.0..=1.0).contains(&self.delivery.backoff.jitter) {
            return Err(bad(format!(
                "BACKOFF_JITTER={} is out of range: use a number from 0 to 1",
                self.delivery.backoff.jitter
            )));
        }
        if self.delivery.delivery_timeout.is_zero() {
            return Err(bad(
                "DELIVERY_TIMEOUT_MS=0 is not valid: use a positive number of milliseconds",
            ));
        }
        if self.pool.lock_duration <= self.delivery.delivery_timeout {
            return Err(bad(format!(
                "LOCK_DURATION_MS={} must be greater than DELIVERY_TIMEOUT_MS={}: raise LOCK_DURATION_MS or lower DELIVERY_TIMEOUT_MS",
                self.pool.lock_duration.as_millis(),
                self.delivery.delivery_timeout.as_millis()
            )));
        }
        if self.ingress.max_body_bytes == 0 {
            return Err(bad(
                "MAX_BODY_BYTES=0 is not valid: use a positive size in bytes",
            ));
        }
        if !self.admin.listen.ip().is_loopback() && self.admin.token.is_none() {
            return Err(bad(format!(
                "ADMIN_LISTEN={} is not a loopback address and ADMIN_TOKEN is not set: set ADMIN_TOKEN, or listen on 127.0.0.1",
                self.admin.listen
            )));
        }
        if self.admin.listen.port() == self.ingress.port {
            // The ingress takes the port on every address: serve would
            // stop at start with "address already in use".
            return Err(bad(format!(
                "ADMIN_LISTEN={} uses the ingress's PORT={}: give the admin API another port, e.g. 127.0.0.1:3001",
                self.admin.listen, self.ingress.port
            )));
        }
        Ok(())
    }
}

/// The smallest store cap (`COGRELAY_MAX_DB_BYTES`) other than none: an
/// empty store and its reserve take a few hundred KB.
pub const MIN_DB_BYTES: u64 = 1 << 20;

/// The largest value of each numeric setting (the smallest is in each one's
/// own rule): a day for a backoff, a lease, a cool-down; a week for a
/// `Retry-After`; 30 days of dedup; a year of age; sizes a machine has.
/// docs/configuration.md lists them; `tests/it/fuzz.rs` checks that the
/// largest of each starts and one more is one clear line.
pub const LIMITS: &[(&str, u64)] = &[
    ("BACKOFF_DELAY_MS", 86_400_000),
    ("MAX_RETRY_AFTER_SECS", 604_800),
    ("DELIVERY_TIMEOUT_MS", 3_600_000),
    ("LOCK_DURATION_MS", 86_400_000),
    ("SHUTDOWN_GRACE_MS", 3_600_000),
    ("REMOVE_ON_COMPLETE", 1_000_000),
    ("DEDUP_TTL_SECS", 2_592_000),
    ("MAX_BODY_BYTES", 64 * 1024 * 1024),
    ("REQUEST_READ_TIMEOUT_MS", 600_000),
    ("CIRCUIT_FAILURES", 1_000),
    ("CIRCUIT_COOLDOWN_MS", 86_400_000),
    ("CIRCUIT_MAX_COOLDOWN_MS", 86_400_000),
    ("MAX_AGE_SECS", 31_536_000),
    ("COGRELAY_MAX_DB_BYTES", 1 << 50),
    ("INGRESS_RATE_LIMIT", 1_000_000),
];

/// `value` of setting `name` at most its [`LIMITS`] maximum.
fn within(name: &str, value: u64) -> Result<(), ConfigError> {
    match LIMITS.iter().find(|(n, _)| *n == name) {
        Some((_, max)) if value > *max => Err(bad(format!(
            "{name}={value} is out of range: use at most {max}"
        ))),
        _ => Ok(()),
    }
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

    /// Every numeric setting takes its largest value, and one more is one
    /// line naming it and its maximum (no overflow further on: times and
    /// sizes are bounded here).
    #[test]
    fn every_number_has_a_maximum() {
        for (name, max) in LIMITS {
            let flag = match *name {
                "COGRELAY_MAX_DB_BYTES" => "--max-db-bytes".to_string(),
                n => format!("--{}", n.to_ascii_lowercase().replace('_', "-")),
            };
            let mut args = OK.to_vec();
            // A lease longer than the longest delivery timeout (the rule
            // between the two), and a cool-down within the largest maximum.
            let extra = match *name {
                "DELIVERY_TIMEOUT_MS" => vec!["--lock-duration-ms", "86400000"],
                "CIRCUIT_COOLDOWN_MS" => vec!["--circuit-max-cooldown-ms", "86400000"],
                _ => vec![],
            };
            args.extend(extra.iter().copied());
            let at_max = max.to_string();
            let over = (max + 1).to_string();
            let mut ok = args.clone();
            ok.extend([flag.as_str(), at_max.as_str()]);
            assert!(parse(&ok).is_ok(), "{name}={max}: {:?}", parse(&ok).err());
            let mut bad = args.clone();
            bad.extend([flag.as_str(), over.as_str()]);
            let err = parse(&bad).expect_err("over the maximum").to_string();
            assert!(
                err.contains(name) && err.contains(&format!("at most {max}")),
                "{name}: {err}"
            );
        }
    }

    /// A signing secret that is set but blank is one line, the error: not
    /// also the note that no ingress authentication is set.
    #[test]
    fn a_blank_signing_secret_is_one_line_in_config_check() {
        let cli = crate::cli::Cli::try_parse_from([
            "cogrelay",
            "serve",
            "--target-endpoint",
            "http://127.0.0.1:9/x",
            "--webhook-signing-secret",
            " , ",
        ])
        .expect("flags");
        let crate::cli::Command::Serve(a) = cli.command else {
            panic!("serve")
        };
        let (result, notes) = ServeConfig::check(&a);
        let errors = result.expect_err("refused");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].to_string().contains("set but empty"),
            "{errors:?}"
        );
        assert!(notes.is_empty(), "{notes:?}");
    }

    /// `config check` and `serve` refuse an admin port that is the
    /// ingress's (serve stopped at start with "address already in use").
    #[test]
    fn the_admin_api_needs_a_port_of_its_own() {
        let mut args = OK.to_vec();
        args.extend(["--port", "3001", "--admin-listen", "127.0.0.1:3001"]);
        let err = parse(&args).expect_err("one port for both").to_string();
        assert!(
            err.contains("ADMIN_LISTEN=127.0.0.1:3001 uses the ingress's PORT=3001"),
            "{err}"
        );
    }

    /// A store cap too small to hold an empty store is refused at start,
    /// not a relay that says it is ready and refuses every event.
    #[test]
    fn a_store_cap_below_a_mib_is_refused() {
        for (cap, ok) in [
            ("0", true),
            ("1", false),
            ("1048575", false),
            ("1048576", true),
        ] {
            let mut args = OK.to_vec();
            args.extend(["--max-db-bytes", cap]);
            match parse(&args) {
                Ok(_) => assert!(ok, "{cap} taken"),
                Err(e) => {
                    assert!(!ok, "{cap}: {e}");
                    assert!(
                        e.to_string().contains("at least 1048576 (1 MiB), or 0"),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn valid_settings_parse_with_rotation_list() {
        let c = parse(&OK).expect("valid");
        assert_eq!(c.ingress.signing_secrets.len(), 2);
        assert_eq!(c.ingress.signing_secrets[1].expose(), "s2");
        assert_eq!(c.delivery.attempts, 5);
        assert_eq!(c.delivery.backoff.base, Duration::from_secs(2));
    }

    /// A token from a secret file ends in a newline; a presented Bearer
    /// token is read without it, so the setting is too (no call matched).
    #[test]
    fn the_admin_token_is_read_without_white_space_at_its_ends() {
        let mut args = OK.to_vec();
        args.extend(["--admin-token", " tok-123\n"]);
        let c = parse(&args).expect("valid");
        assert_eq!(c.admin.token.as_ref().map(|t| t.expose()), Some("tok-123"));
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
        // A target and a Redis URL with credentials and a token in the query.
        args[1] = "http://relay:tpw-789@127.0.0.1:9/x?token=q-246";
        args.extend([
            "--queue",
            "redis",
            "--redis-url",
            "redis://:rpw-135@127.0.0.1:6390",
        ]);
        let c = parse(&args).expect("valid");
        let dbg = format!("{c:?}");
        assert!(dbg.contains("127.0.0.1:9/x"), "the target is shown: {dbg}");
        for secret in [
            "s1", "s2", "c2VjcmV0", "tok-123", "pw-456", "tpw-789", "q-246", "rpw-135",
        ] {
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
                    "--admin-token",
                    " ",
                ],
                "ADMIN_TOKEN is only white space",
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
            parse(&args).map(|c| c.pool.verify_events.is_some())
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
        let mut built = ServeConfig::new(
            parsed.delivery.target.clone(),
            parsed.store.data_dir.clone(),
        );
        built.ingress.signing_secrets = parsed.ingress.signing_secrets.clone();
        built.pool.test_fault = parsed.pool.test_fault;
        assert_eq!(format!("{built:?}"), format!("{parsed:?}"));
    }
}
