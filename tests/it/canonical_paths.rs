//! One canonical path, authorized and forwarded byte for byte; everything else is a 400 that never
//! reaches upstream.
use crate::support::client::raw_status;
use crate::support::upstream::ok_json;
use crate::support::{gateway, raw, upstream};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as PtConfig, TestRunner};

const ADMIN: &str = "*:*.admin-canonical-0123456789";
const CLIENT: &str = "*:development.client-canonical-0123456789";

/// Each rejected form with the code the JSON body must carry. Sent raw, so nothing normalises them.
const REJECTED: &[(&str, &str)] = &[
    ("/api/client/../admin/projects", "path_dot_segment"),
    ("/api/client/./features", "path_dot_segment"),
    ("/api/client/features/..", "path_dot_segment"),
    ("/api/client/%2e%2e/admin/projects", "path_encoded_dot"),
    ("/api/client/%2E%2E/admin/projects", "path_encoded_dot"),
    ("/api/client/.%2e/admin/projects", "path_encoded_dot"),
    ("/api/client%2fadmin", "path_encoded_slash"),
    ("/api/client%2Fadmin", "path_encoded_slash"),
    ("/api/client%5cadmin", "path_encoded_slash"),
    ("/api/client%5Cadmin", "path_encoded_slash"),
    ("/api/client/features%00", "path_control_char"),
    ("/api/client/features%0d%0a", "path_control_char"),
    ("/api/client/features%7f", "path_control_char"),
    ("/api/client;/features", "path_parameter"),
    ("/api/client/features;jsessionid=1", "path_parameter"),
    ("/api/client/features%3b", "path_parameter"),
    ("/api/client/features%23x", "path_fragment"),
    ("/api/client/features%c3%a9", "path_non_ascii"),
    ("/api/%63lient/features", "path_encoded_unreserved"),
    ("/api/client/features%252e", "path_double_encoding"),
    ("/api/client/features%zz", "path_bad_percent"),
];

#[tokio::test]
async fn every_non_canonical_form_is_a_400_with_json_and_never_forwarded() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(ADMIN, "admin").start().await;
    for (path, code) in REJECTED {
        let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: {ADMIN}\r\nConnection: close\r\n\r\n");
        let reply = raw(gw.addr, req.as_bytes()).await;
        assert_eq!(raw_status(&reply), 400, "{path}: {reply}");
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{path}: body {body:?}"));
        assert_eq!(json["code"], *code, "{path}");
    }
    // Raw bytes that hyper itself refuses (backslash, NUL, non-ASCII) must not get through either.
    for path in ["/api/client\\..\\admin", "/api/client/\0", "/api/cli\u{e9}nt"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: {ADMIN}\r\nConnection: close\r\n\r\n");
        let status = raw_status(&raw(gw.addr, req.as_bytes()).await);
        assert!(status == 400 || status == 0, "{path:?}: {status}");
    }
    let long = format!("/api/client/{}", "a".repeat(3000));
    let req = format!("GET {long} HTTP/1.1\r\nHost: gw\r\nAuthorization: {ADMIN}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw_status(&raw(gw.addr, req.as_bytes()).await), 400);
    assert_eq!(up.count(), 0, "upstream saw {:?}", up.seen());
}

/// A raw `#` is refused (`path_fragment`), not cut off: the URI parser would drop it with everything
/// after it (query included), so the connection's reader looks for it in the request line itself.
#[tokio::test]
async fn a_raw_fragment_in_the_request_target_is_refused_not_cut_off() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    for target in [
        "/api/client/features#x",
        "/api/client/features#/../../admin/projects",
        "/api/admin/projects#/api/client",
        "/api/client/features?namePrefix=a#/../../api/admin",
    ] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n");
        let reply = raw(gw.addr, req.as_bytes()).await;
        assert_eq!(raw_status(&reply), 400, "{target}: {reply}");
        assert!(reply.contains(r#""code":"path_fragment""#), "{target}: {reply}");
    }
    assert_eq!(up.count(), 0, "upstream saw {:?}", up.seen());
    // On a keep-alive connection the next request, without one, is served as usual.
    let req = format!("GET /api/client/features#x HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\n\r\nGET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n");
    let reply = raw(gw.addr, req.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("HTTP/1.1 200"), "{reply}");
    let targets: Vec<String> = up.seen().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, vec!["/api/client/features".to_string()]);
}

#[tokio::test]
async fn absolute_form_and_asterisk_targets_are_refused() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    for target in ["http://evil.example/api/client/features", "*"] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n");
        assert_eq!(raw_status(&raw(gw.addr, req.as_bytes()).await), 400, "{target}");
    }
    // A tunnel, a header echo and extension methods are never forwarded, even on an allowed path.
    for line in [
        "CONNECT /api/client/features",
        "CONNECT evil.example:443",
        "TRACE /api/client/features",
        "PROPFIND /api/client/features",
        "BREW /api/client/features",
    ] {
        let req = format!("{line} HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n");
        let reply = raw(gw.addr, req.as_bytes()).await;
        let status = raw_status(&reply);
        assert!(status == 405 || status == 400, "{line}: {reply}");
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn repeated_slashes_are_collapsed_and_what_is_authorized_is_what_is_forwarded() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    let req = format!("GET //api//client///features/?a=%2e%2e//b HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw_status(&raw(gw.addr, req.as_bytes()).await), 200);
    // A client token must not reach admin via a doubled slash either.
    let req = format!(
        "GET /api//admin/projects HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_status(&raw(gw.addr, req.as_bytes()).await), 403);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].target, "/api/client/features/?a=%2e%2e//b",
        "collapsed path, untouched query"
    );
}

/// Path segments drawn from an alphabet rich in the characters that matter.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("api".to_string()),
        Just("client".to_string()),
        Just("admin".to_string()),
        Just("frontend".to_string()),
        Just("features".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        "[a-zA-Z0-9._~!$&'()*+,=:@-]{1,8}",
        "(%[0-9a-fA-F]{2}){1,2}",
        "[a-z]{0,3}%(2e|2E|2f|2F|5c|5C|00|3b|23|25|20|3a|41)[a-z]{0,3}",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn property_forwarded_path_equals_authorized_canonical_path() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(ADMIN, "admin").start().await;
    let mut runner = TestRunner::new(PtConfig {
        cases: 300,
        ..PtConfig::default()
    });
    let strategy = proptest::collection::vec(segment(), 1..7);
    let mut cases = Vec::new();
    for _ in 0..300 {
        let segs = strategy.new_tree(&mut runner).unwrap().current();
        cases.push(format!("/{}", segs.join("/")));
    }
    for path in cases {
        up.clear();
        let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: {ADMIN}\r\nConnection: close\r\n\r\n");
        let status = raw_status(&raw(gw.addr, req.as_bytes()).await);
        let expected = flaggate::internals::canonicalize(&path);
        let seen = up.seen();
        match expected {
            Ok(canonical) => {
                assert_eq!(status, 200, "{path}");
                assert_eq!(seen.len(), 1, "{path}");
                assert_eq!(
                    seen[0].target,
                    canonical.as_str(),
                    "forwarded path differs from the authorized one for {path}"
                );
                // Re-parsing the forwarded path yields the same canonical path (a fixed point).
                assert_eq!(
                    flaggate::internals::canonicalize(&seen[0].target).unwrap().as_str(),
                    canonical.as_str()
                );
            }
            Err(_) => {
                assert!(status == 400 || status == 0, "{path}: {status}");
                assert!(seen.is_empty(), "{path} reached upstream as {:?}", seen[0].target);
            }
        }
    }
}
