//! Command line: one `clap` derive per subcommand; each `///` doc is its `--help`.
//!
//! Every flag also reads an environment variable (and so the `.env` file, which
//! `main` loads into the environment without overriding it): flag > environment >
//! `.env` > default. Values are taken as strings here and parsed in
//! [`crate::config`], so that a bad value gets one line naming the setting and the
//! fix (exit 2) instead of a usage dump. Secret-bearing flags hide their
//! environment values from `--help`.

use clap::{Args, Parser, Subcommand};

/// Relay NICE Cognigy webhook events durably to an internal system.
///
/// `cogrelay serve` receives Cognigy's webhook events, acknowledges them once they
/// are durably queued, and delivers them to TARGET_ENDPOINT with retries and a
/// dead-letter queue you can inspect and replay over the admin API.
/// Every default of `serve` and of the queue, written once: clap shows and
/// applies them, and `ServeConfig::new` starts from them.
pub mod defaults {
    pub const PORT: &str = "3000";
    pub const MAX_DB_BYTES: &str = "0";
    pub const ADMIN_LISTEN: &str = "127.0.0.1:3001";
    pub const CONCURRENCY: &str = "16";
    pub const DELIVERY_NICE: &str = "10";
    pub const ATTEMPTS: &str = "5";
    pub const BACKOFF_DELAY_MS: &str = "2000";
    pub const BACKOFF_JITTER: &str = "0";
    pub const MAX_RETRY_AFTER_SECS: &str = "3600";
    pub const DELIVERY_TIMEOUT_MS: &str = "15000";
    pub const LOCK_DURATION_MS: &str = "30000";
    pub const SHUTDOWN_GRACE_MS: &str = "10000";
    pub const REMOVE_ON_COMPLETE: &str = "100";
    pub const DEDUP_TTL_SECS: &str = "86400";
    pub const MAX_BODY_BYTES: &str = "1048576";
    pub const REQUEST_READ_TIMEOUT_MS: &str = "10000";
    pub const REDIS_PORT: &str = "6379";
    pub const QUEUE_NAME: &str = "cognigy-webhook-retries";
    pub const DATA_DIR: &str = "./data";
    pub const FSYNC: &str = "always";
    pub const CONFIG_FILE: &str = "./cogrelay.toml";
    pub const CIRCUIT_FAILURES: &str = "5";
    pub const CIRCUIT_COOLDOWN_MS: &str = "10000";
    pub const CIRCUIT_MAX_COOLDOWN_MS: &str = "300000";
    pub const MAX_AGE_SECS: &str = "86400";
    /// The Redis URL when neither REDIS_URL nor REDIS_HOST is set.
    pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
}

#[derive(Debug, Parser)]
#[command(name = "cogrelay", version, propagate_version = true)]
pub struct Cli {
    /// Log format: `json` (one object a line) or `pretty`. Default: pretty on a
    /// terminal, else json.
    #[arg(long, env = "LOG_FORMAT", global = true, help_heading = "Logging")]
    pub log_format: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the relay: ingress on PORT, delivery workers, admin API on ADMIN_LISTEN.
    ///
    /// Cognigy posts events to `POST /api/webhook/cognigy`; each is authenticated
    /// (HMAC signature, Standard Webhooks signature or Basic credentials), stored
    /// durably, answered 200, and
    /// delivered to TARGET_ENDPOINT by a worker pool with exponential-backoff
    /// retries. Failed jobs stay in the dead-letter view (`GET
    /// /admin/jobs?state=failed` on the admin address) until retried or removed.
    /// SIGTERM/SIGINT drain in-flight deliveries and exit 0.
    Serve(Box<ServeArgs>),

    /// Register WEBHOOK_TARGET_URL as a webhook endpoint in Cognigy.
    ///
    /// Steps, each reported on stderr: authenticate (OAuth client credentials or
    /// API key), validate the target (TLS with SNI against trusted roots plus
    /// --ca-file, then HEAD answering 2xx), register it idempotently (re-running
    /// never creates a second connector), poll until it is active, notify
    /// GATEWAY_CALLBACK_URL. Prints one JSON audit line on stdout.
    /// Exit codes: 0 success, 2 configuration, 3 target validation, 4
    /// authentication, 5 registration, 6 health not verified, 7 gateway sync, 8 Cognigy unreachable.
    Register(Box<RegisterArgs>),

    /// Run a local Cognigy API simulator (both APIs) for development and tests.
    ///
    /// Serves the token endpoints, connectors (Idempotency-Key, pending→active),
    /// event lookups (404 for event ids starting with "unknown"), REST endpoints,
    /// a target sink at POST /events and a gateway receiver at POST /gateway.
    /// GET /sim/stats shows what it saw; POST /sim/faults injects failures.
    /// Any non-empty client id/secret is accepted unless --client-id/--client-secret are set.
    Sim(SimArgs),

    /// Inspect and fix jobs: list (the dead-letter view with --state failed),
    /// show, retry, remove. Works on the queue directly, whether or not a relay
    /// is running (embedded: the same COGRELAY_DATA_DIR; redis: the same Redis
    /// and QUEUE_NAME). Tables by default, --json for scripts.
    ///
    /// The queue's options go before the subcommand (`cogrelay jobs
    /// --data-dir /var/lib/cogrelay list`), or in the environment. Exit codes
    /// (also of `queue` and `destinations`): 0 done; 1 the queue cannot be
    /// reached, or the output cannot be written; 2 a bad argument; 3 no such
    /// job or destination; 4 a job whose state does not allow the change
    /// (retry of a job that is not failed, removal of an active one).
    Jobs(JobsArgs),

    /// Queue statistics (counts by state).
    Queue(QueueArgs),

    /// Destinations in the queue: list (jobs by state, paused or not), pause
    /// NAME (its jobs are stored, not delivered, by every relay, until
    /// resumed), resume NAME. Works on the queue directly, like `jobs`; the
    /// circuit state is the relay's (GET /admin/destinations).
    Destinations(DestinationsArgs),

    /// Check the configuration: `cogrelay config check` reads every setting of
    /// `serve` and the destinations file (COGRELAY_CONFIG, default
    /// ./cogrelay.toml when it exists) and prints the resolved destinations as
    /// JSON, credentials as ***. A bad setting or file is one line naming the
    /// file, the destination and the key; exit 2.
    Config(ConfigArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ConfigCommand {
    /// Validate, and print the resolved destinations (secrets ***).
    Check(Box<ServeArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// waiting, active, delayed, completed, failed (default: all).
        #[arg(long)]
        state: Option<String>,
        /// Jobs to show (1 to 500).
        #[arg(long, default_value = "20")]
        limit: String,
        /// Jobs to skip.
        #[arg(long, default_value = "0")]
        offset: String,
        /// Only this destination's jobs (default: every destination).
        #[arg(long)]
        destination: Option<String>,
    },
    /// One job with its destination, payload and every attempt.
    Show {
        /// The job's id, as `jobs list` shows it (the ingress answer's `jobId`,
        /// or a value of its `jobs` map).
        id: String,
    },
    /// Put a failed job back to waiting (attempts reset), or every failed job
    /// with --all-failed (and --destination NAME for one destination's).
    #[command(
        override_usage = "cogrelay jobs retry <ID>\n       cogrelay jobs retry --all-failed [--destination <NAME>]"
    )]
    Retry {
        /// The failed job to retry (or --all-failed instead).
        #[arg(required_unless_present = "all_failed", conflicts_with = "all_failed")]
        id: Option<String>,
        /// Retry every failed job.
        #[arg(long)]
        all_failed: bool,
        /// With --all-failed: only this destination's failed jobs.
        #[arg(long, requires = "all_failed")]
        destination: Option<String>,
    },
    /// Delete a job (not one being delivered).
    Remove {
        /// The job's id, as `jobs list` shows it.
        id: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct DestinationsArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Option<DestinationsCommand>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DestinationsCommand {
    /// Each destination with jobs in the queue, or paused (the default).
    List,
    /// Stop delivering to NAME; its jobs are stored and wait.
    Pause {
        /// A destination's name (the `name` of a `[[destination]]` in the
        /// destinations file, or `default`); `destinations list` shows them.
        name: String,
    },
    /// Deliver to NAME again.
    Resume {
        /// A paused destination's name; `destinations list` shows them.
        name: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: QueueCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum QueueCommand {
    /// Jobs by state.
    Stats,
}

/// Where the queue is (shared by `serve`, `jobs` and `queue`).
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Queue backend: `embedded` (SQLite under COGRELAY_DATA_DIR) or `redis`.
    /// Default: redis if REDIS_URL or REDIS_HOST is set, else embedded.
    #[arg(long, env = "COGRELAY_QUEUE")]
    pub queue: Option<String>,

    /// Redis URL for the redis queue, e.g. redis://127.0.0.1:6379, or
    /// rediss://host:6380 for TLS (may carry a password; never printed).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// With rediss://: a PEM file of the CA that signed Redis's certificate,
    /// trusted besides the web PKI roots (a private CA, a self-signed server).
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<String>,

    /// Redis host for the redis queue (with REDIS_PORT), when REDIS_URL is not set.
    #[arg(long, env = "REDIS_HOST", hide_env_values = true)]
    pub redis_host: Option<String>,

    /// Redis port for the redis queue.
    #[arg(long, env = "REDIS_PORT", default_value = defaults::REDIS_PORT)]
    pub redis_port: String,

    /// Queue name (part of the Redis keys: bull:<QUEUE_NAME>:...; a
    /// destination's queue is QUEUE_NAME.<destination>, so no ':' or '.').
    #[arg(long, env = "QUEUE_NAME", default_value = defaults::QUEUE_NAME)]
    pub queue_name: String,

    /// Directory of the embedded store (`serve` creates it if missing, readable
    /// by its owner only, as are the parents it creates; one that exists keeps
    /// its mode; the other commands need it to exist).
    #[arg(long, env = "COGRELAY_DATA_DIR", default_value = defaults::DATA_DIR)]
    pub data_dir: String,

    /// `always`: every acknowledged event is fsync'd (survives power loss);
    /// `off`: committed to the OS only (survives a crash of the relay, not of the machine).
    #[arg(long, env = "COGRELAY_FSYNC", default_value = defaults::FSYNC)]
    pub fsync: String,
}

/// How to reach Cognigy (shared by `register` and `serve`'s event verification).
#[derive(Debug, Clone, Args)]
pub struct CognigyArgs {
    /// `connectors` (the API of the tutorials) or `rest` (Cognigy.AI REST API /new/v2.0).
    #[arg(
        long = "cognigy-api",
        env = "COGNIGY_API",
        default_value = "connectors"
    )]
    pub api: String,

    /// API host, e.g. acme.cognigy.com (https is implied).
    #[arg(long = "cognigy-domain", env = "COGNIGY_DOMAIN")]
    pub domain: Option<String>,

    /// Full base URL; overrides COGNIGY_DOMAIN (e.g. http://127.0.0.1:8600 for `cogrelay sim`).
    #[arg(
        long = "cognigy-base-url",
        env = "COGNIGY_BASE_URL",
        hide_env_values = true
    )]
    pub base_url: Option<String>,

    /// OAuth 2.0 client id.
    #[arg(long = "cognigy-client-id", env = "COGNIGY_CLIENT_ID")]
    pub client_id: Option<String>,

    /// OAuth 2.0 client secret.
    #[arg(
        long = "cognigy-client-secret",
        env = "COGNIGY_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub client_secret: Option<String>,

    /// API key sent as X-API-Key (rest API only), instead of OAuth.
    #[arg(
        long = "cognigy-api-key",
        env = "COGNIGY_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// Token endpoint override (default: /api/v1/auth/token, rest: /auth/oauth2/token).
    #[arg(
        long = "cognigy-token-url",
        env = "COGNIGY_TOKEN_URL",
        hide_env_values = true
    )]
    pub token_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub cognigy: CognigyArgs,

    /// The public URL to register (the relay's ingress), e.g. https://relay.example.com/api/webhook/cognigy.
    #[arg(long, env = "WEBHOOK_TARGET_URL", hide_env_values = true)]
    pub target_url: Option<String>,

    /// Secret Cognigy signs requests with (sent in the connector's requestSigning); of a comma-separated rotation list (as `serve` takes it), the first.
    #[arg(long, env = "WEBHOOK_SIGNING_SECRET", hide_env_values = true)]
    pub webhook_signing_secret: Option<String>,

    /// Where to POST the `connector.registered` event (skipped when unset).
    #[arg(long, env = "GATEWAY_CALLBACK_URL", hide_env_values = true)]
    pub gateway_callback_url: Option<String>,

    /// Connector / endpoint name.
    #[arg(long, env = "CONNECTOR_NAME", default_value = "cogrelay-webhook")]
    pub name: String,

    /// Idempotency key (default: derived from the API base, the target URL and --name).
    #[arg(long, env = "IDEMPOTENCY_KEY")]
    pub idempotency_key: Option<String>,

    /// Flow the endpoint runs (rest API only).
    #[arg(long, env = "COGNIGY_FLOW_ID")]
    pub flow_id: Option<String>,

    /// Extra trusted CA certificate(s) (PEM) for the target's TLS check.
    #[arg(long, env = "CA_FILE")]
    pub ca_file: Option<String>,

    /// Accept an http:// target (local testing only; Cognigy calls https).
    #[arg(long, env = "ALLOW_HTTP")]
    pub allow_http: bool,

    /// Target pre-flight timeout.
    #[arg(long, env = "TARGET_TIMEOUT_MS", default_value = "5000")]
    pub timeout_ms: String,

    /// Health checks before giving up (exit 6).
    #[arg(long, env = "HEALTH_ATTEMPTS", default_value = "5")]
    pub health_attempts: String,

    /// First delay between health checks; doubles each time.
    #[arg(long, env = "HEALTH_DELAY_MS", default_value = "2000")]
    pub health_delay_ms: String,

    /// Machine mode: no human summary on stderr, only the JSON audit line on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Port to listen on (127.0.0.1).
    #[arg(long, env = "SIM_PORT", default_value = "8600")]
    pub port: String,

    /// Accept only this client id (default: any non-empty).
    #[arg(long, env = "SIM_CLIENT_ID")]
    pub client_id: Option<String>,

    /// Accept only this client secret (default: any non-empty).
    #[arg(long, env = "SIM_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,

    /// Accept only this API key (default: any non-empty).
    #[arg(long, env = "SIM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Lifetime of issued tokens.
    #[arg(long, env = "SIM_TOKEN_TTL_SECS", default_value = "3600")]
    pub token_ttl_secs: String,

    /// Polls a new connector answers `pending` before it is `active`.
    #[arg(long, env = "SIM_PENDING_POLLS", default_value = "2")]
    pub pending_polls: String,

    /// Requests per minute per client before 429.
    #[arg(long, env = "SIM_RATE_LIMIT", default_value = "100")]
    pub rate_limit: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Ingress port, on all interfaces, IPv6 and IPv4.
    #[arg(help_heading = "Ingress and authentication", long, env = "PORT", default_value = defaults::PORT)]
    pub port: String,

    /// Serve the ingress over HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(
        help_heading = "Ingress and authentication",
        long,
        env = "TLS_CERT_FILE"
    )]
    pub tls_cert: Option<String>,

    /// Private key (PEM) of --tls-cert.
    #[arg(
        help_heading = "Ingress and authentication",
        long,
        env = "TLS_KEY_FILE"
    )]
    pub tls_key: Option<String>,

    /// Shared HMAC-SHA256 secret(s) Cognigy signs with (`X-Webhook-Signature`);
    /// comma-separated for rotation: any of them may match. A `whsec_<base64>` entry also verifies Standard Webhooks headers (webhook-id, webhook-timestamp, webhook-signature; 5-minute tolerance).
    #[arg(
        help_heading = "Ingress and authentication",
        long,
        env = "WEBHOOK_SIGNING_SECRET",
        hide_env_values = true
    )]
    pub webhook_signing_secret: Option<String>,

    /// User name accepted in HTTP Basic credentials on the ingress.
    #[arg(
        help_heading = "Ingress and authentication",
        long,
        env = "INGRESS_BASIC_USER"
    )]
    pub ingress_basic_user: Option<String>,

    /// Password accepted in HTTP Basic credentials on the ingress.
    #[arg(
        help_heading = "Ingress and authentication",
        long,
        env = "INGRESS_BASIC_PASSWORD",
        hide_env_values = true
    )]
    pub ingress_basic_password: Option<String>,

    /// Accept events with no authentication at all (a warning is logged at start-up).
    #[arg(
        help_heading = "Ingress and authentication",
        long,
        env = "ALLOW_UNAUTHENTICATED"
    )]
    pub allow_unauthenticated: bool,

    /// Largest accepted request body (bytes).
    #[arg(help_heading = "Ingress and authentication", long, env = "MAX_BODY_BYTES", default_value = defaults::MAX_BODY_BYTES)]
    pub max_body_bytes: String,

    /// Longest a client may take to send a request's headers, and its body
    /// (slow clients are cut off: headers by closing, a body with 408). The
    /// admin port cuts off slow headers alike.
    #[arg(help_heading = "Ingress and authentication", long, env = "REQUEST_READ_TIMEOUT_MS", default_value = defaults::REQUEST_READ_TIMEOUT_MS)]
    pub request_read_timeout_ms: String,

    /// Events per second accepted from one source address (0 = no limit).
    #[arg(
        help_heading = "Ingress and authentication",
        long,
        env = "INGRESS_RATE_LIMIT",
        default_value = "0"
    )]
    pub ingress_rate_limit: String,

    /// Burst allowed above INGRESS_RATE_LIMIT per source address.
    #[arg(
        help_heading = "Ingress and authentication",
        long,
        env = "INGRESS_RATE_BURST",
        default_value = "100"
    )]
    pub ingress_rate_burst: String,

    /// The internal system every event is delivered to (http or https URL):
    /// the one destination, `default`. Required without a destinations file;
    /// an error with one.
    #[arg(
        help_heading = "Destinations",
        long,
        env = "TARGET_ENDPOINT",
        hide_env_values = true
    )]
    pub target_endpoint: Option<String>,

    /// The destinations file (TOML, `[[destination]]` tables; see
    /// docs/destinations.md). Default: ./cogrelay.toml when it exists.
    #[arg(
        help_heading = "Destinations",
        long = "config",
        env = "COGRELAY_CONFIG"
    )]
    pub config_file: Option<String>,

    /// If set (`whsec_<base64>`), deliveries carry Standard Webhooks signatures.
    #[arg(
        help_heading = "Destinations",
        long,
        env = "TARGET_SIGNING_SECRET",
        hide_env_values = true
    )]
    pub target_signing_secret: Option<String>,

    /// Deliveries in flight at once.
    #[arg(help_heading = "Delivery", long, env = "CONCURRENCY", default_value = defaults::CONCURRENCY)]
    pub concurrency: String,

    /// Delivery attempts per event, counting the first.
    #[arg(help_heading = "Delivery", long, env = "ATTEMPTS", default_value = defaults::ATTEMPTS)]
    pub attempts: String,

    /// Delay before retry n is BACKOFF_DELAY_MS × 2^(n-1).
    #[arg(help_heading = "Delivery", long, env = "BACKOFF_DELAY_MS", default_value = defaults::BACKOFF_DELAY_MS)]
    pub backoff_delay_ms: String,

    /// Random jitter 0..1: a delay d becomes a random value in [d × (1 - jitter), d].
    #[arg(help_heading = "Delivery", long, env = "BACKOFF_JITTER", default_value = defaults::BACKOFF_JITTER)]
    pub backoff_jitter: String,

    /// Upper bound on a target's Retry-After.
    #[arg(help_heading = "Delivery", long, env = "MAX_RETRY_AFTER_SECS", default_value = defaults::MAX_RETRY_AFTER_SECS)]
    pub max_retry_after_secs: String,

    /// Timeout of one delivery attempt.
    #[arg(help_heading = "Delivery", long, env = "DELIVERY_TIMEOUT_MS", default_value = defaults::DELIVERY_TIMEOUT_MS)]
    pub delivery_timeout_ms: String,

    /// A job still undelivered after this many seconds is failed ("not
    /// delivered within max_age_secs"); a destination's `max_age_secs` overrides it.
    #[arg(help_heading = "Delivery", long, env = "MAX_AGE_SECS", default_value = defaults::MAX_AGE_SECS)]
    pub max_age_secs: String,

    /// How much the delivery threads yield to the ingress when the CPU is
    /// short, as a nice value (0-19) added to theirs: acknowledging new events
    /// comes first, deliveries get a smaller share. Higher values give the
    /// ingress more, but also rank deliveries below other busy processes on
    /// the machine. 0 = same priority.
    #[arg(help_heading = "Delivery", long, env = "DELIVERY_NICE", default_value = defaults::DELIVERY_NICE)]
    pub delivery_nice: String,

    /// How long a stop (SIGTERM) waits for in-flight deliveries; one still
    /// out then goes back to the queue and is sent again. (A reload lets the
    /// pools it replaces end theirs, each within its timeout.)
    #[arg(help_heading = "Delivery", long, env = "SHUTDOWN_GRACE_MS", default_value = defaults::SHUTDOWN_GRACE_MS)]
    pub shutdown_grace_ms: String,

    /// Retryable failures (5xx, 408, timeouts, connection errors) of this
    /// many different events in a row that open a destination's circuit (an
    /// event's retries count once): nothing is sent to it for the cool-down
    /// and its jobs keep their attempts (0 = no breaker).
    /// `[destination.circuit]` overrides it.
    #[arg(help_heading = "Circuit breaker", long, env = "CIRCUIT_FAILURES", default_value = defaults::CIRCUIT_FAILURES)]
    pub circuit_failures: String,

    /// First cool-down of an open circuit before one probe delivery; doubles
    /// after each failed probe.
    #[arg(help_heading = "Circuit breaker", long, env = "CIRCUIT_COOLDOWN_MS", default_value = defaults::CIRCUIT_COOLDOWN_MS)]
    pub circuit_cooldown_ms: String,

    /// Longest cool-down of an open circuit.
    #[arg(help_heading = "Circuit breaker", long, env = "CIRCUIT_MAX_COOLDOWN_MS", default_value = defaults::CIRCUIT_MAX_COOLDOWN_MS)]
    pub circuit_max_cooldown_ms: String,

    #[command(flatten, next_help_heading = "Queue")]
    pub store: StoreArgs,

    /// Cap on the embedded store's size in bytes (0 = none; else at least 1 MiB, 1048576). When reached, ingress
    /// answers 503 instead of accepting what it could not keep.
    #[arg(help_heading = "Queue", long, env = "COGRELAY_MAX_DB_BYTES", default_value = defaults::MAX_DB_BYTES)]
    pub max_db_bytes: String,

    /// Lease on a job being delivered; must exceed DELIVERY_TIMEOUT_MS.
    #[arg(help_heading = "Queue", long, env = "LOCK_DURATION_MS", default_value = defaults::LOCK_DURATION_MS)]
    pub lock_duration_ms: String,

    /// Completed jobs kept (newest first); older ones are pruned.
    #[arg(help_heading = "Queue", long, env = "REMOVE_ON_COMPLETE", default_value = defaults::REMOVE_ON_COMPLETE)]
    pub remove_on_complete: String,

    /// An event seen again within this many seconds (its key; two envelopes
    /// sharing a key are told apart: docs/guarantees.md) is a duplicate.
    #[arg(help_heading = "Queue", long, env = "DEDUP_TTL_SECS", default_value = defaults::DEDUP_TTL_SECS)]
    pub dedup_ttl_secs: String,

    /// Admin API address (health, queue, jobs). Must be loopback unless ADMIN_TOKEN is set.
    #[arg(help_heading = "Admin", long, env = "ADMIN_LISTEN", default_value = defaults::ADMIN_LISTEN)]
    pub admin_listen: String,

    /// Bearer token required on every /admin/* call when set (read without
    /// white space at its ends, as a presented token is).
    #[arg(
        help_heading = "Admin",
        long,
        env = "ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Verify each event envelope with Cognigy before delivering it: `auto` (on
    /// when Cognigy credentials are set and COGNIGY_API=connectors), `on`,
    /// `off`. The Cognigy.AI REST API (`rest`) has no event lookup: with it,
    /// `auto` is off and `on` is a configuration error.
    #[arg(
        help_heading = "Cognigy event verification",
        long,
        env = "VERIFY_EVENTS",
        default_value = "auto"
    )]
    pub verify_events: String,

    /// Cap on Cognigy requests per minute for event verification.
    #[arg(
        help_heading = "Cognigy event verification",
        long,
        env = "COGNIGY_MAX_REQUESTS_PER_MIN",
        default_value = "6000"
    )]
    pub cognigy_max_requests_per_min: String,

    #[command(flatten, next_help_heading = "Cognigy event verification")]
    pub cognigy: CognigyArgs,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every argument of every command says what it is for.
    #[test]
    fn every_argument_is_explained() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "cogrelay", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }

    /// `serve --help` groups its ~50 settings by concern, in the order an
    /// operator sets them up: who may post first, then where events go.
    #[test]
    fn serve_help_is_grouped_by_concern() {
        let mut cli = Cli::command();
        // Global flags (--log-format) reach the subcommands when built.
        cli.build();
        let serve = cli.find_subcommand_mut("serve").expect("serve");
        let help = serve.render_long_help().to_string();
        let order = [
            "Ingress and authentication:",
            "Destinations:",
            "Delivery:",
            "Circuit breaker:",
            "Queue:",
            "Admin:",
            "Cognigy event verification:",
            "Logging:",
        ];
        let at: Vec<usize> = order
            .iter()
            .map(|h| {
                help.find(h)
                    .unwrap_or_else(|| panic!("{h} missing:\n{help}"))
            })
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{help}");
        // The ingress secrets sit with the ingress, before the circuit.
        let secret = help.find("--webhook-signing-secret").expect("secret flag");
        assert!(secret < at[1], "{help}");
        // Nothing is left ungrouped under a generic heading but help.
        let options = help.find("\nOptions:").expect("options");
        let after: String = help[options..]
            .lines()
            .skip(1)
            .take_while(|l| !l.ends_with(':'))
            .collect();
        assert!(
            !after.contains("--port") && !after.contains("--concurrency"),
            "{help}"
        );
    }
}
