//! Clients for tests: a plain HTTP/1.1 client and a raw TCP one for bytes no client library would send.

use super::patience;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The whole response: head and body read to the end.
    async fn read(resp: Response<Incoming>) -> Reply {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(req: Request<Full<Bytes>>) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let resp = tokio::time::timeout(patience(Duration::from_secs(10)), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    Reply::read(resp).await
}

/// GET `path` on `addr`, with `Authorization: token` when given.
pub async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Reply {
    let mut b = Request::get(format!("http://{addr}{path}"));
    if let Some(t) = token {
        b = b.header("authorization", t);
    }
    send(b.body(Full::new(Bytes::new())).unwrap()).await
}

/// Writes `bytes` on a fresh connection and returns everything the server sent until it closed (send
/// `Connection: close`) or 5 s (times the patience) passed. No half-close: hyper, like most servers,
/// treats EOF as "gone".
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(patience(Duration::from_secs(5)), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in a raw reply (`0` if none).
pub fn raw_status(reply: &str) -> u16 {
    reply
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// An HTTP/2 (h2c, prior knowledge) connection to `addr`: many streams on one connection, as an
/// ingress or a browser would open them. The connection task ends when the sender is dropped.
pub async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    h2_connection(addr, None).await.0
}

/// [`h2`] with the connection task's handle (it ends when the server closes the connection) and,
/// when given, the stream window the client grants: with a small one a stream gets only that many
/// bytes until its body is read (hyper's client grants more as the body is polled).
pub async fn h2_connection(
    addr: SocketAddr,
    stream_window: Option<u32>,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    if let Some(w) = stream_window {
        builder.initial_stream_window_size(w);
    }
    let (send, conn) = builder
        .handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

/// Sends `req` on an HTTP/2 connection and reads the whole reply.
pub async fn send_h2(
    h2: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Reply {
    h2.ready().await.expect("h2 connection ready");
    let resp = tokio::time::timeout(patience(Duration::from_secs(10)), h2.send_request(req))
        .await
        .expect("h2 request timed out")
        .expect("h2 request failed");
    Reply::read(resp).await
}
