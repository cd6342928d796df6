//! The proxy room's metrics: requests by route class, method, status and decision; time inside the
//! gateway and at Unleash; SDK app names; client connections and why the gateway closed them.

use crate::telemetry::{must, register, LATENCY_BUCKETS};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::collections::HashSet;

pub struct ProxyMetrics {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub inflight: IntGauge,
    pub sdk_requests: IntCounterVec,
    /// Open client connections, by listener.
    pub connections: IntGaugeVec,
    pub connections_closed: IntCounterVec,
    known_apps: arc_swap::ArcSwap<HashSet<Box<str>>>,
}

/// Bounded app-name label values: the first [`APP_LABEL_CAP`] names seen, then `other`.
pub const APP_LABEL_CAP: usize = 100;

/// Why the gateway closed a client connection.
pub const CLOSE_REASONS: [&str; 4] = ["header_timeout", "idle_timeout", "write_timeout", "cancel_budget"];

impl ProxyMetrics {
    pub fn register(registry: &Registry) -> ProxyMetrics {
        let histogram = |name: &str, help: &str| {
            register(
                registry,
                must(HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    &["route_class"],
                )),
            )
        };
        let m = ProxyMetrics {
            requests: register(
                registry,
                must(IntCounterVec::new(
                    Opts::new(
                        "flaggate_requests_total",
                        "Requests handled, by route class, method, status and decision",
                    ),
                    &["route_class", "method", "status", "decision"],
                )),
            ),
            request_duration: histogram(
                "flaggate_request_duration_seconds",
                "Time spent inside the gateway per request, excluding the wait for upstream",
            ),
            upstream_duration: histogram(
                "flaggate_upstream_duration_seconds",
                "Time from forwarding to upstream response headers, including any wait for an upstream slot",
            ),
            inflight: register(
                registry,
                must(IntGauge::new("flaggate_inflight_requests", "Requests currently being handled")),
            ),
            sdk_requests: register(
                registry,
                must(IntCounterVec::new(
                    Opts::new(
                        "flaggate_sdk_requests_total",
                        "Requests with a known token by SDK app name (unleash-appname); the first 100 names, then `other`",
                    ),
                    &["app"],
                )),
            ),
            connections: register(
                registry,
                must(IntGaugeVec::new(
                    Opts::new("flaggate_connections", "Open client connections, by listener"),
                    &["listener"],
                )),
            ),
            connections_closed: register(
                registry,
                must(IntCounterVec::new(
                    Opts::new(
                        "flaggate_connections_closed_total",
                        "Client connections the gateway closed, by reason (header_timeout, idle_timeout, write_timeout, cancel_budget)",
                    ),
                    &["reason"],
                )),
            ),
            known_apps: Default::default(),
        };
        // Label sets known in advance are exported at 0 from the start, so dashboards and alerts see
        // every series before the first event (and `rate()` has a starting point).
        m.connections.with_label_values(&["proxy"]);
        for r in CLOSE_REASONS {
            m.connections_closed.with_label_values(&[r]);
        }
        m
    }

    /// The `app` label for an SDK app name: itself while fewer than the cap are known, else `other`.
    /// Reads never lock; only the first sighting of each of the first 100 names writes.
    pub fn app_label<'a>(&self, app: &'a str) -> &'a str {
        let known = self.known_apps.load();
        if known.contains(app) {
            return app;
        }
        if known.len() >= APP_LABEL_CAP || app.is_empty() || !app.bytes().all(|b| b.is_ascii_graphic()) {
            return "other";
        }
        drop(known);
        self.known_apps.rcu(|k| {
            let mut k = (**k).clone();
            if k.len() < APP_LABEL_CAP {
                k.insert(app.into());
            }
            k
        });
        if self.known_apps.load().contains(app) {
            app
        } else {
            "other"
        }
    }
}

/// Bounded method label: the methods SDKs and tools use, everything else is `other`.
pub fn method_label(m: &http::Method) -> &'static str {
    crate::policy::forwarded_method(m).unwrap_or("other")
}
