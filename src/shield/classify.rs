//! Which requests the shield may answer, and under which key. Pure functions, fuzzed and
//! property-tested: a request is either cacheable under a key that captures everything that changes
//! Unleash's answer, or bypasses the shield (forwarded exactly as without it) with a reason.
//!
//! What changes Unleash 7.5.1's `GET /api/client/features` answer: the token's scope (environment and
//! projects, which Unleash takes from its database, so the key holds the token's digest and no document
//! is ever served to another token), `Unleash-Client-Spec` (inline or separate segments), and the query
//! (`project`, `namePrefix`, `tag`). Nothing else in the request does (the SDK's identification headers,
//! `Accept-Encoding` and `If-None-Match` are answered, not keyed).

use crate::token::{Digest, TokenKind};
use http::{header, HeaderMap, Method};

/// The one path the shield answers.
pub const FEATURES: &str = "/api/client/features";
/// SDKs send their spec version in this header.
pub const CLIENT_SPEC: header::HeaderName = header::HeaderName::from_static("unleash-client-spec");

/// Bounds on the query the key may hold (longer ones bypass: SDKs send short ones).
pub const MAX_QUERY_BYTES: usize = 256;
pub const MAX_QUERY_PAIRS: usize = 8;
pub const MAX_VALUE_BYTES: usize = 100;
/// The query keys Unleash's client API filters by.
pub const QUERY_KEYS: [&str; 3] = ["project", "namePrefix", "tag"];

/// A cached document's identity: whose it is, for which spec, for which query — byte for byte.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub token: Digest,
    pub spec: Option<Box<str>>,
    pub query: Option<Box<str>>,
}

impl Key {
    /// What the key weighs in memory, for the cache's byte budget.
    pub fn weight(&self) -> usize {
        std::mem::size_of::<Key>()
            + self.spec.as_ref().map_or(0, |s| s.len())
            + self.query.as_ref().map_or(0, |q| q.len())
    }
}

/// Why a request to the features path is forwarded instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// Not `GET` (a `HEAD` included).
    Method,
    /// An admin token or PAT: Unleash resolves their scope from the query, not the token.
    TokenKind,
    /// A body, or body framing.
    Body,
    /// An `Unleash-Client-Spec` that is not one plain version (Unleash answers 400 to it).
    Spec,
    /// An `If-None-Match` that is not one strong entity-tag (`W/…`, a list, `*`).
    IfNoneMatch,
    /// A query beyond the allowlist or the bounds.
    Query,
    /// The client asked for no cached answer (`Cache-Control: no-cache`/`no-store`, `Pragma: no-cache`).
    NoCache,
    /// The token already has the most query variants it may create.
    Variants,
    /// The document is larger than `shield_max_entry_bytes`.
    TooLarge,
    /// The shield is off (`shield = off`).
    Disabled,
    /// `Connection` names a field beyond `close` and the hop-by-hop ones: forwarding removes what it
    /// names (RFC 9110 §7.6.1), so the request Unleash would see is not the one the key describes.
    Connection,
    /// The request could not be made into the one Unleash would get (forwarding answers why).
    Unprepared,
}

impl Bypass {
    pub const ALL: [Bypass; 12] = [
        Bypass::Method,
        Bypass::TokenKind,
        Bypass::Body,
        Bypass::Spec,
        Bypass::IfNoneMatch,
        Bypass::Query,
        Bypass::NoCache,
        Bypass::Variants,
        Bypass::TooLarge,
        Bypass::Disabled,
        Bypass::Connection,
        Bypass::Unprepared,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::Method => "method",
            Bypass::TokenKind => "token_kind",
            Bypass::Body => "body",
            Bypass::Spec => "spec_header",
            Bypass::IfNoneMatch => "inm_form",
            Bypass::Query => "query",
            Bypass::NoCache => "no_cache",
            Bypass::Variants => "variants_exceeded",
            Bypass::TooLarge => "too_large",
            Bypass::Disabled => "disabled",
            Bypass::Connection => "connection_option",
            Bypass::Unprepared => "unprepared",
        }
    }
}

/// The shield's view of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Class {
    Cacheable(Key),
    Bypass(Bypass),
}

/// Classifies a request to [`FEATURES`] that passed authentication and authorization with a token of
/// `kind` (`None` for any other path: not the shield's business at all).
pub fn classify(
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    kind: TokenKind,
    token: Digest,
) -> Option<Class> {
    if path != FEATURES {
        return None;
    }
    Some(match check(method, query, headers, kind) {
        Ok((spec, query)) => Class::Cacheable(Key {
            token,
            spec: spec.map(Box::from),
            query: query.map(Box::from),
        }),
        Err(b) => Class::Bypass(b),
    })
}

type Checked<'a> = Result<(Option<&'a str>, Option<&'a str>), Bypass>;

fn check<'a>(method: &Method, query: Option<&'a str>, headers: &'a HeaderMap, kind: TokenKind) -> Checked<'a> {
    if method != Method::GET {
        return Err(Bypass::Method);
    }
    if kind != TokenKind::Client {
        return Err(Bypass::TokenKind);
    }
    let zero_length = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .all(|v| v.as_bytes().iter().all(|b| *b == b'0'));
    if !zero_length || headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(Bypass::Body);
    }
    if asks_no_cache(headers) {
        return Err(Bypass::NoCache);
    }
    if crate::proxy::headers::connection_names_extra(headers) {
        return Err(Bypass::Connection);
    }
    let spec = single(headers, &CLIENT_SPEC).map_err(|_| Bypass::Spec)?;
    if spec.is_some_and(|s| !is_plain_version(s)) {
        return Err(Bypass::Spec);
    }
    let inm = single(headers, &header::IF_NONE_MATCH).map_err(|_| Bypass::IfNoneMatch)?;
    if inm.is_some_and(|v| !is_strong_etag(v)) {
        return Err(Bypass::IfNoneMatch);
    }
    let query = query.filter(|q| !q.is_empty());
    if query.is_some_and(|q| !is_allowed_query(q)) {
        return Err(Bypass::Query);
    }
    Ok((spec, query))
}

/// The one value of `name`, if present: more than one, or one that is not text, is an error.
fn single<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Result<Option<&'a str>, ()> {
    let mut all = headers.get_all(name).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(());
    }
    first.map(|v| v.to_str().map_err(|_| ())).transpose()
}

/// `Cache-Control: no-cache` or `no-store`, or `Pragma: no-cache` (RFC 9111 §5.2.1, §5.4).
fn asks_no_cache(headers: &HeaderMap) -> bool {
    let directive = |name: header::HeaderName, what: &[&str]| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| what.iter().any(|w| d.trim().eq_ignore_ascii_case(w)))
    };
    directive(header::CACHE_CONTROL, &["no-cache", "no-store"]) || directive(header::PRAGMA, &["no-cache"])
}

/// `MAJOR.MINOR.PATCH`, each 0 or up to four digits without a leading zero: what SDKs send, and what
/// Unleash's strict semver parse accepts (anything else is its 400, which we forward untouched).
pub fn is_plain_version(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 4
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p.len() == 1 || !p.starts_with('0'))
        })
}

/// One strong entity-tag: `"…"` with no `W/`, no list, not `*` (RFC 9110 §8.8.3).
pub fn is_strong_etag(v: &str) -> bool {
    v.len() >= 2
        && v.starts_with('"')
        && v.ends_with('"')
        && v[1..v.len() - 1]
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
}

/// `key=value` pairs joined by `&`, keys from [`QUERY_KEYS`], values of unreserved characters, `%XX`
/// and `:` (tags are `type:value`), within the bounds. Kept raw in the key: two spellings Express's
/// `qs` might read alike are two entries, never one document for two different questions.
pub fn is_allowed_query(q: &str) -> bool {
    if q.len() > MAX_QUERY_BYTES {
        return false;
    }
    let pairs: Vec<&str> = q.split('&').collect();
    pairs.len() <= MAX_QUERY_PAIRS
        && pairs.iter().all(|pair| {
            let Some((k, v)) = pair.split_once('=') else {
                return false;
            };
            QUERY_KEYS.contains(&k) && !v.is_empty() && v.len() <= MAX_VALUE_BYTES && is_plain_value(v)
        })
}

fn is_plain_value(v: &str) -> bool {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => match (b.get(i + 1), b.get(i + 2)) {
                (Some(h), Some(l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => i += 3,
                _ => return false,
            },
            c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b':') => i += 1,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn class(query: Option<&str>, h: &[(&str, &str)]) -> Option<Class> {
        classify(
            &Method::GET,
            FEATURES,
            query,
            &headers(h),
            TokenKind::Client,
            Digest::of("t"),
        )
    }

    #[test]
    fn only_the_features_path_is_the_shields_business() {
        for path in [
            "/api/client/features/x",
            "/api/client/metrics",
            "/api/frontend",
            "/api/admin/features",
        ] {
            assert_eq!(
                classify(
                    &Method::GET,
                    path,
                    None,
                    &HeaderMap::new(),
                    TokenKind::Client,
                    Digest::of("t")
                ),
                None
            );
        }
    }

    #[test]
    fn a_plain_sdk_poll_is_cacheable_under_token_spec_and_raw_query() {
        let Some(Class::Cacheable(k)) = class(
            Some("project=default&tag=simple:x"),
            &[("unleash-client-spec", "5.2.0"), ("if-none-match", "\"abc:12:v1\"")],
        ) else {
            panic!("not cacheable")
        };
        assert_eq!(k.token, Digest::of("t"));
        assert_eq!(k.spec.as_deref(), Some("5.2.0"));
        assert_eq!(k.query.as_deref(), Some("project=default&tag=simple:x"));
        assert!(matches!(
            class(None, &[]),
            Some(Class::Cacheable(Key {
                spec: None,
                query: None,
                ..
            }))
        ));
        assert!(matches!(
            class(Some(""), &[]),
            Some(Class::Cacheable(Key { query: None, .. }))
        ));
    }

    #[test]
    fn everything_unusual_bypasses_with_its_reason() {
        let by = |q: Option<&str>, h: &[(&str, &str)]| match class(q, h) {
            Some(Class::Bypass(b)) => b,
            other => panic!("{q:?} {h:?}: {other:?}"),
        };
        for q in [
            "t=1",
            "environment=production",
            "project[a]=x",
            "project",
            "project=",
            "project=a b",
            "project=%zz",
            "project=a%2",
            &format!("namePrefix={}", "a".repeat(101)),
            &"project=a&".repeat(9),
        ] {
            assert_eq!(by(Some(q), &[]), Bypass::Query, "{q}");
        }
        for spec in ["abc", "5.2", "5.2.0.1", "05.2.0", "5.2.0-beta", "12345.0.0"] {
            assert_eq!(by(None, &[("unleash-client-spec", spec)]), Bypass::Spec, "{spec}");
        }
        assert_eq!(
            by(
                None,
                &[("unleash-client-spec", "5.2.0"), ("unleash-client-spec", "5.2.0")]
            ),
            Bypass::Spec
        );
        for inm in ["W/\"a\"", "\"a\", \"b\"", "*", "a"] {
            assert_eq!(by(None, &[("if-none-match", inm)]), Bypass::IfNoneMatch, "{inm}");
        }
        assert_eq!(by(None, &[("content-length", "2")]), Bypass::Body);
        assert_eq!(by(None, &[("transfer-encoding", "chunked")]), Bypass::Body);
        assert_eq!(by(None, &[("cache-control", "max-age=0, No-Cache")]), Bypass::NoCache);
        assert_eq!(by(None, &[("pragma", "no-cache")]), Bypass::NoCache);
        for conn in ["unleash-client-spec", "close, If-None-Match", "keep-alive,x-a"] {
            assert_eq!(by(None, &[("connection", conn)]), Bypass::Connection, "{conn}");
        }
        for conn in [
            "close",
            "Keep-Alive",
            " keep-alive , close ",
            "",
            "Upgrade, HTTP2-Settings",
            "te",
        ] {
            assert!(
                matches!(class(None, &[("connection", conn)]), Some(Class::Cacheable(_))),
                "{conn}"
            );
        }
        let h = HeaderMap::new();
        for (m, k, want) in [
            (Method::HEAD, TokenKind::Client, Bypass::Method),
            (Method::POST, TokenKind::Client, Bypass::Method),
            (Method::GET, TokenKind::Admin, Bypass::TokenKind),
            (Method::GET, TokenKind::Pat, Bypass::TokenKind),
        ] {
            assert_eq!(
                classify(&m, FEATURES, None, &h, k, Digest::of("t")),
                Some(Class::Bypass(want))
            );
        }
    }

    proptest::proptest! {
        /// Whatever the query and spec: either a bypass, or a key that holds exactly what was asked,
        /// within the bounds, made only of allowed keys.
        #[test]
        fn a_query_either_bypasses_or_round_trips_into_its_key(q in "[a-zA-Z=&%:0-9._~ \\[\\]-]{0,300}", spec in "[0-9.a-z]{0,12}") {
            let h = headers(&[("unleash-client-spec", &spec)]);
            match classify(&Method::GET, FEATURES, Some(&q), &h, TokenKind::Client, Digest::of("t")) {
                Some(Class::Cacheable(k)) => {
                    let kq = k.query.as_deref().unwrap_or("");
                    proptest::prop_assert_eq!(kq, q.as_str());
                    proptest::prop_assert!(kq.len() <= MAX_QUERY_BYTES);
                    proptest::prop_assert!(kq.is_empty() || kq.split('&').all(|p| QUERY_KEYS.contains(&p.split('=').next().unwrap_or(""))));
                    proptest::prop_assert_eq!(k.spec.as_deref(), Some(spec.as_str()));
                    proptest::prop_assert!(is_plain_version(&spec));
                }
                Some(Class::Bypass(b)) => proptest::prop_assert!(matches!(b, Bypass::Query | Bypass::Spec)),
                None => proptest::prop_assert!(false, "the features path is always classified"),
            }
        }
    }
}
