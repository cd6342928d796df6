//! The admin listener, on its own port so probes and scrapes never compete with, or get exposed
//! alongside, SDK traffic: `/health`, `/ready`, `/metrics`.

use crate::error::json_response;
use crate::telemetry::{must, register_sampled};
use crate::token::store::TokenStore;
use crate::token::unleash::SyncStatus;
use crate::token::TokenSource;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus::{IntGauge, Registry};
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Open connections the admin listener serves at once. Probes and scrapes need a handful; the cap
/// only keeps a flood on this port from using up file descriptors the proxy port needs.
pub const MAX_CONNECTIONS: usize = 256;

/// Whether the instance should get traffic: every configured token source has delivered a set, and
/// it is not draining.
#[derive(Clone)]
pub struct Readiness {
    pub store: Arc<TokenStore>,
    /// Set at the start of shutdown so load balancers stop sending before we stop accepting.
    pub draining: Arc<AtomicBool>,
    /// Present in Unleash-sync mode.
    pub sync: Option<Arc<SyncStatus>>,
    /// Every source that must have delivered a set before the instance is ready.
    pub required: Vec<TokenSource>,
}

impl Readiness {
    fn missing_source(&self) -> Option<TokenSource> {
        self.required.iter().copied().find(|s| !self.store.is_source_loaded(*s))
    }

    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && self.missing_source().is_none() && self.store.is_loaded()
    }

    fn sync_age(&self) -> Option<f64> {
        self.sync.as_ref().and_then(|s| s.age_seconds())
    }

    /// `flaggate_ready`, read at scrape time.
    pub fn register(&self, registry: &Registry) {
        let me = self.clone();
        register_sampled(
            registry,
            must(IntGauge::new(
                "flaggate_ready",
                "1 when /ready answers 200 (every token source loaded and not draining), else 0",
            )),
            move |g| g.set(i64::from(me.is_ready())),
        );
    }
}

pub struct AdminState {
    pub registry: Registry,
    pub readiness: Readiness,
}

pub async fn handle<B>(state: Arc<AdminState>, req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"message": "use GET"}),
        ));
    }
    Ok(match req.uri().path() {
        "/health" => json_response(StatusCode::OK, &json!({"health": "GOOD"})),
        "/ready" => ready(&state.readiness),
        "/metrics" => {
            let body = crate::telemetry::render(&state.registry);
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"message": "not found; try /health, /ready, /metrics"}),
        ),
    })
}

fn ready(state: &Readiness) -> Response<Full<Bytes>> {
    if state.draining.load(Ordering::Acquire) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ready": false, "reason": "shutting down"}),
        );
    }
    if !state.store.is_loaded() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ready": false, "reason": "no token set loaded yet"}),
        );
    }
    if let Some(source) = state.missing_source() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ready": false, "reason": format!("waiting for the {} token set", source.as_str())}),
        );
    }
    // How old the served Unleash token set is (from the sync it came from, also across a restart from
    // the snapshot), and whether this process has reached Unleash at all since it started.
    let synced_since_start = state
        .sync
        .as_ref()
        .map(|s| s.synced_since_start.load(Ordering::Acquire));
    json_response(
        StatusCode::OK,
        &json!({
            "ready": true,
            "last_sync_age_seconds": state.sync_age(),
            "synced_since_start": synced_since_start,
        }),
    )
}
