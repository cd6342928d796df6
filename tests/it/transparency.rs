//! The gateway is transparent for allowed requests: what the client sends reaches Unleash (minus
//! hop-by-hop fields and client copies of forwarding headers), and what Unleash answers reaches the client
//! byte for byte, streamed rather than buffered, over HTTP/1.1 and h2c alike.
use crate::support;
use crate::support::patience;

use crate::support::client::raw_status;
use crate::support::upstream::{event_streams, full, ok_json};
use crate::support::{gateway, raw, send, upstream};
use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

const CLIENT: &str = "*:development.transparency-client-0123456789abcdef";

fn get_req(url: String) -> http::request::Builder {
    Request::get(url).header("authorization", CLIENT)
}

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// Arbitrary bytes that are not UTF-8 (every byte value, repeated).
fn binary(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 256) as u8).collect()
}

#[tokio::test]
async fn response_status_headers_and_body_pass_through_but_hop_by_hop_headers_do_not() {
    let body: Vec<u8> = binary(1000);
    let b = body.clone();
    let up = upstream()
        .route("/api/client/features", move |r| {
            let status = r
                .target
                .split("status=")
                .nth(1)
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(200);
            Response::builder()
                .status(status)
                .header("content-type", "application/octet-stream")
                .header("x-custom", "Some Value; with=params")
                .header("etag", "W/\"abc-123\"")
                .header("cache-control", "public, max-age=17")
                .header("vary", "Accept-Encoding")
                .header("set-cookie", "a=1; Path=/")
                .header("set-cookie", "b=2; HttpOnly")
                .header("retry-after", "7")
                // Hop-by-hop: about the upstream connection only.
                .header("connection", "x-up")
                .header("x-up", "1")
                .header("keep-alive", "timeout=5, max=100")
                .header("proxy-connection", "keep-alive")
                .body(full(b.clone()))
                .unwrap()
        })
        .run()
        .await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;

    // The mock really does send the hop-by-hop fields (so their absence below means something).
    let direct = support::get(up.addr, "/api/client/features", None).await;
    assert_eq!(direct.headers["x-up"], "1");
    assert!(direct.headers.contains_key("keep-alive"));
    up.clear();

    for status in [200u16, 202, 404, 429, 500, 503] {
        let r = send(
            get_req(gw.url(&format!("/api/client/features?status={status}")))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status.as_u16(), status, "upstream status passes through unchanged");
        assert_eq!(&r.body[..], &body[..], "body bytes untouched for {status}");
        let h = &r.headers;
        assert_eq!(h["content-type"], "application/octet-stream");
        assert_eq!(h["x-custom"], "Some Value; with=params");
        assert_eq!(h["etag"], "W/\"abc-123\"");
        assert_eq!(h["cache-control"], "public, max-age=17");
        assert_eq!(h["vary"], "Accept-Encoding");
        assert_eq!(h["retry-after"], "7");
        assert_eq!(h["content-length"], body.len().to_string().as_str());
        let cookies: Vec<_> = h.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(cookies, vec!["a=1; Path=/", "b=2; HttpOnly"], "both cookies, in order");
        assert!(
            h.get("x-up").is_none(),
            "field named in upstream Connection leaked: {h:?}"
        );
        assert!(h.get("keep-alive").is_none(), "keep-alive leaked: {h:?}");
        assert!(h.get("proxy-connection").is_none(), "proxy-connection leaked: {h:?}");
        for c in h.get_all("connection") {
            assert!(
                !c.to_str().unwrap_or("").contains("x-up"),
                "upstream Connection value leaked: {c:?}"
            );
        }
    }
    assert_eq!(up.count(), 6);
}

#[tokio::test]
async fn request_reaches_upstream_exactly_minus_hop_by_hop_and_client_forwarding_headers() {
    let up = upstream().route("*", |_| ok_json(r#"{"ok":true}"#)).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;

    let mut body = br#"{"appName":"checkout","bucket":{}}"#.to_vec();
    body.extend_from_slice(&[0x00, 0xff, 0xfe, b'\r', b'\n', 0x80]);
    let target = "/api/client/metrics?project=default&namePrefix=a%20b&x=%2e%2e";
    let mut req = format!(
        "POST {target} HTTP/1.1\r\n\
         Host: flags.example.test:8443\r\n\
         Authorization: {CLIENT}\r\n\
         X-Forwarded-For: 6.6.6.6\r\n\
         x-forwarded-for: 8.8.8.8\r\n\
         Forwarded: for=6.6.6.6;proto=https;host=evil.example\r\n\
         X-Real-IP: 6.6.6.6\r\n\
         X-Forwarded-Proto: https\r\n\
         X-Forwarded-Host: evil.example\r\n\
         Connection: keep-alive, x-secret-hop\r\n\
         X-Secret-Hop: 1\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Proxy-Connection: keep-alive\r\n\
         Unleash-AppName: checkout\r\n\
         X-Custom-Request: kept\r\n\
         Content-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    // A second, pipelined request on the same connection closes it, so `raw` returns promptly.
    req.extend_from_slice(
        format!(
            "GET /api/client/features HTTP/1.1\r\nHost: second\r\nAuthorization: {CLIENT}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    let reply = raw(gw.addr, &req).await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    assert_eq!(
        reply.matches("HTTP/1.1 200").count(),
        2,
        "both requests answered: {reply}"
    );

    let seen = up.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let r = &seen[0];
    assert_eq!(r.method, http::Method::POST);
    assert_eq!(r.target, target, "path and query byte for byte");
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(&r.body[..], &body[..], "request body bytes untouched");
    let h = &r.headers;
    let all = |name: &str| {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(all("authorization"), vec![CLIENT.to_string()], "original Authorization");
    assert_eq!(
        all("host"),
        vec![up.addr.to_string()],
        "Host names the upstream; the client's travels in X-Forwarded-Host"
    );
    assert_eq!(
        all("x-forwarded-for"),
        vec!["127.0.0.1"],
        "only the gateway's own X-Forwarded-For"
    );
    assert_eq!(all("x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        all("x-forwarded-host"),
        vec!["flags.example.test:8443"],
        "the Host the client sent"
    );
    for gone in [
        "forwarded",
        "x-real-ip",
        "x-secret-hop",
        "keep-alive",
        "te",
        "proxy-connection",
        "connection",
    ] {
        assert!(h.get(gone).is_none(), "{gone} reached upstream: {h:?}");
    }
    assert_eq!(all("unleash-appname"), vec!["checkout"]);
    assert_eq!(all("x-custom-request"), vec!["kept"]);
    assert_eq!(all("content-type"), vec!["application/json"]);
    assert_eq!(all("content-length"), vec![body.len().to_string()]);

    let r = &seen[1];
    assert_eq!((r.method.as_str(), r.target.as_str()), ("GET", "/api/client/features"));
    assert_eq!(r.header("x-forwarded-host"), Some("second"));
}

/// One raw GET with `extra` header lines; returns what upstream saw.
async fn forwarded_with(extra: &str) -> support::Recorded {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    let req = format!(
        "GET /api/client/features HTTP/1.1\r\nHost: gw.example\r\nAuthorization: {CLIENT}\r\n{extra}Connection: close\r\n\r\n"
    );
    let reply = raw(gw.addr, req.as_bytes()).await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    seen.into_iter().next().unwrap()
}

#[tokio::test]
async fn underscore_spellings_of_forwarding_headers_are_removed_and_authorization_is_kept() {
    let r =
        forwarded_with("X_Forwarded_For: 7.7.7.7\r\nX_Forwarded_Host: evil.example\r\nX_Real_IP: 7.7.7.7\r\n").await;
    for gone in ["x_forwarded_for", "x_forwarded_host", "x_real_ip"] {
        assert!(
            r.headers.get(gone).is_none(),
            "{gone} reached upstream: {:?}",
            r.headers
        );
    }
    assert_eq!(r.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(r.header("x-forwarded-host"), Some("gw.example"));
    assert_eq!(
        r.header("authorization"),
        Some(CLIENT),
        "the client's own Authorization must still reach upstream: {:?}",
        r.headers
    );
}

/// Any header spelled with `_` (common in custom tracing headers) must not cost the request its token:
/// otherwise the gateway allows the request and Unleash then refuses it.
#[tokio::test]
async fn an_unrelated_underscore_header_does_not_strip_authorization() {
    let r = forwarded_with("X_Trace_Id: abc123\r\n").await;
    assert_eq!(r.header("x_trace_id"), Some("abc123"), "unrelated header kept");
    assert_eq!(
        r.header("authorization"),
        Some(CLIENT),
        "Authorization dropped because some other header contains '_': {:?}",
        r.headers
    );
}

#[tokio::test]
async fn upgrade_request_header_is_not_forwarded() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    let req = format!(
        "GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\n\
         Upgrade: websocket\r\nConnection: close, upgrade\r\n\r\n"
    );
    let reply = raw(gw.addr, req.as_bytes()).await;
    let seen = up.seen();
    // Whatever the status (a gateway may refuse an upgrade it cannot honour), the upgrade never goes on.
    for r in &seen {
        assert!(r.header("upgrade").is_none(), "upgrade forwarded: {:?}", r.headers);
        assert!(
            r.header("connection").is_none(),
            "connection forwarded: {:?}",
            r.headers
        );
    }
    assert!(raw_status(&reply) < 500, "{reply}");
}

#[tokio::test]
async fn etag_revalidation_passes_a_304_through() {
    let up = upstream()
        .route("/api/client/features", |r| {
            if r.header("if-none-match") == Some("\"v1\"") {
                Response::builder()
                    .status(StatusCode::NOT_MODIFIED)
                    .header("etag", "\"v1\"")
                    .body(full(Bytes::new()))
                    .unwrap()
            } else {
                Response::builder()
                    .header("etag", "\"v1\"")
                    .header("content-type", "application/json")
                    .body(full(r#"{"version":1,"features":[]}"#))
                    .unwrap()
            }
        })
        .run()
        .await;
    // Forwarding itself: the shield (which answers these from its cache) is off.
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .shield_off()
        .start()
        .await;

    let first = send(get_req(gw.url("/api/client/features")).body(empty()).unwrap()).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["etag"], "\"v1\"");
    assert_eq!(first.text(), r#"{"version":1,"features":[]}"#);

    let again = send(
        get_req(gw.url("/api/client/features"))
            .header("if-none-match", "\"v1\"")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty(), "304 has no body: {:?}", again.body);
    assert_eq!(again.headers["etag"], "\"v1\"");
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("if-none-match"), None);
    assert_eq!(seen[1].header("if-none-match"), Some("\"v1\""));
}

#[tokio::test]
async fn compressed_bodies_are_passed_through_untouched() {
    let payload = binary(256 * 40);
    let p = payload.clone();
    let up = upstream()
        .route("/api/client/features", move |_| {
            Response::builder()
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(full(p.clone()))
                .unwrap()
        })
        .run()
        .await;
    // Forwarding itself: the shield (which answers these from its cache) is off.
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .shield_off()
        .start()
        .await;
    let r = send(
        get_req(gw.url("/api/client/features"))
            .header("accept-encoding", "gzip, deflate, br")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-encoding"], "gzip");
    assert_eq!(r.headers["content-length"], payload.len().to_string().as_str());
    assert!(
        r.body[..] == payload[..],
        "compressed bytes changed ({} bytes received)",
        r.body.len()
    );
    assert_eq!(up.seen()[0].header("accept-encoding"), Some("gzip, deflate, br"));
}

/// Reads frames until the collected data contains `want`, failing after `limit`.
async fn read_until(body: &mut hyper::body::Incoming, acc: &mut Vec<u8>, want: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while !String::from_utf8_lossy(acc).contains(want) {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{want:?} did not arrive within {limit:?} (got {:?}): the gateway buffers the stream",
                    String::from_utf8_lossy(acc)
                )
            })
            .unwrap_or_else(|| panic!("stream ended before {want:?}"))
            .expect("stream error");
        if let Some(d) = frame.data_ref() {
            acc.extend_from_slice(d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_are_streamed_event_by_event() {
    let (stream_route, mut streams) = event_streams();
    let up = upstream()
        .route("/api/client/streaming", move |r| {
            let mut resp = stream_route(r);
            resp.headers_mut()
                .insert("cache-control", http::HeaderValue::from_static("no-cache"));
            resp
        })
        .run()
        .await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let req = Request::get(gw.url("/api/client/streaming"))
        .header("authorization", CLIENT)
        .header("accept", "text/event-stream")
        .body(Empty::new())
        .unwrap();
    let pending = tokio::spawn(client.request(req));

    let events = streams.next().await;
    let ev1 = "event: unleash-connected\ndata: {\"id\":1}\n\n";
    let ev2 = "event: unleash-updated\ndata: {\"id\":2}\n\n";
    events.send(Bytes::from(ev1)).await.unwrap();

    let resp = tokio::time::timeout(patience(Duration::from_secs(5)), pending)
        .await
        .expect("response head did not arrive while the stream is open")
        .unwrap()
        .expect("request failed");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut acc = Vec::new();
    read_until(&mut body, &mut acc, "\"id\":1", patience(Duration::from_secs(3))).await;
    assert_eq!(
        String::from_utf8_lossy(&acc),
        ev1,
        "event 1 alone, before event 2 exists"
    );

    events.send(Bytes::from(ev2)).await.unwrap();
    read_until(&mut body, &mut acc, "\"id\":2", patience(Duration::from_secs(3))).await;
    assert_eq!(String::from_utf8_lossy(&acc), format!("{ev1}{ev2}"));

    drop(events);
    let end = tokio::time::timeout(patience(Duration::from_secs(3)), body.collect())
        .await
        .expect("stream did not end after upstream closed it")
        .expect("clean end");
    assert!(end.to_bytes().is_empty());
}

/// `upstream_timeout` bounds the wait for response headers only: a started stream is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_stream_outlives_the_upstream_timeout() {
    let (stream_route, mut streams) = event_streams();
    let up = upstream().route("/api/client/streaming", stream_route).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| s.upstream_timeout = Some("300ms".into()))
        .start()
        .await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let req = Request::get(gw.url("/api/client/streaming"))
        .header("authorization", CLIENT)
        .body(Empty::new())
        .unwrap();
    let pending = tokio::spawn(client.request(req));
    let events = streams.next().await;
    events.send(Bytes::from("data: 1\n\n")).await.unwrap();
    let resp = tokio::time::timeout(patience(Duration::from_secs(5)), pending)
        .await
        .expect("no response head")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut acc = Vec::new();
    read_until(&mut body, &mut acc, "data: 1", patience(Duration::from_secs(3))).await;
    for i in 2..=3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        events.send(Bytes::from(format!("data: {i}\n\n"))).await.unwrap();
        read_until(
            &mut body,
            &mut acc,
            &format!("data: {i}"),
            patience(Duration::from_secs(3)),
        )
        .await;
    }
    assert_eq!(String::from_utf8_lossy(&acc), "data: 1\n\ndata: 2\n\ndata: 3\n\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_body_arrives_intact() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    let big: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(7) % 251) as u8)
        .collect();
    let r = send(
        Request::post(gw.url("/api/client/metrics"))
            .header("authorization", CLIENT)
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::from(big.clone())))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.len(), big.len());
    assert!(seen[0].body[..] == big[..], "request body changed in transit");
}

#[tokio::test]
async fn h2c_prior_knowledge_clients_are_served_and_forwarded_as_http11() {
    let up = upstream()
        .route("/api/client/features", |_| ok_json(r#"{"features":["h2"]}"#))
        .run()
        .await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = Request::get(gw.url("/api/client/features?project=default&x=%2e%2e"))
        .header("authorization", CLIENT)
        .body(empty())
        .unwrap();
    let resp = tokio::time::timeout(patience(Duration::from_secs(10)), client.request(req))
        .await
        .expect("h2c request timed out")
        .expect("h2c request failed");
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"{"features":["h2"]}"#);

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, Version::HTTP_11);
    assert_eq!(seen[0].target, "/api/client/features?project=default&x=%2e%2e");
    assert_eq!(seen[0].header("authorization"), Some(CLIENT));
    assert_eq!(seen[0].header("x-forwarded-host"), Some(gw.addr.to_string().as_str()));
}
