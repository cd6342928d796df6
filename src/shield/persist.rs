//! Opt-in persistence of the shield's documents under the state directory, so that a gateway restarted
//! (or rescheduled) while Unleash is down still answers its SDKs. Off by default: a document can carry
//! user ids and emails in its constraints.
//!
//! One file per key, named by a hash of the key, 0600, written whole (temp file + rename); a document
//! is written only when it is valid (a strong ETag and a body that is JSON), so an empty or broken
//! answer never replaces a good one. A small side file per key records Unleash's later confirmations
//! (304s), at most once a minute, so the stale bound after a restart counts from the last confirmation.

use super::doc::{self, Bodies, Doc};
use super::Key;
use crate::token::Digest;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How often a confirmation (304) is written beside a persisted document.
pub const CONFIRM_EVERY_MS: u64 = 60_000;

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    token_sha256: String,
    spec: Option<String>,
    query: Option<String>,
    etag: String,
    headers: Vec<(String, String)>,
    /// Unix milliseconds when Unleash sent it.
    validated_at_ms: u64,
    body: String,
}

#[derive(Serialize, Deserialize)]
struct Confirmed {
    etag: String,
    validated_at_ms: u64,
}

pub struct Store {
    dir: PathBuf,
}

/// A document read back, with when Unleash last confirmed it.
pub struct Restored {
    pub key: Key,
    pub doc: Doc,
    pub validated_at_ms: u64,
}

impl Store {
    pub fn new(state_dir: &Path) -> Store {
        Store {
            dir: state_dir.join("shield"),
        }
    }

    fn name(key: &Key) -> String {
        let mut h = Sha256::new();
        h.update(key.token.0);
        h.update([0]);
        h.update(key.spec.as_deref().unwrap_or("").as_bytes());
        h.update([0]);
        h.update(key.query.as_deref().unwrap_or("").as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// Writes `doc` for `key`, if it is a document worth restoring.
    pub fn save(&self, key: &Key, doc: &Doc, validated_at_ms: u64) -> std::io::Result<()> {
        let Ok(body) = std::str::from_utf8(&doc.body.identity) else {
            return Ok(());
        };
        let valid = !body.is_empty()
            && serde_json::from_str::<serde::de::IgnoredAny>(body).is_ok()
            && doc.etag.to_str().is_ok_and(super::classify::is_strong_etag);
        if !valid {
            return Ok(());
        }
        let stored = Stored {
            version: 1,
            token_sha256: key.token.to_hex(),
            spec: key.spec.as_deref().map(str::to_string),
            query: key.query.as_deref().map(str::to_string),
            etag: doc.etag.to_str().unwrap_or_default().to_string(),
            headers: doc
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect(),
            validated_at_ms,
            body: body.to_string(),
        };
        let bytes = serde_json::to_vec(&stored).map_err(std::io::Error::other)?;
        crate::files::write_atomic(&self.dir, &format!("{}.json", Self::name(key)), &bytes, true)
    }

    /// Records that Unleash confirmed `etag` for `key` at `at_ms` (not synced: losing it only makes the
    /// document look older after a crash).
    pub fn confirm(&self, key: &Key, etag: &HeaderValue, at_ms: u64) -> std::io::Result<()> {
        let c = Confirmed {
            etag: etag.to_str().unwrap_or_default().to_string(),
            validated_at_ms: at_ms,
        };
        let bytes = serde_json::to_vec(&c).map_err(std::io::Error::other)?;
        crate::files::write_atomic(&self.dir, &format!("{}.confirmed", Self::name(key)), &bytes, false)
    }

    /// Forgets `key` (Unleash refused its token, or it was evicted).
    pub fn remove(&self, key: &Key) {
        let name = Self::name(key);
        let _ = std::fs::remove_file(self.dir.join(format!("{name}.json")));
        let _ = std::fs::remove_file(self.dir.join(format!("{name}.confirmed")));
    }

    /// Every valid document on disk (broken files are skipped and reported).
    pub fn load(&self, bodies: &Bodies) -> Vec<Restored> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match Self::read(&path, bodies) {
                Ok(r) => out.push(r),
                Err(reason) => tracing::warn!(file = %path.display(), reason, "skipping a persisted feature document"),
            }
        }
        out
    }

    fn read(path: &Path, bodies: &Bodies) -> Result<Restored, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let s: Stored = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if s.version != 1 {
            return Err(format!("unsupported version {}", s.version));
        }
        let token = Digest::from_hex(&s.token_sha256).ok_or("bad token digest")?;
        let etag = HeaderValue::from_str(&s.etag).map_err(|e| e.to_string())?;
        let mut headers = HeaderMap::new();
        for (k, v) in &s.headers {
            let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) else {
                return Err(format!("bad header {k}"));
            };
            headers.append(k, v);
        }
        let key = Key {
            token,
            spec: s.spec.map(Box::from),
            query: s.query.map(Box::from),
        };
        let confirmed = std::fs::read(path.with_extension("confirmed"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Confirmed>(&b).ok())
            .filter(|c| c.etag == s.etag)
            .map_or(0, |c| c.validated_at_ms);
        Ok(Restored {
            key,
            doc: Doc::new(bodies.intern(Bytes::from(s.body)), etag, doc::replayed(&headers)),
            validated_at_ms: s.validated_at_ms.max(confirmed),
        })
    }
}

/// Shared by the fill tasks: writes happen off the request path.
pub type Shared = Option<Arc<Store>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn key(q: Option<&str>) -> Key {
        Key {
            token: Digest::of("t"),
            spec: Some("5.2.0".into()),
            query: q.map(Box::from),
        }
    }

    fn doc(bodies: &Bodies, body: &str, etag: &str) -> Doc {
        Doc::new(
            bodies.intern(Bytes::from(body.to_string())),
            HeaderValue::from_str(etag).unwrap(),
            HeaderMap::new(),
        )
    }

    #[test]
    fn documents_come_back_with_their_last_confirmation_and_bad_ones_never_replace_good_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let bodies = Bodies::default();
        store
            .save(&key(None), &doc(&bodies, r#"{"features":[]}"#, "\"e1\""), 1_000)
            .unwrap();
        store
            .save(&key(Some("project=a")), &doc(&bodies, r#"{"x":1}"#, "\"e2\""), 2_000)
            .unwrap();
        store
            .confirm(&key(None), &HeaderValue::from_static("\"e1\""), 5_000)
            .unwrap();
        // Invalid answers are not written over the good document.
        store.save(&key(None), &doc(&bodies, "", "\"e3\""), 9_000).unwrap();
        store
            .save(&key(None), &doc(&bodies, "<html>", "\"e3\""), 9_000)
            .unwrap();
        store
            .save(&key(None), &doc(&bodies, r#"{"features":[]}"#, "W/\"e3\""), 9_000)
            .unwrap();
        let mut back = store.load(&Bodies::default());
        back.sort_by_key(|r| r.validated_at_ms);
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].key, key(Some("project=a")));
        assert_eq!(back[0].validated_at_ms, 2_000);
        assert_eq!(back[1].key, key(None));
        assert_eq!(back[1].doc.etag, "\"e1\"");
        assert_eq!(back[1].validated_at_ms, 5_000, "the later 304 counts");
        store.remove(&key(None));
        assert_eq!(store.load(&Bodies::default()).len(), 1);
        #[cfg(unix)]
        for e in std::fs::read_dir(dir.path().join("shield")).unwrap() {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(e.unwrap().metadata().unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
