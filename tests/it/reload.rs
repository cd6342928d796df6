//! Config hot reload: route rules change without a restart; a broken file keeps the old rules.
use crate::support;

use crate::support::metrics::{metric, metric_eventually, scrape};
use crate::support::patience;
use crate::support::poll::{status_within, within};
use crate::support::upstream::ok_json;
use crate::support::{gateway, get, upstream};
use std::time::Duration;

const CLIENT: &str = "*:development.reload-client-0123456789abcdef";
const ADMIN: &str = "*:*.reload-admin-0123456789abcdef";

async fn status_becomes(gw: &support::TestGateway, path: &str, token: &str, want: u16, limit: Duration) -> bool {
    status_within(gw.addr, path, Some(token), want, limit).await.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_rules_reload_without_restart_and_a_broken_file_keeps_the_old_ones() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .token(ADMIN, "admin")
        .config("max_request_body = \"1MiB\"\n")
        .start()
        .await;
    let config = gw.dir.path().join("flaggate.toml");
    assert_eq!(
        get(gw.addr, "/health", Some(CLIENT)).await.status,
        403,
        "default: admin only"
    );

    // Open /health to client tokens by editing the file.
    std::fs::write(
        &config,
        "max_request_body = \"1MiB\"\n[[routes]]\nname = \"health\"\nprefix = \"/health\"\nallow = [\"client\", \"admin\"]\n",
    )
    .unwrap();
    assert!(
        status_becomes(&gw, "/health", CLIENT, 200, patience(Duration::from_secs(3))).await,
        "rule not applied"
    );
    let m = scrape(gw.admin).await;
    assert_eq!(m.value("flaggate_config_reloads_total{result=\"ok\"}"), 1.0);
    assert_eq!(m.value("flaggate_config_last_reload_success"), 1.0);

    // A broken edit: unknown key. The old rules keep serving and the failure is counted.
    std::fs::write(&config, "max_request_body = \"1MiB\"\nroutez = 1\n").unwrap();
    // The watcher processed the edit: the failure is counted (then the old rules must still serve).
    metric_eventually(
        gw.admin,
        "flaggate_config_reloads_total{result=\"error\"}",
        |v| v >= 1.0,
        patience(Duration::from_secs(3)),
    )
    .await;
    assert_eq!(metric(gw.admin, "flaggate_config_last_reload_success").await, 0.0);
    assert_eq!(
        get(gw.addr, "/health", Some(CLIENT)).await.status,
        200,
        "old rules kept"
    );

    // Fixing the file applies again; removing the rule restores the default.
    std::fs::write(&config, "max_request_body = \"1MiB\"\n").unwrap();
    assert!(status_becomes(&gw, "/health", CLIENT, 403, patience(Duration::from_secs(3))).await);
    assert_eq!(get(gw.addr, "/health", Some(ADMIN)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_reload_applies_limits_to_new_requests() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .config("max_request_body = \"1MiB\"\n")
        .start()
        .await;
    let post = |n: usize| {
        let body = "x".repeat(n);
        format!("POST /api/client/metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: {CLIENT}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{body}")
    };
    assert_eq!(
        support::client::raw_status(&support::raw(gw.addr, post(4000).as_bytes()).await),
        200
    );
    std::fs::write(gw.dir.path().join("flaggate.toml"), "max_request_body = \"1KiB\"\n").unwrap();
    // What SIGHUP does; the file watcher would also pick it up.
    gw.running.as_ref().unwrap().reload();
    let applied = within(patience(Duration::from_secs(3)), || async {
        support::client::raw_status(&support::raw(gw.addr, post(4000).as_bytes()).await) == 413
    })
    .await;
    assert!(applied.is_some(), "new body limit not applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_config_directory_does_not_trigger_reloads() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .config("max_request_body = \"1MiB\"\n")
        .start()
        .await;
    let config = gw.dir.path().join("flaggate.toml");
    let inflight_cap = metric(gw.admin, "flaggate_upstream_max_inflight").await;
    assert_ne!(inflight_cap, 7.0, "the marker below must be a change");
    // A log file (or anything else) written next to the config file, again and again.
    let noise = gw.dir.path().join("flaggate.log");
    for i in 0..20 {
        std::fs::write(&noise, format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A pause, so that a reload the noise caused would be over before the real change below.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        metric(gw.admin, "flaggate_config_reloads_total{result=\"ok\"}").await,
        0.0,
        "reloaded on unrelated events"
    );
    // A real change, with a marker that shows when it is in effect. The watcher takes events in order,
    // so once the marker shows, the noise was seen first: the one reload counted is this change's.
    // (Ignoring the noise itself is not observable: watch_files drops those events silently.)
    std::fs::write(&config, "max_request_body = \"2MiB\"\nupstream_max_inflight = 7\n").unwrap();
    metric_eventually(
        gw.admin,
        "flaggate_upstream_max_inflight",
        |v| v == 7.0,
        patience(Duration::from_secs(3)),
    )
    .await;
    assert_eq!(
        metric(gw.admin, "flaggate_config_reloads_total{result=\"ok\"}").await,
        1.0,
        "a real change is reloaded exactly once, and the noise never"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_slots_are_resized_by_a_reload_without_dropping_open_streams() {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    let (stream_route, mut streams) = support::upstream::event_streams();
    let up = upstream()
        .route("/api/client/streaming", stream_route)
        .route("/api/client/features", |_| ok_json("{}"))
        .run()
        .await;
    let gw = gateway()
        .shield_off()
        .upstream(up.url())
        .token(CLIENT, "client")
        .config(
            "upstream_max_inflight = 1\nupstream_max_inflight_per_token = 10\nupstream_connect_timeout = \"300ms\"\n",
        )
        .start()
        .await;
    // An event stream holds the one slot.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let req = http::Request::get(format!("http://{}/api/client/streaming", gw.addr))
        .header("authorization", CLIENT)
        .body(http_body_util::Empty::new())
        .unwrap();
    let stream = tokio::spawn(client.request(req));
    let events = streams.next().await;
    events.send(Bytes::from("data: 1\n\n")).await.unwrap();
    let mut stream = stream.await.unwrap().unwrap().into_body();
    assert!(stream.frame().await.is_some());
    assert_eq!(get(gw.addr, "/api/client/features", Some(CLIENT)).await.status, 503);

    std::fs::write(
        gw.dir.path().join("flaggate.toml"),
        "upstream_max_inflight = 2\nupstream_max_inflight_per_token = 10\nupstream_connect_timeout = \"300ms\"\n",
    )
    .unwrap();
    gw.running.as_ref().unwrap().reload();
    assert!(
        status_becomes(
            &gw,
            "/api/client/features",
            CLIENT,
            200,
            patience(Duration::from_secs(3))
        )
        .await,
        "the raised cap was not applied"
    );
    assert_eq!(metric(gw.admin, "flaggate_upstream_max_inflight").await, 2.0);
    // The stream that held the slot all along is still open.
    events.send(Bytes::from("data: 2\n\n")).await.unwrap();
    let next = tokio::time::timeout(patience(Duration::from_secs(2)), stream.frame()).await;
    assert!(matches!(next, Ok(Some(Ok(_)))), "the open stream was cut by the reload");
}
