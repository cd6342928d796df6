//! When Unleash is down, slow or rude, the client gets a prompt, well-formed JSON error (502/504 with a
//! stable `code` and no upstream detail), and the gateway goes on serving.
use crate::support::binary::refusing_port;
use crate::support::patience;
use crate::support::{gateway, get, Reply};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const CLIENT: &str = "*:development.upstream-errors-client-0123456789abcdef";
const UNKNOWN: &str = "*:development.upstream-errors-unknown-0123456789abcdef";

/// A hand-rolled upstream, for behaviour a well-behaved HTTP server will not show. It reads one request
/// head per connection and, by path: `/hang` keeps the connection open and never answers; `/close` hangs
/// up without a byte; anything else gets `200 {"ok":true}` and `Connection: close`. Every request line is
/// reported on the returned channel.
struct Scripted {
    addr: SocketAddr,
    heads: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn scripted(listener: TcpListener) -> Scripted {
    let addr = listener.local_addr().unwrap();
    let (tx, heads) = mpsc::unbounded_channel();
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            let held = held.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                let line = head.lines().next().unwrap_or("").to_string();
                let _ = tx.send(line.clone());
                if line.contains("/hang") {
                    held.lock().unwrap().push(s);
                } else if line.contains("/close") {
                    drop(s);
                } else {
                    let body = r#"{"ok":true}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    Scripted { addr, heads, task }
}

fn assert_gateway_error(r: &Reply, status: u16, code: &str, upstream: SocketAddr) {
    assert_eq!(r.status.as_u16(), status, "{}", r.text());
    assert_eq!(r.json()["code"], code, "{}", r.text());
    assert!(r.json()["message"].is_string(), "{}", r.text());
    assert_eq!(r.headers["content-type"], "application/json; charset=utf-8");
    assert_eq!(r.headers["cache-control"], "no-store", "errors must not be cached");
    let text = r.text();
    assert!(
        !text.contains(&upstream.port().to_string()) && !text.contains("127.0.0.1"),
        "upstream detail leaked to the client: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_502_upstream_unreachable_and_service_resumes_when_upstream_returns() {
    // Nothing listens there, and no other process can take the port while the test holds it.
    let (held, addr) = refusing_port();
    // Forwarding itself: with the shield, a cold key in an outage is retried only after its backoff.
    let gw = gateway()
        .upstream(format!("http://{addr}"))
        .token(CLIENT, "client")
        .shield_off()
        .start()
        .await;

    for _ in 0..3 {
        let started = Instant::now();
        let r = get(gw.addr, "/api/client/features", Some(CLIENT)).await;
        assert_gateway_error(&r, 502, "upstream_unreachable", addr);
        assert!(
            started.elapsed() < patience(Duration::from_secs(2)),
            "refusal is immediate, not a timeout"
        );
    }
    // Decisions that need no upstream are unaffected.
    let r = get(gw.addr, "/api/client/features", Some(UNKNOWN)).await;
    assert_eq!(r.status, 401);
    assert_eq!(get(gw.admin, "/health", None).await.status, 200);

    // Unleash comes back on the same address: the very next request goes through.
    let mut up = scripted(held.listen(128).expect("listen on the held port"));
    let r = get(gw.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), r#"{"ok":true}"#);
    assert_eq!(up.heads.recv().await.unwrap(), "GET /api/client/features HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_answers_is_504_upstream_timeout_after_the_configured_timeout() {
    let mut up = scripted(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let gw = gateway()
        .upstream(format!("http://{}", up.addr))
        .token(CLIENT, "client")
        .settings(|s| s.upstream_timeout = Some("300ms".into()))
        .start()
        .await;

    for _ in 0..2 {
        let started = Instant::now();
        let r = get(gw.addr, "/api/client/hang", Some(CLIENT)).await;
        let took = started.elapsed();
        assert_gateway_error(&r, 504, "upstream_timeout", up.addr);
        assert!(
            took >= Duration::from_millis(280),
            "answered before the timeout: {took:?}"
        );
        assert!(
            took < patience(Duration::from_secs(2)),
            "timeout not enforced promptly: {took:?}"
        );
        assert_eq!(up.heads.recv().await.unwrap(), "GET /api/client/hang HTTP/1.1");
    }

    // The gateway keeps serving, through the same upstream.
    let r = get(gw.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(gw.admin, "/health", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_upstream_request_does_not_block_other_requests() {
    let mut up = scripted(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let gw = gateway()
        .upstream(format!("http://{}", up.addr))
        .token(CLIENT, "client")
        .settings(|s| s.upstream_timeout = Some("2s".into()))
        .start()
        .await;
    let addr = gw.addr;
    let hanging = tokio::spawn(async move { get(addr, "/api/client/hang", Some(CLIENT)).await });
    assert_eq!(up.heads.recv().await.unwrap(), "GET /api/client/hang HTTP/1.1");

    let started = Instant::now();
    let r = get(gw.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < patience(Duration::from_secs(1)),
        "{:?}",
        started.elapsed()
    );
    assert!(!hanging.is_finished(), "the hanging request must still be waiting");

    let r = tokio::time::timeout(patience(Duration::from_secs(5)), hanging)
        .await
        .expect("hanging request was never timed out")
        .unwrap();
    assert_gateway_error(&r, 504, "upstream_timeout", up.addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_hanging_up_without_an_answer_is_502_upstream_failed() {
    let mut up = scripted(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let gw = gateway()
        .upstream(format!("http://{}", up.addr))
        .token(CLIENT, "client")
        .start()
        .await;
    let started = Instant::now();
    let r = get(gw.addr, "/api/client/close", Some(CLIENT)).await;
    assert_gateway_error(&r, 502, "upstream_failed", up.addr);
    assert!(started.elapsed() < patience(Duration::from_secs(2)));
    assert_eq!(up.heads.recv().await.unwrap(), "GET /api/client/close HTTP/1.1");

    let r = get(gw.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}
