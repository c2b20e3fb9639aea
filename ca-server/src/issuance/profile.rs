//! The leaf profile: pure functions from (identity, TTL, policy, issuer validity) to the
//! parameters of an X509-SVID. No keys here; `authority` signs what this decides.

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

use super::csr::KeyKind;
use crate::spiffe::SpiffeId;

/// TTL and clock-skew rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafPolicy {
    /// TTL when the request asks for none (`validity_duration` 0).
    pub default_ttl: Duration,
    /// Largest TTL a request may ask for.
    pub max_ttl: Duration,
    /// How far notBefore is backdated, for peers whose clocks run behind.
    pub clock_skew: Duration,
}

impl Default for LeafPolicy {
    fn default() -> Self {
        Self {
            default_ttl: Duration::hours(1),
            max_ttl: Duration::hours(24),
            clock_skew: Duration::minutes(2),
        }
    }
}

/// Why a requested TTL or validity cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidityError {
    /// A negative `validity_duration`.
    #[error(
        "validity_duration {0}s is negative; send 0 for the default or a positive number of seconds"
    )]
    Negative(i64),
    /// Above the maximum.
    #[error("validity_duration {requested}s is above the maximum of {max}s (--max-ttl)")]
    AboveMax {
        /// What was asked, seconds.
        requested: i64,
        /// The maximum, seconds.
        max: i64,
    },
    /// The issuing authority is not valid now.
    #[error(
        "the active authority is valid only from {} to {}; rotate it with `ca-server root \
         prepare` and `root activate`",
        crate::rfc3339::text(*.not_before),
        crate::rfc3339::text(*.not_after)
    )]
    IssuerNotValid {
        /// Its notBefore.
        not_before: OffsetDateTime,
        /// Its notAfter.
        not_after: OffsetDateTime,
    },
}

/// The TTL for a request: 0 means the default; negative or above the maximum is refused.
pub fn resolve_ttl(requested_secs: i64, policy: &LeafPolicy) -> Result<Duration, ValidityError> {
    match requested_secs {
        0 => Ok(policy.default_ttl),
        n if n < 0 => Err(ValidityError::Negative(n)),
        n if n > policy.max_ttl.whole_seconds() => Err(ValidityError::AboveMax {
            requested: n,
            max: policy.max_ttl.whole_seconds(),
        }),
        n => Ok(Duration::seconds(n)),
    }
}

/// notBefore and notAfter of a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// now − skew, never before the issuer's notBefore.
    pub not_before: OffsetDateTime,
    /// now + TTL, never after the issuer's notAfter.
    pub not_after: OffsetDateTime,
}

/// The validity of a leaf issued `now` with `ttl`, clamped to the issuer's validity.
pub fn leaf_validity(
    now: OffsetDateTime,
    ttl: Duration,
    skew: Duration,
    issuer_not_before: OffsetDateTime,
    issuer_not_after: OffsetDateTime,
) -> Result<Validity, ValidityError> {
    if now < issuer_not_before || now >= issuer_not_after {
        return Err(ValidityError::IssuerNotValid {
            not_before: issuer_not_before,
            not_after: issuer_not_after,
        });
    }
    // Whole seconds: X.509 times have no fractions, and truncation must not move notAfter
    // past the issuer's.
    let now = now.replace_nanosecond(0).unwrap_or(now);
    Ok(Validity {
        not_before: (now - skew).max(issuer_not_before),
        not_after: (now + ttl).min(issuer_not_after),
    })
}

/// The X509-SVID profile: exactly one URI SAN (the SPIFFE ID) with an empty subject, so the
/// SAN extension is critical; CA false; KeyUsage digitalSignature (+ keyEncipherment for RSA);
/// EKU serverAuth + clientAuth; subject and authority key identifiers.
pub fn leaf_params(
    spiffe_id: &SpiffeId,
    key: KeyKind,
    validity: Validity,
    serial: SerialNumber,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if key.is_rsa() {
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial);
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    Ok(params)
}

/// The server's own TLS certificate: DNS and IP SANs from `--server-name`, server and client
/// auth (so the same identity can make mTLS calls), CA false.
pub fn server_params(
    names: &[String],
    validity: Validity,
    serial: SerialNumber,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial);
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn ttl_rules() {
        let p = LeafPolicy::default();
        assert_eq!(resolve_ttl(0, &p), Ok(Duration::hours(1)));
        assert_eq!(resolve_ttl(600, &p), Ok(Duration::seconds(600)));
        assert_eq!(resolve_ttl(86_400, &p), Ok(Duration::hours(24)));
        assert_eq!(
            resolve_ttl(86_401, &p),
            Err(ValidityError::AboveMax {
                requested: 86_401,
                max: 86_400
            })
        );
        assert_eq!(resolve_ttl(-1, &p), Err(ValidityError::Negative(-1)));
        assert!(resolve_ttl(i64::MIN, &p).is_err());
    }

    #[test]
    fn validity_is_backdated_and_clamped_to_the_issuer() {
        let now = datetime!(2026-06-01 12:00:00.750 UTC);
        let skew = Duration::minutes(2);
        let issuer_nb = datetime!(2026-01-01 0:00 UTC);
        let issuer_na = datetime!(2036-01-01 0:00 UTC);
        let v = leaf_validity(now, Duration::hours(1), skew, issuer_nb, issuer_na).unwrap();
        assert_eq!(v.not_before, datetime!(2026-06-01 11:58:00 UTC));
        assert_eq!(v.not_after, datetime!(2026-06-01 13:00:00 UTC));

        // A young issuer: notBefore never precedes it.
        let young = datetime!(2026-06-01 11:59:30 UTC);
        let v = leaf_validity(now, Duration::hours(1), skew, young, issuer_na).unwrap();
        assert_eq!(v.not_before, young);

        // An issuer about to expire: notAfter never exceeds it.
        let ending = datetime!(2026-06-01 12:30:00 UTC);
        let v = leaf_validity(now, Duration::hours(1), skew, issuer_nb, ending).unwrap();
        assert_eq!(v.not_after, ending);

        // An expired issuer signs nothing.
        let expired = datetime!(2026-06-01 11:00:00 UTC);
        assert!(leaf_validity(now, Duration::hours(1), skew, issuer_nb, expired).is_err());
    }

    #[test]
    fn leaf_profile_is_an_svid() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let v = Validity {
            not_before: datetime!(2026-06-01 11:58 UTC),
            not_after: datetime!(2026-06-01 13:00 UTC),
        };
        let p = leaf_params(&id, KeyKind::EcP256, v, SerialNumber::from_slice(&[1])).unwrap();
        assert!(p.distinguished_name.iter().next().is_none());
        assert_eq!(p.subject_alt_names.len(), 1);
        assert!(matches!(p.is_ca, IsCa::ExplicitNoCa));
        assert_eq!(p.key_usages, vec![KeyUsagePurpose::DigitalSignature]);
        let rsa = leaf_params(&id, KeyKind::Rsa(2048), v, SerialNumber::from_slice(&[1])).unwrap();
        assert_eq!(
            rsa.key_usages,
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment
            ]
        );
        assert!(p.use_authority_key_identifier_extension);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Wherever the clock stands (before, inside or after the issuer's validity) and
            /// whatever the TTL and skew, a leaf is either refused, or valid now, inside the
            /// issuer's validity, no longer than TTL + skew, and notBefore < notAfter.
            #[test]
            fn validity_is_consistent_wherever_the_clock_is(
                now in 0i64..4_000_000_000,
                frac in 0u32..1_000_000_000,
                ttl in 1i64..200_000,
                skew in 0i64..3_600,
                inb in 0i64..4_000_000_000,
                life in 1i64..400_000_000,
            ) {
                let t = |s: i64| OffsetDateTime::from_unix_timestamp(s).unwrap();
                let now_t = t(now).replace_nanosecond(frac).unwrap();
                let (inb_t, ina_t) = (t(inb), t(inb + life));
                let result = leaf_validity(now_t, Duration::seconds(ttl), Duration::seconds(skew), inb_t, ina_t);
                match result {
                    Err(ValidityError::IssuerNotValid { .. }) => {
                        prop_assert!(now_t < inb_t || now_t >= ina_t);
                    }
                    Err(other) => prop_assert!(false, "unexpected {other}"),
                    Ok(v) => {
                        prop_assert!(inb_t <= now_t && now_t < ina_t);
                        prop_assert!(v.not_before < v.not_after);
                        prop_assert!(v.not_before <= now_t && now_t < v.not_after);
                        prop_assert!(v.not_before >= inb_t && v.not_after <= ina_t);
                        prop_assert!(v.not_after - v.not_before <= Duration::seconds(ttl + skew));
                        prop_assert_eq!(v.not_before.nanosecond(), 0);
                        prop_assert_eq!(v.not_after.nanosecond(), 0);
                    }
                }
            }

            /// A requested TTL is used as asked when it is within the maximum, refused
            /// otherwise; 0 means the default.
            #[test]
            fn ttl_is_clamped_by_refusal(asked in -100_000i64..200_000) {
                let p = LeafPolicy::default();
                match resolve_ttl(asked, &p) {
                    Ok(ttl) if asked == 0 => prop_assert_eq!(ttl, p.default_ttl),
                    Ok(ttl) => {
                        prop_assert_eq!(ttl, Duration::seconds(asked));
                        prop_assert!(ttl <= p.max_ttl);
                    }
                    Err(ValidityError::Negative(_)) => prop_assert!(asked < 0),
                    Err(ValidityError::AboveMax { .. }) => prop_assert!(Duration::seconds(asked) > p.max_ttl),
                    Err(other) => prop_assert!(false, "unexpected {other}"),
                }
            }
        }
    }
}
