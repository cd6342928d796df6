//! Shield Unleash: SDK feature polls (`GET /api/client/features` with a client/backend token) are
//! answered from a per-token document cache that is revalidated with Unleash's own ETag, so Unleash sees
//! about one request per key per TTL (mostly 304s) instead of every poll, and SDKs keep getting their
//! flags while Unleash is down.
//!
//! Correctness rules (from Unleash Edge's cache bugs, see the research brief):
//! - a document is only ever served to the token that fetched it (the key holds the token's digest),
//!   byte for byte with Unleash's ETag, and whole — never merged, filtered or re-hashed;
//! - authentication and authorization run first: a removed, expired or unknown token gets its 401
//!   from memory even when its key is warm;
//! - after the TTL, ONE revalidation per key runs in its own task (a client that leaves does not cancel
//!   it, and everyone asking meanwhile joins it), with the requesting SDK's own token — so a token
//!   revoked in Unleash is refused at its next revalidation, and Unleash still sees it as "last seen";
//! - on transport errors, timeouts, 5xx and 429, a warm key is served stale (bounded by `max_stale`,
//!   with backoff per key); never in answer to 401/403, which drop the entry;
//! - anything unusual is forwarded exactly as without the shield.
//!
//! moka holds the entries (bounded in bytes, idle keys evicted); the single-flight is ours, because
//! moka's coalescing covers only missing keys and re-runs the init when its caller is dropped.

mod classify;
mod doc;
mod metrics;
mod persist;

pub use classify::{classify, Bypass, Class, Key};
pub use doc::accepts_gzip;

use crate::token::Digest;
use crate::upstream::{Body, Owner, Upstream, UpstreamError};
use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use doc::{Bodies, Doc, NotStored};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use metrics::ShieldMetrics;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

type Cache = moka::sync::Cache<Key, Arc<Entry>>;

/// One token's query variants: each query's hash and when it was last used.
type Variants = VecDeque<(u64, Instant)>;

/// A key's backoff after its first failure, doubling per failure up to the maximum.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The shield's settings that a reload may change.
#[derive(Clone, Debug, PartialEq)]
pub struct Live {
    pub enabled: bool,
    /// A document younger than this is served without asking Unleash.
    pub ttl: Duration,
    /// How long a request waits for a revalidation before it is served the document it has.
    pub revalidate_wait: Duration,
    /// How old (since Unleash last confirmed it) a document may be served while Unleash fails; zero: never.
    pub max_stale: Duration,
    /// Distinct non-empty queries one token may create keys for (within `idle_ttl`).
    pub max_query_variants: usize,
    /// How long a fill may take (the upstream timeout).
    pub upstream_timeout: Duration,
}

/// Settings that need a restart (they size the cache, or say where it is kept).
#[derive(Clone, Debug, PartialEq)]
pub struct Sizes {
    pub max_bytes: u64,
    pub max_entry_bytes: usize,
    pub idle_ttl: Duration,
    /// Persist documents under this state directory (`shield_persist`).
    pub persist_in: Option<std::path::PathBuf>,
}

/// A non-storable answer from Unleash, passed to every request that waited for it.
pub struct Passed {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Passed {
    fn respond(&self) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(self.body.clone()));
        *r.status_mut() = self.status;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// What one fill (or revalidation) came to; every waiter reads the same one.
enum Outcome {
    /// The document as stored now: confirmed by a 304 (`refreshed: false`) or new from a 200.
    Stored { doc: Arc<Doc>, refreshed: bool },
    /// Unleash's answer, not stored (401/403, 404, 429, 5xx, a non-storable 200).
    Passed(Passed),
    /// No answer from Unleash.
    Failed(UpstreamError),
    /// The document is larger than the entry limit: each request forwards on its own.
    TooLarge,
}

/// One key's state. Readers load the document and one atomic; only fills write.
pub struct Entry {
    doc: ArcSwapOption<Doc>,
    /// Unix milliseconds when Unleash last confirmed the document (also before a restart, when it was
    /// restored from disk).
    validated_ms: AtomicU64,
    /// The fill in flight, if any: waiters subscribe to its outcome.
    fill: Mutex<Option<watch::Receiver<Option<Arc<Outcome>>>>>,
    failures: AtomicU32,
    /// No new attempt before this (unix ms): backoff while Unleash fails.
    retry_at_ms: AtomicU64,
    /// The last failure, answered from memory to a cold key during its backoff.
    last_failure: ArcSwapOption<Outcome>,
    /// Unix ms of the last failure: a healthy answer from Unleash since then (to any caller) ends the
    /// backoff, so a recovered Unleash is asked at once instead of after the backoff.
    failed_ms: AtomicU64,
    /// Unleash's document for this key is larger than the entry limit: forwarded from now on.
    too_large: std::sync::atomic::AtomicBool,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            doc: ArcSwapOption::empty(),
            validated_ms: AtomicU64::new(0),
            fill: Mutex::new(None),
            failures: AtomicU32::new(0),
            retry_at_ms: AtomicU64::new(0),
            last_failure: ArcSwapOption::empty(),
            failed_ms: AtomicU64::new(0),
            too_large: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn validated_ms(&self) -> u64 {
        self.validated_ms.load(Ordering::Acquire)
    }

    fn weight(key: &Key, entry: &Arc<Entry>) -> u32 {
        let doc = entry.doc.load().as_ref().map_or(0, |d| d.weight());
        u32::try_from(key.weight() + doc + 256).unwrap_or(u32::MAX)
    }
}

/// How the shield answered, for the access log and metrics.
#[derive(Clone, Copy, Debug)]
pub struct Note {
    pub result: &'static str,
    /// Age of the document served (since Unleash last confirmed it).
    pub age: Option<Duration>,
    /// This request waited on a request to Unleash (its own fill, or one it joined).
    pub asked: bool,
}

/// The shield's answer to one request.
pub enum Served {
    Answer(Response<Full<Bytes>>, Note),
    /// Forward as without the shield.
    Forward(Bypass),
    /// No answer: Unleash failed and nothing may be served stale.
    Failed(UpstreamError, Note),
}

pub struct Shield {
    core: Arc<Core>,
}

struct Core {
    cache: Cache,
    bodies: Arc<Bodies>,
    /// Per token: the non-empty queries it created keys for (hash, last used).
    variants: moka::sync::Cache<Digest, Arc<Mutex<Variants>>>,
    live: ArcSwap<Live>,
    sizes: Sizes,
    upstream: Arc<Upstream>,
    metrics: ShieldMetrics,
    /// Where documents are persisted, when `shield_persist` is on.
    persist: persist::Shared,
}

impl Live {
    pub fn from_config(cfg: &crate::config::Config) -> Live {
        Live {
            enabled: cfg.shield,
            ttl: cfg.shield_ttl,
            revalidate_wait: cfg.shield_revalidate_wait,
            max_stale: cfg.shield_max_stale,
            max_query_variants: cfg.shield_max_query_variants,
            upstream_timeout: cfg.upstream_timeout,
        }
    }
}

impl Sizes {
    pub fn from_config(cfg: &crate::config::Config) -> Sizes {
        Sizes {
            max_bytes: cfg.shield_max_bytes,
            max_entry_bytes: cfg.shield_max_entry_bytes,
            idle_ttl: cfg.shield_idle_ttl,
            persist_in: cfg.state_dir.clone().filter(|_| cfg.shield_persist),
        }
    }
}

impl Shield {
    pub fn new(live: Live, sizes: Sizes, upstream: Arc<Upstream>, registry: &prometheus::Registry) -> Shield {
        let metrics = ShieldMetrics::register(registry);
        let evictions = metrics.evictions.clone();
        let persist: persist::Shared = sizes.persist_in.as_deref().map(|d| Arc::new(persist::Store::new(d)));
        let forget = persist.clone();
        let cache: Cache = moka::sync::Cache::builder()
            .name("shield")
            .max_capacity(sizes.max_bytes)
            .weigher(Entry::weight)
            .time_to_idle(sizes.idle_ttl)
            .eviction_listener(move |key: Arc<Key>, _v, cause| {
                use moka::notification::RemovalCause;
                let cause = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Expired => "expired",
                    RemovalCause::Replaced => return,
                    RemovalCause::Explicit => "explicit",
                };
                evictions.with_label_values(&[cause]).inc();
                // A document gone from memory is gone from disk: a restart must not bring back what was
                // evicted, or what Unleash refused.
                if let Some(store) = &forget {
                    store.remove(&key);
                }
            })
            .build();
        let bodies = Arc::new(Bodies::default());
        ShieldMetrics::watch(registry, cache.clone(), bodies.clone());
        if let Some(store) = &persist {
            let restored = store.load(&bodies);
            let n = restored.len();
            for r in restored {
                let entry = Entry::new();
                entry.doc.store(Some(Arc::new(r.doc)));
                entry.validated_ms.store(r.validated_at_ms, Ordering::Release);
                cache.insert(r.key, Arc::new(entry));
            }
            if n > 0 {
                tracing::info!(documents = n, "feature documents restored from the state directory");
            }
        }
        Shield {
            core: Arc::new(Core {
                cache,
                bodies,
                variants: moka::sync::Cache::builder()
                    .max_capacity(1_000_000)
                    .time_to_idle(sizes.idle_ttl)
                    .build(),
                live: ArcSwap::from_pointee(live),
                sizes,
                upstream,
                metrics,
                persist,
            }),
        }
    }

    /// Applies reloaded settings (on/off, TTL, waits, stale bound, variants).
    pub fn set_live(&self, live: Live) {
        self.core.live.store(Arc::new(live));
    }

    pub fn enabled(&self) -> bool {
        self.core.live.load().enabled
    }

    /// Counts a request that was classified as bypassing before reaching [`Shield::serve`].
    pub fn bypassed(&self, reason: Bypass) {
        let m = &self.core.metrics;
        m.count("bypass");
        m.bypass.with_label_values(&[reason.as_str()]).inc();
    }

    /// Answers a cacheable request (authenticated, authorized, rate-limited: see the proxy), or says
    /// to forward it. `fill` makes the request as it would be forwarded (prepared by the proxy), when a
    /// fill or revalidation starts: it sends exactly that, made conditional and identity-encoded.
    pub async fn serve(&self, key: Key, fill: &Fill<'_>, client_etag: Option<&HeaderValue>, gzip: bool) -> Served {
        let served = self.core.clone().serve(key, fill, client_etag, gzip).await;
        let m = &self.core.metrics;
        match &served {
            Served::Answer(_, note) | Served::Failed(_, note) => {
                m.count(note.result);
                if let Some(age) = note.age {
                    m.served_age.observe(age.as_secs_f64());
                }
            }
            Served::Forward(reason) => {
                m.count("bypass");
                m.bypass.with_label_values(&[reason.as_str()]).inc();
            }
        }
        served
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Wall-clock milliseconds: documents' ages survive a restart through persistence.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, ms)
}

impl Core {
    fn now_ms(&self) -> u64 {
        unix_ms()
    }

    async fn serve(
        self: Arc<Self>,
        key: Key,
        fill: &Fill<'_>,
        client_etag: Option<&HeaderValue>,
        gzip: bool,
    ) -> Served {
        let live = self.live.load_full();
        if !live.enabled {
            return Served::Forward(Bypass::Disabled);
        }
        let entry = match self.cache.get(&key) {
            Some(e) => e,
            None if !self.variant_allowed(&key, &live) => return Served::Forward(Bypass::Variants),
            None => self.cache.get_with(key.clone(), || Arc::new(Entry::new())),
        };
        if entry.too_large.load(Ordering::Relaxed) {
            return Served::Forward(Bypass::TooLarge);
        }
        let now = self.now_ms();
        let doc = entry.doc.load_full();
        let age = |e: &Entry| Duration::from_millis(self.now_ms().saturating_sub(e.validated_ms()));
        let note = |result, e: &Entry| Note {
            result,
            age: Some(age(e)),
            asked: false,
        };
        if let Some(d) = &doc {
            // Fresh: answered from memory, Unleash not asked.
            if age(&entry) < live.ttl {
                let resp = d.respond(client_etag, gzip);
                let result = if resp.status() == StatusCode::NOT_MODIFIED {
                    "hit_304"
                } else {
                    "hit"
                };
                return Served::Answer(resp, note(result, &entry));
            }
        }
        // Backing off after failures — unless Unleash has answered anyone well since — no attempt now:
        // stale for a warm key, the last failure for a cold one.
        let recovered = self.upstream.last_healthy_ms() > entry.failed_ms.load(Ordering::Acquire);
        if now < entry.retry_at_ms.load(Ordering::Acquire) && !recovered {
            if let Some(d) = &doc {
                if age(&entry) <= live.max_stale {
                    return Served::Answer(d.respond(client_etag, gzip), note("stale", &entry));
                }
            }
            if let Some(last) = entry.last_failure.load_full() {
                return asked(self.answer(&last, None, &entry, &live, client_etag, gzip, false), false);
            }
        }
        let Some((rx, leader)) = self.join_or_start(&key, &entry, fill, doc.is_some(), &live) else {
            // The request could not be prepared for Unleash: forwarding will say why.
            return Served::Forward(Bypass::Unprepared);
        };
        let wait = if doc.is_some() {
            live.revalidate_wait
        } else {
            live.upstream_timeout + Duration::from_secs(1)
        };
        let outcome = wait_for(rx, wait).await;
        let served = match outcome {
            Some(o) => self.answer(&o, doc.as_ref(), &entry, &live, client_etag, gzip, leader),
            // The revalidation is slow: the document in hand, if not too old; the fill goes on regardless.
            None => match &doc {
                Some(d) if age(&entry) <= live.max_stale => {
                    Served::Answer(d.respond(client_etag, gzip), note("stale", &entry))
                }
                _ => Served::Failed(
                    UpstreamError::Timeout(live.upstream_timeout),
                    Note {
                        result: "error",
                        age: None,
                        asked: true,
                    },
                ),
            },
        };
        asked(served, true)
    }

    /// A request's answer from an outcome (`had`: the document it had before, if any).
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        outcome: &Outcome,
        had: Option<&Arc<Doc>>,
        entry: &Entry,
        live: &Live,
        client_etag: Option<&HeaderValue>,
        gzip: bool,
        leader: bool,
    ) -> Served {
        let age = Duration::from_millis(self.now_ms().saturating_sub(entry.validated_ms()));
        let stale = |d: &Arc<Doc>| {
            Served::Answer(
                d.respond(client_etag, gzip),
                Note {
                    result: "stale",
                    age: Some(age),
                    asked: false,
                },
            )
        };
        // A failing Unleash: stale if the document in hand is young enough (never after a 401/403).
        let unleash_failing = match outcome {
            Outcome::Failed(_) => true,
            Outcome::Passed(p) => p.status.is_server_error() || p.status == StatusCode::TOO_MANY_REQUESTS,
            Outcome::Stored { .. } | Outcome::TooLarge => false,
        };
        if unleash_failing {
            if let Some(d) = had.filter(|_| age <= live.max_stale && !live.max_stale.is_zero()) {
                return stale(d);
            }
        }
        match outcome {
            Outcome::Stored { doc, refreshed } => {
                let result = match (had.is_some(), *refreshed, leader) {
                    (true, true, _) => "refreshed",
                    (true, false, _) => "revalidated",
                    (false, _, true) => "miss",
                    (false, _, false) => "coalesced",
                };
                Served::Answer(
                    doc.respond(client_etag, gzip),
                    Note {
                        result,
                        age: Some(age),
                        asked: false,
                    },
                )
            }
            Outcome::Passed(p) => Served::Answer(
                p.respond(),
                Note {
                    result: "passed",
                    age: None,
                    asked: false,
                },
            ),
            Outcome::Failed(e) => Served::Failed(
                e.copy(),
                Note {
                    result: "error",
                    age: None,
                    asked: false,
                },
            ),
            Outcome::TooLarge => Served::Forward(Bypass::TooLarge),
        }
    }

    /// At most [`Live::max_query_variants`] distinct non-empty queries per token: a holder of a valid
    /// token cannot fill the cache with `?namePrefix=<random>`.
    fn variant_allowed(&self, key: &Key, live: &Live) -> bool {
        let Some(q) = &key.query else { return true };
        let h = {
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::DefaultHasher::new();
            q.hash(&mut h);
            key.spec.hash(&mut h);
            h.finish()
        };
        let seen = self.variants.get_with(key.token, Default::default);
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(slot) = seen.iter_mut().find(|(x, _)| *x == h) {
            slot.1 = now;
            return true;
        }
        seen.retain(|(_, at)| now.duration_since(*at) < self.sizes.idle_ttl);
        if seen.len() >= live.max_query_variants {
            return false;
        }
        seen.push_back((h, now));
        true
    }

    /// The fill in flight for this key, or a new one started (the caller is then its leader).
    fn join_or_start(
        self: &Arc<Self>,
        key: &Key,
        entry: &Arc<Entry>,
        fill: &Fill<'_>,
        warm: bool,
        live: &Live,
    ) -> Option<(watch::Receiver<Option<Arc<Outcome>>>, bool)> {
        let mut slot = entry.fill.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = slot.as_ref() {
            return Some((rx.clone(), false));
        }
        let request = fill_request(fill()?, entry.doc.load().as_deref().map(|d| &d.etag));
        let (tx, rx) = watch::channel(None);
        *slot = Some(rx.clone());
        drop(slot);
        let core = self.clone();
        let (key, entry) = (key.clone(), entry.clone());
        let timeout = live.upstream_timeout;
        // Spawned: a client that leaves does not cancel the fill others wait for.
        tokio::spawn(async move {
            let outcome = core.fetch(&key, &entry, request, timeout, warm).await;
            *entry.fill.lock().unwrap_or_else(|e| e.into_inner()) = None;
            let _ = tx.send(Some(outcome));
        });
        Some((rx, true))
    }

    /// One request to Unleash for `key`, and what it means for the entry.
    async fn fetch(
        &self,
        key: &Key,
        entry: &Arc<Entry>,
        req: Request<Body>,
        timeout: Duration,
        warm: bool,
    ) -> Arc<Outcome> {
        let kind = if warm { "revalidate" } else { "fill" };
        let count = |status: &str| self.metrics.upstream.with_label_values(&[kind, status]).inc();
        let owner = Owner {
            connection: None,
            token: Some(&key.token.0),
        };
        let result = match self.upstream.slot(owner).await {
            Ok(slot) => self.upstream.send(req, slot, timeout).await.0,
            Err(e) => Err(e),
        };
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                count("transport");
                return self.failed(entry, Outcome::Failed(e));
            }
        };
        let status = resp.status();
        count(match status.as_u16() {
            200 => "200",
            304 => "304",
            400..=499 => "4xx",
            _ => "5xx",
        });
        let (parts, body) = resp.into_parts();
        let live = self.live.load();
        if status == StatusCode::NOT_MODIFIED {
            if let Some(doc) = entry.doc.load_full() {
                let before = entry.validated_ms();
                self.confirmed(entry);
                self.persist_confirmation(key, &doc, before, entry.validated_ms());
                return Arc::new(Outcome::Stored { doc, refreshed: false });
            }
        }
        let limit = if status == StatusCode::OK {
            self.sizes.max_entry_bytes
        } else {
            1 << 20
        };
        let read = tokio::time::timeout(live.upstream_timeout, Limited::new(body, limit).collect()).await;
        let bytes = match read {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                self.not_stored(NotStored::TooLarge);
                entry.too_large.store(true, Ordering::Relaxed);
                return Arc::new(Outcome::TooLarge);
            }
            Ok(Err(e)) => {
                self.not_stored(NotStored::Truncated);
                return self.failed(entry, Outcome::Failed(UpstreamError::Protocol(e)));
            }
            Err(_) => {
                self.not_stored(NotStored::Truncated);
                return self.failed(entry, Outcome::Failed(UpstreamError::Timeout(live.upstream_timeout)));
            }
        };
        let passed = |headers: &HeaderMap| Passed {
            status,
            headers: doc::passed(headers),
            body: bytes.clone(),
        };
        match status.as_u16() {
            200 => match doc::storable(&parts.headers) {
                Ok(etag) => {
                    let doc = Arc::new(Doc::new(
                        self.bodies.intern(bytes.clone()),
                        etag,
                        doc::replayed(&parts.headers),
                    ));
                    entry.doc.store(Some(doc.clone()));
                    self.confirmed(entry);
                    // Re-inserted so that the cache weighs the entry with its new document.
                    self.cache.insert(key.clone(), entry.clone());
                    self.persist_doc(key, &doc, entry.validated_ms());
                    Arc::new(Outcome::Stored { doc, refreshed: true })
                }
                Err(reason) => {
                    self.not_stored(reason);
                    Arc::new(Outcome::Passed(passed(&parts.headers)))
                }
            },
            // Unleash refuses the token now: the document goes, and nothing is served stale for it.
            401 | 403 => {
                entry.doc.store(None);
                self.cache.invalidate(key);
                self.not_stored(NotStored::Status);
                Arc::new(Outcome::Passed(passed(&parts.headers)))
            }
            429 | 500..=599 => {
                self.not_stored(NotStored::Status);
                self.failed(entry, Outcome::Passed(passed(&parts.headers)))
            }
            // Another answer (404: the route or version is wrong): passed on, the document dropped.
            _ => {
                entry.doc.store(None);
                self.not_stored(NotStored::Status);
                Arc::new(Outcome::Passed(passed(&parts.headers)))
            }
        }
    }

    /// Writes a new document to disk, off the request path (this runs in the fill's task).
    fn persist_doc(&self, key: &Key, doc: &Arc<Doc>, at: u64) {
        let Some(store) = self.persist.clone() else { return };
        let (key, doc) = (key.clone(), doc.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.save(&key, &doc, at) {
                tracing::warn!(error = %e, "could not persist a feature document");
            }
        });
    }

    /// Records a 304 beside the persisted document, at most once a minute per key.
    fn persist_confirmation(&self, key: &Key, doc: &Arc<Doc>, before: u64, at: u64) {
        let Some(store) = self.persist.clone() else { return };
        if at.saturating_sub(before) < persist::CONFIRM_EVERY_MS && before != 0 {
            return;
        }
        let (key, etag) = (key.clone(), doc.etag.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.confirm(&key, &etag, at) {
                tracing::debug!(error = %e, "could not record a feature document's confirmation");
            }
        });
    }

    fn not_stored(&self, reason: NotStored) {
        self.metrics.not_stored.with_label_values(&[reason.as_str()]).inc();
    }

    /// Unleash confirmed the document now: fresh for another TTL, failures forgotten.
    fn confirmed(&self, entry: &Entry) {
        entry.validated_ms.store(self.now_ms(), Ordering::Release);
        entry.failures.store(0, Ordering::Release);
        entry.retry_at_ms.store(0, Ordering::Release);
        entry.last_failure.store(None);
    }

    /// Unleash failed: back off this key (1 s, doubling per failure, at most 60 s, ±10 %: at most one
    /// attempt per key per window, however many SDKs poll it), and remember the failure.
    fn failed(&self, entry: &Entry, outcome: Outcome) -> Arc<Outcome> {
        let failures = entry.failures.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let backoff = BACKOFF_START
            .saturating_mul(1u32 << (failures - 1).min(16))
            .min(BACKOFF_MAX)
            .mul_f64(0.9 + fastrand::f64() * 0.2);
        entry.retry_at_ms.store(self.now_ms() + ms(backoff), Ordering::Release);
        entry.failed_ms.store(self.now_ms(), Ordering::Release);
        let outcome = Arc::new(outcome);
        entry.last_failure.store(Some(outcome.clone()));
        outcome
    }
}

/// Makes the request a fill sends, as the proxy would prepare it (`None`: it cannot be).
pub type Fill<'a> = dyn Fn() -> Option<Request<Body>> + Send + Sync + 'a;

/// The fill's request: the prepared request, without a body, asking for identity bytes, conditional on
/// the stored ETag when there is one, without cookies.
fn fill_request(mut req: Request<Body>, etag: Option<&HeaderValue>) -> Request<Body> {
    let h = req.headers_mut();
    h.remove(header::COOKIE);
    h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    match etag {
        Some(e) => {
            h.insert(header::IF_NONE_MATCH, e.clone());
        }
        None => {
            h.remove(header::IF_NONE_MATCH);
        }
    }
    req
}

/// Marks whether the answer came after asking Unleash.
fn asked(mut served: Served, yes: bool) -> Served {
    if let Served::Answer(_, note) | Served::Failed(_, note) = &mut served {
        note.asked = yes;
    }
    served
}

/// The outcome, once the fill has one, or `None` after `wait`.
async fn wait_for(mut rx: watch::Receiver<Option<Arc<Outcome>>>, wait: Duration) -> Option<Arc<Outcome>> {
    match tokio::time::timeout(wait, rx.wait_for(|o| o.is_some())).await {
        Ok(Ok(o)) => o.clone(),
        _ => None,
    }
}
