//! Caller authentication: a Kubernetes service-account JWT becomes an [`Identity`].

mod cache;
mod claims;
pub mod dev;
mod error;
mod fetch;
pub mod jwks;
pub mod node;
pub mod review;

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Validation;
use zeroize::Zeroizing;

use cache::{VERIFIED_TOKENS, Verified, VerifiedBy, VerifiedTokens};
pub use claims::{ClaimPolicy, Claims, LEEWAY_SECS, ServiceAccount};
pub use error::AuthError;
pub use fetch::Fetcher;
pub use jwks::{ALLOWED_ALGORITHMS, IssuerKeys, KeySet};

use crate::spiffe::{SpiffeId, TrustDomain};

/// Largest token accepted (Kubernetes tokens are around 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A bearer token. Zeroized on drop; its `Debug` never shows it.
pub struct BearerToken(Zeroizing<String>);

impl BearerToken {
    /// Parses an `authorization` header value.
    pub fn from_header(value: &str) -> Result<Self, AuthError> {
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(AuthError::NotBearer)?
            .trim();
        Self::new(token)
    }

    /// Wraps a bare token.
    pub fn new(token: &str) -> Result<Self, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge(MAX_TOKEN_BYTES));
        }
        Ok(Self(Zeroizing::new(token.to_owned())))
    }

    /// The token text, for verification.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken([redacted])")
    }
}

/// Who the caller is, once its token checks out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub spiffe_id: SpiffeId,
    /// The service account's namespace.
    pub namespace: String,
    /// The service account's name.
    pub service_account: String,
    /// The pod, if the token names one.
    pub pod_name: Option<String>,
    /// The pod's uid.
    pub pod_uid: Option<String>,
    /// The pod's node, if the token (or its review) names one.
    pub node: Option<String>,
    /// Who vouched for the token.
    pub issuer: IssuerId,
}

/// Who vouched for a caller's token: an issuer whose signature checked out, or the
/// Kubernetes API's TokenReview. Two kinds, never compared as text: an issuer whose `iss`
/// happens to read like a review's name is still only that issuer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IssuerId {
    /// A JWT issuer, by its `iss`.
    Jwt(String),
    /// The TokenReview API of the cluster at this URL.
    TokenReview(String),
    /// The API server at this URL, through a PodCertificateRequest: it admitted the request
    /// only for a pod running as that service account on the node whose kubelet asked, and
    /// checked the key's proof of possession.
    PodCertificateRequest(String),
}

impl IssuerId {
    /// A JWT issuer named `iss`.
    pub fn jwt(iss: impl Into<String>) -> Self {
        Self::Jwt(iss.into())
    }
}

/// As recorded in the audit log (`token_issuer`): the `iss`, or `TokenReview <api url>`.
impl fmt::Display for IssuerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Jwt(iss) => f.write_str(iss),
            Self::TokenReview(api) => write!(f, "TokenReview {api}"),
            Self::PodCertificateRequest(api) => write!(f, "PodCertificateRequest {api}"),
        }
    }
}

/// One accepted token issuer: its `iss`, audiences and keys.
pub struct TokenIssuer {
    policy: ClaimPolicy,
    keys: IssuerKeys,
    cluster_id: Option<String>,
}

impl TokenIssuer {
    /// An issuer accepting `audiences`, with keys from `keys`.
    pub fn new(issuer: String, audiences: Vec<String>, keys: IssuerKeys) -> Self {
        Self {
            policy: ClaimPolicy { issuer, audiences },
            keys,
            cluster_id: None,
        }
    }

    /// Makes requests whose `clusterid` is `cluster_id` go to this issuer alone.
    pub fn for_cluster(mut self, cluster_id: Option<String>) -> Self {
        self.cluster_id = cluster_id;
        self
    }

    /// Its `iss`.
    pub fn name(&self) -> &str {
        &self.policy.issuer
    }
}

/// Verifies tokens against the configured issuers.
pub struct Authenticator {
    trust_domain: TrustDomain,
    issuers: Vec<Arc<TokenIssuer>>,
    fetcher: Fetcher,
    verified: VerifiedTokens,
    /// Reviews the tokens no configured issuer claims, when TokenReview is on.
    reviewer: Option<review::TokenReviewer>,
}

#[derive(serde::Deserialize)]
struct Header {
    alg: Option<String>,
    kid: Option<String>,
}

/// Checks `token`'s signature with `key` and decodes its claims. A signature check is CPU
/// work (an RSA or ECDSA verification, on a token not seen before), so it runs on the
/// blocking pool, not on the reactor that serves every other connection.
async fn check_signature(
    token: &BearerToken,
    key: std::sync::Arc<jwks::VerifyingKey>,
    kid: Option<&str>,
    alg: &str,
) -> Result<Claims, AuthError> {
    let text = Zeroizing::new(token.expose().to_owned());
    let checking = std::sync::Arc::clone(&key);
    let decoded = tokio::task::spawn_blocking(move || {
        let mut validation = Validation::new(checking.algorithms[0]);
        validation.algorithms = checking.algorithms.clone();
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        jsonwebtoken::decode::<Claims>(text.as_str(), &checking.key, &validation)
            .map(|data| data.claims)
    })
    .await
    .map_err(|e| AuthError::KeysUnavailable(format!("the signature check did not finish: {e}")))?;
    decoded.map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        let kid = crate::untrusted::claim(kid.unwrap_or_default());
        match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature(kid),
            ErrorKind::InvalidAlgorithm => AuthError::AlgorithmMismatch {
                alg: crate::untrusted::claim(alg),
                kid,
                allowed: format!("{:?}", key.algorithms),
            },
            _ => AuthError::Malformed(crate::untrusted::claim(&e.to_string())),
        }
    })
}

fn decode_part<T: serde::de::DeserializeOwned>(part: &str, what: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed(format!("the {what} is not base64url")))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        AuthError::Malformed(format!(
            "the {what} is not the expected JSON: {}",
            crate::untrusted::claim(&e.to_string())
        ))
    })
}

impl Authenticator {
    /// An authenticator for `issuers`; identities are in `trust_domain`.
    pub fn new(trust_domain: TrustDomain, issuers: Vec<TokenIssuer>, fetcher: Fetcher) -> Self {
        Self {
            trust_domain,
            issuers: issuers.into_iter().map(Arc::new).collect(),
            fetcher,
            verified: VerifiedTokens::new(VERIFIED_TOKENS),
            reviewer: None,
        }
    }

    /// Sends tokens that no configured issuer claims to the Kubernetes API's TokenReview.
    pub fn with_reviewer(mut self, reviewer: review::TokenReviewer) -> Self {
        self.reviewer = Some(reviewer);
        self
    }

    /// The configured issuers' names.
    pub fn issuer_names(&self) -> Vec<&str> {
        self.issuers.iter().map(|i| i.name()).collect()
    }

    /// Checks `token` and returns the caller's identity: a remembered answer if there is
    /// one ([`Authenticator::remembered`]), else [`Authenticator::verify_new`]. `cluster` is
    /// the request's `clusterid`; `now` is unix seconds.
    pub async fn authenticate(
        &self,
        token: &BearerToken,
        cluster: Option<&str>,
        now: i64,
    ) -> Result<Identity, AuthError> {
        match self.remembered(token, cluster, now) {
            Some(identity) => Ok(identity),
            None => self.verify_new(token, cluster, now).await,
        }
    }

    /// The identity `token` was already verified as, if it is remembered, has not expired,
    /// came from the issuer this request's cluster selects, and the key that verified it is
    /// still in its issuer's JWKS. Cheap: no signature, no network.
    pub fn remembered(
        &self,
        token: &BearerToken,
        cluster: Option<&str>,
        now: i64,
    ) -> Option<Identity> {
        let key = VerifiedTokens::key(token);
        let selected = self.issuer_for_cluster(cluster).map(|i| i.name());
        let found = self
            .verified
            .get(&key, now)
            .filter(|v| selected.is_none_or(|iss| v.identity.issuer == IssuerId::jwt(iss)));
        let Some(verified) = found else {
            crate::metrics::metrics().token_cache_misses.inc();
            return None;
        };
        if !self.key_still_trusted(&verified) {
            self.verified.remove(&key);
            crate::metrics::metrics().token_cache_misses.inc();
            return None;
        }
        crate::metrics::metrics().token_cache_hits.inc();
        Some(verified.identity)
    }

    fn key_still_trusted(&self, verified: &Verified) -> bool {
        match &verified.by {
            None => true,
            Some(by) => self.issuers.get(by.issuer).is_some_and(|issuer| {
                issuer
                    .keys
                    .current()
                    .still_has(by.kid.as_deref(), &by.thumbprint)
            }),
        }
    }

    /// Verifies `token` from scratch (signature and claims, or a TokenReview) and remembers
    /// the answer if it is positive. This is the expensive path: callers charge it to the
    /// peer's budget first.
    pub async fn verify_new(
        &self,
        token: &BearerToken,
        cluster: Option<&str>,
        now: i64,
    ) -> Result<Identity, AuthError> {
        let verified = self.verify(token, cluster, now).await?;
        let identity = verified.identity.clone();
        self.verified
            .insert(VerifiedTokens::key(token), verified, now);
        Ok(identity)
    }

    /// Reads again each issuer's JWKS whose refresh is due, and forgets the tokens verified
    /// by a key that is gone. Call it every second or so.
    pub async fn refresh_keys(&self) {
        let mut changed = false;
        for issuer in &self.issuers {
            if let Some(refreshed) = issuer.keys.refresh_if_due(&self.fetcher).await {
                changed |= !refreshed.removed.is_empty();
            }
        }
        if changed {
            self.verified.retain(|v| self.key_still_trusted(v));
        }
    }

    async fn verify(
        &self,
        token: &BearerToken,
        cluster: Option<&str>,
        now: i64,
    ) -> Result<Verified, AuthError> {
        let text = token.expose();
        let mut parts = text.split('.');
        let (Some(header), Some(payload), Some(_sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed(
                "expected three dot-separated parts".into(),
            ));
        };
        let header: Header = decode_part(header, "header")?;
        let alg = header.alg.unwrap_or_default();
        if !ALLOWED_ALGORITHMS.contains(&alg.as_str()) {
            return Err(AuthError::AlgorithmNotAllowed(crate::untrusted::claim(
                &alg,
            )));
        }
        // Pick the issuer by the (not yet verified) `iss`; the verified claims are checked
        // against that issuer's policy below.
        let unverified: Claims = decode_part(payload, "payload")?;
        let for_cluster = self.issuer_for_cluster(cluster);
        if let (None, Some(reviewer)) = (for_cluster, &self.reviewer) {
            let claimed = unverified
                .issuer()
                .is_some_and(|iss| self.issuers.iter().any(|i| i.name() == iss));
            if !claimed {
                return self.review(reviewer, token, &unverified, now).await;
            }
        }
        let issuer = match for_cluster {
            Some(issuer) => {
                let got = unverified.issuer().unwrap_or_default();
                if got != issuer.name() {
                    return Err(AuthError::NotTheClustersIssuer {
                        cluster: crate::untrusted::claim(cluster.unwrap_or_default()),
                        got: crate::untrusted::claim(got),
                        want: issuer.name().to_owned(),
                    });
                }
                issuer
            }
            None => self.select_issuer(unverified.issuer())?,
        };
        let issuer_index = self
            .issuers
            .iter()
            .position(|i| std::ptr::eq(&**i, issuer))
            .unwrap_or(usize::MAX);
        let key = issuer
            .keys
            .find(header.kid.as_deref(), &self.fetcher)
            .await?;
        let by = VerifiedBy {
            issuer: issuer_index,
            kid: header.kid.clone(),
            thumbprint: key.thumbprint,
        };
        let claims = check_signature(token, key, header.kid.as_deref(), &alg).await?;
        let account = claims.check(&issuer.policy, now)?;
        let expires_at = account.expires_at;
        let identity = self.identity_of(account, IssuerId::Jwt(issuer.policy.issuer.clone()))?;
        Ok(Verified {
            identity,
            expires_at,
            by: Some(by),
        })
    }

    /// The identity of a service account a token proved, vouched for by `issuer`.
    fn identity_of(
        &self,
        account: ServiceAccount,
        issuer: IssuerId,
    ) -> Result<Identity, AuthError> {
        let spiffe_id =
            SpiffeId::for_service_account(&self.trust_domain, &account.namespace, &account.name)
                .map_err(|_| {
                    AuthError::BadIdentity(crate::untrusted::claim(&format!(
                        "{}/{}",
                        account.namespace, account.name
                    )))
                })?;
        Ok(Identity {
            spiffe_id,
            namespace: account.namespace,
            service_account: account.name,
            pod_name: account.pod_name,
            pod_uid: account.pod_uid,
            node: account.node_name,
            issuer,
        })
    }

    /// Has the API server check `token`; its answer is trusted for [`review::REVIEW_CACHE_SECS`]
    /// at most, and never past the token's `exp`.
    async fn review(
        &self,
        reviewer: &review::TokenReviewer,
        token: &BearerToken,
        unverified: &Claims,
        now: i64,
    ) -> Result<Verified, AuthError> {
        // A token with no exp is a legacy secret: refused before anyone is asked.
        let exp = unverified.expiry().ok_or(AuthError::NoExpiry)?;
        if exp <= now {
            return Err(AuthError::Expired {
                at: crate::rfc3339::secs_text(exp),
            });
        }
        let reviewed = reviewer.review(token).await?;
        let account = reviewed
            .username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| AuthError::BadSubject(crate::untrusted::claim(&reviewed.username)))?;
        let (namespace, name) = (account.0.to_owned(), account.1.to_owned());
        let spiffe_id = SpiffeId::for_service_account(&self.trust_domain, &namespace, &name)
            .map_err(|_| {
                AuthError::BadIdentity(crate::untrusted::claim(&format!("{namespace}/{name}")))
            })?;
        Ok(Verified {
            identity: Identity {
                spiffe_id,
                namespace,
                service_account: name,
                pod_name: reviewed.pod_name,
                pod_uid: reviewed.pod_uid,
                node: reviewed.node_name,
                issuer: reviewer.issuer_id(),
            },
            expires_at: (now + review::REVIEW_CACHE_SECS).min(exp),
            by: None,
        })
    }

    /// The issuer configured for `cluster`, if any.
    fn issuer_for_cluster(&self, cluster: Option<&str>) -> Option<&TokenIssuer> {
        let cluster = cluster?;
        self.issuers
            .iter()
            .find(|i| i.cluster_id.as_deref() == Some(cluster))
            .map(|i| &**i)
    }

    fn select_issuer(&self, iss: Option<&str>) -> Result<&TokenIssuer, AuthError> {
        if let [only] = self.issuers.as_slice() {
            // Its policy names the mismatch, if any.
            return Ok(only);
        }
        let iss = iss.ok_or(AuthError::MissingClaim("iss"))?;
        self.issuers
            .iter()
            .find(|i| i.name() == iss)
            .map(|i| &**i)
            .ok_or_else(|| AuthError::WrongIssuer {
                got: crate::untrusted::claim(iss),
                want: self.issuer_names().join("\" or \""),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_authenticator(keys: IssuerKeys) -> Authenticator {
        Authenticator::new(
            TrustDomain::new("cluster.local").unwrap(),
            vec![TokenIssuer::new(
                dev::DEV_ISSUER.into(),
                vec!["istio-ca".into()],
                keys,
            )],
            Fetcher::new(None).unwrap(),
        )
    }

    #[tokio::test]
    async fn verified_tokens_are_remembered_only_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dev::DevIssuer::load_or_create(dir.path()).unwrap();
        let authn = dev_authenticator(IssuerKeys::fixed(dev.key_set()));
        let token = BearerToken::new(&dev.mint("a", "b", "istio-ca", 60, None).unwrap()).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(authn.remembered(&token, None, now).is_none());
        let id = authn.authenticate(&token, None, now).await.unwrap();
        assert_eq!(id.spiffe_id.to_string(), "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(authn.remembered(&token, None, now + 30), Some(id.clone()));
        // Past its exp, the remembered answer is gone and the token is refused.
        assert!(authn.remembered(&token, None, now + 61).is_none());
        let err = authn
            .authenticate(&token, None, now + 61)
            .await
            .unwrap_err();
        assert!(matches!(err, AuthError::Expired { .. }), "{err}");
        // Refusals are never remembered.
        let bad = BearerToken::new("x.y.z").unwrap();
        assert!(authn.authenticate(&bad, None, now).await.is_err());
        assert!(authn.remembered(&bad, None, now).is_none());
    }

    #[tokio::test]
    async fn a_key_removed_from_the_jwks_stops_verifying_and_its_tokens_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dev::DevIssuer::load_or_create(dir.path()).unwrap();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, dev.jwks_json()).unwrap();
        let keys = IssuerKeys::from_file(&jwks, std::time::Duration::ZERO).unwrap();
        let authn = dev_authenticator(keys);
        let token = BearerToken::new(&dev.mint("a", "b", "istio-ca", 600, None).unwrap()).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        authn.verify_new(&token, None, now).await.unwrap();
        // A refresh that changes nothing keeps the answer.
        authn.refresh_keys().await;
        assert!(authn.remembered(&token, None, now).is_some());
        // The key leaves the JWKS: the next refresh forgets the answer, and the token fails.
        std::fs::write(&jwks, r#"{"keys": []}"#).unwrap();
        authn.refresh_keys().await;
        assert_eq!(authn.verified.len(), 0);
        assert!(authn.remembered(&token, None, now).is_none());
        let err = authn.verify_new(&token, None, now).await.unwrap_err();
        assert!(matches!(err, AuthError::UnknownKid(_)), "{err}");
        // A JWKS that cannot be read keeps the keys it had (none, here).
        std::fs::write(&jwks, "not json").unwrap();
        authn.refresh_keys().await;
        std::fs::write(&jwks, dev.jwks_json()).unwrap();
        authn.refresh_keys().await;
        authn
            .verify_new(&token, None, now)
            .await
            .expect("the key is back");
    }

    #[test]
    fn the_cache_stays_bounded() {
        let id = Identity {
            spiffe_id: SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap(),
            namespace: "a".into(),
            service_account: "b".into(),
            pod_name: None,
            pod_uid: None,
            node: None,
            issuer: IssuerId::jwt("i"),
        };
        let until = |expires_at| Verified {
            identity: id.clone(),
            expires_at,
            by: None,
        };
        let cache = VerifiedTokens::new(4);
        for i in 0..100u8 {
            cache.insert([i; 32], until(100), 0);
            assert!(cache.len() <= 4);
        }
        assert!(cache.get(&[99; 32], 0).is_some(), "the newest is kept");
        // Expired entries make room first.
        let cache = VerifiedTokens::new(2);
        cache.insert([1; 32], until(10), 0);
        cache.insert([2; 32], until(100), 0);
        cache.insert([3; 32], until(100), 50);
        assert!(cache.get(&[2; 32], 50).is_some() && cache.get(&[3; 32], 50).is_some());
    }
}
