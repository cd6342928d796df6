//! The token file is live: edits, atomic renames and ConfigMap-style symlink swaps apply within 2 s; a
//! broken edit keeps the last good set; `expires_at` is enforced to the second without any reload.
use crate::support::gateway::token_yaml;
use crate::support::metrics::{metric, metric_eventually};
use crate::support::patience;
use crate::support::poll::status_within;
use crate::support::upstream::ok_json;
use crate::support::{gateway, get, upstream, MockUpstream, TestGateway, TokenSpec};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

const A: &str = "*:development.tokenfile-a-0123456789abcdef";
const B: &str = "*:development.tokenfile-b-0123456789abcdef";
const C: &str = "*:development.tokenfile-c-0123456789abcdef";

/// Rejected or unreadable token-file reloads (registered at 0, so present from the start).
const FILE_ERRORS: &str = "flaggate_token_source_updates_total{result=\"error\",source=\"file\"}";

const CLIENT_PATH: &str = "/api/client/features";
const FRONTEND_PATH: &str = "/api/frontend";

async fn setup(tokens: &[(&str, &str)]) -> (MockUpstream, TestGateway) {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let mut g = gateway().upstream(up.url());
    for (secret, kind) in tokens {
        g = g.token(secret, kind);
    }
    let gw = g.start().await;
    (up, gw)
}

fn write(path: &Path, tokens: &[(&str, &str)]) {
    let specs: Vec<TokenSpec> = tokens.iter().map(|(s, k)| TokenSpec::new(s, k)).collect();
    std::fs::write(path, token_yaml(&specs)).unwrap();
}

async fn status(gw: &TestGateway, path: &str, token: &str) -> u16 {
    get(gw.addr, path, Some(token)).await.status.as_u16()
}

/// Polls until `path` with `token` answers `want`; fails after 2 s (times the patience). Returns the
/// wait.
async fn eventually(gw: &TestGateway, path: &str, token: &str, want: u16) -> Duration {
    let limit = patience(Duration::from_secs(2));
    match status_within(gw.addr, path, Some(token), want, limit).await {
        Some(waited) => waited,
        None => {
            let got = status(gw, path, token).await;
            panic!("{path} still {got} (want {want}) {limit:?} after the token file changed")
        }
    }
}

/// Waits until the watcher has rejected (or failed to read) the file more than `before` times in all:
/// the evidence that it took in a broken edit, before a test checks that nothing changed.
async fn rejected(gw: &TestGateway, before: f64) {
    metric_eventually(gw.admin, FILE_ERRORS, |v| v > before, patience(Duration::from_secs(2))).await;
}

/// Asserts `path` with `token` keeps answering `want` for `period`.
async fn steadily(gw: &TestGateway, path: &str, token: &str, want: u16, period: Duration) {
    let started = Instant::now();
    while started.elapsed() < period {
        let got = status(gw, path, token).await;
        assert_eq!(got, want, "{path} changed to {got} after {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_token_is_allowed_within_two_seconds() {
    let (_up, gw) = setup(&[(A, "client")]).await;
    assert_eq!(status(&gw, CLIENT_PATH, B).await, 401);
    write(&gw.token_file, &[(A, "client"), (B, "client")]);
    eventually(&gw, CLIENT_PATH, B, 200).await;
    assert_eq!(status(&gw, CLIENT_PATH, A).await, 200, "untouched token still allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retyped_token_gets_its_new_scope_within_two_seconds() {
    let (_up, gw) = setup(&[(A, "client"), (B, "client")]).await;
    assert_eq!(status(&gw, CLIENT_PATH, B).await, 200);
    assert_eq!(status(&gw, FRONTEND_PATH, B).await, 403);
    write(&gw.token_file, &[(A, "client"), (B, "frontend")]);
    eventually(&gw, CLIENT_PATH, B, 403).await;
    assert_eq!(status(&gw, FRONTEND_PATH, B).await, 200);
    assert_eq!(status(&gw, CLIENT_PATH, A).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_token_is_refused_within_two_seconds() {
    let (up, gw) = setup(&[(A, "client"), (B, "client")]).await;
    assert_eq!(status(&gw, CLIENT_PATH, B).await, 200);
    write(&gw.token_file, &[(A, "client")]);
    eventually(&gw, CLIENT_PATH, B, 401).await;
    up.clear();
    let r = get(gw.addr, CLIENT_PATH, Some(B)).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["code"].as_str()),
        (401, Some("unknown_token"))
    );
    assert_eq!(up.count(), 0, "a removed token never reaches upstream");
    assert_eq!(status(&gw, CLIENT_PATH, A).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_rename_over_the_file_applies_every_time() {
    let (_up, gw) = setup(&[(A, "client")]).await;
    assert_eq!(status(&gw, CLIENT_PATH, A).await, 200);
    let dir = gw.token_file.parent().unwrap().to_path_buf();

    let tmp = dir.join(".tokens.yaml.tmp");
    write(&tmp, &[(B, "client")]);
    std::fs::rename(&tmp, &gw.token_file).unwrap();
    eventually(&gw, CLIENT_PATH, B, 200).await;
    eventually(&gw, CLIENT_PATH, A, 401).await;

    // The watch survives the rename: a second swap applies too.
    write(&tmp, &[(C, "client")]);
    std::fs::rename(&tmp, &gw.token_file).unwrap();
    eventually(&gw, CLIENT_PATH, C, 200).await;
    eventually(&gw, CLIENT_PATH, B, 401).await;
}

/// Kubernetes mounts a ConfigMap as `tokens.yaml -> ..data/tokens.yaml`, `..data -> ..<timestamp>`, and
/// updates it by re-pointing `..data` with a rename: the file itself is never written.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_style_symlink_swap_applies() {
    use std::os::unix::fs::symlink;
    let mount = tempfile::tempdir().unwrap();
    let m = mount.path();
    std::fs::create_dir(m.join("..v1")).unwrap();
    write(&m.join("..v1/tokens.yaml"), &[(A, "client")]);
    symlink("..v1", m.join("..data")).unwrap();
    symlink("..data/tokens.yaml", m.join("tokens.yaml")).unwrap();

    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let path = m.join("tokens.yaml").display().to_string();
    let gw = gateway()
        .upstream(up.url())
        .settings(|s| s.token_file = Some(path))
        .start()
        .await;
    assert_eq!(status(&gw, CLIENT_PATH, A).await, 200);
    assert_eq!(status(&gw, CLIENT_PATH, B).await, 401);

    std::fs::create_dir(m.join("..v2")).unwrap();
    write(&m.join("..v2/tokens.yaml"), &[(B, "client")]);
    symlink("..v2", m.join("..data_tmp")).unwrap();
    std::fs::rename(m.join("..data_tmp"), m.join("..data")).unwrap();
    std::fs::remove_dir_all(m.join("..v1")).unwrap();

    eventually(&gw, CLIENT_PATH, B, 200).await;
    eventually(&gw, CLIENT_PATH, A, 401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_edit_keeps_the_last_good_set_and_the_next_good_edit_applies() {
    let (_up, gw) = setup(&[(A, "client")]).await;
    assert_eq!(status(&gw, CLIENT_PATH, A).await, 200);
    let errors = || metric(gw.admin, FILE_ERRORS);
    let errors_before = errors().await;

    // Invalid YAML.
    std::fs::write(
        &gw.token_file,
        format!("tokens:\n  - secret: \"{B}\n    type: [client\n"),
    )
    .unwrap();
    rejected(&gw, errors_before).await;
    steadily(&gw, CLIENT_PATH, A, 200, Duration::from_millis(1500)).await;
    assert_eq!(status(&gw, CLIENT_PATH, B).await, 401);

    // Valid YAML, invalid content: an unknown type. Neither half of the file applies.
    std::fs::write(
        &gw.token_file,
        format!("tokens:\n  - secret: \"{B}\"\n    type: client\n  - secret: \"{C}\"\n    type: root\n"),
    )
    .unwrap();
    rejected(&gw, errors_before + 1.0).await;
    steadily(&gw, CLIENT_PATH, A, 200, Duration::from_millis(1500)).await;
    assert_eq!(
        status(&gw, CLIENT_PATH, B).await,
        401,
        "part of a rejected file was applied"
    );
    assert_eq!(status(&gw, CLIENT_PATH, C).await, 401);
    assert!(errors().await >= errors_before + 2.0, "rejected reloads are counted");
    assert_eq!(
        get(gw.admin, "/ready", None).await.status,
        200,
        "still ready on the last good set"
    );

    // The next good edit applies.
    write(&gw.token_file, &[(C, "client")]);
    eventually(&gw, CLIENT_PATH, C, 200).await;
    eventually(&gw, CLIENT_PATH, A, 401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_file_keeps_the_last_good_set_until_it_reappears() {
    let (_up, gw) = setup(&[(A, "client")]).await;
    assert_eq!(status(&gw, CLIENT_PATH, A).await, 200);
    let errors_before = metric(gw.admin, FILE_ERRORS).await;
    std::fs::remove_file(&gw.token_file).unwrap();
    rejected(&gw, errors_before).await;
    steadily(&gw, CLIENT_PATH, A, 200, Duration::from_millis(1000)).await;
    write(&gw.token_file, &[(B, "client")]);
    eventually(&gw, CLIENT_PATH, B, 200).await;
    eventually(&gw, CLIENT_PATH, A, 401).await;
}

/// An in-place writer truncates first; a write that then fails (disk full, crashed tool) leaves a
/// zero-byte file. That is a broken edit too and must not revoke every token at once (`tokens: []` is
/// how to say "no tokens" on purpose).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_file_keeps_the_last_good_set() {
    let (_up, gw) = setup(&[(A, "client")]).await;
    assert_eq!(status(&gw, CLIENT_PATH, A).await, 200);
    let errors_before = metric(gw.admin, FILE_ERRORS).await;
    std::fs::write(&gw.token_file, "").unwrap();
    rejected(&gw, errors_before).await;
    steadily(&gw, CLIENT_PATH, A, 200, Duration::from_millis(1000)).await;
}

/// An edit made right after start-up (config management writing the file as the service starts) must
/// not be lost: the watcher has to compare against what was actually loaded, not against a later read.
#[tokio::test]
async fn an_edit_right_after_start_is_not_lost() {
    let (_up, gw) = setup(&[(A, "client")]).await;
    write(&gw.token_file, &[(A, "client"), (B, "client")]);
    eventually(&gw, CLIENT_PATH, B, 200).await;
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_is_allowed_before_and_refused_within_a_second_after_its_expiry() {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let stamp = at.format(&time::format_description::well_known::Rfc3339).unwrap();
    let expiry = at.unix_timestamp() as f64; // the token is refused from this second on
    let grace = patience(Duration::from_secs(1)).as_secs_f64(); // and within this of it
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token_spec(TokenSpec::new(A, "client").expires(&stamp))
        .token(B, "client")
        .start()
        .await;

    let mut allowed = 0;
    loop {
        let sent = unix_now();
        let r = get(gw.addr, CLIENT_PATH, Some(A)).await;
        let received = unix_now();
        match r.status.as_u16() {
            200 => {
                assert!(sent < expiry, "allowed at {sent} although it expired at {expiry}");
                allowed += 1;
            }
            401 => {
                assert!(received >= expiry, "refused at {received}, before its expiry {expiry}");
                assert!(
                    sent < expiry + grace,
                    "first refusal only at {sent}, more than {grace} s after expiry {expiry}"
                );
                assert_eq!(r.json()["code"], "expired_token");
                break;
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
        assert!(
            unix_now() < expiry + grace,
            "still allowed {grace} s after expiry {expiry}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(allowed >= 1, "the token was never allowed before its expiry");
    up.clear();
    assert_eq!(status(&gw, CLIENT_PATH, A).await, 401, "stays refused");
    assert_eq!(up.count(), 0);
    assert_eq!(status(&gw, CLIENT_PATH, B).await, 200, "other tokens unaffected");
}
