//! The Unleash base URL, split once into the parts every forwarded request reuses.

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path Unleash is mounted under (`""` or e.g. `/unleash`), never ending in `/`.
    pub base_path: String,
}

/// Outcome of parsing: the URL plus a warning worth logging.
pub struct ParsedUpstreamUrl {
    pub upstream: UpstreamUrl,
    pub warning: Option<String>,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<ParsedUpstreamUrl, String> {
        let uri: Uri = s.parse().map_err(|e| format!("`{s}` is not a URL ({e})"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("`{s}` needs a scheme, e.g. http://{s}"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!("`{s}`: scheme must be http or https"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| format!("`{s}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("`{s}`: credentials in the URL are not supported"));
        }
        if uri.query().is_some() {
            return Err(format!("`{s}`: a query string makes no sense in a base URL"));
        }
        let mut base_path = uri.path().trim_end_matches('/').to_string();
        let mut warning = None;
        // The commonest mistake: copying the SDK's `url` setting, which ends in /api.
        if base_path.ends_with("/api") {
            base_path.truncate(base_path.len() - 4);
            warning = Some(format!(
                "upstream `{s}` ends in /api; flaggate forwards full paths (/api/client/...), so it uses `{scheme}://{authority}{base_path}` as the Unleash base URL"
            ));
        } else if base_path.contains("/api/") {
            // Kept as given (Unleash may really live under such a path), but most likely an SDK URL.
            warning = Some(format!(
                "upstream `{s}` has /api/ in its path; flaggate appends full paths (/api/client/...) to it, so requests would go to {base_path}/api/client/...: give Unleash's base URL (without /api...) unless Unleash really is mounted there"
            ));
        }
        if !base_path.is_empty()
            && crate::path::canonicalize(&base_path)
                .map(|c| c.as_str() != base_path)
                .unwrap_or(true)
        {
            return Err(format!("`{s}`: base path `{base_path}` is not canonical"));
        }
        Ok(ParsedUpstreamUrl {
            upstream: UpstreamUrl {
                scheme,
                authority,
                base_path,
            },
            warning,
        })
    }

    /// The `Host` every forwarded request carries (RFC 9110 §7.2: the target URI's authority, the port
    /// left out when it is the scheme's default, as hyper's client would write it). Made once: the
    /// client's own `Host` travels on in `X-Forwarded-Host`.
    pub fn host_header(&self) -> HeaderValue {
        let default_port = if self.scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match self.authority.port_u16() {
            Some(p) if p != default_port => self.authority.as_str(),
            _ => self.authority.host(),
        };
        // An `Authority` holds only bytes valid in a header value; the fallback keeps this free of unwraps.
        HeaderValue::from_str(host).unwrap_or_else(|_| HeaderValue::from_static("localhost"))
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_names_the_upstream_without_a_default_port() {
        for (url, host) in [
            ("http://127.0.0.1:4242", "127.0.0.1:4242"),
            ("http://unleash:80/unleash", "unleash"),
            ("https://flags.example.com", "flags.example.com"),
            ("https://flags.example.com:443/api", "flags.example.com"),
            ("https://flags.example.com:80", "flags.example.com:80"),
            ("http://[::1]:8080", "[::1]:8080"),
        ] {
            let up = UpstreamUrl::parse(url).unwrap().upstream;
            assert_eq!(up.host_header(), host, "{url}");
        }
    }

    #[test]
    fn api_suffix_is_accepted_with_a_warning() {
        let p = UpstreamUrl::parse("http://127.0.0.1:4242/api/").unwrap();
        assert_eq!(p.upstream.to_string(), "http://127.0.0.1:4242");
        assert!(p.warning.unwrap().contains("/api"));
        let p = UpstreamUrl::parse("https://flags.example.com/api/client/features").unwrap();
        assert_eq!(p.upstream.base_path, "/api/client/features", "kept as given");
        assert!(p.warning.unwrap().contains("/api/"));
        let p = UpstreamUrl::parse("http://unleash:4242/unleash").unwrap();
        assert_eq!(p.upstream.base_path, "/unleash");
        assert!(p.warning.is_none());
    }

    #[test]
    fn rejects_what_cannot_work() {
        for bad in [
            "127.0.0.1:4242",
            "ftp://x",
            "http://u:p@x",
            "http://x/?a=1",
            "not a url",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
