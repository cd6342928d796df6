//! Invariants: after hygiene no hop-by-hop header, no header the client named in `Connection`, no client
//! copy (in any spelling) of a header the gateway sets or of an override or forwarding claim, and no
//! consumed field survives; the gateway's own values are the only ones present; a `Connection` naming a
//! protected field is always found; and only a plain `host[:port]` is ever passed on as a host.
#![no_main]
use flaggate::internals::headers::{
    connection_names_protected, forwarded_for, is_host_port, set_forwarded, strip_consumed, strip_gateway_set,
    strip_hop_by_hop, CONSUMED, FORWARDING_CLAIMS, GATEWAY_SET, HOP_BY_HOP, METHOD_OVERRIDES, PATH_OVERRIDES,
    PROTECTED,
};
use flaggate_fuzz::header_lines;
use http::HeaderName;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Input: lines of `name: value`.
    let mut headers = header_lines(data.split(|b| *b == b'\n'));
    let listed: Vec<HeaderName> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let protected_listed = listed.iter().find(|l| PROTECTED.contains(l));
    assert_eq!(
        connection_names_protected(&headers).is_some(),
        protected_listed.is_some()
    );
    let host = headers.get("host").cloned();
    let auth_before = headers.get_all("authorization").iter().cloned().collect::<Vec<_>>();
    strip_hop_by_hop(&mut headers);
    strip_gateway_set(&mut headers);
    strip_consumed(&mut headers);
    for h in HOP_BY_HOP.iter().chain(&listed).chain(&CONSUMED) {
        assert!(!headers.contains_key(h), "{h} survived");
    }
    for k in headers.keys() {
        let dashed = k.as_str().replace('_', "-");
        let forbidden = GATEWAY_SET
            .iter()
            .chain(PATH_OVERRIDES.iter())
            .chain(METHOD_OVERRIDES.iter())
            .chain(FORWARDING_CLAIMS.iter());
        assert!(!forbidden.clone().any(|g| g.as_str() == dashed), "{k} survived");
        assert!(!k.as_str().starts_with("sec-websocket-"), "{k} survived");
    }
    // Authorization is kept unless the client itself listed it (which the gateway refuses earlier).
    if protected_listed.is_none() {
        assert_eq!(
            headers.get_all("authorization").iter().cloned().collect::<Vec<_>>(),
            auth_before
        );
    }
    set_forwarded(
        &mut headers,
        forwarded_for("10.1.2.3".parse().unwrap()),
        "http",
        host.clone(),
    );
    assert_eq!(
        headers.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
        vec!["10.1.2.3"]
    );
    assert_eq!(
        headers.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(),
        vec!["http"]
    );
    if let Some(fh) = headers.get("x-forwarded-host") {
        let b = fh.as_bytes();
        assert!(is_host_port(b));
        assert!(
            !b.iter()
                .any(|c| matches!(c, b'@' | b'/' | b' ' | b'\t' | b'?' | b'#' | b'\\')),
            "{fh:?}"
        );
        let authority: http::uri::Authority = fh.to_str().unwrap().parse().expect("a host:port is an authority");
        assert_eq!(authority.as_str().as_bytes(), b);
    }
});
