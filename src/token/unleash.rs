//! The Unleash source: keeps the store equal to Unleash's token list (`GET /api/admin/api-tokens`).
//!
//! Unleash itself lets revoked tokens live for 60-70 s and Edge for an hour; we poll every
//! `sync_interval` with `If-None-Match` (an unchanged list costs a 304, not a parse), and a miss may pull
//! a sync forward — at most once a second across all requests — so a token created a moment ago works on
//! its first request while a flood of junk tokens costs Unleash almost nothing.

use super::metrics::TokenMetrics;
use super::store::{TokenSet, TokenStore};
use super::{snapshot, Digest, TokenInfo, TokenKind, TokenSource};
use crate::config::Secret;
use crate::upstream::{Upstream, UpstreamError};
use http::header::{ACCEPT, AUTHORIZATION, ETAG, IF_NONE_MATCH};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// Largest token list we accept (about a million tokens); anything bigger is an error, not an OOM.
pub const MAX_TOKEN_LIST_BYTES: usize = 512 * 1024 * 1024;
/// Early re-syncs triggered by unknown tokens: at most one per this period, across all requests.
pub const EARLY_SYNC_DEBOUNCE: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_START: Duration = Duration::from_millis(500);
/// How often an unchanged list's confirmation is written next to the snapshot.
const CONFIRM_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("Unleash rejected the upstream token ({0}): check --upstream-token (needs an admin token or a PAT with admin rights)")]
    Rejected(u16),
    #[error("Unleash unreachable: {0}")]
    Unreachable(String),
    #[error("token list request timed out")]
    Timeout,
    #[error("Unleash answered {0}")]
    Status(u16),
    #[error("token list unreadable: {0}")]
    Garbage(String),
}

impl SyncError {
    /// The state for "log once per change": same kind, same state.
    fn kind(&self) -> &'static str {
        match self {
            SyncError::Rejected(_) => "rejected",
            SyncError::Unreachable(_) => "unreachable",
            SyncError::Timeout => "timeout",
            SyncError::Status(_) => "status",
            SyncError::Garbage(_) => "garbage",
        }
    }
}

#[derive(Debug, Deserialize)]
struct TokenList {
    tokens: Vec<ApiToken>,
}

#[derive(Debug, Deserialize)]
struct ApiToken {
    secret: String,
    #[serde(rename = "tokenName")]
    token_name: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    projects: Vec<String>,
    project: Option<String>,
    environment: Option<String>,
    #[serde(rename = "expiresAt")]
    expires_at: Option<String>,
}

/// Parses Unleash's token list into digests and metadata; the secrets are dropped here.
pub fn parse_token_list(body: &[u8]) -> Result<(TokenSet, usize), SyncError> {
    let list: TokenList = serde_json::from_slice(body).map_err(|e| SyncError::Garbage(e.to_string()))?;
    let mut set = TokenSet::with_capacity(list.tokens.len());
    let mut skipped = 0;
    // Most tokens share a handful of project lists; share one allocation per distinct list.
    let mut projects_cache: Vec<Arc<[String]>> = Vec::new();
    for t in list.tokens {
        let Some(kind) = TokenKind::parse_name(&t.kind).filter(|k| *k != TokenKind::Pat) else {
            skipped += 1;
            continue;
        };
        let expires_at = match t.expires_at.as_deref() {
            Some(s) => match super::file::parse_rfc3339(s) {
                Ok(v) => Some(v),
                Err(_) => {
                    skipped += 1;
                    continue;
                }
            },
            None => None,
        };
        let mut projects = t.projects;
        if projects.is_empty() {
            projects.extend(t.project);
        }
        let projects = match projects_cache.iter().find(|p| p[..] == projects[..]) {
            Some(p) => p.clone(),
            None => {
                let p: Arc<[String]> = Arc::from(projects);
                if projects_cache.len() < 64 {
                    projects_cache.push(p.clone());
                }
                p
            }
        };
        let digest = Digest::of(&t.secret);
        set.insert(
            digest,
            Arc::new(TokenInfo {
                kind,
                projects,
                environment: t.environment,
                name: t.token_name,
                expires_at,
                fingerprint: digest.fingerprint(),
                source: TokenSource::Unleash,
            }),
        );
    }
    Ok((set, skipped))
}

/// How fresh the Unleash set is, for `/ready`, metrics and logs.
#[derive(Default)]
pub struct SyncStatus {
    /// Unix milliseconds of the last successful sync (200 or 304) of the set being served — also one
    /// made before a restart, when the set came from the snapshot — 0 if none.
    pub last_success_ms: AtomicI64,
    /// The last attempt failed: misses must not wait for a re-sync that backoff will not start.
    pub failing: AtomicBool,
    /// A sync has succeeded since this process started (false while serving only the snapshot).
    pub synced_since_start: AtomicBool,
}

impl SyncStatus {
    pub fn age_seconds(&self) -> Option<f64> {
        let last = self.last_success_ms.load(Ordering::Acquire);
        (last > 0).then(|| (now_ms() - last).max(0) as f64 / 1000.0)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where the token list lives in Unleash's admin API.
const TOKEN_LIST: &str = "/api/admin/api-tokens";

pub struct UnleashSync {
    upstream: Arc<Upstream>,
    token: HeaderValue,
    interval: Duration,
    store: Arc<TokenStore>,
    metrics: TokenMetrics,
    state_dir: Option<PathBuf>,
    pub status: Arc<SyncStatus>,
    etag: Mutex<Option<HeaderValue>>,
    /// The snapshot on disk (its `written_at`) and when its confirmation was last written.
    snapshot_state: Mutex<(Option<i64>, i64)>,
    wake: Notify,
    done: watch::Sender<u64>,
    last_early: AtomicI64,
    in_flight: AtomicBool,
    started: Instant,
}

impl UnleashSync {
    pub fn new(
        upstream: Arc<Upstream>,
        token: &Secret,
        interval: Duration,
        store: Arc<TokenStore>,
        metrics: TokenMetrics,
        state_dir: Option<PathBuf>,
    ) -> Result<UnleashSync, String> {
        let mut token =
            HeaderValue::from_str(token.expose()).map_err(|_| "upstream token is not visible ASCII".to_string())?;
        token.set_sensitive(true);
        Ok(UnleashSync {
            upstream,
            token,
            interval,
            store,
            metrics,
            state_dir,
            status: Arc::new(SyncStatus::default()),
            etag: Mutex::new(None),
            snapshot_state: Mutex::new((None, 0)),
            wake: Notify::new(),
            done: watch::channel(0).0,
            last_early: AtomicI64::new(-(EARLY_SYNC_DEBOUNCE.as_millis() as i64)),
            in_flight: AtomicBool::new(false),
            started: Instant::now(),
        })
    }

    /// Called on an unknown token. Pulls the next sync forward unless one was pulled forward within the
    /// last second, and then waits (bounded) for it; otherwise returns at once so junk costs nothing.
    pub async fn on_miss(&self) {
        if self.status.failing.load(Ordering::Acquire) {
            return;
        }
        let now = self.started.elapsed().as_millis() as i64;
        let last = self.last_early.load(Ordering::Relaxed);
        if now - last < EARLY_SYNC_DEBOUNCE.as_millis() as i64 {
            return;
        }
        if self
            .last_early
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let mut rx = self.done.subscribe();
        let seen = *rx.borrow_and_update();
        // A sync already under way may have fetched the list before the new token existed: then wait for
        // the one after it, which the notification below starts right away.
        let target = seen + if self.in_flight.load(Ordering::Acquire) { 2 } else { 1 };
        self.wake.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|g| *g >= target)).await;
    }

    /// One fetch-and-apply. Never touches the store on failure.
    pub async fn sync_once(&self) -> Result<&'static str, SyncError> {
        let mut headers = HeaderMap::with_capacity(3);
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(AUTHORIZATION, self.token.clone());
        if let Some(etag) = self.etag.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            headers.insert(IF_NONE_MATCH, etag);
        }
        let resp = match self.upstream.get(TOKEN_LIST, headers, REQUEST_TIMEOUT).await {
            Ok(resp) => resp,
            Err(UpstreamError::Timeout(_)) => return Err(SyncError::Timeout),
            Err(e) => return Err(SyncError::Unreachable(e.detail())),
        };
        match resp.status() {
            StatusCode::NOT_MODIFIED => {
                self.confirm_snapshot().await;
                return Ok("unchanged");
            }
            StatusCode::OK => {}
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => return Err(SyncError::Rejected(s.as_u16())),
            s => return Err(SyncError::Status(s.as_u16())),
        }
        let etag = resp.headers().get(ETAG).cloned();
        let body = tokio::time::timeout(
            REQUEST_TIMEOUT,
            Limited::new(resp.into_body(), MAX_TOKEN_LIST_BYTES).collect(),
        )
        .await
        .map_err(|_| SyncError::Timeout)?
        .map_err(|e| SyncError::Garbage(format!("reading body: {e}")))?
        .to_bytes();
        let (set, skipped) = parse_token_list(&body)?;
        drop(body);
        if skipped > 0 {
            tracing::debug!(skipped, "token list entries of unknown type or bad expiry skipped");
        }
        let snapshot = self.state_dir.clone().map(|dir| (dir, set.clone()));
        let stats = self.store.replace_source(TokenSource::Unleash, set);
        *self.etag.lock().unwrap_or_else(|e| e.into_inner()) = etag;
        if stats.added + stats.updated + stats.removed > 0 {
            tracing::info!(
                tokens = stats.total,
                added = stats.added,
                updated = stats.updated,
                removed = stats.removed,
                "token list synced from Unleash"
            );
        }
        if let Some((dir, set)) = snapshot {
            let synced = now_ms();
            match tokio::task::spawn_blocking(move || snapshot::write(&dir, &set, synced)).await {
                Ok(Ok(written_at)) => {
                    *self.snapshot_state.lock().unwrap_or_else(|e| e.into_inner()) = (Some(written_at), synced)
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "could not write the token snapshot"),
                Err(e) => tracing::warn!(error = %e, "could not write the token snapshot"),
            }
        }
        Ok("ok")
    }

    /// After an unchanged list: records that the snapshot on disk is still Unleash's list, at most once
    /// every [`CONFIRM_EVERY`], so that a restart counts its age from now and not from the last change.
    async fn confirm_snapshot(&self) {
        let Some(dir) = self.state_dir.clone() else { return };
        let now = now_ms();
        let written_at = {
            let mut state = self.snapshot_state.lock().unwrap_or_else(|e| e.into_inner());
            match *state {
                (Some(w), last) if now - last >= CONFIRM_EVERY.as_millis() as i64 => {
                    state.1 = now;
                    w
                }
                _ => return,
            }
        };
        let r = tokio::task::spawn_blocking(move || snapshot::confirm(&dir, written_at, now)).await;
        if let Ok(Err(e)) | Err(e) = r.map_err(std::io::Error::other) {
            tracing::debug!(error = %e, "could not record the token snapshot's confirmation");
        }
    }

    /// Loads the snapshot into the store, used when the first sync fails. The set's age counts from the
    /// sync it came from: an old snapshot is reported as old, in `/ready` and the metrics.
    fn load_snapshot(&self) {
        let Some(dir) = &self.state_dir else { return };
        match snapshot::read(dir) {
            Ok(loaded) => {
                let n = loaded.set.len();
                self.store.replace_source(TokenSource::Unleash, loaded.set);
                self.status
                    .last_success_ms
                    .store(loaded.synced_at_ms, Ordering::Release);
                self.metrics.sync_last_success.set(loaded.synced_at_ms as f64 / 1000.0);
                let age_seconds = (now_ms() - loaded.synced_at_ms).max(0) / 1000;
                tracing::warn!(
                    tokens = n,
                    age_seconds,
                    "Unleash unavailable at start: serving the token snapshot (revocations since its sync are not applied)"
                );
            }
            Err(e) => tracing::warn!(error = %e, "no usable token snapshot"),
        }
    }

    /// The sync loop: runs until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut failing: Option<&'static str> = None;
        let mut backoff = BACKOFF_START;
        let mut first = true;
        loop {
            let started = Instant::now();
            self.in_flight.store(true, Ordering::Release);
            let result = self.sync_once().await;
            self.in_flight.store(false, Ordering::Release);
            self.metrics.sync_duration.observe(started.elapsed().as_secs_f64());
            let delay = match result {
                Ok(label) => {
                    let now = now_ms();
                    self.status.last_success_ms.store(now, Ordering::Release);
                    self.status.synced_since_start.store(true, Ordering::Release);
                    self.metrics.sync_last_success.set(now as f64 / 1000.0);
                    self.metrics.sync.with_label_values(&[label]).inc();
                    if failing.take().is_some() {
                        tracing::info!("token sync recovered");
                    }
                    backoff = BACKOFF_START;
                    self.interval
                }
                Err(e) => {
                    let label = if matches!(e, SyncError::Rejected(_)) {
                        "rejected"
                    } else {
                        "error"
                    };
                    self.metrics.sync.with_label_values(&[label]).inc();
                    if failing != Some(e.kind()) {
                        failing = Some(e.kind());
                        if matches!(e, SyncError::Rejected(_)) {
                            tracing::error!(error = %e, "TOKEN SYNC REJECTED; keeping the last good token set");
                        } else {
                            tracing::warn!(error = %e, "token sync failing; keeping the last good token set and retrying with backoff");
                        }
                    }
                    if first && !self.store.is_loaded() {
                        self.load_snapshot();
                    }
                    let jittered = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
                    backoff = (backoff * 2).min(self.interval.max(Duration::from_secs(30)));
                    jittered
                }
            };
            first = false;
            self.status.failing.store(failing.is_some(), Ordering::Release);
            self.done.send_modify(|g| *g += 1);
            let wake = async {
                // While failing, early re-syncs would only hammer a sick Unleash: wait out the backoff.
                if failing.is_some() {
                    std::future::pending::<()>().await
                } else {
                    self.wake.notified().await
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = wake => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_recorded_token_list_and_drops_secrets() {
        let sample = include_str!("../../tests/data/admin-api-tokens-list.json");
        let (set, skipped) = parse_token_list(sample.as_bytes()).unwrap();
        assert_eq!(skipped, 0);
        assert!(set.len() >= 5);
        let fe = &set[&Digest::of("default:development.anchor-frontend-0123456789abcdef")];
        assert_eq!(fe.kind, TokenKind::Frontend);
        assert_eq!(&fe.projects[..], &["default".to_string()]);
        assert!(set.values().any(|t| t.kind == TokenKind::Admin));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(parse_token_list(b"<html>"), Err(SyncError::Garbage(_))));
        assert!(matches!(
            parse_token_list(b"{\"tokens\": 3}"),
            Err(SyncError::Garbage(_))
        ));
    }
}
