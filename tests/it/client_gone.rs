//! A client that leaves mid-request still leaves a trace: every request is logged and counted whatever
//! its fate (status 499, decision `client_gone`), its connection's timeouts keep working, and a client
//! that abandons forwarded requests in a loop is cut off without costing Unleash a new connection each.
use crate::support;
use crate::support::patience;

use crate::support::client::h2;
use crate::support::metrics::{metric, metric_eventually, scrape};
use crate::support::poll::within;
use crate::support::upstream::ok_json;
use crate::support::{gateway, upstream};
use bytes::Bytes;
use http_body_util::Full;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const CLIENT: &str = "*:development.gone-client-0123456789abcdef";

/// The access-log line of the request with this id, once written.
async fn access_line(id: &str) -> Option<serde_json::Value> {
    support::logs::find(patience(Duration::from_secs(5)), |l| {
        l["target"] == "flaggate::access" && l["request_id"] == id
    })
    .await
}

fn features(addr: std::net::SocketAddr, id: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(format!("http://{addr}/api/client/features"))
        .header("authorization", CLIENT)
        .header("x-request-id", id)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

const GONE: &str =
    "flaggate_requests_total{decision=\"client_gone\",method=\"GET\",route_class=\"client\",status=\"499\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_leaves_is_logged_and_counted_and_its_h2_connection_still_times_out() {
    support::logs::capture();
    let up = upstream()
        .delay("/api/client/features", Duration::from_millis(600))
        .route("*", |_| ok_json(r#"{"features":[]}"#))
        .run()
        .await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .shield_off()
        .settings(|s| s.idle_timeout = Some("1s".into()))
        .start()
        .await;

    // HTTP/2: the client resets the stream while Unleash is still answering.
    let mut conn = h2(gw.addr).await;
    conn.ready().await.unwrap();
    // 150 ms is the client's patience here, set well under the upstream's 600 ms: not a bound to stretch.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(150),
        conn.send_request(features(gw.addr, "gone-h2")),
    )
    .await;
    assert!(gave_up.is_err(), "the slow upstream answered too soon for the test");
    let line = access_line("gone-h2")
        .await
        .expect("no access-log line for a request whose client left");
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["decision"], "client_gone", "{line}");
    assert_eq!(line["reason"], "client_gone", "{line}");
    assert_eq!(line["path"], "/api/client/features", "{line}");
    assert!(
        line["upstream_us"].as_u64().is_some(),
        "forwarded, so upstream time is known: {line}"
    );
    // The connection's in-flight count came back to zero: its idle timeout applies again.
    let closed = within(patience(Duration::from_secs(5)), || {
        let closed = conn.is_closed();
        async move { closed }
    })
    .await;
    assert!(
        closed.is_some(),
        "an idle HTTP/2 connection outlived its idle timeout after a reset stream"
    );

    // HTTP/1.1: the client hangs up (as `curl -m 0.3` would).
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "GET /api/client/features HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nX-Request-Id: gone-h1\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(s);
    let line = access_line("gone-h1")
        .await
        .expect("no access-log line for an HTTP/1.1 client that hung up");
    assert_eq!(line["status"], 499, "{line}");

    let scrape = scrape(gw.admin).await;
    assert_eq!(scrape.value(GONE), 2.0, "both departures counted");
    assert_eq!(scrape.value("flaggate_inflight_requests"), 0.0);
    // Unleash saw both, and each exchange was finished in the background rather than cut.
    metric_eventually(
        gw.admin,
        "flaggate_upstream_inflight",
        |v| v == 0.0,
        patience(Duration::from_secs(3)),
    )
    .await;
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resetting_forwarded_streams_is_cut_off_past_its_budget_without_upstream_connection_churn() {
    support::logs::capture();
    let up = upstream()
        .delay("/api/client/features", Duration::from_millis(30))
        .route("*", |_| ok_json(r#"{"features":[]}"#))
        .run()
        .await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .shield_off()
        .start()
        .await;
    let mut conn = h2(gw.addr).await;
    let mut sent = 0;
    for i in 0..400 {
        if conn.ready().await.is_err() {
            break;
        }
        // Wait until the gateway surely forwarded it, then reset.
        let _ = tokio::time::timeout(
            Duration::from_millis(8),
            conn.send_request(features(gw.addr, &format!("reset-{i}"))),
        )
        .await;
        sent += 1;
    }
    let closed = within(patience(Duration::from_secs(5)), || {
        let closed = conn.is_closed();
        async move { closed }
    })
    .await;
    assert!(
        closed.is_some(),
        "a connection resetting {sent} forwarded streams was never cut off"
    );
    let budget = 100;
    assert!(sent > budget, "cut off after only {sent} resets");
    assert!(sent < 300, "{sent} resets before the connection was cut");
    assert_eq!(
        metric(gw.admin, "flaggate_connections_closed_total{reason=\"cancel_budget\"}").await,
        1.0
    );
    // Each abandoned exchange was finished and its connection kept in the pool: a handful of upstream
    // connections, not one per reset.
    let forwarded = up.count();
    assert!(forwarded > budget, "only {forwarded} reached Unleash");
    assert!(
        up.connections() <= 20,
        "{} upstream connections for {forwarded} abandoned requests",
        up.connections()
    );
}
