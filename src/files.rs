//! Writing state files so that a crash never leaves half of one: the bytes go to a temp file in the same
//! directory (0600: the files hold token digests and flag documents), are synced, renamed over the old
//! file, and the directory is synced so that the rename itself survives a power cut.

use std::io::Write;
use std::path::Path;

/// Replaces `dir/name` with `bytes`, atomically. `durable`: sync the file and the directory (a crash
/// then keeps the new file); without, a crash may keep the old one (for files whose loss only costs
/// freshness).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    if durable {
        // The rename is a change to the directory: sync it too (POSIX; on other systems opening a
        // directory may fail, and the rename is as durable as the platform makes it).
        #[cfg(unix)]
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_replaces_the_old_one_whole_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "f.json", b"one", true).unwrap();
        write_atomic(dir.path(), "f.json", b"two", false).unwrap();
        assert_eq!(std::fs::read(dir.path().join("f.json")).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left: {names:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("f.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
