//! The Unleash token source against a mock Unleash: revocation, expiry, new tokens, junk floods, PATs,
//! outage with snapshot restarts, and ETag economy.
use crate::support::metrics::{metric, metric_eventually, scrape};
use crate::support::patience;
use crate::support::poll::{ready_within, status_within, within};
use crate::support::unleash::mock_unleash;
use crate::support::{gateway, get};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const CLIENT: &str = "*:development.sync-client-0123456789abcdef";
/// Failed token-list fetches (registered at 0, so present from the start).
const SYNC_ERRORS: &str = "flaggate_token_sync_total{result=\"error\"}";
const FRONTEND: &str = "default:development.sync-frontend-0123456789abcdef";

fn rfc3339_in(secs: i64) -> (i64, String) {
    let t = time::OffsetDateTime::now_utc() + time::Duration::seconds(secs);
    let t = t.replace_nanosecond(0).unwrap();
    (
        t.unix_timestamp(),
        t.format(&time::format_description::well_known::Rfc3339).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_deleted_upstream_is_denied_within_interval_plus_one_second() {
    let u = mock_unleash().await;
    u.state.add(CLIENT, "client", None);
    let gw = gateway()
        .upstream(u.url())
        .unleash_sync("1s")
        .without_token_file()
        .start()
        .await;
    assert!(
        ready_within(gw.admin, patience(Duration::from_secs(3))).await.is_some(),
        "ready after first sync"
    );
    assert_eq!(get(gw.addr, "/api/client/features", Some(CLIENT)).await.status, 200);

    u.state.remove(CLIENT);
    let took = status_within(
        gw.addr,
        "/api/client/features",
        Some(CLIENT),
        401,
        patience(Duration::from_secs(2)),
    )
    .await;
    assert!(took.is_some(), "deleted token still allowed after sync interval + 1 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_denied_within_one_second_of_its_expiry() {
    let u = mock_unleash().await;
    let (expiry, at) = rfc3339_in(2);
    u.state.add(CLIENT, "client", Some(&at));
    let gw = gateway()
        .upstream(u.url())
        .unleash_sync("30s")
        .without_token_file()
        .start()
        .await;
    assert!(ready_within(gw.admin, patience(Duration::from_secs(3))).await.is_some());
    assert_eq!(get(gw.addr, "/api/client/features", Some(CLIENT)).await.status, 200);
    // Wait for the expiry second, then the token must be refused within 1 s, with no sync in between.
    let until = std::time::UNIX_EPOCH + Duration::from_secs(expiry as u64);
    if let Ok(d) = until.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(d).await;
    }
    let took = status_within(
        gw.addr,
        "/api/client/features",
        Some(CLIENT),
        401,
        patience(Duration::from_secs(1)),
    )
    .await;
    assert!(took.is_some(), "expired token still allowed 1 s after expiresAt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_token_is_allowed_on_its_first_request() {
    let u = mock_unleash().await;
    u.state.add(FRONTEND, "frontend", None);
    // A long interval: only the early re-sync on a miss can make the new token work.
    let gw = gateway()
        .upstream(u.url())
        .unleash_sync("60s")
        .without_token_file()
        .start()
        .await;
    assert!(ready_within(gw.admin, patience(Duration::from_secs(3))).await.is_some());
    tokio::time::sleep(Duration::from_millis(1100)).await;

    u.state.add(CLIENT, "client", None);
    let created = Instant::now();
    let r = get(gw.addr, "/api/client/features", Some(CLIENT)).await;
    assert_eq!(r.status, 200, "first request with a just-created token: {}", r.text());
    assert!(created.elapsed() < patience(Duration::from_secs(1)));
    assert_eq!(u.forwarded(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_junk_tokens_cost_a_handful_of_list_fetches_and_nothing_else() {
    let u = mock_unleash().await;
    u.state.add(CLIENT, "client", None);
    let gw = gateway()
        .upstream(u.url())
        .unleash_sync("60s")
        .without_token_file()
        .start()
        .await;
    assert!(ready_within(gw.admin, patience(Duration::from_secs(3))).await.is_some());
    let before = u.list_fetches();
    let started = Instant::now();
    let addr = gw.addr;
    let mut tasks = Vec::new();
    for w in 0..8 {
        tasks.push(tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
            let mut denied = 0;
            for i in 0..1250 {
                let tok = format!("*:development.junk{w:02}{i:06}{}", "0".repeat(40));
                let req = http::Request::get(format!("http://{addr}/api/client/features"))
                    .header("authorization", tok)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                if resp.status() == 401 {
                    denied += 1;
                }
            }
            denied
        }));
    }
    let mut denied = 0;
    for t in tasks {
        denied += t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(denied, 10_000);
    let fetches = u.list_fetches() - before;
    assert!(
        fetches as f64 <= secs.ceil() + 2.0,
        "{fetches} token-list fetches in {secs:.1} s: the early re-sync is not debounced"
    );
    assert_eq!(u.forwarded(), 0, "no junk request reached upstream");
    assert_eq!(u.pat_checks(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_pats_are_capped_by_the_configured_rate_and_real_pats_coalesce() {
    let u = mock_unleash().await;
    let pat = "user:00000000000000000000000000000000000000000000000000000abc".to_string();
    u.state.pats.lock().unwrap().insert(pat.clone());
    let gw = gateway()
        .upstream(u.url())
        .unleash_sync("60s")
        .settings(|s| s.pat_rate_limit = Some("5".into()))
        .start()
        .await;

    // 30 concurrent requests with one valid PAT: one upstream check.
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let p = pat.clone();
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            get(addr, "/api/admin/projects", Some(&p)).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(u.pat_checks(), 1, "concurrent misses for one PAT are merged");
    assert_eq!(
        get(gw.addr, "/api/frontend", Some(&pat)).await.status,
        403,
        "PATs may not reach the frontend API"
    );
    assert_eq!(u.pat_checks(), 1, "the valid PAT is cached");

    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
            for i in 0..2500 {
                let req = http::Request::get(format!("http://{addr}/api/admin/projects"))
                    .header("authorization", format!("user:junk{w}{i:08}"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                assert_eq!(client.request(req).await.unwrap().status(), 401);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let checks = u.pat_checks() - 1;
    assert!(
        checks as f64 <= 5.0 * secs.ceil() + 5.0,
        "{checks} PAT checks in {secs:.1} s exceed 5/s"
    );
    // The same junk PAT again is answered from the negative cache.
    let junk = "user:junk000000000";
    let n = u.pat_checks();
    get(gw.addr, "/api/admin/projects", Some(junk)).await;
    get(gw.addr, "/api/admin/projects", Some(junk)).await;
    assert!(u.pat_checks() <= n + 1);
    assert_eq!(u.forwarded(), 30, "only the valid PAT's 30 requests were forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_known_tokens_pass_and_a_restart_serves_from_the_snapshot() {
    let u = mock_unleash().await;
    u.state.add(CLIENT, "client", None);
    let state = tempfile::tempdir().unwrap();
    let gw = gateway()
        .upstream(u.url())
        .unleash_sync("300ms")
        .without_token_file()
        .state_dir(state.path())
        .start()
        .await;
    assert!(ready_within(gw.admin, patience(Duration::from_secs(3))).await.is_some());
    let snap = state.path().join(flaggate::internals::SNAPSHOT_FILE_NAME);
    assert!(within(patience(Duration::from_secs(2)), || async { snap.exists() })
        .await
        .is_some());

    for failure in [503u16, 200 /* garbage body */] {
        let errors = metric(gw.admin, SYNC_ERRORS).await;
        u.state.failure.store(failure, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(900)).await;
        // The gateway has met this failure (a sync may be backing off from the previous one).
        metric_eventually(gw.admin, SYNC_ERRORS, |v| v > errors, patience(Duration::from_secs(5))).await;
        assert_eq!(get(gw.addr, "/api/client/features", Some(CLIENT)).await.status, 200);
        assert_eq!(
            get(gw.addr, "/api/client/features", Some("*:development.unknown"))
                .await
                .status,
            401
        );
        assert_eq!(
            get(gw.admin, "/ready", None).await.status,
            200,
            "stays ready on the last good set"
        );
    }
    // Registered at 0 from the start: the failed syncs must have counted.
    assert!(metric(gw.admin, SYNC_ERRORS).await >= 1.0);
    drop(gw);

    // Restart while Unleash is still down: the snapshot serves.
    let gw = gateway()
        .upstream(u.url())
        .unleash_sync("300ms")
        .without_token_file()
        .state_dir(state.path())
        .start()
        .await;
    assert!(
        ready_within(gw.admin, patience(Duration::from_secs(3))).await.is_some(),
        "ready from the snapshot"
    );
    assert_eq!(get(gw.addr, "/api/client/features", Some(CLIENT)).await.status, 200);

    let text = std::fs::read_to_string(&snap).unwrap();
    assert!(
        !text.contains("sync-client") && !text.contains(CLIENT),
        "snapshot holds a secret"
    );
    assert!(text.contains(&flaggate::internals::Digest::of(CLIENT).to_hex()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&snap).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // Unleash comes back: a deletion made meanwhile applies without restarting the gateway.
    u.state.remove(CLIENT);
    u.state.failure.store(0, Ordering::SeqCst);
    let took = status_within(
        gw.addr,
        "/api/client/features",
        Some(CLIENT),
        401,
        patience(Duration::from_secs(5)),
    )
    .await;
    assert!(took.is_some(), "recovered sync did not apply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_token_list_costs_a_304() {
    let u = mock_unleash().await;
    u.state.add(CLIENT, "client", None);
    let gw = gateway()
        .upstream(u.url())
        .unleash_sync("200ms")
        .without_token_file()
        .start()
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fetches = u.up.seen();
    let list: Vec<_> = fetches.iter().filter(|r| r.path() == "/api/admin/api-tokens").collect();
    assert!(list.len() >= 4, "polls every interval: {}", list.len());
    assert!(list[0].header("if-none-match").is_none());
    assert!(list[1..].iter().all(|r| r.header("if-none-match") == Some("W/\"v1\"")));
    let metrics = scrape(gw.admin).await;
    let unchanged = metrics.value("flaggate_token_sync_total{result=\"unchanged\"}");
    assert!(unchanged >= 3.0, "unchanged syncs counted: {unchanged}");
    assert_eq!(metrics.value("flaggate_token_sync_total{result=\"ok\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_upstream_token_is_a_distinct_error_and_never_ready() {
    let u = mock_unleash().await;
    let gw = gateway()
        .upstream(u.url())
        .without_token_file()
        .settings(|s| {
            s.upstream_token = Some("*:*.wrong-token".into());
            s.sync_interval = Some("200ms".into());
        })
        .start()
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Syncs ran and were rejected (not merely not yet tried).
    metric_eventually(
        gw.admin,
        "flaggate_token_sync_total{result=\"rejected\"}",
        |v| v >= 1.0,
        patience(Duration::from_secs(3)),
    )
    .await;
    let r = get(gw.admin, "/ready", None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["reason"], "no token set loaded yet");
    let metrics = scrape(gw.admin).await;
    // Registered at 0 from the start: the rejected syncs must have counted.
    assert!(metrics.value("flaggate_token_sync_total{result=\"rejected\"}") >= 1.0);
    assert!(!metrics.text.contains("wrong-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_file_too_readiness_still_waits_for_the_unleash_set() {
    let u = mock_unleash().await;
    u.state.add(CLIENT, "client", None);
    u.state.failure.store(503, Ordering::SeqCst);
    let gw = gateway()
        .upstream(u.url())
        .unleash_sync("200ms")
        .token(FRONTEND, "frontend")
        .start()
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Syncs ran and failed (not merely not yet tried).
    metric_eventually(gw.admin, SYNC_ERRORS, |v| v >= 1.0, patience(Duration::from_secs(3))).await;
    let r = get(gw.admin, "/ready", None).await;
    assert_eq!(
        r.status, 503,
        "ready on the file alone while the Unleash list is missing"
    );
    assert_eq!(r.json()["reason"], "waiting for the unleash token set");
    u.state.failure.store(0, Ordering::SeqCst);
    assert!(ready_within(gw.admin, patience(Duration::from_secs(5))).await.is_some());
    assert_eq!(get(gw.addr, "/api/client/features", Some(CLIENT)).await.status, 200);
    assert_eq!(get(gw.addr, "/api/frontend", Some(FRONTEND)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pat_that_cannot_be_checked_during_an_outage_is_a_502_not_a_401() {
    let u = mock_unleash().await;
    let pat = "user:0000000000000000000000000000000000000000000000000000feed";
    u.state.pats.lock().unwrap().insert(pat.to_string());
    let gw = gateway().upstream(u.url()).unleash_sync("60s").start().await;
    u.state.failure.store(503, Ordering::SeqCst);
    let r = get(gw.addr, "/api/admin/projects", Some(pat)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["code"], "upstream_unreachable");
    u.state.failure.store(0, Ordering::SeqCst);
    assert_eq!(
        get(gw.addr, "/api/admin/projects", Some(pat)).await.status,
        200,
        "not cached as invalid"
    );
}

/// The real binary, restarted from its snapshot while Unleash is down: the served set's age counts from
/// the sync it came from (not "never"), `/ready` and the metrics say so, and that this process has not
/// reached Unleash since it started — until it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_the_snapshot_reports_how_old_the_served_set_is() {
    use crate::support::binary::spawn;
    use crate::support::unleash::SYNC_TOKEN;
    let u = mock_unleash().await;
    u.state.add(CLIENT, "client", None);
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().display().to_string();
    let url = u.url();
    let args = [
        "run",
        "--upstream",
        &url,
        "--upstream-token",
        SYNC_TOKEN,
        "--sync-interval",
        "300ms",
        "--state-dir",
        &dir,
    ];
    let first = spawn(&args);
    assert!(ready_within(first.admin, patience(Duration::from_secs(5)))
        .await
        .is_some());
    metric_eventually(
        first.admin,
        "flaggate_token_sync_synced_since_start",
        |v| v == 1.0,
        patience(Duration::from_secs(2)),
    )
    .await;
    let snap = state.path().join(flaggate::internals::SNAPSHOT_FILE_NAME);
    assert!(within(patience(Duration::from_secs(2)), || async { snap.exists() })
        .await
        .is_some());

    // Unleash goes down, then flaggate is restarted; its set is at least as old as the outage.
    u.state.failure.store(503, Ordering::SeqCst);
    drop(first);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = spawn(&args);
    assert!(
        ready_within(second.admin, patience(Duration::from_secs(5)))
            .await
            .is_some(),
        "ready from the snapshot"
    );
    assert_eq!(
        get(second.proxy, "/api/client/features", Some(CLIENT)).await.status,
        200
    );
    let age = metric(second.admin, "flaggate_token_sync_age_seconds").await;
    assert!(
        age >= 1.4,
        "the snapshot's set is reported {age} s old, not as old as it is"
    );
    assert_eq!(
        metric(second.admin, "flaggate_token_sync_synced_since_start").await,
        0.0
    );
    let ready = get(second.admin, "/ready", None).await.json();
    assert!(
        ready["last_sync_age_seconds"].as_f64().is_some_and(|a| a >= 1.4),
        "{ready}"
    );
    assert_eq!(ready["synced_since_start"], false, "{ready}");
    // Time passes during the outage: the age keeps growing (the alert on it can fire).
    metric_eventually(
        second.admin,
        "flaggate_token_sync_age_seconds",
        |v| v >= age + 0.5,
        patience(Duration::from_secs(5)),
    )
    .await;

    // Unleash is back: this process syncs, and the set is fresh again.
    u.state.failure.store(0, Ordering::SeqCst);
    metric_eventually(
        second.admin,
        "flaggate_token_sync_synced_since_start",
        |v| v == 1.0,
        patience(Duration::from_secs(10)),
    )
    .await;
    assert!(metric(second.admin, "flaggate_token_sync_age_seconds").await < 2.0);
}
