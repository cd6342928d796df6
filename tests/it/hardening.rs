//! The known ways gateways get bypassed, over raw TCP (we write the bytes, nothing normalises them):
//! request smuggling, header abuse, path-override spoofing, odd targets and methods. Each case asserts
//! the status, what the upstream saw (nothing, or exactly the canonical request), and that a fresh
//! connection afterwards is served normally.
use crate::support::client::raw_status;
use crate::support::upstream::ok_json;
use crate::support::{gateway, raw, upstream, MockUpstream, TestGateway};

const CLIENT: &str = "*:development.hardening-client-0123456789abcdef";

struct Rig {
    up: MockUpstream,
    gw: TestGateway,
}

async fn rig() -> Rig {
    let up = upstream().route("*", |_| ok_json(r#"{"ok":true}"#)).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    Rig { up, gw }
}

impl Rig {
    /// Sends `bytes`, returns every status line received, and checks the gateway still serves.
    async fn send(&self, bytes: &[u8]) -> Vec<u16> {
        self.up.clear();
        let reply = raw(self.gw.addr, bytes).await;
        let statuses = reply
            .match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| reply.get(i + 9..i + 12).and_then(|s| s.parse().ok()))
            .collect();
        // Nothing smuggled: no admin request may ever reach upstream with a client token.
        for r in self.up.seen() {
            assert!(
                !r.path().starts_with("/api/admin"),
                "smuggled request reached upstream: {r:?}"
            );
        }
        statuses
    }

    async fn still_serves(&self) {
        let n = self.up.count();
        let req = format!(
            "GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            raw_status(&raw(self.gw.addr, req.as_bytes()).await),
            200,
            "fresh connection not served"
        );
        assert_eq!(self.up.count(), n + 1);
    }
}

const SMUGGLED: &str = "GET /api/admin/api-tokens HTTP/1.1\r\nHost: gw\r\n\r\n";

#[tokio::test]
async fn request_smuggling_attempts_are_refused_or_framed_once() {
    let r = rig().await;
    let body_with = |prefix: &str| format!("{prefix}{SMUGGLED}");
    let cases: Vec<(&str, String)> = vec![
        (
            "CL+TE",
            format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "TE+CL",
            format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nTransfer-Encoding: chunked\r\nContent-Length: 60\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "two Content-Length",
            format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nContent-Length: 0\r\nContent-Length: 48\r\n\r\n{SMUGGLED}"),
        ),
        (
            "TE xchunked",
            format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nTransfer-Encoding: xchunked\r\n\r\n{}", body_with("0\r\n\r\n")),
        ),
        (
            "TE chunked<TAB>",
            format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nTransfer-Encoding: chunked\t\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "space before colon",
            format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "CL +5",
            format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nContent-Length: +5\r\n\r\nhello{SMUGGLED}"),
        ),
        (
            "chunk size overflow",
            format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nx\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "bare LF",
            format!("POST /api/client/metrics HTTP/1.1\nHost: gw\nAuthorization: {CLIENT}\nTransfer-Encoding: chunked\nContent-Length: 5\n\n0\n\n{SMUGGLED}"),
        ),
        (
            "obs-fold",
            format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n{SMUGGLED}"),
        ),
    ];
    for (name, bytes) in cases {
        let statuses = r.send(bytes.as_bytes()).await;
        // Either the request is refused outright, or it is framed exactly once and the trailing bytes
        // are a second request of their own — which, holding no token, is denied and never forwarded.
        let first = statuses.first().copied().unwrap_or(0);
        assert!(matches!(first, 0 | 400 | 200), "{name}: {statuses:?}");
        for s in statuses.iter().skip(1) {
            assert!(matches!(s, 400 | 401), "{name}: a trailing request got {s}");
        }
        let seen = r.up.seen();
        assert!(seen.len() <= 1, "{name}: upstream saw {} requests", seen.len());
        if let Some(req) = seen.first() {
            assert_eq!(req.target, "/api/client/metrics", "{name}");
            assert!(
                req.header("transfer-encoding").is_none_or(|te| te == "chunked"),
                "{name}: {req:?}"
            );
        }
        r.still_serves().await;
    }
}

#[tokio::test]
async fn connection_listed_headers_cannot_remove_what_the_gateway_sets() {
    let r = rig().await;
    let req = format!(
        "GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close, x-forwarded-for, x-forwarded-proto, x-request-id\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nKeep-Alive: timeout=999\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\n\r\n"
    );
    assert_eq!(r.send(req.as_bytes()).await, vec![200]);
    let seen = r.up.seen();
    let h = &seen[0];
    assert_eq!(h.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(h.header("x-forwarded-proto"), Some("http"));
    assert!(h.header("x-request-id").is_some_and(|v| v.len() == 32));
    for gone in ["keep-alive", "te", "upgrade", "proxy-connection"] {
        assert!(h.header(gone).is_none(), "{gone} forwarded");
    }
    assert!(h.header("connection").is_none_or(|c| !c.contains("x-forwarded")));
    // Listing the credential (or the cookie, Host or length) as hop-by-hop would strip it after it was
    // authorized, so that Unleash saw a token-less request: refused, and Unleash sees nothing.
    r.up.clear();
    for (listed, name) in [
        ("authorization", "authorization"),
        ("Cookie", "cookie"),
        ("x-a, HOST", "host"),
        ("content-length", "content-length"),
    ] {
        let req = format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nCookie: s=1\r\nConnection: close, {listed}\r\n\r\n");
        let reply = raw(r.gw.addr, req.as_bytes()).await;
        assert_eq!(raw_status(&reply), 400, "{listed}: {reply}");
        assert!(reply.contains(r#""code":"connection_names_protected""#), "{reply}");
        assert!(reply.contains(name), "{reply}");
    }
    assert_eq!(
        r.up.count(),
        0,
        "a request whose Connection names its credential reached Unleash"
    );
    r.still_serves().await;
}

#[tokio::test]
async fn overrides_forwarding_claims_and_consumed_fields_never_reach_unleash() {
    let r = rig().await;
    let junk = [
        "X-HTTP-Method-Override: DELETE",
        "X-HTTP-Method: DELETE",
        "X-Method-Override: DELETE",
        "X-Original-URI: /api/admin/api-tokens",
        "X-Override-URL: /api/admin/api-tokens",
        "X-Host: evil.example",
        "X-Original-Host: evil.example",
        "X-Forwarded-Server: evil.example",
        "X-Forwarded-Port: 1",
        "X-Forwarded-Scheme: https",
        "X-Client-IP: 6.6.6.6",
        "True-Client-IP: 6.6.6.6",
        "X_Client_IP: 6.6.6.6",
        "HTTP2-Settings: AAMAAABkAAQAAP__",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    .join("\r\n");
    let req = format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\n{junk}\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
    assert_eq!(r.send(req.as_bytes()).await, vec![100, 200]);
    let seen = r.up.seen();
    let h = &seen[0];
    assert_eq!(h.method, http::Method::POST, "the method the gateway authorized");
    assert_eq!(h.path(), "/api/client/metrics");
    assert_eq!(h.body.as_ref(), b"{}");
    for line in junk.split("\r\n").chain(["Expect: 100-continue"]) {
        let name = line.split(':').next().unwrap().to_ascii_lowercase();
        assert!(h.header(&name).is_none(), "{name} reached Unleash");
    }
    r.still_serves().await;
}

#[tokio::test]
async fn x_forwarded_host_is_sent_only_for_a_plain_host_and_port() {
    let r = rig().await;
    for (host, forwarded) in [
        ("gw:4243", Some("gw:4243")),
        ("[::1]:4243", Some("[::1]:4243")),
        ("a b c", None),
        ("admin:secret@host", None),
        ("host/api/admin", None),
    ] {
        let req = format!(
            "GET /api/client/features HTTP/1.1\r\nHost: {host}\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n"
        );
        let statuses = r.send(req.as_bytes()).await;
        if statuses != vec![200] {
            // The HTTP layer may refuse a Host it cannot parse at all; then nothing was forwarded.
            assert!(r.up.seen().is_empty(), "{host}: {statuses:?}");
            continue;
        }
        assert_eq!(r.up.seen()[0].header("x-forwarded-host"), forwarded, "Host: {host}");
    }
    r.still_serves().await;
}

#[tokio::test]
async fn client_copies_of_gateway_headers_in_any_spelling_are_replaced() {
    let r = rig().await;
    let req = format!(
        "GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nX-FORWARDED-FOR: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.7\r\nx_forwarded_host: evil\r\nForwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(r.send(req.as_bytes()).await, vec![200]);
    let seen = r.up.seen();
    let h = &seen[0];
    assert_eq!(
        h.headers.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
        vec!["127.0.0.1"]
    );
    assert_eq!(h.header("x-forwarded-host"), Some("gw"));
    for gone in ["x_forwarded_for", "x_forwarded_host", "forwarded", "x-real-ip"] {
        assert!(h.header(gone).is_none(), "{gone} forwarded");
    }
}

#[tokio::test]
async fn malformed_header_values_names_and_duplicates_are_refused() {
    let r = rig().await;
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("NUL in value", format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nX-A: a\0b\r\n\r\n").into_bytes(), &[400]),
        ("CR in value", format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nX-A: a\rb\r\n\r\n").into_bytes(), &[400]),
        ("duplicate Host", format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nHost: evil\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n").into_bytes(), &[400]),
        ("two Authorization", format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nAuthorization: junk\r\nConnection: close\r\n\r\n").into_bytes(), &[400]),
        ("over-long header line", format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nX-Long: {}\r\n\r\n", "a".repeat(70_000)).into_bytes(), &[431]),
        ("space in name", format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nX A: 1\r\n\r\n").into_bytes(), &[400]),
    ];
    for (name, bytes, allowed) in cases {
        let statuses = r.send(&bytes).await;
        assert!(
            !statuses.is_empty() && allowed.contains(&statuses[0]),
            "{name}: {statuses:?}"
        );
        assert_eq!(r.up.count(), 0, "{name}: reached upstream");
        r.still_serves().await;
    }
}

#[tokio::test]
async fn path_override_headers_and_probe_user_agents_change_nothing() {
    let r = rig().await;
    for header in [
        "X-Forwarded-Uri",
        "X-Original-URL",
        "X-Rewrite-URL",
        "X-Forwarded-Prefix",
        "X-Forwarded-Path",
    ] {
        let req = format!("GET /api/admin/api-tokens HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\n{header}: /api/client/features\r\nConnection: close\r\n\r\n");
        assert_eq!(r.send(req.as_bytes()).await, vec![403], "{header}");
        assert_eq!(r.up.count(), 0);
        // And on an allowed request they are not forwarded for the upstream to act on.
        let req = format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\n{header}: /api/admin/api-tokens\r\nConnection: close\r\n\r\n");
        assert_eq!(r.send(req.as_bytes()).await, vec![200]);
        assert!(
            r.up.seen()[0].header(&header.to_ascii_lowercase()).is_none(),
            "{header} forwarded"
        );
    }
    for ua in [
        "kube-probe/1.31",
        "ELB-HealthChecker/2.0",
        "GoogleHC/1.0",
        "Consul Health Check",
        "Prometheus/2.42",
    ] {
        let req =
            format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nUser-Agent: {ua}\r\nConnection: close\r\n\r\n");
        assert_eq!(r.send(req.as_bytes()).await, vec![401], "{ua}");
        let req = format!("GET /health HTTP/1.1\r\nHost: gw\r\nUser-Agent: {ua}\r\nConnection: close\r\n\r\n");
        assert_eq!(r.send(req.as_bytes()).await, vec![401], "{ua} on /health");
    }
    assert_eq!(r.up.count(), 0);
}

#[tokio::test]
async fn absolute_form_connect_trace_and_odd_methods_are_refused() {
    let r = rig().await;
    let cases: Vec<(String, u16)> = vec![
        (format!("GET http://gw/api/admin/api-tokens HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n"), 400),
        (format!("GET http://gw/api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n"), 400),
        (format!("CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n"), 405),
        (format!("TRACE /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n"), 405),
        (format!("PURGE /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n"), 405),
        (format!("get /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n"), 405),
    ];
    for (req, want) in cases {
        let statuses = r.send(req.as_bytes()).await;
        let first = statuses.first().copied().unwrap_or(0);
        assert!(first == want || first == 400, "{req:?}: {statuses:?}");
        assert_eq!(r.up.count(), 0, "{req:?} reached upstream");
        r.still_serves().await;
    }
}
