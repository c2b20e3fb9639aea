//! Files with care: private files created 0600 and never overwritten, public files replaced
//! atomically so a reader never sees half of one.

use std::io::{self, Write};
use std::path::Path;

use zeroize::Zeroizing;

/// The permission bits of `path` if group or others may access it, `None` if it is private.
pub fn too_open(path: &Path) -> io::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Ok(Some(mode));
        }
    }
    Ok(None)
}

/// Creates `path` with mode 0600 (failing if it exists), writes `contents` and syncs it.
pub fn write_private_new(path: &Path, contents: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Reads the private PEM file at `path`, creating it (0600) from `create` on first use; if
/// another process creates it first, theirs is used. A file that group or others can read is
/// refused, with the command that fixes it. Errors are messages for a person.
pub fn read_or_create_private(
    path: &Path,
    create: impl FnOnce() -> Result<Zeroizing<String>, String>,
) -> Result<Zeroizing<String>, String> {
    if !path.exists() {
        let pem = create()?;
        match write_private_new(path, pem.as_bytes()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    if let Some(mode) = too_open(path).map_err(|e| e.to_string())? {
        return Err(format!(
            "readable by others (mode {mode:o}): run `chmod 600 {}`",
            path.display()
        ));
    }
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| e.to_string())
}

/// Replaces `path` with `contents` atomically (write a temporary file, sync, rename), with
/// mode `mode` (0644 for public files, 0600 for private ones). The temporary file has a
/// name no one can guess and is created new (`O_EXCL`, which never follows a symlink), so in
/// a directory others can write, nobody can make us write through a link they planted; the
/// rename replaces `path` itself, never what a symlink there points to.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(temporary_name(name));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `.<name>.<16 random hex digits>.tmp`: unpredictable, so nobody can plant a file or a
/// link under it beforehand.
fn temporary_name(name: &str) -> String {
    format!(".{name}.{:016x}.tmp", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/secret");
        write_private_new(&path, b"x").unwrap();
        assert_eq!(too_open(&path).unwrap(), None);
        assert!(write_private_new(&path, b"y").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.pem");
        write_atomic(&path, b"one", 0o644).unwrap();
        write_atomic(&path, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(too_open(&path).unwrap(), Some(0o644));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temporary_names_cannot_be_guessed() {
        let a = temporary_name("key.pem");
        let b = temporary_name("key.pem");
        assert_ne!(a, b);
        assert!(a.starts_with(".key.pem.") && a.ends_with(".tmp"), "{a}");
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.path().join("cert-chain.pem");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_atomic(&path, b"new", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(
            !std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
}
