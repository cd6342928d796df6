//! Behind a load balancer: whose `X-Forwarded-For` is believed (only trusted proxies'), the address the
//! gateway decides a request comes from (in the access log, and for the routes that admit only some
//! networks), and what Unleash is told.

use crate::support;
use std::time::Duration;
use support::upstream::ok_json;
use support::{gateway, patience, raw, upstream};

const ADMIN: &str = "*:*.addresses-admin-0123456789abcdef";

fn request(path: &str, xff: Option<&str>, id: &str) -> String {
    let xff = xff.map_or(String::new(), |v| format!("X-Forwarded-For: {v}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: {ADMIN}\r\nX-Request-Id: {id}\r\n{xff}Connection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_client_chain_is_kept_and_anyone_elses_is_replaced() {
    support::logs::capture();
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    // The test connects from 127.0.0.1: as if it were the ingress in front of the gateway.
    let trusting = gateway()
        .upstream(up.url())
        .token(ADMIN, "admin")
        .settings(|s| s.trusted_proxies = Some("127.0.0.0/8, 10.0.0.0/8".into()))
        .start()
        .await;
    let reply = raw(
        trusting.addr,
        request(
            "/api/admin/projects",
            Some("6.6.6.6, 198.51.100.7, 10.0.0.3"),
            "xff-trusted",
        )
        .as_bytes(),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(
        up.seen()[0].header("x-forwarded-for"),
        Some("198.51.100.7, 10.0.0.3, 127.0.0.1"),
        "the chain from the client on, with the peer appended; the client's own claim left of it dropped"
    );
    let line = support::logs::find(patience(Duration::from_secs(5)), |l| l["request_id"] == "xff-trusted")
        .await
        .unwrap();
    assert_eq!(line["client"], "198.51.100.7", "{line}");

    up.clear();
    let strict = gateway().upstream(up.url()).token(ADMIN, "admin").start().await;
    raw(
        strict.addr,
        request("/api/admin/projects", Some("198.51.100.7"), "xff-untrusted").as_bytes(),
    )
    .await;
    assert_eq!(
        up.seen()[0].header("x-forwarded-for"),
        Some("127.0.0.1"),
        "replaced by the peer"
    );
    let line = support::logs::find(patience(Duration::from_secs(5)), |l| l["request_id"] == "xff-untrusted")
        .await
        .unwrap();
    assert_eq!(line["client"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_open_only_to_some_networks_refuses_the_others_on_the_decided_address() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let rule =
        "[[routes]]\nname = \"admin-api\"\nprefix = \"/api/admin\"\nallow = [\"admin\"]\nsources = [\"10.0.0.0/8\"]\n";
    let direct = gateway()
        .upstream(up.url())
        .token(ADMIN, "admin")
        .config(rule)
        .start()
        .await;
    // From 127.0.0.1: not internal. A forged X-Forwarded-For from an untrusted peer changes nothing.
    for xff in [None, Some("10.1.2.3")] {
        let reply = raw(direct.addr, request("/api/admin/projects", xff, "src").as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
        assert!(reply.contains(r#""code":"source_not_allowed""#), "{reply}");
    }
    // Other routes are unaffected.
    let reply = raw(direct.addr, request("/api/client/features", None, "src").as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(up.count(), 1, "a refused source reached Unleash");

    // Behind a trusted ingress, an internal client is let in, an external one is not.
    let config = format!("trusted_proxies = \"127.0.0.1\"\n{rule}");
    let behind = gateway()
        .upstream(up.url())
        .token(ADMIN, "admin")
        .config(&config)
        .start()
        .await;
    let inside = raw(
        behind.addr,
        request("/api/admin/projects", Some("10.1.2.3"), "src").as_bytes(),
    )
    .await;
    assert!(inside.starts_with("HTTP/1.1 200"), "{inside}");
    let outside = raw(
        behind.addr,
        request("/api/admin/projects", Some("203.0.113.5"), "src").as_bytes(),
    )
    .await;
    assert!(outside.starts_with("HTTP/1.1 403"), "{outside}");
}
