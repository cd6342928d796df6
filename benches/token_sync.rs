#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // benchmarks: a panic is a broken setup; the report is printed
//! Syncing a large Unleash token list: parse + apply to the store, time and RSS growth, for 100,000 and
//! 1,000,000 tokens. Targets: 100k under 1 s and 64 MB, 1M under 10 s. Run: `cargo bench --bench token_sync`.
use flaggate::internals::parse_token_list;
use flaggate::internals::TokenSource;
use flaggate::internals::TokenStore;
use std::time::Instant;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

fn token_list(n: usize) -> Vec<u8> {
    let mut s = String::with_capacity(n * 260 + 16);
    s.push_str("{\"tokens\":[");
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        let kind = if i % 10 == 0 { "frontend" } else { "client" };
        s.push_str(&format!(
            "{{\"secret\":\"default:development.{i:056x}\",\"tokenName\":\"svc-{i}\",\"type\":\"{kind}\",\"project\":\"default\",\"projects\":[\"default\"],\"environment\":\"development\",\"expiresAt\":null,\"createdAt\":\"2026-11-28T08:21:35.874Z\",\"alias\":null,\"seenAt\":null}}"
        ));
    }
    s.push_str("]}");
    s.into_bytes()
}

fn main() {
    // `cargo test --benches` passes `--bench`-less args; only run the heavy part under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    for n in [100_000usize, 1_000_000] {
        let body = token_list(n);
        let store = TokenStore::new();
        let rss0 = rss_bytes();
        let t0 = Instant::now();
        let (set, _) = parse_token_list(&body).expect("valid list");
        let parsed = t0.elapsed();
        let stats = store.replace_source(TokenSource::Unleash, set);
        let total = t0.elapsed();
        drop(body);
        let rss1 = rss_bytes();
        // A second, unchanged sync (what a changed ETag with identical content costs).
        let body = token_list(n);
        let t1 = Instant::now();
        let (set, _) = parse_token_list(&body).expect("valid list");
        store.replace_source(TokenSource::Unleash, set);
        let resync = t1.elapsed();
        println!(
            "token_sync/{n}: parse {:.3} s, parse+apply {:.3} s, unchanged re-sync {:.3} s, RSS growth {:.1} MB (store holds {})",
            parsed.as_secs_f64(),
            total.as_secs_f64(),
            resync.as_secs_f64(),
            (rss1.saturating_sub(rss0)) as f64 / 1e6,
            stats.total
        );
    }
}
