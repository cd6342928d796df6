//! Waiting for the gateway to reach a state, and reading a Prometheus scrape.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns true or `limit` passes; returns the time it took.
pub async fn within<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() <= limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// The value of one series (`name{labels}` exactly as exported; labels are in alphabetical order) in a
/// Prometheus text scrape, `None` if absent.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}
