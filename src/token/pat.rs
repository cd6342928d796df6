//! Personal access tokens (`user:…`) are not in Unleash's token list; we ask Unleash about each one
//! (`GET /api/admin/user` with the PAT), but never more than the configured rate, never twice at once
//! for the same PAT, and never again soon for one Unleash already refused.

use super::metrics::TokenMetrics;
use super::{Digest, TokenInfo, TokenKind, TokenSource};
use crate::upstream::{Upstream, UpstreamError};
use http::header::{ACCEPT, AUTHORIZATION};
use http::{HeaderMap, HeaderValue, StatusCode};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub struct PatLimits {
    /// How long a valid PAT is trusted before asking Unleash again.
    pub positive_ttl: Duration,
    pub negative_capacity: u64,
    pub negative_ttl: Duration,
    /// Upstream PAT checks per second, all PATs together.
    pub rate_per_sec: u32,
}

/// Unleash could not be asked about a PAT: down, timing out (the cause), or answering 5xx (`None`).
#[derive(Debug, thiserror::Error)]
#[error("personal access token could not be validated: Unleash unavailable")]
pub struct Unavailable(#[source] pub Option<Arc<UpstreamError>>);

#[derive(Debug)]
enum Miss {
    Invalid,
    RateLimited,
    Upstream(Option<Arc<UpstreamError>>),
}

/// Where Unleash answers who a PAT belongs to.
const WHO_AM_I: &str = "/api/admin/user";

pub struct PatValidator {
    upstream: Arc<Upstream>,
    positive: moka::future::Cache<Digest, Arc<TokenInfo>>,
    negative: moka::sync::Cache<Digest, ()>,
    /// The check budget: `pat_rate_limit` a second, all PATs together.
    budget: governor::DefaultDirectRateLimiter,
    metrics: TokenMetrics,
}

impl PatValidator {
    pub fn new(upstream: Arc<Upstream>, limits: PatLimits, metrics: TokenMetrics) -> PatValidator {
        let rate = std::num::NonZeroU32::new(limits.rate_per_sec.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
        PatValidator {
            upstream,
            positive: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(limits.positive_ttl)
                .build(),
            negative: moka::sync::Cache::builder()
                .max_capacity(limits.negative_capacity)
                .time_to_live(limits.negative_ttl)
                .build(),
            budget: governor::RateLimiter::direct(governor::Quota::per_second(rate)),
            metrics,
        }
    }

    /// The store entry for a PAT, asking Unleash if needed. `Ok(None)` means "deny as unknown";
    /// `Err(Unavailable)` that Unleash could not be asked, so the PAT is neither known good nor bad.
    pub async fn check(&self, token: &str, digest: Digest) -> Result<Option<Arc<TokenInfo>>, Unavailable> {
        if self.negative.contains_key(&digest) {
            self.count("cached_invalid");
            return Ok(None);
        }
        if let Some(hit) = self.positive.get(&digest).await {
            return Ok(Some(hit));
        }
        // Concurrent misses for the same PAT share this one future (moka's get-with coalescing).
        let result = self.positive.try_get_with(digest, self.validate(token, digest)).await;
        match result {
            Ok(info) => Ok(Some(info)),
            Err(e) => match &*e {
                Miss::Invalid => {
                    self.negative.insert(digest, ());
                    Ok(None)
                }
                // Over the check budget: treated as unknown, so a flood of junk PATs stays a 401.
                Miss::RateLimited => Ok(None),
                Miss::Upstream(cause) => Err(Unavailable(cause.clone())),
            },
        }
    }

    fn take_budget(&self) -> bool {
        self.budget.check().is_ok()
    }

    fn count(&self, result: &str) {
        self.metrics.pat_validations.with_label_values(&[result]).inc();
    }

    async fn validate(&self, token: &str, digest: Digest) -> Result<Arc<TokenInfo>, Miss> {
        if !self.take_budget() {
            self.count("rate_limited");
            return Err(Miss::RateLimited);
        }
        let mut value = HeaderValue::from_str(token).map_err(|_| Miss::Invalid)?;
        value.set_sensitive(true);
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(AUTHORIZATION, value);
        let resp = match self.upstream.get(WHO_AM_I, headers, Duration::from_secs(10)).await {
            Ok(r) => r,
            Err(e) => {
                self.count("error");
                return Err(Miss::Upstream(Some(Arc::new(e))));
            }
        };
        match resp.status() {
            StatusCode::OK => {
                self.count("valid");
                Ok(Arc::new(TokenInfo {
                    kind: TokenKind::Pat,
                    projects: Arc::from(vec!["*".to_string()]),
                    environment: None,
                    name: None,
                    expires_at: None,
                    fingerprint: digest.fingerprint(),
                    source: TokenSource::Unleash,
                }))
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                self.count("invalid");
                Err(Miss::Invalid)
            }
            _ => {
                self.count("error");
                Err(Miss::Upstream(None))
            }
        }
    }
}
