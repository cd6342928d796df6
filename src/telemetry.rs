//! What operators see, as a service to every room: the Prometheus registry and its exposition, the
//! helpers each room uses to register its own metrics (values read at scrape time included), and the
//! tracing subscriber. It imports no room: rooms register into it, it never reaches back.
//! Label values are always from bounded sets (rule names, decisions, a fixed method list); never a
//! token or a raw path.

use crate::config::LogFormat;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, IntCounter, IntGaugeVec, Opts, Registry, TextEncoder};
use std::sync::{Mutex, OnceLock};
use tracing_appender::non_blocking::ErrorCounter;

/// Latency buckets from 50 µs (the gateway's own work) to 10 s (a slow upstream).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Metric definitions are static; a failure here is a programming error caught by every test run.
pub fn must<T>(r: prometheus::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

/// Registers `metric` and hands it back for the owner to keep.
pub fn register<C: Collector + Clone + 'static>(registry: &Registry, metric: C) -> C {
    must(registry.register(Box::new(metric.clone())));
    metric
}

/// A metric whose value is read at scrape time (`refresh` sets it just before it is collected), for
/// values cheaper to read than to keep current: slots taken, tokens in the store, the sync's age.
pub fn register_sampled<C, F>(registry: &Registry, metric: C, refresh: F)
where
    C: Collector + 'static,
    F: Fn(&C) + Send + Sync + 'static,
{
    must(registry.register(Box::new(Sampled { metric, refresh })));
}

struct Sampled<C, F> {
    metric: C,
    refresh: F,
}

impl<C: Collector, F: Fn(&C) + Send + Sync> Collector for Sampled<C, F> {
    fn desc(&self) -> Vec<&Desc> {
        self.metric.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        (self.refresh)(&self.metric);
        self.metric.collect()
    }
}

/// The registry every room registers into, with what belongs to no room: build information, the
/// standard process metrics and the log writer's dropped lines.
pub fn registry() -> Registry {
    let registry = Registry::new();
    let build_info = register(
        &registry,
        must(IntGaugeVec::new(
            Opts::new("flaggate_build_info", "Build information; always 1"),
            &["version"],
        )),
    );
    build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    // The standard names (`process_resident_memory_bytes`, `process_cpu_seconds_total`, …) that every
    // stock dashboard and alert looks for, not a `flaggate_` copy of them.
    #[cfg(target_os = "linux")]
    must(registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())));
    let dropped = must(IntCounter::new(
        "flaggate_log_lines_dropped_total",
        "Log lines (access log included) dropped because the log writer fell 64k lines behind stderr",
    ));
    let seen = Mutex::new(0);
    register_sampled(&registry, dropped, move |c| count_log_drops(c, &seen, LOG_DROPS.get()));
    registry
}

/// Prometheus text exposition of everything registered.
pub fn render(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 1024);
    let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
    out
}

/// Brings `flaggate_log_lines_dropped_total` up to the log writer's own count, which only it can keep:
/// a dropped line never reaches us. `seen`: how many the counter already counts (scrapes may overlap).
fn count_log_drops(counter: &IntCounter, seen: &Mutex<u64>, writer: Option<&ErrorCounter>) {
    let Some(writer) = writer else { return };
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let now = writer.dropped_lines() as u64;
    if now > *seen {
        counter.inc_by(now - *seen);
        *seen = now;
    }
}

/// The log writer's count of dropped lines, for `/metrics`.
static LOG_DROPS: OnceLock<ErrorCounter> = OnceLock::new();

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
        // Colour only on a terminal: escape codes in files and journald are noise.
        LogFormat::Pretty => fmt::layer()
            .compact()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(writer)
            .boxed(),
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

    #[test]
    fn log_lines_dropped_behind_a_stuck_sink_are_counted_once_per_line() {
        let (release, rx) = std::sync::mpsc::channel();
        let (mut writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(2)
            .finish(Stuck(rx));
        let counter = IntCounter::new("dropped", "test").unwrap();
        let seen = Mutex::new(0);
        for _ in 0..20 {
            writer.write_all(b"{\"line\":1}\n").unwrap();
        }
        let errors = writer.error_counter();
        let dropped = errors.dropped_lines();
        assert!(
            dropped >= 16,
            "only {dropped} of 20 lines dropped behind a 2-line queue"
        );
        count_log_drops(&counter, &seen, Some(&errors));
        count_log_drops(&counter, &seen, Some(&errors));
        assert_eq!(counter.get(), dropped as u64, "a second scrape counts nothing twice");
        drop(release);
        drop(guard);
    }

    #[test]
    fn a_sampled_metric_is_refreshed_at_each_scrape() {
        let registry = registry();
        let n = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(3));
        let seen = n.clone();
        register_sampled(
            &registry,
            prometheus::IntGauge::new("sampled_value", "test").unwrap(),
            move |g| g.set(seen.load(std::sync::atomic::Ordering::Relaxed)),
        );
        let scrape = String::from_utf8(render(&registry)).unwrap();
        assert!(scrape.contains("\nsampled_value 3\n"), "{scrape}");
        n.store(7, std::sync::atomic::Ordering::Relaxed);
        let scrape = String::from_utf8(render(&registry)).unwrap();
        assert!(scrape.contains("\nsampled_value 7\n"), "{scrape}");
        assert!(scrape.contains("flaggate_log_lines_dropped_total 0"), "{scrape}");
        assert!(scrape.contains("flaggate_build_info{version="), "{scrape}");
    }
}
