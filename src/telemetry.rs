//! What operators see: the Prometheus registry with every metric handle, and the tracing subscriber.
//! Label values are always from bounded sets (rule names, decisions, a fixed method list); never a token
//! or a raw path.

use crate::config::LogFormat;
use crate::token::store::TokenStore;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::{Mutex, OnceLock};
use tracing_appender::non_blocking::ErrorCounter;

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub inflight: IntGauge,
    pub tokens: IntGaugeVec,
    pub token_source_updates: IntCounterVec,
    pub token_cache_lookups: IntCounterVec,
    pub token_sync: IntCounterVec,
    pub token_sync_duration: Histogram,
    pub token_sync_last_success: Gauge,
    pub token_sync_age: Gauge,
    pub pat_validations: IntCounterVec,
    pub sdk_requests: IntCounterVec,
    pub connections: IntGaugeVec,
    pub connections_closed: IntCounterVec,
    pub upstream_connections: IntGauge,
    upstream_inflight: IntGauge,
    upstream_queued: IntGauge,
    upstream_max_inflight: IntGauge,
    /// Requests refused an upstream slot, by the limit that refused them.
    pub upstream_slot_refusals: IntCounterVec,
    /// Each owner's share of the upstream slots (`connection`, `token`).
    pub upstream_share: IntGaugeVec,
    /// The gateway's upstream slots, read at scrape time.
    upstream_slots: OnceLock<std::sync::Arc<crate::proxy::slots::Slots>>,
    pub ready: IntGauge,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_success: IntGauge,
    log_lines_dropped: IntCounter,
    /// How many dropped lines `log_lines_dropped` already counts (scrapes may run concurrently).
    log_drops_seen: Mutex<u64>,
    known_apps: arc_swap::ArcSwap<std::collections::HashSet<Box<str>>>,
}

/// Latency buckets from 50 µs (the gateway's own work) to 10 s (a slow upstream).
const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are static; a failure here is a programming error caught by every test run.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = must(IntCounterVec::new(
            Opts::new(
                "flaggate_requests_total",
                "Requests handled, by route class, method, status and decision",
            ),
            &["route_class", "method", "status", "decision"],
        ));
        let request_duration = must(HistogramVec::new(
            HistogramOpts::new(
                "flaggate_request_duration_seconds",
                "Time spent inside the gateway per request, excluding the wait for upstream",
            )
            .buckets(BUCKETS.to_vec()),
            &["route_class"],
        ));
        let upstream_duration = must(HistogramVec::new(
            HistogramOpts::new(
                "flaggate_upstream_duration_seconds",
                "Time from forwarding to upstream response headers, including any wait for an upstream slot",
            )
            .buckets(BUCKETS.to_vec()),
            &["route_class"],
        ));
        let inflight = must(IntGauge::new(
            "flaggate_inflight_requests",
            "Requests currently being handled",
        ));
        let tokens = must(IntGaugeVec::new(
            Opts::new("flaggate_tokens", "Tokens in the store, by kind and source"),
            &["kind", "source"],
        ));
        let token_source_updates = must(IntCounterVec::new(
            Opts::new(
                "flaggate_token_source_updates_total",
                "Token source loads, by source and result",
            ),
            &["source", "result"],
        ));
        let token_cache_lookups = must(IntCounterVec::new(
            Opts::new(
                "flaggate_token_cache_lookups_total",
                "Token store lookups by result (hit, miss)",
            ),
            &["result"],
        ));
        let token_sync = must(IntCounterVec::new(
            Opts::new(
                "flaggate_token_sync_total",
                "Token list syncs from Unleash by result (ok, unchanged, error, rejected)",
            ),
            &["result"],
        ));
        let token_sync_duration = must(Histogram::with_opts(
            HistogramOpts::new(
                "flaggate_token_sync_duration_seconds",
                "Duration of one token list sync",
            )
            .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        ));
        let token_sync_last_success = must(Gauge::new(
            "flaggate_token_sync_last_success_timestamp_seconds",
            "Unix time of the last successful token sync (0 = never)",
        ));
        let token_sync_age = must(Gauge::new(
            "flaggate_token_sync_age_seconds",
            "Seconds since the last successful token sync (-1 = never); how stale the served set may be",
        ));
        let pat_validations = must(IntCounterVec::new(
            Opts::new(
                "flaggate_pat_validations_total",
                "PAT checks by result (valid, invalid, cached_invalid, rate_limited, error)",
            ),
            &["result"],
        ));
        let sdk_requests = must(IntCounterVec::new(
            Opts::new(
                "flaggate_sdk_requests_total",
                "Requests by SDK app name (unleash-appname); the first 100 names, then `other`",
            ),
            &["app"],
        ));
        let connections = must(IntGaugeVec::new(
            Opts::new("flaggate_connections", "Open client connections, by listener"),
            &["listener"],
        ));
        let connections_closed = must(IntCounterVec::new(
            Opts::new(
                "flaggate_connections_closed_total",
                "Client connections the gateway closed, by reason (header_timeout, idle_timeout, write_timeout, cancel_budget)",
            ),
            &["reason"],
        ));
        let upstream_connections = must(IntGauge::new(
            "flaggate_upstream_connections",
            "Open connections to Unleash (pooled keep-alive connections included)",
        ));
        let upstream_inflight = must(IntGauge::new(
            "flaggate_upstream_inflight",
            "Requests holding one of the upstream slots now (forwarded, response not yet finished)",
        ));
        let upstream_queued = must(IntGauge::new(
            "flaggate_upstream_queued",
            "Requests waiting for an upstream slot now (they get 503 if none frees up in time)",
        ));
        let upstream_max_inflight = must(IntGauge::new(
            "flaggate_upstream_max_inflight",
            "The upstream slots (upstream_max_inflight); beyond them requests queue, then get 503",
        ));
        let upstream_slot_refusals = must(IntCounterVec::new(
            Opts::new(
                "flaggate_upstream_slot_refusals_total",
                "Requests refused an upstream slot (503 upstream_saturated), by the limit that refused them: pool, connection, token, anonymous",
            ),
            &["limit"],
        ));
        let upstream_share = must(IntGaugeVec::new(
            Opts::new(
                "flaggate_upstream_max_inflight_share",
                "Upstream slots one connection or one token (and all token-less requests together) may hold at once",
            ),
            &["limit"],
        ));
        let ready = must(IntGauge::new(
            "flaggate_ready",
            "1 when /ready answers 200 (a token set is loaded and not draining), else 0",
        ));
        let config_reloads = must(IntCounterVec::new(
            Opts::new(
                "flaggate_config_reloads_total",
                "Configuration reloads (SIGHUP or file change) by result",
            ),
            &["result"],
        ));
        let config_last_reload_success = must(IntGauge::new(
            "flaggate_config_last_reload_success",
            "1 if the last configuration reload applied (or none was tried), 0 if it was rejected",
        ));
        config_last_reload_success.set(1);
        let log_lines_dropped = must(IntCounter::new(
            "flaggate_log_lines_dropped_total",
            "Log lines (access log included) dropped because the log writer fell 64k lines behind stderr",
        ));
        let build_info = must(IntGaugeVec::new(
            Opts::new("flaggate_build_info", "Build information; always 1"),
            &["version"],
        ));
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(inflight.clone()),
            Box::new(tokens.clone()),
            Box::new(token_source_updates.clone()),
            Box::new(token_cache_lookups.clone()),
            Box::new(token_sync.clone()),
            Box::new(token_sync_duration.clone()),
            Box::new(token_sync_last_success.clone()),
            Box::new(token_sync_age.clone()),
            Box::new(pat_validations.clone()),
            Box::new(sdk_requests.clone()),
            Box::new(connections.clone()),
            Box::new(connections_closed.clone()),
            Box::new(upstream_connections.clone()),
            Box::new(upstream_inflight.clone()),
            Box::new(upstream_queued.clone()),
            Box::new(upstream_max_inflight.clone()),
            Box::new(upstream_slot_refusals.clone()),
            Box::new(upstream_share.clone()),
            Box::new(ready.clone()),
            Box::new(config_reloads.clone()),
            Box::new(config_last_reload_success.clone()),
            Box::new(log_lines_dropped.clone()),
            Box::new(build_info),
        ] {
            must(registry.register(c));
        }
        // The standard names (`process_resident_memory_bytes`, `process_cpu_seconds_total`, …) that every
        // stock dashboard and alert looks for, not a `flaggate_` copy of them.
        #[cfg(target_os = "linux")]
        must(registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())));
        let m = Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            inflight,
            tokens,
            token_source_updates,
            token_cache_lookups,
            token_sync,
            token_sync_duration,
            token_sync_last_success,
            token_sync_age,
            pat_validations,
            sdk_requests,
            connections,
            connections_closed,
            upstream_connections,
            upstream_inflight,
            upstream_queued,
            upstream_max_inflight,
            upstream_slot_refusals,
            upstream_share,
            upstream_slots: OnceLock::new(),
            ready,
            config_reloads,
            config_last_reload_success,
            log_lines_dropped,
            log_drops_seen: Mutex::new(0),
            known_apps: Default::default(),
        };
        // Label sets known in advance are exported at 0 from the start, so dashboards and alerts see
        // every series before the first event (and `rate()` has a starting point).
        for r in ["ok", "unchanged", "error", "rejected"] {
            m.token_sync.with_label_values(&[r]);
        }
        for r in ["valid", "invalid", "cached_invalid", "rate_limited", "error"] {
            m.pat_validations.with_label_values(&[r]);
        }
        for r in ["hit", "miss"] {
            m.token_cache_lookups.with_label_values(&[r]);
        }
        for r in ["ok", "error"] {
            m.token_source_updates.with_label_values(&["file", r]);
        }
        m.connections.with_label_values(&["proxy"]);
        for r in ["header_timeout", "idle_timeout", "write_timeout", "cancel_budget"] {
            m.connections_closed.with_label_values(&[r]);
        }
        for l in crate::proxy::slots::Scope::ALL {
            m.upstream_slot_refusals.with_label_values(&[l.as_str()]);
        }
        for r in ["ok", "error"] {
            m.config_reloads.with_label_values(&[r]);
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
        if known.len() >= crate::proxy::APP_LABEL_CAP || app.is_empty() || !app.bytes().all(|b| b.is_ascii_graphic()) {
            return "other";
        }
        drop(known);
        self.known_apps.rcu(|k| {
            let mut k = (**k).clone();
            if k.len() < crate::proxy::APP_LABEL_CAP {
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

    /// Prometheus text exposition, with gauges that are cheaper to read than to maintain refreshed first.
    pub fn render(&self, store: &TokenStore, sync_age: Option<f64>, ready: bool) -> Vec<u8> {
        self.token_sync_age.set(sync_age.unwrap_or(-1.0));
        self.ready.set(i64::from(ready));
        self.count_log_drops(LOG_DROPS.get());
        if let Some(slots) = self.upstream_slots.get() {
            let usage = slots.usage();
            self.upstream_inflight.set(usage.taken as i64);
            self.upstream_queued.set(usage.queued as i64);
            self.upstream_max_inflight.set(usage.max as i64);
        }
        self.tokens.reset();
        for (kind, source, n) in store.counts() {
            self.tokens
                .with_label_values(&[kind.as_str(), source.as_str()])
                .set(n as i64);
        }
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// Shows the per-owner shares in force.
    pub fn show_shares(&self, shares: crate::proxy::slots::Shares) {
        self.upstream_share
            .with_label_values(&["connection"])
            .set(i64::from(shares.per_connection));
        self.upstream_share
            .with_label_values(&["token"])
            .set(i64::from(shares.per_token));
    }

    /// Reports these slots in `/metrics` from now on.
    pub fn watch_upstream_slots(&self, slots: std::sync::Arc<crate::proxy::slots::Slots>) {
        let _ = self.upstream_slots.set(slots);
    }

    /// Brings `flaggate_log_lines_dropped_total` up to the log writer's own count, which only it can
    /// keep: a dropped line never reaches us.
    fn count_log_drops(&self, writer: Option<&ErrorCounter>) {
        let Some(writer) = writer else { return };
        let mut seen = self.log_drops_seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = writer.dropped_lines() as u64;
        if now > *seen {
            self.log_lines_dropped.inc_by(now - *seen);
            *seen = now;
        }
    }
}

/// The log writer's count of dropped lines, for `/metrics`.
static LOG_DROPS: OnceLock<ErrorCounter> = OnceLock::new();

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Bounded method label: the methods SDKs and tools use, everything else is `other`.
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

type FilterHandle = tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

static FILTER: std::sync::OnceLock<FilterHandle> = std::sync::OnceLock::new();

fn filter_for(level: Option<&str>) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    match level {
        Some(l) => EnvFilter::try_new(l).unwrap_or_else(|_| EnvFilter::new("info")),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    }
}

/// Checks a `RUST_LOG`-style filter, for config validation.
pub fn valid_log_level(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("`{s}` is not a log filter like info, debug, flaggate=debug ({e})"))
}

/// Applies a new log filter to the running subscriber (config reload); `None` means `RUST_LOG`/`info`.
pub fn set_log_level(level: Option<&str>) {
    if let Some(h) = FILTER.get() {
        let _ = h.reload(filter_for(level));
    }
}

/// Installs the global subscriber: filter from `level` or `RUST_LOG` (default `info`), json or pretty.
/// Lines are handed to a writer thread, so a slow stderr (a full pipe, a slow log shipper) never stalls
/// a request; if it falls 64k lines behind, lines are dropped rather than requests delayed. Keep the
/// returned guard alive: dropping it flushes what is queued. Dropped lines are counted in
/// `flaggate_log_lines_dropped_total`.
pub fn init_logging(format: LogFormat, level: Option<&str>) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .thread_name("flaggate-log")
        .finish(std::io::stderr());
    let _ = LOG_DROPS.set(writer.error_counter());
    init_logging_to(format, level, writer);
    guard
}

/// Same, writing somewhere else (tests capture the access log this way).
pub fn init_logging_to<W>(format: LogFormat, level: Option<&str>, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{fmt, reload, Layer, Registry};
    let (filter, handle) = reload::Layer::new(filter_for(level));
    let output = match format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
        LogFormat::Pretty => fmt::layer().compact().with_writer(writer).boxed(),
    };
    if Registry::default().with(filter).with(output).try_init().is_ok() {
        let _ = FILTER.set(handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A log sink that takes nothing until the test lets go: a full pipe, a stuck log shipper.
    struct Stuck(std::sync::mpsc::Receiver<()>);

    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn dropped_total(m: &Metrics) -> f64 {
        let mut out = Vec::new();
        TextEncoder::new().encode(&m.registry.gather(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("flaggate_log_lines_dropped_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no flaggate_log_lines_dropped_total in\n{text}"))
    }

    #[test]
    fn log_lines_dropped_behind_a_stuck_sink_are_counted_once_per_line() {
        let (release, rx) = std::sync::mpsc::channel();
        let (mut writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(2)
            .finish(Stuck(rx));
        let m = Metrics::new();
        assert_eq!(dropped_total(&m), 0.0, "exported from the start");
        for _ in 0..20 {
            writer.write_all(b"{\"line\":1}\n").unwrap();
        }
        let counter = writer.error_counter();
        let dropped = counter.dropped_lines();
        assert!(
            dropped >= 16,
            "only {dropped} of 20 lines dropped behind a 2-line queue"
        );
        m.count_log_drops(Some(&counter));
        m.count_log_drops(Some(&counter));
        assert_eq!(
            dropped_total(&m),
            dropped as f64,
            "a second scrape counts nothing twice"
        );
        drop(release);
        drop(guard);
    }
}
