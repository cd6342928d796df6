//! Proxy worker threads: each client connection stays on one worker, whose own upstream pool serves it.
mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use support::upstream::ok_json;
use support::{gateway, upstream};

const CLIENT: &str = "*:development.workers-client-0123456789abcdef";

/// A keep-alive client connection to the gateway.
async fn connection(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn features(sender: &mut SendRequest<Empty<Bytes>>) -> u16 {
    sender.ready().await.unwrap();
    let req = Request::get("/api/client/features")
        .header("host", "flaggate")
        .header("authorization", CLIENT)
        .body(Empty::new())
        .unwrap();
    sender.send_request(req).await.unwrap().status().as_u16()
}

/// Two client connections taking turns, one request at a time: how many upstream connections carried
/// their requests, and whether each client connection always used the same one.
async fn upstream_connections_for_two_clients(workers: &str) -> (usize, bool) {
    let up = upstream().route("*", |_| ok_json(r#"{"features":[]}"#)).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .settings(|s| s.proxy_workers = Some(workers.into()))
        .start()
        .await;
    let mut a = connection(gw.addr).await;
    let mut b = connection(gw.addr).await;
    let mut turns = Vec::new();
    for _ in 0..3 {
        for (name, c) in [("a", &mut a), ("b", &mut b)] {
            assert_eq!(features(c).await, 200);
            turns.push(name);
        }
    }
    let peers: Vec<SocketAddr> = up.seen().iter().map(|r| r.peer).collect();
    assert_eq!(peers.len(), turns.len(), "every request reached the upstream once");
    let distinct: BTreeSet<_> = peers.iter().collect();
    let by_client = |who| {
        turns
            .iter()
            .zip(&peers)
            .filter(|(t, _)| **t == who)
            .map(|(_, p)| p)
            .collect::<BTreeSet<_>>()
    };
    (distinct.len(), by_client("a").len() == 1 && by_client("b").len() == 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_workers_each_client_connection_has_its_own_workers_upstream_pool() {
    // The least loaded worker takes each new connection: a and b land on different workers, and
    // sequential requests cannot share one upstream connection across workers' pools.
    let (upstream_conns, sticky) = upstream_connections_for_two_clients("2").await;
    assert_eq!(upstream_conns, 2);
    assert!(
        sticky,
        "a client connection's requests moved between upstream connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_worker_all_client_connections_share_one_upstream_pool() {
    // One request at a time through one pool: one idle upstream connection is reused by both clients.
    let (upstream_conns, _) = upstream_connections_for_two_clients("1").await;
    assert_eq!(upstream_conns, 1);
}
