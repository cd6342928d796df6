//! The admin listener: liveness, readiness (including draining at shutdown), and a Prometheus scrape
//! whose request counters move exactly and which never shows a token.
use crate::support;

use crate::support::upstream::ok_json;
use crate::support::{gateway, get, upstream};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const CLIENT: &str = "*:development.admin-test-client-secret-0123456789";
const FRONTEND: &str = "default:development.admin-test-frontend-secret-0123456789";
const UNKNOWN: &str = "*:development.admin-test-unknown-secret-0123456789";

/// One sample of a Prometheus text scrape.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the sample lines of a text exposition (label values here never contain `,` or `"`).
fn samples(scrape: &str) -> Vec<Sample> {
    scrape
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {l:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}').expect("closing brace")),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').expect("label pair");
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            }
        })
        .collect()
}

fn value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples(scrape)
        .into_iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

fn requests(scrape: &str, status: &str, decision: &str) -> Option<f64> {
    value(
        scrape,
        "flaggate_requests_total",
        &[
            ("route_class", "client"),
            ("method", "GET"),
            ("status", status),
            ("decision", decision),
        ],
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
    let before = before.text();
    assert_eq!(
        value(
            &before,
            "flaggate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(requests(&before, "200", "allowed").unwrap_or(0.0), 0.0);
    assert_eq!(value(&before, "flaggate_ready", &[]), Some(1.0));
    assert_eq!(
        value(&before, "flaggate_tokens", &[("kind", "client"), ("source", "file")]),
        Some(1.0)
    );

    assert_eq!(get(gw.addr, "/api/client/features", Some(CLIENT)).await.status, 200);
    assert_eq!(get(gw.addr, "/api/client/features", Some(UNKNOWN)).await.status, 401);

    let after = get(gw.admin, "/metrics", None).await.text();
    assert!(after.contains("# TYPE flaggate_requests_total counter"), "{after}");
    assert_eq!(requests(&after, "200", "allowed"), Some(1.0), "{after}");
    assert_eq!(requests(&after, "401", "unauthenticated"), Some(1.0), "{after}");
    let total: f64 = samples(&after)
        .iter()
        .filter(|s| s.name == "flaggate_requests_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(total, 2.0, "exactly the two requests were counted");
    // Rendered exactly as Prometheus expects (labels in alphabetical order).
    assert!(
        after.contains(
            "flaggate_requests_total{decision=\"allowed\",method=\"GET\",route_class=\"client\",status=\"200\"} 1\n"
        ),
        "{after}"
    );

    for secret in [CLIENT, FRONTEND, UNKNOWN] {
        let tail = secret.rsplit('.').next().unwrap();
        for scrape in [&before, &after] {
            assert!(!scrape.contains(tail), "a token secret appears in the scrape");
        }
    }
}

/// Sends GET `path` on an already-open HTTP/1 connection.
async fn on_conn(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>, path: &str) -> (u16, String) {
    tokio::time::timeout(Duration::from_secs(5), sender.ready())
        .await
        .expect("connection never became ready")
        .expect("admin connection was closed");
    let req = Request::get(path).header("host", "admin").body(Empty::new()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
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
        value(&metrics, "flaggate_ready", &[]),
        Some(0.0),
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
            started.elapsed() < Duration::from_secs(3),
            "the proxy port still accepts connections after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_starve_the_probes() {
    let gw = gateway().token(CLIENT, "client").start().await;
    // More idle connections than the admin listener serves at once (256), opened before any probe.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(gw.admin).await.unwrap());
    }
    for path in ["/health", "/ready"] {
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(1), get(gw.admin, path, None))
            .await
            .unwrap_or_else(|_| panic!("{path} did not answer within 1 s behind 300 idle connections"));
        assert_eq!(r.status, 200, "{path}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    drop(idle);
}
