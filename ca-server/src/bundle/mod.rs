//! The trust bundle: the roots of every authority in the bundle, with a sequence that goes up
//! on every change of its contents.

use std::path::{Path, PathBuf};

/// The bundle as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Goes up by one on every change of the roots.
    pub sequence: i64,
    /// Root certificates, PEM, oldest authority first.
    pub roots_pem: Vec<String>,
}

impl Bundle {
    /// The roots as concatenated PEM (`trust-bundle.pem`).
    pub fn to_pem(&self) -> String {
        self.roots_pem.concat()
    }
}

/// `<data-dir>/trust-bundle.pem`.
pub fn bundle_file(data_dir: &Path) -> PathBuf {
    data_dir.join("trust-bundle.pem")
}

/// Rewrites `<data-dir>/trust-bundle.pem` atomically.
pub fn write_bundle_file(data_dir: &Path, bundle: &Bundle) -> std::io::Result<()> {
    crate::files::write_atomic(&bundle_file(data_dir), bundle.to_pem().as_bytes(), 0o644)
}
