//! Per-token rate limits (token buckets keyed by token digest), configurable per token kind and per
//! named token. Off unless configured. Memory is bounded: buckets live in a capped cache and an idle
//! bucket is forgotten (it would be full again anyway).

use crate::token::{Digest, TokenInfo, TokenKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Buckets kept at most; beyond it the least recently used are dropped (they refill to full).
pub const MAX_BUCKETS: u64 = 100_000;

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

struct Bucket {
    tokens: f64,
    last: Instant,
    rate: Rate,
}

pub struct RateLimiter {
    /// Swapped on reload; the buckets stay, so a reload does not refill every token's bucket (a bucket
    /// whose rate changed starts over under the new one).
    limits: arc_swap::ArcSwap<RateLimits>,
    buckets: moka::sync::Cache<Digest, Arc<Mutex<Bucket>>>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> RateLimiter {
        RateLimiter {
            limits: arc_swap::ArcSwap::from_pointee(limits),
            buckets: moka::sync::Cache::builder()
                .max_capacity(MAX_BUCKETS)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// New limits (config reload).
    pub fn set_limits(&self, limits: RateLimits) {
        self.limits.store(Arc::new(limits));
    }

    /// `Ok` to proceed, or `Err(retry_after)` — the wait until one request's worth has refilled.
    pub fn check(&self, digest: &Digest, info: &TokenInfo) -> Result<(), Duration> {
        let limits = self.limits.load();
        if limits.is_empty() {
            return Ok(());
        }
        let Some(rate) = limits.rate_for(info) else {
            return Ok(());
        };
        let bucket = self.buckets.get_with(*digest, || {
            Arc::new(Mutex::new(Bucket {
                tokens: rate.burst,
                last: Instant::now(),
                rate,
            }))
        });
        let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
        if b.rate != rate {
            // The limit changed on reload: start the token over under the new one.
            *b = Bucket {
                tokens: rate.burst,
                last: Instant::now(),
                rate,
            };
        }
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate.per_second).min(rate.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate.per_second))
        }
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
}
