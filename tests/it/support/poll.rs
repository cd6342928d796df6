//! Waiting for the gateway to reach a state (metrics: see `support::metrics`).

use super::client::get;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns true or `limit` passes; returns the time it took. The limits
/// here are taken as given: pass upper bounds through [`super::patience`].
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

/// Polls `path` with `token` until it answers `want`; the wait, or `None` after `limit`.
pub async fn status_within(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    want: u16,
    limit: Duration,
) -> Option<Duration> {
    within(limit, || async move { get(addr, path, token).await.status == want }).await
}

/// Polls the admin listener's `/ready` until it answers 200.
pub async fn ready_within(admin: SocketAddr, limit: Duration) -> Option<Duration> {
    status_within(admin, "/ready", None, 200, limit).await
}
