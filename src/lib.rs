//! cogrelay: relay NICE Cognigy webhook events durably to an internal system.
//!
//! # Layout
//!
//! * [`cli`]: the command line (clap derive); each subcommand's doc is its `--help`.
//! * [`config`]: typed, validated settings; one error line per bad setting.
//! * [`telemetry`]: logging (json or pretty).
//! * [`secret`]: the `Secret` newtype, printed as `***`.
//! * [`ingress`]: HTTP receive: read the body within the shared budget,
//!   authenticate, parse the envelope, check the replay window, enqueue.
//! * [`answer`]: reading an answer's body no further than what is kept.
//! * [`queue`]: the queue contract and job states; [`queue::embedded`] is the
//!   SQLite backend.
//! * [`delivery`]: worker pool, attempt classification, backoff, outbound signing.
//! * [`admin`]: health, readiness, queue counts and the dead-letter job routes.
//! * [`serve`]: wires all of the above and runs until shutdown.
//! * [`sink`]: a recording HTTP target (local development, tests, benchmarks).

pub mod admin;
pub mod answer;
pub mod cli;
pub mod cognigy;
pub mod config;
pub mod delivery;
pub mod event;
pub mod ingress;
pub mod jobs_cli;
pub mod listing;
pub mod metrics;
pub mod queue;
pub mod register;
pub mod secret;
pub mod serve;
pub mod sim;
pub mod sink;
pub mod telemetry;
pub mod time;
pub mod tls;
