//! Watching files that operators edit in place, rename over, or swap as a Kubernetes ConfigMap.
//!
//! The watch is on the *directory* (a watch on the file dies with an atomic rename), but only events
//! naming one of our files — or Kubernetes' `..data` symlink swap — count, and a file whose size, times
//! and inode are unchanged is not re-read: a busy directory (a log file next to the config) must cost
//! nothing.

use notify::{RecursiveMode, Watcher};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tokio::sync::mpsc;

/// Enough of a file's metadata to tell "changed" from "touched by nobody".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    ino: u64,
    #[cfg(unix)]
    ctime: (i64, i64),
}

/// The stamp of what `path` points at now (symlinks followed), `None` if it cannot be read.
pub fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    use std::os::unix::fs::MetadataExt;
    Some(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        #[cfg(unix)]
        ino: m.ino(),
        #[cfg(unix)]
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

fn dir_of(p: &Path) -> PathBuf {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Sends on `tx` (without blocking; a full channel already means "look again") whenever an event in the
/// directories of `files` concerns one of them. Keep the returned watcher alive.
pub fn watch_files(files: &[PathBuf], tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let names: Vec<OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
        .collect();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let relevant = match &res {
            Ok(ev) => ev.paths.iter().any(|p| {
                p.file_name()
                    .is_some_and(|n| names.iter().any(|want| want == n) || n.to_string_lossy().starts_with(".."))
            }),
            // An overflow or watch error: better to look once too often.
            Err(_) => true,
        };
        if relevant {
            let _ = tx.try_send(());
        }
    })?;
    let mut dirs: Vec<PathBuf> = files.iter().map(|f| dir_of(f)).collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_change_with_content_and_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "a").unwrap();
        let s1 = stamp(&p).unwrap();
        assert_eq!(stamp(&p), Some(s1.clone()));
        std::fs::write(&p, "bb").unwrap();
        let s2 = stamp(&p).unwrap();
        assert_ne!(s1, s2);
        let tmp = dir.path().join("g");
        std::fs::write(&tmp, "bb").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert_ne!(stamp(&p).unwrap(), s2, "a rename over the file is a change");
        assert_eq!(stamp(&dir.path().join("missing")), None);
    }
}
