//! The upstream connector: hyper-util's `HttpConnector`, with every connection it opens counted in
//! `flaggate_upstream_connections` until it closes, so ops can see the pool.

use crate::io::{Sensor, SensorIo};
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

/// Counts one open connection; decrements the gauge when hyper drops the connection.
pub struct Open(IntGauge);

impl Sensor for Open {}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub type Counted = TokioIo<SensorIo<TcpStream, Open>>;

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
            let tcp = fut.await?.into_inner();
            gauge.inc();
            Ok(TokioIo::new(SensorIo::new(tcp, Open(gauge))))
        })
    }
}

impl Connection for SensorIo<TcpStream, Open> {
    /// Plain: the `HttpInfo` extra that `HttpConnector` attaches would be copied into every response's
    /// extensions (a box and a map per response), and nothing here reads it.
    fn connected(&self) -> Connected {
        Connected::new().proxy(self.get_ref().connected().is_proxied())
    }
}
