//! Test builders: a recording mock upstream, an in-process gateway on port 0, and clients (HTTP and raw
//! TCP). Every test talks to real sockets.
#![allow(dead_code, unused_imports)]

pub mod binary;
pub mod client;
pub mod egress;
pub mod features;
pub mod gateway;
pub mod logs;
pub mod metrics;
pub mod poll;
pub mod tls;
pub mod unleash;
pub mod upstream;

pub use client::{get, raw, send, Reply};
pub use gateway::{gateway, TestGateway, TokenSpec};
pub use upstream::{upstream, MockUpstream, Recorded};

/// Taken by tests that hold hundreds of sockets, so that two of them never run at once: all tests share
/// one process, and together they would pass the common limit of 1,024 open files.
pub async fn fd_heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// An upper time bound, stretched by the patience factor: `FLAGGATE_TEST_PATIENCE` (a float, default 1),
/// for slow or busy machines (`FLAGGATE_TEST_PATIENCE=3 cargo test`). Every upper bound in the tests —
/// timeouts, polling limits, `took < X` — goes through it; lower bounds (`took >= X`, "not before") and
/// the timings a test sets up (configured timeouts, pauses that pace a client) do not.
pub fn patience(d: std::time::Duration) -> std::time::Duration {
    static FACTOR: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let f = *FACTOR.get_or_init(|| match std::env::var("FLAGGATE_TEST_PATIENCE") {
        Err(_) => 1.0,
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => f,
            _ => panic!("FLAGGATE_TEST_PATIENCE must be a positive number such as 1 or 2.5, not {v:?}"),
        },
    });
    d.mul_f64(f)
}
