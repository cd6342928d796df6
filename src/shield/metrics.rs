//! The shield's metrics: how requests were answered, why some bypassed, what fills cost Unleash, what
//! was not stored, and how much the cache holds (read at scrape time).

use super::classify::Bypass;
use super::doc::NotStored;
use crate::telemetry::{must, register, register_sampled, LATENCY_BUCKETS};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// How a request the shield considered was answered.
pub const RESULTS: [&str; 10] = [
    "hit",
    "hit_304",
    "miss",
    "coalesced",
    "revalidated",
    "refreshed",
    "stale",
    "passed",
    "error",
    "bypass",
];

#[derive(Clone)]
pub struct ShieldMetrics {
    pub requests: IntCounterVec,
    /// `requests`' children in [`RESULTS`]' order, resolved once: counting a hit takes no label lookup.
    by_result: Vec<IntCounter>,
    pub bypass: IntCounterVec,
    pub upstream: IntCounterVec,
    pub not_stored: IntCounterVec,
    pub evictions: IntCounterVec,
    pub served_age: Histogram,
}

impl ShieldMetrics {
    pub fn register(registry: &Registry) -> ShieldMetrics {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            register(registry, must(IntCounterVec::new(Opts::new(name, help), labels)))
        };
        let requests = vec(
            "flaggate_shield_requests_total",
            "Feature polls the shield considered, by how they were answered: hit (fresh), hit_304, miss (filled from Unleash), coalesced (joined another request's fill), revalidated (304 from Unleash), refreshed (a new document), stale (Unleash failing), passed (Unleash's non-storable answer passed on), error (Unleash failed and nothing could be served), bypass (forwarded as without the shield)",
            &["result"],
        );
        let m = ShieldMetrics {
            by_result: RESULTS.iter().map(|r| requests.with_label_values(&[r])).collect(),
            requests,
            bypass: vec(
                "flaggate_shield_bypass_total",
                "Feature polls forwarded past the shield, by reason",
                &["reason"],
            ),
            upstream: vec(
                "flaggate_shield_upstream_total",
                "Requests the shield sent to Unleash, by kind (fill: no document yet; revalidate: If-None-Match) and status (200, 304, 4xx, 5xx, transport)",
                &["kind", "status"],
            ),
            not_stored: vec(
                "flaggate_shield_not_stored_total",
                "Upstream answers passed on but not stored, by reason",
                &["reason"],
            ),
            evictions: vec(
                "flaggate_shield_evictions_total",
                "Documents dropped from the cache, by cause (size: over shield_max_bytes; expired: idle for shield_idle_ttl; replaced; explicit: Unleash refused the token)",
                &["cause"],
            ),
            served_age: register(
                registry,
                must(Histogram::with_opts(
                    HistogramOpts::new(
                        "flaggate_shield_served_age_seconds",
                        "Age of the documents served from the shield: time since Unleash last confirmed them",
                    )
                    .buckets(
                        LATENCY_BUCKETS
                            .iter()
                            .copied()
                            .chain([30.0, 60.0, 300.0, 900.0, 3600.0])
                            .collect(),
                    ),
                )),
            ),
        };
        for b in Bypass::ALL {
            m.bypass.with_label_values(&[b.as_str()]);
        }
        for n in NotStored::ALL {
            m.not_stored.with_label_values(&[n.as_str()]);
        }
        for kind in ["fill", "revalidate"] {
            for status in ["200", "304", "4xx", "5xx", "transport"] {
                m.upstream.with_label_values(&[kind, status]);
            }
        }
        m
    }

    /// Counts one request the shield answered as `result` (one of [`RESULTS`]).
    pub fn count(&self, result: &str) {
        match RESULTS.iter().position(|r| *r == result) {
            Some(i) => self.by_result[i].inc(),
            None => self.requests.with_label_values(&[result]).inc(),
        }
    }

    /// Gauges read from the cache at scrape time.
    pub fn watch(registry: &Registry, cache: super::Cache, bodies: std::sync::Arc<super::doc::Bodies>) {
        let gauge = |name: &str, help: &str| must(IntGauge::new(name, help));
        let c = cache.clone();
        register_sampled(
            registry,
            gauge(
                "flaggate_shield_entries",
                "Keys (token × spec × query) in the shield's cache",
            ),
            move |g| {
                c.run_pending_tasks();
                g.set(c.entry_count() as i64)
            },
        );
        let c = cache.clone();
        register_sampled(
            registry,
            gauge(
                "flaggate_shield_weighted_bytes",
                "Bytes the shield's cache holds by its own count (bodies, gzip copies, headers, keys), against shield_max_bytes",
            ),
            move |g| {
                c.run_pending_tasks();
                g.set(c.weighted_size() as i64)
            },
        );
        register_sampled(
            registry,
            gauge(
                "flaggate_shield_unique_docs",
                "Distinct document bodies held (tokens of one scope share one)",
            ),
            move |g| g.set(bodies.live() as i64),
        );
        register_sampled(
            registry,
            must(prometheus::Gauge::new(
                "flaggate_shield_oldest_entry_age_seconds",
                "Age of the least recently confirmed document in the cache (what a stale answer could be at most)",
            )),
            move |g| {
                let now = super::unix_ms();
                let oldest = cache
                    .iter()
                    .filter(|(_, e)| e.doc.load().is_some())
                    .map(|(_, e)| now.saturating_sub(e.validated_ms()))
                    .max()
                    .unwrap_or(0);
                g.set(oldest as f64 / 1000.0);
            },
        );
    }
}
