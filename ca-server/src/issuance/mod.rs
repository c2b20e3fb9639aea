//! Issuance: CSR checks, the leaf profile, `issue` (which signs with the active authority),
//! the `pipeline` behind `CreateCertificate` (authenticate, check, sign, record, answer) and
//! `jwt_svid` behind `MintJwtSvid` (the same steps for a JWT-SVID),
//! pure of any transport: its refusals are classed (`crate::class`), and the server turns
//! the class into a gRPC code.

mod active;
pub mod csr;
pub mod jwt_svid;
mod pipeline;
pub mod pod;
pub mod pool;
pub mod profile;
mod refusal;
mod refusals;
pub mod selfcheck;

use time::OffsetDateTime;

pub use active::Active;
pub use csr::{CheckedCsr, CsrError, KeyKind, MAX_CSR_BYTES, check_csr, check_csr_der, check_spki};
pub use jwt_svid::{JwtRequest, MintedJwt};
pub use pipeline::{Caller, CertificateAuthority, CsrRequest, LimitSettings};
pub use profile::{LeafPolicy, Validity, ValidityError, leaf_validity, resolve_ttl};
pub use refusal::Refusal;
pub use selfcheck::{SelfCheckError, TrustAnchors};

use crate::auth::Identity;
use crate::authority::{Authority, AuthorityError};
use crate::x509::random_serial;

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CSR failed a check.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The TTL or the authority's validity.
    #[error(transparent)]
    Validity(#[from] ValidityError),
    /// The CSR names SANs other than the caller's identity.
    #[error(
        "the CSR asks for [{}] but the caller's identity is {identity}; a certificate can only \
         name the caller's own SPIFFE ID (leave the SANs out or set exactly that one)",
        requested.join(", ")
    )]
    SanMismatch {
        /// What the CSR asks for.
        requested: Vec<String>,
        /// Who the caller is.
        identity: String,
    },
    /// Signing failed (a bug or a broken key, not the caller's fault).
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// The signed chain failed its own check before leaving (a bug, not the caller's fault):
    /// it was not returned.
    #[error("the issued certificate failed the self-check and was withheld: {0}")]
    SelfCheck(#[from] SelfCheckError),
}

impl crate::class::Classify for IssueError {
    /// The caller's for a bad CSR or TTL, forbidden for SANs not its own, unavailable while
    /// the authority is not valid, internal for signing and the self-check.
    fn class(&self) -> crate::class::Class {
        use crate::class::Class;
        match self {
            Self::Csr(_)
            | Self::Validity(ValidityError::Negative(_))
            | Self::Validity(ValidityError::AboveMax { .. }) => Class::Caller,
            Self::Validity(ValidityError::IssuerNotValid { .. }) => Class::Unavailable,
            Self::SanMismatch { .. } => Class::Forbidden,
            Self::Authority(_) | Self::SelfCheck(_) => Class::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Csr(_) => "csr",
            Self::Validity(ValidityError::IssuerNotValid { .. }) => "authority_not_valid",
            Self::Validity(_) => "ttl",
            Self::SanMismatch { .. } => "san_mismatch",
            Self::Authority(_) => "signing",
            Self::SelfCheck(_) => "self_check",
        }
    }
}

/// A certificate that was issued (but not yet returned: that waits for its audit record).
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM certificates: the leaf first, the root last.
    pub chain: Vec<String>,
    /// The leaf's serial, lowercase hex.
    pub serial: String,
    /// The leaf's validity.
    pub validity: Validity,
    /// The signing authority.
    pub authority_id: i64,
    /// The CSR, as checked.
    pub csr: CheckedCsr,
}

/// Signs a leaf for `identity` with `authority`, after checking the CSR's SANs against the
/// identity, then checks the chain against `anchors` (the published bundle) and the profile
/// before handing it back. `csr` has passed [`check_csr`]; `ttl` comes from [`resolve_ttl`].
/// CPU-bound (signing and a verification): call it off the async reactor.
pub fn issue(
    authority: &Authority,
    anchors: &TrustAnchors,
    policy: &LeafPolicy,
    identity: &Identity,
    csr: CheckedCsr,
    ttl: time::Duration,
    now: OffsetDateTime,
) -> Result<Issued, IssueError> {
    let id = identity.spiffe_id.to_string();
    if !csr.requested_sans.is_empty() && csr.requested_sans != [id.as_str()] {
        // As the CSR put them (at most 64 KiB of them): cut before they reach a message.
        let mut requested: Vec<String> = csr
            .requested_sans
            .iter()
            .take(4)
            .map(|san| crate::untrusted::claim(san))
            .collect();
        if csr.requested_sans.len() > 4 {
            requested.push(format!("and {} more", csr.requested_sans.len() - 4));
        }
        return Err(IssueError::SanMismatch {
            requested,
            identity: id,
        });
    }
    let validity = leaf_validity(
        now,
        ttl,
        policy.clock_skew,
        authority.not_before(),
        authority.not_after(),
    )?;
    let (serial, serial_hex) = random_serial();
    let params = profile::leaf_params(&identity.spiffe_id, csr.key, validity, serial)
        .map_err(|e| AuthorityError::Sign(e.to_string()))?;
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(&csr.spki_der)
        .map_err(|e| CsrError::UnsupportedKey(e.to_string()))?;
    let leaf = authority.sign(&params, &public_key)?;
    let expected = selfcheck::Expected {
        spiffe_id: &identity.spiffe_id,
        validity,
        serial_hex: &serial_hex,
        spki_der: &csr.spki_der,
    };
    selfcheck::check_issued(
        leaf.der(),
        authority.intermediates_der(),
        anchors,
        &expected,
        now,
    )
    .map_err(IssueError::SelfCheck)?;
    let chain = std::iter::once(leaf.pem())
        .chain(authority.chain_above_leaf().map(str::to_owned))
        .collect();
    Ok(Issued {
        chain,
        serial: serial_hex,
        validity,
        authority_id: authority.id(),
        csr,
    })
}
