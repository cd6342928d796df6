//! The process's log lines, captured as JSON. A process has one global tracing subscriber, so every test
//! that reads log lines shares this one capture: call [`capture`] before starting the gateway, then find
//! your lines by something only your test writes (a request id, a temp-dir path).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn cap() -> &'static Capture {
    static CAP: OnceLock<Capture> = OnceLock::new();
    CAP.get_or_init(|| {
        let cap = Capture::default();
        let writer = cap.clone();
        // `info` whatever RUST_LOG says: the tests read info lines (the access log).
        flaggate::telemetry::init_logging_to(flaggate::config::LogFormat::Json, Some("info"), move || writer.clone());
        cap
    })
}

/// Installs the capture (once per process). Lines logged before the first call are not captured.
pub fn capture() {
    cap();
}

/// Everything captured so far, as written.
pub fn text() -> String {
    String::from_utf8_lossy(&cap().0.lock().unwrap()).into_owned()
}

/// Every captured line that is JSON.
pub fn lines() -> Vec<serde_json::Value> {
    text().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// How many captured lines match `pred` now.
pub fn count(pred: impl Fn(&serde_json::Value) -> bool) -> usize {
    lines().iter().filter(|l| pred(l)).count()
}

/// The first captured line matching `pred`, polling until `limit` passes (pass it through
/// [`super::patience`]); `None` if none came.
pub async fn find(limit: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
    let mut found = None;
    super::poll::within(limit, || {
        found = lines().into_iter().find(|l| pred(l));
        let got = found.is_some();
        async move { got }
    })
    .await;
    found
}

/// Waits until more than `before` captured lines match `pred` (a count taken with [`count`] before the
/// event); panics naming `what` after `limit`. Returns the newest matching line.
pub async fn wait_for_more(
    what: &str,
    before: usize,
    limit: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut newest = None;
    let seen = super::poll::within(limit, || {
        let matching: Vec<_> = lines().into_iter().filter(|l| pred(l)).collect();
        let more = matching.len() > before;
        newest = matching.into_iter().last();
        async move { more }
    })
    .await;
    match (seen, newest) {
        (Some(_), Some(line)) => line,
        _ => panic!(
            "no new log line {what} within {limit:?}; the last captured lines:\n{}",
            tail(40)
        ),
    }
}

/// The last `n` captured lines, for failure messages (the capture holds every test's lines).
pub fn tail(n: usize) -> String {
    let text = text();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
