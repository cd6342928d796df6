//! Reading the token out of `Authorization`, the only place Unleash itself looks (no query parameter,
//! no `X-API-Key`): SDKs send it raw, some tools as `Bearer <token>` with the scheme in any case.

use http::header::AUTHORIZATION;
use http::HeaderMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    /// Unleash silently takes the first of several; a gateway that guesses which one the upstream
    /// will use can be made to authorize one token and forward another.
    #[error("more than one Authorization header")]
    Duplicate,
    #[error("Authorization header is not visible ASCII")]
    NotText,
}

/// The token of a request, `Ok(None)` when it carries none.
pub fn extract(headers: &HeaderMap) -> Result<Option<&str>, ExtractError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ExtractError::Duplicate);
    }
    let value = value.to_str().map_err(|_| ExtractError::NotText)?;
    Ok(token_from_value(value))
}

/// `<token>` or `Bearer <token>` (scheme case-insensitive, RFC 9110 §11.1; any run of spaces after it),
/// surrounding whitespace ignored as RFC 9110 §5.5 says field values' leading/trailing whitespace is.
pub fn token_from_value(value: &str) -> Option<&str> {
    let value = value.trim_matches([' ', '\t']);
    if value.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => value[7..].trim_start_matches([' ', '\t']),
        _ => value,
    };
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn header_forms_unleash_accepts() {
        assert_eq!(token_from_value("*:dev.abc"), Some("*:dev.abc"));
        assert_eq!(token_from_value("Bearer *:dev.abc"), Some("*:dev.abc"));
        assert_eq!(token_from_value("bearer *:dev.abc"), Some("*:dev.abc"));
        assert_eq!(token_from_value("BEARER  *:dev.abc"), Some("*:dev.abc"));
        assert_eq!(token_from_value("*:dev.abc "), Some("*:dev.abc"));
        assert_eq!(token_from_value("Token *:dev.abc"), Some("Token *:dev.abc"));
        assert_eq!(token_from_value("Bearer "), None);
        assert_eq!(token_from_value("   "), None);
        assert_eq!(token_from_value("Bearerx"), Some("Bearerx"));
    }

    #[test]
    fn two_headers_are_refused() {
        let mut h = HeaderMap::new();
        h.append(AUTHORIZATION, HeaderValue::from_static("a"));
        h.append(AUTHORIZATION, HeaderValue::from_static("b"));
        assert_eq!(extract(&h), Err(ExtractError::Duplicate));
        assert_eq!(extract(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn non_ascii_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_bytes(b"tok\xff").unwrap());
        assert_eq!(extract(&h), Err(ExtractError::NotText));
    }
}
