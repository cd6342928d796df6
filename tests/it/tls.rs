//! TLS termination and TLS to the upstream, with certificates generated here.
use crate::support;
use crate::support::patience;
use crate::support::poll::within;
use crate::support::tls::{connect, Ca};
use crate::support::upstream::ok_json;
use crate::support::{gateway, get, upstream};
use std::time::Duration;

const CLIENT: &str = "*:development.tls-client-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_h2_and_http1_and_certificate_hot_swap() {
    support::logs::capture();
    let up = upstream().route("*", |_| ok_json(r#"{"via":"tls"}"#)).run().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let first = ca.leaf("first");
    let (cert, key) = first.write(dir.path(), "server");
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .tls(&cert, &key)
        .start()
        .await;

    let mut h2 = connect(gw.addr, &ca, &[b"h2", b"http/1.1"], None).await.unwrap();
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    let (status, version, body) = h2.get("/api/client/features", CLIENT).await.unwrap();
    assert_eq!(
        (status, version, body.as_str()),
        (200, http::Version::HTTP_2, r#"{"via":"tls"}"#)
    );

    let mut h1 = connect(gw.addr, &ca, &[b"http/1.1"], None).await.unwrap();
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.get("/api/client/features", CLIENT).await.unwrap().0, 200);
    assert_eq!(
        h1.get("/api/admin/projects", CLIENT).await.unwrap().0,
        403,
        "policy applies over TLS"
    );
    assert_eq!(h1.peer_cert, first.der);
    let seen = up.seen();
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));

    // Swap the pair on disk (key first, then cert, as a renewal tool would).
    let second = ca.leaf("second");
    std::fs::write(&key, &second.key_pem).unwrap();
    std::fs::write(&cert, &second.cert_pem).unwrap();
    let swapped = within(patience(Duration::from_secs(3)), || async {
        connect(gw.addr, &ca, &[b"http/1.1"], None)
            .await
            .map(|c| c.peer_cert == second.der)
            .unwrap_or(false)
    })
    .await;
    assert!(swapped.is_some(), "new connections did not get the new certificate");
    // The connection opened before the swap keeps working.
    assert_eq!(h1.get("/api/client/features", CLIENT).await.unwrap().0, 200);
    assert_eq!(h2.get("/api/client/features", CLIENT).await.unwrap().0, 200);

    // A broken certificate file keeps the current one serving: once the watcher has rejected it (its
    // error names this test's certificate file), the old certificate must still be the one served.
    let cert_path = cert.display().to_string();
    let rejected = |l: &serde_json::Value| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("new TLS certificate rejected"))
            && l["error"].as_str().is_some_and(|e| e.contains(&cert_path))
    };
    let rejections = support::logs::count(rejected);
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    support::logs::wait_for_more(
        "rejecting the broken certificate",
        rejections,
        patience(Duration::from_secs(3)),
        rejected,
    )
    .await;
    let mut c = connect(gw.addr, &ca, &[b"http/1.1"], None)
        .await
        .expect("still serving TLS");
    assert_eq!(c.peer_cert, second.der, "old certificate kept after a bad write");
    assert_eq!(c.get("/api/client/features", CLIENT).await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_clients_without_a_certificate_from_the_ca() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let (cert, key) = ca.leaf("server").write(dir.path(), "server");
    let client_ca = Ca::new("client CA");
    let client_ca_path = client_ca.write(dir.path(), "client-ca.pem");
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .tls(&cert, &key)
        .tls_client_ca(&client_ca_path)
        .start()
        .await;

    // Without a client certificate: the handshake (or the first request, in TLS 1.3) fails.
    let refused = match connect(gw.addr, &ca, &[b"http/1.1"], None).await {
        Err(_) => true,
        Ok(mut c) => c.get("/api/client/features", CLIENT).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    // A certificate from another CA is refused too.
    let stranger = Ca::new("other").leaf("intruder");
    let refused = match connect(gw.addr, &ca, &[b"http/1.1"], Some(&stranger)).await {
        Err(_) => true,
        Ok(mut c) => c.get("/api/client/features", CLIENT).await.is_err(),
    };
    assert!(refused, "a client certificate from an unknown CA was accepted");
    let me = client_ca.leaf("sdk");
    let mut c = connect(gw.addr, &ca, &[b"h2"], Some(&me)).await.unwrap();
    assert_eq!(c.get("/api/client/features", CLIENT).await.unwrap().0, 200);
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_verified_against_the_configured_ca() {
    // The upstream: a plain mock behind a second gateway that terminates TLS with our test CA.
    let mock = upstream()
        .route("*", |_| ok_json(r#"{"from":"tls-upstream"}"#))
        .run()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("upstream CA");
    let (cert, key) = ca.leaf("unleash").write(dir.path(), "upstream");
    let tls_upstream = gateway()
        .upstream(mock.url())
        .token(CLIENT, "client")
        .tls(&cert, &key)
        .start()
        .await;
    let ca_path = ca.write(dir.path(), "ca.pem");
    let url = format!("https://127.0.0.1:{}", tls_upstream.addr.port());

    let trusting = gateway()
        .upstream(url.clone())
        .token(CLIENT, "client")
        .settings(|s| s.upstream_ca = Some(ca_path.display().to_string()))
        .start()
        .await;
    let r = get(trusting.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, r#"{"from":"tls-upstream"}"#)
    );

    // Without the CA the upstream's certificate is unknown: 502 upstream_tls (an operator's problem to
    // fix in the configuration, told apart from an Unleash that is down), and nothing reached the mock.
    let before = mock.count();
    let strict = gateway().upstream(url).token(CLIENT, "client").start().await;
    let r = get(strict.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["code"], "upstream_tls");
    assert_eq!(mock.count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_presents_its_client_certificate_to_an_mtls_upstream() {
    let mock = upstream().route("*", |_| ok_json(r#"{"via":"mtls"}"#)).run().await;
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("upstream CA");
    let (cert, key) = server_ca.leaf("unleash").write(dir.path(), "upstream");
    let client_ca = Ca::new("gateway client CA");
    let client_ca_path = client_ca.write(dir.path(), "client-ca.pem");
    let mtls_upstream = gateway()
        .upstream(mock.url())
        .token(CLIENT, "client")
        .tls(&cert, &key)
        .tls_client_ca(&client_ca_path)
        .start()
        .await;
    let server_ca_path = server_ca.write(dir.path(), "server-ca.pem");
    let url = format!("https://127.0.0.1:{}", mtls_upstream.addr.port());
    let (gw_cert, gw_key) = client_ca.leaf("flaggate").write(dir.path(), "gateway-client");

    let with_identity = gateway()
        .upstream(url.clone())
        .token(CLIENT, "client")
        .settings(|s| {
            s.upstream_ca = Some(server_ca_path.display().to_string());
            s.upstream_client_cert = Some(gw_cert.display().to_string());
            s.upstream_client_key = Some(gw_key.display().to_string());
        })
        .start()
        .await;
    let r = get(with_identity.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, r#"{"via":"mtls"}"#));

    let without = gateway()
        .upstream(url)
        .token(CLIENT, "client")
        .settings(|s| s.upstream_ca = Some(server_ca_path.display().to_string()))
        .start()
        .await;
    let r = get(without.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(
        r.status,
        502,
        "an upstream requiring a client certificate refused us: {}",
        r.text()
    );
    assert_eq!(mock.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_the_tls_handshake_is_cut_at_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = ca.leaf("server").write(dir.path(), "server");
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .tls(&cert, &key)
        .settings(|s| {
            s.header_read_timeout = Some("1s".into());
            s.max_connections = Some("2".into());
        })
        .start()
        .await;

    // Two connections take every slot: one says nothing, one stops inside its ClientHello record.
    let started = std::time::Instant::now();
    let silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
    for mut s in [silent, partial] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(patience(Duration::from_secs(5)), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a stalled handshake was not closed: {read:?}"
        );
    }
    let cut_after = started.elapsed();
    assert!(cut_after >= Duration::from_millis(900), "cut too early: {cut_after:?}");
    assert!(
        cut_after < patience(Duration::from_secs(3)),
        "stalled handshakes held on for {cut_after:?}"
    );

    // Their slots are free again: a real client is served.
    let mut c = connect(gw.addr, &ca, &[b"http/1.1"], None).await.unwrap();
    assert_eq!(c.get("/api/client/features", CLIENT).await.unwrap().0, 200);
}
