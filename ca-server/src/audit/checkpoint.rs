//! Signed checkpoints: the head of the chain signed with a dedicated audit key (Ed25519, at
//! `<data-dir>/audit-key.pem`, 0600). A checkpoint exported off the machine vouches for the
//! history up to it even against someone who can rewrite the whole database.

use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use zeroize::Zeroizing;

use crate::store::Checkpoint;

/// What went wrong with the audit key or a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The key file could not be read or written.
    #[error("audit key {path}: {detail}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The checkpoint's signature does not verify.
    #[error("the checkpoint's signature does not verify with its public key")]
    BadSignature,
    /// The checkpoint is not well-formed.
    #[error("the checkpoint is malformed: {0}")]
    Malformed(String),
}

/// The bytes a checkpoint signs.
fn message(seq: i64, hash: &str, time_ms: i64) -> Vec<u8> {
    format!("ca-server audit checkpoint v1\n{seq}\n{hash}\n{time_ms}\n").into_bytes()
}

/// The audit key. Its `Debug` never shows the key.
pub struct AuditKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey([redacted])")
    }
}

impl AuditKey {
    /// `<data-dir>/audit-key.pem`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("audit-key.pem")
    }

    /// Loads the audit key, creating it (0600) on first use.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, CheckpointError> {
        let path = Self::path(data_dir);
        let err = |detail: String| CheckpointError::Key {
            path: path.clone(),
            detail,
        };
        let pem = crate::files::read_or_create_private(&path, || {
            Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
                .map(|pkcs8| Zeroizing::new(crate::files::pem("PRIVATE KEY", pkcs8.as_ref())))
                .map_err(|e| e.to_string())
        })
        .map_err(err)?;
        let der =
            PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| err(e.to_string()))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
            .map_err(|e| err(e.to_string()))?;
        Ok(Self { pair })
    }

    /// Signs the head `(seq, hash)` now.
    pub fn sign(&self, seq: i64, hash: &str) -> Checkpoint {
        let time_ms =
            i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
                .unwrap_or(i64::MAX);
        let signature = self.pair.sign(&message(seq, hash, time_ms));
        Checkpoint {
            seq,
            hash: hash.to_owned(),
            time_ms,
            public_key: STANDARD.encode(self.pair.public_key().as_ref()),
            signature: STANDARD.encode(signature.as_ref()),
        }
    }
}

/// Checks a checkpoint's signature against the public key it carries.
pub fn verify_signature(checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
    let key = STANDARD
        .decode(&checkpoint.public_key)
        .map_err(|e| CheckpointError::Malformed(format!("public_key: {e}")))?;
    let signature = STANDARD
        .decode(&checkpoint.signature)
        .map_err(|e| CheckpointError::Malformed(format!("signature: {e}")))?;
    UnparsedPublicKey::new(&ED25519, key)
        .verify(
            &message(checkpoint.seq, &checkpoint.hash, checkpoint.time_ms),
            &signature,
        )
        .map_err(|_| CheckpointError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_verify_and_any_change_breaks_them() {
        let dir = tempfile::tempdir().unwrap();
        let key = AuditKey::load_or_create(dir.path()).unwrap();
        assert_eq!(
            crate::files::too_open(&AuditKey::path(dir.path())).unwrap(),
            None
        );
        let cp = key.sign(42, &"a".repeat(64));
        verify_signature(&cp).unwrap();
        // The same key comes back.
        let again = AuditKey::load_or_create(dir.path()).unwrap();
        assert_eq!(again.sign(1, "x").public_key, cp.public_key);
        for tampered in [
            Checkpoint {
                seq: 43,
                ..cp.clone()
            },
            Checkpoint {
                hash: "b".repeat(64),
                ..cp.clone()
            },
            Checkpoint {
                time_ms: cp.time_ms + 1,
                ..cp.clone()
            },
        ] {
            assert!(matches!(
                verify_signature(&tampered),
                Err(CheckpointError::BadSignature)
            ));
        }
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }
}
