//! The upstream connector: hyper-util's `HttpConnector`, directly or through an egress proxy (CONNECT
//! tunnel for an `https://` Unleash, absolute-form requests for an `http://` one), with every connection
//! it opens counted in `flaggate_upstream_connections` until it closes, so ops can see the pool.

use super::body::BoxError;
use crate::io::{Sensor, SensorIo};
pub use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpStream;

/// How connections reach Unleash.
#[derive(Clone)]
pub enum Route {
    Direct,
    /// Through an egress proxy, tunnelled with CONNECT (an `https://` Unleash: TLS runs inside).
    Tunnel(Tunnel<HttpConnector>),
    /// Through an egress proxy that forwards plain requests (an `http://` Unleash): the connection goes
    /// to the proxy, and requests are sent in absolute form.
    Forward(http::Uri),
}

#[derive(Clone)]
pub struct CountingConnector {
    http: HttpConnector,
    route: Route,
    gauge: IntGauge,
}

impl CountingConnector {
    pub fn new(http: HttpConnector, route: Route, gauge: IntGauge) -> Self {
        CountingConnector { http, route, gauge }
    }
}

/// Counts one open connection; decrements the gauge when hyper drops the connection.
pub struct Open {
    gauge: IntGauge,
    /// Connected to a forwarding proxy: requests go in absolute form.
    proxied: bool,
}

impl Sensor for Open {}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

pub type Counted = TokioIo<SensorIo<TcpStream, Open>>;

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl tower_service::Service<http::Uri> for CountingConnector {
    type Response = Counted;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Counted, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.route {
            Route::Tunnel(t) => t.poll_ready(cx).map_err(Into::into),
            Route::Direct | Route::Forward(_) => self.http.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (connecting, proxied): (Connecting, bool) = match &mut self.route {
            Route::Direct => {
                let f = self.http.call(uri);
                (Box::pin(async move { f.await.map_err(Into::into) }), false)
            }
            Route::Tunnel(t) => {
                let f = t.call(uri);
                (Box::pin(async move { f.await.map_err(Into::into) }), false)
            }
            Route::Forward(proxy) => {
                let f = self.http.call(proxy.clone());
                (Box::pin(async move { f.await.map_err(Into::into) }), true)
            }
        };
        let gauge = self.gauge.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            gauge.inc();
            Ok(TokioIo::new(SensorIo::new(tcp, Open { gauge, proxied })))
        })
    }
}

impl Connection for SensorIo<TcpStream, Open> {
    /// Plain: the `HttpInfo` extra that `HttpConnector` attaches would be copied into every response's
    /// extensions (a box and a map per response), and nothing here reads it.
    fn connected(&self) -> Connected {
        Connected::new().proxy(self.sensor().proxied)
    }
}
