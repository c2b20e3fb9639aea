//! Why a certificate (or JWT-SVID) request was refused: every domain error the pipeline can end with, each
//! classed by its own type ([`Classify`]).

use super::IssueError;
use super::jwt_svid::JwtError;
use super::pool::PoolError;
use crate::audit::AuditError;
use crate::auth::AuthError;
use crate::auth::node::ImpersonationError;
use crate::class::{Class, Classify};

/// Why a certificate request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The caller's token.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The CSR, TTL, SANs or the authority.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// The audit log could not record the issuance.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The caller asked for an identity not its own, and may not have it.
    #[error(transparent)]
    Impersonation(#[from] ImpersonationError),
    /// The caller's identity asks for certificates faster than its limit.
    #[error(
        "{identity} asks for certificates faster than its limit ({per_second}/s, burst {burst}, \
         set with --identity-rate and --identity-burst); retry in {retry_after_ms} ms"
    )]
    IdentityRate {
        /// The caller's SPIFFE ID.
        identity: String,
        /// The limit.
        per_second: f64,
        /// Its burst.
        burst: f64,
        /// When a request would be admitted.
        retry_after_ms: u128,
    },
    /// The peer failed authentication too often.
    #[error(
        "too many failed authentications from {peer}; requests from it are refused for \
         {retry_after_ms} ms (--unauthenticated-rate)"
    )]
    PeerRate {
        /// The peer's address.
        peer: std::net::IpAddr,
        /// When a request would be looked at again.
        retry_after_ms: u128,
    },
    /// The crypto pool's queue is full, or it stopped.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The audiences or TTL of a JWT-SVID, or its signing.
    #[error(transparent)]
    Jwt(#[from] JwtError),
}

impl Classify for Refusal {
    fn class(&self) -> Class {
        match self {
            Self::Auth(e) => e.class(),
            Self::Issue(e) => e.class(),
            Self::Audit(e) => e.class(),
            Self::Impersonation(e) => e.class(),
            Self::Pool(e) => e.class(),
            Self::Jwt(e) => e.class(),
            Self::IdentityRate { .. } | Self::PeerRate { .. } => Class::Overloaded,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Auth(e) => e.reason(),
            Self::Issue(e) => e.reason(),
            Self::Audit(e) => e.reason(),
            Self::Impersonation(e) => e.reason(),
            Self::Pool(e) => e.reason(),
            Self::Jwt(e) => e.reason(),
            Self::IdentityRate { .. } => "identity_rate",
            Self::PeerRate { .. } => "peer_rate",
        }
    }
}
