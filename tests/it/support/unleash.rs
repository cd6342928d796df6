//! A mock Unleash control plane on top of the recording upstream: a token list with a weak ETag that
//! changes with its content, `/api/admin/user` for PATs, and a switch that makes it fail.

use super::upstream::{json, ok_json, upstream, MockUpstream};
use http::StatusCode;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub const SYNC_TOKEN: &str = "*:*.sync-admin-token-0123456789abcdef";

#[derive(Default)]
pub struct UnleashState {
    /// (secret, type, expiresAt)
    tokens: Mutex<Vec<(String, String, Option<String>)>>,
    version: AtomicU64,
    /// 0 = healthy; otherwise the status the token list answers with.
    pub failure: AtomicU16,
    pub pats: Mutex<HashSet<String>>,
}

impl UnleashState {
    pub fn add(&self, secret: &str, kind: &str, expires_at: Option<&str>) {
        self.tokens
            .lock()
            .unwrap()
            .push((secret.into(), kind.into(), expires_at.map(String::from)));
        self.version.fetch_add(1, Ordering::SeqCst);
    }
    pub fn remove(&self, secret: &str) {
        self.tokens.lock().unwrap().retain(|t| t.0 != secret);
        self.version.fetch_add(1, Ordering::SeqCst);
    }
    fn list_json(&self) -> String {
        let tokens: Vec<serde_json::Value> = self
            .tokens
            .lock()
            .unwrap()
            .iter()
            .map(|(s, k, e)| {
                serde_json::json!({"secret": s, "tokenName": "t", "type": k, "project": "*", "projects": ["*"],
                    "environment": "development", "expiresAt": e, "createdAt": "2026-11-28T08:21:35.874Z",
                    "alias": null, "seenAt": null})
            })
            .collect();
        serde_json::json!({ "tokens": tokens }).to_string()
    }
}

pub struct MockUnleash {
    pub up: MockUpstream,
    pub state: Arc<UnleashState>,
}

impl MockUnleash {
    pub fn url(&self) -> String {
        self.up.url()
    }
    fn count_where(&self, f: impl Fn(&super::Recorded) -> bool) -> usize {
        self.up.seen().iter().filter(|r| f(r)).count()
    }
    /// Token-list fetches so far.
    pub fn list_fetches(&self) -> usize {
        self.count_where(|r| r.path() == "/api/admin/api-tokens")
    }
    /// PAT checks so far.
    pub fn pat_checks(&self) -> usize {
        self.count_where(|r| r.path() == "/api/admin/user")
    }
    /// Requests that were neither token-list fetches nor PAT checks: forwarded traffic.
    pub fn forwarded(&self) -> usize {
        self.count_where(|r| r.path() != "/api/admin/api-tokens" && r.path() != "/api/admin/user")
    }
}

pub async fn mock_unleash() -> MockUnleash {
    mock_unleash_on(upstream()).await
}

/// The same mock Unleash, served over HTTPS with this config (`support::tls::server_config`).
pub async fn mock_unleash_tls(config: rustls::ServerConfig) -> MockUnleash {
    mock_unleash_on(upstream().tls(config)).await
}

async fn mock_unleash_on(builder: super::upstream::Builder) -> MockUnleash {
    let state = Arc::new(UnleashState::default());
    let (s1, s2) = (state.clone(), state.clone());
    let up = builder
        .route("/api/admin/api-tokens", move |r| {
            if r.header("authorization") != Some(SYNC_TOKEN) {
                return json(
                    StatusCode::UNAUTHORIZED,
                    r#"{"name":"UnauthorizedError","message":"You must log in to use Unleash."}"#,
                );
            }
            match s1.failure.load(Ordering::SeqCst) {
                0 => {}
                200 => return ok_json("<html>garbage</html>"),
                code => return json(StatusCode::from_u16(code).unwrap(), r#"{"message":"down"}"#),
            }
            let etag = format!("W/\"v{}\"", s1.version.load(Ordering::SeqCst));
            if r.header("if-none-match") == Some(etag.as_str()) {
                return http::Response::builder()
                    .status(304)
                    .header("etag", etag)
                    .body(super::upstream::full(""))
                    .unwrap();
            }
            let mut resp = ok_json(&s1.list_json());
            resp.headers_mut().insert("etag", etag.parse().unwrap());
            resp
        })
        .route("/api/admin/user", move |r| {
            let failure = s2.failure.load(Ordering::SeqCst);
            if failure >= 500 {
                return json(StatusCode::from_u16(failure).unwrap(), r#"{"message":"down"}"#);
            }
            let ok = r
                .header("authorization")
                .is_some_and(|a| s2.pats.lock().unwrap().contains(a));
            if ok {
                ok_json(r#"{"user":{"id":1,"username":"admin"},"permissions":[{"permission":"ADMIN"}]}"#)
            } else {
                json(
                    StatusCode::UNAUTHORIZED,
                    r#"{"name":"UnauthorizedError","message":"You must log in to use Unleash."}"#,
                )
            }
        })
        .route("*", |_| ok_json(r#"{"ok":true}"#))
        .run()
        .await;
    MockUnleash { up, state }
}
