//! A mock of Unleash's `GET /api/client/features`, as 7.5.1 answers it: the document and its strong
//! ETag depend on the token, `Unleash-Client-Spec` and the query; `If-None-Match` equal to the ETag gets
//! a 304 with no headers at all; and the test can change the revision, refuse a token, or make it fail.

use super::upstream::{full, json, upstream, MockBody, MockUpstream, Recorded};
use http::{Response, StatusCode};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct FeatureState {
    pub revision: AtomicU64,
    /// 0: healthy; otherwise the status every features request gets.
    pub failure: AtomicU16,
    /// Tokens Unleash refuses (401), as after a revocation.
    pub revoked: Mutex<HashSet<String>>,
    /// Documents padded past 1 KiB (gzip is offered only from there).
    pub large: AtomicBool,
    /// Extra response headers on every 200 (e.g. `set-cookie`, `cache-control`), or an ETag left out.
    pub extra: Mutex<Vec<(String, String)>>,
    pub no_etag: AtomicBool,
}

pub struct Features {
    pub up: MockUpstream,
    pub state: Arc<FeatureState>,
}

impl Features {
    pub fn url(&self) -> String {
        self.up.url()
    }
    /// Feature requests Unleash received.
    pub fn polls(&self) -> Vec<Recorded> {
        self.up
            .seen()
            .into_iter()
            .filter(|r| r.path() == "/api/client/features")
            .collect()
    }
    pub fn bump(&self) {
        self.state.revision.fetch_add(1, Ordering::SeqCst);
    }
}

/// The document Unleash would send this token for this spec and query, at `rev`.
pub fn document(token: &str, spec: Option<&str>, query: Option<&str>, rev: u64, large: bool) -> String {
    let pad = if large { "x".repeat(2048) } else { String::new() };
    serde_json::json!({
        "version": 2,
        // Named after a hash of the token, not the token: a test can look for the secret on disk.
        "features": [{"name": format!("flag-for-{}", short_hash(token)), "enabled": rev % 2 == 0, "pad": pad}],
        "query": {"inlineSegmentConstraints": spec.is_none(), "q": query},
        "meta": {"revisionId": rev},
    })
    .to_string()
}

fn short_hash(s: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    s.hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}

/// Its ETag: strong, like Unleash's `"<queryHash>:<revision>:v1"`.
pub fn etag(token: &str, spec: Option<&str>, query: Option<&str>, rev: u64) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (token, spec, query).hash(&mut h);
    format!("\"{:x}:{rev}:v1\"", h.finish())
}

fn answer(s: &FeatureState, r: &Recorded) -> Response<MockBody> {
    let token = r.header("authorization").unwrap_or("").to_string();
    if s.revoked.lock().unwrap().contains(&token) {
        return json(StatusCode::UNAUTHORIZED, r#"{"message":"Invalid token"}"#);
    }
    match s.failure.load(Ordering::SeqCst) {
        0 => {}
        code => return json(StatusCode::from_u16(code).unwrap(), r#"{"message":"down"}"#),
    }
    let spec = r.header("unleash-client-spec");
    if spec.is_some_and(|v| v.split('.').count() != 3 || !v.split('.').all(|p| p.parse::<u32>().is_ok())) {
        return json(StatusCode::BAD_REQUEST, r#"{"name":"BadDataError"}"#);
    }
    let query = r.target.split_once('?').map(|(_, q)| q);
    let rev = s.revision.load(Ordering::SeqCst);
    let tag = etag(&token, spec, query, rev);
    if r.header("if-none-match") == Some(tag.as_str()) {
        // Unleash strips every header from its 304, the ETag included.
        return Response::builder().status(304).body(full("")).unwrap();
    }
    let mut b = Response::builder()
        .header("content-type", "application/json; charset=utf-8")
        .header("x-content-type-options", "nosniff")
        .header("vary", "Accept-Encoding");
    if !s.no_etag.load(Ordering::SeqCst) {
        b = b.header("etag", tag);
    }
    for (k, v) in s.extra.lock().unwrap().iter() {
        b = b.header(k.as_str(), v.as_str());
    }
    let body = document(&token, spec, query, rev, s.large.load(Ordering::SeqCst));
    b.body(full(body)).unwrap()
}

/// A mock Unleash answering feature polls (after `delay`, if given) and `{"ok":true}` elsewhere.
pub async fn features(delay: Option<std::time::Duration>) -> Features {
    let state = Arc::new(FeatureState::default());
    let s = state.clone();
    let mut b = upstream().route("/api/client/features", move |r| answer(&s, r));
    if let Some(d) = delay {
        b = b.delay("/api/client/features", d);
    }
    let up = b.route("*", |_| super::upstream::ok_json(r#"{"ok":true}"#)).run().await;
    Features { up, state }
}
