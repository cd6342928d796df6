//! The request body on its way upstream: read into a bounded buffer before an upstream slot is taken,
//! size-limited as it streams, cut when the client stalls in it or falls below a minimum rate, and
//! remembering whether *it* failed, so that a broken client body is answered 400/408/413 (the client's
//! fault), not 502/504.

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

use crate::upstream::{self, BoxError};

/// How the client's body ended, if it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFault {
    TooLarge,
    Malformed,
    /// No body bytes for the stall limit: a slow-body client (which would otherwise hold an upstream
    /// connection until the upstream timeout, and be counted as the upstream's failure).
    Stalled,
}

impl BodyFault {
    /// The client's fault, as an answer: too large (413), malformed (400), too slow (408).
    pub fn rejection(self, limit: u64) -> crate::error::Rejection {
        use crate::error::Rejection;
        match self {
            BodyFault::TooLarge => Rejection::BodyTooLarge(limit),
            BodyFault::Malformed => Rejection::MalformedBody,
            BodyFault::Stalled => Rejection::BodyTimeout,
        }
    }
}

#[derive(Clone, Default)]
pub struct FaultCell(Arc<AtomicU8>);

impl FaultCell {
    pub fn get(&self) -> Option<BodyFault> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(BodyFault::TooLarge),
            2 => Some(BodyFault::Malformed),
            3 => Some(BodyFault::Stalled),
            _ => None,
        }
    }
    fn set(&self, f: BodyFault) {
        let v = match f {
            BodyFault::TooLarge => 1,
            BodyFault::Malformed => 2,
            BodyFault::Stalled => 3,
        };
        self.0.store(v, Ordering::Release);
    }
}

/// How much of a request body the gateway takes before it asks for an upstream slot, and how slow a
/// client may be. Upstream slots are scarce and a client is not: a body that trickles in while holding a
/// slot would let a handful of slow clients hold the whole pool (nginx buffers request bodies before it
/// connects upstream for the same reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyLimits {
    /// The most a body may have (`max_request_body`).
    pub max: u64,
    /// Read into memory before the upstream slot is taken (`request_body_buffer`); a longer body
    /// streams on from there.
    pub buffer: usize,
    /// The buffered part must arrive within this time, and the streamed rest may pause this long at
    /// most (`header_read_timeout`).
    pub stall: Duration,
    /// After `stall`, the streamed rest must have kept up this many bytes a second on average
    /// (`min_request_body_rate`), so that one byte every few seconds cannot hold a slot for hours.
    pub min_rate: u64,
}

/// Reads a request body up to `limits.buffer` bytes, within `limits.stall`. Errors are the client's:
/// too large (413), malformed (400), too slow (408).
pub async fn read_head(body: Incoming, limits: BodyLimits, fault: FaultCell) -> Result<upstream::Body, BodyFault> {
    if body.is_end_stream() {
        return Ok(upstream::Body::Empty);
    }
    let started = Instant::now();
    let deadline = started + limits.stall;
    let mut body = Limited::new(body, usize::try_from(limits.max).unwrap_or(usize::MAX));
    let mut read = bytes::BytesMut::new();
    // The common small body arrives as one frame: kept as it is, not copied.
    let mut first: Option<Bytes> = None;
    let mut trailers = None;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyFault::Stalled),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(fault_of(&e)),
            Ok(Some(Ok(frame))) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        match first.take() {
            None if read.is_empty() => first = Some(data),
            Some(prev) => {
                read.extend_from_slice(&prev);
                read.extend_from_slice(&data);
            }
            None => read.extend_from_slice(&data),
        }
        let held = first.as_ref().map_or(read.len(), Bytes::len);
        if held >= limits.buffer {
            let head = first.take().unwrap_or_else(|| read.split().freeze());
            let rest = DownstreamBody::resume(body, limits, fault, started, held as u64);
            return Ok(upstream::Body::Streaming {
                head: Some(head),
                rest: Box::pin(rest),
            });
        }
    }
    let data = first.or_else(|| (!read.is_empty()).then(|| read.freeze()));
    Ok(upstream::Body::Full { data, trailers })
}

fn fault_of(e: &BoxError) -> BodyFault {
    if e.downcast_ref::<LengthLimitError>().is_some() {
        BodyFault::TooLarge
    } else {
        BodyFault::Malformed
    }
}

/// The streamed rest of a long body: size-limited as it streams, cut when the client pauses longer
/// than the stall limit or falls below the minimum rate.
pub struct DownstreamBody {
    inner: Limited<Incoming>,
    fault: FaultCell,
    stall_limit: Duration,
    /// When the body started, and the bytes received since: the minimum-rate clock.
    started: Instant,
    received: u64,
    min_rate: u64,
    /// Armed the first time the body is not ready.
    stall: Option<Pin<Box<Sleep>>>,
    /// The last poll found no bytes: the stall clock is running.
    waiting: bool,
}

impl DownstreamBody {
    fn resume(
        inner: Limited<Incoming>,
        limits: BodyLimits,
        fault: FaultCell,
        started: Instant,
        received: u64,
    ) -> DownstreamBody {
        DownstreamBody {
            inner,
            fault,
            stall_limit: limits.stall,
            started,
            received,
            min_rate: limits.min_rate,
            stall: None,
            waiting: false,
        }
    }

    /// The instant by which the next byte must arrive to keep the average at the minimum rate (after a
    /// grace of one stall limit, so a body's slow start is not held against it).
    fn rate_deadline(&self) -> Option<Instant> {
        (self.min_rate > 0).then(|| {
            self.started + self.stall_limit + Duration::from_secs_f64(self.received as f64 / self.min_rate as f64)
        })
    }

    fn too_slow(&self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.fault.set(BodyFault::Stalled);
        Poll::Ready(Some(Err("request body too slow".into())))
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if r.is_pending() {
            // The clock starts when the client's bytes run out, not when we last asked: time the upstream
            // spent not reading the body is not the client's stall.
            if !this.waiting {
                let mut deadline = Instant::now() + this.stall_limit;
                if let Some(rate) = this.rate_deadline() {
                    deadline = deadline.min(rate);
                }
                match &mut this.stall {
                    Some(stall) => stall.as_mut().reset(deadline),
                    None => this.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                this.waiting = true;
            }
            if let Some(stall) = &mut this.stall {
                if stall.as_mut().poll(cx).is_ready() {
                    return this.too_slow();
                }
            }
            return Poll::Pending;
        }
        this.waiting = false;
        match &r {
            Poll::Ready(Some(Err(e))) => this.fault.set(fault_of(e)),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    // A client that keeps sending, but too little: behind the rate even with this frame.
                    if this.rate_deadline().is_some_and(|d| Instant::now() > d) {
                        return this.too_slow();
                    }
                }
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
