//! A corporate PKI for plug-in CA tests: a root, and intermediates under it written out in
//! Istio's `cacerts` layout.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A corporate root and its key.
pub struct Pki {
    /// The root certificate.
    pub root_pem: String,
    /// Its key.
    pub root_key: KeyPair,
    /// What it was made from (to sign with).
    pub root_params: CertificateParams,
}

/// A CA's parameters: `O=Example Corp, CN=<cn>`, CA, keyCertSign and cRLSign, valid from an
/// hour ago for a year.
pub fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "Example Corp");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::hours(1);
    p.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::days(365);
    p
}

/// A new corporate root.
pub fn corporate_root() -> Pki {
    let root_key = KeyPair::generate().expect("key");
    let root_params = ca_params("Example Corp Root");
    let root_pem = root_params.self_signed(&root_key).expect("root").pem();
    Pki {
        root_pem,
        root_key,
        root_params,
    }
}

/// An intermediate signed by `pki`'s root, written out in the cacerts layout; its PEM.
pub fn write_cacerts(dir: &Path, pki: &Pki, params: CertificateParams, key: &KeyPair) -> String {
    let issuer = Issuer::from_params(&pki.root_params, &pki.root_key);
    let mut params = params;
    // As real CAs issue them: strict verifiers require the AKI on every non-root.
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(key, &issuer).expect("intermediate").pem();
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(dir.join("ca-cert.pem"), &cert).expect("write");
    std::fs::write(dir.join("ca-key.pem"), key.serialize_pem()).expect("write");
    std::fs::write(
        dir.join("cert-chain.pem"),
        format!("{cert}{}", pki.root_pem),
    )
    .expect("write");
    std::fs::write(dir.join("root-cert.pem"), &pki.root_pem).expect("write");
    cert
}
