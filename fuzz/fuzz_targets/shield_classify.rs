//! Invariants of the shield's classification: on any query and headers, a request to the features path
//! either bypasses, or gets a key that holds exactly its query and spec (never another request's), whose
//! query is within the bounds and made of allowlisted keys, and whose spec is one plain version.
#![no_main]
use flaggate::internals::{classify, Class, Digest, TokenKind};
use flaggate_fuzz::header_lines;
use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Input: the query on the first line, then `name: value` header lines.
    let mut lines = data.split(|b| *b == b'\n');
    let query = lines.next().and_then(|q| std::str::from_utf8(q).ok());
    let headers = header_lines(lines);
    let token = Digest::of("t");
    let class = classify(
        &Method::GET,
        "/api/client/features",
        query,
        &headers,
        TokenKind::Client,
        token,
    );
    match class {
        Some(Class::Cacheable(key)) => {
            assert_eq!(key.token, token);
            let q = key.query.as_deref().unwrap_or("");
            assert_eq!(q, query.unwrap_or(""), "the key holds the query byte for byte");
            assert!(q.len() <= 256);
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                let k = pair.split('=').next().unwrap_or("");
                assert!(["project", "namePrefix", "tag"].contains(&k), "{pair}");
            }
            let spec = headers.get("unleash-client-spec").map(|v| v.to_str().unwrap());
            assert_eq!(key.spec.as_deref(), spec);
            if let Some(s) = spec {
                assert_eq!(s.split('.').count(), 3);
                assert!(s
                    .split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())));
            }
            assert!(headers.get_all("if-none-match").iter().count() <= 1);
        }
        Some(Class::Bypass(_)) => {}
        None => panic!("the features path is always classified"),
    }
    // Any other path is never the shield's.
    assert!(classify(
        &Method::GET,
        "/api/client/features/x",
        query,
        &headers,
        TokenKind::Client,
        token
    )
    .is_none());
});
