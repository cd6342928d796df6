//! The one way to Unleash. Forwarded requests, token syncs, PAT checks and (coming) cache fills all go
//! through one [`Upstream`]: one connection pool, one TLS setup (platform roots + `--upstream-ca`, an
//! optional client identity), one connect timeout, the in-flight slots and the connection gauge. So an
//! `https://` upstream works for all of them or for none, by construction.
//!
//! Nothing else in the crate touches hyper-util's client.

mod body;
mod connector;
mod error;
mod metrics;
mod slots;
mod tls;

pub use body::{Body, BoxError};
pub use error::{chain, UpstreamError};
pub use slots::{ConnShare, Owner, Saturated, Scope, Shares, Slot, Slots};

use crate::config::{Config, EgressProxy, UpstreamUrl};
use crate::tls::TlsError;
use connector::CountingConnector;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use metrics::UpstreamMetrics;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

type PooledClient = Client<HttpsConnector<CountingConnector>, Body>;

pub struct Upstream {
    url: UpstreamUrl,
    client: PooledClient,
    slots: Arc<Slots>,
    /// `Host` for every request, made once instead of formatted per request by the client.
    host: HeaderValue,
    /// `Proxy-Authorization` for a forwarding egress proxy (a tunnel sends it with its CONNECT).
    proxy_auth: Option<HeaderValue>,
    metrics: UpstreamMetrics,
    /// Unix ms of the last healthy answer from Unleash (any status but 5xx and 429), from any caller:
    /// how the shield learns that an outage is over without waiting out every key's backoff.
    healthy_ms: std::sync::atomic::AtomicU64,
}

/// What the upstream room needs from the configuration.
pub struct Settings<'a> {
    pub url: &'a UpstreamUrl,
    pub connect_timeout: Duration,
    pub extra_ca: Option<&'a std::path::Path>,
    pub identity: Option<(&'a std::path::Path, &'a std::path::Path)>,
    pub max_inflight: usize,
    pub shares: Shares,
    pub proxy: &'a EgressProxy,
}

impl<'a> Settings<'a> {
    pub fn from_config(cfg: &'a Config) -> Settings<'a> {
        Settings {
            url: &cfg.upstream,
            connect_timeout: cfg.upstream_connect_timeout,
            extra_ca: cfg.upstream_ca.as_deref(),
            identity: match (&cfg.upstream_client_cert, &cfg.upstream_client_key) {
                (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                _ => None,
            },
            max_inflight: cfg.upstream_max_inflight,
            shares: shares(cfg),
            proxy: &cfg.upstream_proxy,
        }
    }
}

/// The per-owner shares a configuration asks for.
pub fn shares(cfg: &Config) -> Shares {
    Shares {
        per_connection: cfg.upstream_max_inflight_per_connection,
        per_token: cfg.upstream_max_inflight_per_token(),
    }
}

impl Upstream {
    /// Builds the client: a keep-alive pool sized for SDK fan-in (many short requests to one host),
    /// `TCP_NODELAY`, the connect timeout, and TLS verified against the platform roots plus the extra
    /// CA — there is no "skip verification".
    pub fn new(s: Settings<'_>, registry: &prometheus::Registry) -> Result<Upstream, TlsError> {
        let (route, proxy_auth) = egress_route(&s)?;
        let slots = Slots::new(s.max_inflight, s.shares, s.connect_timeout);
        let metrics = UpstreamMetrics::register(registry, slots.clone());
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(s.connect_timeout));
        connector.enforce_http(false);
        let tls = tls::client_config(s.extra_ca, s.identity)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(CountingConnector::new(connector, route, metrics.connections.clone()));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(512)
            .build(https);
        Ok(Upstream {
            url: s.url.clone(),
            client,
            slots,
            host: s.url.host_header(),
            proxy_auth,
            metrics,
            healthy_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn url(&self) -> &UpstreamUrl {
        &self.url
    }

    /// The `Host` every request to Unleash carries.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// `base + path + ?query`: the path as given, byte for byte (the proxy passes the canonical path
    /// it authorized).
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let base = &self.url.base_path;
        let mut pq = String::with_capacity(base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
        pq.push_str(base);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        // As `Bytes`, the buffer is taken over; a `String` would be copied.
        let pq = PathAndQuery::from_maybe_shared(bytes::Bytes::from(pq))?;
        Uri::builder()
            .scheme(self.url.scheme.clone())
            .authority(self.url.authority.clone())
            .path_and_query(pq)
            .build()
    }

    /// Applies reloaded slot sizes.
    pub fn resize(&self, max: usize, shares: Shares) {
        self.slots.resize(max, shares);
    }

    /// A slot for a client's request, within its owner's shares (see [`Slots::take_for`]).
    pub async fn slot(&self, owner: Owner<'_>) -> Result<Slot, UpstreamError> {
        self.slots.take_for(owner).await.map_err(|s| {
            self.metrics.refused(s.scope);
            UpstreamError::Saturated(s)
        })
    }

    /// Sends a client's request and waits up to `timeout` for the response head, holding `slot`.
    ///
    /// If the client leaves first (this future is dropped) and the body was complete when sent, the
    /// exchange is finished in the background and its response drained, keeping the pooled connection:
    /// dropping a request in flight closes its upstream connection, so a client that resets each stream
    /// a moment after sending it would turn every reset into a new TCP (and TLS) connection to Unleash.
    /// The slot is given back when the background work is done.
    pub async fn send(
        &self,
        req: Request<Body>,
        slot: Slot,
        timeout: Duration,
    ) -> (Result<Response<Incoming>, UpstreamError>, Option<Slot>) {
        let detachable = req.body().is_complete();
        let mut req = req;
        self.add_proxy_auth(req.headers_mut());
        let mut inflight = Detach {
            fut: Some(self.client.request(req)),
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
            Ok(Ok(resp)) => Ok(self.answered(resp)),
            Ok(Err(e)) => Err(UpstreamError::classify(e)),
            Err(_) => Err(UpstreamError::Timeout(timeout)),
        };
        (result, inflight.slot.take())
    }

    /// A `GET` for the gateway itself (token sync, PAT checks) on the same pool and TLS setup. It takes
    /// no slot: the pool's guard must not starve the syncs that keep the gate correct, and each caller
    /// bounds its own rate (one sync at a time, `pat_rate_limit`).
    pub async fn get(
        &self,
        path: &str,
        headers: HeaderMap,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let uri = self.uri(path, None).map_err(|e| UpstreamError::Protocol(Box::new(e)))?;
        let mut req = Request::get(uri)
            .body(Body::Empty)
            .map_err(|e| UpstreamError::Protocol(Box::new(e)))?;
        *req.headers_mut() = headers;
        req.headers_mut().insert(http::header::HOST, self.host.clone());
        self.add_proxy_auth(req.headers_mut());
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(self.answered(resp)),
            Ok(Err(e)) => Err(UpstreamError::classify(e)),
            Err(_) => Err(UpstreamError::Timeout(timeout)),
        }
    }
}

impl Upstream {
    /// Unix ms of Unleash's last healthy answer (0: none yet).
    pub fn last_healthy_ms(&self) -> u64 {
        self.healthy_ms.load(std::sync::atomic::Ordering::Acquire)
    }

    fn answered(&self, resp: Response<Incoming>) -> Response<Incoming> {
        let s = resp.status();
        if !s.is_server_error() && s != http::StatusCode::TOO_MANY_REQUESTS {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            self.healthy_ms.fetch_max(now, std::sync::atomic::Ordering::AcqRel);
        }
        resp
    }

    fn add_proxy_auth(&self, headers: &mut HeaderMap) {
        if let Some(auth) = &self.proxy_auth {
            headers.insert(http::header::PROXY_AUTHORIZATION, auth.clone());
        }
    }
}

/// How connections reach the upstream: the egress proxy the settings (or the environment) name for it,
/// if any, and the credentials a forwarding proxy needs on each request.
fn egress_route(s: &Settings<'_>) -> Result<(connector::Route, Option<HeaderValue>), TlsError> {
    use hyper_util::client::proxy::matcher::Matcher;
    let matcher = match s.proxy {
        EgressProxy::Direct => return Ok((connector::Route::Direct, None)),
        EgressProxy::FromEnv => Matcher::from_env(),
        EgressProxy::Url(u) => Matcher::builder().all(u.expose().to_string()).build(),
    };
    let dst: Uri = format!("{}://{}/", s.url.scheme, s.url.authority)
        .parse()
        .map_err(|e| TlsError::Config(format!("upstream URL: {e}")))?;
    let Some(intercept) = matcher.intercept(&dst) else {
        return Ok((connector::Route::Direct, None));
    };
    let proxy = intercept.uri().clone();
    if proxy.scheme_str() != Some("http") {
        return Err(TlsError::Config(format!(
            "egress proxy `{}://{}`: only http:// proxies are supported",
            proxy.scheme_str().unwrap_or(""),
            proxy.authority().map_or("", |a| a.as_str())
        )));
    }
    let auth = intercept.basic_auth().cloned();
    tracing::info!(
        proxy = %format!("http://{}", proxy.authority().map_or("", |a| a.host())),
        upstream = %s.url,
        "reaching Unleash through an egress proxy"
    );
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(s.connect_timeout));
    if s.url.scheme == http::uri::Scheme::HTTPS {
        let mut tunnel = connector::Tunnel::new(proxy, http);
        if let Some(a) = auth {
            tunnel = tunnel.with_auth(a);
        }
        Ok((connector::Route::Tunnel(tunnel), None))
    } else {
        Ok((connector::Route::Forward(proxy), auth))
    }
}

/// A response body drained in the background is read at most this far, for at most this long; a
/// longer one (an event stream) costs its connection instead.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);

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
