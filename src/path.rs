//! The one canonical form of a request path, shared by authorization and forwarding.
//!
//! Gateways get bypassed when they decide on one reading of a path while the upstream acts on another
//! (Envoy CVE-2019-9901, CVE-2021-29492). So instead of normalising clever inputs we accept exactly one
//! spelling per resource and reject everything else with 400: the path we authorize is then, byte for
//! byte, the path we forward, and no upstream decoding step can turn it into a different route.
//!
//! The only rewrite is collapsing runs of `/`, which Unleash (Express) performs itself and which SDKs
//! produce when a base URL ends in a slash.

use std::borrow::Cow;
use std::fmt;

/// Longest path (after collapsing) we accept. Unleash routes are short; long paths only serve attacks.
pub const MAX_PATH_BYTES: usize = 2048;

/// A path that passed [`canonicalize`]; constructing one any other way is impossible.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalPath<'a>(Cow<'a, str>);

impl<'a> CanonicalPath<'a> {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_owned(self) -> CanonicalPath<'static> {
        CanonicalPath(Cow::Owned(self.0.into_owned()))
    }

    /// Whole-segment prefix match: `/api/client` matches `/api/client` and `/api/client/x`, never
    /// `/api/clientx`. Prefixes come from validated route rules (see [`is_rule_prefix`]).
    pub fn starts_with_segments(&self, prefix: &str) -> bool {
        segment_prefix(self.as_str(), prefix)
    }
}

impl fmt::Display for CanonicalPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a path is not canonical. The `code` is stable (it appears in JSON bodies and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with '/'")]
    NotOrigin,
    #[error("path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("dot segments ('.' or '..') are not allowed")]
    DotSegment,
    #[error("encoded '/' or '\\' is not allowed")]
    EncodedSlash,
    #[error("encoded '.' is not allowed")]
    EncodedDot,
    #[error("percent-encoded unreserved characters are not canonical; send them unencoded")]
    EncodedUnreserved,
    #[error("double percent-encoding is not allowed")]
    DoubleEncoding,
    #[error("malformed percent-encoding")]
    BadPercent,
    #[error("backslash is not allowed")]
    Backslash,
    #[error("control characters are not allowed")]
    Control,
    #[error("';' path parameters are not allowed")]
    PathParameter,
    #[error("'#' fragments are not allowed")]
    Fragment,
    #[error("non-ASCII bytes are not allowed")]
    NonAscii,
    #[error("character not allowed in a path")]
    BadChar,
}

impl PathError {
    pub fn code(self) -> &'static str {
        match self {
            PathError::NotOrigin => "path_not_origin_form",
            PathError::TooLong => "path_too_long",
            PathError::DotSegment => "path_dot_segment",
            PathError::EncodedSlash => "path_encoded_slash",
            PathError::EncodedDot => "path_encoded_dot",
            PathError::EncodedUnreserved => "path_encoded_unreserved",
            PathError::DoubleEncoding => "path_double_encoding",
            PathError::BadPercent => "path_bad_percent",
            PathError::Backslash => "path_backslash",
            PathError::Control => "path_control_char",
            PathError::PathParameter => "path_parameter",
            PathError::Fragment => "path_fragment",
            PathError::NonAscii => "path_non_ascii",
            PathError::BadChar => "path_bad_char",
        }
    }
}

/// RFC 3986 §2.3 unreserved characters: percent-encoding them creates a second spelling (§6.2.2.2).
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 `pchar` minus `;` (path parameters, which some servers strip before routing) plus `/`.
fn is_plain_path_byte(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@' | b'/'
        )
}

fn classify_raw(b: u8) -> PathError {
    match b {
        b'\\' => PathError::Backslash,
        b';' => PathError::PathParameter,
        b'#' => PathError::Fragment,
        0x00..=0x1f | 0x7f => PathError::Control,
        0x80..=0xff => PathError::NonAscii,
        _ => PathError::BadChar,
    }
}

/// What a `%XX` may stand for: printable ASCII that is not unreserved and cannot change routing.
fn check_decoded(b: u8) -> Result<(), PathError> {
    match b {
        b'/' | b'\\' => Err(PathError::EncodedSlash),
        b'.' => Err(PathError::EncodedDot),
        b'%' => Err(PathError::DoubleEncoding),
        b';' => Err(PathError::PathParameter),
        b'#' => Err(PathError::Fragment),
        0x00..=0x1f | 0x7f => Err(PathError::Control),
        0x80..=0xff => Err(PathError::NonAscii),
        b if is_unreserved(b) => Err(PathError::EncodedUnreserved),
        _ => Ok(()),
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Validates `raw` (the path part of an origin-form request target, without `?query`) and returns its
/// canonical form. Borrows when nothing needs collapsing, which is the case for every SDK request.
pub fn canonicalize(raw: &str) -> Result<CanonicalPath<'_>, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOrigin);
    }
    if bytes.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    let mut needs_collapse = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_val);
            let lo = bytes.get(i + 2).copied().and_then(hex_val);
            match (hi, lo) {
                (Some(h), Some(l)) => check_decoded(h << 4 | l)?,
                _ => return Err(PathError::BadPercent),
            }
            i += 3;
            continue;
        }
        if !is_plain_path_byte(b) {
            return Err(classify_raw(b));
        }
        if b == b'/' && bytes.get(i + 1) == Some(&b'/') {
            needs_collapse = true;
        }
        i += 1;
    }
    let path: Cow<'_, str> = if needs_collapse {
        let mut out = String::with_capacity(raw.len());
        let mut prev_slash = false;
        for c in raw.chars() {
            if c == '/' && prev_slash {
                continue;
            }
            prev_slash = c == '/';
            out.push(c);
        }
        Cow::Owned(out)
    } else {
        Cow::Borrowed(raw)
    };
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(PathError::DotSegment);
    }
    Ok(CanonicalPath(path))
}

/// Whole-segment prefix test on plain strings (the pure core of [`CanonicalPath::starts_with_segments`]).
pub fn segment_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
}

/// A route-rule prefix must be canonical and made of unreserved characters and `/` only. Then no
/// percent-encoded segment can ever equal a rule segment, so the decision cannot depend on how a client
/// chose to encode a character.
pub fn is_rule_prefix(prefix: &str) -> bool {
    prefix.starts_with('/')
        && prefix.bytes().all(|b| is_unreserved(b) || b == b'/')
        && !prefix.contains("//")
        && canonicalize(prefix).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_sdk_paths_without_copying() {
        for p in [
            "/api/client/features",
            "/api/frontend",
            "/api/client/features/anchor.flag-on",
            "/",
        ] {
            let c = canonicalize(p).unwrap();
            assert!(matches!(c.0, Cow::Borrowed(_)), "{p}");
            assert_eq!(c.as_str(), p);
        }
    }

    #[test]
    fn collapses_repeated_slashes_only() {
        assert_eq!(
            canonicalize("//api///client//features/").unwrap().as_str(),
            "/api/client/features/"
        );
    }

    #[test]
    fn rejects_every_non_canonical_form() {
        let cases = [
            ("/api/client/../admin", PathError::DotSegment),
            ("/api/client/./features", PathError::DotSegment),
            ("/api/client/..", PathError::DotSegment),
            ("/api//..//admin", PathError::DotSegment),
            ("/api/client/%2e%2e/admin", PathError::EncodedDot),
            ("/api/client/%2E./admin", PathError::EncodedDot),
            ("/api/client%2fadmin", PathError::EncodedSlash),
            ("/api/client%2Fadmin", PathError::EncodedSlash),
            ("/api/client%5cadmin", PathError::EncodedSlash),
            ("/api/client\\admin", PathError::Backslash),
            ("/api/client\0", PathError::Control),
            ("/api/client%00", PathError::Control),
            ("/api/client%0a", PathError::Control),
            ("/api/client\t", PathError::Control),
            ("/api/client;x=1", PathError::PathParameter),
            ("/api/client%3b", PathError::PathParameter),
            ("/api/client#x", PathError::Fragment),
            ("/api/client%23x", PathError::Fragment),
            ("/api/clïent", PathError::NonAscii),
            ("/api/client%c3%af", PathError::NonAscii),
            ("/api/%63lient", PathError::EncodedUnreserved),
            ("/api/client%252e", PathError::DoubleEncoding),
            ("/api/client%2", PathError::BadPercent),
            ("/api/client%zz", PathError::BadPercent),
            ("/api/client features", PathError::BadChar),
            ("api/client", PathError::NotOrigin),
            ("*", PathError::NotOrigin),
        ];
        for (p, want) in cases {
            assert_eq!(canonicalize(p), Err(want), "{p:?}");
        }
        assert_eq!(
            canonicalize(&format!("/{}", "a".repeat(MAX_PATH_BYTES))),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn prefix_matches_whole_segments_only() {
        let p = |s| canonicalize(s).unwrap();
        assert!(p("/api/client").starts_with_segments("/api/client"));
        assert!(p("/api/client/features").starts_with_segments("/api/client"));
        assert!(!p("/api/clientx").starts_with_segments("/api/client"));
        assert!(!p("/api/admin/x/api/client").starts_with_segments("/api/client"));
        assert!(!p("/API/client").starts_with_segments("/api/client"));
        assert!(p("/anything").starts_with_segments("/"));
    }

    #[test]
    fn rule_prefixes_are_plain() {
        assert!(is_rule_prefix("/api/client"));
        assert!(!is_rule_prefix("/api/a:b"));
        assert!(!is_rule_prefix("/api/%63"));
        assert!(!is_rule_prefix("/api/../x"));
        assert!(!is_rule_prefix("api"));
    }
}
