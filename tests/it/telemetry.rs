//! What operators see: exact metric deltas per decision, the access log line field by field, no secret
//! anywhere, and a dashboard and alert rules that only query metrics that exist.
use crate::support;

use crate::support::metrics::scrape;
use crate::support::patience;
use crate::support::upstream::ok_json;
use crate::support::{gateway, get, send, upstream};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;

const CLIENT: &str = "*:development.telemetry-client-secret-0123456789";
const FRONTEND: &str = "default:development.telemetry-frontend-secret-0123456789";
const UNKNOWN: &str = "*:development.telemetry-unknown-secret-0123456789";

async fn request(addr: std::net::SocketAddr, path: &str, token: Option<&str>, id: &str) -> u16 {
    let mut b = Request::get(format!("http://{addr}{path}"))
        .header("x-request-id", id)
        .header("unleash-appname", "checkout-service");
    if let Some(t) = token {
        b = b.header("authorization", t);
    }
    let r = send(b.body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(r.headers["x-request-id"], id, "request id returned");
    r.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_decision_moves_exactly_its_counters_and_writes_one_complete_log_line() {
    support::logs::capture();
    let up = upstream().route("*", |_| ok_json(r#"{"features":[]}"#)).run().await;
    let gw = gateway()
        .upstream(up.url())
        .token(CLIENT, "client")
        .token(FRONTEND, "frontend")
        .start()
        .await;
    let dead = gateway()
        .upstream("http://127.0.0.1:1")
        .token(CLIENT, "client")
        .start()
        .await;

    let before = scrape(gw.admin).await;
    assert_eq!(
        request(gw.addr, "/api/client/features", Some(CLIENT), "t-allowed").await,
        200
    );
    assert_eq!(
        request(gw.addr, "/api/client/features", Some(CLIENT), "t-allowed-2").await,
        200
    );
    assert_eq!(
        request(gw.addr, "/api/client/features", Some(UNKNOWN), "t-unauth").await,
        401
    );
    assert_eq!(
        request(gw.addr, "/api/client/features", Some(FRONTEND), "t-forbidden").await,
        403
    );
    assert_eq!(
        request(gw.addr, "/api/client/%2e%2e/admin", Some(CLIENT), "t-bad").await,
        400
    );
    assert_eq!(
        request(dead.addr, "/api/client/features", Some(CLIENT), "t-upstream").await,
        502
    );
    let after = scrape(gw.admin).await;
    let dead_scrape = scrape(dead.admin).await;

    // Series with free-form labels (requests by status, durations by class, apps) appear with their first
    // event: absent before the requests means 0 then. After them, every series asserted on must exist.
    let delta = |series: &str| after.value(series) - before.get(series).unwrap_or(0.0);
    let req = |class: &str, status: u16, decision: &str| {
        // The exposition orders labels alphabetically.
        format!("flaggate_requests_total{{decision=\"{decision}\",method=\"GET\",route_class=\"{class}\",status=\"{status}\"}}")
    };
    assert_eq!(delta(&req("client", 200, "allowed")), 2.0);
    assert_eq!(delta(&req("client", 401, "unauthenticated")), 1.0);
    assert_eq!(delta(&req("client", 403, "forbidden")), 1.0);
    assert_eq!(delta(&req("none", 400, "bad_request")), 1.0);
    assert_eq!(dead_scrape.value(&req("client", 502, "upstream_error")), 1.0);
    assert_eq!(
        delta("flaggate_request_duration_seconds_count{route_class=\"client\"}"),
        4.0
    );
    assert_eq!(
        delta("flaggate_request_duration_seconds_count{route_class=\"none\"}"),
        1.0
    );
    assert_eq!(
        delta("flaggate_upstream_duration_seconds_count{route_class=\"client\"}"),
        2.0,
        "only forwarded requests"
    );
    assert_eq!(delta("flaggate_token_cache_lookups_total{result=\"hit\"}"), 3.0);
    assert_eq!(delta("flaggate_token_cache_lookups_total{result=\"miss\"}"), 1.0);
    // Only a known token may name an app (the two allowed and the forbidden one): an unknown token, or a
    // request refused before its token was looked at, cannot fill the bounded label set with junk.
    assert_eq!(delta("flaggate_sdk_requests_total{app=\"checkout-service\"}"), 3.0);
    assert_eq!(after.value("flaggate_inflight_requests"), 0.0);
    assert_eq!(after.value("flaggate_ready"), 1.0);
    assert_eq!(after.value("flaggate_tokens{kind=\"client\",source=\"file\"}"), 1.0);
    assert!(
        after.value("flaggate_upstream_connections") >= 1.0,
        "pooled connection counted"
    );
    assert!(after.text.contains("flaggate_build_info{version=\""));
    assert!(
        after.text.contains("process_resident_memory_bytes")
            || after.text.contains("flaggate_process_resident_memory_bytes")
    );

    // One access-log line per request, written when the body is done: wait until each is there.
    for id in [
        "t-allowed",
        "t-allowed-2",
        "t-unauth",
        "t-forbidden",
        "t-bad",
        "t-upstream",
    ] {
        support::logs::find(patience(std::time::Duration::from_secs(5)), |l| l["request_id"] == id)
            .await
            .unwrap_or_else(|| panic!("no access line for {id}:\n{}", support::logs::tail(40)));
    }
    let lines = support::logs::lines();
    let line = |id: &str| {
        let found: Vec<_> = lines.iter().filter(|l| l["request_id"] == id).collect();
        assert_eq!(found.len(), 1, "exactly one access line for {id}");
        found[0].clone()
    };
    let fp = |t: &str| flaggate::internals::Digest::of(t).fingerprint().to_string();

    let l = line("t-allowed");
    assert_eq!(l["target"], "flaggate::access");
    assert_eq!(l["method"], "GET");
    assert_eq!(l["path"], "/api/client/features");
    assert_eq!(l["status"], 200);
    assert_eq!(l["decision"], "allowed");
    assert_eq!(l["route_class"], "client");
    assert_eq!(l["token"], fp(CLIENT));
    assert_eq!(l["token_kind"], "client");
    assert_eq!(l["app"], "checkout-service");
    assert_eq!(l["bytes"], r#"{"features":[]}"#.len());
    assert_eq!(l["complete"], true);
    assert!(l["gateway_us"].as_u64().is_some() && l["upstream_us"].as_u64().is_some());
    assert!(l.get("reason").is_none());

    let l = line("t-unauth");
    assert_eq!(
        (l["status"].as_u64(), l["decision"].as_str()),
        (Some(401), Some("unauthenticated"))
    );
    assert_eq!(l["reason"], "unknown_token");
    assert_eq!(l["token"], fp(UNKNOWN));
    assert!(l.get("token_kind").is_none() && l.get("upstream_us").is_none());

    let l = line("t-forbidden");
    assert_eq!(
        (l["status"].as_u64(), l["decision"].as_str()),
        (Some(403), Some("forbidden"))
    );
    assert_eq!(
        (l["reason"].as_str(), l["token_kind"].as_str()),
        (Some("wrong_token_type"), Some("frontend"))
    );

    let l = line("t-bad");
    assert_eq!(
        (l["status"].as_u64(), l["decision"].as_str()),
        (Some(400), Some("bad_request"))
    );
    assert_eq!(
        (l["reason"].as_str(), l["path"].as_str()),
        (Some("path_encoded_dot"), Some("-"))
    );

    let l = line("t-upstream");
    assert_eq!(
        (l["status"].as_u64(), l["decision"].as_str()),
        (Some(502), Some("upstream_error"))
    );
    assert_eq!(l["reason"], "upstream_unreachable");
    assert!(l["error"].as_str().unwrap().contains("unreachable"));

    // The upstream saw our request id, and no secret leaked into any scrape or log line.
    assert!(up.seen().iter().any(|r| r.header("x-request-id") == Some("t-allowed")));
    let all_logs = support::logs::text();
    for secret in [CLIENT, FRONTEND, UNKNOWN] {
        let tail = secret.rsplit('.').next().unwrap();
        for (what, text) in [
            ("scrape", &after.text),
            ("dead scrape", &dead_scrape.text),
            ("logs", &all_logs),
        ] {
            assert!(!text.contains(tail), "{what} contains a token secret");
        }
    }
}

/// Metric names a PromQL expression mentions.
/// The exported metrics a query names: `flaggate_*` and the standard `process_*` ones. (`up` is made by
/// Prometheus itself, not exported.)
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let at_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &expr[i..];
        if at_word && (rest.starts_with("flaggate_") || rest.starts_with("process_")) {
            let mut end = i;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            out.push(expr[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// A target-down rule asks about Prometheus's own `up` series, which no exporter writes.
fn is_target_health(expr: &str) -> bool {
    expr.contains("up{") || expr.contains("up ==")
}

#[tokio::test]
async fn dashboard_and_alert_rules_only_query_metrics_that_exist() {
    // Both token sources (a file and Unleash sync): every metric either mode exports is in the scrape.
    let unleash = crate::support::unleash::mock_unleash().await;
    let gw = gateway()
        .upstream(unleash.url())
        .token(CLIENT, "client")
        .unleash_sync("1s")
        .start()
        .await;
    request(gw.addr, "/api/client/features", Some(CLIENT), "warmup").await;
    let scrape = get(gw.admin, "/metrics", None).await.text();
    let exists = |name: &str| {
        scrape
            .lines()
            .filter(|l| !l.starts_with('#'))
            .any(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
    };

    let root = env!("CARGO_MANIFEST_DIR");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/deploy/grafana/flaggate.json")).unwrap())
            .expect("dashboard is valid JSON");
    let mut exprs: Vec<String> = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(exprs.len() >= 10);
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).unwrap())
            .expect("alert rules are valid YAML");
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            exprs.push(r["expr"].as_str().unwrap().to_string());
        }
    }
    let mut missing = Vec::new();
    for e in &exprs {
        let names = metric_names(e);
        assert!(
            !names.is_empty() || is_target_health(e),
            "query uses no exported metric: {e}"
        );
        for n in names {
            if !exists(&n) {
                missing.push(n);
            }
        }
    }
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
}
