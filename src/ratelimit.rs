//! Per-token rate limits (GCRA, keyed by token digest, from `governor`), configurable per token kind and
//! per named token. Off unless configured. Memory stays bounded: only known tokens are ever checked
//! (unknown ones are refused before), and a periodic sweep forgets the keys that are back to full.

use crate::token::{Digest, TokenInfo, TokenKind};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    /// `RATE` or `RATE:BURST` (burst defaults to twice the rate, at least 1), e.g. `50:100`.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let (r, b) = match s.split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let bad = || format!("`{s}` is not RATE or RATE:BURST with positive numbers, e.g. 50:100");
        let per_second: f64 = r.trim().trim_end_matches("/s").parse().map_err(|_| bad())?;
        let burst: f64 = match b {
            Some(b) => b.trim().parse().map_err(|_| bad())?,
            None => (per_second * 2.0).max(1.0),
        };
        if !(per_second > 0.0 && burst >= 1.0 && per_second.is_finite() && burst.is_finite()) {
            return Err(bad());
        }
        Ok(Rate { per_second, burst })
    }
}

/// The limits in force: per kind, and per token name (which wins).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateLimits {
    pub per_kind: HashMap<TokenKind, Rate>,
    pub per_name: HashMap<String, Rate>,
}

impl RateLimits {
    pub fn is_empty(&self) -> bool {
        self.per_kind.is_empty() && self.per_name.is_empty()
    }

    fn rate_for(&self, info: &TokenInfo) -> Option<Rate> {
        info.name
            .as_deref()
            .and_then(|n| self.per_name.get(n))
            .or_else(|| self.per_kind.get(&info.kind))
            .copied()
    }
}

/// One GCRA limiter per distinct rate, keyed by token digest (governor: one atomic per key, no lock).
type Keyed = governor::RateLimiter<
    Digest,
    governor::state::keyed::DefaultKeyedStateStore<Digest>,
    governor::clock::DefaultClock,
>;

/// A rate as a map key (the float's bits: rates come from the configuration, never from arithmetic).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct RateKey(u64, u64);

impl From<Rate> for RateKey {
    fn from(r: Rate) -> RateKey {
        RateKey(r.per_second.to_bits(), r.burst.to_bits())
    }
}

struct State {
    limits: RateLimits,
    limiters: HashMap<RateKey, Arc<Keyed>>,
}

/// Per-token limits. The limiters live across reloads: a reload that keeps a rate keeps its tokens'
/// state (no bucket refills), one that changes a rate starts its tokens over under the new one.
pub struct RateLimiter {
    state: arc_swap::ArcSwap<State>,
    /// Checks since the last sweep of keys whose state is back to full.
    checks: std::sync::atomic::AtomicU64,
}

/// Checks between two sweeps of idle keys (each sweep drops the keys that are fully refilled).
const SWEEP_EVERY: u64 = 1 << 16;

fn quota(r: Rate) -> Option<governor::Quota> {
    let burst = std::num::NonZeroU32::new(r.burst.round().clamp(1.0, f64::from(u32::MAX)) as u32)?;
    let period = Duration::try_from_secs_f64(1.0 / r.per_second).ok()?;
    Some(governor::Quota::with_period(period)?.allow_burst(burst))
}

fn build(limits: RateLimits, old: Option<&State>) -> State {
    let rates = limits.per_kind.values().chain(limits.per_name.values()).copied();
    let mut limiters = HashMap::new();
    for r in rates {
        let key = RateKey::from(r);
        let kept = old.and_then(|o| o.limiters.get(&key)).cloned();
        if let Some(l) = kept.or_else(|| quota(r).map(|q| Arc::new(Keyed::dashmap(q)))) {
            limiters.insert(key, l);
        }
    }
    State { limits, limiters }
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> RateLimiter {
        RateLimiter {
            state: arc_swap::ArcSwap::from_pointee(build(limits, None)),
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// New limits (config reload): limiters for rates that stay are kept, with their tokens' state.
    pub fn set_limits(&self, limits: RateLimits) {
        let old = self.state.load();
        self.state.store(Arc::new(build(limits, Some(&old))));
    }

    /// `Ok` to proceed, or `Err(retry_after)` — the wait until one request's worth has refilled.
    pub fn check(&self, digest: &Digest, info: &TokenInfo) -> Result<(), Duration> {
        let state = self.state.load();
        if state.limits.is_empty() {
            return Ok(());
        }
        let Some(rate) = state.limits.rate_for(info) else {
            return Ok(());
        };
        let Some(limiter) = state.limiters.get(&RateKey::from(rate)) else {
            return Ok(());
        };
        if self.checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            for l in state.limiters.values() {
                l.retain_recent();
            }
        }
        use governor::clock::Clock;
        limiter
            .check_key(digest)
            .map_err(|not_until| not_until.wait_time_from(governor::clock::DefaultClock::default().now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenSource;

    fn info(kind: TokenKind, name: Option<&str>) -> TokenInfo {
        TokenInfo {
            kind,
            projects: Arc::from(Vec::new()),
            environment: None,
            name: name.map(String::from),
            expires_at: None,
            fingerprint: Digest::of("x").fingerprint(),
            source: TokenSource::File,
        }
    }

    #[test]
    fn parses_rates() {
        assert_eq!(
            Rate::parse("50:100"),
            Ok(Rate {
                per_second: 50.0,
                burst: 100.0
            })
        );
        assert_eq!(
            Rate::parse("10/s"),
            Ok(Rate {
                per_second: 10.0,
                burst: 20.0
            })
        );
        for bad in ["", "0", "-1", "x", "5:0", "inf"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn burst_then_refusal_with_retry_after_and_isolation_between_tokens() {
        let mut limits = RateLimits::default();
        limits.per_kind.insert(
            TokenKind::Frontend,
            Rate {
                per_second: 10.0,
                burst: 3.0,
            },
        );
        limits.per_name.insert(
            "vip".into(),
            Rate {
                per_second: 1000.0,
                burst: 1000.0,
            },
        );
        let rl = RateLimiter::new(limits);
        let (a, b) = (Digest::of("a"), Digest::of("b"));
        let fe = info(TokenKind::Frontend, None);
        for _ in 0..3 {
            assert!(rl.check(&a, &fe).is_ok());
        }
        let wait = rl.check(&a, &fe).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        assert!(rl.check(&b, &fe).is_ok(), "another token has its own bucket");
        assert!(
            rl.check(&a, &info(TokenKind::Client, None)).is_ok(),
            "no limit for client tokens"
        );
        let vip = info(TokenKind::Frontend, Some("vip"));
        let c = Digest::of("c");
        for _ in 0..100 {
            assert!(rl.check(&c, &vip).is_ok(), "per-name limit wins over the kind's");
        }
        std::thread::sleep(Duration::from_millis(120));
        assert!(rl.check(&a, &fe).is_ok(), "refilled");
    }

    #[test]
    fn a_reload_keeps_the_state_of_rates_that_stay_and_starts_changed_ones_over() {
        let limits = |burst: f64| {
            let mut l = RateLimits::default();
            l.per_kind.insert(TokenKind::Client, Rate { per_second: 0.5, burst });
            l
        };
        let rl = RateLimiter::new(limits(2.0));
        let (d, client) = (Digest::of("a"), info(TokenKind::Client, None));
        assert!(rl.check(&d, &client).is_ok());
        assert!(rl.check(&d, &client).is_ok());
        assert!(rl.check(&d, &client).is_err(), "burst spent");
        rl.set_limits(limits(2.0));
        assert!(
            rl.check(&d, &client).is_err(),
            "an unchanged reload must not refill the bucket"
        );
        rl.set_limits(limits(3.0));
        assert!(rl.check(&d, &client).is_ok(), "a changed rate starts over");
    }
}
