//! Test builders: a recording mock upstream, an in-process gateway on port 0, and clients (HTTP and raw
//! TCP). Every test talks to real sockets.
#![allow(dead_code, unused_imports)]

pub mod binary;
pub mod client;
pub mod gateway;
pub mod logs;
pub mod metrics;
pub mod poll;
pub mod tls;
pub mod unleash;
pub mod upstream;

pub use client::{get, raw, send, Reply};
pub use gateway::{gateway, TestGateway, TokenSpec};
pub use upstream::{upstream, MockUpstream, Recorded};
