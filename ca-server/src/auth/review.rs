//! Kubernetes TokenReview: the API server checks a token for us (`POST
//! /apis/authentication.k8s.io/v1/tokenreviews`), as istiod does when it is given no JWKS.
//! It knows about revoked tokens and deleted pods, which a local JWKS check cannot; it costs
//! a round trip, so positive answers are remembered briefly (by the caller, see
//! [`super::Authenticator`]).

use zeroize::Zeroizing;

use super::{AuthError, BearerToken};
use crate::kube::{KubeApi, KubeClient};

/// The API path of TokenReview.
pub const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// How long a positive review is trusted before the API server is asked again (never past
/// the token's own `exp`).
pub const REVIEW_CACHE_SECS: i64 = 60;

/// Extra fields the API server puts in a review of a pod-bound token.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Asks the API server about tokens.
#[derive(Debug)]
pub struct TokenReviewer {
    api: KubeClient,
    audiences: Vec<String>,
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

#[derive(serde::Deserialize)]
struct Review {
    status: Option<ReviewStatus>,
}

#[derive(serde::Deserialize)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    user: Option<ReviewUser>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    error: String,
}

#[derive(serde::Deserialize)]
struct ReviewUser {
    #[serde(default)]
    username: String,
    #[serde(default)]
    extra: std::collections::HashMap<String, Vec<String>>,
}

impl TokenReviewer {
    /// A reviewer asking `api`, for tokens meant for one of `audiences`.
    pub fn new(api: KubeApi, audiences: Vec<String>) -> Result<Self, String> {
        Ok(Self {
            api: KubeClient::new(api)?,
            audiences,
        })
    }

    /// The API server's URL.
    pub fn api_url(&self) -> &str {
        self.api.url()
    }

    /// Asks the API server whether `token` is valid for our audiences.
    pub async fn review(&self, token: &BearerToken) -> Result<Reviewed, AuthError> {
        let unavailable = AuthError::ReviewUnavailable;
        let body = Zeroizing::new(
            serde_json::to_vec(&serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": { "token": token.expose(), "audiences": self.audiences },
            }))
            .map_err(|e| unavailable(e.to_string()))?,
        );
        let answer = self
            .api
            .call(http::Method::POST, TOKEN_REVIEW_PATH, Some(body.to_vec()))
            .await
            .map_err(unavailable)?;
        let (status, body) = (answer.status, answer.body);
        let unavailable =
            |detail: String| AuthError::ReviewUnavailable(format!("{}: {detail}", self.api.url()));
        if status == http::StatusCode::FORBIDDEN || status == http::StatusCode::UNAUTHORIZED {
            return Err(unavailable(format!(
                "HTTP {status}: this server's service account may not create tokenreviews \
                 (bind it to a ClusterRole allowing `create` on `tokenreviews`)"
            )));
        }
        if !status.is_success() {
            return Err(unavailable(format!("HTTP {status}")));
        }
        let review: Review = serde_json::from_slice(&body)
            .map_err(|e| unavailable(format!("not a TokenReview: {e}")))?;
        let status = review
            .status
            .ok_or_else(|| unavailable("the TokenReview has no status".into()))?;
        if !status.authenticated {
            let why = if status.error.is_empty() {
                "not authenticated".to_owned()
            } else {
                status.error
            };
            return Err(AuthError::ReviewRefused(why));
        }
        if !status.audiences.is_empty()
            && !status.audiences.iter().any(|a| self.audiences.contains(a))
        {
            return Err(AuthError::WrongAudience {
                got: status.audiences,
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
