//! CA private keys: the only place that holds them. Key files are created 0600, and a key
//! file that others can read is refused.

use std::fmt;
use std::path::Path;

use zeroize::Zeroizing;

/// What went wrong with a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file's mode lets others read it.
    #[error(
        "{path} is readable by group or others (mode {mode:o}); a CA key must be private: \
         run `chmod 600 {path}` and restart"
    )]
    TooOpen {
        /// The key file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold a usable private key.
    #[error("{path} does not hold a usable private key: {detail}")]
    Invalid {
        /// The key file.
        path: String,
        /// What the parser said.
        detail: String,
    },
    /// Generating a key failed.
    #[error("key generation failed: {0}")]
    Generate(String),
}

/// The key types an authority can be generated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[default]
    #[value(name = "ec-p256")]
    EcP256,
    /// ECDSA on P-384 with SHA-384.
    #[value(name = "ec-p384")]
    EcP384,
    /// RSA 3072 with SHA-256.
    #[value(name = "rsa-3072")]
    Rsa3072,
}

/// A CA private key. Its `Debug` never shows the key, and its PEM is zeroized when dropped.
pub struct CaKey {
    pair: rcgen::KeyPair,
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaKey")
            .field("algorithm", &self.pair.algorithm())
            .field("key", &"[redacted]")
            .finish()
    }
}

impl CaKey {
    /// Generates a new key.
    pub fn generate(key_type: KeyType) -> Result<Self, KeyError> {
        let pair = match key_type {
            KeyType::EcP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcP384 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Rsa3072 => {
                rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_3072)
            }
        }
        .map_err(|e| KeyError::Generate(e.to_string()))?;
        Ok(Self { pair })
    }

    /// Reads a PEM key file, refusing one that group or others can read.
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        check_private(path)?;
        let pem = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| KeyError::Io {
                path: path.display().to_string(),
                source,
            })?,
        );
        let pair = rcgen::KeyPair::from_pem(&pem).map_err(|e| KeyError::Invalid {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Ok(Self { pair })
    }

    /// Writes the key as PKCS#8 PEM to a new file created with mode 0600; never overwrites.
    pub fn write_new_file(&self, path: &Path) -> Result<(), KeyError> {
        let pem = Zeroizing::new(self.pair.serialize_pem());
        crate::files::write_private_new(path, pem.as_bytes()).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// The key pair, for signing. Only the signer uses this.
    pub(crate) fn pair(&self) -> &rcgen::KeyPair {
        &self.pair
    }

    /// Gives the key pair to the signer that will own it.
    pub(crate) fn into_pair(self) -> rcgen::KeyPair {
        self.pair
    }
}

/// Refuses a file whose mode lets group or others read or write it.
pub fn check_private(path: &Path) -> Result<(), KeyError> {
    match crate::files::too_open(path) {
        Ok(None) => Ok(()),
        Ok(Some(mode)) => Err(KeyError::TooOpen {
            path: path.display().to_string(),
            mode,
        }),
        Err(source) => Err(KeyError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_private_and_debug_is_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let key = CaKey::generate(KeyType::EcP256).unwrap();
        key.write_new_file(&path).unwrap();
        assert!(!format!("{key:?}").contains("BEGIN"));
        assert!(format!("{key:?}").contains("[redacted]"));
        let again = CaKey::read_file(&path).unwrap();
        assert_eq!(again.pair().public_key_raw(), key.pair().public_key_raw());
        // Never overwrites an existing key.
        assert!(key.write_new_file(&path).is_err());

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = CaKey::read_file(&path).unwrap_err();
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }
}
