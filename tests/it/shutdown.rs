//! SIGTERM on the real binary: readiness flips at once, no new connections, the in-flight request
//! finishes, an event stream is ended cleanly, and the process exits 0 within the grace period.
use crate::support::binary::{spawn, Process};
use crate::support::patience;
use crate::support::upstream::{channel_body, event_stream};
use crate::support::{get, upstream};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::time::{Duration, Instant};

const CLIENT: &str = "*:development.shutdown-client-0123456789abcdef";

fn start_binary(upstream: &str, dir: &std::path::Path, extra: &[&str]) -> Process {
    let tokens = dir.join("tokens.yaml");
    std::fs::write(&tokens, format!("tokens:\n  - secret: {CLIENT:?}\n    type: client\n")).unwrap();
    let mut args = vec!["run", "--upstream", upstream, "--token-file", tokens.to_str().unwrap()];
    args.extend_from_slice(extra);
    spawn(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_and_exits_zero() {
    let up = upstream()
        .route("/api/client/features", |_| {
            // A slow response: headers now, the body 1.5 s later.
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let _ = tx.send(Bytes::from_static(b"{\"features\":[\"slow\"]}")).await;
            });
            http::Response::builder()
                .header("content-type", "application/json")
                .body(body)
                .unwrap()
        })
        .route("/api/client/streaming", |_| {
            let (tx, resp) = event_stream();
            tokio::spawn(async move {
                for i in 0..300 {
                    if tx
                        .send(Bytes::from(format!("event: update\ndata: {i}\n\n")))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            resp
        })
        .run()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = start_binary(&up.url(), dir.path(), &["--shutdown-grace", "5s"]);
    assert_eq!(get(gw.admin, "/ready", None).await.status, 200);

    // An open event stream.
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("http://{}/api/client/streaming", gw.proxy))
        .header("authorization", CLIENT)
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut stream = client.request(req).await.unwrap().into_body();
    let first = tokio::time::timeout(patience(Duration::from_secs(3)), stream.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.data_ref().is_some());

    // A slow request in flight.
    let proxy = gw.proxy;
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let r = get(proxy, "/api/client/features", Some(CLIENT)).await;
        (r.status.as_u16(), r.text(), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    gw.sigterm();
    tokio::time::sleep(patience(Duration::from_millis(200))).await;
    let ready = get(gw.admin, "/ready", None).await;
    assert_eq!(ready.status, 503, "readiness flips at once");
    assert_eq!(ready.json()["reason"], "shutting down");
    assert!(
        tokio::net::TcpStream::connect(gw.proxy).await.is_err(),
        "new connections are refused"
    );

    // The event stream ends cleanly (no error), well before the grace period.
    let ended = tokio::time::timeout(patience(Duration::from_secs(3)), async {
        loop {
            match stream.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Ok(()),
            }
        }
    })
    .await
    .expect("event stream still open after shutdown began");
    assert_eq!(ended, Ok(()), "event stream ended with an error");

    let (status, body, took) = slow.await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "{\"features\":[\"slow\"]}"),
        "in-flight request completed"
    );
    assert!(took >= Duration::from_millis(1400));

    let (gw, exit) = tokio::task::spawn_blocking(move || {
        let exit = gw.wait_exit(patience(Duration::from_secs(6)));
        (gw, exit)
    })
    .await
    .unwrap();
    let status = exit.expect("process did not exit within the grace period");
    assert!(status.success(), "exit status {status:?}");
    assert!(signalled.elapsed() < patience(Duration::from_secs(5)));
    let log = gw.stderr();
    assert!(log.contains("shutdown requested"), "{log}");
}
