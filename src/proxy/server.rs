//! Accept loops: the proxy listener (HTTP/1.1 and h2c auto-detected, or TLS with ALPN), one watchdog
//! per connection for header-read and idle timeouts, a cap on open connections, and the drain on stop.

use super::conn::{Activity, Expiry, Watch};
use super::{handle, ConnCtx, Gateway};
use crate::config::Config;
use crate::io::SensorIo;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Resolves once `stop` is true (or its sender is gone); holds no borrow across awaits, so it is `Send`.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Connection-level limits.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub h2_max_streams: u32,
}

impl ConnLimits {
    pub fn from_config(cfg: &Config) -> ConnLimits {
        ConnLimits {
            header_read_timeout: cfg.header_read_timeout,
            idle_timeout: cfg.idle_timeout,
            max_header_bytes: cfg.max_header_bytes,
            h2_max_streams: cfg.h2_max_streams,
        }
    }
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_header_bytes: 16 * 1024,
            h2_max_streams: 128,
        }
    }
}

pub fn conn_builder(limits: &ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // Timeouts are the watchdog's job (see `conn`); hyper's header timer would also cut idle keep-alive.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(100);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// The next connection, once there is room under the cap (`None` once `stop` turns true). At the cap
/// nothing is accepted: new clients wait in the kernel's backlog instead of being refused.
async fn accept_within_cap(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    stop: &mut watch::Receiver<bool>,
) -> Option<(OwnedSemaphorePermit, TcpStream, std::net::SocketAddr)> {
    let permit = tokio::select! {
        p = permits.clone().acquire_owned() => p.ok()?,
        _ = stopped(stop) => return None,
    };
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => return Some((permit, stream, peer)),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener itself is fine.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(stop) => return None,
        }
    }
}

/// What the proxy listener needs besides the gateway.
#[derive(Clone)]
pub struct ServeOpts {
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub tls: Option<crate::tls::Acceptor>,
}

/// Serves `listener` until `stop` turns true, then drains: every connection is asked to finish its
/// current request (HTTP/1 closes after it, HTTP/2 sends GOAWAY), event streams end, and whatever is
/// still open after the grace period is cut.
pub async fn serve_proxy(listener: TcpListener, gw: Arc<Gateway>, opts: ServeOpts, mut stop: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Some((permit, stream, peer)) = accept_within_cap(&listener, &permits, &mut stop).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let gw = gw.clone();
        let stop = stop.clone();
        let tls = opts.tls.clone();
        conns.spawn(async move {
            let open = gw.metrics.connections.with_label_values(&["proxy"]);
            open.inc();
            match tls {
                None => serve_conn(stream, peer, "http", gw, stop).await,
                // The handshake gets the request head's time limit: a client that stalls in it would
                // otherwise hold a connection slot forever (a slowloris one layer down).
                Some(acceptor) => {
                    let limit = gw.live.load().conn.header_read_timeout;
                    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => serve_conn(tls_stream, peer, "https", gw, stop).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake not completed in time: closing (slow client)"),
                    }
                }
            }
            open.dec();
            drop(permit);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(opts.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            "shutdown grace period over: closing remaining connections"
        );
        conns.shutdown().await;
    }
}

/// One client connection, HTTP/1.1 or HTTP/2, under its watchdog.
async fn serve_conn<S>(
    stream: S,
    peer: std::net::SocketAddr,
    proto: &'static str,
    gw: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = gw.live.load().conn;
    let activity = Arc::new(Activity::new());
    let ctx = ConnCtx {
        peer,
        forwarded_for: super::headers::forwarded_for(peer.ip()),
        proto,
        activity: Some(activity.clone()),
        share: Default::default(),
        stop: Some(stop.clone()),
    };
    // Why the watchdog closed a connection, for on-call: slow clients and abusive ones look alike in logs.
    let closed = gw.metrics.connections_closed.clone();
    let svc = service_fn(move |req| handle(gw.clone(), req, ctx.clone()));
    let io = TokioIo::new(SensorIo::new(stream, Watch::new(activity.clone())));
    let builder = conn_builder(&limits);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let mut draining = false;
    let mut calm_deadline: Option<tokio::time::Instant> = None;
    // The watchdog samples the phase on a tick instead of being woken by every request: per-request
    // wakeups and timer registrations cost more than the timeouts' precision is worth.
    let tick = (limits.header_read_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, %peer, "connection ended with error");
                }
                return;
            }
            _ = ticker.tick() => match activity.check(limits.header_read_timeout, limits.idle_timeout) {
                Expiry::HeaderTimeout => {
                    tracing::debug!(%peer, "request head not received in time: closing (slow client)");
                    closed.with_label_values(&["header_timeout"]).inc();
                    return;
                }
                Expiry::IdleTimeout => {
                    tracing::trace!(%peer, "idle keep-alive connection closed");
                    closed.with_label_values(&["idle_timeout"]).inc();
                    return;
                }
                Expiry::WriteTimeout => {
                    tracing::debug!(%peer, "client stopped reading its response: closing (slow reader)");
                    closed.with_label_values(&["write_timeout"]).inc();
                    return;
                }
                Expiry::At(_) | Expiry::Busy => {}
            },
            _ = stopped(&mut stop), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.over_cancel_budget(), if calm_deadline.is_none() => {
                // hyper cannot send GOAWAY with ENHANCE_YOUR_CALM; a graceful GOAWAY (NO_ERROR) stops new
                // streams, and the connection is closed shortly after whatever it still has in flight.
                tracing::warn!(%peer, budget = super::conn::CANCEL_BUDGET, "client abandons forwarded requests faster than the budget allows: closing the connection");
                closed.with_label_values(&["cancel_budget"]).inc();
                conn.as_mut().graceful_shutdown();
                calm_deadline = Some(tokio::time::Instant::now() + CALM_GRACE);
            }
            _ = async { tokio::time::sleep_until(calm_deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if calm_deadline.is_some() => {
                return;
            }
        }
    }
}

/// After a connection is told to calm down, how long its open streams may take before it is closed.
const CALM_GRACE: Duration = Duration::from_secs(1);

/// How long an internal-listener connection may sit without a complete request: probes and scrapes
/// send theirs at once, so anything slower is a connection holding a place for nothing.
pub const SIMPLE_IDLE: Duration = Duration::from_secs(2);

/// One connection of an internal listener, as the accept loop sees it.
struct Tracked {
    /// A request is being answered on it now.
    busy: Arc<std::sync::atomic::AtomicBool>,
    /// Closes it (when the listener is full and a new client needs its place).
    close: Arc<tokio::sync::Notify>,
    done: Arc<std::sync::atomic::AtomicBool>,
}

/// A minimal loop for small internal servers (admin listener, demo upstream): HTTP/1.1 only (probes and
/// scrapes speak it; an h2c connection would have no idle timeout here), hyper's header timer at
/// [`SIMPLE_IDLE`] (which also closes idle keep-alive connections), and at most `max_connections` open,
/// so a flood on an internal port cannot use up the file descriptors the proxy port needs. When the cap
/// is reached, a new client takes the place of the oldest connection that is not answering a request:
/// idle clients cannot hold the places that liveness and readiness probes need.
pub async fn serve_simple<F, Fut>(
    listener: TcpListener,
    handler: F,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible>>
        + Send
        + 'static,
{
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(SIMPLE_IDLE);
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut open: std::collections::VecDeque<Tracked> = std::collections::VecDeque::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        open.retain(|t| !t.done.load(Ordering::Acquire));
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: the oldest connection not answering anything makes room.
                if let Some(i) = open.iter().position(|t| !t.busy.load(Ordering::Acquire)) {
                    if let Some(t) = open.remove(i) {
                        t.close.notify_one();
                    }
                }
                match tokio::time::timeout(SIMPLE_IDLE, permits.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => continue,
                }
            }
        };
        let tracked = Tracked {
            busy: Arc::new(AtomicBool::new(false)),
            close: Arc::new(tokio::sync::Notify::new()),
            done: Arc::new(AtomicBool::new(false)),
        };
        let (busy, close, done) = (tracked.busy.clone(), tracked.close.clone(), tracked.done.clone());
        open.push_back(tracked);
        let handler = handler.clone();
        let svc = service_fn(move |req| {
            let busy = busy.clone();
            let fut = handler(req);
            busy.store(true, Ordering::Release);
            async move {
                let r = fut.await;
                busy.store(false, Ordering::Release);
                r
            }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = close.notified() => {}
            }
            done.store(true, Ordering::Release);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn ok(
        _: http::Request<hyper::body::Incoming>,
    ) -> Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
        Ok(http::Response::new(http_body_util::Full::new(
            bytes::Bytes::from_static(b"ok"),
        )))
    }

    async fn get(s: &mut TcpStream) -> tokio::io::Result<String> {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn a_full_internal_listener_gives_the_oldest_idle_connections_place_to_a_new_client() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, stop_rx) = watch::channel(false);
        tokio::spawn(serve_simple(listener, ok, 2, stop_rx));

        let mut idle = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(1), get(&mut third))
            .await
            .expect("a probe waited behind idle connections")
            .unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        let mut buf = [0u8; 1];
        let evicted = tokio::time::timeout(Duration::from_secs(1), idle[0].read(&mut buf)).await;
        assert!(
            matches!(evicted, Ok(Ok(0)) | Ok(Err(_))),
            "the oldest idle connection was not closed"
        );
        // Idle connections do not live long anyway.
        let closed = tokio::time::timeout(SIMPLE_IDLE * 2, idle[1].read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection outlived the idle timer"
        );
    }
}
