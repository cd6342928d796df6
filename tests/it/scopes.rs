//! The token × route matrix from the Unleash 7.5.1 ground truth (`shared/unleash-7.5.1/matrix.md`),
//! against the gateway's documented policy: every denial is decided here and never reaches upstream.
use crate::support;

use crate::support::upstream::ok_json;
use crate::support::{gateway, send, upstream, TokenSpec};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

const CLIENT: &str = "*:development.0123456789abcdef0123456789abcdef0123456789abcdef01234567";
const BACKEND: &str = "default:production.backend-0123456789abcdef";
const FRONTEND: &str = "default:development.frontend-0123456789abcdef";
const ADMIN: &str = "*:*.admin-0123456789abcdef";
const PAT: &str = "user:23bb287705e9b645b25df4efc77a98c42b9bb6e093a6c2dd7c310abb";
const EXPIRED: &str = "*:development.expired-0123456789abcdef";
const UNKNOWN: &str = "*:development.00000000000000000000000000000000000000000000000000000000";

/// Routes from the ground-truth matrix, with the route class the policy puts them in.
const ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/api/client/features", "client"),
    ("GET", "/api/client/features/anchor.flag-on", "client"),
    ("POST", "/api/client/register", "client"),
    ("POST", "/api/client/metrics", "client"),
    ("GET", "/api/client/streaming", "client"),
    ("GET", "/api/client/delta", "client"),
    ("GET", "/api/frontend", "frontend"),
    ("POST", "/api/frontend", "frontend"),
    ("POST", "/api/frontend/client/metrics", "frontend"),
    ("POST", "/api/frontend/client/register", "frontend"),
    ("GET", "/api/proxy", "frontend"),
    ("GET", "/api/admin/features", "admin"),
    ("GET", "/api/admin/projects/default/features", "admin"),
    ("GET", "/api/admin/search/features", "admin"),
    ("GET", "/api/admin/projects", "admin"),
    ("GET", "/api/admin/api-tokens", "admin"),
    ("POST", "/api/admin/api-tokens", "admin"),
    ("GET", "/api/admin/user", "admin"),
    ("GET", "/health", "other"),
    ("GET", "/ready", "other"),
    ("GET", "/internal-backstage/prometheus", "other"),
    ("POST", "/edge/validate", "other"),
    ("POST", "/edge/metrics", "other"),
    ("GET", "/api/ui-config", "other"),
    ("GET", "/api/admin/ui-config", "admin"),
    ("GET", "/", "other"),
    ("GET", "/api/clientx/features", "other"),
    ("GET", "/api/admin/x/api/client", "admin"),
];

/// The documented policy: which kinds each route class admits.
fn allowed(class: &str, kind: &str) -> bool {
    match class {
        "client" => matches!(kind, "client" | "backend" | "admin" | "pat"),
        "frontend" => matches!(kind, "frontend" | "admin"),
        "admin" => matches!(kind, "admin" | "pat"),
        _ => kind == "admin",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_kind_on_every_route_gets_the_policy_status_and_only_allowed_requests_reach_upstream() {
    let up = upstream().route("*", |_| ok_json(r#"{"ok":true}"#)).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .token(BACKEND, "backend")
        .token(FRONTEND, "frontend")
        .token(ADMIN, "admin")
        .token(PAT, "pat")
        .token_spec(TokenSpec::new(EXPIRED, "client").expires("2020-01-01T00:00:00Z"))
        .start()
        .await;

    let kinds: &[(&str, Option<&str>)] = &[
        ("none", None),
        ("garbage", Some("garbage-token")),
        ("unknown", Some(UNKNOWN)),
        (
            "unknown_pat",
            Some("user:0000000000000000000000000000000000000000000000000000"),
        ),
        ("client", Some(CLIENT)),
        ("backend", Some(BACKEND)),
        ("frontend", Some(FRONTEND)),
        ("admin", Some(ADMIN)),
        ("pat", Some(PAT)),
        ("expired", Some(EXPIRED)),
    ];
    let mut expected_upstream = Vec::new();
    let mut failures = Vec::new();
    for (kind, token) in kinds {
        for (method, path, class) in ROUTES {
            let mut b = Request::builder().method(*method).uri(gw.url(path));
            if let Some(t) = token {
                b = b.header("authorization", *t);
            }
            let reply = send(b.body(Full::new(Bytes::new())).unwrap()).await;
            let known = matches!(*kind, "client" | "backend" | "frontend" | "admin" | "pat");
            let want = if !known {
                StatusCode::UNAUTHORIZED
            } else if allowed(class, kind) {
                expected_upstream.push(format!("{method} {path} {}", token.unwrap()));
                StatusCode::OK
            } else {
                StatusCode::FORBIDDEN
            };
            if reply.status != want {
                failures.push(format!("{kind} {method} {path}: got {} want {want}", reply.status));
            }
            if want != StatusCode::OK {
                let body = reply.json();
                if body["code"].as_str().is_none() || body["message"].as_str().is_none() {
                    failures.push(format!(
                        "{kind} {method} {path}: denial body lacks code/message: {body}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let seen: Vec<String> = up
        .seen()
        .iter()
        .map(|r| format!("{} {} {}", r.method, r.target, r.header("authorization").unwrap_or("")))
        .collect();
    assert_eq!(
        seen, expected_upstream,
        "upstream saw exactly the allowed requests, in order"
    );
}

#[tokio::test]
async fn denial_bodies_use_unleash_shapes_with_a_stable_code() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(FRONTEND, "frontend").start().await;

    let r = support::get(gw.addr, "/api/client/features", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["content-type"], "application/json; charset=utf-8");
    assert_eq!(
        r.json(),
        serde_json::json!({"message": "This endpoint requires an API token. Please add an authorization header to your request with a valid token", "code": "no_token"})
    );
    let r = support::get(gw.addr, "/api/client/features", Some(UNKNOWN)).await;
    assert_eq!(r.json()["code"], "unknown_token");

    let r = support::get(gw.addr, "/api/admin/projects", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["name"], "AuthenticationRequired");
    let r = support::get(gw.addr, "/api/admin/projects", Some("garbage")).await;
    assert_eq!(r.json()["name"], "UnauthorizedError");
    assert_eq!(r.json()["message"], "You must log in to use Unleash.");

    let r = support::get(gw.addr, "/api/client/features", Some(FRONTEND)).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json(),
        serde_json::json!({"message": "invalid token: expected a different token type for this endpoint", "code": "wrong_token_type"})
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn token_header_forms_match_unleash() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    let ok = [
        CLIENT.to_string(),
        format!("Bearer {CLIENT}"),
        format!("bearer {CLIENT}"),
        format!("BEARER  {CLIENT}"),
        format!("{CLIENT} "),
    ];
    for v in ok {
        assert_eq!(
            support::get(gw.addr, "/api/client/features", Some(&v)).await.status,
            200,
            "{v:?}"
        );
    }
    let denied = [
        CLIENT.to_uppercase(),
        format!("Token {CLIENT}"),
        format!("Basic {CLIENT}"),
    ];
    for v in denied {
        assert_eq!(
            support::get(gw.addr, "/api/client/features", Some(&v)).await.status,
            401,
            "{v:?}"
        );
    }
    // Query-parameter and other-header forms are not tokens, as in Unleash.
    let r = support::get(gw.addr, &format!("/api/client/features?token={CLIENT}"), None).await;
    assert_eq!(r.status, 401);
    let r = send(
        Request::get(gw.url("/api/client/features"))
            .header("x-api-key", CLIENT)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(up.count(), 5, "only the five accepted forms reached upstream");
}

#[tokio::test]
async fn cors_preflight_on_frontend_passes_without_a_token_and_nowhere_else() {
    let up = upstream()
        .route("/api/frontend", |_| {
            http::Response::builder()
                .status(204)
                .header("access-control-allow-origin", "*")
                .body(support::upstream::full(""))
                .unwrap()
        })
        .run()
        .await;
    let gw = gateway().upstream(up.url()).start().await;
    let preflight = |path: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri(gw.url(path))
            .header("origin", "http://app.example")
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let r = send(preflight("/api/frontend")).await;
    assert_eq!(r.status, 204);
    assert_eq!(r.headers["access-control-allow-origin"], "*");
    assert_eq!(send(preflight("/api/client/features")).await.status, 401);
    assert_eq!(send(preflight("/api/admin/features")).await.status, 401);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].method.as_str(), seen[0].path()), ("OPTIONS", "/api/frontend"));
}

#[tokio::test]
async fn route_rules_in_the_config_file_override_the_defaults() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .token(ADMIN, "admin")
        .config(
            r#"
[[routes]]
name = "public-health"
prefix = "/health"
allow = ["client", "admin"]

[[routes]]
name = "client-metrics-admin-only"
prefix = "/api/client/metrics"
allow = ["admin"]
"#,
        )
        .start()
        .await;
    assert_eq!(support::get(gw.addr, "/health", Some(CLIENT)).await.status, 200);
    assert_eq!(
        support::get(gw.addr, "/api/client/features", Some(CLIENT)).await.status,
        200
    );
    assert_eq!(
        support::get(gw.addr, "/api/client/metrics", Some(CLIENT)).await.status,
        403
    );
    assert_eq!(
        support::get(gw.addr, "/api/client/metrics", Some(ADMIN)).await.status,
        200
    );
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn denials_on_browser_routes_are_readable_cross_origin_and_elsewhere_not() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    let with_origin = |path: &str, token: Option<&str>| {
        let mut b = Request::get(gw.url(path)).header("origin", "http://app.example");
        if let Some(t) = token {
            b = b.header("authorization", t);
        }
        b.body(Full::new(Bytes::new())).unwrap()
    };
    for (token, status) in [(Some(CLIENT), 403), (Some(UNKNOWN), 401), (None, 401)] {
        let r = send(with_origin("/api/frontend", token)).await;
        assert_eq!(r.status, status);
        assert_eq!(r.headers["access-control-allow-origin"], "*", "{token:?}");
        assert_eq!(r.headers["access-control-expose-headers"], "ETag");
        assert!(r.headers.get_all("vary").iter().any(|v| v == "Origin"));
    }
    let r = send(with_origin("/api/admin/projects", Some(CLIENT))).await;
    assert_eq!(r.status, 403);
    assert!(
        r.headers.get("access-control-allow-origin").is_none(),
        "admin denials stay same-origin"
    );
    assert_eq!(up.count(), 0);
}
