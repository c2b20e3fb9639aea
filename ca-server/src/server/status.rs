//! The one place where domain errors become gRPC statuses.

use tonic::{Code, Status};

use super::pool::PoolError;
use crate::audit::AuditError;
use crate::auth::AuthError;
use crate::auth::node::ImpersonationError;
use crate::issuance::{IssueError, ValidityError};

/// The longest message a refusal sends back.
pub const MAX_MESSAGE_BYTES: usize = 2048;

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
    Pool(#[from] super::pool::PoolError),
    /// A bug: something that cannot fail did.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Refusal {
    /// The gRPC code, per DESIGN.md's table.
    pub fn code(&self) -> Code {
        match self {
            Self::Auth(e) if e.is_unavailable() => Code::Unavailable,
            Self::Auth(e) if e.is_overloaded() => Code::ResourceExhausted,
            Self::Auth(_) => Code::Unauthenticated,
            Self::Impersonation(e) if e.is_unavailable() => Code::Unavailable,
            Self::Impersonation(e) if e.is_malformed() => Code::InvalidArgument,
            Self::Issue(IssueError::SanMismatch { .. }) | Self::Impersonation(_) => {
                Code::PermissionDenied
            }
            Self::Issue(IssueError::Csr(_))
            | Self::Issue(IssueError::Validity(
                ValidityError::Negative(_) | ValidityError::AboveMax { .. },
            )) => Code::InvalidArgument,
            Self::Issue(IssueError::Validity(ValidityError::IssuerNotValid { .. }))
            | Self::Audit(AuditError::Unavailable(_)) => Code::Unavailable,
            Self::Audit(AuditError::Overloaded)
            | Self::Pool(PoolError::Full(_))
            | Self::IdentityRate { .. }
            | Self::PeerRate { .. } => Code::ResourceExhausted,
            Self::Pool(PoolError::Stopped) => Code::Unavailable,
            Self::Issue(IssueError::Authority(_) | IssueError::SelfCheck(_))
            | Self::Internal(_) => Code::Internal,
        }
    }

    /// The check that refused, as a metric label: a short fixed name.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Self::Auth(e) if e.is_unavailable() => "token_keys_unavailable",
            Self::Auth(AuthError::ReviewsBusy(_)) => "token_reviews_busy",
            Self::Auth(AuthError::NoToken) => "no_token",
            Self::Auth(_) => "token",
            Self::Issue(IssueError::Csr(_)) => "csr",
            Self::Issue(IssueError::Validity(ValidityError::IssuerNotValid { .. })) => {
                "authority_not_valid"
            }
            Self::Issue(IssueError::Validity(_)) => "ttl",
            Self::Issue(IssueError::SanMismatch { .. }) => "san_mismatch",
            Self::Issue(IssueError::Authority(_)) => "signing",
            Self::Issue(IssueError::SelfCheck(_)) => "self_check",
            Self::Audit(AuditError::Unavailable(_)) => "audit_unavailable",
            Self::Audit(AuditError::Overloaded) => "audit_overloaded",
            Self::Impersonation(ImpersonationError::Api { .. }) => "kube_api_unavailable",
            Self::Impersonation(
                ImpersonationError::NoNodeCheck { .. }
                | ImpersonationError::CallerNode { .. }
                | ImpersonationError::NotOnNode { .. },
            ) => "impersonation_node",
            Self::Impersonation(_) => "impersonation",
            Self::IdentityRate { .. } => "identity_rate",
            Self::PeerRate { .. } => "peer_rate",
            Self::Pool(_) => "capacity",
            Self::Internal(_) => "internal",
        }
    }

    /// The status sent to the caller: the code and the message, nothing secret, and never
    /// more than [`MAX_MESSAGE_BYTES`] of it (the parts a caller sent are cut already).
    pub fn to_status(&self) -> Status {
        Status::new(
            self.code(),
            crate::untrusted::cut(&self.to_string(), MAX_MESSAGE_BYTES),
        )
    }
}

/// The name of a code as stored in the audit log, e.g. `UNAUTHENTICATED`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
