//! The token room's metrics: the store's contents (read at scrape time), source loads, lookups, token
//! syncs and PAT checks.

use super::store::TokenStore;
use super::unleash::SyncStatus;
use crate::telemetry::{must, register, register_sampled};
use prometheus::{Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Clone)]
pub struct TokenMetrics {
    pub source_updates: IntCounterVec,
    pub lookups: IntCounterVec,
    pub sync: IntCounterVec,
    pub sync_duration: Histogram,
    pub sync_last_success: Gauge,
    pub pat_validations: IntCounterVec,
}

impl TokenMetrics {
    pub fn register(registry: &Registry) -> TokenMetrics {
        let counter = |name: &str, help: &str, label: &str| {
            register(registry, must(IntCounterVec::new(Opts::new(name, help), &[label])))
        };
        let m = TokenMetrics {
            source_updates: register(
                registry,
                must(IntCounterVec::new(
                    Opts::new(
                        "flaggate_token_source_updates_total",
                        "Token source loads, by source and result",
                    ),
                    &["source", "result"],
                )),
            ),
            lookups: counter(
                "flaggate_token_cache_lookups_total",
                "Token store lookups by result (hit, miss)",
                "result",
            ),
            sync: counter(
                "flaggate_token_sync_total",
                "Token list syncs from Unleash by result (ok, unchanged, error, rejected)",
                "result",
            ),
            sync_duration: register(
                registry,
                must(Histogram::with_opts(
                    HistogramOpts::new(
                        "flaggate_token_sync_duration_seconds",
                        "Duration of one token list sync",
                    )
                    .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                )),
            ),
            sync_last_success: register(
                registry,
                must(Gauge::new(
                    "flaggate_token_sync_last_success_timestamp_seconds",
                    "Unix time of the last successful token sync (0 = never)",
                )),
            ),
            pat_validations: counter(
                "flaggate_pat_validations_total",
                "PAT checks by result (valid, invalid, cached_invalid, rate_limited, error)",
                "result",
            ),
        };
        // Label sets known in advance are exported at 0 from the start, so dashboards and alerts see
        // every series before the first event (and `rate()` has a starting point).
        for r in ["ok", "unchanged", "error", "rejected"] {
            m.sync.with_label_values(&[r]);
        }
        for r in ["valid", "invalid", "cached_invalid", "rate_limited", "error"] {
            m.pat_validations.with_label_values(&[r]);
        }
        for r in ["hit", "miss"] {
            m.lookups.with_label_values(&[r]);
        }
        for r in ["ok", "error"] {
            m.source_updates.with_label_values(&["file", r]);
        }
        m
    }

    /// The store's contents and the sync's age, read at scrape time.
    pub fn watch(registry: &Registry, store: Arc<TokenStore>, sync: Option<Arc<SyncStatus>>) {
        register_sampled(
            registry,
            must(IntGaugeVec::new(
                Opts::new("flaggate_tokens", "Tokens in the store, by kind and source"),
                &["kind", "source"],
            )),
            move |g| {
                g.reset();
                for (kind, source, n) in store.counts() {
                    g.with_label_values(&[kind.as_str(), source.as_str()]).set(n as i64);
                }
            },
        );
        if let Some(status) = &sync {
            let status = status.clone();
            register_sampled(
                registry,
                must(IntGauge::new(
                    "flaggate_token_sync_synced_since_start",
                    "1 once a token sync has succeeded since this process started; 0 while it serves only the snapshot (or nothing)",
                )),
                move |g| g.set(i64::from(status.synced_since_start.load(Ordering::Acquire))),
            );
        }
        register_sampled(
            registry,
            must(Gauge::new(
                "flaggate_token_sync_age_seconds",
                "Seconds since the sync the served Unleash token set came from, also across a restart from the snapshot (-1 = never synced, no snapshot); how stale the served set may be",
            )),
            move |g| g.set(sync.as_ref().and_then(|s| s.age_seconds()).unwrap_or(-1.0)),
        );
    }
}
