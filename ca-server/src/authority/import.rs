//! Importing a plug-in CA from a directory in Istio's `cacerts` layout: `ca-cert.pem`,
//! `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`. Every check has its own error.

use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::x509::sha256_hex;

/// Why a `cacerts` directory cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file is missing or unreadable.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file holds no certificate, or one that does not parse.
    #[error("{path}: {detail}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The key does not parse.
    #[error("{path}: not a usable private key (PKCS#8, SEC1 or PKCS#1 PEM): {detail}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
    /// The key is not the certificate's.
    #[error("{key} does not match ca-cert.pem: the key's public half is not the certificate's")]
    KeyMismatch {
        /// Which key: `ca-key.pem`, or the token's key.
        key: String,
    },
    /// The CA certificate may not sign certificates.
    #[error("{subject} cannot sign certificates: {why}")]
    NotACa {
        /// The certificate's subject.
        subject: String,
        /// Which extension says so.
        why: &'static str,
    },
    /// A certificate is outside its validity period.
    #[error("{subject} is not valid now (valid {not_before} to {not_after})")]
    NotValidNow {
        /// The certificate's subject.
        subject: String,
        /// notBefore.
        not_before: String,
        /// notAfter.
        not_after: String,
    },
    /// A link of the chain does not verify.
    #[error("the chain is broken: {subject} is not signed by {issuer} ({detail})")]
    ChainBroken {
        /// The certificate.
        subject: String,
        /// The one that should have signed it.
        issuer: String,
        /// What failed.
        detail: String,
    },
    /// root-cert.pem is not a self-signed CA.
    #[error("root-cert.pem ({subject}) is not a self-signed root: {detail}")]
    NotARoot {
        /// Its subject.
        subject: String,
        /// What failed.
        detail: String,
    },
}

/// A `cacerts` directory that passed every check.
pub struct ImportedCa {
    /// The signing certificate (PEM).
    pub cert_pem: String,
    /// Certificates above it, up to and including the root (PEM).
    pub chain_pem: String,
    /// The root (PEM).
    pub root_pem: String,
    /// The key file's text, to be copied into the data dir (0600) as it is.
    pub key_pem: Zeroizing<String>,
    /// The signing certificate's subject.
    pub subject: String,
    /// Validity of the signing certificate, unix seconds.
    pub not_before: i64,
    /// Validity of the signing certificate, unix seconds.
    pub not_after: i64,
    /// SHA-256 of the signing certificate's DER.
    pub fingerprint_sha256: String,
}

fn read(dir: &Path, name: &str) -> Result<(PathBuf, String), ImportError> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((path, text)),
        Err(source) => Err(ImportError::Read { path, source }),
    }
}

fn certs(path: &Path, text: &str) -> Result<Vec<CertificateDer<'static>>, ImportError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(text.as_bytes()).collect();
    let certs = certs.map_err(|e| ImportError::BadCertificate {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(ImportError::BadCertificate {
            path: path.to_owned(),
            detail: "no PEM certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn parse<'a>(path: &Path, der: &'a [u8]) -> Result<X509Certificate<'a>, ImportError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| ImportError::BadCertificate {
            path: path.to_owned(),
            detail: e.to_string(),
        })
}

fn check_ca(cert: &X509Certificate<'_>) -> Result<(), ImportError> {
    let subject = cert.subject().to_string();
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => {
            return Err(ImportError::NotACa {
                subject,
                why: "its basicConstraints do not say CA:TRUE",
            });
        }
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(ImportError::NotACa {
            subject,
            why: "its keyUsage lacks keyCertSign",
        });
    }
    if !cert.validity().is_valid() {
        return Err(ImportError::NotValidNow {
            subject,
            not_before: crate::rfc3339::secs_text(cert.validity().not_before.timestamp()),
            not_after: crate::rfc3339::secs_text(cert.validity().not_after.timestamp()),
        });
    }
    Ok(())
}

/// Reads and checks a `cacerts` directory: the key matches the certificate, the certificate
/// is a CA allowed to sign, and the chain verifies up to the self-signed root.
pub fn read_cacerts(dir: &Path) -> Result<ImportedCa, ImportError> {
    let (_, ca_text) = read(dir, "ca-cert.pem")?;
    let (_, key_text) = read(dir, "ca-key.pem")?;
    let key_text = Zeroizing::new(key_text);
    let (_, chain_text) = read(dir, "cert-chain.pem")?;
    let (_, root_text) = read(dir, "root-cert.pem")?;
    check_cacerts(dir, &ca_text, key_text, &chain_text, &root_text)
}

/// Reads and checks a `cacerts` directory without `ca-key.pem`, whose key is `key` (one in a
/// PKCS#11 token): the checks of [`read_cacerts`], the key's public half against
/// `ca-cert.pem`. The result's `key_pem` is empty.
pub fn read_cacerts_with_key(
    dir: &Path,
    key: &super::CaKey,
    key_name: &str,
) -> Result<ImportedCa, ImportError> {
    let (_, ca_text) = read(dir, "ca-cert.pem")?;
    let (_, chain_text) = read(dir, "cert-chain.pem")?;
    let (_, root_text) = read(dir, "root-cert.pem")?;
    check_with_key(
        dir,
        &ca_text,
        (key, key_name),
        Zeroizing::new(String::new()),
        &chain_text,
        &root_text,
    )
}

/// The checks of [`read_cacerts`] on the four files' texts (`dir` names them in errors).
pub fn check_cacerts(
    dir: &Path,
    ca_text: &str,
    key_text: Zeroizing<String>,
    chain_text: &str,
    root_text: &str,
) -> Result<ImportedCa, ImportError> {
    let key_path = dir.join("ca-key.pem");
    let key = super::CaKey::from_pem(&key_text, &key_path).map_err(|e| ImportError::BadKey {
        detail: match e {
            super::KeyError::Invalid { detail, .. } => detail,
            other => other.to_string(),
        },
        path: key_path,
    })?;
    check_with_key(
        dir,
        ca_text,
        (&key, "ca-key.pem"),
        key_text,
        chain_text,
        root_text,
    )
}

fn check_with_key(
    dir: &Path,
    ca_text: &str,
    (key, key_name): (&super::CaKey, &str),
    key_text: Zeroizing<String>,
    chain_text: &str,
    root_text: &str,
) -> Result<ImportedCa, ImportError> {
    let ca_path = dir.join("ca-cert.pem");
    let chain_path = dir.join("cert-chain.pem");
    let root_path = dir.join("root-cert.pem");

    let ca_der = certs(&ca_path, ca_text)?.remove(0);
    let root_der = certs(&root_path, root_text)?.remove(0);
    let chain = certs(&chain_path, chain_text)?;

    let ca = parse(&ca_path, &ca_der)?;
    use rcgen::PublicKeyData;
    if key.subject_public_key_info().as_slice() != ca.public_key().raw {
        return Err(ImportError::KeyMismatch {
            key: key_name.to_owned(),
        });
    }
    check_ca(&ca)?;

    // The path: the CA certificate, the intermediates of cert-chain.pem (which, in Istio's
    // layout, may start with the CA certificate and end with the root), then the root.
    let intermediates: Vec<&CertificateDer<'static>> = chain
        .iter()
        .filter(|c| c.as_ref() != ca_der.as_ref() && c.as_ref() != root_der.as_ref())
        .collect();
    let mut path: Vec<(&Path, &CertificateDer<'static>)> = vec![(&ca_path, &ca_der)];
    path.extend(intermediates.iter().map(|c| (chain_path.as_path(), *c)));
    path.push((&root_path, &root_der));

    let root = parse(&root_path, &root_der)?;
    if root.subject() != root.issuer() {
        return Err(ImportError::NotARoot {
            subject: root.subject().to_string(),
            detail: format!("its issuer is {}", root.issuer()),
        });
    }
    root.verify_signature(None)
        .map_err(|e| ImportError::NotARoot {
            subject: root.subject().to_string(),
            detail: format!("its self-signature does not verify: {e}"),
        })?;
    check_ca(&root)?;
    for pair in path.windows(2) {
        let child = parse(pair[0].0, pair[0].1)?;
        let parent = parse(pair[1].0, pair[1].1)?;
        check_ca(&parent)?;
        let broken = |detail: String| ImportError::ChainBroken {
            subject: child.subject().to_string(),
            issuer: parent.subject().to_string(),
            detail,
        };
        if child.issuer() != parent.subject() {
            return Err(broken(format!("its issuer name is {}", child.issuer())));
        }
        child
            .verify_signature(Some(parent.public_key()))
            .map_err(|e| broken(format!("the signature does not verify: {e}")))?;
    }

    Ok(ImportedCa {
        cert_pem: crate::x509::pem("CERTIFICATE", &ca_der),
        chain_pem: path[1..]
            .iter()
            .map(|(_, c)| crate::x509::pem("CERTIFICATE", c))
            .collect(),
        root_pem: crate::x509::pem("CERTIFICATE", &root_der),
        key_pem: key_text,
        subject: ca.subject().to_string(),
        not_before: ca.validity().not_before.timestamp(),
        not_after: ca.validity().not_after.timestamp(),
        fingerprint_sha256: sha256_hex(&ca_der),
    })
}
