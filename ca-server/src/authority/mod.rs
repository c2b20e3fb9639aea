//! Authorities: a signing certificate, its private key and its chain up to a root. This module
//! is the only one that touches CA keys; it signs what `issuance` decided to issue.

pub mod convergence;
pub mod expiry;
pub mod import;
pub mod jwt;
mod key;
mod key_ref;
mod keystore;
pub mod lifecycle;
pub mod pkcs11;

use std::path::Path;

use rcgen::{CertificateParams, DnType, IsCa, KeyUsagePurpose, SanType};
use rustls_pki_types::CertificateDer;

use time::{Duration, OffsetDateTime};

pub use import::{ImportError, ImportedCa, read_cacerts, read_cacerts_with_key};
pub use jwt::JwtKey;
pub use key::{CaKey, KeyError, KeyType, check_private};
pub use key_ref::{KeyRef, UnknownKeyRef};
pub use keystore::{Kek, KeyStore, StoredKey};

use crate::audit::EventRow;
use crate::spiffe::TrustDomain;
use crate::store::{
    AuthorityKind, AuthorityRecord, AuthorityState, NewAuthority, NewJwtKey, Store, StoreError,
};
use crate::x509::{pem_to_der, random_serial, sha256_hex, split_pem};

/// How long a generated root is valid.
pub const ROOT_VALIDITY: Duration = Duration::days(3650);

/// What went wrong loading, creating or using an authority.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key could not be read, written or generated.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// No authority is active.
    #[error("no authority is active: activate one with `ca-server root activate ID`")]
    NoneActive,
    /// A stored certificate could not be read.
    #[error("authority {id}: stored certificate is unreadable: {detail}")]
    BadCertificate {
        /// The authority.
        id: i64,
        /// What the parser said.
        detail: String,
    },
    /// The `cacerts` directory failed a check.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// The key reference names a key store this build does not have.
    #[error("authority {id}: unsupported key reference {key_ref:?}")]
    UnsupportedKeyRef {
        /// The authority.
        id: i64,
        /// The reference.
        key_ref: String,
    },
    /// A key sealed in the database could not be opened (the message says why).
    #[error("authority {id}: {detail}")]
    SealedKey {
        /// The authority.
        id: i64,
        /// Why, and what to do.
        detail: String,
    },
    /// Building or signing a certificate failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A loaded authority, able to sign.
pub struct Authority {
    id: i64,
    subject: String,
    cert_pem: String,
    /// Certificates above the signing certificate, up to and including the root (PEM).
    chain_pems: Vec<String>,
    root_pem: String,
    root_der: CertificateDer<'static>,
    /// DER of the certificates between a leaf and the root (empty for a root authority).
    intermediates_der: Vec<CertificateDer<'static>>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    issuer: rcgen::Issuer<'static, CaKey>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("id", &self.id)
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads a stored authority and its key.
    pub fn load(record: &AuthorityRecord, keys: &KeyStore) -> Result<Self, AuthorityError> {
        let key = keys.load(record)?;
        let bad = |detail: String| AuthorityError::BadCertificate {
            id: record.id,
            detail,
        };
        let cert_der = pem_to_der(&record.cert_pem).map_err(|e| bad(e.to_string()))?;
        let root_der = pem_to_der(&record.root_pem).map_err(|e| bad(e.to_string()))?;
        let chain_pems = split_pem(&record.chain_pem);
        let mut intermediates_der = Vec::new();
        if let Some((_root, between)) = chain_pems.split_last() {
            intermediates_der.push(cert_der.clone());
            for pem in between {
                intermediates_der.push(pem_to_der(pem).map_err(|e| bad(e.to_string()))?);
            }
        }
        let issuer =
            rcgen::Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            id: record.id,
            subject: record.subject.clone(),
            cert_pem: record.cert_pem.clone(),
            chain_pems,
            root_pem: record.root_pem.clone(),
            root_der,
            intermediates_der,
            not_before: unix(record.not_before),
            not_after: unix(record.not_after),
            issuer,
        })
    }

    /// Its id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The signing certificate's subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The signing certificate's validity.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// The signing certificate's validity.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The root its leaves chain to (PEM).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root its leaves chain to (DER).
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// What follows a leaf in a chain: the signing certificate and everything above it, root
    /// last. For a root authority, just the root.
    pub fn chain_above_leaf(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.cert_pem.as_str()).chain(self.chain_pems.iter().map(String::as_str))
    }

    /// DER of the certificates between a leaf and the root, nearest the leaf first.
    pub fn intermediates_der(&self) -> &[CertificateDer<'static>] {
        &self.intermediates_der
    }

    /// Signs `params` for `public_key`.
    pub fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<rcgen::Certificate, AuthorityError> {
        params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| AuthorityError::Sign(e.to_string()))
    }
}

fn unix(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The parameters of a self-signed root: subject `O=<td>, CN=<td> root <n>` (so that no two
/// roots share a subject), URI SAN `spiffe://<td>`, CA true, keyCertSign + cRLSign.
pub fn root_params(trust_domain: &TrustDomain, id: i64, now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain.as_str());
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{trust_domain} root {id}"));
    if let Ok(uri) = rcgen::string::Ia5String::try_from(trust_domain.id_string()) {
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial().0);
    // A little slack for peers whose clocks run behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + ROOT_VALIDITY;
    params
}

/// A CSR for an intermediate CA of `trust_domain` whose key is `key` (in a PKCS#11 token),
/// for an offline root to sign: subject `O=<td>, CN=<td> intermediate`, URI SAN
/// `spiffe://<td>`.
pub fn intermediate_csr(trust_domain: &TrustDomain, key: &CaKey) -> Result<String, AuthorityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain.to_string());
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{trust_domain} intermediate"));
    let uri = format!("spiffe://{trust_domain}")
        .try_into()
        .map_err(|e: rcgen::Error| AuthorityError::Sign(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| AuthorityError::Sign(e.to_string()))
}

/// Generates a self-signed root, keeps its key in `keys`, and records it
/// in `state` together with `event` (an authority event; its `authority_id` is filled in).
/// Returns the new authority's id.
pub async fn create_self_signed_root(
    store: &Store,
    keys: &KeyStore,
    trust_domain: &TrustDomain,
    key_type: KeyType,
    state: AuthorityState,
    event: EventRow,
) -> Result<i64, AuthorityError> {
    let id = store.next_authority_id().await?;
    let (key, stored) = keys.generate(id, key_type)?;
    let params = root_params(trust_domain, id, OffsetDateTime::now_utc());
    let cert = params
        .self_signed(&key)
        .map_err(|e| AuthorityError::Sign(e.to_string()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).map_err(|e| {
        AuthorityError::BadCertificate {
            id,
            detail: e.to_string(),
        }
    })?;
    let pem = cert.pem();
    let (jwt, _) = new_jwt_key(keys, id)?;
    let new = NewAuthority {
        state,
        kind: AuthorityKind::SelfSigned,
        subject: parsed.subject().to_string(),
        cert_pem: pem.clone(),
        chain_pem: String::new(),
        root_pem: pem,
        key_ref: stored.key_ref.to_string(),
        sealed_key: stored.sealed_key,
        not_before: parsed.validity().not_before.timestamp(),
        not_after: parsed.validity().not_after.timestamp(),
        fingerprint_sha256: sha256_hex(cert.der()),
        jwt,
    };
    store.add_authority(id, &new, event).await?;
    Ok(id)
}

/// Generates authority `id`'s JWT-SVID signing key and what its row records.
fn new_jwt_key(keys: &KeyStore, id: i64) -> Result<(NewJwtKey, StoredKey), AuthorityError> {
    let (key, stored) = keys.generate_jwt(id)?;
    let new = NewJwtKey {
        kid: key.public().kid.clone(),
        key_ref: stored.key_ref.to_string(),
        sealed_key: stored.sealed_key.clone(),
        public_jwk: key.public().jwk.to_string(),
    };
    Ok((new, stored))
}

/// Authority `id`'s JWT-SVID signing key, loaded from where its row says it lives; none if
/// it has no row (an authority made by a replica that predates JWT-SVIDs).
pub async fn load_jwt_key(
    store: &Store,
    keys: &KeyStore,
    id: i64,
) -> Result<Option<JwtKey>, AuthorityError> {
    match store.jwt_key(id).await? {
        Some(record) => Ok(Some(keys.load_jwt(&record)?)),
        None => Ok(None),
    }
}

/// Gives every authority not retired that has none (made before JWT-SVIDs) its JWT-SVID
/// key; a key another replica recorded first is discarded. Returns how many were added.
pub async fn ensure_jwt_keys(store: &Store, keys: &KeyStore) -> Result<usize, AuthorityError> {
    let mut added = 0;
    for id in store.authorities_without_jwt_key().await? {
        let (new, stored) = new_jwt_key(keys, id)?;
        if store.add_jwt_key(id, &new).await? {
            added += 1;
        } else {
            keys.discard_jwt(&stored);
        }
    }
    Ok(added)
}

/// Imports the plug-in CA in `dir` (Istio's `cacerts` layout) as a `prepared` authority: its
/// key is kept in `keys`, or, with `pkcs11_object`, is that key pair already in the PKCS#11
/// token (made by `root csr`; `dir` then has no `ca-key.pem`). Returns the new authority's id.
pub async fn import_authority(
    store: &Store,
    keys: &KeyStore,
    dir: &Path,
    pkcs11_object: Option<&str>,
    event: EventRow,
) -> Result<i64, AuthorityError> {
    let (ca, stored) = match pkcs11_object {
        Some(object) => {
            let (key, stored) = keys.in_token(object)?;
            let name = format!("the PKCS#11 key {object:?}");
            (read_cacerts_with_key(dir, &key, &name)?, Some(stored))
        }
        None => (read_cacerts(dir)?, None),
    };
    let id = store.next_authority_id().await?;
    let stored = match stored {
        Some(stored) => stored,
        None => keys.put(id, &ca.key_pem)?,
    };
    let (jwt, _) = new_jwt_key(keys, id)?;
    let new = NewAuthority {
        state: AuthorityState::Prepared,
        kind: AuthorityKind::Imported,
        subject: ca.subject,
        cert_pem: ca.cert_pem,
        chain_pem: ca.chain_pem,
        root_pem: ca.root_pem,
        key_ref: stored.key_ref.to_string(),
        sealed_key: stored.sealed_key,
        not_before: ca.not_before,
        not_after: ca.not_after,
        fingerprint_sha256: ca.fingerprint_sha256,
        jwt,
    };
    store.add_authority(id, &new, event).await?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_128_bit_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let (serial, hex) = random_serial();
            assert_eq!(serial.len(), 16);
            assert_eq!(hex.len(), 32);
            assert_ne!(&hex[..2], "00");
            assert!(seen.insert(hex));
        }
    }

    #[test]
    fn root_profile() {
        let td = TrustDomain::new("example.org").unwrap();
        let key = CaKey::generate(KeyType::EcP256).unwrap();
        let now = OffsetDateTime::now_utc();
        let cert = root_params(&td, 7, now).self_signed(&key).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        assert_eq!(
            c.subject().to_string(),
            "O=example.org, CN=example.org root 7"
        );
        let bc = c.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        let ku = c.key_usage().unwrap().unwrap();
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        let san = c.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            r#"[URI("spiffe://example.org")]"#
        );
        let years = (c.validity().not_after.timestamp() - now.unix_timestamp()) / 86400 / 365;
        assert_eq!(years, 10);
    }
}
