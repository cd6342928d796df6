//! A route may be declared public — an explicit, named opt-in — for what cannot carry a token: the
//! Unleash web UI and its login, or a downstream Unleash Edge's `POST /edge/validate`. Such requests are
//! forwarded without a token check, still canonicalized, limited and logged with their own decision,
//! with cookies and redirects untouched; the default rules stay deny.

use crate::support;
use http::{Response, StatusCode};
use support::metrics::scrape;
use support::upstream::{full, ok_json};
use support::{gateway, raw, upstream};

const UI: &str = "[[routes]]\nname = \"unleash-ui\"\nprefix = \"/\"\nallow = []\npublic = true\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_route_passes_cookies_and_redirects_untouched_and_the_api_still_needs_tokens() {
    let up = upstream()
        .route("/auth/simple/login", |_| {
            Response::builder()
                .status(StatusCode::FOUND)
                .header("location", "/projects")
                .header("set-cookie", "unleash-session=abc; Path=/; HttpOnly")
                .body(full(""))
                .unwrap()
        })
        .route("*", |_| ok_json("{}"))
        .run()
        .await;
    let gw = gateway().upstream(up.url()).config(UI).start().await;
    let reply = raw(
        gw.addr,
        b"POST /auth/simple/login HTTP/1.1\r\nHost: gw\r\nCookie: unleash-session=old\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 302"), "{reply}");
    assert!(reply.to_ascii_lowercase().contains("location: /projects"), "{reply}");
    assert!(reply.contains("unleash-session=abc; Path=/; HttpOnly"), "{reply}");
    let seen = up.seen();
    assert_eq!(seen[0].header("cookie"), Some("unleash-session=old"));
    assert_eq!(seen[0].body.as_ref(), b"{}");
    // Still canonicalized: a dot segment is refused, never forwarded.
    let bad = raw(
        gw.addr,
        b"GET /%2e%2e/api/admin HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    // The API keeps its rules: no token, no admin API.
    let api = raw(
        gw.addr,
        b"GET /api/admin/projects HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(api.starts_with("HTTP/1.1 401"), "{api}");
    assert_eq!(up.count(), 1);
    let s = scrape(gw.admin).await;
    assert_eq!(
        s.value(
            "flaggate_requests_total{decision=\"public\",method=\"POST\",route_class=\"unleash-ui\",status=\"302\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_route_may_be_limited_to_networks_and_must_not_also_name_token_kinds() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let internal = format!("{UI}sources = [\"10.0.0.0/8\"]\n");
    let gw = gateway().upstream(up.url()).config(&internal).start().await;
    let reply = raw(
        gw.addr,
        b"GET /projects HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert_eq!(up.count(), 0);

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("flaggate.toml");
    std::fs::write(&cfg, UI.replace("allow = []", "allow = [\"admin\"]")).unwrap();
    let s = flaggate::config::Settings {
        config: Some(cfg),
        token_file: Some("t".into()),
        ..Default::default()
    };
    let err = s.resolve().unwrap_err().to_string();
    assert!(err.contains("routes[0].allow") && err.contains("public"), "{err}");
}
