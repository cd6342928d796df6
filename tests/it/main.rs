#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr)] // tests: a panic is a failed assertion
//! The integration tests: one binary (`cargo test --test it`), one module per area. Every test talks to
//! real sockets; `support` has the builders (mock upstream, in-process gateway, the real binary), the
//! clients, the metric and log matchers and the patience factor (`FLAGGATE_TEST_PATIENCE`).
//!
//! Run one area with `cargo test --test it telemetry::`, one test by (part of) its name.

mod support;

mod admin;
mod canonical_paths;
mod cli;
mod client_addresses;
mod client_gone;
mod deploy;
mod egress;
mod fairness;
mod hardening;
mod limits;
mod public_routes;
mod rate_limits;
mod reload;
mod robustness;
mod scopes;
mod shield;
mod shutdown;
mod telemetry;
mod tls;
mod token_file;
mod token_sync;
mod transparency;
mod upstream_errors;
mod upstream_tls;
