//! flaggate: a token-checking reverse proxy in front of an Unleash feature-flag server.
//!
//! Start with [`proxy`] for the request's way through the gateway, [`policy`] for who may reach what,
//! [`token`] for the token model and store, and [`upstream`] for the one way to Unleash.
#![forbid(unsafe_code)]
// Unit tests may unwrap: a panic there is a failed assertion. The code itself may not (`[lints]`).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod error;
pub mod io;
pub mod path;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod upstream;
pub mod watch;
