//! `flaggate demo`: the gateway in front of a tiny in-process **sample flag server** (not Unleash), so
//! a newcomer sees 200/401/403 with nothing but Rust installed.

use crate::error::json_response;
use bytes::Bytes;
use http::header::{self, HeaderValue, ETAG, IF_NONE_MATCH};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use std::convert::Infallible;
use std::net::SocketAddr;

/// Connections the sample flag server takes at once: the gateway's upstream pool, and anyone poking it.
pub const UPSTREAM_MAX_CONNECTIONS: usize = 1024;
pub const DEMO_TOKENS_PATH: &str = "config/demo-tokens.yaml";
pub const DEMO_TOKENS: &str = include_str!("../config/demo-tokens.yaml");

pub const CLIENT_TOKEN: &str = "default:development.demo-client-secret";
pub const FRONTEND_TOKEN: &str = "default:development.demo-frontend-secret";
pub const ADMIN_TOKEN: &str = "*:*.demo-admin-secret";
pub const EXPIRED_TOKEN: &str = "*:development.demo-expired-secret";
pub const HASHED_TOKEN: &str = "*:development.demo-hashed-secret";

const FEATURES_ETAG: &str = "\"demo-features-v1\"";

/// The sample flag server: answers the routes SDKs use, in Unleash's shapes, with a fixed flag set.
pub async fn sample_upstream<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let mut resp = match (req.method(), path) {
        (&Method::GET, "/api/client/features") => {
            if req.headers().get(IF_NONE_MATCH).is_some_and(|v| v == FEATURES_ETAG) {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                r
            } else {
                json_response(
                    StatusCode::OK,
                    &json!({"version": 2, "features": [
                        {"name": "demo.new-checkout", "type": "release", "enabled": true, "project": "default",
                         "stale": false, "strategies": [{"name": "default", "constraints": [], "parameters": {}}],
                         "variants": [], "impressionData": false},
                        {"name": "demo.dark-mode", "type": "experiment", "enabled": false, "project": "default",
                         "stale": false, "strategies": [], "variants": [], "impressionData": false}
                    ], "query": {"environment": "development", "inlineSegmentConstraints": true}, "meta": {"revisionId": 1}}),
                )
            }
        }
        (&Method::POST, "/api/client/register") | (&Method::POST, "/api/client/metrics") => {
            json_response(StatusCode::ACCEPTED, &json!({}))
        }
        (&Method::OPTIONS, p) if p.starts_with("/api/frontend") => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        (_, "/api/frontend") => json_response(
            StatusCode::OK,
            &json!({"toggles": [{"name": "demo.new-checkout", "enabled": true,
                "variant": {"name": "disabled", "enabled": false}, "impressionData": false}]}),
        ),
        (&Method::GET, "/api/admin/projects") => json_response(
            StatusCode::OK,
            &json!({"version": 1, "projects": [{"id": "default", "name": "Default"}]}),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"name": "NotFoundError", "message": format!("The path you were looking for ({path}) is not available.")}),
        ),
    };
    if path == "/api/client/features" {
        // As Unleash answers it: a strong ETag, `Vary: Accept-Encoding`, no `Cache-Control`, so that the
        // shield keeps it (the demo's second poll with a token is a hit: see the access log's `cache`).
        let h = resp.headers_mut();
        h.remove(header::CACHE_CONTROL);
        h.insert(ETAG, HeaderValue::from_static(FEATURES_ETAG));
        h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    if path.starts_with("/api/frontend") {
        let h = resp.headers_mut();
        h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
        h.insert(
            "access-control-allow-headers",
            HeaderValue::from_static("authorization,content-type"),
        );
        h.insert(
            "access-control-allow-methods",
            HeaderValue::from_static("GET,POST,OPTIONS"),
        );
    }
    resp.headers_mut()
        .insert("x-demo-upstream", HeaderValue::from_static("sample-flag-server"));
    Ok(resp)
}

/// One copy-paste line the demo prints, with the status it promises.
pub struct CurlLine {
    pub expect: u16,
    pub why: &'static str,
    pub command: String,
}

pub fn curl_lines(proxy: SocketAddr) -> Vec<CurlLine> {
    let base = format!("http://{proxy}");
    let line = |expect, why, auth: Option<&str>, method: &str, path: &str| {
        let auth = auth.map(|t| format!(" -H 'Authorization: {t}'")).unwrap_or_default();
        let method = if method == "GET" {
            String::new()
        } else {
            format!(" -X {method}")
        };
        CurlLine {
            expect,
            why,
            command: format!("curl -si{method}{auth} '{base}{path}'"),
        }
    };
    vec![
        line(
            200,
            "client token on the client API",
            Some(CLIENT_TOKEN),
            "GET",
            "/api/client/features",
        ),
        line(
            200,
            "token kept in git as a sha256 digest",
            Some(HASHED_TOKEN),
            "GET",
            "/api/client/features",
        ),
        line(
            200,
            "frontend token on the frontend API",
            Some(FRONTEND_TOKEN),
            "GET",
            "/api/frontend",
        ),
        line(
            200,
            "admin token reaches the admin API",
            Some(ADMIN_TOKEN),
            "GET",
            "/api/admin/projects",
        ),
        CurlLine {
            expect: 204,
            why: "a CORS preflight needs no token",
            command: format!(
                "curl -si -X OPTIONS -H 'Origin: https://app.example' -H 'Access-Control-Request-Method: POST' '{base}/api/frontend'"
            ),
        },
        line(401, "no token", None, "GET", "/api/client/features"),
        line(
            401,
            "unknown token (answered from memory, upstream never sees it)",
            Some("*:development.not-a-real-token"),
            "GET",
            "/api/client/features",
        ),
        line(401, "expired token", Some(EXPIRED_TOKEN), "GET", "/api/client/features"),
        line(
            403,
            "frontend token on the client API",
            Some(FRONTEND_TOKEN),
            "GET",
            "/api/client/features",
        ),
        line(
            403,
            "client token on the admin API",
            Some(CLIENT_TOKEN),
            "GET",
            "/api/admin/projects",
        ),
        line(
            400,
            "dot segments are rejected, never forwarded",
            Some(CLIENT_TOKEN),
            "GET",
            "/api/client/%2e%2e/admin/projects",
        ),
    ]
}
