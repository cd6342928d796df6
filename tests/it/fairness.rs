//! Unleash's upstream slots are scarce and a client is not: slow request bodies hold no slot, and one
//! connection, one token (a frontend token is public: it ships in every browser bundle) or the
//! token-less preflights together can hold only their share, so authorized SDKs keep being served while
//! such an attack runs. The mock upstream reads each request body before it answers, as Unleash does
//! (`express.json` runs before its CORS handler).
use crate::support;
use crate::support::patience;

use crate::support::client::{h2, raw_status, send_h2};
use crate::support::metrics::scrape;
use crate::support::upstream::{event_streams, ok_json};
use crate::support::{gateway, get, upstream};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENT: &str = "*:development.fairness-client-0123456789abcdef";
const FRONTEND: &str = "default:development.fairness-frontend-0123456789abcdef";
const ORIGIN: &str = "https://app.example";

/// An authorized SDK poll, timed: must be answered 200 within a second even while an attack runs.
async fn sdk_poll_is_served_within_a_second(addr: std::net::SocketAddr) {
    let started = Instant::now();
    let r = get(addr, "/api/client/features", Some(CLIENT)).await;
    let took = started.elapsed();
    assert_eq!(
        r.status,
        200,
        "an authorized SDK was refused during the attack: {}",
        r.text()
    );
    assert!(
        took < patience(Duration::from_secs(1)),
        "an authorized SDK waited {took:?} during the attack"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_bodies_hold_no_upstream_slot_while_authorized_sdks_are_served() {
    let up = upstream().route("*", |_| ok_json(r#"{"features":[]}"#)).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .token(FRONTEND, "frontend")
        .settings(|s| {
            s.upstream_max_inflight = Some("4".into());
            s.header_read_timeout = Some("2s".into());
        })
        .start()
        .await;
    // Forty attackers, four times the pool: half send a preflight that carries a body (no token),
    // half a public frontend token's POST; each promises 100 bytes and trickles them a byte at a time.
    let mut attackers = Vec::new();
    for i in 0..40 {
        let head = if i % 2 == 0 {
            format!("OPTIONS /api/frontend HTTP/1.1\r\nHost: gw\r\nOrigin: {ORIGIN}\r\nAccess-Control-Request-Method: POST\r\nContent-Length: 100\r\n\r\n")
        } else {
            format!("POST /api/frontend HTTP/1.1\r\nHost: gw\r\nAuthorization: {FRONTEND}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        };
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        attackers.push(tokio::spawn(async move {
            let mut reply = Vec::new();
            for _ in 0..100 {
                if s.write_all(b"x").await.is_err() {
                    break;
                }
                let mut buf = [0u8; 1024];
                match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
            }
            String::from_utf8_lossy(&reply).into_owned()
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        sdk_poll_is_served_within_a_second(gw.addr).await;
    }
    let mut statuses = Vec::new();
    for a in attackers {
        statuses.push(raw_status(&a.await.unwrap()));
    }
    statuses.sort_unstable();
    statuses.dedup();
    // The "preflight" with a body is no preflight: it needs a token (401 at once). The frontend token's
    // trickle is cut at the header timeout as the client's fault (408).
    assert_eq!(statuses, vec![401, 408], "attackers' statuses");
    assert!(
        up.seen().iter().all(|r| r.path() == "/api/client/features"),
        "a trickled body reached Unleash: {:?}",
        up.seen().iter().map(|r| r.target.clone()).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_token_holding_its_share_cannot_take_the_pool() {
    // Unleash is slow on the frontend API: every request there holds its slot until the test lets go.
    let (slow, mut held) = event_streams();
    let up = upstream()
        .route("/api/frontend", slow)
        .route("*", |_| ok_json(r#"{"features":[]}"#))
        .run()
        .await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .token(FRONTEND, "frontend")
        .settings(|s| s.upstream_max_inflight = Some("8".into()))
        .start()
        .await;
    // Six frontend-token requests, each on its own connection: the token's share is a quarter of 8.
    let mut attack = Vec::new();
    for _ in 0..6 {
        let addr = gw.addr;
        attack.push(tokio::spawn(
            async move { get(addr, "/api/frontend", Some(FRONTEND)).await },
        ));
    }
    let _first = held.next().await;
    let _second = held.next().await;
    let mut refused = Vec::new();
    // The four over the share are refused at once, saying which limit; the two within it are held.
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    while refused.len() < 4 && Instant::now() < deadline {
        if let Some(i) = attack.iter().position(|t| t.is_finished()) {
            refused.push(attack.swap_remove(i).await.unwrap());
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(refused.len(), 4, "requests over the token's share were not refused");
    for r in &refused {
        assert_eq!(r.status, 503);
        let body = r.json();
        assert_eq!(body["code"], "upstream_saturated");
        assert_eq!(body["limit"], "token");
        assert_eq!(body["max_inflight"], 2);
        assert_eq!(r.headers["retry-after"], "1");
    }
    sdk_poll_is_served_within_a_second(gw.addr).await;
    assert_eq!(up.seen().iter().filter(|r| r.path() == "/api/frontend").count(), 2);
    let scrape = scrape(gw.admin).await;
    assert_eq!(
        scrape.value("flaggate_upstream_slot_refusals_total{limit=\"token\"}"),
        4.0
    );
    assert_eq!(
        scrape.value("flaggate_upstream_max_inflight_share{limit=\"token\"}"),
        2.0
    );
    assert_eq!(scrape.value("flaggate_upstream_inflight"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_connection_holds_at_most_its_share_of_the_slots() {
    let (slow, mut held) = event_streams();
    let up = upstream()
        .route("/api/client/streaming", slow)
        .route("*", |_| ok_json(r#"{"features":[]}"#))
        .run()
        .await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| {
            s.upstream_max_inflight_per_connection = Some("2".into());
            s.upstream_max_inflight_per_token = Some("100".into());
        })
        .start()
        .await;
    let conn = h2(gw.addr).await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut conn = conn.clone();
        let req = http::Request::get(format!("http://{}/api/client/streaming", gw.addr))
            .header("authorization", CLIENT)
            .body(Full::new(Bytes::new()))
            .unwrap();
        streams.push(tokio::spawn(async move {
            conn.ready().await.unwrap();
            let resp = conn.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            // A held stream's body is kept open (dropping it would reset the stream and free its slot).
            let (body, open) = if status == 503 {
                (resp.into_body().collect().await.unwrap().to_bytes(), None)
            } else {
                (Bytes::new(), Some(resp.into_body()))
            };
            (status, body, open)
        }));
    }
    let _a = held.next().await;
    let _b = held.next().await;
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    for s in streams {
        let (status, body, stream) = s.await.unwrap();
        open.push(stream);
        if status == 503 {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["limit"], "connection", "{v}");
            assert_eq!(v["max_inflight"], 2);
        }
        statuses.push(status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, vec![200, 200, 503, 503]);
    // Another connection, same token, is served.
    let mut other = h2(gw.addr).await;
    let req = http::Request::get(format!("http://{}/api/client/features", gw.addr))
        .header("authorization", CLIENT)
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send_h2(&mut other, req).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_preflight_goes_upstream_bare_and_token_less_ones_share_one_share() {
    let (slow, mut held) = event_streams();
    let up = upstream()
        .route("/api/frontend", slow)
        .route("*", |_| ok_json("{}"))
        .run()
        .await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| s.upstream_max_inflight_per_token = Some("2".into()))
        .start()
        .await;
    let preflight = || {
        format!(
            "OPTIONS /api/frontend HTTP/1.1\r\nHost: gw\r\nOrigin: {ORIGIN}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization\r\nAuthorization: \r\nCookie: session=abc\r\nX-HTTP-Method-Override: DELETE\r\n\r\n"
        )
    };
    // Two preflights are held at a slow Unleash; a third, from yet another connection, is refused.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(preflight().as_bytes()).await.unwrap();
        // The response stays open while its sender lives.
        open.push((s, held.next().await));
    }
    let third = support::raw(
        gw.addr,
        preflight()
            .replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(raw_status(&third), 503, "{third}");
    assert!(third.contains(r#""limit":"anonymous""#), "{third}");
    sdk_poll_is_served_within_a_second(gw.addr).await;
    // Upstream saw the preflight without a credential, a cookie, a body or a method override.
    let seen: Vec<_> = up.seen().into_iter().filter(|r| r.path() == "/api/frontend").collect();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.method, http::Method::OPTIONS);
        assert_eq!(r.header("origin"), Some(ORIGIN));
        assert_eq!(r.header("access-control-request-method"), Some("POST"));
        assert_eq!(r.header("access-control-request-headers"), Some("authorization"));
        for gone in ["authorization", "cookie", "content-length", "transfer-encoding"] {
            assert!(
                r.headers.get(gone).is_none(),
                "{gone} reached upstream: {:?}",
                r.headers
            );
        }
        assert!(r.body.is_empty());
    }
}

#[tokio::test]
async fn options_that_are_not_real_preflights_need_a_token() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    for (what, head) in [
        ("no Origin", "OPTIONS /api/frontend HTTP/1.1\r\nHost: gw\r\nAccess-Control-Request-Method: GET\r\nConnection: close\r\n\r\n"),
        ("no request method", "OPTIONS /api/frontend HTTP/1.1\r\nHost: gw\r\nOrigin: https://a.example\r\nConnection: close\r\n\r\n"),
        ("a body", "OPTIONS /api/frontend HTTP/1.1\r\nHost: gw\r\nOrigin: https://a.example\r\nAccess-Control-Request-Method: GET\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"),
        ("a chunked body", "OPTIONS /api/proxy HTTP/1.1\r\nHost: gw\r\nOrigin: https://a.example\r\nAccess-Control-Request-Method: GET\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
    ] {
        let reply = support::raw(gw.addr, head.as_bytes()).await;
        assert_eq!(raw_status(&reply), 401, "{what}: {reply}");
        assert!(reply.contains(r#""code":"no_token""#), "{what}: {reply}");
    }
    assert_eq!(
        up.count(),
        0,
        "a token-less OPTIONS that is no preflight reached Unleash"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_body_streams_on_but_must_keep_a_minimum_rate() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| {
            s.request_body_buffer = Some("1KiB".into());
            s.min_request_body_rate = Some("1KiB".into());
            s.header_read_timeout = Some("1s".into());
        })
        .start()
        .await;
    let head = |len: usize| {
        format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    // Longer than the buffer and sent at once: streamed through whole.
    let body = "y".repeat(3000);
    let reply = support::raw(gw.addr, format!("{}{body}", head(3000)).as_bytes()).await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    assert_eq!(up.seen().last().unwrap().body.len(), 3000);

    // 2 KiB at once, then ten bytes every 200 ms — never a pause longer than the stall limit, but far
    // below 1 KiB/s: cut once the average falls behind (grace 1 s + 2 s of credit), as the client's fault.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    s.write_all(head(100_000).as_bytes()).await.unwrap();
    s.write_all(&[b'z'; 2048]).await.unwrap();
    let trickle = tokio::spawn(async move {
        let mut reply = Vec::new();
        loop {
            if s.write_all(&[b'z'; 10]).await.is_err() {
                break;
            }
            let mut buf = [0u8; 1024];
            match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if started.elapsed() > patience(Duration::from_secs(15)) {
                break;
            }
        }
        String::from_utf8_lossy(&reply).into_owned()
    });
    let reply = trickle.await.unwrap();
    let took = started.elapsed();
    assert_eq!(raw_status(&reply), 408, "{reply}");
    assert!(reply.contains(r#""code":"body_timeout""#), "{reply}");
    assert!(
        took >= Duration::from_millis(2500),
        "cut before the rate fell behind: {took:?}"
    );
    assert!(
        took < patience(Duration::from_secs(8)),
        "a too-slow body was kept for {took:?}"
    );
}
