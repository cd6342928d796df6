//! A stored document: Unleash's exact identity body and its ETag, byte for byte (never weakened, never
//! re-hashed: the .NET SDK broke on Edge's weak ETags), the response headers worth replaying, and a gzip
//! copy made once. Identical bodies (tokens of the same scope) share one allocation.

use crate::proxy::headers::X_REQUEST_ID;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, Weak};

/// Bodies smaller than this are never gzipped (Unleash's `compression` threshold).
pub const GZIP_MIN: usize = 1024;

/// Response headers not replayed from a stored document: hop-by-hop ones, the ones about this
/// particular message (length, encoding, date), and cookies (a stored response never sets one).
const NOT_REPLAYED: [HeaderName; 9] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::DATE,
    header::SET_COOKIE,
    header::TRAILER,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
];

/// One body, as Unleash sent it and gzipped once; shared by every document with the same bytes.
pub struct Body {
    pub identity: Bytes,
    pub gzip: Option<Bytes>,
}

pub struct Doc {
    pub body: Arc<Body>,
    /// Unleash's ETag, exactly.
    pub etag: HeaderValue,
    /// The response headers to replay (ETag and Vary included).
    pub headers: HeaderMap,
    /// Each answer's complete headers, made once: a hit clones one map instead of rebuilding it.
    answers: Answers,
}

struct Answers {
    identity: HeaderMap,
    gzip: HeaderMap,
    not_modified: HeaderMap,
}

impl Doc {
    /// A document from Unleash's identity `body`, its `etag` and its response headers (already
    /// [`replayed`]).
    pub fn new(body: Arc<Body>, etag: HeaderValue, headers: HeaderMap) -> Doc {
        let mut identity = headers.clone();
        identity.insert(header::ETAG, etag.clone());
        if !identity
            .get_all(header::VARY)
            .iter()
            .any(|v| mentions(v, "accept-encoding"))
        {
            identity.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        }
        let mut gzip = identity.clone();
        gzip.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let mut not_modified = identity.clone();
        // RFC 9110 §15.4.5: a 304 carries no representation metadata beyond the validators.
        for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
            not_modified.remove(name);
        }
        // Every response gets its request id in `proxy::handle`. With the name already here, that
        // insert replaces a value in place; without it, it would grow (reallocate, maybe rehash) a map
        // that a hit has just cloned at its exact size.
        for map in [&mut identity, &mut gzip, &mut not_modified] {
            map.insert(X_REQUEST_ID, HeaderValue::from_static("-"));
        }
        Doc {
            body,
            etag,
            headers,
            answers: Answers {
                identity,
                gzip,
                not_modified,
            },
        }
    }

    /// What the document weighs (its body counted whole even when shared: a conservative budget; the
    /// prepared answers' headers counted four times over).
    pub fn weight(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 32).sum();
        self.body.identity.len() + self.body.gzip.as_ref().map_or(0, Bytes::len) + 4 * headers + 128
    }

    /// The answer from this document: 304 when the client already has this ETag, else 200 with the
    /// identity body or, for a client that accepts gzip, the gzip copy (same ETag; `Vary:
    /// Accept-Encoding` either way).
    pub fn respond(&self, client_etag: Option<&HeaderValue>, accepts_gzip: bool) -> Response<Full<Bytes>> {
        let not_modified = client_etag.is_some_and(|e| e == self.etag);
        let gzip = self.body.gzip.as_ref().filter(|_| accepts_gzip && !not_modified);
        let (body, headers, status) = match (not_modified, gzip) {
            (true, _) => (Bytes::new(), &self.answers.not_modified, StatusCode::NOT_MODIFIED),
            (false, Some(g)) => (g.clone(), &self.answers.gzip, StatusCode::OK),
            (false, None) => (self.body.identity.clone(), &self.answers.identity, StatusCode::OK),
        };
        let mut resp = Response::new(Full::new(body));
        *resp.headers_mut() = headers.clone();
        *resp.status_mut() = status;
        resp
    }
}

fn mentions(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Whether the client takes gzip: `gzip` (or `*`) listed with a q-value above zero (RFC 9110 §12.5.3).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
                .filter_map(|q| q.trim().parse::<f32>().ok())
                .next()
                .unwrap_or(1.0);
            (name.eq_ignore_ascii_case("gzip") || name == "*") && q > 0.0
        })
}

/// Why an upstream 200 is passed to its waiters but not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotStored {
    Status,
    SetCookie,
    NoStore,
    NoEtag,
    Encoding,
    ContentType,
    TooLarge,
    Truncated,
}

impl NotStored {
    pub const ALL: [NotStored; 8] = [
        NotStored::Status,
        NotStored::SetCookie,
        NotStored::NoStore,
        NotStored::NoEtag,
        NotStored::Encoding,
        NotStored::ContentType,
        NotStored::TooLarge,
        NotStored::Truncated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::Status => "status",
            NotStored::SetCookie => "set_cookie",
            NotStored::NoStore => "no_store",
            NotStored::NoEtag => "no_etag",
            NotStored::Encoding => "encoding",
            NotStored::ContentType => "content_type",
            NotStored::TooLarge => "too_large",
            NotStored::Truncated => "truncated",
        }
    }
}

/// Checks a 200's head: stored only with a strong ETag, no cookie, nothing forbidding it, identity
/// encoding and a JSON body.
pub fn storable(headers: &HeaderMap) -> Result<HeaderValue, NotStored> {
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    let forbids = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .any(|v| mentions(v, "no-store") || mentions(v, "private"));
    if forbids {
        return Err(NotStored::NoStore);
    }
    let etag = headers
        .get(header::ETAG)
        .filter(|e| e.to_str().is_ok_and(super::classify::is_strong_etag))
        .ok_or(NotStored::NoEtag)?;
    let identity = headers
        .get(header::CONTENT_ENCODING)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if !identity {
        return Err(NotStored::Encoding);
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !json {
        return Err(NotStored::ContentType);
    }
    Ok(etag.clone())
}

/// Interns bodies by content hash: tokens of the same scope get the same bytes from Unleash, and keep one
/// copy of them (and of their gzip) between them.
#[derive(Default)]
pub struct Bodies(Mutex<HashMap<[u8; 32], Weak<Body>>>);

impl Bodies {
    /// The shared body for these bytes, gzipping them once if new.
    pub fn intern(&self, identity: Bytes) -> Arc<Body> {
        let hash: [u8; 32] = Sha256::digest(&identity).into();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(&hash).and_then(Weak::upgrade) {
            return b;
        }
        // Pruned when it doubles, so dead entries cost amortised O(1).
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let gzip = (identity.len() >= GZIP_MIN).then(|| gzip(&identity)).flatten();
        let body = Arc::new(Body { identity, gzip });
        map.insert(hash, Arc::downgrade(&body));
        body
    }

    /// Distinct bodies alive now.
    pub fn live(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

fn gzip(data: &[u8]) -> Option<Bytes> {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 4), flate2::Compression::default());
    enc.write_all(data).ok()?;
    enc.finish().ok().map(Bytes::from)
}

/// The headers of an answer passed on to every waiter: Unleash's, minus hop-by-hop fields, the length
/// (the shared body sets its own), and cookies (an answer shared between clients sets none).
pub fn passed(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    for name in NOT_REPLAYED
        .iter()
        .filter(|n| **n != header::CONTENT_ENCODING && **n != header::DATE)
    {
        h.remove(name);
    }
    h
}

/// The response headers to replay from an upstream 200.
pub fn replayed(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    for name in &NOT_REPLAYED {
        h.remove(name);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::Read;

    fn doc(body: &[u8], bodies: &Bodies) -> Doc {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        h.insert(header::ETAG, HeaderValue::from_static("\"abc:12:v1\""));
        Doc::new(
            bodies.intern(Bytes::copy_from_slice(body)),
            HeaderValue::from_static("\"abc:12:v1\""),
            replayed(&h),
        )
    }

    async fn bytes(r: Response<Full<Bytes>>) -> Bytes {
        r.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn gzip_is_offered_to_who_takes_it_with_the_same_etag_and_decompresses_to_the_exact_bytes() {
        let bodies = Bodies::default();
        let body = format!("{{\"features\":[{}]}}", "{\"name\":\"x\"},".repeat(200));
        let d = doc(body.as_bytes(), &bodies);
        let gz = d.respond(None, true);
        assert_eq!(gz.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(gz.headers()[header::ETAG], "\"abc:12:v1\"");
        assert!(gz.headers()[header::VARY].to_str().unwrap().contains("Accept-Encoding"));
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&bytes(gz).await[..])
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, body);
        let id = d.respond(None, false);
        assert!(id.headers().get(header::CONTENT_ENCODING).is_none());
        assert_eq!(bytes(id).await, body.as_bytes());
        let nm = d.respond(Some(&HeaderValue::from_static("\"abc:12:v1\"")), true);
        assert_eq!(nm.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(nm.headers()[header::ETAG], "\"abc:12:v1\"");
        assert!(bytes(nm).await.is_empty());
    }

    #[test]
    fn small_bodies_are_never_gzipped_and_identical_bodies_are_stored_once() {
        let bodies = Bodies::default();
        assert!(bodies.intern(Bytes::from_static(b"{}")).gzip.is_none());
        let a = bodies.intern(Bytes::from(vec![b'a'; 2000]));
        let b = bodies.intern(Bytes::from(vec![b'a'; 2000]));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(a.gzip.is_some());
        assert_eq!(
            bodies.live(),
            1,
            "the dropped `{{}}` body is not held, the shared one is, once"
        );
        drop((a, b));
        assert_eq!(bodies.live(), 0);
    }

    #[test]
    fn accept_encoding_is_read_with_its_q_values() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(accepts_gzip(&h("gzip, deflate, br")));
        assert!(accepts_gzip(&h("br;q=1.0, gzip;q=0.5")));
        assert!(accepts_gzip(&h("*")));
        assert!(!accepts_gzip(&h("gzip;q=0")));
        assert!(!accepts_gzip(&h("identity")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn only_a_plain_json_200_with_a_strong_etag_is_storable() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            m.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            m.insert(header::ETAG, HeaderValue::from_static("\"e\""));
            for (k, v) in pairs {
                m.insert(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        assert!(storable(&h(&[])).is_ok());
        assert_eq!(storable(&h(&[("set-cookie", "a=b")])), Err(NotStored::SetCookie));
        assert_eq!(storable(&h(&[("cache-control", "private")])), Err(NotStored::NoStore));
        assert_eq!(storable(&h(&[("cache-control", "no-store")])), Err(NotStored::NoStore));
        assert_eq!(storable(&h(&[("etag", "W/\"e\"")])), Err(NotStored::NoEtag));
        assert_eq!(storable(&h(&[("content-encoding", "gzip")])), Err(NotStored::Encoding));
        assert_eq!(
            storable(&h(&[("content-type", "text/html")])),
            Err(NotStored::ContentType)
        );
        let mut no_etag = h(&[]);
        no_etag.remove(header::ETAG);
        assert_eq!(storable(&no_etag), Err(NotStored::NoEtag));
    }
}
