//! The upstream connector: hyper-util's `HttpConnector`, with every connection it opens counted in
//! `flaggate_upstream_connections` until it closes, so ops can see the pool.

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpStream;

#[derive(Clone)]
pub struct CountingConnector {
    inner: HttpConnector,
    gauge: IntGauge,
}

impl CountingConnector {
    pub fn new(inner: HttpConnector, gauge: IntGauge) -> Self {
        CountingConnector { inner, gauge }
    }
}

/// A connection that decrements the gauge when hyper drops it.
pub struct Counted {
    io: TokioIo<TcpStream>,
    gauge: IntGauge,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl tower_service::Service<http::Uri> for CountingConnector {
    type Response = Counted;
    type Error = <HttpConnector as tower_service::Service<http::Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Counted, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let fut = self.inner.call(uri);
        let gauge = self.gauge.clone();
        Box::pin(async move {
            let io = fut.await?;
            gauge.inc();
            Ok(Counted { io, gauge })
        })
    }
}

impl Connection for Counted {
    /// Plain: the `HttpInfo` extra that `HttpConnector` attaches would be copied into every response's
    /// extensions (a box and a map per response), and nothing here reads it.
    fn connected(&self) -> Connected {
        Connected::new().proxy(self.io.connected().is_proxied())
    }
}

impl Read for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
