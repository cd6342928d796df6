//! What the phases share: the gateway (one per process), its live settings (swapped whole on reload),
//! and what a request knows about its connection.

use super::body::BodyLimits;
use super::conn::Activity;
use super::metrics::ProxyMetrics;
use super::server::ConnLimits;
use crate::config::Config;
use crate::policy::Policy;
use crate::ratelimit::RateLimiter;
use crate::shield::{self, Shield};
use crate::token::auth::Authenticator;
use crate::upstream::{self, ConnShare, Upstream};
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Everything a request handler needs, shared by all connections.
pub struct Gateway {
    /// The reloadable part of the configuration, swapped whole on reload.
    pub live: ArcSwap<Live>,
    pub auth: Authenticator,
    pub upstream: Arc<Upstream>,
    pub metrics: ProxyMetrics,
    /// Per-token rate limits; kept across reloads so that a reload does not refill every bucket.
    pub limiter: RateLimiter,
    /// The feature-poll cache in front of Unleash.
    pub shield: Shield,
    /// Route class of requests refused before routing (`none`), shared instead of allocated each time.
    pub unrouted: Arc<str>,
}

/// Settings a config reload may change without a restart. Connections read them when they start,
/// requests when they arrive.
pub struct Live {
    pub policy: Policy,
    pub body: BodyLimits,
    pub upstream_timeout: Duration,
    pub conn: ConnLimits,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted: Arc<[crate::net::Cidr]>,
}

impl Live {
    pub fn from_config(cfg: &Config) -> Live {
        Live {
            policy: Policy::new(cfg.routes.clone()),
            body: BodyLimits {
                max: cfg.max_request_body,
                buffer: cfg.request_body_buffer,
                stall: cfg.header_read_timeout,
                min_rate: cfg.min_request_body_rate,
            },
            upstream_timeout: cfg.upstream_timeout,
            conn: ConnLimits::from_config(cfg),
            trusted: Arc::from(cfg.trusted_proxies.clone()),
        }
    }
}

impl Gateway {
    pub fn new(
        cfg: &Config,
        auth: Authenticator,
        upstream: Arc<Upstream>,
        metrics: ProxyMetrics,
        registry: &prometheus::Registry,
    ) -> Gateway {
        Gateway {
            live: ArcSwap::from_pointee(Live::from_config(cfg)),
            auth,
            shield: Shield::new(
                shield::Live::from_config(cfg),
                shield::Sizes::from_config(cfg),
                upstream.clone(),
                registry,
            ),
            upstream,
            metrics,
            limiter: RateLimiter::new(cfg.rate_limits.clone()),
            unrouted: Arc::from("none"),
        }
    }

    /// Applies a reloaded configuration's live part: routes, limits, timeouts for new connections, the
    /// upstream slots' sizes and the rate limits (buckets kept).
    pub fn apply(&self, cfg: &Config) {
        self.live.store(Arc::new(Live::from_config(cfg)));
        self.upstream.resize(cfg.upstream_max_inflight, upstream::shares(cfg));
        self.limiter.set_limits(cfg.rate_limits.clone());
        self.shield.set_live(shield::Live::from_config(cfg));
    }
}

/// What a request knows about its connection.
#[derive(Clone)]
pub struct ConnCtx {
    pub peer: SocketAddr,
    /// `X-Forwarded-For` for this peer, made once per connection.
    pub forwarded_for: http::HeaderValue,
    pub proto: &'static str,
    pub activity: Option<Arc<Activity>>,
    /// The upstream slots this connection holds, against its share.
    pub share: ConnShare,
    /// Turns true at shutdown: open event streams are ended cleanly.
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
}
