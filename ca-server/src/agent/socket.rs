//! The agent's Unix socket: named by a URI (`unix:///run/spiffe/agent.sock`, as
//! `SPIFFE_ENDPOINT_SOCKET` gives it), created 0600 (or 0660 for a configured group) under
//! its final name in one step, and removed when the agent stops.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tokio::net::UnixListener;

/// The socket path a `unix:` URI names: `unix:///abs/path` or `unix:/abs/path`.
pub fn path_of(uri: &str) -> anyhow::Result<PathBuf> {
    let Some(rest) = uri.strip_prefix("unix:") else {
        bail!("--socket {uri:?}: expected a unix: URI, e.g. unix:///run/spiffe/agent.sock");
    };
    let path = rest.strip_prefix("//").unwrap_or(rest);
    if !path.starts_with('/') || path.len() < 2 {
        bail!("--socket {uri:?}: the path must be absolute, e.g. unix:///run/spiffe/agent.sock");
    }
    if path.contains(['?', '#']) {
        bail!("--socket {uri:?}: a socket URI takes no query or fragment");
    }
    Ok(PathBuf::from(path))
}

/// A group for the socket: a name from `/etc/group`, or a numeric GID.
fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .with_context(|| format!("--socket-group {group:?}: no such group in /etc/group"))
}

/// The socket's file; removed when this is dropped (the agent stopping).
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl SocketFile {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds `path`: a socket left by an agent that is gone is replaced; a live one (something
/// answers on it) or any other kind of file is refused. The socket is bound under a temporary
/// name, given its mode and group, then renamed into place, so no client ever sees it with
/// other permissions.
pub fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<(UnixListener, SocketFile)> {
    let gid = group.map(group_id).transpose()?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is in use: another agent is serving on it",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; not replacing it",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let staging = dir.join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    let listener =
        UnixListener::bind(&staging).with_context(|| format!("binding {}", staging.display()))?;
    let prepared = (|| {
        let mode = if gid.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&staging, None, Some(gid))?;
        }
        std::fs::rename(&staging, path)
    })();
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&staging);
        return Err(e).with_context(|| format!("preparing the socket {}", path.display()));
    }
    Ok((listener, SocketFile(path.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_uris_name_absolute_paths() {
        assert_eq!(
            path_of("unix:///run/spiffe/agent.sock").unwrap(),
            PathBuf::from("/run/spiffe/agent.sock")
        );
        assert_eq!(
            path_of("unix:/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        for bad in [
            "/tmp/a.sock",
            "tcp://127.0.0.1:1",
            "unix:relative",
            "unix://",
            "unix:/a?x=1",
        ] {
            assert!(path_of(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_or_a_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let first = bind(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = bind(&path, None).unwrap_err().to_string();
        assert!(err.contains("in use"), "{err}");
        drop(first);
        assert!(!path.exists(), "removed when the agent stops");
        // An agent that died without cleaning up leaves its socket; the next one takes over.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (_listener, file) = bind(&path, None).unwrap();
        assert_eq!(file.path(), path);
        drop(file);
        std::fs::write(&path, b"not a socket").unwrap();
        let err = bind(&path, None).unwrap_err().to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }
}
