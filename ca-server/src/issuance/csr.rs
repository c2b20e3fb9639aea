//! CSR parsing and checks: PEM, DER, proof of possession, key strength, requested SANs.
//! We decide what we accept ourselves (rather than a library's CSR importer): only the key
//! and the requested SANs are read; every other requested extension is ignored, since the
//! leaf profile sets its own.

use std::net::IpAddr;

use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::x509::sha256_hex;

/// Largest CSR accepted, in bytes of PEM.
pub const MAX_CSR_BYTES: usize = 64 * 1024;

/// Why a CSR was refused. Each message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// The CSR is larger than [`MAX_CSR_BYTES`].
    #[error("the CSR is {0} bytes, more than the 64 KiB allowed")]
    TooLarge(usize),
    /// No `CERTIFICATE REQUEST` PEM block.
    #[error("the CSR is not PEM: expected a -----BEGIN CERTIFICATE REQUEST----- block")]
    NotPem,
    /// The DER does not parse as a PKCS#10 request.
    #[error("the CSR does not parse: {0}")]
    Unparseable(String),
    /// The signature is not by the CSR's key.
    #[error("the CSR's signature does not verify with its own public key (no proof of possession)")]
    BadSignature,
    /// The signature algorithm is weak or unknown.
    #[error(
        "the CSR is signed with {0}, which is not accepted (use ECDSA with SHA-256/384, RSA with \
         SHA-256/384/512 or PSS, or Ed25519)"
    )]
    SignatureAlgorithm(String),
    /// The key type is not one we certify.
    #[error(
        "the CSR's key type is not accepted: {0} (use ECDSA P-256 or P-384, RSA 2048-8192, or \
         Ed25519)"
    )]
    UnsupportedKey(String),
    /// The RSA key is too small or too large.
    #[error("the CSR's RSA key has {0} bits; RSA keys must have 2048 to 8192 bits")]
    RsaKeySize(usize),
}

/// The key types we certify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256.
    EcP256,
    /// ECDSA P-384.
    EcP384,
    /// RSA with this many modulus bits.
    Rsa(usize),
    /// Ed25519.
    Ed25519,
}

impl KeyKind {
    /// Whether this is an RSA key (whose leaves also get keyEncipherment).
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::Rsa(_))
    }
}

/// A CSR that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCsr {
    /// The SubjectPublicKeyInfo to certify (DER).
    pub spki_der: Vec<u8>,
    /// Its type.
    pub key: KeyKind,
    /// The SANs the CSR asks for, as text (`spiffe://…`, `dns:…`, `ip:…`, `email:…`).
    pub requested_sans: Vec<String>,
    /// SHA-256 of the CSR's DER, hex.
    pub csr_sha256: String,
    /// SHA-256 of the SubjectPublicKeyInfo DER, hex.
    pub public_key_sha256: String,
}

/// Parses and checks a PEM CSR.
pub fn check_csr(pem: &str) -> Result<CheckedCsr, CsrError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(pem.len()));
    }
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CsrError::NotPem)?;
    check_csr_der(der.as_ref())
}

/// Parses and checks a DER CSR (as [`check_csr`], past the PEM).
pub fn check_csr_der(der: &[u8]) -> Result<CheckedCsr, CsrError> {
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(der.len()));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CsrError::Unparseable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Unparseable(
            "trailing bytes after the request".into(),
        ));
    }

    let sig_alg = &csr.signature_algorithm.algorithm;
    let accepted = [
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
        OID_SIG_ED25519,
    ];
    if !accepted.contains(sig_alg) {
        return Err(CsrError::SignatureAlgorithm(sig_alg.to_id_string()));
    }

    let spki = &csr.certification_request_info.subject_pki;
    let key = key_kind(spki)?;

    // Proof of possession: the request is signed by the key it asks us to certify.
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut requested_sans = Vec::new();
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    requested_sans.push(describe(name));
                }
            }
        }
    }

    Ok(CheckedCsr {
        spki_der: spki.raw.to_vec(),
        key,
        requested_sans,
        csr_sha256: sha256_hex(der),
        public_key_sha256: sha256_hex(spki.raw),
    })
}

/// Checks a bare SubjectPublicKeyInfo (DER) whose possession someone else has proven (the
/// Kubernetes API server, for a PodCertificateRequest's `pkixPublicKey`): the key type and
/// size as for a CSR; no SANs are requested and there is no CSR to hash (`csr_sha256` is
/// empty).
pub fn check_spki(der: &[u8]) -> Result<CheckedCsr, CsrError> {
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(der.len()));
    }
    let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der)
        .map_err(|e| CsrError::Unparseable(format!("the public key: {e}")))?;
    if !rest.is_empty() {
        return Err(CsrError::Unparseable(
            "trailing bytes after the public key".into(),
        ));
    }
    Ok(CheckedCsr {
        key: key_kind(&spki)?,
        spki_der: der.to_vec(),
        requested_sans: Vec::new(),
        csr_sha256: String::new(),
        public_key_sha256: sha256_hex(der),
    })
}

/// The kind of key `spki` holds, if it is one this CA certifies: EC P-256 or P-384, RSA of
/// 2048 to 8192 bits, or Ed25519.
fn key_kind(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<KeyKind, CsrError> {
    let key_oid = &spki.algorithm.algorithm;
    let key = if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::UnsupportedKey("EC key without a named curve".into()))?;
        if curve == OID_EC_P256 {
            KeyKind::EcP256
        } else if curve == OID_NIST_EC_P384 {
            KeyKind::EcP384
        } else {
            return Err(CsrError::UnsupportedKey(format!(
                "EC curve {}",
                curve.to_id_string()
            )));
        }
    } else if *key_oid == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(CsrError::Unparseable("malformed RSA public key".into())),
        };
        if !(2048..=8192).contains(&bits) {
            return Err(CsrError::RsaKeySize(bits));
        }
        KeyKind::Rsa(bits)
    } else if *key_oid == OID_SIG_ED25519 {
        KeyKind::Ed25519
    } else {
        return Err(CsrError::UnsupportedKey(format!(
            "algorithm {}",
            key_oid.to_id_string()
        )));
    };
    Ok(key)
}

/// A SAN as text: URIs as themselves, other kinds prefixed with their kind.
fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => (*uri).to_owned(),
        GeneralName::DNSName(dns) => format!("dns:{dns}"),
        GeneralName::RFC822Name(mail) => format!("email:{mail}"),
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => format!(
                "ip:{}",
                IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap_or_default())
            ),
            16 => format!(
                "ip:{}",
                IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap_or_default())
            ),
            _ => "ip:(malformed)".into(),
        },
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_with(alg: &'static rcgen::SignatureAlgorithm, sans: &[&str]) -> String {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = sans
            .iter()
            .map(|s| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*s).unwrap()))
            .collect();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn accepts_the_supported_key_types() {
        for (alg, want) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, KeyKind::EcP256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, KeyKind::EcP384),
            (&rcgen::PKCS_ED25519, KeyKind::Ed25519),
        ] {
            let checked = check_csr(&csr_with(alg, &["spiffe://td/ns/a/sa/b"])).unwrap();
            assert_eq!(checked.key, want);
            assert_eq!(checked.requested_sans, vec!["spiffe://td/ns/a/sa/b"]);
            assert_eq!(checked.csr_sha256.len(), 64);
        }
    }

    #[test]
    fn refuses_bad_input_with_reasons() {
        assert_eq!(check_csr("hello"), Err(CsrError::NotPem));
        assert_eq!(
            check_csr(&"x".repeat(MAX_CSR_BYTES + 1)),
            Err(CsrError::TooLarge(MAX_CSR_BYTES + 1))
        );
        let garbage =
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(check_csr(garbage), Err(CsrError::Unparseable(_))));

        // Flip a bit in the signature: proof of possession fails.
        let pem = csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let n = bytes.len();
        bytes[n - 5] ^= 0x01;
        let tampered = crate::x509::pem("CERTIFICATE REQUEST", &bytes);
        assert_eq!(check_csr(&tampered), Err(CsrError::BadSignature));
    }
}
