//! The last good Unleash token set on disk, so a restart while Unleash is down still serves. Digests and
//! metadata only — never a secret — in a 0600 file written whole to a temp file and renamed into place.

use super::store::TokenSet;
use super::{Digest, TokenInfo, TokenKind, TokenSource};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const FILE_NAME: &str = "unleash-tokens.snapshot.json";

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    written_at: i64,
    tokens: Vec<Entry>,
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

pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

pub fn write(dir: &Path, set: &TokenSet) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let snap = Snapshot {
        version: 1,
        written_at: super::now_unix(),
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
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path_in(dir))
}

pub fn read(dir: &Path) -> Result<TokenSet, String> {
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
    Ok(set)
}
