//! The upstream side: one pooled client, the forwarded URI, and what upstream failures mean.

use super::body::{BodyFault, UpstreamBody};
use super::connector::CountingConnector;
use super::slots::Slot;
use crate::config::{Config, Upstream};
use crate::error::Rejection;
use crate::path::CanonicalPath;
use crate::tls::TlsError;
use http::uri::PathAndQuery;
use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::future::Future;
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

/// Why an exchange produced no response head.
pub enum Failed {
    Timeout,
    Client(hyper_util::client::legacy::Error),
}

/// A response body drained in the background is read at most this far, for at most this long; a
/// longer one (an event stream) costs its connection instead.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Sends `req` and waits up to `timeout` for the response head, holding `slot` meanwhile.
///
/// If the client leaves first (this future is dropped) and the request body was complete when sent
/// (`detachable`), the exchange is finished in the background and its response drained, keeping the
/// pooled connection: dropping a request in flight closes its upstream connection, so a client that
/// resets each stream a moment after sending it would turn every reset into a new TCP (and TLS)
/// connection to Unleash. The slot is given back when the background work is done.
pub async fn exchange(
    client: &UpstreamClient,
    req: http::Request<UpstreamBody>,
    slot: Slot,
    timeout: Duration,
    detachable: bool,
) -> (Result<http::Response<hyper::body::Incoming>, Failed>, Option<Slot>) {
    let mut inflight = Detach {
        fut: Some(client.request(req)),
        slot: Some(slot),
        deadline: tokio::time::Instant::now() + timeout,
        detachable,
    };
    let deadline = inflight.deadline;
    let result = tokio::time::timeout_at(
        deadline,
        std::future::poll_fn(|cx| match inflight.fut.as_mut() {
            Some(f) => std::pin::Pin::new(f).poll(cx),
            None => std::task::Poll::Pending,
        }),
    )
    .await;
    // Answered or timed out: nothing is left to finish in the background.
    inflight.fut = None;
    let result = match result {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(Failed::Client(e)),
        Err(_) => Err(Failed::Timeout),
    };
    (result, inflight.slot.take())
}

struct Detach {
    fut: Option<ResponseFuture>,
    slot: Option<Slot>,
    deadline: tokio::time::Instant,
    detachable: bool,
}

impl Drop for Detach {
    fn drop(&mut self) {
        let (Some(fut), true) = (self.fut.take(), self.detachable) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let slot = self.slot.take();
        let deadline = self.deadline;
        runtime.spawn(async move {
            let _slot = slot;
            if let Ok(Ok(resp)) = tokio::time::timeout_at(deadline, fut).await {
                let until = deadline.min(tokio::time::Instant::now() + DRAIN_TIME);
                let body = http_body_util::Limited::new(resp.into_body(), DRAIN_BYTES);
                let _ = tokio::time::timeout_at(until, http_body_util::BodyExt::collect(body)).await;
            }
        });
    }
}
