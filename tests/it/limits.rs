//! Every limit triggers its status; slow, idle and surplus clients cannot starve normal ones.
use crate::support;
use crate::support::patience;

use crate::support::binary::spawn;
use crate::support::client::{h2_connection, raw_status};
use crate::support::gateway::token_yaml;
use crate::support::metrics::{metric, scrape};
use crate::support::upstream::ok_json;
use crate::support::{gateway, get, raw, upstream, TokenSpec};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENT: &str = "*:development.limits-client-0123456789abcdef";

/// Reads until EOF or `limit`; returns (bytes, saw_eof).
async fn read_until_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

#[tokio::test]
async fn oversized_headers_get_431_and_oversized_bodies_413() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| {
            s.max_header_bytes = Some("8KiB".into());
            s.max_request_body = Some("1KiB".into());
        })
        .start()
        .await;

    let big = "a".repeat(10_000);
    let req = format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw_status(&raw(gw.addr, req.as_bytes()).await), 431);

    // Declared too large: refused before anything is forwarded.
    let body = "x".repeat(2000);
    let req = format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let reply = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(raw_status(&reply), 413, "{reply}");
    assert!(reply.contains("\"code\":\"body_too_large\""));
    assert_eq!(up.count(), 0);

    // Undeclared (chunked) and too large: cut while streaming.
    let chunk = "y".repeat(600);
    let req = format!(
        "POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    assert_eq!(raw_status(&raw(gw.addr, req.as_bytes()).await), 413);

    // Within the limits all is well.
    let req = format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
    assert_eq!(raw_status(&raw(gw.addr, req.as_bytes()).await), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_at_the_header_timeout_while_others_are_served() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| s.header_read_timeout = Some("2s".into()))
        .start()
        .await;
    let addr = gw.addr;
    let slow = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let head = format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nX-Pad: ");
        for b in head.bytes().chain(std::iter::repeat(b'a')) {
            if s.write_all(&[b]).await.is_err() || started.elapsed() > patience(Duration::from_secs(8)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        started.elapsed()
    });
    // Normal clients keep being served meanwhile.
    for _ in 0..10 {
        assert_eq!(get(gw.addr, "/api/client/features", Some(CLIENT)).await.status, 200);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let cut_after = slow.await.unwrap();
    assert!(
        cut_after < patience(Duration::from_secs(4)),
        "slow client held on for {cut_after:?}"
    );
    assert!(cut_after >= Duration::from_millis(1800), "cut too early: {cut_after:?}");
    assert_eq!(up.count(), 10, "the slow request never reached upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_response_is_cut_at_the_idle_timeout() {
    // Larger than every socket buffer between the gateway and the client, so the response cannot just
    // sit in the kernel: the gateway's write blocks.
    const BIG: usize = 32 << 20;
    let big = format!("\"{}\"", "x".repeat(BIG));
    let up = upstream().route("*", move |_| ok_json(&big)).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| s.idle_timeout = Some("1s".into()))
        .start()
        .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let req = format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // Read nothing for three idle timeouts, then take what was buffered: the gateway gave up on us.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (got, closed) = read_until_close(&mut s, patience(Duration::from_secs(5))).await;
    assert!(String::from_utf8_lossy(&got[..got.len().min(12)]).starts_with("HTTP/1.1 200"));
    assert!(
        closed,
        "a client that stopped reading was kept ({} bytes read)",
        got.len()
    );
    assert!(got.len() < BIG, "the whole response was delivered after the stall");

    // A client that reads gets all of it, however long that takes.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let (got, _) = read_until_close(&mut s, patience(Duration::from_millis(2500))).await;
    assert!(got.len() > BIG, "a reading client was cut after {} bytes", got.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_whose_client_stops_granting_window_is_cut_at_the_idle_timeout() {
    use http_body_util::BodyExt;
    // With HTTP/2 the socket never fills: the client just stops granting flow-control window for one
    // stream (answering pings all the while), and the stream, with the upstream connection behind it,
    // would be held for good.
    const BIG: usize = 1 << 20;
    let big = format!("\"{}\"", "x".repeat(BIG));
    let up = upstream().route("*", move |_| ok_json(&big)).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| s.idle_timeout = Some("1s".into()))
        .start()
        .await;
    let request = || {
        http::Request::get(format!("http://{}/api/client/features", gw.addr))
            .header("authorization", CLIENT)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };

    // Takes the head, then never reads: the stream's 16 KiB window stays used up.
    let (mut send, conn) = h2_connection(gw.addr, Some(16 << 10)).await;
    let resp = send.send_request(request()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let stalled = Instant::now();
    let limit = patience(Duration::from_secs(6));
    let closed = tokio::time::timeout(limit, conn).await;
    assert!(
        closed.is_ok(),
        "a stream that stopped taking its response was kept for {limit:?}"
    );
    let took = stalled.elapsed();
    assert!(took >= Duration::from_millis(900), "cut too early: {took:?}");
    let got = resp.into_body().collect().await;
    assert!(got.is_err(), "the whole response was delivered after the stall");

    // A client that reads slowly but steadily (16 KiB every 300 ms, well past the idle timeout) is not
    // cut, and then gets the rest at full speed.
    let (mut send, _conn) = h2_connection(gw.addr, Some(16 << 10)).await;
    let mut body = send.send_request(request()).await.unwrap().into_body();
    let mut read = 0;
    let slow_until = Instant::now() + Duration::from_millis(2500);
    while let Some(frame) = body.frame().await {
        read += frame
            .expect("a steady reader was cut")
            .into_data()
            .map_or(0, |d| d.len());
        if Instant::now() < slow_until {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert_eq!(read, BIG + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stops_arriving_gets_408_while_a_slow_one_within_the_limit_is_served() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| s.header_read_timeout = Some("1s".into()))
        .start()
        .await;
    let head = |len: usize| {
        format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n")
    };

    // 11 of the 100 promised bytes, then nothing: cut at the header timeout, as the client's fault
    // (not a 504 charged to Unleash after the upstream timeout).
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    s.write_all(head(100).as_bytes()).await.unwrap();
    s.write_all(b"{\"appName\":").await.unwrap();
    let (reply, _) = read_until_close(&mut s, patience(Duration::from_secs(10))).await;
    let took = started.elapsed();
    let reply = String::from_utf8_lossy(&reply);
    assert_eq!(raw_status(&reply), 408, "{reply}");
    assert!(reply.contains(r#""code":"body_timeout""#), "{reply}");
    assert!(took >= Duration::from_millis(900), "cut too early: {took:?}");
    assert!(
        took < patience(Duration::from_secs(4)),
        "stalled body held on for {took:?}"
    );

    // A body that keeps coming within the time limit, a byte every 100 ms, is served.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(head(8).as_bytes()).await.unwrap();
    for b in b"12345678" {
        s.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (reply, _) = read_until_close(&mut s, patience(Duration::from_secs(1))).await;
    assert_eq!(raw_status(&String::from_utf8_lossy(&reply)), 200);
    assert_eq!(up.seen().last().map(|r| r.body.clone()), Some("12345678".into()));
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout_but_not_before() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| {
            s.idle_timeout = Some("1500ms".into());
            s.header_read_timeout = Some("500ms".into());
        })
        .start()
        .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let req = format!("GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // These 300 ms reads are windows inside the 1.5 s idle period, not limits on the gateway: stretched
    // by the patience factor they would outlast the idle timeout they test.
    let (first, closed) = read_until_close(&mut s, Duration::from_millis(300)).await;
    assert!(String::from_utf8_lossy(&first).starts_with("HTTP/1.1 200"));
    assert!(!closed);
    // Idle longer than the header timeout but shorter than the idle timeout: still usable.
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.write_all(req.as_bytes()).await.unwrap();
    let (second, closed) = read_until_close(&mut s, Duration::from_millis(300)).await;
    assert!(
        String::from_utf8_lossy(&second).starts_with("HTTP/1.1 200"),
        "keep-alive cut before the idle timeout"
    );
    assert!(!closed);
    // Then idle past the idle timeout: the gateway closes it.
    let started = Instant::now();
    let (_, closed) = read_until_close(&mut s, patience(Duration::from_secs(3))).await;
    assert!(closed, "idle connection never closed");
    assert!(started.elapsed() < patience(Duration::from_millis(2500)));
}

/// Hundreds of idle connections (well below the default cap of 10,000) do not stop a new client. The
/// gateway is the real binary, so the test process holds only the client end of each connection and the
/// gateway process the server end: both stay within the common limit of 1,024 open files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_does_not_stop_a_new_client() {
    const IDLE: usize = 800;
    let _fds = support::fd_heavy().await;
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(&tokens, token_yaml(&[TokenSpec::new(CLIENT, "client")])).unwrap();
    let gw = spawn(&["run", "--upstream", &up.url(), "--token-file", tokens.to_str().unwrap()]);
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(gw.proxy).await.unwrap());
    }
    let started = Instant::now();
    let r = get(gw.proxy, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(r.status, 200);
    assert!(started.elapsed() < patience(Duration::from_secs(2)));
    let open = metric(gw.admin, "flaggate_connections{listener=\"proxy\"}").await;
    assert!(open >= IDLE as f64, "open connections gauge: {open}");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_slot_instead_of_crashing_anything() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| s.max_connections = Some("3".into()))
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = gw.addr;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let r = get(addr, "/api/client/features", Some(CLIENT)).await;
        (r.status.as_u16(), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "a fourth connection was served beyond the cap of 3"
    );
    held.pop();
    let (status, waited) = waiting.await.unwrap();
    assert_eq!(status, 200);
    assert!(waited >= Duration::from_millis(600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_outlives_the_response_timeout_but_not_the_idle_timeout() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let up = upstream()
        .route("/api/client/streaming", |_| {
            let (tx, resp) = support::upstream::event_stream();
            tokio::spawn(async move {
                // Events for 1.2 s (longer than the response timeout), then silence.
                for i in 0..6 {
                    let _ = tx.send(Bytes::from(format!("data: {i}\n\n"))).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(tx);
            });
            resp
        })
        .run()
        .await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| {
            s.upstream_timeout = Some("500ms".into());
            s.idle_timeout = Some("1s".into());
        })
        .start()
        .await;
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("http://{}/api/client/streaming", gw.addr))
        .header("authorization", CLIENT)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let started = Instant::now();
    let mut body = client.request(req).await.unwrap().into_body();
    let mut events = 0;
    let end = tokio::time::timeout(patience(Duration::from_secs(5)), async {
        while let Some(f) = body.frame().await {
            if f.map(|f| f.is_data()).unwrap_or(false) {
                events += 1;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "a silent stream was never ended");
    assert_eq!(events, 6, "all events before the silence arrived");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < patience(Duration::from_millis(3500)),
        "ended after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_beyond_the_limit_wait_for_a_free_slot() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    // Each upstream answer takes 600 ms; with 2 streams allowed per connection, 4 requests on one
    // HTTP/2 connection need two rounds.
    let up = upstream()
        .route("/api/client/features", |_| {
            let (tx, body) = support::upstream::channel_body();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(600)).await;
                let _ = tx.send(Bytes::from_static(b"{}")).await;
            });
            http::Response::builder().body(body).unwrap()
        })
        .run()
        .await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| s.h2_max_streams = Some("2".into()))
        .start()
        .await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Let the server's SETTINGS (with its stream limit) arrive before opening streams.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut send = send.clone();
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            let req = http::Request::get(format!("http://{addr}/api/client/features"))
                .header("authorization", CLIENT)
                .body(Full::new(Bytes::new()))
                .unwrap();
            send.ready().await.unwrap();
            let resp = send.send_request(req).await.unwrap();
            let status = resp.status();
            resp.into_body().collect().await.unwrap();
            status.as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1150),
        "4 streams ran at once despite a limit of 2 ({took:?})"
    );
    assert!(took < patience(Duration::from_secs(3)));
}

/// A gateway with one upstream slot, for which a request may queue 1 s.
async fn one_upstream_slot(up: &support::MockUpstream) -> support::TestGateway {
    gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .shield_off()
        .settings(|s| {
            s.upstream_max_inflight = Some("1".into());
            s.upstream_max_inflight_per_token = Some("10".into());
            s.upstream_connect_timeout = Some("1s".into());
        })
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_upstream_slots_requests_queue_then_get_503_and_never_reach_unleash() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    // One slot, held by an event stream until the test ends it.
    let (stream_route, mut streams) = support::upstream::event_streams();
    let up = upstream()
        .route("/api/client/streaming", stream_route)
        .route("/api/client/features", |_| ok_json(r#"{"features":[]}"#))
        .run()
        .await;
    let gw = one_upstream_slot(&up).await;
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("http://{}/api/client/streaming", gw.addr))
        .header("authorization", CLIENT)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let stream = tokio::spawn(client.request(req));
    let events = streams.next().await;
    events.send(Bytes::from("data: 1\n\n")).await.unwrap();
    let mut stream = stream.await.unwrap().unwrap().into_body();
    assert!(stream.frame().await.is_some());

    // All slots taken for as long as a request may wait to connect: 503, and Unleash sees nothing.
    let started = Instant::now();
    let r = get(gw.addr, "/api/client/features", Some(CLIENT)).await;
    let took = started.elapsed();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["code"], "upstream_saturated");
    assert_eq!(r.headers["retry-after"], "1");
    assert!(took >= Duration::from_millis(900), "did not queue first: {took:?}");
    assert!(took < patience(Duration::from_secs(3)), "queued too long: {took:?}");
    assert_eq!(up.count(), 1, "a request beyond the slots reached Unleash");
    let scrape = scrape(gw.admin).await;
    assert_eq!(scrape.value("flaggate_upstream_inflight"), 1.0);
    assert_eq!(scrape.value("flaggate_upstream_max_inflight"), 1.0);
    assert_eq!(
        scrape.value(
            r#"flaggate_requests_total{decision="upstream_error",method="GET",route_class="client",status="503"}"#
        ),
        1.0,
        "{}",
        scrape.text
    );

    // A queued request is served as soon as the stream ends and gives its slot back.
    let addr = gw.addr;
    let queued = tokio::spawn(async move {
        let started = Instant::now();
        (get(addr, "/api/client/features", Some(CLIENT)).await, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metric(gw.admin, "flaggate_upstream_queued").await, 1.0);
    drop(events);
    while stream.frame().await.is_some() {}
    let (r, took) = queued.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(took >= Duration::from_millis(250), "was not queued: {took:?}");
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_gives_its_upstream_slot_back() {
    use bytes::Bytes;
    let (stream_route, mut streams) = support::upstream::event_streams();
    let up = upstream()
        .route("/api/client/streaming", stream_route)
        .route("/api/client/features", |_| ok_json(r#"{"features":[]}"#))
        .run()
        .await;
    let gw = one_upstream_slot(&up).await;
    // The one slot goes to a stream whose client hangs up after the first event.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let req = format!("GET /api/client/streaming HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let events = streams.next().await;
    events.send(Bytes::from("data: 1\n\n")).await.unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    drop(s);
    // The next event finds the client gone at the latest; the stream and its slot are given up.
    let _ = events.send(Bytes::from("data: 2\n\n")).await;
    let r = get(gw.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(
        r.status,
        200,
        "the departed client's slot was never given back: {}",
        r.text()
    );
    assert_eq!(metric(gw.admin, "flaggate_upstream_inflight").await, 0.0);
}
