//! The admin listener: liveness, readiness (including draining at shutdown), and a Prometheus scrape
//! whose request counters move exactly and which never shows a token.
use crate::support;
use crate::support::patience;

use crate::support::metrics::{samples, scrape, Scrape};
use crate::support::upstream::ok_json;
use crate::support::{gateway, get, upstream};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::time::{Duration, Instant};

const CLIENT: &str = "*:development.admin-test-client-secret-0123456789";
const FRONTEND: &str = "default:development.admin-test-frontend-secret-0123456789";
const UNKNOWN: &str = "*:development.admin-test-unknown-secret-0123456789";

/// The series counting GETs on the client API with this status and decision.
fn requests(status: &str, decision: &str) -> String {
    format!(
        "flaggate_requests_total{{route_class=\"client\",method=\"GET\",status=\"{status}\",decision=\"{decision}\"}}"
    )
}

#[tokio::test]
async fn health_reports_good() {
    let gw = gateway().token(CLIENT, "client").start().await;
    let r = get(gw.admin, "/health", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"health": "GOOD"}));
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
}

#[tokio::test]
async fn unknown_admin_paths_are_404_and_other_methods_405() {
    let gw = gateway().token(CLIENT, "client").start().await;
    assert_eq!(get(gw.admin, "/api/client/features", Some(CLIENT)).await.status, 404);
    let r = support::send(
        Request::post(format!("http://{}/ready", gw.admin))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn metrics_are_served_on_the_admin_port_only() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    let r = get(gw.addr, "/metrics", None).await;
    assert_eq!(r.status, 401, "the proxy port treats /metrics like any other path");
    assert!(!r.text().contains("flaggate_"), "{}", r.text());
    let r = get(gw.addr, "/health", Some(CLIENT)).await;
    assert_eq!(
        r.status,
        403,
        "a client token cannot reach unmatched paths: {}",
        r.text()
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_each_decision_exactly_and_never_show_a_secret() {
    let up = upstream().route("*", |_| ok_json(r#"{"features":[]}"#)).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .token(FRONTEND, "frontend")
        .start()
        .await;

    let before = get(gw.admin, "/metrics", None).await;
    assert_eq!(before.status, 200);
    assert!(
        before.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        before.headers
    );
    let before = Scrape::parse(before.text());
    assert_eq!(
        before.value(&format!(
            "flaggate_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    // A request series appears with its first request: before any, it is absent (or 0).
    assert_eq!(before.get(&requests("200", "allowed")).unwrap_or(0.0), 0.0);
    assert_eq!(before.value("flaggate_ready"), 1.0);
    assert_eq!(before.value("flaggate_tokens{kind=\"client\",source=\"file\"}"), 1.0);

    assert_eq!(get(gw.addr, "/api/client/features", Some(CLIENT)).await.status, 200);
    assert_eq!(get(gw.addr, "/api/client/features", Some(UNKNOWN)).await.status, 401);

    let after = scrape(gw.admin).await;
    assert!(
        after.text.contains("# TYPE flaggate_requests_total counter"),
        "{}",
        after.text
    );
    assert_eq!(after.value(&requests("200", "allowed")), 1.0, "{}", after.text);
    assert_eq!(after.value(&requests("401", "unauthenticated")), 1.0, "{}", after.text);
    let total: f64 = samples(&after.text)
        .iter()
        .filter(|s| s.name == "flaggate_requests_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(total, 2.0, "exactly the two requests were counted");
    // Rendered exactly as Prometheus expects (labels in alphabetical order).
    assert!(
        after.text.contains(
            "flaggate_requests_total{decision=\"allowed\",method=\"GET\",route_class=\"client\",status=\"200\"} 1\n"
        ),
        "{}",
        after.text
    );

    for secret in [CLIENT, FRONTEND, UNKNOWN] {
        let tail = secret.rsplit('.').next().unwrap();
        for scrape in [&before.text, &after.text] {
            assert!(!scrape.contains(tail), "a token secret appears in the scrape");
        }
    }
}

/// Sends GET `path` on an already-open HTTP/1 connection.
async fn on_conn(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>, path: &str) -> (u16, String) {
    tokio::time::timeout(patience(Duration::from_secs(5)), sender.ready())
        .await
        .expect("connection never became ready")
        .expect("admin connection was closed");
    let req = Request::get(path).header("host", "admin").body(Empty::new()).unwrap();
    let resp = tokio::time::timeout(patience(Duration::from_secs(5)), sender.send_request(req))
        .await
        .expect("admin request timed out")
        .expect("admin request failed");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_while_serving_then_draining_at_shutdown() {
    let gw = gateway().token(CLIENT, "client").start().await;
    let r = get(gw.admin, "/ready", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["ready"], true);

    // A probe connection that is already open keeps working through shutdown and sees the drain.
    let stream = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(on_conn(&mut sender, "/ready").await.0, 200);

    gw.running.as_ref().unwrap().shutdown();
    let (status, body) = on_conn(&mut sender, "/ready").await;
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["ready"], false);
    let (status, metrics) = on_conn(&mut sender, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        Scrape::parse(metrics).value("flaggate_ready"),
        0.0,
        "the gauge follows /ready"
    );

    // The admin port stays up for the drain, so new probes see 503 rather than a refused connection...
    let r = get(gw.admin, "/ready", None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(get(gw.admin, "/health", None).await.status, 200, "alive while draining");

    // ...while the proxy port stops accepting new connections.
    let started = Instant::now();
    while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
        assert!(
            started.elapsed() < patience(Duration::from_secs(3)),
            "the proxy port still accepts connections after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_starve_the_probes() {
    let _fds = support::fd_heavy().await;
    let gw = gateway().token(CLIENT, "client").start().await;
    // More idle connections than the admin listener serves at once (256), opened before any probe.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(gw.admin).await.unwrap());
    }
    for path in ["/health", "/ready"] {
        let started = Instant::now();
        let limit = patience(Duration::from_secs(1));
        let r = tokio::time::timeout(limit, get(gw.admin, path, None))
            .await
            .unwrap_or_else(|_| panic!("{path} did not answer within {limit:?} behind 300 idle connections"));
        assert_eq!(r.status, 200, "{path}");
        assert!(started.elapsed() < limit);
    }
    drop(idle);
}
