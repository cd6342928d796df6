//! Reaching Unleash through a corporate egress proxy: every request to Unleash — forwarding, token sync,
//! PAT checks, shield fills — goes through it, tunnelled with CONNECT for an `https://` Unleash and
//! forwarded in absolute form for an `http://` one, with the proxy's credentials; `NO_PROXY` and
//! `upstream_proxy = none` go direct.

use crate::support;
use std::time::Duration;
use support::binary::{flaggate, spawn_command};
use support::egress::egress_proxy;
use support::poll::ready_within;
use support::tls::{server_config, Ca};
use support::unleash::{mock_unleash, mock_unleash_tls, SYNC_TOKEN};
use support::{gateway, get, patience};

const CLIENT: &str = "*:development.egress-client-0123456789abcdef";
const PAT: &str = "user:egress-pat-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_unleash_is_reached_through_a_connect_tunnel_with_the_proxys_credentials() {
    let proxy = egress_proxy(Some("fg:s3cret")).await;
    let ca = Ca::new("unleash behind the proxy");
    let unleash = mock_unleash_tls(server_config(&ca.leaf("unleash"), None)).await;
    unleash.state.add(CLIENT, "client", None);
    unleash.state.pats.lock().unwrap().insert(PAT.to_string());
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "ca.pem");
    let proxy_url = format!("http://fg:s3cret@{}", proxy.addr);
    let gw = gateway()
        .upstream(unleash.url())
        .unleash_sync("1s")
        .without_token_file()
        .settings(move |s| {
            s.upstream_ca = Some(ca_file.display().to_string());
            s.upstream_proxy = Some(proxy_url);
        })
        .start()
        .await;
    assert!(
        ready_within(gw.admin, patience(Duration::from_secs(5))).await.is_some(),
        "no sync through the proxy"
    );
    assert_eq!(get(gw.addr, "/api/client/features", Some(CLIENT)).await.status, 200);
    assert_eq!(get(gw.addr, "/api/admin/projects", Some(PAT)).await.status, 200);
    let target = format!("CONNECT {} HTTP/1.1", unleash.up.addr);
    let lines = proxy.lines();
    assert!(!lines.is_empty() && lines.iter().all(|l| *l == target), "{lines:?}");
    assert!(
        proxy.auths().iter().all(|a| a.as_deref() == Some("Basic Zmc6czNjcmV0")),
        "{:?}",
        proxy.auths()
    );
    assert!(unleash.list_fetches() >= 1 && unleash.pat_checks() == 1 && unleash.forwarded() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_and_no_proxy_from_the_environment_are_honoured() {
    let proxy = egress_proxy(None).await;
    let unleash = mock_unleash().await;
    unleash.state.add(CLIENT, "client", None);
    let run = |env: &[(&str, String)], extra: &[&str]| {
        let mut cmd = flaggate();
        cmd.args([
            "run",
            "--upstream",
            &unleash.url(),
            "--upstream-token",
            SYNC_TOKEN,
            "--sync-interval",
            "1s",
        ]);
        cmd.args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        spawn_command(&mut cmd)
    };
    // HTTP_PROXY (lowercase too) for an http:// Unleash: absolute-form requests through the proxy.
    let through = run(&[("http_proxy", proxy.url())], &[]);
    assert!(ready_within(through.admin, patience(Duration::from_secs(5)))
        .await
        .is_some());
    assert_eq!(
        get(through.proxy, "/api/client/features", Some(CLIENT)).await.status,
        200
    );
    let want = format!("GET http://{}/api/admin/api-tokens HTTP/1.1", unleash.up.addr);
    assert!(proxy.lines().contains(&want), "{:?}", proxy.lines());
    drop(through);

    // NO_PROXY naming Unleash's address, or upstream_proxy = none: straight to Unleash.
    let before = proxy.lines().len();
    for (env, extra) in [
        (
            vec![("HTTP_PROXY", proxy.url()), ("NO_PROXY", "127.0.0.1".to_string())],
            vec![],
        ),
        (vec![("HTTP_PROXY", proxy.url())], vec!["--upstream-proxy", "none"]),
    ] {
        let direct = run(&env, &extra);
        assert!(ready_within(direct.admin, patience(Duration::from_secs(5)))
            .await
            .is_some());
        assert_eq!(
            get(direct.proxy, "/api/client/features", Some(CLIENT)).await.status,
            200
        );
    }
    assert_eq!(
        proxy.lines().len(),
        before,
        "went through the proxy: {:?}",
        proxy.lines()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_the_credentials_is_an_unreachable_unleash() {
    let proxy = egress_proxy(Some("fg:right")).await;
    let ca = Ca::new("unleash behind the proxy");
    let unleash = mock_unleash_tls(server_config(&ca.leaf("unleash"), None)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "ca.pem");
    let proxy_url = format!("http://fg:wrong@{}", proxy.addr);
    let gw = gateway()
        .upstream(unleash.url())
        .token(CLIENT, "client")
        .shield_off()
        .settings(move |s| {
            s.upstream_ca = Some(ca_file.display().to_string());
            s.upstream_proxy = Some(proxy_url);
        })
        .start()
        .await;
    let r = get(gw.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["code"], "upstream_unreachable");
    assert_eq!(unleash.up.count(), 0);
}
