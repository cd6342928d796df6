//! Who may reach what: route rules (path prefix → token kinds) and the decision for one request.
//!
//! Unleash's own gate is a case-sensitive *substring* test in front of a case-insensitive router; ours
//! is a whole-segment prefix match on the canonical path, longest prefix first, and a path no rule names
//! is open to admin tokens only (default deny).

use crate::path::CanonicalPath;
use crate::token::{TokenInfo, TokenKind};
use http::Method;
use std::sync::{Arc, LazyLock};

/// The methods Unleash's API uses, the only ones forwarded, with their metric labels. `CONNECT` would
/// turn the gateway into a tunnel and `TRACE` echoes headers (credentials included) back; neither, nor
/// any extension method, is forwarded.
pub const METHODS: [(Method, &str); 7] = [
    (Method::GET, "GET"),
    (Method::HEAD, "HEAD"),
    (Method::POST, "POST"),
    (Method::PUT, "PUT"),
    (Method::PATCH, "PATCH"),
    (Method::DELETE, "DELETE"),
    (Method::OPTIONS, "OPTIONS"),
];

/// The method's name if the gateway forwards it.
pub fn forwarded_method(m: &Method) -> Option<&'static str> {
    METHODS.iter().find(|(method, _)| method == m).map(|(_, name)| *name)
}

/// The `Allow` header of a 405: [`METHODS`], as a list.
pub static ALLOW: LazyLock<http::HeaderValue> = LazyLock::new(|| {
    let list: Vec<&str> = METHODS.iter().map(|(_, name)| *name).collect();
    http::HeaderValue::from_str(&list.join(", ")).unwrap_or_else(|_| http::HeaderValue::from_static("GET"))
});

/// A set of token kinds, as a bit set so the hot-path test is one AND.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindSet(u8);

impl KindSet {
    pub fn of(kinds: &[TokenKind]) -> KindSet {
        KindSet(kinds.iter().fold(0, |acc, k| acc | KindSet::bit(*k)))
    }

    fn bit(k: TokenKind) -> u8 {
        1 << (k as u8)
    }

    pub fn contains(self, k: TokenKind) -> bool {
        self.0 & KindSet::bit(k) != 0
    }

    pub fn kinds(self) -> impl Iterator<Item = TokenKind> {
        TokenKind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

/// How a 401 looks on this route: Unleash answers differently on its API-token routes and elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenialStyle {
    /// `/api/client`, `/api/frontend`: `{"message":"This endpoint requires an API token…"}`.
    ApiToken,
    /// Admin and UI routes: `{"name":"AuthenticationRequired"|"UnauthorizedError",…}`.
    Session,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Stable, bounded name: the `route_class` in metrics and logs.
    pub name: Arc<str>,
    pub prefix: String,
    pub allow: KindSet,
    /// A real CORS preflight passes without a token (browser SDKs): see [`crate::proxy::headers::is_cors_preflight`].
    pub preflight: bool,
    pub denial: DenialStyle,
    /// Only these networks may use the route (`None`: any).
    pub sources: Option<Arc<[crate::net::Cidr]>>,
    /// Open without a token (an explicit opt-in; the defaults are never public).
    pub public: bool,
}

impl Rule {
    pub fn new(name: &str, prefix: &str, allow: &[TokenKind], preflight: bool, denial: DenialStyle) -> Rule {
        Rule {
            name: Arc::from(name),
            prefix: prefix.to_string(),
            allow: KindSet::of(allow),
            preflight,
            denial,
            sources: None,
            public: false,
        }
    }

    /// Whether `client` may use this route at all.
    pub fn admits_source(&self, client: std::net::IpAddr) -> bool {
        self.sources
            .as_ref()
            .is_none_or(|nets| crate::net::any_contains(nets, client))
    }
}

/// An immutable rule table; reloads build a new one and swap it in.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Longest prefix first, so the first match is the most specific.
    rules: Vec<Rule>,
    unmatched: Rule,
}

pub const UNMATCHED: &str = "unmatched";

impl Policy {
    /// Unleash 7.x's own scopes (see shared ground truth `matrix.md`).
    pub fn unleash_defaults() -> Vec<Rule> {
        use TokenKind::*;
        vec![
            Rule::new(
                "client",
                "/api/client",
                &[Client, Admin, Pat],
                false,
                DenialStyle::ApiToken,
            ),
            Rule::new(
                "frontend",
                "/api/frontend",
                &[Frontend, Admin],
                true,
                DenialStyle::ApiToken,
            ),
            Rule::new(
                "frontend-legacy",
                "/api/proxy",
                &[Frontend, Admin],
                true,
                DenialStyle::ApiToken,
            ),
            Rule::new("admin-api", "/api/admin", &[Admin, Pat], false, DenialStyle::Session),
        ]
    }

    /// Defaults with `overrides` applied: a rule with the name or prefix of a default replaces it.
    pub fn new(overrides: Vec<Rule>) -> Policy {
        let mut rules: Vec<Rule> = Policy::unleash_defaults()
            .into_iter()
            .filter(|d| !overrides.iter().any(|o| o.name == d.name || o.prefix == d.prefix))
            .collect();
        rules.extend(overrides);
        rules.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then_with(|| a.name.cmp(&b.name)));
        Policy {
            rules,
            unmatched: Rule::new(UNMATCHED, "/", &[TokenKind::Admin], false, DenialStyle::Session),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn route(&self, path: &CanonicalPath<'_>) -> &Rule {
        self.rules
            .iter()
            .find(|r| path.starts_with_segments(&r.prefix))
            .unwrap_or(&self.unmatched)
    }

    /// Route classes a token kind may reach, for `token explain`.
    pub fn reachable(&self, kind: TokenKind) -> Vec<&Rule> {
        self.rules
            .iter()
            .chain(std::iter::once(&self.unmatched))
            .filter(|r| r.allow.contains(kind))
            .collect()
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new(Vec::new())
    }
}

/// What the policy says about a request whose path matched `rule`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Token-less CORS preflight on a route that permits it: forwarded without body or credentials.
    Preflight,
    /// A public route: forwarded without a token check, as it came.
    Public,
    NoToken,
    UnknownToken,
    Expired,
    WrongScope,
}

/// The authorization decision, pure: `token` is the store's entry for the presented token (if any);
/// `cors_preflight` says the request is a real CORS preflight (an `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method` and no body), the only request a route may let through without one.
pub fn decide(rule: &Rule, cors_preflight: bool, presented: bool, token: Option<&TokenInfo>, now_unix: i64) -> Verdict {
    if rule.public {
        return Verdict::Public;
    }
    if rule.preflight && cors_preflight && !presented {
        return Verdict::Preflight;
    }
    if !presented {
        return Verdict::NoToken;
    }
    let Some(info) = token else {
        return Verdict::UnknownToken;
    };
    if info.is_expired_at(now_unix) {
        return Verdict::Expired;
    }
    if rule.allow.contains(info.kind) {
        Verdict::Allow
    } else {
        Verdict::WrongScope
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::canonicalize;
    use crate::token::{Digest, TokenSource};

    fn tok(kind: TokenKind, expires_at: Option<i64>) -> TokenInfo {
        TokenInfo {
            kind,
            projects: Arc::from(Vec::new()),
            environment: None,
            name: None,
            expires_at,
            fingerprint: Digest::of("x").fingerprint(),
            source: TokenSource::File,
        }
    }

    fn class(p: &Policy, path: &str) -> String {
        p.route(&canonicalize(path).unwrap()).name.to_string()
    }

    #[test]
    fn routes_by_longest_whole_segment_prefix() {
        let p = Policy::default();
        assert_eq!(class(&p, "/api/client/features"), "client");
        assert_eq!(class(&p, "/api/clientx"), UNMATCHED);
        assert_eq!(class(&p, "/api/admin/x/api/client"), "admin-api");
        assert_eq!(class(&p, "/api/frontend"), "frontend");
        assert_eq!(class(&p, "/health"), UNMATCHED);
        let p = Policy::new(vec![Rule::new(
            "metrics",
            "/api/client/metrics",
            &[TokenKind::Admin],
            false,
            DenialStyle::ApiToken,
        )]);
        assert_eq!(class(&p, "/api/client/metrics"), "metrics");
        assert_eq!(class(&p, "/api/client/features"), "client");
    }

    #[test]
    fn override_by_name_replaces_default() {
        let p = Policy::new(vec![Rule::new(
            "client",
            "/api/client",
            &[TokenKind::Client],
            false,
            DenialStyle::ApiToken,
        )]);
        let r = p.route(&canonicalize("/api/client/features").unwrap());
        assert!(!r.allow.contains(TokenKind::Pat));
        assert_eq!(p.rules().iter().filter(|r| &*r.name == "client").count(), 1);
    }

    #[test]
    fn decisions() {
        let p = Policy::default();
        let client = p.route(&canonicalize("/api/client/features").unwrap());
        let front = p.route(&canonicalize("/api/frontend").unwrap());
        let get = false;
        assert_eq!(decide(client, get, false, None, 0), Verdict::NoToken);
        assert_eq!(decide(client, get, true, None, 0), Verdict::UnknownToken);
        assert_eq!(
            decide(client, get, true, Some(&tok(TokenKind::Client, None)), 0),
            Verdict::Allow
        );
        assert_eq!(
            decide(client, get, true, Some(&tok(TokenKind::Frontend, None)), 0),
            Verdict::WrongScope
        );
        assert_eq!(
            decide(client, get, true, Some(&tok(TokenKind::Client, Some(10))), 10),
            Verdict::Expired
        );
        assert_eq!(decide(front, true, false, None, 0), Verdict::Preflight);
        assert_eq!(
            decide(client, true, false, None, 0),
            Verdict::NoToken,
            "the route takes no preflights"
        );
        assert_eq!(
            decide(front, false, false, None, 0),
            Verdict::NoToken,
            "not a real preflight"
        );
        assert_eq!(
            decide(front, get, true, Some(&tok(TokenKind::Pat, None)), 0),
            Verdict::WrongScope
        );
    }
}
