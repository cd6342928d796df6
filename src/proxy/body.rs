//! The request body on its way upstream: size-limited as it streams, cut when the client stalls in it,
//! and remembering whether *it* failed, so that a broken client body is answered 400/408/413 (the
//! client's fault), not 502/504.

use bytes::Bytes;
use http_body_util::{LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the client's body ended, if it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFault {
    TooLarge,
    Malformed,
    /// No body bytes for the stall limit: a slow-body client (which would otherwise hold an upstream
    /// connection until the upstream timeout, and be counted as the upstream's failure).
    Stalled,
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

pub struct DownstreamBody {
    inner: Limited<Incoming>,
    fault: FaultCell,
    stall_limit: Duration,
    /// Armed the first time the body is not ready, so bodiless requests (never polled) cost no timer.
    stall: Option<Pin<Box<Sleep>>>,
    /// The last poll found no bytes: the stall clock is running.
    waiting: bool,
}

impl DownstreamBody {
    pub fn new(body: Incoming, limit: u64, stall_limit: Duration, fault: FaultCell) -> DownstreamBody {
        DownstreamBody {
            inner: Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)),
            fault,
            stall_limit,
            stall: None,
            waiting: false,
        }
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
                let deadline = Instant::now() + this.stall_limit;
                match &mut this.stall {
                    Some(stall) => stall.as_mut().reset(deadline),
                    None => this.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                this.waiting = true;
            }
            if let Some(stall) = &mut this.stall {
                if stall.as_mut().poll(cx).is_ready() {
                    this.fault.set(BodyFault::Stalled);
                    return Poll::Ready(Some(Err("request body stalled".into())));
                }
            }
            return Poll::Pending;
        }
        this.waiting = false;
        if let Poll::Ready(Some(Err(e))) = &r {
            this.fault.set(if e.downcast_ref::<LengthLimitError>().is_some() {
                BodyFault::TooLarge
            } else {
                BodyFault::Malformed
            });
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
