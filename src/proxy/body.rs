//! The request body on its way upstream: size-limited as it streams, and remembering whether *it*
//! failed, so that a broken client body is answered 400/413 (the client's fault), not 502.

use bytes::Bytes;
use http_body_util::{LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the client's body ended, if it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFault {
    TooLarge,
    Malformed,
}

#[derive(Clone, Default)]
pub struct FaultCell(Arc<AtomicU8>);

impl FaultCell {
    pub fn get(&self) -> Option<BodyFault> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(BodyFault::TooLarge),
            2 => Some(BodyFault::Malformed),
            _ => None,
        }
    }
    fn set(&self, f: BodyFault) {
        self.0
            .store(if f == BodyFault::TooLarge { 1 } else { 2 }, Ordering::Release);
    }
}

pub struct DownstreamBody {
    inner: Limited<Incoming>,
    fault: FaultCell,
}

impl DownstreamBody {
    pub fn new(body: Incoming, limit: u64, fault: FaultCell) -> DownstreamBody {
        DownstreamBody {
            inner: Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)),
            fault,
        }
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
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
