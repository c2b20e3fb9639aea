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
    /// A file meant to hold a trusted public key does not.
    #[error("--trusted-audit-key {path}: {detail}")]
    TrustedKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
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
                .map(|pkcs8| Zeroizing::new(crate::x509::pem("PRIVATE KEY", pkcs8.as_ref())))
                .map_err(|e| e.to_string())
        })
        .map_err(err)?;
        let der =
            PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| err(e.to_string()))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
            .map_err(|e| err(e.to_string()))?;
        Ok(Self { pair })
    }

    /// The public key, base64 (as checkpoints carry it).
    pub fn public_key(&self) -> String {
        STANDARD.encode(self.pair.public_key().as_ref())
    }

    /// The public key as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo), for other servers and
    /// auditors to pin with `--trusted-audit-key`.
    pub fn public_key_pem(&self) -> String {
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(self.pair.public_key().as_ref());
        crate::x509::pem("PUBLIC KEY", &spki)
    }

    /// Signs the head `(seq, hash)` now.
    pub fn sign(&self, seq: i64, hash: &str) -> Checkpoint {
        let time_ms = crate::rfc3339::now_unix_ms();
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

/// The DER of an Ed25519 SubjectPublicKeyInfo up to the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The audit keys whose checkpoints are believed: a checkpoint signed by any other key is
/// what someone who rewrote the log and re-signed it with a key of their own would leave.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    /// Public keys (base64, as checkpoints carry them), each with where it came from.
    keys: Vec<(String, String)>,
}

impl TrustedKeys {
    /// The data dir's own audit key (if it has one) and the public keys in `files` (PEM
    /// `PUBLIC KEY`, as `audit key` prints them, or the bare base64 of a checkpoint's
    /// `public_key`).
    pub fn load(data_dir: &Path, files: &[PathBuf]) -> Result<Self, CheckpointError> {
        let mut trusted = Self::default();
        if AuditKey::path(data_dir).exists() {
            let own = AuditKey::load_or_create(data_dir)?;
            trusted.add(
                own.public_key(),
                format!(
                    "this data dir's audit key ({})",
                    AuditKey::path(data_dir).display()
                ),
            );
        }
        for path in files {
            let bad = |detail: String| CheckpointError::TrustedKey {
                path: path.clone(),
                detail,
            };
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            let key = parse_public_key(&text).map_err(bad)?;
            trusted.add(key, format!("--trusted-audit-key {}", path.display()));
        }
        Ok(trusted)
    }

    fn add(&mut self, key: String, origin: String) {
        if !self.keys.iter().any(|(k, _)| *k == key) {
            self.keys.push((key, origin));
        }
    }

    /// Whether `checkpoint` is signed by a trusted key (its signature is checked apart).
    pub fn trusts(&self, checkpoint: &Checkpoint) -> bool {
        self.keys.iter().any(|(k, _)| *k == checkpoint.public_key)
    }

    /// Whether no key is trusted at all.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The trusted keys, for a message.
    pub fn describe(&self) -> String {
        if self.keys.is_empty() {
            return "no key (the data dir has no audit key and no --trusted-audit-key was \
                    given)"
                .to_owned();
        }
        self.keys
            .iter()
            .map(|(k, origin)| format!("{k} from {origin}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A public key as `audit key` prints it (PEM `PUBLIC KEY`), or the base64 of its 32 bytes:
/// returned as the base64 that checkpoints carry.
fn parse_public_key(text: &str) -> Result<String, String> {
    use rustls_pki_types::SubjectPublicKeyInfoDer;
    let text = text.trim();
    let raw = if text.starts_with("-----BEGIN") {
        let spki = SubjectPublicKeyInfoDer::from_pem_slice(text.as_bytes())
            .map_err(|e| format!("not a PEM PUBLIC KEY: {e}"))?;
        spki.as_ref()
            .strip_prefix(&ED25519_SPKI_PREFIX[..])
            .ok_or("not an Ed25519 public key (an audit key is Ed25519)")?
            .to_vec()
    } else {
        STANDARD
            .decode(text)
            .map_err(|_| "neither a PEM PUBLIC KEY nor a base64 public key".to_owned())?
    };
    if raw.len() != 32 {
        return Err(format!(
            "an Ed25519 public key has 32 bytes, not {}",
            raw.len()
        ));
    }
    Ok(STANDARD.encode(raw))
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

    #[test]
    fn only_pinned_keys_are_trusted() {
        let ours = tempfile::tempdir().unwrap();
        let theirs = tempfile::tempdir().unwrap();
        let key = AuditKey::load_or_create(ours.path()).unwrap();
        let other = AuditKey::load_or_create(theirs.path()).unwrap();
        let cp = key.sign(1, "h");
        let foreign = other.sign(1, "h");

        let trusted = TrustedKeys::load(ours.path(), &[]).unwrap();
        assert!(trusted.trusts(&cp) && !trusted.trusts(&foreign));
        assert!(trusted.describe().contains("this data dir's audit key"));

        // The other key pinned, as `audit key` prints it, or as bare base64.
        let pem = theirs.path().join("other.pem");
        std::fs::write(&pem, other.public_key_pem()).unwrap();
        assert!(
            other
                .public_key_pem()
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        let b64 = theirs.path().join("other.b64");
        std::fs::write(&b64, format!("{}\n", other.public_key())).unwrap();
        for file in [pem, b64] {
            let trusted = TrustedKeys::load(ours.path(), std::slice::from_ref(&file)).unwrap();
            assert!(trusted.trusts(&cp) && trusted.trusts(&foreign), "{file:?}");
        }

        // A data dir without a key trusts nothing by itself.
        let empty = tempfile::tempdir().unwrap();
        let none = TrustedKeys::load(empty.path(), &[]).unwrap();
        assert!(none.is_empty() && !none.trusts(&cp));
        assert!(
            !AuditKey::path(empty.path()).exists(),
            "loading created no key"
        );

        let junk = empty.path().join("junk");
        std::fs::write(&junk, "hello").unwrap();
        let err = TrustedKeys::load(empty.path(), &[junk]).unwrap_err();
        assert!(err.to_string().contains("--trusted-audit-key"), "{err}");
    }
}
