//! Per-token rate limits, and a junk-token flood that must not starve a well-behaved SDK.
use crate::support::metrics::metric;
use crate::support::patience;
use crate::support::upstream::ok_json;
use crate::support::{gateway, get, upstream};
use bytes::Bytes;
use http_body_util::Full;
use std::time::{Duration, Instant};

const FRONTEND_A: &str = "default:development.rl-frontend-a-0123456789";
const FRONTEND_B: &str = "default:development.rl-frontend-b-0123456789";
const CLIENT: &str = "*:development.rl-client-0123456789abcdef";
const VIP: &str = "default:development.rl-frontend-vip-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_is_429_with_retry_after_and_buckets_are_per_token() {
    let up = upstream().route("*", |_| ok_json("{}")).run().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("t.yaml");
    std::fs::write(
        &tokens,
        format!(
            "tokens:\n  - {{secret: {FRONTEND_A:?}, type: frontend}}\n  - {{secret: {FRONTEND_B:?}, type: frontend}}\n  - {{secret: {CLIENT:?}, type: client}}\n  - {{secret: {VIP:?}, type: frontend, name: vip-web}}\n"
        ),
    )
    .unwrap();
    let gw = gateway()
        .upstream(up.url())
        .config("rate_limit_frontend = \"2:4\"\n[[rate_limit_tokens]]\nname = \"vip-web\"\nrate = \"1000:1000\"\n")
        .settings(|s| s.token_file = Some(tokens.display().to_string()))
        .start()
        .await;

    for i in 0..4 {
        assert_eq!(
            get(gw.addr, "/api/frontend", Some(FRONTEND_A)).await.status,
            200,
            "burst request {i}"
        );
    }
    let r = get(gw.addr, "/api/frontend", Some(FRONTEND_A)).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["code"], "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry), "Retry-After {retry}");
    assert_eq!(up.count(), 4, "the refused request never reached upstream");

    // Other tokens have their own buckets; client tokens are unlimited unless configured.
    assert_eq!(get(gw.addr, "/api/frontend", Some(FRONTEND_B)).await.status, 200);
    for _ in 0..20 {
        assert_eq!(get(gw.addr, "/api/client/features", Some(CLIENT)).await.status, 200);
        assert_eq!(
            get(gw.addr, "/api/frontend", Some(VIP)).await.status,
            200,
            "per-name limit wins"
        );
    }
    // Refill: 2/s → one request after ~0.5 s.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(gw.addr, "/api/frontend", Some(FRONTEND_A)).await.status, 200);

    assert_eq!(
        metric(
            gw.admin,
            "flaggate_requests_total{decision=\"rate_limited\",method=\"GET\",route_class=\"frontend\",status=\"429\"}"
        )
        .await,
        1.0
    );
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_junk_token_flood_does_not_starve_a_polling_sdk_and_memory_stays_bounded() {
    let up = upstream().route("*", |_| ok_json(r#"{"features":[]}"#)).run().await;
    let gw = gateway().upstream(up.url()).token(CLIENT, "client").start().await;
    let addr = gw.addr;
    // Warm up, then measure.
    for _ in 0..100 {
        get(addr, "/api/client/features", Some("junk")).await;
    }
    let rss_before = rss_kb();
    let until = Instant::now() + Duration::from_secs(3);
    let mut flooders = Vec::new();
    for w in 0..12 {
        flooders.push(tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
            let mut n = 0u64;
            while Instant::now() < until {
                let req = http::Request::get(format!("http://{addr}/api/client/features"))
                    .header("authorization", format!("*:development.flood{w}-{n:016x}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                if let Ok(r) = client.request(req).await {
                    assert_eq!(r.status(), 401);
                }
                n += 1;
            }
            n
        }));
    }
    let mut polls = 0;
    let mut worst = Duration::ZERO;
    while Instant::now() < until {
        let t = Instant::now();
        let r = get(addr, "/api/client/features", Some(CLIENT)).await;
        assert_eq!(r.status, 200, "SDK poll failed during the flood");
        worst = worst.max(t.elapsed());
        polls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut junk = 0;
    for f in flooders {
        junk += f.await.unwrap();
    }
    let growth_mb = rss_kb().saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!("flood: {junk} junk requests, {polls} SDK polls, worst poll {worst:?}, RSS growth {growth_mb:.1} MB");
    assert!(junk > 1000, "the flood did not flood ({junk})");
    assert!(polls >= 20);
    assert!(worst < patience(Duration::from_secs(1)), "SDK poll took {worst:?}");
    assert_eq!(up.count(), polls, "only the SDK's requests reached upstream");
    assert!(growth_mb < 64.0, "RSS grew {growth_mb:.1} MB during the flood");
}
