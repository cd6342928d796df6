//! Invariant: after hygiene no hop-by-hop header, no header the client named in `Connection`, and no
//! client copy (in any spelling) of a header the gateway sets survives; the gateway's own values are
//! the only ones present.
#![no_main]
use flaggate::proxy::headers::{
    forwarded_for, set_forwarded, strip_gateway_set, strip_hop_by_hop, GATEWAY_SET, HOP_BY_HOP,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Input: lines of `name: value`.
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let listed: Vec<HeaderName> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let auth_before = headers.get_all("authorization").iter().cloned().collect::<Vec<_>>();
    strip_hop_by_hop(&mut headers);
    strip_gateway_set(&mut headers);
    for h in HOP_BY_HOP.iter().chain(&listed) {
        assert!(!headers.contains_key(h), "{h} survived");
    }
    for k in headers.keys() {
        let dashed = k.as_str().replace('_', "-");
        assert!(!GATEWAY_SET.iter().any(|g| g.as_str() == dashed), "{k} survived");
    }
    // Authorization is kept unless the client itself listed it as hop-by-hop.
    if !listed.iter().any(|l| l == "authorization") {
        assert_eq!(headers.get_all("authorization").iter().cloned().collect::<Vec<_>>(), auth_before);
    }
    set_forwarded(&mut headers, forwarded_for("10.1.2.3".parse().unwrap()), "http", None);
    assert_eq!(headers.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), vec!["10.1.2.3"]);
    assert_eq!(headers.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(), vec!["http"]);
});
