//! Personal access tokens (`user:…`) are not in Unleash's token list; we ask Unleash about each one
//! (`GET /api/admin/user` with the PAT), but never more than the configured rate, never twice at once
//! for the same PAT, and never again soon for one Unleash already refused.

use super::unleash::{admin_uri, ControlClient};
use super::{Digest, TokenInfo, TokenKind, TokenSource};
use crate::config::Upstream;
use crate::telemetry::Metrics;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::Empty;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub struct PatLimits {
    /// How long a valid PAT is trusted before asking Unleash again.
    pub positive_ttl: Duration,
    pub negative_capacity: u64,
    pub negative_ttl: Duration,
    /// Upstream PAT checks per second, all PATs together.
    pub rate_per_sec: u32,
}

/// Unleash could not be asked about a PAT (down, timing out, answering 5xx).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unavailable;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Miss {
    Invalid,
    RateLimited,
    Upstream,
}

pub struct PatValidator {
    client: ControlClient,
    user_uri: Uri,
    positive: moka::future::Cache<Digest, Arc<TokenInfo>>,
    negative: moka::sync::Cache<Digest, ()>,
    bucket: Mutex<(f64, Instant)>,
    rate: f64,
    metrics: Arc<Metrics>,
}

impl PatValidator {
    pub fn new(
        client: ControlClient,
        upstream: &Upstream,
        limits: PatLimits,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let rate = f64::from(limits.rate_per_sec.max(1));
        Ok(PatValidator {
            client,
            user_uri: admin_uri(upstream, "/api/admin/user")?,
            positive: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(limits.positive_ttl)
                .build(),
            negative: moka::sync::Cache::builder()
                .max_capacity(limits.negative_capacity)
                .time_to_live(limits.negative_ttl)
                .build(),
            bucket: Mutex::new((rate, Instant::now())),
            rate,
            metrics,
        })
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
            Err(e) => match *e {
                Miss::Invalid => {
                    self.negative.insert(digest, ());
                    Ok(None)
                }
                // Over the check budget: treated as unknown, so a flood of junk PATs stays a 401.
                Miss::RateLimited => Ok(None),
                Miss::Upstream => Err(Unavailable),
            },
        }
    }

    fn take_budget(&self) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * self.rate).min(self.rate);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
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
        let mut req = Request::get(self.user_uri.clone())
            .header(ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|_| Miss::Upstream)?;
        req.headers_mut().insert(AUTHORIZATION, value);
        let resp = match tokio::time::timeout(Duration::from_secs(10), self.client.request(req)).await {
            Ok(Ok(r)) => r,
            _ => {
                self.count("error");
                return Err(Miss::Upstream);
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
                Err(Miss::Upstream)
            }
        }
    }
}
