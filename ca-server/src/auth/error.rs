//! Why a token was refused, and how each refusal is classed.

/// Why a token was refused. Every message says what is wrong in terms a person can act on,
/// and none includes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer` header.
    #[error(
        "no bearer token: send the pod's service-account token as `authorization: Bearer <token>`"
    )]
    NoToken,
    /// The header is not `Bearer <token>`.
    #[error("the authorization header is not `Bearer <token>`")]
    NotBearer,
    /// The token is too large to be a service-account token.
    #[error("the token is larger than {0} bytes")]
    TooLarge(usize),
    /// The token is not a well-formed JWT.
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    /// The token's `alg` is not on the allowed list.
    #[error(
        "token algorithm {0:?} is not accepted (only RS256/384/512, PS256/384/512 and ES256/384)"
    )]
    AlgorithmNotAllowed(String),
    /// The token's `alg` does not fit the key its `kid` names.
    #[error("token algorithm {alg} does not match its key (kid {kid:?}), which allows {allowed}")]
    AlgorithmMismatch {
        /// The token's `alg`.
        alg: String,
        /// The token's `kid`.
        kid: String,
        /// What the key allows.
        allowed: String,
    },
    /// No key with that `kid`.
    #[error("no key with kid {0:?} in the issuer's JWKS")]
    UnknownKid(String),
    /// No `kid`, and the issuer has several keys (or none).
    #[error("the token has no kid and the issuer has {0} keys to choose from")]
    NoKid(usize),
    /// The signature does not verify.
    #[error("the token's signature does not verify with the issuer's key (kid {0:?})")]
    BadSignature(String),
    /// The issuer's keys could not be fetched.
    #[error("the issuer's keys are unavailable: {0}")]
    KeysUnavailable(String),
    /// `iss` is not the configured issuer.
    #[error("token issuer {got:?} is not the configured issuer {want:?}")]
    WrongIssuer {
        /// The token's `iss`.
        got: String,
        /// What we accept.
        want: String,
    },
    /// The request's `clusterid` selects an issuer the token is not from.
    #[error(
        "token issuer {got:?} is not the issuer of cluster {cluster:?} ({want:?}), which the \
         request's clusterid header names: check the proxy's CLUSTER_ID"
    )]
    NotTheClustersIssuer {
        /// The `clusterid` header.
        cluster: String,
        /// The token's `iss`.
        got: String,
        /// That cluster's issuer.
        want: String,
    },
    /// `aud` does not contain a configured audience.
    #[error("audience [{}] does not include {}", got.join(", "), want.join(" or "))]
    WrongAudience {
        /// The token's audiences.
        got: Vec<String>,
        /// What we accept.
        want: Vec<String>,
    },
    /// No `exp`.
    #[error(
        "the token has no exp claim; legacy service-account secrets are refused: use a projected \
         token (serviceAccountToken volume) with audience istio-ca"
    )]
    NoExpiry,
    /// `exp` is past.
    #[error("token expired at {at}")]
    Expired {
        /// When, RFC 3339.
        at: String,
    },
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("token is not valid before {at} ({claim} is in the future; check the clocks)")]
    NotYetValid {
        /// `nbf` or `iat`.
        claim: &'static str,
        /// When, RFC 3339.
        at: String,
    },
    /// A required claim is missing.
    #[error("the token has no {0} claim")]
    MissingClaim(&'static str),
    /// A time claim is not a number.
    #[error("the token's {0} claim is not a number")]
    BadClaim(&'static str),
    /// `sub` is not a service account.
    #[error("sub {0:?} is not system:serviceaccount:<namespace>:<name>")]
    BadSubject(String),
    /// `sub` and the `kubernetes.io` claim disagree.
    #[error("sub {sub:?} disagrees with the kubernetes.io claim, which names {kubernetes}")]
    SubjectMismatch {
        /// The token's `sub`.
        sub: String,
        /// `<namespace>/<service account>` from the `kubernetes.io` claim.
        kubernetes: String,
    },
    /// The namespace or service account cannot form a SPIFFE ID.
    #[error("namespace/service account {0:?} cannot form a SPIFFE ID")]
    BadIdentity(String),
    /// The Kubernetes API server could not review the token.
    #[error("the Kubernetes TokenReview failed: {0}")]
    ReviewUnavailable(String),
    /// The Kubernetes API server says the token is not valid.
    #[error("the Kubernetes API server refused the token: {0}")]
    ReviewRefused(String),
    /// As many TokenReviews as allowed are already waiting for the API server.
    #[error(
        "{0} TokenReviews are already waiting for the Kubernetes API server \
         (--max-token-reviews); retry shortly"
    )]
    ReviewsBusy(usize),
}

impl crate::class::Classify for AuthError {
    /// Unauthenticated, but for faults on our side (the caller should retry): the keys or
    /// the TokenReview API away, or too many reviews waiting.
    fn class(&self) -> crate::class::Class {
        use crate::class::Class;
        match self {
            Self::KeysUnavailable(_) | Self::ReviewUnavailable(_) => Class::Unavailable,
            Self::ReviewsBusy(_) => Class::Overloaded,
            _ => Class::Unauthenticated,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::KeysUnavailable(_) | Self::ReviewUnavailable(_) => "token_keys_unavailable",
            Self::ReviewsBusy(_) => "token_reviews_busy",
            Self::NoToken => "no_token",
            _ => "token",
        }
    }
}
