//! Phase 2, authenticate: the request's `Authorization` → digest → the store's entry. A miss is the
//! authenticator's to handle, not the proxy's: in Unleash-sync mode a PAT is asked about (rate-capped,
//! coalesced, negatively cached) and any other unknown token may pull the next token sync forward
//! (debounced) and is then looked up once more.

use super::extract::{extract, ExtractError};
use super::metrics::TokenMetrics;
use super::pat::{PatValidator, Unavailable};
use super::store::TokenStore;
use super::unleash::UnleashSync;
use super::{Digest, Fingerprint, TokenInfo};
use http::HeaderMap;
use std::sync::Arc;

/// A token the request presented, and what the store knows of it (`None`: unknown).
pub struct Credential {
    pub digest: Digest,
    pub info: Option<Arc<TokenInfo>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Two `Authorization` headers, or one that is not text.
    #[error(transparent)]
    Malformed(#[from] ExtractError),
    /// A PAT Unleash cannot be asked about is not "unknown": the flag server is unreachable.
    #[error("token {token}: {source}")]
    Unverifiable {
        token: Fingerprint,
        #[source]
        source: Unavailable,
    },
}

/// What a store miss may still consult in Unleash-sync mode.
pub struct UnleashMode {
    pub sync: Arc<UnleashSync>,
    pub pat: PatValidator,
}

pub struct Authenticator {
    store: Arc<TokenStore>,
    unleash: Option<UnleashMode>,
    metrics: TokenMetrics,
}

impl Authenticator {
    pub fn new(store: Arc<TokenStore>, unleash: Option<UnleashMode>, metrics: TokenMetrics) -> Authenticator {
        Authenticator {
            store,
            unleash,
            metrics,
        }
    }

    /// The request's credential, `Ok(None)` when it presents no token.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Credential>, AuthError> {
        let Some(token) = extract(headers)? else {
            return Ok(None);
        };
        let digest = Digest::of(token);
        let mut info = self.store.lookup(&digest);
        let result = if info.is_some() { "hit" } else { "miss" };
        self.metrics.lookups.with_label_values(&[result]).inc();
        if let (None, Some(unleash)) = (&info, &self.unleash) {
            info = if token.starts_with("user:") {
                unleash
                    .pat
                    .check(token, digest)
                    .await
                    .map_err(|source| AuthError::Unverifiable {
                        token: digest.fingerprint(),
                        source,
                    })?
            } else {
                unleash.sync.on_miss().await;
                self.store.lookup(&digest)
            };
        }
        Ok(Some(Credential { digest, info }))
    }
}
