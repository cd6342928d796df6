//! flaggate: a token-checking reverse proxy in front of an Unleash feature-flag server.
//!
//! Start with [`proxy`] for the request's way through the gateway, [`policy`] for who may reach what,
//! [`token`] for the token model and store, and [`upstream`] for the one way to Unleash.
//!
//! The rooms are crate-private, so the compiler sees dead code; what the binary runs is public
//! ([`app`], [`config`], [`telemetry`], [`demo`]), and what benchmarks, fuzz targets and tests reach
//! into is re-exported in [`internals`].
#![forbid(unsafe_code)]
// Unit tests may unwrap: a panic there is a failed assertion. The code itself may not (`[lints]`).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod app;
pub mod config;
pub mod demo;
pub mod telemetry;

pub(crate) mod admin;
pub(crate) mod error;
pub(crate) mod files;
pub(crate) mod io;
pub(crate) mod net;
pub(crate) mod path;
pub(crate) mod policy;
pub(crate) mod proxy;
pub(crate) mod ratelimit;
pub(crate) mod shield;
pub(crate) mod tls;
pub(crate) mod token;
pub(crate) mod upstream;
pub(crate) mod watch;

/// The pieces the `flaggate` binary, the benchmarks, the fuzz targets and the tests reach into. Not a
/// stable library API: it is what they need, and nothing more.
pub mod internals {
    pub use crate::path::canonicalize;
    pub use crate::policy::{decide, Policy};
    pub use crate::proxy::headers;
    pub use crate::proxy::record::request_id;
    pub use crate::proxy::server::serve_simple;
    pub use crate::ratelimit::{Rate, RateLimiter, RateLimits};
    pub use crate::shield::{classify, Bypass, Class, Key};
    pub use crate::token::extract::{extract, token_from_value};
    pub use crate::token::file::load_token_file;
    pub use crate::token::snapshot::FILE_NAME as SNAPSHOT_FILE_NAME;
    pub use crate::token::store::{TokenSet, TokenStore};
    pub use crate::token::unleash::parse_token_list;
    pub use crate::token::{now_unix, parse, Digest, ProjectLabel, Shape, TokenInfo, TokenKind, TokenSource};
    pub use crate::upstream::{Settings as UpstreamSettings, Shares, Upstream};
}
