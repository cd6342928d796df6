//! A recording mock Unleash: `upstream().route("/api/client/features", |r| ok_json(..)).run().await`.
//! It lets a test say "upstream saw exactly this" or "upstream saw nothing".

use super::patience;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

pub type MockBody = BoxBody<Bytes, Infallible>;
type Handler = Arc<dyn Fn(&Recorded) -> Response<MockBody> + Send + Sync>;

/// One request exactly as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    /// Path and query, byte for byte as sent on the wire.
    pub target: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub struct Builder {
    routes: Vec<(String, Handler)>,
    delays: Vec<(String, std::time::Duration)>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

pub fn upstream() -> Builder {
    Builder {
        routes: Vec::new(),
        delays: Vec::new(),
        tls: None,
    }
}

impl Builder {
    /// Answers requests whose path equals `path` (or any path for `"*"`); first match wins.
    pub fn route(mut self, path: &str, f: impl Fn(&Recorded) -> Response<MockBody> + Send + Sync + 'static) -> Self {
        self.routes.push((path.to_string(), Arc::new(f)));
        self
    }

    /// Serves HTTPS with this config (see `support::tls::server_config`); `url()` becomes `https://`.
    pub fn tls(mut self, config: rustls::ServerConfig) -> Self {
        self.tls = Some(Arc::new(config));
        self
    }

    /// Answers requests on `path` only after `delay` (a slow Unleash), after reading their body.
    pub fn delay(mut self, path: &str, delay: std::time::Duration) -> Self {
        self.delays.push((path.to_string(), delay));
        self
    }

    pub async fn run(self) -> MockUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let routes = Arc::new(self.routes);
        let delays = Arc::new(self.delays);
        let s = seen.clone();
        let accepted = connections.clone();
        let tls = self.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = s.clone();
                let routes = routes.clone();
                let delays = delays.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        let routes = routes.clone();
                        let delays = delays.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let rec = Recorded {
                                method: parts.method,
                                target: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.as_str().to_string())
                                    .unwrap_or_default(),
                                version: parts.version,
                                headers: parts.headers,
                                body,
                            };
                            seen.lock().unwrap().push(rec.clone());
                            if let Some((_, d)) = delays.iter().find(|(p, _)| p == "*" || p == rec.path()) {
                                tokio::time::sleep(*d).await;
                            }
                            let resp = routes
                                .iter()
                                .find(|(p, _)| p == "*" || p == rec.path())
                                .map(|(_, h)| h(&rec))
                                .unwrap_or_else(|| json(StatusCode::NOT_FOUND, r#"{"name":"NotFoundError"}"#));
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        // A failed handshake (an untrusted client, no client certificate) just ends here.
                        Some(acceptor) => {
                            if let Ok(tls_stream) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls_stream), svc).await;
                            }
                        }
                    }
                });
            }
        });
        MockUpstream {
            addr,
            scheme,
            seen,
            connections,
            task,
        }
    }
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    scheme: &'static str,
    seen: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }
    /// Everything received so far.
    pub fn seen(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }
    /// TCP connections accepted so far (pooled keep-alive connections count once).
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn full(b: impl Into<Bytes>) -> MockBody {
    Full::new(b.into()).boxed()
}

pub fn json(status: StatusCode, body: &str) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .body(full(body.to_string()))
        .unwrap()
}

pub fn ok_json(body: &str) -> Response<MockBody> {
    json(StatusCode::OK, body)
}

/// A response body fed by the test, frame by frame (for SSE and streaming tests).
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

pub fn channel_body() -> (mpsc::Sender<Bytes>, MockBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, ChannelBody(rx).boxed())
}

/// A `text/event-stream` response (server-sent events) whose events the test sends, as they happen.
pub fn event_stream() -> (mpsc::Sender<Bytes>, Response<MockBody>) {
    let (tx, body) = channel_body();
    let resp = Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap_or_else(|e| panic!("event-stream response: {e}"));
    (tx, resp)
}

/// The test's end of [`event_streams`]: each stream's sender, as its request reaches the upstream.
pub struct EventStreams(mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>);

impl EventStreams {
    /// The sender of the next stream opened (within 5 s, times the patience).
    pub async fn next(&mut self) -> mpsc::Sender<Bytes> {
        tokio::time::timeout(patience(std::time::Duration::from_secs(5)), self.0.recv())
            .await
            .expect("upstream never got the stream request")
            .expect("the route was dropped")
    }
}

/// A route handler answering every request with an [`event_stream`] whose events the test sends.
pub fn event_streams() -> (
    impl Fn(&Recorded) -> Response<MockBody> + Send + Sync + 'static,
    EventStreams,
) {
    let (senders, rx) = mpsc::unbounded_channel();
    let handler = move |_: &Recorded| {
        let (tx, resp) = event_stream();
        let _ = senders.send(tx);
        resp
    };
    (handler, EventStreams(rx))
}
