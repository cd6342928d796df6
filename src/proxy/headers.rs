//! Header hygiene, as small pure functions. A proxy that lets the client decide which headers it drops
//! (Traefik CVE-2021-32813, CVE-2024-45410) or which forwarding headers it trusts is not a gate.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use std::net::IpAddr;

/// Hop-by-hop fields (RFC 9110 §7.6.1, plus the non-standard `Keep-Alive` and `Proxy-Connection` that
/// RFC 9110 tells intermediaries to treat the same way, and `HTTP2-Settings`, which RFC 9113 §3.2.1 made
/// connection-specific for the h2c upgrade). They describe one connection, never the next.
pub const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("http2-settings"),
];

/// The request id: honoured from the client when well-formed, else made; sent upstream and returned.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers the gateway sets itself: every client copy is removed before ours are added (RFC 7239 §8.2,
/// forwarding headers must not be trusted from an untrusted hop).
pub static GATEWAY_SET: [HeaderName; 6] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-real-ip"),
    X_REQUEST_ID,
];

/// Path-override headers some frameworks honour (IIS `X-Original-URL`/`X-Rewrite-URL`, nginx-style
/// `X-Original-URI`, `X-Override-URL`, proxies' `X-Forwarded-Uri`/`-Prefix`/`-Path`). The gateway
/// authorizes the request line only, so none of them may reach an upstream that could route by them.
pub static PATH_OVERRIDES: [HeaderName; 7] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-original-uri"),
    HeaderName::from_static("x-override-url"),
    HeaderName::from_static("x-forwarded-uri"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-path"),
];

/// Method-override headers (Express's `method-override`, Rails, many REST frameworks): they replace the
/// method the gateway authorized — a `GET` the policy allowed could act as a `DELETE` upstream.
pub static METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Claims about the client, its host or its scheme that only a proxy in front of us may make, besides the
/// ones the gateway sets itself ([`GATEWAY_SET`]). Unleash runs Express with `trust proxy` on, and other
/// frameworks read these too (`X-Host`, `X-Original-Host` and `X-Forwarded-Server` to build URLs,
/// `X-Client-IP` and `True-Client-IP` for the client address, `X-Forwarded-Port`/`-Scheme` for links):
/// from a client they are spoofing, never information (RFC 7239 §8.2).
pub static FORWARDING_CLAIMS: [HeaderName; 7] = [
    HeaderName::from_static("x-host"),
    HeaderName::from_static("x-original-host"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("true-client-ip"),
];

/// Fields the gateway has already acted on, so that they mean nothing upstream: `Expect` (the gateway's
/// HTTP layer answered `100-continue` itself and reads the body before forwarding it; RFC 9110 §10.1.1),
/// and the WebSocket handshake's `Sec-WebSocket-*` (the gateway never forwards an upgrade, so they
/// could only confuse a server that looks at them without `Upgrade`).
pub const CONSUMED: [HeaderName; 1] = [header::EXPECT];
const SEC_WEBSOCKET: &str = "sec-websocket-";

/// Fields the gateway authorizes or frames by. A `Connection` header naming one would make the
/// hop-by-hop rule (RFC 9110 §7.6.1: remove every field `Connection` names) drop it *after* the request
/// was authorized — the very credential just checked, so that Unleash sees a token-less request and may
/// fall back to a session cookie. No real client lists these; such a request is refused.
pub const PROTECTED: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::HOST,
    header::CONTENT_LENGTH,
];

/// The first protected field a `Connection` header names, if any.
pub fn connection_names_protected(headers: &HeaderMap) -> Option<&'static HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|name| PROTECTED.iter().find(|p| name.eq_ignore_ascii_case(p.as_str())))
}

/// A `Host` (or `:authority`) fit to pass on as `X-Forwarded-Host`: `host[:port]`, where host is a DNS
/// name, an IPv4 address or a bracketed IPv6 literal (RFC 9110 §7.2, RFC 3986 §3.2.2) — no userinfo, no
/// path, no spaces. Anything else is not forwarded: Unleash trusts proxy headers, and builds links from it.
pub fn is_host_port(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|b| *b == b':') {
        Some(i) if !value[..i].contains(&b':') || value[..i].ends_with(b"]") => (&value[..i], Some(&value[i + 1..])),
        _ => (value, None),
    };
    let port_ok = port.is_none_or(|p| (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit));
    let host_ok = match host {
        [b'[', inner @ .., b']'] => {
            !inner.is_empty() && inner.iter().all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
        }
        _ => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.')
                && !host.starts_with(b".")
                && !host.starts_with(b"-")
        }
    };
    port_ok && host_ok
}

/// Removes [`CONSUMED`] fields and `Sec-WebSocket-*`.
pub fn strip_consumed(headers: &mut HeaderMap) {
    for name in &CONSUMED {
        headers.remove(name);
    }
    if headers.keys().any(|k| k.as_str().starts_with(SEC_WEBSOCKET)) {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with(SEC_WEBSOCKET))
            .cloned()
            .collect();
        for name in names {
            headers.remove(name);
        }
    }
}

/// A real CORS preflight (Fetch standard, "CORS-preflight request"): `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`, and no body — browsers never send one, so a declared length above
/// zero or any `Transfer-Encoding` makes it something else. Only this request may pass a browser route
/// without a token; anything else that merely uses `OPTIONS` is a request like any other.
pub fn is_cors_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        && !headers.contains_key(header::TRANSFER_ENCODING)
        && headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .all(|v| v.as_bytes().iter().all(|b| *b == b'0'))
}

/// What a token-less preflight may not carry upstream: a preflight asks whether a request *would* be
/// allowed, so it is sent with no credentials (a present-but-empty `Authorization`, a cookie) and no
/// body or body framing, and Unleash answers it from the CORS headers alone.
pub const PREFLIGHT_STRIP: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
];

/// Removes [`PREFLIGHT_STRIP`] from a preflight about to be forwarded.
pub fn strip_for_preflight(headers: &mut HeaderMap) {
    for name in &PREFLIGHT_STRIP {
        headers.remove(name);
    }
}

/// Removes the fields named in `Connection` (RFC 9110 §7.6.1: "a proxy MUST parse the Connection
/// header field … and remove any header field(s) … with the same name") and then the fixed hop-by-hop
/// set. Names we must keep (`Authorization`, `Host` handled elsewhere) are only dropped if the client
/// listed them, which then simply yields a request without them, never one with ours missing.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Nearly every `Connection` (`keep-alive`, `close`, `upgrade`) names only connection options or
    // fields removed below anyway: then there is nothing to collect, and nothing is allocated.
    if connection_names_extra(headers) {
        let names: Vec<HeaderName> = connection_options(headers)
            .filter(|n| is_extra_option(n))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in names {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Whether `Connection` names a field that [`strip_hop_by_hop`] removes only because it is named there
/// (beyond `close` and the fixed hop-by-hop set): the request forwarded then differs from the one
/// received in more than its framing.
pub fn connection_names_extra(headers: &HeaderMap) -> bool {
    headers.contains_key(header::CONNECTION) && connection_options(headers).any(is_extra_option)
}

fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
}

fn is_extra_option(name: &str) -> bool {
    !name.eq_ignore_ascii_case("close") && !HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h.as_str()))
}

/// Every field a client may not send through: the gateway's own, path and method overrides, and
/// forwarding claims.
fn client_forbidden() -> impl Iterator<Item = &'static HeaderName> {
    GATEWAY_SET
        .iter()
        .chain(&PATH_OVERRIDES)
        .chain(&METHOD_OVERRIDES)
        .chain(&FORWARDING_CLAIMS)
}

/// Removes client copies of headers the gateway sets, overrides and forwarding claims, including `_`
/// spellings: some servers and frameworks fold `X_Forwarded_For` into `X-Forwarded-For`, so the variant
/// would smuggle a value past us.
pub fn strip_gateway_set(headers: &mut HeaderMap) {
    for name in client_forbidden() {
        headers.remove(name);
    }
    if headers.keys().any(|k| k.as_str().contains('_')) {
        let variants: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().contains('_'))
            .filter(|k| {
                let dashed = k.as_str().replace('_', "-");
                client_forbidden().any(|g| g.as_str() == dashed) || dashed == "authorization" || dashed == "host"
            })
            .cloned()
            .collect();
        for name in variants {
            headers.remove(name);
        }
    }
}

/// Lets a browser page on another origin read one of *our* denials on a browser-facing route, as Unleash's
/// own denials there allow (Fetch standard, CORS protocol): without it the frontend SDK sees an opaque
/// "Failed to fetch" instead of the 401/403 it knows how to handle. Denials carry no data worth hiding.
pub fn allow_cross_origin_read(headers: &mut HeaderMap) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("ETag"));
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// The `X-Forwarded-For` value for a client address: made once per connection, not per request.
pub fn forwarded_for(client_ip: IpAddr) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(client_ip.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Sets the de-facto forwarding headers from what the gateway itself observed (the client address as
/// made by [`forwarded_for`]).
pub fn set_forwarded(headers: &mut HeaderMap, client: HeaderValue, proto: &'static str, host: Option<HeaderValue>) {
    headers.insert(HeaderName::from_static("x-forwarded-for"), client);
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
    if let Some(h) = host.filter(|h| is_host_port(h.as_bytes())) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_a_bodiless_options_with_origin_and_request_method_is_a_preflight() {
        let pre = [
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
        ];
        assert!(is_cors_preflight(&Method::OPTIONS, &map(&pre)));
        assert!(is_cors_preflight(
            &Method::OPTIONS,
            &map(&[pre[0], pre[1], ("content-length", "0")])
        ));
        assert!(!is_cors_preflight(&Method::GET, &map(&pre)), "not OPTIONS");
        assert!(
            !is_cors_preflight(&Method::OPTIONS, &map(&pre[..1])),
            "no request method"
        );
        assert!(!is_cors_preflight(&Method::OPTIONS, &map(&pre[1..])), "no origin");
        assert!(!is_cors_preflight(
            &Method::OPTIONS,
            &map(&[pre[0], pre[1], ("content-length", "1")])
        ));
        assert!(!is_cors_preflight(
            &Method::OPTIONS,
            &map(&[pre[0], pre[1], ("transfer-encoding", "chunked")])
        ));
    }

    #[test]
    fn only_a_plain_host_and_port_is_forwarded_as_x_forwarded_host() {
        for good in [
            "gw",
            "flags.example.com",
            "gw:4243",
            "10.0.0.1:80",
            "[::1]",
            "[2001:db8::1]:8443",
        ] {
            assert!(is_host_port(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "a b c",
            "admin:secret@host",
            "host/api/admin",
            "host:",
            "host:123456",
            "host:x",
            "[::1",
            "-x",
            ".x",
            "h\u{e9}",
            "::1",
            "host:80:80",
        ] {
            assert!(!is_host_port(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn a_connection_header_naming_a_protected_field_is_found_in_any_case_and_list_position() {
        assert_eq!(connection_names_protected(&map(&[("connection", "close")])), None);
        assert_eq!(
            connection_names_protected(&map(&[("connection", "keep-alive, x-a")])),
            None
        );
        for (value, name) in [
            ("Authorization", "authorization"),
            ("close, COOKIE", "cookie"),
            ("x-a,host", "host"),
            (" content-length ", "content-length"),
        ] {
            assert_eq!(
                connection_names_protected(&map(&[("connection", value)])).map(|h| h.as_str()),
                Some(name),
                "{value}"
            );
        }
    }

    #[test]
    fn overrides_claims_and_consumed_fields_are_removed_in_every_spelling() {
        let mut h = map(&[
            ("x-http-method-override", "DELETE"),
            ("X_HTTP_Method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-original-uri", "/api/admin"),
            ("x-override-url", "/api/admin"),
            ("x-host", "evil"),
            ("x-original-host", "evil"),
            ("x-forwarded-server", "evil"),
            ("x-forwarded-port", "1"),
            ("x-forwarded-scheme", "https"),
            ("x-client-ip", "6.6.6.6"),
            ("true-client-ip", "6.6.6.6"),
            ("expect", "100-continue"),
            ("sec-websocket-key", "abc"),
            ("sec-websocket-version", "13"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h);
        strip_gateway_set(&mut h);
        strip_consumed(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), vec!["accept"]);
    }

    #[test]
    fn connection_listed_and_hop_by_hop_are_removed() {
        let mut h = map(&[
            ("connection", "close, X-Custom , keep-alive"),
            ("connection", "x-other"),
            ("x-custom", "1"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("unleash-appname", "app"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            vec!["unleash-appname"]
        );
    }

    #[test]
    fn a_connection_naming_only_hop_by_hop_fields_in_any_case_removes_just_those() {
        let mut h = map(&[
            ("connection", "Keep-Alive, UPGRADE,,"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "h2c"),
            ("etag", "\"abc\""),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["content-type", "etag"]);
    }

    #[test]
    fn client_copies_of_our_headers_are_removed_in_every_spelling() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("X_Forwarded_For", "6.6.6.6"),
            ("x_forwarded_host", "evil"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("accept", "*/*"),
        ]);
        strip_gateway_set(&mut h);
        set_forwarded(
            &mut h,
            forwarded_for("10.0.0.1".parse().unwrap()),
            "http",
            Some(HeaderValue::from_static("gw")),
        );
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            vec!["10.0.0.1"]
        );
        assert_eq!(h["x-forwarded-host"], "gw");
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn underscore_spellings_of_authorization_and_host_go_but_the_real_ones_stay() {
        // An unrelated `_` header must not make the scan drop the real Authorization or Host.
        let mut h = map(&[
            ("authorization", "tok"),
            ("host", "gw"),
            ("x_trace_id", "1"),
            ("x_forwarded_for", "6.6.6.6"),
        ]);
        strip_gateway_set(&mut h);
        assert_eq!(h["authorization"], "tok");
        assert_eq!(h["host"], "gw");
        assert!(h.contains_key("x_trace_id"));
        assert!(!h.contains_key("x_forwarded_for"));
    }
}
