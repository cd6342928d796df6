//! The shield against a mock Unleash that answers feature polls as 7.5.1 does (`support::features`):
//! isolation, freshness, conditional requests, ETag fidelity, encoding, coalescing, what is never
//! stored or cached, authentication first, revocation, outages, bounds and key floods.

use crate::support;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::features::{document, etag, features, Features};
use support::metrics::scrape;
use support::{gateway, patience, send, Reply, TestGateway};

const A: &str = "default:development.shield-a-0123456789abcdef";
const B: &str = "other:development.shield-b-0123456789abcdef";
const ADMIN: &str = "*:*.shield-admin-0123456789abcdef";
const FRONT: &str = "default:development.shield-front-0123456789abcdef";

/// A feature poll by `token`, with extra headers.
async fn poll(gw: &TestGateway, token: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(gw.url(path)).header("authorization", token);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(Bytes::new())).unwrap()).await
}

async fn features_poll(gw: &TestGateway, token: &str) -> Reply {
    poll(gw, token, "/api/client/features", &[]).await
}

async fn shielded(unleash: &Features, ttl: &str) -> TestGateway {
    let ttl = ttl.to_string();
    gateway()
        .upstream(unleash.url())
        .token(A, "client")
        .token(B, "backend")
        .token(ADMIN, "admin")
        .token(FRONT, "frontend")
        .settings(move |s| s.shield_ttl = Some(ttl))
        .start()
        .await
}

async fn results(gw: &TestGateway, result: &str) -> f64 {
    scrape(gw.admin)
        .await
        .value(&format!("flaggate_shield_requests_total{{result=\"{result}\"}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_gets_only_the_document_fetched_with_it() {
    let u = features(Some(Duration::from_millis(300))).await;
    let gw = shielded(&u, "30s").await;
    // Concurrent, while the other token's fill is in flight.
    let (a, b) = tokio::join!(features_poll(&gw, A), features_poll(&gw, B));
    for _ in 0..3 {
        // And sequential, interleaved, from the cache.
        for (token, r) in [(A, features_poll(&gw, A).await), (B, features_poll(&gw, B).await)] {
            assert_eq!(r.text(), document(token, None, None, 0, false));
            assert_eq!(r.headers["etag"], etag(token, None, None, 0).as_str());
        }
    }
    assert_eq!(a.text(), document(A, None, None, 0, false));
    assert_eq!(b.text(), document(B, None, None, 0, false));
    let polls = u.polls();
    assert_eq!(polls.len(), 2, "one fill per token");
    let mut tokens: Vec<_> = polls
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect();
    tokens.sort();
    assert_eq!(
        tokens,
        vec![A.to_string(), B.to_string()],
        "each fill sent with its own token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_and_the_query_are_part_of_the_key_and_anything_unusual_is_forwarded() {
    let u = features(None).await;
    let gw = shielded(&u, "30s").await;
    for _ in 0..2 {
        let none = features_poll(&gw, A).await;
        assert_eq!(none.text(), document(A, None, None, 0, false));
        let spec = poll(&gw, A, "/api/client/features", &[("unleash-client-spec", "5.2.0")]).await;
        assert_eq!(spec.text(), document(A, Some("5.2.0"), None, 0, false));
        for q in ["project=a", "project=b", "namePrefix=x"] {
            let r = poll(&gw, A, &format!("/api/client/features?{q}"), &[]).await;
            assert_eq!(r.text(), document(A, None, Some(q), 0, false), "{q}");
        }
    }
    assert_eq!(u.polls().len(), 5, "five keys, each filled once");
    // Bypassed: each reaches Unleash, every time, as it was sent.
    u.up.clear();
    for _ in 0..2 {
        let bad = poll(&gw, A, "/api/client/features", &[("unleash-client-spec", "abc")]).await;
        assert_eq!(bad.status, 400, "Unleash's own answer to a bad spec");
        for q in ["t=1", "environment=production", "project[a]=x"] {
            assert_eq!(
                poll(&gw, A, &format!("/api/client/features?{q}"), &[]).await.status,
                200
            );
        }
        let weak = poll(&gw, A, "/api/client/features", &[("if-none-match", "W/\"x\"")]).await;
        assert_eq!(weak.status, 200);
        assert_eq!(
            features_poll(&gw, ADMIN).await.status,
            200,
            "admin tokens are never cached"
        );
        let head = send(
            Request::head(gw.url("/api/client/features"))
                .header("authorization", A)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(head.status, 200);
        // Connection drops the spec before forwarding: Unleash answers a spec-less poll, which must not
        // be kept (nor served) under the spec's key.
        let dropped = [("unleash-client-spec", "5.2.0"), ("connection", "unleash-client-spec")];
        let hop = poll(&gw, A, "/api/client/features", &dropped).await;
        assert_eq!(hop.headers["etag"], etag(A, None, None, 0).as_str());
    }
    assert_eq!(u.polls().len(), 16, "eight bypassing requests, twice, all forwarded");
    let specced = poll(&gw, A, "/api/client/features", &[("unleash-client-spec", "5.2.0")]).await;
    assert_eq!(specced.headers["etag"], etag(A, Some("5.2.0"), None, 0).as_str());
    let s = scrape(gw.admin).await;
    for reason in [
        "spec_header",
        "query",
        "inm_form",
        "token_kind",
        "method",
        "connection_option",
    ] {
        assert!(
            s.value(&format!("flaggate_shield_bypass_total{{reason=\"{reason}\"}}")) >= 2.0,
            "{reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_within_the_ttl_then_revalidated_with_if_none_match_and_replaced_on_change() {
    let u = features(None).await;
    let gw = shielded(&u, "1s").await;
    let first = features_poll(&gw, A).await;
    let tag0 = etag(A, None, None, 0);
    assert_eq!(first.headers["etag"], tag0.as_str());
    assert_eq!(u.polls()[0].header("if-none-match"), None, "a fill is unconditional");
    assert_eq!(u.polls()[0].header("accept-encoding"), Some("identity"));
    // Within the TTL: from memory, also the SDK's conditional poll (304 with the ETag, no body).
    let hit = features_poll(&gw, A).await;
    assert_eq!(hit.text(), first.text());
    let nm = poll(&gw, A, "/api/client/features", &[("if-none-match", &tag0)]).await;
    assert_eq!(nm.status, 304);
    assert!(nm.body.is_empty());
    assert_eq!(nm.headers["etag"], tag0.as_str());
    let other = poll(&gw, A, "/api/client/features", &[("if-none-match", "\"old:1:v1\"")]).await;
    assert_eq!(other.status, 200, "an older ETag gets the document");
    assert_eq!(u.polls().len(), 1);
    // After the TTL: one revalidation with the stored ETag; Unleash's 304 keeps the document.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(features_poll(&gw, A).await.text(), first.text());
    let polls = u.polls();
    assert_eq!(polls.len(), 2);
    assert_eq!(polls[1].header("if-none-match"), Some(tag0.as_str()));
    assert_eq!(
        polls[1].header("authorization"),
        Some(A),
        "revalidated with the SDK's own token"
    );
    // A change in Unleash: seen at the next revalidation, within the TTL.
    u.bump();
    let changed_at = Instant::now();
    let mut seen = None;
    while changed_at.elapsed() < patience(Duration::from_secs(3)) {
        let r = features_poll(&gw, A).await;
        if r.headers["etag"] == etag(A, None, None, 1).as_str() {
            assert_eq!(r.text(), document(A, None, None, 1, false));
            seen = Some(changed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = seen.expect("the change never reached the SDK");
    assert!(
        took <= patience(Duration::from_millis(1300)),
        "seen after {took:?} with a 1 s TTL"
    );
    assert!(results(&gw, "revalidated").await >= 1.0);
    assert!(results(&gw, "refreshed").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_is_made_once_with_the_same_etag_and_decompresses_to_unleashs_exact_bytes() {
    let u = features(None).await;
    u.state.large.store(true, Ordering::SeqCst);
    let gw = shielded(&u, "30s").await;
    let identity = features_poll(&gw, A).await;
    let gz = poll(
        &gw,
        A,
        "/api/client/features",
        &[("accept-encoding", "gzip, deflate, br")],
    )
    .await;
    let want = document(A, None, None, 0, true);
    assert_eq!(identity.text(), want);
    assert!(identity.headers.get("content-encoding").is_none());
    assert_eq!(identity.headers["content-length"], want.len().to_string().as_str());
    assert_eq!(gz.headers["content-encoding"], "gzip");
    assert_eq!(
        gz.headers["etag"], identity.headers["etag"],
        "never a weakened or re-hashed ETag"
    );
    assert!(gz.headers["vary"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase()
        .contains("accept-encoding"));
    assert_eq!(gz.headers["content-length"], gz.body.len().to_string().as_str());
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&gz.body[..])
        .read_to_string(&mut plain)
        .unwrap();
    assert_eq!(plain, want);
    let refused = poll(&gw, A, "/api/client/features", &[("accept-encoding", "gzip;q=0")]).await;
    assert!(refused.headers.get("content-encoding").is_none());
    assert_eq!(u.polls().len(), 1, "both encodings from one fill");
    // A small document is never gzipped.
    let small = poll(&gw, B, "/api/client/features", &[("accept-encoding", "gzip")]).await;
    u.state.large.store(false, Ordering::SeqCst);
    assert_eq!(small.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_cold_polls_cost_unleash_one_request() {
    let _fds = support::fd_heavy().await;
    let u = features(Some(Duration::from_secs(2))).await;
    let gw = shielded(&u, "30s").await;
    let mut conns = Vec::new();
    for _ in 0..80 {
        conns.push(support::client::h2(gw.addr).await);
    }
    let mut tasks = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        let mut conn = conns[i % conns.len()].clone();
        let url = gw.url("/api/client/features");
        tasks.push(tokio::spawn(async move {
            let req = Request::get(url)
                .header("authorization", A)
                .body(Full::new(Bytes::new()))
                .unwrap();
            support::client::send_h2(&mut conn, req).await.status.as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(u.polls().len(), 1, "10,000 concurrent cold polls, one upstream request");
    assert_eq!(results(&gw, "miss").await, 1.0);
    assert_eq!(results(&gw, "coalesced").await, 9_999.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fill_outlives_the_client_that_started_it() {
    let u = features(Some(Duration::from_millis(600))).await;
    let gw = shielded(&u, "30s").await;
    let url = gw.url("/api/client/features");
    let leader = send_with_timeout(&url, A, Duration::from_millis(100)).await;
    assert!(leader.is_none(), "the leader was answered before it left");
    let mut others = Vec::new();
    for _ in 0..5 {
        let addr = gw.addr;
        others.push(tokio::spawn(async move {
            support::get(addr, "/api/client/features", Some(A)).await
        }));
    }
    for o in others {
        let r = o.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), document(A, None, None, 0, false));
    }
    assert_eq!(u.polls().len(), 1, "the leader's departure cost no second request");
}

/// A poll that gives up after `limit` (`None`): its connection is closed mid-request.
async fn send_with_timeout(url: &str, token: &str, limit: Duration) -> Option<Reply> {
    let req = Request::get(url)
        .header("authorization", token)
        .body(Full::new(Bytes::new()))
        .unwrap();
    tokio::time::timeout(limit, send(req)).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_must_not_be_stored_is_passed_on_and_asked_again() {
    let u = features(None).await;
    let gw = shielded(&u, "30s").await;
    type Switch = Box<dyn Fn(&Features)>;
    // Unleash adds one response header, then stops adding any.
    let with_header = |name: &'static str, value: &'static str| -> Switch {
        Box::new(move |u| u.state.extra.lock().unwrap().push((name.into(), value.into())))
    };
    let plain = || -> Switch { Box::new(|u| u.state.extra.lock().unwrap().clear()) };
    let cases: [(&str, Switch, Switch); 5] = [
        ("set_cookie", with_header("set-cookie", "s=1"), plain()),
        ("no_store", with_header("cache-control", "no-store"), plain()),
        ("no_store", with_header("cache-control", "private"), plain()),
        (
            "no_etag",
            Box::new(|u| u.state.no_etag.store(true, Ordering::SeqCst)),
            Box::new(|u| u.state.no_etag.store(false, Ordering::SeqCst)),
        ),
        (
            "status",
            Box::new(|u| u.state.failure.store(404, Ordering::SeqCst)),
            Box::new(|u| u.state.failure.store(0, Ordering::SeqCst)),
        ),
    ];
    for (i, (reason, set, unset)) in cases.iter().enumerate() {
        set(&u);
        u.up.clear();
        // A fresh key per case (the query), so no earlier document is in the way.
        let path = format!("/api/client/features?namePrefix=case{i}");
        let one = poll(&gw, A, &path, &[]).await;
        let two = poll(&gw, A, &path, &[]).await;
        assert_eq!(one.status, two.status);
        assert_eq!(u.polls().len(), 2, "{reason}: stored after all");
        assert!(
            one.headers.get("set-cookie").is_none(),
            "a shared answer sets no cookie"
        );
        unset(&u);
        let s = scrape(gw.admin).await;
        assert!(
            s.value(&format!("flaggate_shield_not_stored_total{{reason=\"{reason}\"}}")) >= 1.0,
            "{reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_limits_come_before_the_cache() {
    let u = features(None).await;
    let gw = gateway()
        .upstream(u.url())
        .token(A, "client")
        .token_spec(support::TokenSpec::new(B, "client").expires("2020-01-01T00:00:00Z"))
        .token(FRONT, "frontend")
        .settings(|s| {
            s.shield_ttl = Some("60s".into());
            s.rate_limit_client = Some("0.1:2".into());
        })
        .start()
        .await;
    assert_eq!(features_poll(&gw, A).await.status, 200);
    assert_eq!(features_poll(&gw, A).await.status, 200, "warm");
    assert_eq!(
        features_poll(&gw, A).await.status,
        429,
        "over its rate limit, warm or not"
    );
    assert_eq!(features_poll(&gw, B).await.status, 401, "expired");
    assert_eq!(
        features_poll(&gw, FRONT).await.status,
        403,
        "a frontend token may not poll"
    );
    assert_eq!(features_poll(&gw, "*:development.unknown").await.status, 401);
    // Removed from the token file: refused at once, though its document is warm.
    std::fs::write(&gw.token_file, support::gateway::token_yaml(&[])).unwrap();
    let refused = support::poll::status_within(
        gw.addr,
        "/api/client/features",
        Some(A),
        401,
        patience(Duration::from_secs(5)),
    )
    .await;
    assert!(refused.is_some(), "a removed token was still served from the cache");
    assert_eq!(u.polls().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_unleash_refuses_at_revalidation_is_dropped_and_others_are_unaffected() {
    let u = features(None).await;
    let gw = shielded(&u, "1s").await;
    assert_eq!(features_poll(&gw, A).await.status, 200);
    assert_eq!(features_poll(&gw, B).await.status, 200);
    u.state.revoked.lock().unwrap().insert(A.to_string());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = features_poll(&gw, A).await;
    assert_eq!(r.status, 401, "Unleash's refusal, passed on at once, never stale");
    assert_eq!(features_poll(&gw, A).await.status, 401, "and the document is gone");
    assert_eq!(features_poll(&gw, B).await.status, 200);
    let s = scrape(gw.admin).await;
    assert!(s.value("flaggate_shield_evictions_total{cause=\"explicit\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_an_outage_a_warm_key_is_served_stale_with_backoff_until_max_stale() {
    let u = features(None).await;
    let gw = gateway()
        .upstream(u.url())
        .token(A, "client")
        .settings(|s| {
            s.shield_ttl = Some("1s".into());
            s.shield_max_stale = Some("4s".into());
        })
        .start()
        .await;
    let good = features_poll(&gw, A).await;
    let confirmed = Instant::now();
    u.state.failure.store(503, Ordering::SeqCst);
    u.up.clear();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Polled every 100 ms until the stale bound: always the last good document.
    while confirmed.elapsed() < Duration::from_millis(3700) {
        let r = features_poll(&gw, A).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), good.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attempts = u.polls().len();
    assert!(
        (1..=3).contains(&attempts),
        "{attempts} attempts in ~2.6 s of backoff (1 s, 2 s)"
    );
    assert!(results(&gw, "stale").await >= 20.0);
    // Past the stale bound: Unleash's failure is passed on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut past = features_poll(&gw, A).await;
    for _ in 0..40 {
        if past.status != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        past = features_poll(&gw, A).await;
    }
    assert_eq!(past.status, 503, "served beyond max_stale");
    // Unleash is back: fresh data at the next attempt.
    u.state.failure.store(0, Ordering::SeqCst);
    u.bump();
    let back = support::poll::within(patience(Duration::from_secs(70)), || async {
        features_poll(&gw, A)
            .await
            .headers
            .get("etag")
            .is_some_and(|e| e == etag(A, None, None, 1).as_str())
    })
    .await;
    assert!(back.is_some(), "recovery never reached the SDK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_an_outage_cold_keys_cost_at_most_one_attempt_per_backoff_window() {
    let u = features(None).await;
    u.state.failure.store(503, Ordering::SeqCst);
    let gw = shielded(&u, "30s").await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            support::get(addr, "/api/client/features", Some(A)).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 503, "Unleash's answer, passed on");
    }
    assert_eq!(u.polls().len(), 1, "no stampede");
    for _ in 0..20 {
        assert_eq!(features_poll(&gw, A).await.status, 503);
    }
    assert_eq!(
        u.polls().len(),
        1,
        "answered from the remembered failure during the backoff"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_within_its_bound_and_a_too_large_document_is_forwarded() {
    let u = features(None).await;
    u.state.large.store(true, Ordering::SeqCst);
    let mut b = gateway().upstream(u.url());
    let tokens: Vec<String> = (0..40)
        .map(|i| format!("p{i}:development.shield-bound-{i:04}-abcdef"))
        .collect();
    for t in &tokens {
        b = b.token(t, "client");
    }
    let gw = b
        .settings(|s| {
            s.shield_ttl = Some("60s".into());
            s.shield_max_bytes = Some("32KiB".into());
        })
        .start()
        .await;
    for t in &tokens {
        assert_eq!(features_poll(&gw, t).await.status, 200);
    }
    let s = scrape(gw.admin).await;
    let held = s.value("flaggate_shield_weighted_bytes");
    assert!(held > 0.0 && held <= 32.0 * 1024.0, "{held} bytes held against 32 KiB");
    assert!(s.value("flaggate_shield_evictions_total{cause=\"size\"}") >= 1.0);

    let small = gateway()
        .upstream(u.url())
        .token(A, "client")
        .settings(|s| s.shield_max_entry_bytes = Some("1KiB".into()))
        .start()
        .await;
    u.up.clear();
    for _ in 0..3 {
        let r = features_poll(&small, A).await;
        assert_eq!(
            r.text(),
            document(A, None, None, 0, true),
            "the whole document, forwarded"
        );
    }
    // The fill that found the document too large cost one request; after that each poll is forwarded.
    assert_eq!(u.polls().len(), 4, "never cached");
    let s = scrape(small.admin).await;
    assert!(s.value("flaggate_shield_not_stored_total{reason=\"too_large\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_cannot_flood_the_cache_with_query_variants() {
    let u = features(None).await;
    let gw = shielded(&u, "60s").await;
    for i in 0..20 {
        let r = poll(&gw, A, &format!("/api/client/features?namePrefix=n{i}"), &[]).await;
        assert_eq!(r.status, 200);
    }
    let s = scrape(gw.admin).await;
    assert_eq!(
        s.value("flaggate_shield_bypass_total{reason=\"variants_exceeded\"}"),
        12.0
    );
    assert!(s.value("flaggate_shield_entries") <= 8.0);
    // Another token has variants of its own.
    assert_eq!(
        poll(&gw, B, "/api/client/features?namePrefix=n0", &[]).await.status,
        200
    );
    assert_eq!(
        scrape(gw.admin)
            .await
            .value("flaggate_shield_bypass_total{reason=\"variants_exceeded\"}"),
        12.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_other_route_and_method_is_forwarded_every_time() {
    let u = features(None).await;
    let gw = shielded(&u, "60s").await;
    for _ in 0..2 {
        for (token, method, path) in [
            (ADMIN, "GET", "/api/admin/projects"),
            (FRONT, "GET", "/api/frontend"),
            (A, "POST", "/api/client/metrics"),
            (A, "POST", "/api/client/register"),
            (A, "GET", "/api/client/features/flag-a"),
            (A, "GET", "/api/client/delta"),
            (A, "POST", "/api/client/features"),
        ] {
            let r = send(
                Request::builder()
                    .method(method)
                    .uri(gw.url(path))
                    .header("authorization", token)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
            assert_eq!(r.status, 200, "{method} {path}");
        }
    }
    assert_eq!(u.up.count(), 14, "every request reached Unleash");
    assert_eq!(scrape(gw.admin).await.value("flaggate_shield_entries"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_answer_looks_like_unleashs_own() {
    let u = features(None).await;
    let direct = support::get(u.up.addr, "/api/client/features", Some(A)).await;
    let gw = shielded(&u, "60s").await;
    let _fill = features_poll(&gw, A).await;
    let cached = poll(
        &gw,
        A,
        "/api/client/features",
        &[("x-request-id", "shield-transparency")],
    )
    .await;
    assert_eq!(cached.status, direct.status);
    assert_eq!(cached.body, direct.body, "Unleash's exact bytes");
    for h in ["etag", "content-type", "x-content-type-options"] {
        assert_eq!(cached.headers.get(h), direct.headers.get(h), "{h}");
    }
    assert!(cached.headers["vary"].to_str().unwrap().contains("Accept-Encoding"));
    assert_eq!(cached.headers["x-request-id"], "shield-transparency");
    for hop in ["connection", "keep-alive", "transfer-encoding"] {
        assert!(cached.headers.get(hop).is_none(), "{hop}");
    }
    assert_eq!(results(&gw, "hit").await, 1.0);
    // Every kind of answer from memory carries the request's own id, once.
    let etag = direct.headers["etag"].to_str().unwrap().to_string();
    for (asked, status) in [
        (vec![("if-none-match", etag.as_str())], 304),
        (vec![("accept-encoding", "gzip")], 200),
        (vec![], 200),
    ] {
        let mut headers = asked.clone();
        headers.push(("x-request-id", "shield-id-each"));
        let r = poll(&gw, A, "/api/client/features", &headers).await;
        assert_eq!(r.status, status, "{asked:?}");
        let ids: Vec<_> = r.headers.get_all("x-request-id").iter().collect();
        assert_eq!(ids, ["shield-id-each"], "{asked:?}");
        let generated = poll(&gw, A, "/api/client/features", &asked).await;
        let ids: Vec<_> = generated.headers.get_all("x-request-id").iter().collect();
        assert!(ids.len() == 1 && ids[0].len() == 32, "{asked:?}: {ids:?}");
    }
    assert_eq!(results(&gw, "hit_304").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_one_scope_share_one_body_and_a_reload_can_turn_the_shield_off() {
    // An Unleash that answers every token with the same document: one scope.
    let up = support::upstream()
        .route("/api/client/features", |_| {
            http::Response::builder()
                .header("content-type", "application/json")
                .header("etag", "\"scope:1:v1\"")
                .body(support::upstream::full(r#"{"version":2,"features":[]}"#))
                .unwrap()
        })
        .run()
        .await;
    let gw = gateway()
        .upstream(up.url())
        .token(A, "client")
        .token(B, "client")
        .config("shield_ttl = \"60s\"\n")
        .start()
        .await;
    features_poll(&gw, A).await;
    features_poll(&gw, B).await;
    let s = scrape(gw.admin).await;
    assert_eq!(s.value("flaggate_shield_entries"), 2.0, "one key per token");
    assert_eq!(s.value("flaggate_shield_unique_docs"), 1.0, "one body between them");
    assert_eq!(up.count(), 2);
    // Off at runtime: pure forwarding at once.
    std::fs::write(gw.dir.path().join("flaggate.toml"), "shield = \"off\"\n").unwrap();
    gw.running.as_ref().unwrap().reload();
    let forwarded = support::poll::within(patience(Duration::from_secs(5)), || async {
        let before = up.count();
        features_poll(&gw, A).await;
        up.count() > before
    })
    .await;
    assert!(forwarded.is_some(), "the shield kept answering after it was turned off");
}

/// Files the shield persisted under a state directory.
fn persisted(state: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(state.join("shield"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_persistence_a_gateway_restarted_during_an_outage_still_serves_its_sdks() {
    let u = features(None).await;
    let state = tempfile::tempdir().unwrap();
    let start = |persist: bool| {
        let b = gateway()
            .upstream(u.url())
            .token(A, "client")
            .token(B, "client")
            .state_dir(state.path())
            .settings(move |s| {
                s.shield_ttl = Some("1s".into());
                s.shield_persist = Some(if persist { "on" } else { "off" }.into());
            });
        b.start()
    };
    let gw = start(true).await;
    let good = features_poll(&gw, A).await;
    assert_eq!(good.status, 200);
    let saved = support::poll::within(patience(Duration::from_secs(3)), || async {
        persisted(state.path()).len() == 1
    })
    .await;
    assert!(saved.is_some(), "the document was not persisted");
    let file = std::fs::read_to_string(&persisted(state.path())[0]).unwrap();
    assert!(!file.contains(A), "a token secret on disk");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&persisted(state.path())[0])
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    drop(gw);

    // Unleash goes down; the gateway is restarted (a rescheduled pod): its SDK still gets its flags.
    u.state.failure.store(503, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the TTL: Unleash must be asked
    let gw = start(true).await;
    let r = features_poll(&gw, A).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, good.body, "the persisted document, byte for byte");
    assert_eq!(r.headers["etag"], good.headers["etag"]);
    assert!(results(&gw, "stale").await >= 1.0);
    // A token with nothing persisted gets Unleash's failure, as without the shield.
    assert_eq!(features_poll(&gw, B).await.status, 503);
    drop(gw);

    // Without persistence, the same restart has nothing to serve.
    let gw = start(false).await;
    assert_eq!(features_poll(&gw, A).await.status, 503);
    drop(gw);

    // Unleash back, and the token revoked there: refused, and its document leaves the disk too.
    u.state.failure.store(0, Ordering::SeqCst);
    u.state.revoked.lock().unwrap().insert(A.to_string());
    let gw = start(true).await;
    assert_eq!(features_poll(&gw, A).await.status, 401);
    let gone = support::poll::within(patience(Duration::from_secs(3)), || async {
        persisted(state.path()).is_empty()
    })
    .await;
    assert!(gone.is_some(), "a refused token's document stayed on disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_unleash_answers_again_a_key_in_backoff_asks_at_once() {
    let u = features(None).await;
    let gw = gateway()
        .upstream(u.url())
        .token(A, "client")
        .token(B, "client")
        .settings(|s| s.shield_ttl = Some("1s".into()))
        .start()
        .await;
    assert_eq!(features_poll(&gw, A).await.status, 200);
    u.state.failure.store(503, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Three failures: the key now backs off for about 4 s.
    let outage = Instant::now();
    while u
        .polls()
        .iter()
        .filter(|r| r.header("authorization") == Some(A))
        .count()
        < 4
    {
        assert_eq!(features_poll(&gw, A).await.status, 200, "stale during the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            outage.elapsed() < patience(Duration::from_secs(10)),
            "no backoff growth"
        );
    }
    // Unleash is back, and answers another key: A's backoff ends with it.
    u.state.failure.store(0, Ordering::SeqCst);
    u.bump();
    assert_eq!(features_poll(&gw, B).await.status, 200);
    let recovered = Instant::now();
    let fresh = features_poll(&gw, A).await;
    assert_eq!(
        fresh.headers["etag"],
        etag(A, None, None, 1).as_str(),
        "still stale {:?} after Unleash answered again",
        recovered.elapsed()
    );
    assert!(results(&gw, "refreshed").await >= 1.0);
}
