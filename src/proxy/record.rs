//! Phase 6, record: metrics at response-head time, and one access-log line when the response body is
//! finished (or abandoned), so the line carries the real byte count even for streams.

use super::conn::{Activity, StreamClock, STREAM_CHUNK};
use super::ProxyBody;
use crate::error::Decision;
use crate::token::{Fingerprint, TokenKind};
use bytes::Bytes;
use http::HeaderValue;
use hyper::body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Everything the access-log line says about one request. Never holds a secret.
pub struct Record {
    pub started: Instant,
    /// The client's address as the gateway decided it (the peer, or the address a trusted proxy
    /// forwarded for it).
    pub client: std::net::IpAddr,
    pub method: http::Method,
    pub path: Option<String>,
    pub route_class: Arc<str>,
    pub status: u16,
    pub decision: Decision,
    pub reason: Option<&'static str>,
    pub token: Option<(Fingerprint, Option<TokenKind>)>,
    /// The client's `unleash-appname`, as sent (read with [`app_name`]).
    pub app: Option<HeaderValue>,
    pub request_id: HeaderValue,
    pub gateway_time: Duration,
    pub upstream_time: Option<Duration>,
    /// How the shield answered (and the age of the document it served), if it considered the request.
    pub cache: Option<crate::shield::Note>,
    pub error: Option<String>,
}

/// Whether access-log lines are written at all: when they are not (`--log-level warn`), the fields
/// only they need (the path's copy, the fingerprint's text) are not made.
pub fn wanted() -> bool {
    tracing::enabled!(target: "flaggate::access", tracing::Level::INFO)
}

impl Record {
    pub fn emit(&self, bytes: u64, complete: bool) {
        if !wanted() {
            return;
        }
        let fingerprint = self.token.map(|(f, _)| f.to_string());
        let kind = self.token.and_then(|(_, k)| k).map(TokenKind::as_str);
        tracing::info!(
            target: "flaggate::access",
            client = %self.client,
            method = %self.method,
            path = self.path.as_deref().unwrap_or("-"),
            status = self.status,
            decision = self.decision.as_str(),
            route_class = &*self.route_class,
            reason = self.reason,
            token = fingerprint.as_deref(),
            token_kind = kind,
            app = self.app.as_ref().and_then(app_name),
            request_id = self.request_id.to_str().unwrap_or("-"),
            bytes = bytes,
            complete = complete,
            gateway_us = self.gateway_time.as_micros() as u64,
            upstream_us = self.upstream_time.map(|t| t.as_micros() as u64),
            total_us = self.started.elapsed().as_micros() as u64,
            cache = self.cache.map(|c| c.result),
            cache_age_ms = self.cache.and_then(|c| c.age).map(|a| a.as_millis() as u64),
            error = self.error.as_deref(),
            "request"
        );
    }
}

/// The response body as sent to the client: counts bytes and writes the access-log line at the end.
pub struct LoggedBody {
    inner: ProxyBody,
    bytes: u64,
    record: Option<Box<Record>>,
    activity: Option<Arc<Activity>>,
    /// HTTP/2 only: tells the connection's watchdog whether the client is taking this stream's chunks.
    clock: Option<Arc<StreamClock>>,
    /// HTTP/2 only: what is left of a frame longer than [`STREAM_CHUNK`], handed out a chunk at a time.
    rest: Bytes,
    /// The upstream slot, given back as soon as the body ends.
    slot: Option<crate::upstream::Slot>,
    /// Event streams only: resolves at shutdown, when the stream is ended cleanly.
    stop: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    /// Event streams only: a stream on which nothing arrives for this long is ended (clients reconnect).
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

/// What a streaming (SSE) response gets instead of the response timeout.
pub struct StreamGuards {
    pub stop: tokio::sync::watch::Receiver<bool>,
    pub idle: Duration,
}

impl LoggedBody {
    pub fn new(
        inner: ProxyBody,
        record: Record,
        activity: Option<Arc<Activity>>,
        clock: Option<Arc<StreamClock>>,
        slot: Option<crate::upstream::Slot>,
        stream: Option<StreamGuards>,
    ) -> LoggedBody {
        let (stop, idle) = match stream {
            Some(g) => (Some(g.stop), Some((g.idle, Box::pin(tokio::time::sleep(g.idle))))),
            None => (None, None),
        };
        LoggedBody {
            inner,
            bytes: 0,
            record: Some(Box::new(record)),
            activity,
            clock,
            rest: Bytes::new(),
            slot,
            stop: stop.map(|mut rx| {
                Box::pin(async move { super::server::stopped(&mut rx).await })
                    as Pin<Box<dyn Future<Output = ()> + Send + Sync>>
            }),
            idle,
        }
    }

    fn finish(&mut self, complete: bool) {
        self.slot = None;
        if let Some(r) = self.record.take() {
            r.emit(self.bytes, complete);
            if let Some(a) = self.activity.take() {
                a.end();
            }
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(clock) = &this.clock {
            clock.taken();
            if !this.rest.is_empty() {
                let chunk = this.next_chunk();
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
        }
        if let Some(stop) = &mut this.stop {
            if stop.as_mut().poll(cx).is_ready() {
                // Shutdown: end the event stream at a frame boundary, as a normal end of body.
                this.finish(true);
                return Poll::Ready(None);
            }
        }
        if let Some((_, timer)) = &mut this.idle {
            if timer.as_mut().poll(cx).is_ready() {
                tracing::debug!("event stream idle for too long: ending it");
                this.finish(false);
                return Poll::Ready(None);
            }
        }
        let polled = match &mut this.inner {
            http_body_util::Either::Left(b) => Pin::new(b).poll_frame(cx),
            http_body_util::Either::Right(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some((idle, timer)) = &mut this.idle {
                    timer.as_mut().reset(tokio::time::Instant::now() + *idle);
                }
                match frame.into_data() {
                    Ok(data) if this.clock.is_some() => {
                        this.rest = data;
                        Poll::Ready(Some(Ok(Frame::data(this.next_chunk()))))
                    }
                    Ok(data) => {
                        this.bytes += data.len() as u64;
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Err(trailers) => Poll::Ready(Some(Ok(trailers))),
                }
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

impl LoggedBody {
    /// HTTP/2: the next chunk of `rest`, started on the stream's clock.
    fn next_chunk(&mut self) -> Bytes {
        let n = self.rest.len().min(STREAM_CHUNK);
        let chunk = self.rest.split_to(n);
        self.bytes += n as u64;
        if let Some(clock) = &self.clock {
            clock.handed();
        }
        chunk
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // Empty bodies (304, HEAD) may never be polled; a client that went away mid-stream lands here too.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

/// The SDK's `unleash-appname` as the log and the `app` label show it: at most [`APP_NAME_MAX`] bytes,
/// `None` when it is not visible ASCII. Kept as the header value (a shared reference to the request's
/// bytes) rather than copied: every SDK request carries one.
pub fn app_name(v: &HeaderValue) -> Option<&str> {
    // `to_str` admits visible ASCII only, so any byte index is a character boundary.
    v.to_str().ok().map(|s| &s[..s.len().min(APP_NAME_MAX)])
}

/// The longest app name logged or used as a label; longer ones are cut.
pub const APP_NAME_MAX: usize = 64;

/// `x-request-id`: honoured when well-formed (1-64 of `[A-Za-z0-9._-]`), else generated.
pub fn request_id(incoming: Option<&HeaderValue>) -> HeaderValue {
    if let Some(v) = incoming {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 64
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        {
            return v.clone();
        }
    }
    let mut hex = [0u8; 32];
    // Hex digits are always a valid header value; the fallback only keeps this path free of unwraps.
    match hex::encode_to_slice(fastrand::u128(..).to_be_bytes(), &mut hex) {
        // Owned, the id is one allocation its three copies (upstream, response, log) share; copied
        // from a slice it would be allocated again on its first clone.
        Ok(()) => HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(hex))
            .unwrap_or_else(|_| HeaderValue::from_static("-")),
        Err(_) => HeaderValue::from_static("-"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_are_cut_to_the_maximum_and_only_visible_ascii_is_read() {
        let long = "a".repeat(APP_NAME_MAX + 10);
        let v = HeaderValue::from_str(&long).unwrap();
        assert_eq!(app_name(&v), Some(&long[..APP_NAME_MAX]));
        assert_eq!(app_name(&HeaderValue::from_static("checkout")), Some("checkout"));
        assert_eq!(app_name(&HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap()), None);
    }

    #[test]
    fn request_ids_are_honoured_only_when_well_formed() {
        let good = HeaderValue::from_static("abc-123_X.y");
        assert_eq!(request_id(Some(&good)), good);
        for bad in ["", "a b", "x\"y", &"a".repeat(65)] {
            let v = HeaderValue::from_str(bad).unwrap();
            let id = request_id(Some(&v));
            assert_ne!(id, v);
            assert_eq!(id.len(), 32);
        }
        assert_ne!(request_id(None), request_id(None));
    }
}
