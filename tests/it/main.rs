//! One integration-test binary. `helpers` has `spawn_app()` and the real target
//! server; each module tests one area of the spec against real parts (HTTP on
//! port 0, SQLite files in temp dirs, the real binary for process-level tests).

#[macro_use]
mod helpers;
mod redis_server;
mod redis_tls;

mod admin;
mod bullmq_compat;
mod bullmq_port;
mod circuit;
mod cognigy;
mod dashboard;
mod delivery;
mod destinations;
mod disk;
mod docs;
mod first_hour;
mod flood;
mod full_store;
mod fuzz;
mod ingress;
mod jobs_cli;
mod layout;
mod operations;
mod ordering;
mod process;
mod queue_conformance;
mod queue_model;
mod redis_ops;
mod register;
mod secrets;
mod store;
mod tls;
mod trust;
