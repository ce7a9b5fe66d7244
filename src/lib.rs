//! cogrelay: relay NICE Cognigy webhook events durably to an internal system.
//!
//! # Layout
//!
//! Bottom-up: each module imports only modules listed above it, except
//! `config`, `serve` and `main`, which wire the others (no two modules import
//! each other: `tests/it/layout.rs` checks it from the source).
//!
//! * [`time`]: wall-clock milliseconds and RFC 3339.
//! * [`secret`]: the `Secret` newtype (`***`), URLs without their credentials.
//! * [`event`]: the domain core: event, key, kind, attempt, outcome.
//! * [`answer`]: reading a remote answer within a bound; `Retry-After`.
//! * [`queue`]: the contract (`Queue` for the hot path, `Operate` for
//!   operators), job states and their rules; [`queue::embedded`] (SQLite, group
//!   commit, bounded disk) and [`queue::redis`] (BullMQ layout, batched scripts
//!   in `queue/lua/`).
//! * [`metrics`]: the Prometheus registry of one relay.
//! * [`listing`]: the job listing query and answer (admin API and CLI).
//! * [`cognigy`]: the Cognigy API client: tokens, retries, rate limit, event lookup.
//! * [`delivery`]: the worker pool: `dispatcher`, `attempt` (the pure
//!   decision), classification, backoff, outbound signing, the target clients,
//!   the ingress's handoff.
//! * [`ingress`]: HTTP receive: the body within the shared budget,
//!   authentication, the envelope, the replay window, the enqueue.
//! * [`tls`]: the ingress's accept loop (HTTPS, timeouts, back-off, graceful close).
//! * [`admin`]: health, readiness, metrics, the dead-letter routes, the dashboard.
//! * [`sink`]: a recording HTTP target (local development, tests, benchmarks).
//! * [`sim`]: the Cognigy simulator.
//! * [`cli`]: the command line (clap derive); each subcommand's doc is its `--help`.
//! * [`telemetry`]: logging (json or pretty).
//! * [`config`]: flags and environment into each module's settings; one error
//!   line per bad setting.
//! * [`register`]: the registration flow.
//! * [`jobs_cli`]: `cogrelay jobs` and `cogrelay queue stats`.
//! * [`serve`]: wires the relay together and runs it until shutdown.

pub mod admin;
mod answer;
pub mod cli;
pub mod cognigy;
pub mod config;
pub mod delivery;
pub mod event;
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
