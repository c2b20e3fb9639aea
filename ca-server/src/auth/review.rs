//! Kubernetes TokenReview: the API server checks a token for us (`POST
//! /apis/authentication.k8s.io/v1/tokenreviews`), as istiod does when it is given no JWKS.
//! It knows about revoked tokens and deleted pods, which a local JWKS check cannot; it costs
//! a round trip, so positive answers are remembered briefly (by the caller, see
//! [`super::Authenticator`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::{AuthError, BearerToken};
use crate::kube::{KubeApi, KubeClient};

/// How long a positive review is trusted before the API server is asked again (never past
/// the token's own `exp`).
pub const REVIEW_CACHE_SECS: i64 = 60;

/// How long a refusal from the API server is remembered: the same bad token, sent again, is
/// refused without asking.
pub const REFUSAL_CACHE: Duration = Duration::from_secs(10);

/// How many refusals are remembered.
const REFUSALS_KEPT: usize = 10_000;

/// How many TokenReviews may wait for the API server at once by default
/// (`--max-token-reviews`).
pub const DEFAULT_MAX_REVIEWS: usize = 32;

/// Extra fields the API server puts in a review of a pod-bound token.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Asks the API server about tokens: at most a fixed number at once, and never twice within
/// [`REFUSAL_CACHE`] about a token it refused.
#[derive(Debug)]
pub struct TokenReviewer {
    api: KubeClient,
    audiences: Vec<String>,
    outstanding: Semaphore,
    max_outstanding: usize,
    /// Refused tokens by SHA-256, with the refusal and when it was given.
    refused: Mutex<HashMap<[u8; 32], (AuthError, Instant)>>,
}

/// What the API server said about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub username: String,
    /// The pod the token is bound to, if any.
    pub pod_name: Option<String>,
    /// That pod's uid.
    pub pod_uid: Option<String>,
    /// The node that pod runs on, if the API server says (Kubernetes 1.30 and later).
    pub node_name: Option<String>,
}

impl TokenReviewer {
    /// A reviewer asking `api`, for tokens meant for one of `audiences`, with at most
    /// `max_outstanding` reviews waiting for it at once.
    pub fn new(
        api: KubeApi,
        audiences: Vec<String>,
        max_outstanding: usize,
    ) -> Result<Self, crate::kube::Error> {
        Ok(Self {
            api: KubeClient::new(api)?,
            audiences,
            outstanding: Semaphore::new(max_outstanding),
            max_outstanding,
            refused: Mutex::new(HashMap::new()),
        })
    }

    /// The API server's URL.
    pub fn api_url(&self) -> &str {
        self.api.url()
    }

    /// Who vouches for the identities it returns.
    pub fn issuer_id(&self) -> super::IssuerId {
        super::IssuerId::TokenReview(self.api.url().to_owned())
    }

    fn refusals(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (AuthError, Instant)>> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the API server whether `token` is valid for our audiences: a refusal it gave in
    /// the last [`REFUSAL_CACHE`] is given again without asking, and beyond the allowed
    /// number of outstanding reviews the answer is [`AuthError::ReviewsBusy`] at once.
    pub async fn review(&self, token: &BearerToken) -> Result<Reviewed, AuthError> {
        let key = super::VerifiedTokens::key(token);
        if let Some((refusal, at)) = self.refusals().get(&key)
            && at.elapsed() < REFUSAL_CACHE
        {
            return Err(refusal.clone());
        }
        let counted = |outcome| {
            crate::metrics::metrics()
                .token_reviews
                .get_or_create(&crate::metrics::ReviewLabels { outcome })
                .inc();
        };
        let Ok(_permit) = self.outstanding.try_acquire() else {
            counted("busy");
            return Err(AuthError::ReviewsBusy(self.max_outstanding));
        };
        let answer = self.ask(token).await;
        counted(match &answer {
            Ok(_) => "authenticated",
            Err(AuthError::ReviewUnavailable(_)) => "failed",
            Err(_) => "refused",
        });
        if let Err(refusal @ (AuthError::ReviewRefused(_) | AuthError::WrongAudience { .. })) =
            &answer
        {
            let mut refused = self.refusals();
            if refused.len() >= REFUSALS_KEPT {
                refused.retain(|_, (_, at)| at.elapsed() < REFUSAL_CACHE);
                if refused.len() >= REFUSALS_KEPT {
                    refused.clear();
                }
            }
            refused.insert(key, (refusal.clone(), Instant::now()));
        }
        answer
    }

    async fn ask(&self, token: &BearerToken) -> Result<Reviewed, AuthError> {
        let review = self
            .api
            .token_review(token.expose(), &self.audiences)
            .await
            .map_err(|e| AuthError::ReviewUnavailable(e.to_string()))?;
        let status = review.status.ok_or_else(|| {
            AuthError::ReviewUnavailable(format!(
                "{}: the TokenReview has no status",
                self.api.url()
            ))
        })?;
        if !status.authenticated {
            let why = if status.error.is_empty() {
                "not authenticated".to_owned()
            } else {
                status.error
            };
            return Err(AuthError::ReviewRefused(crate::untrusted::claim(&why)));
        }
        // The API server names the audiences it checked the token against; none of ours (or
        // none at all: an authenticator that ignores audiences) means the token was not
        // shown to be meant for this CA.
        if !status.audiences.iter().any(|a| self.audiences.contains(a)) {
            return Err(AuthError::WrongAudience {
                got: status
                    .audiences
                    .iter()
                    .take(8)
                    .map(|a| crate::untrusted::claim(a))
                    .collect(),
                want: self.audiences.clone(),
            });
        }
        let user = status
            .user
            .ok_or_else(|| AuthError::ReviewRefused("the review names no user".into()))?;
        let first = |key: &str| user.extra.get(key).and_then(|v| v.first()).cloned();
        Ok(Reviewed {
            pod_name: first(POD_NAME_EXTRA),
            pod_uid: first(POD_UID_EXTRA),
            node_name: first(NODE_NAME_EXTRA),
            username: user.username,
        })
    }
}
