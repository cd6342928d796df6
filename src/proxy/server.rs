//! Accept loops: the proxy listener (HTTP/1.1 and h2c, auto-detected) and a shared graceful stop.

use super::{handle, Gateway};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Resolves once `stop` is true (or its sender is gone); holds no borrow across awaits, so it is `Send`.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Connection-level limits.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
}

pub fn conn_builder(limits: ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024);
    b
}

/// Serves `listener` until `stop` turns true, then lets open connections finish their current request.
pub async fn serve_proxy(listener: TcpListener, gw: Arc<Gateway>, limits: ConnLimits, mut stop: watch::Receiver<bool>) {
    let builder = conn_builder(limits);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener itself is fine.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let open = gw.metrics.connections.with_label_values(&["proxy"]);
        open.inc();
        let gw = gw.clone();
        let svc = service_fn(move |req| handle(gw.clone(), req, peer));
        let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with error");
            }
            open.dec();
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(15), graceful.shutdown()).await;
}

/// A minimal loop for small internal servers (admin listener, demo upstream).
pub async fn serve_simple<F, Fut>(listener: TcpListener, handler: F, mut stop: watch::Receiver<bool>)
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible>>
        + Send
        + 'static,
{
    let builder = conn_builder(ConnLimits {
        header_read_timeout: Duration::from_secs(10),
    });
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let h = handler.clone();
        let conn = builder
            .serve_connection(TokioIo::new(stream), service_fn(move |req| h(req)))
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
