//! The server's own TLS: a certificate minted by the active authority (recorded in the audit
//! log like any other), renewed before half its life, served through a resolver that hands out
//! the latest one, or, after an activation, the one the outgoing authority signed while its
//! root is in the bundle and it is valid: a client whose bundle predates the new root (an
//! agent restarting after a break-glass activation) can still connect and fetch the bundle.

use std::sync::Arc;

use rcgen::PublicKeyData;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::aws_lc_rs;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;

use crate::audit::AuditLog;
use crate::audit::{EventKind, EventRow};
use crate::authority::{Authority, AuthorityError};
use crate::issuance::Active;
use crate::issuance::{Validity, leaf_validity, profile};
use crate::x509::{pem_to_der, random_serial, sha256_hex};

/// How long the server's own certificate lives.
pub const SERVER_CERT_TTL: Duration = Duration::hours(24);

/// What went wrong minting the server's certificate.
#[derive(Debug, thiserror::Error)]
pub enum ServerCertError {
    /// Key generation or signing.
    #[error("minting the server certificate failed: {0}")]
    Mint(String),
    /// The authority cannot sign now.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// Its audit record was not committed.
    #[error("the server certificate's audit record was not committed: {0}")]
    Audit(#[from] crate::audit::AuditError),
}

/// A minted server certificate.
#[derive(Debug, Clone)]
pub(super) struct ServerCert {
    /// What rustls serves.
    pub certified: Arc<CertifiedKey>,
    /// Its validity.
    pub validity: Validity,
    /// When it was minted: its life for renewal counts from here, not from the backdated
    /// notBefore.
    pub minted_at: OffsetDateTime,
    /// The root it chains to (its authority's, PEM, as the bundle holds it).
    pub root_pem: String,
}

/// How long before its notAfter the outgoing authority's certificate stops being served.
const OUTGOING_MARGIN: Duration = Duration::minutes(5);

/// What the listener serves.
#[derive(Debug, Clone)]
pub(super) struct Served {
    /// The active authority's certificate.
    pub current: Arc<CertifiedKey>,
    /// The certificate the authority active before signed, from the activation until its
    /// root leaves the bundle or it is about to expire.
    pub outgoing: Option<Outgoing>,
}

impl Served {
    /// Serving `cert` alone.
    pub(super) fn only(cert: &ServerCert) -> Self {
        Self {
            current: Arc::clone(&cert.certified),
            outgoing: None,
        }
    }
}

/// The certificate served for clients whose bundle predates the active authority's root.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    certified: Arc<CertifiedKey>,
    root_pem: String,
    /// Unix seconds: served before this, [`OUTGOING_MARGIN`] before its notAfter.
    until: i64,
}

impl Outgoing {
    /// `cert`, kept for the clients of the authority that minted it, if it is not about to
    /// expire at `now`.
    pub(super) fn keep(cert: &ServerCert, now: OffsetDateTime) -> Option<Self> {
        let until = cert.validity.not_after - OUTGOING_MARGIN;
        (now < until).then(|| Self {
            certified: Arc::clone(&cert.certified),
            root_pem: cert.root_pem.clone(),
            until: until.unix_timestamp(),
        })
    }

    /// Whether it is served at `now` (Unix seconds) beside the bundle `roots_pem`.
    fn serves(&self, now: i64, roots_pem: &[String]) -> bool {
        now < self.until && roots_pem.contains(&self.root_pem)
    }
}

/// Mints a certificate for `names` (DNS names or IP addresses) with a fresh P-256 key, signed
/// by `authority`, and records it in the audit log before returning it.
pub(super) async fn mint_server_cert(
    authority: &Authority,
    names: &[String],
    audit: &AuditLog,
) -> Result<ServerCert, ServerCertError> {
    let now = OffsetDateTime::now_utc();
    let validity = leaf_validity(
        now,
        SERVER_CERT_TTL,
        Duration::minutes(2),
        authority.not_before(),
        authority.not_after(),
    )
    .map_err(|e| ServerCertError::Mint(e.to_string()))?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ServerCertError::Mint(e.to_string()))?;
    let (serial, serial_hex) = random_serial();
    let params = profile::server_params(names, validity, serial)
        .map_err(|e| ServerCertError::Mint(format!("bad --server-name: {e}")))?;
    let cert = authority.sign(&params, &key)?;

    // The leaf and any intermediates, not the root: every client verifies against its own
    // copy of the bundle, so a root on the wire is only parsed and discarded (RFC 8446
    // 4.4.2 lets it be left out). That is ~500 bytes and, for an OpenSSL 3 client, ~130 µs
    // of each new connection's handshake (a storm of 1,000 clients: 0.74 s -> 0.60 s).
    let mut chain = vec![cert.der().clone()];
    chain.extend(authority.intermediates_der().iter().cloned());
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = aws_lc_rs::sign::any_supported_type(&key_der)
        .map_err(|e| ServerCertError::Mint(e.to_string()))?;

    let mut event = EventRow::new(EventKind::Issued);
    event.serial = Some(serial_hex);
    event.not_before = Some(validity.not_before.unix_timestamp());
    event.not_after = Some(validity.not_after.unix_timestamp());
    event.authority_id = Some(authority.id());
    event.public_key_sha256 = Some(sha256_hex(key.subject_public_key_info().as_ref()));
    event.reason = Some(format!("server TLS certificate for {}", names.join(", ")));
    audit.record(event).await?;

    Ok(ServerCert {
        certified: Arc::new(CertifiedKey::new(chain, signing_key)),
        validity,
        minted_at: now,
        root_pem: authority.root_pem().to_owned(),
    })
}

/// When to renew a certificate minted at `minted_at`: at half the time from then to its
/// notAfter (never negative).
pub fn renew_in(
    minted_at: OffsetDateTime,
    validity: &Validity,
    now: OffsetDateTime,
) -> std::time::Duration {
    let half = (validity.not_after - minted_at) / 2;
    let at = minted_at + half;
    let wait: Duration = at - now;
    if wait.is_negative() {
        std::time::Duration::ZERO
    } else {
        wait.unsigned_abs()
    }
}

/// Serves the outgoing authority's certificate while [`Outgoing::serves`], else the active
/// one's. Every client holding a bundle verifies the first: it has both roots, or only the
/// old one; a client that trusts only the new root (given it by hand) waits for the old one's
/// retirement.
pub(super) struct CurrentCert {
    served: watch::Receiver<Arc<Served>>,
    active: watch::Receiver<Arc<Active>>,
}

impl std::fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CurrentCert")
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let served = Arc::clone(&self.served.borrow());
        if let Some(outgoing) = &served.outgoing {
            let now = OffsetDateTime::now_utc().unix_timestamp();
            if outgoing.serves(now, &self.active.borrow().bundle.roots_pem) {
                return Some(Arc::clone(&outgoing.certified));
            }
        }
        Some(Arc::clone(&served.current))
    }
}

/// What the server publishes for `authority` (with its JWT-SVID key) and `bundle`: those,
/// the bundle's trust anchors, and a verifier of client certificates issued by one of
/// `issuers`.
pub(super) fn active(
    authority: Arc<crate::authority::Authority>,
    jwt: Option<Arc<crate::authority::JwtKey>>,
    bundle: crate::bundle::Bundle,
    issuers: &[String],
) -> Result<Active, crate::authority::AuthorityError> {
    let clients =
        client_verifier(issuers).map_err(|e| crate::authority::AuthorityError::BadCertificate {
            id: authority.id(),
            detail: e.to_string(),
        })?;
    Active::new(authority, jwt, bundle, clients)
}

/// A verifier of client certificates issued by one of `issuers` (the signing certificates,
/// PEM, of the authorities not retired) and valid at the time of the check.
pub(super) fn client_verifier(
    issuers: &[String],
) -> Result<Arc<dyn ClientCertVerifier>, crate::x509::CertError> {
    use crate::x509::CertError;
    let mut roots = rustls::RootCertStore::empty();
    for pem in issuers {
        roots.add(pem_to_der(pem)?).map_err(|e| {
            CertError::Refused(format!(
                "an authority's certificate cannot verify clients: {e}"
            ))
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(aws_lc_rs::default_provider()),
    )
    .allow_unauthenticated()
    .build()
    .map(|v| v as Arc<dyn ClientCertVerifier>)
    .map_err(|e| CertError::Refused(format!("client certificate verifier: {e}")))
}

/// Asks for a client certificate but does not require one (proxies authenticate with tokens;
/// remote auditors with mTLS), and verifies one with the current [`Active::clients`],
/// following it as the authorities change.
pub(super) struct AuthorityClientVerifier {
    active: watch::Receiver<Arc<Active>>,
}

impl std::fmt::Debug for AuthorityClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthorityClientVerifier")
    }
}

impl AuthorityClientVerifier {
    /// A verifier following `active`.
    pub(super) fn new(active: watch::Receiver<Arc<Active>>) -> Self {
        Self { active }
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::clone(&self.active.borrow().clients)
    }
}

impl ClientCertVerifier for AuthorityClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// The TLS configuration of the gRPC/HTTPS listener: TLS 1.2+, ALPN `h2` then `http/1.1`,
/// client certificates optional and checked against the bundle, the certificate chosen by
/// [`CurrentCert`].
pub(super) fn server_config(
    served: watch::Receiver<Arc<Served>>,
    active: watch::Receiver<Arc<Active>>,
    client_verifier: Arc<dyn ClientCertVerifier>,
) -> Arc<rustls::ServerConfig> {
    // TLS 1.3 and 1.2 only, with the provider's suites: all AEAD with forward secrecy
    // (AES-GCM, ChaCha20-Poly1305 over ECDHE); nothing older is even offered.
    let mut config = rustls::ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_client_cert_verifier(client_verifier)
    .with_cert_resolver(Arc::new(CurrentCert { served, active }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn renews_at_half_life_counted_from_minting() {
        let minted = datetime!(2026-01-01 0:00 UTC);
        let v = Validity {
            // Backdated for skewed clocks: that part of the life does not count.
            not_before: datetime!(2025-12-31 23:58 UTC),
            not_after: datetime!(2026-01-02 0:00 UTC),
        };
        let hours = |h: u64| std::time::Duration::from_secs(h * 3600);
        assert_eq!(renew_in(minted, &v, minted), hours(12));
        assert_eq!(
            renew_in(minted, &v, datetime!(2026-01-01 11:00 UTC)),
            hours(1)
        );
        assert_eq!(
            renew_in(minted, &v, datetime!(2026-01-01 13:00 UTC)),
            std::time::Duration::ZERO
        );
    }
}
