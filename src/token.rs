//! The Unleash token model: what a token string looks like, how we name it without revealing it, and
//! what the store knows about it.
//!
//! Unleash matches the *whole* token string exactly and takes type, projects and environment from its
//! database; the `project:env.` prefix is only a label. So [`parse`] is for humans (`token explain`) and
//! hints, never for authorization: only a store entry found by [`Digest`] authorizes anything.

pub mod auth;
pub mod extract;
pub mod file;
pub mod metrics;
pub mod pat;
pub mod snapshot;
pub mod store;
pub mod unleash;

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

/// SHA-256 of the whole token string. The only form in which a token is stored or compared.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(token: &str) -> Digest {
        Digest(Sha256::digest(token.as_bytes()).into())
    }

    pub fn from_hex(s: &str) -> Option<Digest> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Digest(out))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Short, log-safe name for a token: the first 8 hex digits of its digest.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint([self.0[0], self.0[1], self.0[2], self.0[3]])
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.fingerprint())
    }
}

/// What logs, metrics, errors and `token explain` show instead of a secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 4]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Token kinds as the gateway's policy sees them. Unleash's `backend` tokens are listed as `client`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    #[serde(alias = "backend")]
    Client,
    Frontend,
    Admin,
    Pat,
}

impl TokenKind {
    pub const ALL: [TokenKind; 4] = [TokenKind::Client, TokenKind::Frontend, TokenKind::Admin, TokenKind::Pat];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Client => "client",
            TokenKind::Frontend => "frontend",
            TokenKind::Admin => "admin",
            TokenKind::Pat => "pat",
        }
    }

    pub fn parse_name(s: &str) -> Option<TokenKind> {
        match s {
            "client" | "backend" => Some(TokenKind::Client),
            "frontend" => Some(TokenKind::Frontend),
            "admin" => Some(TokenKind::Admin),
            "pat" => Some(TokenKind::Pat),
            _ => None,
        }
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a store entry came from; on conflict the higher-priority source wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenSource {
    /// Listed in the operator's token file: wins over everything.
    File,
    /// Synced from Unleash's token list.
    Unleash,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::File => "file",
            TokenSource::Unleash => "unleash",
        }
    }
}

/// Everything the gateway knows about a token, minus the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub kind: TokenKind,
    pub projects: Arc<[String]>,
    pub environment: Option<String>,
    pub name: Option<String>,
    /// Unix seconds; the token is refused from this second on.
    pub expires_at: Option<i64>,
    pub fingerprint: Fingerprint,
    pub source: TokenSource,
}

impl TokenInfo {
    pub fn is_expired_at(&self, now_unix: i64) -> bool {
        self.expires_at.is_some_and(|t| now_unix >= t)
    }
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The label part of a token string, as Unleash formats it. Informational only (see module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shape<'a> {
    /// `user:<secret>`: a personal access token.
    Pat,
    /// `<projects>:<environment>.<secret>`.
    Api {
        projects: ProjectLabel<'a>,
        environment: &'a str,
    },
    /// No recognisable prefix: an old-style or hand-made token (Unleash accepts any initial string).
    Legacy,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProjectLabel<'a> {
    /// `*`: every project.
    All,
    /// `[]`: several projects, listed only in Unleash's database.
    Several,
    One(&'a str),
}

impl Shape<'_> {
    /// The kind the label suggests; `None` when only the store can say (client vs frontend).
    pub fn kind_hint(&self) -> Option<TokenKind> {
        match self {
            Shape::Pat => Some(TokenKind::Pat),
            Shape::Api {
                projects: ProjectLabel::All,
                environment: "*",
            } => Some(TokenKind::Admin),
            _ => None,
        }
    }
}

/// Reads the label of a token string without judging whether the token exists.
pub fn parse(token: &str) -> Shape<'_> {
    if token.strip_prefix("user:").is_some_and(|s| !s.is_empty()) {
        return Shape::Pat;
    }
    let Some((label, secret)) = token.split_once('.') else {
        return Shape::Legacy;
    };
    let Some((project, environment)) = label.split_once(':') else {
        return Shape::Legacy;
    };
    if project.is_empty() || environment.is_empty() || secret.is_empty() {
        return Shape::Legacy;
    }
    let projects = match project {
        "*" => ProjectLabel::All,
        "[]" => ProjectLabel::Several,
        p => ProjectLabel::One(p),
    };
    Shape::Api { projects, environment }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unleash_token_shapes() {
        assert_eq!(parse("user:abc"), Shape::Pat);
        assert_eq!(
            parse("*:*.abc"),
            Shape::Api {
                projects: ProjectLabel::All,
                environment: "*"
            }
        );
        assert_eq!(parse("*:*.abc").kind_hint(), Some(TokenKind::Admin));
        assert_eq!(
            parse("[]:development.abc"),
            Shape::Api {
                projects: ProjectLabel::Several,
                environment: "development"
            }
        );
        assert_eq!(
            parse("default:production.a.b"),
            Shape::Api {
                projects: ProjectLabel::One("default"),
                environment: "production"
            }
        );
        assert_eq!(parse("default:production.abc").kind_hint(), None);
        for legacy in ["secret123", "user:", "a:b.", ":b.c", "a.b", "*:.x"] {
            assert_eq!(parse(legacy), Shape::Legacy, "{legacy}");
        }
    }

    #[test]
    fn fingerprint_is_digest_prefix_and_never_the_secret() {
        let d = Digest::of("*:development.supersecret");
        let fp = d.fingerprint().to_string();
        assert_eq!(fp.len(), 8);
        assert!(d.to_hex().starts_with(&fp));
        assert!(!format!("{d:?}").contains("supersecret"));
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
    }

    #[test]
    fn expiry_is_to_the_second() {
        let info = TokenInfo {
            kind: TokenKind::Client,
            projects: Arc::from(vec!["*".to_string()]),
            environment: None,
            name: None,
            expires_at: Some(100),
            fingerprint: Digest::of("x").fingerprint(),
            source: TokenSource::File,
        };
        assert!(!info.is_expired_at(99));
        assert!(info.is_expired_at(100));
    }
}
