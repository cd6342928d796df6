#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // benchmarks: a panic is a broken setup; the report is printed
//! Criterion benchmarks for the pure functions every request runs through, compared side by side, and the
//! whole in-memory request path they make up (everything but the sockets).
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use flaggate::internals::canonicalize;
use flaggate::internals::extract;
use flaggate::internals::headers::{forwarded_for, set_forwarded, strip_consumed, strip_gateway_set, strip_hop_by_hop};
use flaggate::internals::request_id;
use flaggate::internals::{decide, Policy};
use flaggate::internals::{Digest, TokenInfo, TokenKind, TokenSource};
use flaggate::internals::{TokenSet, TokenStore};
use http::{HeaderMap, HeaderValue};
use std::sync::Arc;

const TOKEN: &str = "*:development.66ef8778ad0df979785e382aca6edd2ca06181d44add8325306afe17";

fn secret(i: usize) -> String {
    format!("*:development.{i:056x}")
}

fn store_with(n: usize) -> TokenStore {
    let store = TokenStore::new();
    let mut set = TokenSet::with_capacity(n + 1);
    for i in 0..=n {
        let secret = if i == n { TOKEN.to_string() } else { secret(i) };
        let d = Digest::of(&secret);
        set.insert(
            d,
            Arc::new(TokenInfo {
                kind: TokenKind::Client,
                projects: Arc::from(vec!["*".to_string()]),
                environment: Some("development".into()),
                name: None,
                expires_at: None,
                fingerprint: d.fingerprint(),
                source: TokenSource::File,
            }),
        );
    }
    store.replace_source(TokenSource::File, set);
    store
}

fn sdk_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("authorization", TOKEN),
        ("unleash-appname", "checkout"),
        ("unleash-instanceid", "checkout-1"),
        ("unleash-sdk", "unleash-node-sdk:6.12.1"),
        ("unleash-connection-id", "cdeb1d5f-7213-4217-accc-f0dbf9f71e95"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip,deflate"),
        ("connection", "keep-alive"),
        ("host", "flaggate:4243"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn bench(c: &mut Criterion) {
    let store = store_with(10_000);
    let policy = Policy::default();
    let headers = sdk_headers();
    let mut g = c.benchmark_group("hot_path");
    g.bench_function("canonicalize", |b| {
        b.iter(|| canonicalize(black_box("/api/client/features")).is_ok())
    });
    g.bench_function("extract_digest_lookup", |b| {
        b.iter(|| {
            let t = extract(black_box(&headers)).ok().flatten().unwrap_or("");
            store.lookup(&Digest::of(t)).is_some()
        })
    });
    let path = canonicalize("/api/client/features").unwrap();
    let entry = store.lookup(&Digest::of(TOKEN)).unwrap();
    g.bench_function("route_and_decide", |b| {
        b.iter(|| decide(policy.route(black_box(&path)), false, true, Some(&entry), 0))
    });
    g.bench_function("header_hygiene", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                strip_hop_by_hop(&mut h);
                strip_gateway_set(&mut h);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("auth_total", |b| {
        b.iter(|| {
            let p = canonicalize(black_box("/api/client/features")).unwrap();
            let t = extract(black_box(&headers)).ok().flatten().unwrap_or("");
            let e = store.lookup(&Digest::of(t));
            decide(policy.route(&p), false, true, e.as_deref(), 0)
        })
    });
    // Everything the gateway does to a request in memory, from the SDK's head to the head sent upstream:
    // canonicalize, authenticate, authorize, header hygiene, X-Forwarded-*, request id, upstream URI.
    let url = flaggate::config::UpstreamUrl::parse("http://unleash:4242")
        .unwrap()
        .upstream;
    let upstream = flaggate::internals::Upstream::new(
        flaggate::internals::UpstreamSettings {
            url: &url,
            connect_timeout: std::time::Duration::from_secs(2),
            extra_ca: None,
            identity: None,
            max_inflight: 1024,
            proxy: &flaggate::config::EgressProxy::Direct,
            shares: flaggate::internals::Shares {
                per_connection: 32,
                per_token: 256,
            },
        },
        &prometheus::Registry::new(),
    )
    .unwrap();
    let peer = forwarded_for("10.1.2.3".parse().unwrap()); // once per connection
    g.bench_function("request_path_total", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                let p = canonicalize(black_box("/api/client/features")).unwrap();
                let t = extract(&h).ok().flatten().unwrap_or("");
                let e = store.lookup(&Digest::of(t));
                let verdict = decide(policy.route(&p), false, true, e.as_deref(), 0);
                let host = h.get(http::header::HOST).cloned();
                strip_hop_by_hop(&mut h);
                strip_gateway_set(&mut h);
                strip_consumed(&mut h);
                h.remove(http::header::HOST);
                set_forwarded(&mut h, peer.clone(), "http", host);
                h.insert("x-request-id", request_id(None));
                let uri = upstream.uri(p.as_str(), Some("project=default"));
                (verdict, h, uri.is_ok())
            },
            criterion::BatchSize::SmallInput,
        )
    });
    // Per-token rate limiting: the extra cost on a request whose token has a limit.
    let mut limits = flaggate::internals::RateLimits::default();
    limits.per_kind.insert(
        TokenKind::Client,
        flaggate::internals::Rate {
            per_second: 1e12,
            burst: 1e12,
        },
    );
    let limiter = flaggate::internals::RateLimiter::new(limits);
    let digest = Digest::of(TOKEN);
    g.bench_function("rate_limit_check", |b| {
        b.iter(|| limiter.check(black_box(&digest), &entry).is_ok())
    });
    g.finish();
}

/// The lookup is the only per-request step whose cost could depend on how many tokens are loaded: 1,000
/// different SDK tokens looked up in turn, in a store of 1,000 and of 1,000,000 tokens, side by side.
fn token_count(c: &mut Criterion) {
    let digests: Vec<Digest> = (0..1000).map(|i| Digest::of(&secret(i))).collect();
    let mut g = c.benchmark_group("lookup_1000_distinct_tokens");
    for n in [1_000, 1_000_000] {
        let store = store_with(n);
        let mut i = 0;
        g.bench_function(format!("store_of_{n}"), |b| {
            b.iter(|| {
                i = (i + 1) % digests.len();
                store.lookup(black_box(&digests[i])).is_some()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench, token_count);
criterion_main!(benches);
