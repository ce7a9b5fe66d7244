//! cogrelay: relay NICE Cognigy webhook events durably to an internal system.
//!
//! # Layout
//!
//! Bottom-up: each module imports only modules listed above it, except
//! `config`, `serve` and `main`, which wire the others (no two modules import
//! each other: `tests/it/layout.rs` checks it from the source).
//! Modules that nothing outside the crate uses are private (`event`,
//! `answer`, `listing`, `admin`, `tls`, and the inner parts of `ingress`,
//! `delivery`, `queue` and `register`); the public ones are what the binary,
//! the tests and the examples call.
//!
//! * [`time`]: wall-clock milliseconds and RFC 3339.
//! * `window`: at most N requests in any rolling window (the Cognigy client's
//!   limit, a destination's `rate_limit`).
//! * [`secret`]: the `Secret` newtype (`***`), URLs without their credentials.
//! * `event`: the domain core: event, key, kind, attempt, outcome.
//! * [`answer`]: reading a remote answer within a bound; `Retry-After`.
//! * [`queue`]: the contract (`Queue` for the hot path, `Operate` for
//!   operators), job states and their rules, the one mapping of a stored job
//!   to its view; `queue::open` for the relay and the tools (its
//!   `StoreSettings`); [`queue::embedded`] (SQLite, group commit, bounded
//!   disk) and [`queue::redis`] (BullMQ layout, batched scripts in `queue/lua/`).
//! * [`metrics`]: the Prometheus registry of one relay.
//! * [`listing`]: the job listing query and answer (admin API and CLI).
//! * [`cognigy`]: the Cognigy API client: tokens, retries, rate limit, event lookup.
//! * [`delivery`]: the worker pool: `dispatcher`, `attempt` (the pure
//!   decision), classification, backoff, outbound signing, the target clients,
//!   the ingress's handoff; `DeliverySettings` (what a destination owns) and
//!   `PoolSettings`.
//! * [`destination`]: the systems a relay delivers to: each one's filter
//!   (event globs, bots, JSON-pointer conditions), delivery and circuit settings.
//! * [`ingress`]: HTTP receive: the body within the shared budget,
//!   authentication, the envelope, the replay window, the enqueue
//!   (`IngressSettings`).
//! * [`tls`]: the ingress's accept loop (HTTPS, timeouts, back-off, graceful close).
//! * `admin`: health, readiness, metrics, the dead-letter routes, the
//!   dashboard (`AdminSettings`).
//! * [`sink`]: a recording HTTP target (local development, tests, benchmarks).
//! * [`sim`]: the Cognigy simulator (`SimOptions`).
//! * [`cli`]: the command line (clap derive); each subcommand's doc is its `--help`.
//! * [`telemetry`]: logging (json or pretty).
//! * [`config`]: flags and environment into each module's settings type
//!   (`config/serve.rs`, `store.rs`, `register.rs`, `sim.rs`) and nothing
//!   else; one error line per bad setting.
//! * [`register`]: the registration flow (`RegisterConfig`).
//! * [`jobs_cli`]: `cogrelay jobs` and `cogrelay queue stats`.
//! * [`serve`]: wires the relay together and runs it until shutdown.

mod admin;
mod answer;
pub mod cli;
pub mod cognigy;
pub mod config;
pub mod delivery;
pub mod destination;
mod event;
pub mod ingress;
pub mod jobs_cli;
mod listing;
pub mod metrics;
pub mod queue;
pub mod register;
pub mod secret;
pub mod serve;
pub mod sim;
pub mod sink;
pub mod telemetry;
pub mod time;
mod tls;
mod window;
