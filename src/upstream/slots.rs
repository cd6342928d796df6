//! The `upstream_max_inflight` places in front of Unleash. Without them a slow Unleash, or a crowd of
//! event streams, would make the gateway open one upstream connection per waiting client and pile the
//! whole fleet's load onto the flag server just when it is struggling.
//!
//! The pool is shared, so it is also something to fight over: one client connection, one token (a
//! frontend token is public: it ships in every browser bundle) or the anonymous CORS preflights together
//! may each hold only a share of it ([`Owner`]). A request over its owner's share is refused at once
//! instead of queueing: waiting would only let the greedy owner keep what it holds.
//!
//! Taking and giving back a slot is a few atomic adds and never a lock: a request only touches the wait
//! queue (a `Notify`) when every slot is taken. (tokio's `Semaphore` locks its waiter list on every
//! release, which would put a lock on every forwarded request.)

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
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
    /// The per-owner shares ([`Shares`]); a config reload may change them.
    per_connection: AtomicU32,
    per_token: AtomicU32,
    /// Slots held per token, by the token digest's first two bytes. A digest is SHA-256 of a secret,
    /// so two live tokens share a counter (and so a share) with probability 1/65,536; in exchange the
    /// count needs no map, no lock and no allocation per request.
    token_counts: Arc<[AtomicU32]>,
    /// Slots held by anonymous requests (CORS preflights) together.
    anonymous: Arc<AtomicU32>,
}

const TOKEN_COUNTERS: usize = 1 << 16;

/// Who a share of the pool is counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The whole pool (`upstream_max_inflight`): Unleash is slower than the traffic.
    Pool,
    /// One client connection (`upstream_max_inflight_per_connection`).
    Connection,
    /// One token (`upstream_max_inflight_per_token`).
    Token,
    /// Every request without a token (CORS preflights), together; same share as one token.
    Anonymous,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Pool, Scope::Connection, Scope::Token, Scope::Anonymous];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Pool => "pool",
            Scope::Connection => "connection",
            Scope::Token => "token",
            Scope::Anonymous => "anonymous",
        }
    }
}

/// No slot: which limit said no, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Saturated {
    pub scope: Scope,
    pub max: usize,
}

/// The slots one connection holds: one counter per client connection.
#[derive(Clone, Default)]
pub struct ConnShare(Arc<AtomicU32>);

impl ConnShare {
    pub fn held(&self) -> u32 {
        self.0.load(SeqCst)
    }
}

/// What a request's slot is counted against besides the pool.
pub struct Owner<'a> {
    /// `None` for the gateway's own requests on a client's behalf (shield fills): no connection holds them.
    pub connection: Option<&'a ConnShare>,
    /// The token's digest bytes; `None` for an anonymous request.
    pub token: Option<&'a [u8; 32]>,
}

/// The per-owner shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shares {
    pub per_connection: u32,
    pub per_token: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Usage {
    pub taken: usize,
    pub queued: usize,
    pub max: usize,
}

/// One owner's count, taken back when the slot is dropped.
enum Held {
    Token(Arc<[AtomicU32]>, usize),
    Anonymous(Arc<AtomicU32>),
}

impl Held {
    fn counter(&self) -> &AtomicU32 {
        match self {
            Held::Token(all, i) => &all[*i],
            Held::Anonymous(c) => c,
        }
    }
}

/// One slot, held until the response body ends (or the request fails), then given back.
pub struct Slot {
    pool: Arc<Slots>,
    /// `None` for a slot taken for the gateway's own requests (token sync, PAT checks).
    owned: Option<(Option<ConnShare>, Held)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((conn, held)) = &self.owned {
            if let Some(conn) = conn {
                conn.0.fetch_sub(1, SeqCst);
            }
            held.counter().fetch_sub(1, SeqCst);
        }
        self.pool.give_back();
    }
}

/// Counts a queued request out however its wait ends (slot, timeout, or the client going away).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// Adds one to `counter` if that keeps it at or under `cap`.
fn claim(counter: &AtomicU32, cap: u32) -> bool {
    if counter.fetch_add(1, SeqCst) < cap {
        true
    } else {
        counter.fetch_sub(1, SeqCst);
        false
    }
}

impl Slots {
    pub fn new(max: usize, shares: Shares, wait: Duration) -> Arc<Slots> {
        Arc::new(Slots {
            taken: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            max: AtomicUsize::new(max.max(1)),
            wait,
            per_connection: AtomicU32::new(shares.per_connection),
            per_token: AtomicU32::new(shares.per_token),
            token_counts: (0..TOKEN_COUNTERS).map(|_| AtomicU32::new(0)).collect(),
            anonymous: Arc::new(AtomicU32::new(0)),
        })
    }

    fn give_back(&self) {
        let before = self.taken.fetch_sub(1, SeqCst);
        // Only a give-back that frees a place wakes a waiter: undoing an overshoot while every slot is
        // held must not, or queued requests would wake each other in a loop. SeqCst everywhere (a plain
        // load on x86): either this load sees the waiter, or the waiter's retry sees the free place, and
        // the same holds between `resize` and a waiter.
        if before <= self.max.load(SeqCst) && self.waiting.load(SeqCst) > 0 {
            self.freed.notify_one();
        }
    }

    /// Optimistic: one add when a slot is free; an overshoot is undone at once (by the dropped slot).
    fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let slot = Slot {
            pool: self.clone(),
            owned: None,
        };
        (self.taken.fetch_add(1, SeqCst) < self.max.load(SeqCst)).then_some(slot)
    }

    /// A slot for a client's request: first its owner's shares (refused at once when full), then a place
    /// in the pool (queued for the wait when full).
    pub async fn take_for(self: &Arc<Self>, owner: Owner<'_>) -> Result<Slot, Saturated> {
        let shares = self.shares();
        if owner.connection.is_some_and(|c| !claim(&c.0, shares.per_connection)) {
            return Err(Saturated {
                scope: Scope::Connection,
                max: shares.per_connection as usize,
            });
        }
        let conn = owner.connection.cloned();
        let (held, scope) = match owner.token {
            Some(digest) => (
                Held::Token(
                    self.token_counts.clone(),
                    usize::from(u16::from_be_bytes([digest[0], digest[1]])),
                ),
                Scope::Token,
            ),
            None => (Held::Anonymous(self.anonymous.clone()), Scope::Anonymous),
        };
        if !claim(held.counter(), shares.per_token) {
            if let Some(conn) = &conn {
                conn.0.fetch_sub(1, SeqCst);
            }
            return Err(Saturated {
                scope,
                max: shares.per_token as usize,
            });
        }
        // From here the owner's counts are given back by the slot, or by this guard if none comes.
        let owned = OwnedClaim(Some((conn, held)));
        let mut slot = self.take().await?;
        slot.owned = owned.into_inner();
        Ok(slot)
    }

    /// A place in the pool, queued for the wait when every slot is taken.
    pub async fn take(self: &Arc<Self>) -> Result<Slot, Saturated> {
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
                return Err(Saturated {
                    scope: Scope::Pool,
                    max: self.max.load(SeqCst),
                });
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

    /// The per-owner shares in force.
    pub fn shares(&self) -> Shares {
        Shares {
            per_connection: self.per_connection.load(SeqCst),
            per_token: self.per_token.load(SeqCst),
        }
    }

    /// New sizes (config reload). Raising the cap wakes every queued request to retry; lowering it lets
    /// the requests above the new cap finish, and takes effect as they end. Shares apply to new requests.
    pub fn resize(&self, max: usize, shares: Shares) {
        self.per_connection.store(shares.per_connection, SeqCst);
        self.per_token.store(shares.per_token, SeqCst);
        let old = self.max.swap(max.max(1), SeqCst);
        if max > old && self.waiting.load(SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// Owner counts claimed for a request that is still waiting for its pool slot: given back if the wait
/// fails or the client leaves.
struct OwnedClaim(Option<(Option<ConnShare>, Held)>);

impl OwnedClaim {
    fn into_inner(mut self) -> Option<(Option<ConnShare>, Held)> {
        self.0.take()
    }
}

impl Drop for OwnedClaim {
    fn drop(&mut self) {
        if let Some((conn, held)) = &self.0 {
            if let Some(conn) = conn {
                conn.0.fetch_sub(1, SeqCst);
            }
            held.counter().fetch_sub(1, SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIDE: Shares = Shares {
        per_connection: 1000,
        per_token: 1000,
    };
    use std::time::Instant;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_than_the_cap_are_taken_however_many_contend() {
        let slots = Slots::new(3, WIDE, Duration::from_secs(10));
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
        let slots = Slots::new(1, WIDE, Duration::from_secs(5));
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

        let short = Slots::new(1, WIDE, Duration::from_millis(100));
        let _held = short.take().await.unwrap();
        let started = Instant::now();
        assert_eq!(
            short.take().await.err(),
            Some(Saturated {
                scope: Scope::Pool,
                max: 1
            })
        );
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
        let slots = Slots::new(1, WIDE, Duration::from_secs(5));
        let held = slots.take().await.unwrap();
        let queued = queue_behind(&slots).await;
        let started = Instant::now();
        slots.resize(2, WIDE);
        assert!(queued.await.unwrap());
        assert!(started.elapsed() < Duration::from_secs(1), "woken by the resize");

        slots.resize(1, WIDE);
        let short = Slots::new(2, WIDE, Duration::from_millis(100));
        let _a = short.take().await.unwrap();
        short.resize(1, WIDE);
        assert!(short.take().await.is_err(), "the lowered cap applies to new requests");
        drop(held);
    }

    #[tokio::test]
    async fn owner_shares_are_claimed_with_the_slot_and_given_back_however_it_ends() {
        let shares = Shares {
            per_connection: 2,
            per_token: 1,
        };
        let slots = Slots::new(2, shares, Duration::from_millis(50));
        let conn = ConnShare::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let owner = |t| Owner {
            connection: Some(&conn),
            token: t,
        };
        let first = slots.take_for(owner(Some(&a))).await.unwrap();
        let refused = slots.take_for(owner(Some(&a))).await.err();
        assert_eq!(
            refused,
            Some(Saturated {
                scope: Scope::Token,
                max: 1
            })
        );
        assert_eq!(conn.held(), 1, "a refusal gives its connection claim back");
        let anon = slots.take_for(owner(None)).await.unwrap();
        assert_eq!(
            slots.take_for(owner(Some(&b))).await.err(),
            Some(Saturated {
                scope: Scope::Connection,
                max: 2
            })
        );
        let other_conn = ConnShare::default();
        let queued = slots
            .take_for(Owner {
                connection: Some(&other_conn),
                token: Some(&b),
            })
            .await
            .err();
        assert_eq!(
            queued,
            Some(Saturated {
                scope: Scope::Pool,
                max: 2
            }),
            "the pool is full"
        );
        assert_eq!(other_conn.held(), 0, "a failed wait gives the owner's claims back");
        drop((first, anon));
        assert_eq!(conn.held(), 0);
        let again = slots.take_for(owner(Some(&a))).await;
        assert!(again.is_ok(), "the token's share came back with its slot");
    }
}
