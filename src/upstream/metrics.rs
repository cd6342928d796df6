//! The upstream room's metrics: connections to Unleash, the slots (read at scrape time), their shares
//! and the requests refused a slot.

use super::slots::{Scope, Slots};
use crate::telemetry::{must, register, register_sampled};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::sync::Arc;

pub struct UpstreamMetrics {
    /// Open connections to Unleash, counted by the connector.
    pub connections: IntGauge,
    refusals: IntCounterVec,
}

impl UpstreamMetrics {
    pub fn register(registry: &Registry, slots: Arc<Slots>) -> UpstreamMetrics {
        let connections = register(
            registry,
            must(IntGauge::new(
                "flaggate_upstream_connections",
                "Open connections to Unleash (pooled keep-alive connections included)",
            )),
        );
        let refusals = register(
            registry,
            must(IntCounterVec::new(
                Opts::new(
                    "flaggate_upstream_slot_refusals_total",
                    "Requests refused an upstream slot (503 upstream_saturated), by the limit that refused them: pool, connection, token, anonymous",
                ),
                &["limit"],
            )),
        );
        for s in Scope::ALL {
            refusals.with_label_values(&[s.as_str()]);
        }
        type Pick = fn(&super::slots::Usage) -> usize;
        let usage: [(&str, &str, Pick); 3] = [
            (
                "flaggate_upstream_inflight",
                "Requests holding one of the upstream slots now (forwarded, response not yet finished)",
                |u| u.taken,
            ),
            (
                "flaggate_upstream_queued",
                "Requests waiting for an upstream slot now (they get 503 if none frees up in time)",
                |u| u.queued,
            ),
            (
                "flaggate_upstream_max_inflight",
                "The upstream slots (upstream_max_inflight); beyond them requests queue, then get 503",
                |u| u.max,
            ),
        ];
        for (name, help, pick) in usage {
            let s = slots.clone();
            register_sampled(registry, must(IntGauge::new(name, help)), move |g| {
                g.set(pick(&s.usage()) as i64)
            });
        }
        register_sampled(
            registry,
            must(IntGaugeVec::new(
                Opts::new(
                    "flaggate_upstream_max_inflight_share",
                    "Upstream slots one connection or one token (and all token-less requests together) may hold at once",
                ),
                &["limit"],
            )),
            move |g| {
                let shares = slots.shares();
                g.with_label_values(&["connection"]).set(i64::from(shares.per_connection));
                g.with_label_values(&["token"]).set(i64::from(shares.per_token));
            },
        );
        UpstreamMetrics { connections, refusals }
    }

    pub fn refused(&self, scope: Scope) {
        self.refusals.with_label_values(&[scope.as_str()]).inc();
    }
}
