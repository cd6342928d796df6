//! An `https://` Unleash: token sync, PAT checks and forwarded requests all go through the one upstream
//! client, so all three work with `--upstream-ca` (and with a client identity for mTLS), and all three
//! fail the same way without it. (Before the upstream room, sync and PAT checks used a second,
//! plain-HTTP client: forwarding worked and `/ready` stayed 503 forever.)
use crate::support;
use std::time::Duration;
use support::metrics::scrape;
use support::patience;
use support::poll::ready_within;
use support::tls::{server_config, Ca};
use support::unleash::{mock_unleash_tls, MockUnleash};
use support::{gateway, get, TestGateway};

const CLIENT: &str = "*:development.tls-client-0123456789abcdef";
const PAT: &str = "user:tls-pat-0123456789abcdef";

/// A mock Unleash over TLS, its CA, and the directory holding the CA's PEM file.
struct Rig {
    unleash: MockUnleash,
    ca: Ca,
    dir: tempfile::TempDir,
}

async fn rig(client_ca: Option<&Ca>) -> Rig {
    let ca = Ca::new("unleash test CA");
    let unleash = mock_unleash_tls(server_config(&ca.leaf("unleash"), client_ca)).await;
    unleash.state.add(CLIENT, "client", None);
    unleash.state.pats.lock().unwrap().insert(PAT.to_string());
    Rig {
        unleash,
        ca,
        dir: tempfile::tempdir().unwrap(),
    }
}

/// Sync, a PAT check and a forwarded request, each through the TLS upstream.
async fn all_three_work(gw: &TestGateway, unleash: &MockUnleash) {
    assert!(
        ready_within(gw.admin, patience(Duration::from_secs(5))).await.is_some(),
        "the token list was never synced over TLS"
    );
    let r = get(gw.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(r.status, 200, "forwarded over TLS: {}", r.text());
    let r = get(gw.addr, "/api/admin/projects", Some(PAT)).await;
    assert_eq!(r.status, 200, "PAT checked over TLS: {}", r.text());
    assert!(unleash.list_fetches() >= 1);
    assert_eq!(unleash.pat_checks(), 1);
    assert_eq!(unleash.forwarded(), 2);
    let s = scrape(gw.admin).await;
    assert!(s.value("flaggate_token_sync_total{result=\"ok\"}") >= 1.0);
    assert_eq!(s.value("flaggate_pat_validations_total{result=\"valid\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pat_checks_and_forwarding_all_use_the_upstream_ca() {
    let r = rig(None).await;
    assert!(r.unleash.url().starts_with("https://"));
    let ca = r.ca.write(r.dir.path(), "unleash-ca.pem");
    let gw = gateway()
        .upstream(r.unleash.url())
        .unleash_sync("1s")
        .without_token_file()
        .settings(|s| s.upstream_ca = Some(ca.display().to_string()))
        .start()
        .await;
    all_three_work(&gw, &r.unleash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_upstream_ca_all_three_fail_alike_and_say_tls() {
    let r = rig(None).await;
    let gw = gateway()
        .upstream(r.unleash.url())
        .unleash_sync("1s")
        .token(CLIENT, "client")
        .start()
        .await;
    // The token file makes CLIENT known, so the request reaches the forwarding step.
    let resp = get(gw.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(resp.json()["code"], "upstream_tls");
    let resp = get(gw.addr, "/api/admin/projects", Some(PAT)).await;
    assert_eq!(resp.status, 502, "a PAT Unleash cannot be asked about: {}", resp.text());
    assert_eq!(
        resp.json()["code"],
        "upstream_tls",
        "says why, like a forwarded request"
    );
    let s = scrape(gw.admin).await;
    assert!(s.value("flaggate_token_sync_total{result=\"error\"}") >= 1.0);
    assert_eq!(s.value("flaggate_token_sync_total{result=\"ok\"}"), 0.0);
    assert_eq!(
        get(gw.admin, "/ready", None).await.status,
        503,
        "never synced: not ready"
    );
    assert_eq!(
        r.unleash.up.count(),
        0,
        "no request got through an untrusted TLS handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_identity_is_presented_for_sync_pat_checks_and_forwarding() {
    let clients = Ca::new("flaggate client CA");
    let r = rig(Some(&clients)).await;
    let ca = r.ca.write(r.dir.path(), "unleash-ca.pem");
    let (cert, key) = clients.leaf("flaggate").write(r.dir.path(), "flaggate-client");
    let gw = gateway()
        .upstream(r.unleash.url())
        .unleash_sync("1s")
        .without_token_file()
        .settings(|s| {
            s.upstream_ca = Some(ca.display().to_string());
            s.upstream_client_cert = Some(cert.display().to_string());
            s.upstream_client_key = Some(key.display().to_string());
        })
        .start()
        .await;
    all_three_work(&gw, &r.unleash).await;

    // The same gateway without the identity is refused by the mTLS Unleash at the handshake.
    let refused = gateway()
        .upstream(r.unleash.url())
        .token(CLIENT, "client")
        .settings(|s| s.upstream_ca = Some(ca.display().to_string()))
        .start()
        .await;
    let resp = get(refused.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
}
