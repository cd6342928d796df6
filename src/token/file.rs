//! The token file source: a YAML list the operator keeps (possibly in git, with `sha256:` instead of
//! `secret:`), re-read on every change. A broken edit never empties the store: the last good set stays.

use super::store::{TokenSet, TokenStore};
use super::{Digest, TokenInfo, TokenKind, TokenSource};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("token file {path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("token file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("token file {path}: tokens[{index}].{key}: {reason}")]
    Entry {
        path: PathBuf,
        index: usize,
        key: &'static str,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    /// Required: an empty list must be written as `tokens: []`, so a file caught half-written (empty)
    /// is refused instead of revoking everything.
    tokens: Vec<FileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    secret: Option<String>,
    sha256: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    environment: Option<String>,
    #[serde(default)]
    projects: Vec<String>,
    name: Option<String>,
    expires_at: Option<String>,
}

/// Parses a token file's text. `path` only names the file in errors.
pub fn parse_token_file(path: &Path, text: &str) -> Result<TokenSet, TokenFileError> {
    if text.trim().is_empty() {
        return Err(TokenFileError::Parse {
            path: path.to_owned(),
            reason: "file is empty (caught mid-write?); write `tokens: []` to remove every token".into(),
        });
    }
    let doc: FileDoc = serde_yaml_ng::from_str(text).map_err(|e| TokenFileError::Parse {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut set = TokenSet::with_capacity(doc.tokens.len());
    for (index, e) in doc.tokens.into_iter().enumerate() {
        let bad = |key: &'static str, reason: String| TokenFileError::Entry {
            path: path.to_owned(),
            index,
            key,
            reason,
        };
        let digest = match (&e.secret, &e.sha256) {
            (Some(s), None) if !s.trim().is_empty() && s.trim() == s => Digest::of(s),
            (Some(_), None) => return Err(bad("secret", "must be non-empty without surrounding spaces".into())),
            (None, Some(h)) => Digest::from_hex(h.trim())
                .ok_or_else(|| bad("sha256", "must be 64 hex digits (SHA-256 of the whole token)".into()))?,
            (Some(_), Some(_)) => return Err(bad("secret", "give either `secret` or `sha256`, not both".into())),
            (None, None) => return Err(bad("secret", "one of `secret` or `sha256` is required".into())),
        };
        let kind = TokenKind::parse_name(&e.kind).ok_or_else(|| {
            bad(
                "type",
                format!("`{}` is not one of client, backend, frontend, admin, pat", e.kind),
            )
        })?;
        let expires_at = match &e.expires_at {
            Some(t) => Some(parse_rfc3339(t).map_err(|r| bad("expires_at", r))?),
            None => None,
        };
        let info = TokenInfo {
            kind,
            projects: Arc::from(if e.projects.is_empty() {
                vec!["*".to_string()]
            } else {
                e.projects
            }),
            environment: e.environment,
            name: e.name,
            expires_at,
            fingerprint: digest.fingerprint(),
            source: TokenSource::File,
        };
        if set.insert(digest, Arc::new(info)).is_some() {
            return Err(bad("secret", format!("token {} is listed twice", digest.fingerprint())));
        }
    }
    Ok(set)
}

/// RFC 3339 timestamp to Unix seconds (fractions are truncated: expiry is enforced to the second).
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("`{s}` is not an RFC 3339 timestamp ({e})"))
}

pub fn load_token_file(path: &Path) -> Result<TokenSet, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| TokenFileError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    parse_token_file(path, &text)
}

/// Loads the file into the store once; used at start-up, where a bad file must stop the process.
/// Returns the bytes applied, so the watcher knows what "unchanged" means.
pub fn apply_token_file(store: &TokenStore, path: &Path) -> Result<Vec<u8>, TokenFileError> {
    let bytes = std::fs::read(path).map_err(|e| TokenFileError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| TokenFileError::Parse {
        path: path.to_owned(),
        reason: format!("not UTF-8: {e}"),
    })?;
    let set = parse_token_file(path, text)?;
    let stats = store.replace_source(TokenSource::File, set);
    tracing::info!(path = %path.display(), tokens = stats.total, added = stats.added,
        updated = stats.updated, removed = stats.removed, "token file loaded");
    Ok(bytes)
}

/// Told how each reload of the token file went (metrics and logs).
pub type ReloadReport = Arc<dyn Fn(Result<(), &TokenFileError>) + Send + Sync>;

/// Keeps the store in step with the file. Watches the *directory*: editors save by rename and Kubernetes
/// swaps a ConfigMap by re-pointing a symlink, neither of which a watch on the file itself survives.
/// The returned watcher must be kept alive.
pub fn watch_token_file(
    store: Arc<TokenStore>,
    path: PathBuf,
    applied: Vec<u8>,
    on_result: ReloadReport,
) -> notify::Result<notify::RecommendedWatcher> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let check = tx.clone();
    let watcher = crate::watch::watch_files(std::slice::from_ref(&path), tx)?;
    // An edit between the initial load and this watch produced no event: look once now.
    let _ = check.try_send(());
    tokio::spawn(async move {
        let mut last_good = Some(applied);
        // What the file looked like at the last look (`Some(None)`: it was missing).
        let mut last_seen: Option<Option<crate::watch::Stamp>> = None;
        while rx.recv().await.is_some() {
            // Let a burst of events (write + rename + chmod) settle into one reload.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            let now = crate::watch::stamp(&path);
            if last_seen.as_ref() == Some(&now) {
                continue;
            }
            last_seen = Some(now);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    let err = TokenFileError::Read {
                        path: path.clone(),
                        reason: e.to_string(),
                    };
                    tracing::error!(error = %err, "token file unreadable; keeping the last good token set");
                    on_result(Err(&err));
                    continue;
                }
            };
            if last_good.as_deref() == Some(&bytes[..]) {
                continue;
            }
            let parsed = std::str::from_utf8(&bytes)
                .map_err(|e| TokenFileError::Parse {
                    path: path.clone(),
                    reason: format!("not UTF-8: {e}"),
                })
                .and_then(|text| parse_token_file(&path, text));
            match parsed {
                Ok(set) => {
                    let stats = store.replace_source(TokenSource::File, set);
                    tracing::info!(path = %path.display(), tokens = stats.total, added = stats.added,
                        updated = stats.updated, removed = stats.removed, "token file reloaded");
                    last_good = Some(bytes);
                    on_result(Ok(()));
                }
                Err(err) => {
                    tracing::error!(error = %err, "token file rejected; keeping the last good token set");
                    on_result(Err(&err));
                }
            }
        }
    });
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_secret_and_digest_entries() {
        let text = r#"
tokens:
  - secret: "*:production.abc"
    type: backend
    environment: production
    projects: ["*"]
    name: checkout
    expires_at: 2027-01-01T00:00:00Z
  - sha256: "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    type: frontend
"#;
        let set = parse_token_file(Path::new("t.yaml"), text).unwrap();
        let a = &set[&Digest::of("*:production.abc")];
        assert_eq!(a.kind, TokenKind::Client);
        assert_eq!(a.expires_at, Some(1798761600));
        assert_eq!(set[&Digest::of("foo")].kind, TokenKind::Frontend);
    }

    #[test]
    fn errors_name_file_entry_and_key() {
        let cases = [
            ("tokens:\n  - {secret: a, type: root}\n", "tokens[0].type"),
            ("tokens:\n  - {type: client}\n", "tokens[0].secret"),
            ("tokens:\n  - {sha256: abc, type: client}\n", "tokens[0].sha256"),
            (
                "tokens:\n  - {secret: a, type: client, expires_at: soon}\n",
                "tokens[0].expires_at",
            ),
            (
                "tokens:\n  - {secret: a, type: client}\n  - {secret: a, type: client}\n",
                "tokens[1].secret",
            ),
            (
                "tokens:\n  - {secret: a, type: client, colour: red}\n",
                "unknown field `colour`",
            ),
            ("", "file is empty"),
            ("# nothing\n", "missing field `tokens`"),
            ("other: 1\n", "unknown field `other`"),
        ];
        for (text, want) in cases {
            let err = parse_token_file(Path::new("/etc/t.yaml"), text)
                .unwrap_err()
                .to_string();
            assert!(err.contains("/etc/t.yaml") && err.contains(want), "{err}");
            assert!(!err.contains("secret: a"), "{err}");
        }
    }
}
