//! Every way a request to Unleash can fail, classified once: the proxy turns these into 502/503/504
//! (in `error.rs`, the one place), token sync and PAT checks into their own states.

use super::body::BoxError;
use super::slots::Saturated;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection: refused, unroutable, DNS failed.
    #[error("Unleash unreachable")]
    Connect(#[source] BoxError),
    #[error("connecting to Unleash timed out")]
    ConnectTimeout(#[source] BoxError),
    /// The TLS handshake with an `https://` upstream failed (certificate, name, protocol).
    #[error("TLS with Unleash failed")]
    Tls(#[source] BoxError),
    /// No response head within the upstream timeout.
    #[error("Unleash did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection broke or Unleash spoke something other than HTTP.
    #[error("the exchange with Unleash failed")]
    Protocol(#[source] BoxError),
    /// No upstream slot (see [`Saturated`]).
    #[error("upstream slots: the {} limit of {} is reached", .0.scope.as_str(), .0.max)]
    Saturated(Saturated),
}

impl UpstreamError {
    /// Sorts a client error by what went wrong, looking through its causes.
    pub fn classify(err: hyper_util::client::legacy::Error) -> UpstreamError {
        let is_tls = sources(&err).any(is_rustls);
        let timed_out = sources(&err).any(|s| {
            s.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        });
        let connect = err.is_connect();
        let boxed: BoxError = Box::new(err);
        if is_tls {
            UpstreamError::Tls(boxed)
        } else if timed_out && connect {
            UpstreamError::ConnectTimeout(boxed)
        } else if connect {
            UpstreamError::Connect(boxed)
        } else {
            UpstreamError::Protocol(boxed)
        }
    }

    /// `what: cause: root cause`, for log lines (client bodies never carry it).
    pub fn detail(&self) -> String {
        chain(self)
    }

    /// The same failure for another answer (one fill's failure is every waiter's): same kind, its
    /// causes kept as text.
    pub fn copy(&self) -> UpstreamError {
        let cause = || -> BoxError {
            let mut causes = sources(self).skip(1).map(|s| s.to_string()).collect::<Vec<_>>();
            causes.dedup();
            causes.join(": ").into()
        };
        match self {
            UpstreamError::Connect(_) => UpstreamError::Connect(cause()),
            UpstreamError::ConnectTimeout(_) => UpstreamError::ConnectTimeout(cause()),
            UpstreamError::Tls(_) => UpstreamError::Tls(cause()),
            UpstreamError::Timeout(d) => UpstreamError::Timeout(*d),
            UpstreamError::Protocol(_) => UpstreamError::Protocol(cause()),
            UpstreamError::Saturated(s) => UpstreamError::Saturated(*s),
        }
    }
}

/// Whether `e` is a rustls error, also when wrapped in `io::Error`s (whose `source()` skips the error
/// they wrap, so only `get_ref` finds it: tokio-rustls and hyper-rustls each wrap once).
fn is_rustls(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.downcast_ref::<rustls::Error>().is_some() {
        return true;
    }
    match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        Some(inner) => is_rustls(inner),
        None => false,
    }
}

/// An error and its sources, outermost first.
pub fn sources<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// `outer: cause: root cause`, each message once (wrappers often repeat their source's text).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for s in sources(e) {
        let text = s.to_string();
        if !parts.last().is_some_and(|p| p.ends_with(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}
