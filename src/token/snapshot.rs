//! The last good Unleash token set on disk, so a restart while Unleash is down still serves. Digests and
//! metadata only — never a secret — in a 0600 file written whole to a temp file and renamed into place.

use super::store::TokenSet;
use super::{Digest, TokenInfo, TokenKind, TokenSource};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const FILE_NAME: &str = "unleash-tokens.snapshot.json";

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    written_at: i64,
    /// Unix milliseconds of the sync this set came from: a restart from the snapshot counts the set's
    /// age from here, so an old set is seen as old. (Absent in snapshots written before it existed: then
    /// `written_at`, which is the same moment to the second.)
    #[serde(default)]
    synced_at_ms: Option<i64>,
    tokens: Vec<Entry>,
}

/// A token set read back, with the time of the sync it came from.
pub struct Loaded {
    pub set: TokenSet,
    pub synced_at_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    sha256: String,
    kind: TokenKind,
    projects: Vec<String>,
    environment: Option<String>,
    name: Option<String>,
    expires_at: Option<i64>,
}

/// Next to the snapshot: when a later sync found the list unchanged (a 304), so that a restart counts the
/// set's age from the last time Unleash confirmed it, without rewriting a large file every interval.
pub const CONFIRMED_NAME: &str = "unleash-tokens.confirmed.json";

#[derive(Serialize, Deserialize)]
struct Confirmed {
    /// The snapshot (its `written_at`) this confirmation is about; any other snapshot ignores it.
    snapshot_written_at: i64,
    confirmed_at_ms: i64,
}

pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

fn write_file(dir: &Path, name: &str, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    crate::files::write_atomic(dir, name, bytes, durable)
}

/// Records that the snapshot written at `snapshot_written_at` was confirmed by Unleash now. Not synced
/// to disk: a crash loses at most the latest confirmation, which only makes the set look older.
pub fn confirm(dir: &Path, snapshot_written_at: i64, confirmed_at_ms: i64) -> std::io::Result<()> {
    let c = Confirmed {
        snapshot_written_at,
        confirmed_at_ms,
    };
    write_file(
        dir,
        CONFIRMED_NAME,
        &serde_json::to_vec(&c).map_err(std::io::Error::other)?,
        false,
    )
}

/// Writes the set from the sync made at `synced_at_ms`; returns the snapshot's `written_at`.
pub fn write(dir: &Path, set: &TokenSet, synced_at_ms: i64) -> std::io::Result<i64> {
    let snap = Snapshot {
        version: 1,
        written_at: super::now_unix(),
        synced_at_ms: Some(synced_at_ms),
        tokens: set
            .iter()
            .map(|(d, i)| Entry {
                sha256: d.to_hex(),
                kind: i.kind,
                projects: i.projects.to_vec(),
                environment: i.environment.clone(),
                name: i.name.clone(),
                expires_at: i.expires_at,
            })
            .collect(),
    };
    let bytes = serde_json::to_vec(&snap).map_err(std::io::Error::other)?;
    write_file(dir, FILE_NAME, &bytes, true)?;
    Ok(snap.written_at)
}

pub fn read(dir: &Path) -> Result<Loaded, String> {
    let p = path_in(dir);
    let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", p.display()))?;
    if snap.version != 1 {
        return Err(format!(
            "{}: unsupported snapshot version {}",
            p.display(),
            snap.version
        ));
    }
    let mut set = TokenSet::with_capacity(snap.tokens.len());
    for e in snap.tokens {
        let d = Digest::from_hex(&e.sha256).ok_or_else(|| format!("{}: bad digest", p.display()))?;
        set.insert(
            d,
            Arc::new(TokenInfo {
                kind: e.kind,
                projects: Arc::from(e.projects),
                environment: e.environment,
                name: e.name,
                expires_at: e.expires_at,
                fingerprint: d.fingerprint(),
                source: TokenSource::Unleash,
            }),
        );
    }
    let synced = snap.synced_at_ms.unwrap_or(snap.written_at * 1000);
    let confirmed = std::fs::read(dir.join(CONFIRMED_NAME))
        .ok()
        .and_then(|b| serde_json::from_slice::<Confirmed>(&b).ok())
        .filter(|c| c.snapshot_written_at == snap.written_at)
        .map_or(0, |c| c.confirmed_at_ms);
    Ok(Loaded {
        set,
        synced_at_ms: synced.max(confirmed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sets_age_counts_from_its_sync_or_a_later_confirmation_of_the_same_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let set = TokenSet::new();
        let written = write(dir.path(), &set, 1_000_000).unwrap();
        assert_eq!(read(dir.path()).unwrap().synced_at_ms, 1_000_000);
        confirm(dir.path(), written, 2_000_000).unwrap();
        assert_eq!(
            read(dir.path()).unwrap().synced_at_ms,
            2_000_000,
            "a later 304 confirmed it"
        );
        confirm(dir.path(), written - 1, 3_000_000).unwrap();
        assert_eq!(
            read(dir.path()).unwrap().synced_at_ms,
            1_000_000,
            "a confirmation of another snapshot says nothing about this one"
        );
    }
}
