//! The body of a request to Unleash: one type for everything the gateway sends, so that forwarding,
//! token sync, PAT checks and cache fills share one client and one pool.

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body still arriving from a client (the part beyond what was read before sending).
pub type Rest = Pin<Box<dyn HttpBody<Data = Bytes, Error = BoxError> + Send>>;

pub enum Body {
    /// No body at all, as on almost every request: nothing to poll.
    Empty,
    /// The whole body, in memory (and any trailers after it).
    Full {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    /// What was read, then the rest as it arrives.
    Streaming { head: Option<Bytes>, rest: Rest },
}

impl Body {
    /// Whether the whole body is in memory: such a request can still be finished after its client left.
    pub fn is_complete(&self) -> bool {
        !matches!(self, Body::Streaming { .. })
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            Body::Streaming { head, rest } => match head.take() {
                Some(h) => Poll::Ready(Some(Ok(Frame::data(h)))),
                None => rest.as_mut().poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Body::Streaming { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full { data, .. } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Body::Streaming { head, rest } => {
                let h = head.as_ref().map_or(0, |d| d.len() as u64);
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + h);
                if let Some(u) = r.upper() {
                    hint.set_upper(u + h);
                }
                hint
            }
        }
    }
}
