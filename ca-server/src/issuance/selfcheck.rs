//! The check every issued chain passes before it leaves: it verifies against the bundle being
//! published (rustls-webpki, as a peer would verify it), and the leaf says what the profile
//! says. A failure here is a bug or a broken authority, never the caller's doing: the request
//! is refused as INTERNAL and the certificate is never returned.

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::profile::Validity;
use crate::bundle::Bundle;
use crate::spiffe::SpiffeId;

/// Why an issued chain was withheld.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelfCheckError {
    /// The leaf does not parse.
    #[error("the leaf does not parse: {0}")]
    Unparsable(String),
    /// The chain does not verify against the bundle being published.
    #[error("the chain does not verify against the published bundle: {0}")]
    Untrusted(String),
    /// The leaf is not an X.509 v3 certificate.
    #[error("the leaf is not an X.509 v3 certificate")]
    NotV3,
    /// Another serial than the one drawn.
    #[error("the leaf's serial is {got}, not {want}")]
    Serial {
        /// What the leaf says.
        got: String,
        /// What was drawn.
        want: String,
    },
    /// Another key than the CSR's.
    #[error("the leaf's public key is not the CSR's")]
    PublicKey,
    /// Another validity than the one computed.
    #[error("the leaf is valid {got:?} (unix), not the {want:?} computed")]
    Validity {
        /// notBefore and notAfter as the leaf says.
        got: (i64, i64),
        /// As computed.
        want: (i64, i64),
    },
    /// A SAN that is not a URI.
    #[error("the leaf has a SAN other than a URI: {0}")]
    NonUriSan(String),
    /// An empty subject needs a critical SAN (RFC 5280, 4.2.1.6).
    #[error("the leaf has an empty subject but a non-critical SAN")]
    NonCriticalSan,
    /// It could sign certificates or CRLs.
    #[error("the leaf's key usage allows signing certificates")]
    SignsCertificates,
    /// Other URIs than exactly the identity.
    #[error("the leaf names [{}], not exactly {want}", .got.join(", "))]
    Identity {
        /// The URI SANs.
        got: Vec<String>,
        /// The SPIFFE ID.
        want: String,
    },
    /// Not marked `CA:FALSE`.
    #[error("the leaf is not marked CA:FALSE")]
    NotCaFalse,
    /// No `digitalSignature`.
    #[error("the leaf's key usage lacks digitalSignature")]
    NoDigitalSignature,
    /// Not both `clientAuth` and `serverAuth`.
    #[error("the leaf's extended key usage lacks clientAuth or serverAuth")]
    NoMutualTls,
}

/// The bundle's roots as trust anchors, parsed once per bundle.
#[derive(Debug, Clone, Default)]
pub struct TrustAnchors(Vec<TrustAnchor<'static>>);

impl TrustAnchors {
    /// The anchors of `bundle`'s roots.
    pub fn from_bundle(bundle: &Bundle) -> Result<Self, crate::x509::CertError> {
        bundle
            .roots_pem
            .iter()
            .map(|pem| {
                let der = crate::x509::pem_to_der(pem)?;
                webpki::anchor_from_trusted_cert(&der)
                    .map(|a| a.to_owned())
                    .map_err(|e| {
                        crate::x509::CertError::Refused(format!(
                            "a bundle root is not a usable trust anchor: {e}"
                        ))
                    })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// What the leaf must say.
#[derive(Debug)]
pub struct Expected<'a> {
    /// Its only SAN.
    pub spiffe_id: &'a SpiffeId,
    /// Its validity, exactly.
    pub validity: Validity,
    /// Its serial, lowercase hex.
    pub serial_hex: &'a str,
    /// Its public key (SubjectPublicKeyInfo DER), from the CSR.
    pub spki_der: &'a [u8],
}

/// Checks `leaf` (signed by the first of `intermediates`, or by a root when there are none)
/// against `anchors` at `now`, and against `expected`.
pub fn check_issued(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'static>],
    anchors: &TrustAnchors,
    expected: &Expected<'_>,
    now: OffsetDateTime,
) -> Result<(), SelfCheckError> {
    let end_entity = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| SelfCheckError::Unparsable(e.to_string()))?;
    let seconds = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors.0,
            intermediates,
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(seconds)),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| SelfCheckError::Untrusted(e.to_string()))?;
    check_profile(leaf, expected)
}

fn check_profile(leaf: &CertificateDer<'_>, expected: &Expected<'_>) -> Result<(), SelfCheckError> {
    use SelfCheckError as E;
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| E::Unparsable(e.to_string()))?;
    if cert.version().0 != 2 {
        return Err(E::NotV3);
    }
    let serial = crate::x509::serial_hex(cert.raw_serial());
    if serial != expected.serial_hex {
        return Err(E::Serial {
            got: serial,
            want: expected.serial_hex.to_owned(),
        });
    }
    if cert.public_key().raw != expected.spki_der {
        return Err(E::PublicKey);
    }
    let validity = cert.validity();
    let (nb, na) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let want = (
        expected.validity.not_before.unix_timestamp(),
        expected.validity.not_after.unix_timestamp(),
    );
    if (nb, na) != want || nb > na {
        return Err(E::Validity {
            got: (nb, na),
            want,
        });
    }

    let mut uris = Vec::new();
    let (mut ca_false, mut digital_signature, mut client, mut server) =
        (false, false, false, false);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uris.push(*uri),
                        other => {
                            return Err(E::NonUriSan(other.to_string()));
                        }
                    }
                }
                if cert.subject().iter().next().is_none() && !ext.critical {
                    return Err(E::NonCriticalSan);
                }
            }
            ParsedExtension::BasicConstraints(bc) => ca_false = !bc.ca,
            ParsedExtension::KeyUsage(ku) => {
                if ku.key_cert_sign() || ku.crl_sign() {
                    return Err(E::SignsCertificates);
                }
                digital_signature = ku.digital_signature();
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                client = eku.client_auth;
                server = eku.server_auth;
            }
            _ => {}
        }
    }
    let want = expected.spiffe_id.to_string();
    if uris != [want.as_str()] {
        return Err(E::Identity {
            got: uris.iter().map(|u| (*u).to_owned()).collect(),
            want,
        });
    }
    if !ca_false {
        return Err(E::NotCaFalse);
    }
    if !digital_signature {
        return Err(E::NoDigitalSignature);
    }
    if !(client && server) {
        return Err(E::NoMutualTls);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issuance::KeyKind;
    use crate::issuance::profile::leaf_params;
    use crate::spiffe::TrustDomain;

    struct Case {
        root_pem: String,
        leaf: CertificateDer<'static>,
        spki: Vec<u8>,
        validity: Validity,
        serial: String,
        id: SpiffeId,
        now: OffsetDateTime,
    }

    fn case() -> Case {
        let now = OffsetDateTime::now_utc();
        let td = TrustDomain::new("cluster.local").unwrap();
        let root_key = rcgen::KeyPair::generate().unwrap();
        let root_params = crate::authority::root_params(&td, 1, now);
        let root = root_params.clone().self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::from_params(&root_params, &root_key);
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let validity = Validity {
            not_before: now - time::Duration::minutes(5),
            not_after: now + time::Duration::hours(1),
        };
        let (serial, serial_hex) = crate::x509::random_serial();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = leaf_params(&id, KeyKind::EcP256, validity, serial)
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        Case {
            root_pem: root.pem(),
            leaf: leaf.der().clone(),
            spki: rcgen::PublicKeyData::subject_public_key_info(&leaf_key),
            validity,
            serial: serial_hex,
            id,
            now,
        }
    }

    fn anchors(roots: &[&str]) -> TrustAnchors {
        TrustAnchors::from_bundle(&Bundle {
            sequence: 1,
            roots_pem: roots.iter().map(|r| r.to_string()).collect(),
            jwt_keys: Vec::new(),
            tainted: Vec::new(),
        })
        .unwrap()
    }

    fn check(
        c: &Case,
        anchors: &TrustAnchors,
        id: &SpiffeId,
        serial: &str,
    ) -> Result<(), SelfCheckError> {
        let expected = Expected {
            spiffe_id: id,
            validity: c.validity,
            serial_hex: serial,
            spki_der: &c.spki,
        };
        check_issued(&c.leaf, &[], anchors, &expected, c.now)
    }

    #[test]
    fn a_sound_chain_passes() {
        let c = case();
        check(&c, &anchors(&[&c.root_pem]), &c.id, &c.serial).unwrap();
    }

    #[test]
    fn a_chain_outside_the_bundle_fails() {
        let c = case();
        let other = case();
        let err = check(&c, &anchors(&[&other.root_pem]), &c.id, &c.serial).unwrap_err();
        assert!(matches!(err, SelfCheckError::Untrusted(_)), "{err}");
    }

    #[test]
    fn a_leaf_that_differs_from_what_was_asked_fails() {
        let c = case();
        let a = anchors(&[&c.root_pem]);
        let other_id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/db").unwrap();
        let err = check(&c, &a, &other_id, &c.serial).unwrap_err();
        assert_eq!(
            err,
            SelfCheckError::Identity {
                got: vec![c.id.to_string()],
                want: other_id.to_string()
            }
        );
        let err = check(&c, &a, &c.id, "01").unwrap_err();
        assert!(matches!(err, SelfCheckError::Serial { .. }), "{err}");
        let mut c = c;
        c.spki =
            rcgen::PublicKeyData::subject_public_key_info(&rcgen::KeyPair::generate().unwrap());
        let err = check(&c, &a, &c.id, &c.serial).unwrap_err();
        assert_eq!(err, SelfCheckError::PublicKey);
    }
}
