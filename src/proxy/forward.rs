//! The upstream side: one pooled client, the forwarded URI, and what upstream failures mean.

use super::body::{BodyFault, UpstreamBody};
use super::connector::CountingConnector;
use crate::config::{Config, Upstream};
use crate::error::Rejection;
use crate::path::CanonicalPath;
use crate::tls::TlsError;
use http::uri::PathAndQuery;
use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;

pub type UpstreamClient = Client<HttpsConnector<CountingConnector>, UpstreamBody>;

/// Keep-alive pool sized for SDK fan-in: many short requests to one host. `https://` upstreams are
/// verified against the platform roots plus `--upstream-ca`; there is no "skip verification".
pub fn build_client(cfg: &Config, open_gauge: prometheus::IntGauge) -> Result<UpstreamClient, TlsError> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(cfg.upstream_connect_timeout));
    connector.enforce_http(false);
    let identity = match (&cfg.upstream_client_cert, &cfg.upstream_client_key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    let tls = crate::tls::upstream_client_config(cfg.upstream_ca.as_deref(), identity)?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(CountingConnector::new(connector, open_gauge));
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(512)
        .build(https))
}

/// `upstream + canonical path + untouched query`: the authorized path, byte for byte.
pub fn upstream_uri(up: &Upstream, path: &CanonicalPath<'_>, query: Option<&str>) -> Result<Uri, Rejection> {
    let mut pq = String::with_capacity(up.base_path.len() + path.as_str().len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(&up.base_path);
    pq.push_str(path.as_str());
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    // As `Bytes`, the buffer is taken over; a `String` would be copied.
    let pq = PathAndQuery::from_maybe_shared(bytes::Bytes::from(pq))
        .map_err(|e| Rejection::Internal(format!("forward URI: {e}")))?;
    Uri::builder()
        .scheme(up.scheme.clone())
        .authority(up.authority.clone())
        .path_and_query(pq)
        .build()
        .map_err(|e| Rejection::Internal(format!("forward URI: {e}")))
}

/// Sorts a client error: connect timed out (504), could not connect (502), connection broke (502).
pub fn classify(err: hyper_util::client::legacy::Error, body_limit: u64, body_fault: Option<BodyFault>) -> Rejection {
    // The client's own body broke the exchange: its fault, not the upstream's.
    if let Some(fault) = body_fault {
        return body_rejection(fault, body_limit);
    }
    let detail = crate::error::error_chain(&err);
    let timed_out = crate::error::sources(&err).any(|s| {
        s.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
    });
    if timed_out {
        Rejection::UpstreamConnectTimeout(detail)
    } else if err.is_connect() {
        Rejection::UpstreamConnect(detail)
    } else {
        Rejection::UpstreamFailed(detail)
    }
}

/// A request body that failed on the client's side: too large (413), malformed (400), too slow (408).
pub fn body_rejection(fault: BodyFault, limit: u64) -> Rejection {
    match fault {
        BodyFault::TooLarge => Rejection::BodyTooLarge(limit),
        BodyFault::Malformed => Rejection::MalformedBody,
        BodyFault::Stalled => Rejection::BodyTimeout,
    }
}
