//! CA private keys: the only place that holds them. Key files are created 0600, and a key
//! file that others can read is refused.

use std::fmt;
use std::path::Path;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair, RsaKeyPair,
};
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
    /// The PKCS#11 token failed or refused.
    #[error("PKCS#11: {0}")]
    Pkcs11(String),
}

/// The key types an authority can be generated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[default]
    EcP256,
    /// ECDSA on P-384 with SHA-384.
    EcP384,
    /// RSA 3072 with SHA-256.
    Rsa3072,
}

impl KeyType {
    /// Every key type.
    pub const ALL: [Self; 3] = [Self::EcP256, Self::EcP384, Self::Rsa3072];

    /// Its name, as the command line and the config file spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::EcP384 => "ec-p384",
            Self::Rsa3072 => "rsa-3072",
        }
    }

    /// What it is, in words.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::EcP256 => "ECDSA on P-256 with SHA-256 (the default)",
            Self::EcP384 => "ECDSA on P-384 with SHA-384",
            Self::Rsa3072 => "RSA 3072 with SHA-256",
        }
    }
}

/// A CA private key. Held as aws-lc-rs's key object alone (which cleanses its memory when
/// freed), never as a serialized copy that would outlive it: the PKCS#8 bytes exist only while
/// the key is read or written, in buffers zeroized on drop. Its `Debug` never shows the key.
pub struct CaKey {
    kind: SignerKind,
    public: Vec<u8>,
    algorithm: &'static rcgen::SignatureAlgorithm,
}

enum SignerKind {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
    Ed(Ed25519KeyPair),
    /// In a PKCS#11 token; only a handle is held here.
    Hsm(super::pkcs11::HsmKey),
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaKey")
            .field("algorithm", &self.algorithm)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl rcgen::PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let rng = SystemRandom::new();
        match &self.kind {
            SignerKind::Ec(k) => k
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| rcgen::Error::RingUnspecified),
            SignerKind::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .map_err(|_| rcgen::Error::RingUnspecified)?;
                Ok(sig)
            }
            SignerKind::Ed(k) => Ok(k.sign(msg).as_ref().to_vec()),
            SignerKind::Hsm(k) => k.sign(msg).map_err(|_| rcgen::Error::RemoteKeyError),
        }
    }
}

impl CaKey {
    /// A key that lives in a PKCS#11 token.
    pub fn from_hsm(key: super::pkcs11::HsmKey) -> Self {
        Self {
            public: key.public().to_vec(),
            algorithm: key.algorithm(),
            kind: SignerKind::Hsm(key),
        }
    }
}

fn invalid(path: &Path, detail: impl fmt::Display) -> KeyError {
    KeyError::Invalid {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

impl CaKey {
    /// Generates a new key.
    pub fn generate(key_type: KeyType) -> Result<Self, KeyError> {
        let gen_err = |_| KeyError::Generate(format!("{key_type:?}"));
        let pkcs8: Zeroizing<Vec<u8>> = match key_type {
            KeyType::EcP256 => Zeroizing::new(
                EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
                    .and_then(|k| k.to_pkcs8v1())
                    .map_err(gen_err)?
                    .as_ref()
                    .to_vec(),
            ),
            KeyType::EcP384 => Zeroizing::new(
                EcdsaKeyPair::generate(&ECDSA_P384_SHA384_ASN1_SIGNING)
                    .and_then(|k| k.to_pkcs8v1())
                    .map_err(gen_err)?
                    .as_ref()
                    .to_vec(),
            ),
            KeyType::Rsa3072 => {
                let key =
                    RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa3072).map_err(gen_err)?;
                let der: aws_lc_rs::encoding::Pkcs8V1Der<'static> =
                    key.as_der().map_err(gen_err)?;
                Zeroizing::new(der.as_ref().to_vec())
            }
        };
        Self::from_pkcs8(&pkcs8).map_err(KeyError::Generate)
    }

    fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der) {
            return Ok(Self::ec(k, &rcgen::PKCS_ECDSA_P256_SHA256));
        }
        if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, der) {
            return Ok(Self::ec(k, &rcgen::PKCS_ECDSA_P384_SHA384));
        }
        if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            let public = k.public_key().as_ref().to_vec();
            return Ok(Self {
                kind: SignerKind::Ed(k),
                public,
                algorithm: &rcgen::PKCS_ED25519,
            });
        }
        match RsaKeyPair::from_pkcs8(der) {
            Ok(k) => Ok(Self::rsa(k)),
            Err(e) => Err(format!(
                "not an EC P-256/P-384, Ed25519 or RSA PKCS#8 key ({e})"
            )),
        }
    }

    fn ec(k: EcdsaKeyPair, algorithm: &'static rcgen::SignatureAlgorithm) -> Self {
        let public = k.public_key().as_ref().to_vec();
        Self {
            kind: SignerKind::Ec(k),
            public,
            algorithm,
        }
    }

    fn rsa(k: RsaKeyPair) -> Self {
        let public = k.public_key().as_ref().to_vec();
        Self {
            kind: SignerKind::Rsa(k),
            public,
            algorithm: &rcgen::PKCS_RSA_SHA256,
        }
    }

    /// Parses a PEM private key: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or PKCS#1
    /// (`RSA PRIVATE KEY`), as OpenSSL and Istio's tooling write them.
    pub fn from_pem(pem: &str, path: &Path) -> Result<Self, KeyError> {
        let (label, der) =
            decode_pem(pem).ok_or_else(|| invalid(path, "no PEM private key block"))?;
        match label {
            "PRIVATE KEY" => Self::from_pkcs8(&der).map_err(|e| invalid(path, e)),
            "EC PRIVATE KEY" => {
                EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, &der)
                    .map(|k| Self::ec(k, &rcgen::PKCS_ECDSA_P256_SHA256))
                    .or_else(|_| {
                        EcdsaKeyPair::from_private_key_der(&ECDSA_P384_SHA384_ASN1_SIGNING, &der)
                            .map(|k| Self::ec(k, &rcgen::PKCS_ECDSA_P384_SHA384))
                    })
                    .map_err(|e| invalid(path, format!("not a P-256 or P-384 EC key ({e})")))
            }
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der)
                .map(Self::rsa)
                .map_err(|e| invalid(path, format!("not an RSA key ({e})"))),
            other => Err(invalid(
                path,
                format!("a {other} block is not a private key"),
            )),
        }
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
        Self::from_pem(&pem, path)
    }

    /// The key as PKCS#8 PEM, in a buffer zeroized on drop.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        if let SignerKind::Hsm(_) = &self.kind {
            return Err(KeyError::Pkcs11(
                "a key in a PKCS#11 token cannot be exported".into(),
            ));
        }
        let der: Zeroizing<Vec<u8>> = Zeroizing::new(
            match &self.kind {
                SignerKind::Ec(k) => k.to_pkcs8v1().map(|d| d.as_ref().to_vec()),
                SignerKind::Ed(k) => k.to_pkcs8v1().map(|d| d.as_ref().to_vec()),
                SignerKind::Rsa(k) => {
                    let der: Result<aws_lc_rs::encoding::Pkcs8V1Der<'static>, _> = k.as_der();
                    der.map(|d| d.as_ref().to_vec())
                }
                SignerKind::Hsm(_) => return Err(KeyError::Pkcs11("not exportable".into())),
            }
            .map_err(|_| KeyError::Generate("the key could not be serialized".into()))?,
        );
        Ok(Zeroizing::new(crate::x509::pem("PRIVATE KEY", &der)))
    }

    /// Writes the key as PKCS#8 PEM to a new file created with mode 0600; never overwrites.
    pub fn write_new_file(&self, path: &Path) -> Result<(), KeyError> {
        let pem = self.to_pkcs8_pem()?;
        crate::files::write_private_new(path, pem.as_bytes()).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// The public half, for comparing with a certificate.
    pub fn public_key_raw(&self) -> &[u8] {
        &self.public
    }
}

/// The first PEM block of `text`: its label and its bytes (zeroized on drop).
fn decode_pem(text: &str) -> Option<(&str, Zeroizing<Vec<u8>>)> {
    use base64::Engine;
    let begin = text.find("-----BEGIN ")?;
    let rest = &text[begin + "-----BEGIN ".len()..];
    let label_end = rest.find("-----")?;
    let label = &rest[..label_end];
    let body_start = &rest[label_end + 5..];
    let end = body_start.find(&format!("-----END {label}-----"))?;
    let b64: Zeroizing<String> = Zeroizing::new(
        body_start[..end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect(),
    );
    let mut der = Zeroizing::new(Vec::new());
    base64::engine::general_purpose::STANDARD
        .decode_vec(b64.as_bytes(), &mut der)
        .ok()?;
    Some((label, der))
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
        assert_eq!(again.public_key_raw(), key.public_key_raw());
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
