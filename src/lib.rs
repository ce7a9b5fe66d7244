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
//! * `current`: a value in force, swapped whole on a reload (`Current<T>`).
//! * `window`: at most N requests in any rolling window (the Cognigy client's
//!   limit, a destination's `rate_limit`).
//! * [`secret`]: the `Secret` newtype (`***`), URLs without their credentials.
//! * `event`: the domain core: event, key, kind, attempt, outcome; the rule
//!   for a destination's name and the `default` destination.
//! * `pointer`: the value at a JSON pointer, read along the pointer in a
//!   document's bytes (`where` conditions, ordering keys).
//! * [`answer`]: reading a remote answer within a bound; `Retry-After`.
//! * [`queue`]: the contract (`Queue`: the hot path's operations and the
//!   operators'), job states and their rules, the one mapping of a stored job
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
//!
//! # Life of an event
//!
//! One event from Cognigy's request to its last record, each step as
//! `file` `function` (`tests/it/layout.rs` checks that each named function
//! is in its file):
//!
//! 1. **Receive**: `src/ingress/mod.rs` `receive` runs the checks cheapest
//!    first; `src/ingress/auth.rs` `check` authenticates the raw body,
//!    `src/ingress/envelope.rs` `parse` reads the envelope (or an endpoint
//!    output) and its key, and `src/ingress/mod.rs` `routes` picks the
//!    destinations that want it.
//! 2. **Store**: `src/delivery/handoff.rs` `store` reserves room in each
//!    destination's pool and stores one job per destination in one write
//!    (`src/queue/embedded/writer.rs` `insert_event`; on Redis
//!    `src/queue/redis/routed.rs` `add_routed`, `queue/lua/add_routed.lua`);
//!    the 200 goes out after it is durable, and a pool with room gets its
//!    job handed over, already leased.
//! 3. **Claim**: `src/delivery/dispatcher.rs` `run` asks the pure machine
//!    (`src/delivery/machine.rs` `poll`) what to do next: claim
//!    (`src/queue/embedded/contract.rs` `claim_for`; on Redis
//!    `queue/lua/claim.lua`), start, wait for a due time, a rate limit, a
//!    pause or the circuit.
//! 4. **Attempt**: `src/delivery/attempt.rs` `deliver` sends one request
//!    (`src/delivery/target.rs` `post`), and `src/delivery/classify.rs`
//!    `classify` turns the answer into an outcome.
//! 5. **Decision**: `src/delivery/attempt.rs` `decide` turns the outcome into
//!    a disposition: delivered, retry at a time (`src/delivery/backoff.rs`
//!    `delay`, or the target's `Retry-After`), or failed; the circuit
//!    (`src/delivery/circuit.rs` `record`) hears of it.
//! 6. **Finish**: the disposition is recorded with the attempt
//!    (`src/queue/embedded/contract.rs` `finish`; on Redis `queue/lua/finish.lua`):
//!    completed (pruned past `REMOVE_ON_COMPLETE`), delayed until due, or
//!    failed, where `cogrelay jobs` and the admin API show it.

mod admin;
mod answer;
pub mod cli;
pub mod cognigy;
pub mod config;
mod current;
pub mod delivery;
pub mod destination;
mod event;
pub mod ingress;
pub mod jobs_cli;
mod listing;
pub mod metrics;
mod pointer;
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
