//! The `upstream_max_inflight` places in front of Unleash. Without them a slow Unleash, or a crowd of
//! event streams, would make the gateway open one upstream connection per waiting client and pile the
//! whole fleet's load onto the flag server just when it is struggling.
//!
//! Taking and giving back a slot is one atomic add each and never a lock: a request only touches the
//! wait queue (a `Notify`) when every slot is taken. (tokio's `Semaphore` locks its waiter list on every
//! release, which would put a lock on every forwarded request.)

use crate::error::Rejection;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

pub struct Slots {
    taken: AtomicUsize,
    /// Requests queued for a slot; releases notify only when there are some.
    waiting: AtomicUsize,
    freed: Notify,
    /// The cap; a config reload may change it (requests over a lowered cap finish as they are).
    max: AtomicUsize,
    /// How long a request may queue for a slot: as long as it may wait to connect.
    wait: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Usage {
    pub taken: usize,
    pub queued: usize,
    pub max: usize,
}

/// One slot, held until the response body ends (or the request fails), then given back.
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        let before = self.0.taken.fetch_sub(1, SeqCst);
        // Only a give-back that frees a place wakes a waiter: undoing an overshoot while every slot is
        // held must not, or queued requests would wake each other in a loop. SeqCst everywhere (a plain
        // load on x86): either this load sees the waiter, or the waiter's retry sees the free place, and
        // the same holds between `resize` and a waiter.
        if before <= self.0.max.load(SeqCst) && self.0.waiting.load(SeqCst) > 0 {
            self.0.freed.notify_one();
        }
    }
}

/// Counts a queued request out however its wait ends (slot, timeout, or the client going away).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Slots {
    pub fn new(max: usize, wait: Duration) -> Arc<Slots> {
        Arc::new(Slots {
            taken: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            max: AtomicUsize::new(max.max(1)),
            wait,
        })
    }

    /// Optimistic: one add when a slot is free; an overshoot is undone at once.
    fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let slot = Slot(self.clone());
        (self.taken.fetch_add(1, SeqCst) < self.max.load(SeqCst)).then_some(slot)
    }

    pub async fn take(self: &Arc<Self>) -> Result<Slot, Rejection> {
        if let Some(slot) = self.try_take() {
            return Ok(slot);
        }
        self.waiting.fetch_add(1, SeqCst);
        let _queued = Queued(&self.waiting);
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the retry, so a slot given back after it cannot be missed.
            freed.as_mut().enable();
            if let Some(slot) = self.try_take() {
                return Ok(slot);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Rejection::UpstreamSaturated(self.max.load(SeqCst)));
            }
        }
    }

    /// Slots taken now, requests queued for one, and the cap: for `/metrics`, read at scrape time rather
    /// than kept per request.
    pub fn usage(&self) -> Usage {
        let max = self.max.load(SeqCst);
        Usage {
            taken: self.taken.load(SeqCst).min(max),
            queued: self.waiting.load(SeqCst),
            max,
        }
    }

    /// A new cap (config reload). Raising it wakes every queued request to retry; lowering it lets the
    /// requests above the new cap finish, and takes effect as they end.
    pub fn resize(&self, max: usize) {
        let old = self.max.swap(max.max(1), SeqCst);
        if max > old && self.waiting.load(SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_than_the_cap_are_taken_however_many_contend() {
        let slots = Slots::new(3, Duration::from_secs(10));
        let peak = Arc::new(AtomicUsize::new(0));
        let now = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (slots, peak, now) = (slots.clone(), peak.clone(), now.clone());
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let slot = slots.take().await.expect("a slot within 10 s");
                        let n = now.fetch_add(1, SeqCst) + 1;
                        peak.fetch_max(n, SeqCst);
                        tokio::task::yield_now().await;
                        now.fetch_sub(1, SeqCst);
                        drop(slot);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(peak.load(SeqCst), 3);
        let idle = Usage {
            taken: 0,
            queued: 0,
            max: 3,
        };
        assert_eq!(slots.usage(), idle, "every slot came back");
    }

    /// A request queued for a slot (given 50 ms to queue): resolves to whether it got one.
    async fn queue_behind(slots: &Arc<Slots>) -> tokio::task::JoinHandle<bool> {
        let slots = slots.clone();
        let queued = tokio::spawn(async move { slots.take().await.is_ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        queued
    }

    #[tokio::test]
    async fn a_queued_request_gets_the_next_slot_given_back_or_gives_up_at_the_wait() {
        let slots = Slots::new(1, Duration::from_secs(5));
        let held = slots.take().await.unwrap();
        let queued = queue_behind(&slots).await;
        assert!(!queued.is_finished());
        assert_eq!(slots.usage().queued, 1);
        let started = Instant::now();
        drop(held);
        assert!(queued.await.unwrap());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "woken by the release, not the timeout"
        );

        let short = Slots::new(1, Duration::from_millis(100));
        let _held = short.take().await.unwrap();
        let started = Instant::now();
        assert!(matches!(short.take().await, Err(Rejection::UpstreamSaturated(1))));
        assert!(started.elapsed() >= Duration::from_millis(100));
        let held_only = Usage {
            taken: 1,
            queued: 0,
            max: 1,
        };
        assert_eq!(short.usage(), held_only, "the timed-out request is no longer queued");
    }

    #[tokio::test]
    async fn a_raised_cap_lets_queued_requests_in_at_once_and_a_lowered_one_holds_new_ones_back() {
        let slots = Slots::new(1, Duration::from_secs(5));
        let held = slots.take().await.unwrap();
        let queued = queue_behind(&slots).await;
        let started = Instant::now();
        slots.resize(2);
        assert!(queued.await.unwrap());
        assert!(started.elapsed() < Duration::from_secs(1), "woken by the resize");

        slots.resize(1);
        let short = Slots::new(2, Duration::from_millis(100));
        let _a = short.take().await.unwrap();
        short.resize(1);
        assert!(short.take().await.is_err(), "the lowered cap applies to new requests");
        drop(held);
    }
}
